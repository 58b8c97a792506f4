//! ff-net: the bulk-data transport of fireflyer (fs3 client ↔ storage, storage ↔ storage).
//!
//! Not gRPC: gRPC moves 1 MiB messages about ten times slower than raw TCP here, because every
//! byte goes through protobuf encoding and HTTP/2 framing. ff-net sends length-prefixed frames
//! (see `frame`) over persistent TCP connections: a small structured header and a bulk payload
//! that is written from and read into buffers without passing through an encoder. Many calls
//! share one connection, matched by request id; a client keeps a few connections per peer.
//! Receive buffers come from a bounded [`BufferPool`].
//!
//! The [`Transport`] trait is what services program against. Its shape is RDMA's: a call hands
//! over a payload the server takes (RDMA: the server *pulls* it from the caller's registered
//! buffer with an RDMA READ), and the reply payload arrives in a buffer from the caller's pool
//! (RDMA: the server *pushes* it into a registered buffer with an RDMA WRITE). The TCP backend
//! carries both inline with the frames.

mod client;
mod frame;
mod hello;
mod pool;
#[cfg(feature = "rdma")]
pub mod rdma;
mod server;

use std::future::Future;

use bytes::Bytes;
use ff_config::{ByteSize, ConfigError, Duration, ensure};
use serde::{Deserialize, Serialize};

pub use client::{Connections, NetClient};
pub use pool::{BufferPool, PooledBuf};
pub use server::{Fault, Handler, Reply, Request, Server};

/// Limits and timeouts of ff-net, embedded in daemon configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetConfig {
    /// Largest payload a frame may carry (a whole chunk plus room).
    pub max_payload: ByteSize,
    /// Largest structured header a frame may carry.
    pub max_header: ByteSize,
    /// Connections a client opens to each peer (calls are spread over them).
    pub connections_per_peer: usize,
    /// Calls a server runs at once per connection; further frames wait unread.
    pub max_in_flight_per_connection: usize,
    /// Time allowed to connect.
    pub connect_timeout: Duration,
    /// Time allowed for one call, from sending to the full reply.
    pub request_timeout: Duration,
    /// Idle receive buffers kept for reuse, per process.
    pub buffer_pool: ByteSize,
    /// How connections move bytes: "tcp"; "rdma" (verbs only: refuses to start without an
    /// RDMA device or with a peer that has none); "auto" (RDMA when both ends can, else TCP).
    pub transport: TransportKind,
    /// The RDMA device to use (`mlx5_0`, `rxe0`); "" means the first with an active port.
    pub rdma_device: String,
    /// Most memory registered for RDMA transfers, per process (payloads are staged in it).
    pub rdma_memory: ByteSize,
    /// One-sided transfers a process runs at once (a server's READs of request payloads and
    /// WRITEs of replies): what many peers can make it move concurrently.
    pub rdma_transfers: usize,
}

/// How a connection moves its bytes (see [`NetConfig::transport`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// RDMA when both ends can, else TCP.
    #[default]
    Auto,
    /// TCP only.
    Tcp,
    /// RDMA only.
    Rdma,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            max_payload: ByteSize::mib(72),
            max_header: ByteSize::mib(1),
            connections_per_peer: 4,
            max_in_flight_per_connection: 64,
            connect_timeout: Duration::secs(2),
            request_timeout: Duration::secs(30),
            buffer_pool: ByteSize::mib(256),
            transport: TransportKind::Auto,
            rdma_device: String::new(),
            rdma_memory: ByteSize::gib(1),
            rdma_transfers: 16,
        }
    }
}

