//! Configuration of one raft group member ([`RaftConfig`]); embedded in each daemon's config.

use std::path::PathBuf;

use ff_config::{ByteSize, ConfigError, Duration, ensure};
use serde::{Deserialize, Serialize};

/// Configuration of this node's membership in one raft group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// This node's id: unique within the group, never reused after removal, never 0.
    pub node_id: u64,
    /// Name of the group. Messages stamped with another name are refused, so two clusters on
    /// one network cannot corrupt each other.
    pub cluster: String,
    /// Directory holding `raft.redb` (log, hard state, state machine) and `snapshots/`.
    pub data_dir: PathBuf,
    /// Address at which other members reach this node's gRPC server (`host:port`).
    pub advertise_addr: String,
    /// Founding members. Read only when `data_dir` is empty: a node listed here founds the group
    /// with exactly these voters; a node not listed starts empty and waits to be added with
    /// `AddMember`. Every founding member must list the same set.
    pub initial_members: Vec<MemberConfig>,
    /// Length of one raft logical clock tick.
    pub tick_interval: Duration,
    /// Ticks without hearing from a leader before a follower campaigns (randomized up to twice
    /// this). Must exceed `heartbeat_ticks`.
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Largest append message sent to a follower.
    pub max_size_per_msg: ByteSize,
    /// Most append messages in flight to one follower.
    pub max_inflight_msgs: usize,
    /// Most requests (proposals and reads) accepted by the raft loop and not yet answered;
    /// further requests wait in the request queue.
    pub max_pending_proposals: usize,
    /// Capacity of the queue of local requests (proposals, reads, membership changes) waiting
    /// for the raft loop; callers wait when it is full.
    pub request_queue_capacity: usize,
    /// How long a proposal may take, including leader elections and forwarding, before the
    /// caller is told it timed out (its outcome is then unknown; retries with the same request
    /// id are applied at most once).
    pub propose_timeout: Duration,
    /// How long a linearizable read may wait for a read index and the apply that follows.
    pub read_timeout: Duration,
    /// Compact the log once it holds this many applied entries.
    pub snapshot_threshold: u64,
    /// Applied entries kept after a compaction, so that briefly lagging followers catch up from
    /// the log rather than by snapshot.
    pub log_retain_entries: u64,
    /// Size of the chunks snapshots are streamed in.
    pub snapshot_chunk_size: ByteSize,
    /// A retried request is recognised as a duplicate if it arrives within this many log
    /// entries of the first copy (and its client has not marked it settled). Read only when
    /// the group is founded; members added later take the group's value from their snapshot.
    pub dedup_window: u64,
    /// Memory for recent log entries kept to serve followers without reading the database.
    pub entry_cache_size: ByteSize,
    /// Verify every page checksum of the database when opening it, so that a damaged file is
    /// refused instead of trusted.
    pub verify_on_open: bool,
    /// How long a new learner may take to catch up with the leader before it is promoted.
    pub learner_catchup_timeout: Duration,
    /// Peer transport.
    pub transport: TransportConfig,
}

/// One founding member of the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// The member's node id.
    pub id: u64,
    /// The member's `advertise_addr`.
    pub addr: String,
}

/// How raft messages travel between members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    /// Messages queued per peer; when full, further messages are dropped and the peer is
    /// reported unreachable (raft retransmits).
    pub queue_capacity: usize,
    /// Most messages per batch RPC.
    pub max_batch_messages: usize,
    /// Most bytes per batch RPC.
    pub max_batch_size: ByteSize,
    /// Time allowed to connect to a peer.
    pub connect_timeout: Duration,
    /// Time allowed for one batch RPC.
    pub request_timeout: Duration,
    /// Time allowed to stream one snapshot.
    pub snapshot_timeout: Duration,
    /// Longest pause before retrying an unreachable peer.
    pub max_backoff: Duration,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            node_id: 1,
            cluster: "fireflyer".to_string(),
            data_dir: PathBuf::from("data/raft"),
            advertise_addr: "127.0.0.1:7100".to_string(),
            initial_members: vec![MemberConfig {
                id: 1,
                addr: "127.0.0.1:7100".to_string(),
            }],
            tick_interval: Duration::millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            max_size_per_msg: ByteSize::mib(1),
            max_inflight_msgs: 256,
            max_pending_proposals: 8192,
            request_queue_capacity: 4096,
            propose_timeout: Duration::secs(10),
            read_timeout: Duration::secs(5),
            snapshot_threshold: 10_000,
            log_retain_entries: 1_000,
            snapshot_chunk_size: ByteSize::mib(1),
            dedup_window: 1_000_000,
            entry_cache_size: ByteSize::mib(64),
            verify_on_open: true,
            learner_catchup_timeout: Duration::secs(60),
            transport: TransportConfig::default(),
        }
    }
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            queue_capacity: 4096,
            max_batch_messages: 256,
            max_batch_size: ByteSize::mib(8),
            connect_timeout: Duration::secs(1),
            request_timeout: Duration::secs(3),
            snapshot_timeout: Duration::secs(300),
            max_backoff: Duration::secs(1),
        }
    }
}

