//! One ff-kv node: an ff-raft daemon whose state machine is the key-value store.

use ff_raft::{Daemon, DaemonError};
use tokio::net::TcpListener;

use crate::config::KvConfig;
use crate::machine::KvMachine;

/// A running node.
pub type KvServer = Daemon<KvMachine>;

/// Binds, opens storage, starts raft, then serves. `config` must be validated.
pub async fn start(config: KvConfig) -> Result<KvServer, DaemonError> {
    Daemon::start(
        &config.listen_addr,
        &config.metrics_addr,
        config.raft,
        KvMachine,
        |_, _, router| router,
    )
    .await
}

/// Like [`start`], on an already bound listener.
pub async fn start_on(config: KvConfig, listener: TcpListener) -> Result<KvServer, DaemonError> {
    Daemon::start_on(
        listener,
        &config.metrics_addr,
        config.raft,
        KvMachine,
        |_, _, router| router,
    )
    .await
}