impl NetConfig {
    /// Checks the values; `prefix` is the dotted path of this section.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let field = |name: &str| format!("{prefix}.{name}");
        ensure(
            self.max_payload.bytes() >= 4096 && self.max_payload.bytes() <= u64::from(u32::MAX),
            &field("max_payload"),
            "must be from 4KiB to 4GiB",
        )?;
        ensure(
            self.max_header.bytes() >= 1024 && self.max_header.bytes() <= u64::from(u32::MAX),
            &field("max_header"),
            "must be from 1KiB to 4GiB",
        )?;
        ensure(
            self.connections_per_peer >= 1,
            &field("connections_per_peer"),
            "must be at least 1",
        )?;
        ensure(
            self.max_in_flight_per_connection >= 1,
            &field("max_in_flight_per_connection"),
            "must be at least 1",
        )?;
        ensure(
            !self.connect_timeout.get().is_zero(),
            &field("connect_timeout"),
            "must not be 0",
        )?;
        ensure(
            !self.request_timeout.get().is_zero(),
            &field("request_timeout"),
            "must not be 0",
        )?;
        ensure(
            self.rdma_memory.bytes() >= 4 * self.max_payload.bytes().next_power_of_two(),
            &field("rdma_memory"),
            "must hold at least four of the largest payloads (max_payload rounded up to a power of two)",
        )?;
        ensure(
            self.rdma_transfers >= 1,
            &field("rdma_transfers"),
            "must be at least 1",
        )?;
        ensure(
            self.transport == TransportKind::Tcp || self.max_in_flight_per_connection <= 256,
            &field("max_in_flight_per_connection"),
            "must be at most 256 with RDMA (two receives per call, 512 per queue pair)",
        )
    }

    fn limits(&self) -> frame::Limits {
        frame::Limits {
            max_header: self.max_header.as_usize(),
            max_payload: self.max_payload.as_usize(),
        }
    }
}

/// This process's RDMA state when it has RDMA (uninhabited in builds without the feature).
#[cfg(feature = "rdma")]
type RdmaHere = std::sync::Arc<rdma::Context>;
#[cfg(not(feature = "rdma"))]
type RdmaHere = std::convert::Infallible;

/// RDMA as `config.transport` asks for it: None for TCP, and for "auto" without a usable device;
/// an error saying why for "rdma" without one.
fn rdma_here(config: &NetConfig) -> Result<Option<RdmaHere>, NetError> {
    let unavailable = |why: String| {
        NetError::Unavailable(format!(
            "transport = \"rdma\", but {why}; set transport = \"tcp\" (or \"auto\") to run on TCP"
        ))
    };
    match config.transport {
        TransportKind::Tcp => Ok(None),
        #[cfg(feature = "rdma")]
        TransportKind::Auto => match rdma::Context::shared(config) {
            Ok(context) => Ok(Some(context)),
            Err(error) => {
                tracing::info!(%error, "RDMA unavailable: using TCP");
                Ok(None)
            }
        },
        #[cfg(feature = "rdma")]
        TransportKind::Rdma => rdma::Context::shared(config)
            .map(Some)
            .map_err(|error| unavailable(error.to_string())),
        #[cfg(not(feature = "rdma"))]
        TransportKind::Auto => Ok(None),
        #[cfg(not(feature = "rdma"))]
        TransportKind::Rdma => Err(unavailable(
            "this build has no RDMA support (built without the `rdma` feature)".to_string(),
        )),
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The peer could not be reached.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The peer.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The connection broke while the call was in flight; it may or may not have run.
    #[error("connection to {0} lost")]
    Disconnected(String),
    /// No full reply within the request timeout; the call may or may not have run.
    #[error("no reply from {addr} within {timeout:?}")]
    Timeout {
        /// The peer.
        addr: String,
        /// The timeout.
        timeout: std::time::Duration,
    },
    /// The service answered with an error.
    #[error("{message} (code {code})")]
    Remote {
        /// The service's error code (never 0).
        code: u16,
        /// The service's message.
        message: String,
    },
    /// The peer sent something that is not ff-net.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A local I/O failure.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The configured transport cannot run here; the message says why and what to set.
    #[error("{0}")]
    Unavailable(String),
}

impl NetError {
    /// Whether the call certainly did not run (safe to send elsewhere).
    pub fn never_ran(&self) -> bool {
        matches!(self, NetError::Connect { .. })
    }
}

/// One call.
#[derive(Debug, Clone, Default)]
pub struct Call {
    /// What to do (the service's method number).
    pub method: u16,
    /// Structured arguments (usually protobuf).
    pub header: Bytes,
    /// Bulk bytes for the server to take.
    pub payload: Bytes,
}

/// A successful reply.
#[derive(Debug)]
pub struct Response {
    /// Structured results.
    pub header: PooledBuf,
    /// Bulk bytes for the caller.
    pub payload: PooledBuf,
}

/// A bulk-data transport (see the crate documentation for how RDMA maps onto it).
pub trait Transport: Send + Sync + 'static {
    /// Makes `call` to the service at `addr` and waits for its reply.
    fn call(
        &self,
        addr: &str,
        call: Call,
    ) -> impl Future<Output = Result<Response, NetError>> + Send;
}
