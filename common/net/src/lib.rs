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
mod pool;
#[cfg(feature = "rdma")]
pub mod rdma;
mod server;

use std::future::Future;

use bytes::Bytes;
use ff_config::{ByteSize, ConfigError, Duration, ensure};
use serde::{Deserialize, Serialize};

pub use client::NetClient;
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
        )
    }

    fn limits(&self) -> frame::Limits {
        frame::Limits {
            max_header: self.max_header.as_usize(),
            max_payload: self.max_payload.as_usize(),
        }
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
