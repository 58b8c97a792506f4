//! Loopback ports for local clusters: a block of free ones for tests that run side by side,
//! and a check that fails early and clearly when a configured port is taken.

/// A base port such that `count` consecutive loopback ports from it are free right now.
pub fn free_port_block(count: u16) -> std::io::Result<u16> {
    for _ in 0..200 {
        let base: u16 = rand::random_range(20_000..60_000);
        let listeners: Vec<_> = (0..count)
            .map_while(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if listeners.len() == usize::from(count) {
            return Ok(base);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no block of {count} free loopback ports found"),
    ))
}

/// Fails naming the first of `addrs` that cannot be bound (empty entries are skipped): a
/// daemon that cannot bind would otherwise only show up much later as a missing peer.
pub fn ensure_free<'a>(addrs: impl IntoIterator<Item = &'a str>) -> anyhow::Result<()> {
    for addr in addrs {
        if !addr.is_empty() && std::net::TcpListener::bind(addr).is_err() {
            anyhow::bail!(
                "{addr} is already in use (another cluster running?); choose other ports"
            );
        }
    }
    Ok(())
}
