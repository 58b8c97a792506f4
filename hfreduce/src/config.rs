//! A rank's place in the job: from the environment the scheduler gives every rank (`RANK
//! WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT`, plus `HFREDUCE_NODE_ID` to
//! place ranks on virtual nodes), or explicit.

use std::time::Duration;

use crate::error::CommError;

/// Largest world supported (bounds per-peer state).
pub const MAX_WORLD: usize = 4096;

/// Where a rank stands and how it talks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommConfig {
    /// This rank, 0-based.
    pub rank: usize,
    /// Ranks in the job.
    pub world_size: usize,
    /// This rank's index among the ranks of its node.
    pub local_rank: usize,
    /// Ranks on this node.
    pub local_world_size: usize,
    /// The node this rank runs on (ranks with equal ids share memory). Defaults to the host name.
    pub node_id: String,
    /// Host of rank 0's rendezvous store.
    pub master_addr: String,
    /// Port of rank 0's rendezvous store.
    pub master_port: u16,
    /// Host this rank's data endpoint binds and is reached at.
    pub listen_host: String,
    /// A peer silent for this long fails the collective (and rendezvous takes at most this).
    pub timeout: Duration,
    /// Bytes per pipelined message.
    pub chunk_bytes: usize,
    /// Allreduce's node stage in lanes (every local rank carries a part over the network with
    /// its peers of other nodes) rather than through one leader per node. Off by default: on
    /// the 2-core machine it was measured on, lanes were no faster (docs/benchmarks.md).
    pub lanes: bool,
}

fn var(name: &str) -> Result<String, CommError> {
    std::env::var(name).map_err(|_| CommError::Config(format!("{name} is not set")))
}

fn number<T: std::str::FromStr>(name: &str) -> Result<T, CommError> {
    let value = var(name)?;
    value
        .trim()
        .parse()
        .map_err(|_| CommError::Config(format!("{name}={value:?} is not a number")))
}

impl CommConfig {
    /// From the environment; `HFREDUCE_NODE_ID`, `HFREDUCE_TIMEOUT` (seconds),
    /// `HFREDUCE_CHUNK_BYTES`, `HFREDUCE_LISTEN_HOST` and `HFREDUCE_LANES` are optional.
    pub fn from_env() -> Result<CommConfig, CommError> {
        let node_id = match std::env::var("HFREDUCE_NODE_ID") {
            Ok(id) => id,
            Err(_) => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".to_string()),
        };
        let timeout = match std::env::var("HFREDUCE_TIMEOUT") {
            Ok(_) => Duration::from_secs_f64(number::<f64>("HFREDUCE_TIMEOUT")?),
            Err(_) => Duration::from_secs(60),
        };
        let config = CommConfig {
            rank: number("RANK")?,
            world_size: number("WORLD_SIZE")?,
            local_rank: number("LOCAL_RANK")?,
            local_world_size: number("LOCAL_WORLD_SIZE")?,
            node_id,
            master_addr: var("MASTER_ADDR")?,
            master_port: number("MASTER_PORT")?,
            listen_host: std::env::var("HFREDUCE_LISTEN_HOST")
                .unwrap_or_else(|_| "127.0.0.1".to_string()),
            timeout,
            chunk_bytes: match std::env::var("HFREDUCE_CHUNK_BYTES") {
                Ok(_) => number("HFREDUCE_CHUNK_BYTES")?,
                Err(_) => 1 << 20,
            },
            lanes: match std::env::var("HFREDUCE_LANES").as_deref() {
                Ok("1" | "true" | "yes") => true,
                Ok("0" | "false" | "no") | Err(_) => false,
                Ok(other) => {
                    return Err(CommError::Config(format!(
                        "HFREDUCE_LANES={other:?}: use 1 or 0"
                    )));
                }
            },
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the values against each other.
    pub fn validate(&self) -> Result<(), CommError> {
        let fail = |m: String| Err(CommError::Config(m));
        if self.world_size == 0 || self.world_size > MAX_WORLD {
            return fail(format!(
                "WORLD_SIZE {} must be 1 to {MAX_WORLD}",
                self.world_size
            ));
        }
        if self.rank >= self.world_size {
            return fail(format!(
                "RANK {} must be below WORLD_SIZE {}",
                self.rank, self.world_size
            ));
        }
        if self.local_world_size == 0 || self.local_world_size > self.world_size {
            return fail(format!(
                "LOCAL_WORLD_SIZE {} must be 1 to WORLD_SIZE {}",
                self.local_world_size, self.world_size
            ));
        }
        if self.local_rank >= self.local_world_size {
            return fail(format!(
                "LOCAL_RANK {} must be below LOCAL_WORLD_SIZE {}",
                self.local_rank, self.local_world_size
            ));
        }
        if self.master_addr.is_empty() || self.master_port == 0 {
            return fail("MASTER_ADDR and MASTER_PORT must name rank 0's store".to_string());
        }
        if self.node_id.is_empty() {
            return fail("the node id must not be empty".to_string());
        }
        if self.timeout.is_zero() {
            return fail("the timeout must be above 0".to_string());
        }
        if !(4096..=64 << 20).contains(&self.chunk_bytes) {
            return fail(format!(
                "chunk size {} must be 4 KiB to 64 MiB",
                self.chunk_bytes
            ));
        }
        Ok(())
    }

    /// The store's `host:port`.
    pub fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CommConfig {
        CommConfig {
            rank: 1,
            world_size: 4,
            local_rank: 1,
            local_world_size: 2,
            node_id: "a".into(),
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            listen_host: "127.0.0.1".into(),
            timeout: Duration::from_secs(5),
            chunk_bytes: 1 << 20,
            lanes: false,
        }
    }

    #[test]
    fn inconsistent_places_are_refused_by_name() {
        assert!(config().validate().is_ok());
        let bad = CommConfig {
            rank: 4,
            ..config()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("RANK 4"));
        let bad = CommConfig {
            local_rank: 2,
            ..config()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("LOCAL_RANK")
        );
        let bad = CommConfig {
            chunk_bytes: 10,
            ..config()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("chunk size")
        );
    }
}
