//! A rank's place in the job: from the environment the scheduler gives every rank (`RANK
//! WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT`, plus `HFREDUCE_NODE_ID` to
//! place ranks on virtual nodes), or explicit.

use std::time::Duration;

use crate::error::CommError;

/// Largest world supported (bounds per-peer state).
pub const MAX_WORLD: usize = 4096;

/// Default bytes per message (docs/benchmarks.md).
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Default latency × bandwidth of the link, in bytes (loopback TCP measured here:
/// docs/benchmarks.md).
pub const DEFAULT_TREE_LATENCY_BYTES: usize = 192 << 10;
/// Default bytes per node-pipeline stage (docs/benchmarks.md).
pub const DEFAULT_STAGE_BYTES: usize = 4 << 20;

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
    /// How allreduce crosses the network: ring, double binary tree, or chosen per call.
    pub algorithm: Algorithm,
    /// The link's latency expressed in bytes (latency × bandwidth): `auto` takes the double
    /// binary tree for messages below `n × ((n − 1) − log2 n)` times this, where the tree's
    /// `2 log2 n` hops beat the ring's `2 (n − 1)` steps despite moving more bytes per rank.
    pub tree_latency_bytes: usize,
    /// Bytes per stage of the node pipeline: the leader reduces stage `k + 1` of its node's
    /// data while stage `k` is on the network, and local ranks read stage `k` back meanwhile.
    pub stage_bytes: usize,
    /// Allreduce's node stage in lanes (every local rank carries a part over the network with
    /// its peers of other nodes) rather than through one leader per node. Off by default: on
    /// the 2-core machine it was measured on, lanes were no faster (docs/benchmarks.md).
    pub lanes: bool,
    /// How ranks' endpoints talk: RDMA where both have it ("auto"), "tcp", or "rdma" only.
    pub transport: ff_net::TransportKind,
}

/// How allreduce crosses the network between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// The tree for small messages, the ring for large ones (see
    /// [`CommConfig::tree_latency_bytes`]).
    Auto,
    /// Reduce-scatter then all-gather around a ring: every rank moves `2 (n − 1) / n` of the
    /// data, in `2 (n − 1)` latency-bound steps.
    Ring,
    /// Two binary trees, each reducing half the data up to its root and broadcasting it back
    /// down; a rank inner in one tree is a leaf in the other, so the load is even.
    Tree,
}

impl Algorithm {
    /// The algorithm for a message of `bytes` over `n` members.
    pub fn choose(self, bytes: usize, n: usize, latency_bytes: usize) -> Algorithm {
        match self {
            Algorithm::Auto => {
                let steps_saved = (n as f64 - 1.0) - (n as f64).log2();
                if (bytes as f64) < n as f64 * steps_saved * latency_bytes as f64 {
                    Algorithm::Tree
                } else {
                    Algorithm::Ring
                }
            }
            fixed => fixed,
        }
    }
}

impl std::str::FromStr for Algorithm {
    type Err = CommError;
    fn from_str(text: &str) -> Result<Algorithm, CommError> {
        match text {
            "auto" => Ok(Algorithm::Auto),
            "ring" => Ok(Algorithm::Ring),
            "tree" => Ok(Algorithm::Tree),
            other => Err(CommError::Config(format!(
                "HFREDUCE_ALGO={other:?}: use auto, ring or tree"
            ))),
        }
    }
}

fn var(name: &str) -> Result<String, CommError> {
    std::env::var(name).map_err(|_| CommError::Config(format!("{name} is not set")))
}

fn number_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, CommError> {
    match std::env::var(name) {
        Ok(_) => number(name),
        Err(_) => Ok(default),
    }
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
    /// `HFREDUCE_CHUNK_BYTES`, `HFREDUCE_STAGE_BYTES`, `HFREDUCE_ALGO` (auto, ring, tree),
    /// `HFREDUCE_TREE_LATENCY_BYTES`, `HFREDUCE_LISTEN_HOST`, `HFREDUCE_LANES` and
    /// `HFREDUCE_TRANSPORT` (auto, tcp, rdma) are optional.
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
            chunk_bytes: number_or("HFREDUCE_CHUNK_BYTES", DEFAULT_CHUNK_BYTES)?,
            algorithm: match std::env::var("HFREDUCE_ALGO") {
                Ok(text) => text.trim().parse()?,
                Err(_) => Algorithm::Auto,
            },
            tree_latency_bytes: number_or(
                "HFREDUCE_TREE_LATENCY_BYTES",
                DEFAULT_TREE_LATENCY_BYTES,
            )?,
            stage_bytes: number_or("HFREDUCE_STAGE_BYTES", DEFAULT_STAGE_BYTES)?,
            lanes: match std::env::var("HFREDUCE_LANES").as_deref() {
                Ok("1" | "true" | "yes") => true,
                Ok("0" | "false" | "no") | Err(_) => false,
                Ok(other) => {
                    return Err(CommError::Config(format!(
                        "HFREDUCE_LANES={other:?}: use 1 or 0"
                    )));
                }
            },
            transport: match std::env::var("HFREDUCE_TRANSPORT").as_deref() {
                Ok("auto") | Err(_) => ff_net::TransportKind::Auto,
                Ok("tcp") => ff_net::TransportKind::Tcp,
                Ok("rdma") => ff_net::TransportKind::Rdma,
                Ok(other) => {
                    return Err(CommError::Config(format!(
                        "HFREDUCE_TRANSPORT={other:?}: use auto, tcp or rdma"
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
        if !(4096..=1 << 30).contains(&self.stage_bytes) {
            return fail(format!(
                "stage size {} must be 4 KiB to 1 GiB",
                self.stage_bytes
            ));
        }
        if self.tree_latency_bytes > 1 << 30 {
            return fail(format!(
                "tree latency bytes {} must be at most 1 GiB",
                self.tree_latency_bytes
            ));
        }
        Ok(())
    }

    /// What every rank of a job must agree on (the algorithms' message plans depend on it),
    /// as one word-free string; compared at rendezvous.
    pub fn plan_settings(&self) -> String {
        format!(
            "chunk={},stage={},algo={:?},tree_latency={},lanes={}",
            self.chunk_bytes, self.stage_bytes, self.algorithm, self.tree_latency_bytes, self.lanes
        )
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
            algorithm: Algorithm::Auto,
            tree_latency_bytes: DEFAULT_TREE_LATENCY_BYTES,
            stage_bytes: DEFAULT_STAGE_BYTES,
            lanes: false,
            transport: ff_net::TransportKind::Auto,
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

    #[test]
    fn auto_takes_the_tree_only_where_it_saves_latency() {
        let latency = 64 << 10;
        // Two members: the tree saves no step, so never.
        assert_eq!(Algorithm::Auto.choose(1, 2, latency), Algorithm::Ring);
        // Four: up to 4 × (3 − 2) × 64 KiB.
        assert_eq!(
            Algorithm::Auto.choose(200 << 10, 4, latency),
            Algorithm::Tree
        );
        assert_eq!(
            Algorithm::Auto.choose(300 << 10, 4, latency),
            Algorithm::Ring
        );
        // More members, larger messages.
        assert_eq!(Algorithm::Auto.choose(1 << 20, 8, latency), Algorithm::Tree);
        assert_eq!(Algorithm::Ring.choose(1, 8, latency), Algorithm::Ring);
        assert_eq!(Algorithm::Tree.choose(1 << 30, 2, latency), Algorithm::Tree);
        assert!("fast".parse::<Algorithm>().is_err());
    }
}
