//! systemd's readiness protocol: a daemon run as a `Type=notify` unit tells systemd it is
//! ready (listening) by sending `READY=1` to the datagram socket named in `$NOTIFY_SOCKET`, so
//! that units ordered after it start only then. Outside systemd the variable is unset and
//! nothing happens.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::UnixDatagram;

/// Tells systemd (if it started this process as a notify unit) that the daemon is ready.
/// Failures are logged, not fatal: the daemon works either way.
pub fn notify_ready() {
    if let Some(socket) = std::env::var_os("NOTIFY_SOCKET")
        && let Err(error) = notify_ready_to(&socket)
    {
        tracing::warn!(%error, "cannot tell systemd the daemon is ready");
    }
}

/// Sends `READY=1` to the notify socket `socket` (a path, or `@name` for an abstract socket).
pub fn notify_ready_to(socket: &OsStr) -> std::io::Result<()> {
    let sender = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sender.send_to_addr(b"READY=1", &addr)?;
        }
        None => {
            sender.send_to(b"READY=1", std::path::Path::new(socket))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reaches_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        notify_ready_to(path.as_os_str()).unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(notify_ready_to(dir.path().join("nobody").as_os_str()).is_err());
    }
}
