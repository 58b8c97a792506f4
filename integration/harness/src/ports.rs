//! Loopback ports for local clusters: a block of free ones for tests that run side by side,
//! and a check that fails early and clearly when a configured port is taken.

/// Blocks handed out by this process, so that tests running side by side never share one.
static HANDED_OUT: std::sync::Mutex<Vec<(u16, u16)>> = std::sync::Mutex::new(Vec::new());

/// The lowest port the kernel hands out for outgoing connections: blocks are chosen below it,
/// so that a client socket cannot take a port between the choice and the daemon's bind.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A base port such that `count` consecutive loopback ports from it are free right now, below
/// the ephemeral range and apart from every block this process handed out before.
pub fn free_port_block(count: u16) -> std::io::Result<u16> {
    let low = 10_000u16;
    let high = ephemeral_low()
        .max(low + 2 * count.max(1))
        .saturating_sub(count);
    for _ in 0..500 {
        let base: u16 = rand::random_range(low..high);
        let end = base + count;
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if handed_out.iter().any(|(b, e)| base < *e && *b < end) {
            continue;
        }
        let listeners: Vec<_> = (0..count)
            .map_while(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if listeners.len() == usize::from(count) {
            handed_out.push((base, end));
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
