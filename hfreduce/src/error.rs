//! What can go wrong in a collective, said so that the rank, the peer and the call are named.

use std::time::Duration;

/// A failed communicator setup or collective.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    /// The rank's configuration (environment or explicit) is invalid.
    #[error("hfreduce configuration: {0}")]
    Config(String),
    /// Rendezvous did not complete in time.
    #[error(
        "rendezvous at {master} did not complete within {timeout:?}: ranks {missing:?} never arrived"
    )]
    Rendezvous {
        /// The store's address.
        master: String,
        /// The ranks not heard from.
        missing: Vec<usize>,
        /// How long this rank waited.
        timeout: Duration,
    },
    /// The rendezvous store could not be reached or served.
    #[error("rendezvous store at {master}: {message}")]
    Store {
        /// The store's address.
        master: String,
        /// What went wrong.
        message: String,
    },
    /// A peer could not be reached or failed.
    #[error("rank {peer}: {message}")]
    Peer {
        /// The peer's rank.
        peer: usize,
        /// What went wrong.
        message: String,
    },
    /// A peer sent nothing within the timeout.
    #[error("no data from rank {peer} within {timeout:?} during {during} (is it dead or stalled?)")]
    Timeout {
        /// The silent peer.
        peer: usize,
        /// The timeout.
        timeout: Duration,
        /// The collective waited in.
        during: String,
    },
    /// Ranks called different collectives, types, operations or sizes.
    #[error("mismatched collectives: {0}")]
    Mismatch(String),
    /// Another rank failed and told this one.
    #[error("aborted by rank {peer}: {message}")]
    Aborted {
        /// Who aborted.
        peer: usize,
        /// Why.
        message: String,
    },
    /// The node's shared-memory file failed.
    #[error("shared memory: {0}")]
    SharedMemory(String),
    /// The arguments of a call are unusable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The communicator has shut down.
    #[error("the communicator is closed")]
    Closed,
}