impl RaftConfig {
    /// Checks the values; `prefix` is the dotted path of this section for error messages.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let field = |name: &str| format!("{prefix}.{name}");
        ensure(self.node_id != 0, &field("node_id"), "must not be 0")?;
        ensure(
            !self.cluster.is_empty(),
            &field("cluster"),
            "must not be empty",
        )?;
        ensure(
            !self.data_dir.as_os_str().is_empty(),
            &field("data_dir"),
            "must not be empty",
        )?;
        ff_config::ensure_host_port(&self.advertise_addr, &field("advertise_addr"))?;
        let mut ids = std::collections::HashSet::new();
        for member in &self.initial_members {
            ensure(
                member.id != 0,
                &field("initial_members"),
                "member id 0 is invalid",
            )?;
            ensure(
                ids.insert(member.id),
                &field("initial_members"),
                format!("member id {} is listed twice", member.id),
            )?;
            ff_config::ensure_host_port(&member.addr, &field("initial_members"))?;
            if member.id == self.node_id {
                ensure(
                    member.addr == self.advertise_addr,
                    &field("initial_members"),
                    format!(
                        "this node ({}) is listed at {} but advertises {}",
                        member.id, member.addr, self.advertise_addr
                    ),
                )?;
            }
        }
        ensure(
            self.tick_interval.get() >= std::time::Duration::from_millis(1),
            &field("tick_interval"),
            "must be at least 1ms",
        )?;
        ensure(
            self.heartbeat_ticks >= 1,
            &field("heartbeat_ticks"),
            "must be at least 1",
        )?;
        ensure(
            self.election_ticks > self.heartbeat_ticks,
            &field("election_ticks"),
            format!("must exceed heartbeat_ticks ({})", self.heartbeat_ticks),
        )?;
        ensure(
            self.max_size_per_msg.bytes() > 0,
            &field("max_size_per_msg"),
            "must not be 0",
        )?;
        ensure(
            self.max_inflight_msgs > 0,
            &field("max_inflight_msgs"),
            "must not be 0",
        )?;
        ensure(
            self.max_pending_proposals > 0,
            &field("max_pending_proposals"),
            "must not be 0",
        )?;
        ensure(
            self.request_queue_capacity > 0,
            &field("request_queue_capacity"),
            "must not be 0",
        )?;
        ensure(
            !self.propose_timeout.get().is_zero(),
            &field("propose_timeout"),
            "must not be 0",
        )?;
        ensure(
            !self.read_timeout.get().is_zero(),
            &field("read_timeout"),
            "must not be 0",
        )?;
        ensure(
            self.snapshot_threshold > self.log_retain_entries,
            &field("snapshot_threshold"),
            format!(
                "must exceed log_retain_entries ({})",
                self.log_retain_entries
            ),
        )?;
        ensure(
            self.snapshot_chunk_size.bytes() >= 4096,
            &field("snapshot_chunk_size"),
            "must be at least 4KiB",
        )?;
        ensure(
            self.dedup_window > 0,
            &field("dedup_window"),
            "must not be 0",
        )?;
        let t = &self.transport;
        ensure(
            t.queue_capacity > 0,
            &field("transport.queue_capacity"),
            "must not be 0",
        )?;
        ensure(
            t.max_batch_messages > 0,
            &field("transport.max_batch_messages"),
            "must not be 0",
        )?;
        ensure(
            t.max_batch_size >= self.max_size_per_msg,
            &field("transport.max_batch_size"),
            format!(
                "must be at least max_size_per_msg ({})",
                self.max_size_per_msg
            ),
        )?;
        ensure(
            !t.connect_timeout.get().is_zero(),
            &field("transport.connect_timeout"),
            "must not be 0",
        )?;
        ensure(
            !t.request_timeout.get().is_zero(),
            &field("transport.request_timeout"),
            "must not be 0",
        )?;
        ensure(
            !t.snapshot_timeout.get().is_zero(),
            &field("transport.snapshot_timeout"),
            "must not be 0",
        )?;
        Ok(())
    }

    /// The election timeout as a wall-clock duration.
    pub fn election_timeout(&self) -> std::time::Duration {
        self.tick_interval.get() * self.election_ticks as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        RaftConfig::default().validate("raft").unwrap();
    }

    #[test]
    fn contradictions_are_named() {
        type Mutation = Box<dyn Fn(&mut RaftConfig)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|c| c.node_id = 0), "raft.node_id"),
            (Box::new(|c| c.election_ticks = 2), "raft.election_ticks"),
            (
                Box::new(|c| c.advertise_addr = "nowhere".into()),
                "raft.advertise_addr",
            ),
            (
                Box::new(|c| c.initial_members.push(c.initial_members[0].clone())),
                "listed twice",
            ),
            (
                Box::new(|c| c.initial_members[0].addr = "127.0.0.1:9".into()),
                "advertises",
            ),
            (
                Box::new(|c| c.snapshot_threshold = 10),
                "raft.snapshot_threshold",
            ),
            (
                Box::new(|c| c.transport.queue_capacity = 0),
                "transport.queue_capacity",
            ),
        ];
        for (mutate, expected) in cases {
            let mut config = RaftConfig::default();
            mutate(&mut config);
            let message = config.validate("raft").unwrap_err().to_string();
            assert!(
                message.contains(expected),
                "{message} should mention {expected}"
            );
        }
    }
}
