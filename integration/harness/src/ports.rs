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

/// The first of `count` consecutive loopback ports, free right now: those from `base` when
/// it is given, or (`base` 0) a block chosen by [`free_port_block`] — chosen again, a few
/// times, if another process takes one of its ports between the choice and this check.
pub fn claim_ports(base: u16, count: u16) -> anyhow::Result<u16> {
    let block = |base: u16| -> Vec<String> {
        (0..count)
            .map(|i| format!("127.0.0.1:{}", u32::from(base) + u32::from(i)))
            .collect()
    };
    if base != 0 {
        ensure_free(block(base).iter().map(String::as_str))?;
        return Ok(base);
    }
    let mut attempts = 0;
    loop {
        let base = free_port_block(count)?;
        match ensure_free(block(base).iter().map(String::as_str)) {
            Ok(()) => return Ok(base),
            Err(error) if attempts < 4 => {
                attempts += 1;
                tracing::debug!(%error, "a chosen port was taken; choosing again");
            }
            Err(error) => return Err(error),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_block_is_free_and_a_taken_one_is_refused_by_address() {
        let base = claim_ports(0, 4).unwrap();
        let held = std::net::TcpListener::bind(("127.0.0.1", base + 2)).unwrap();
        let error = claim_ports(base, 4).unwrap_err().to_string();
        assert!(
            error.contains(&format!("127.0.0.1:{} is already in use", base + 2)),
            "{error}"
        );
        drop(held);
        assert_eq!(claim_ports(base, 4).unwrap(), base);
        // Chosen blocks never overlap one handed out before in this process.
        let other = claim_ports(0, 4).unwrap();
        assert!(other + 4 <= base || base + 4 <= other, "{base} and {other}");
    }
}
