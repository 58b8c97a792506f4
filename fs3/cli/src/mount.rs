//! `fs3 mount MOUNTPOINT`: the FUSE mount, in the foreground. SIGTERM or Ctrl-C unmounts it
//! cleanly; an unmount from outside (`umount`) ends the command too.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use fs3_fuse::{FuseMetrics, MountOptions};

use crate::files::Connect;

/// Parses `-o` options (comma separated, as mount(8)).
pub fn parse_options(options: &[String]) -> anyhow::Result<MountOptions> {
    let mut parsed = MountOptions::default();
    for option in options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        let (key, value) = option
            .split_once('=')
            .map_or((option, None), |(k, v)| (k, Some(v)));
        let number = |what: &str| -> anyhow::Result<u64> {
            value
                .with_context(|| format!("-o {what} needs a value, like {what}=2"))?
                .parse()
                .with_context(|| format!("-o {what}: not a number"))
        };
        match key {
            "allow_other" => parsed.allow_other = true,
            "ro" => parsed.read_only = true,
            "rw" => parsed.read_only = false,
            "nonempty" => parsed.nonempty = true,
            "cache_timeout" | "attr_timeout" | "entry_timeout" => {
                parsed.cache_timeout = Duration::from_secs(number(key)?);
            }
            "threads" => {
                parsed.threads = usize::try_from(number(key)?.clamp(1, 64))?;
            }
            _ => bail!(
                "unknown mount option {option:?} (known: allow_other, ro, rw, nonempty, \
                 cache_timeout=SECONDS, threads=N)"
            ),
        }
    }
    Ok(parsed)
}

pub async fn run(
    mountpoint: PathBuf,
    options: &[String],
    metrics_addr: Option<String>,
    connect: &Connect,
    stop: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let options = parse_options(options)?;
    // Check the mountpoint before connecting: a bad path is the more common mistake.
    fs3_fuse::check_mountpoint(&mountpoint, options.nonempty)?;
    let registry = ff_metrics::prometheus::Registry::new();
    let metrics = FuseMetrics::register(&registry)?;
    let metrics_server = match metrics_addr {
        Some(addr) => Some(ff_metrics::MetricsServer::start(&addr, registry).await?),
        None => None,
    };
    let fs = Arc::new(connect.connect().await?);
    let session = fs3_fuse::mount(
        fs,
        tokio::runtime::Handle::current(),
        &mountpoint,
        &options,
        metrics,
    )?;
    if let Some(server) = &metrics_server {
        eprintln!("metrics at http://{}/metrics", server.local_addr());
    }
    ff_config::systemd::notify_ready();
    eprintln!(
        "fs3 mounted at {} (Ctrl-C or SIGTERM unmounts)",
        mountpoint.display()
    );
    let ended_outside = async {
        while !session.guard.is_finished() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        stopped = stop => {
            stopped?;
            eprintln!("unmounting {}", mountpoint.display());
            tokio::task::spawn_blocking(move || session.umount_and_join())
                .await?
                .with_context(|| format!("unmounting {}", mountpoint.display()))?;
        }
        () = ended_outside => {
            eprintln!("{} was unmounted", mountpoint.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_parse_or_say_what_is_wrong() {
        let parsed = parse_options(&["ro,allow_other".into(), "cache_timeout=5".into()]).unwrap();
        assert!(parsed.read_only && parsed.allow_other);
        assert_eq!(parsed.cache_timeout, Duration::from_secs(5));
        let error = parse_options(&["bogus".into()]).unwrap_err().to_string();
        assert!(error.contains("unknown mount option"), "{error}");
        assert!(parse_options(&["threads=x".into()]).is_err());
    }
}
