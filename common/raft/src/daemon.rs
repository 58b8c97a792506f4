//! The common shape of a daemon built on a raft group: bind the gRPC address, open storage and
//! start raft, serve the raft services next to the daemon's own plus `/metrics`, and stop in
//! order (serving first, then raft). ff-kv, fs3's mgmtd and hai's server are this plus their
//! state machine and API.

use std::net::SocketAddr;

use ff_metrics::MetricsServer;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::Router;

use crate::config::RaftConfig;
use crate::error::RaftError;
use crate::node::RaftNode;
use crate::state_machine::StateMachine;

/// Why a daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The gRPC address could not be bound.
    #[error("cannot listen on {addr}: {cause}")]
    Bind {
        /// The address.
        addr: String,
        /// What the operating system said.
        cause: std::io::Error,
    },
    /// The raft node could not start.
    #[error(transparent)]
    Raft(#[from] RaftError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] ff_metrics::MetricsError),
}

/// A running raft-backed daemon.
pub struct Daemon<S> {
    node: RaftNode<S>,
    addr: SocketAddr,
    registry: Registry,
    metrics: Option<MetricsServer>,
    stop_grpc: Option<oneshot::Sender<()>>,
    grpc: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl<S> std::fmt::Debug for Daemon<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").field("addr", &self.addr).finish()
    }
}

impl<S: StateMachine> Daemon<S> {
    /// Binds `listen_addr` and starts; see [`Daemon::start_on`].
    pub async fn start(
        listen_addr: &str,
        metrics_addr: &str,
        raft: RaftConfig,
        machine: S,
        services: impl FnOnce(&RaftNode<S>, &Registry, Router) -> Router,
    ) -> Result<Self, DaemonError> {
        let listener =
            TcpListener::bind(listen_addr)
                .await
                .map_err(|source| DaemonError::Bind {
                    addr: listen_addr.to_string(),
                    cause: source,
                })?;
        Self::start_on(listener, metrics_addr, raft, machine, services).await
    }

    /// Starts raft with `machine`, then serves on `listener` the raft services plus whatever
    /// `services` adds, and `/metrics` on `metrics_addr` (empty: none).
    pub async fn start_on(
        listener: TcpListener,
        metrics_addr: &str,
        raft: RaftConfig,
        machine: S,
        services: impl FnOnce(&RaftNode<S>, &Registry, Router) -> Router,
    ) -> Result<Self, DaemonError> {
        let addr = listener.local_addr().map_err(|source| DaemonError::Bind {
            addr: raft.advertise_addr.clone(),
            cause: source,
        })?;
        let registry = Registry::new();
        let node_id = raft.node_id;
        let node = RaftNode::start(raft, machine, &registry).await?;
        let metrics = if metrics_addr.is_empty() {
            None
        } else {
            Some(MetricsServer::start(metrics_addr, registry.clone()).await?)
        };
        let router = tonic::transport::Server::builder()
            .add_service(node.peer_service())
            .add_service(node.raft_service());
        let router = services(&node, &registry, router);
        let (stop_grpc, stopped) = oneshot::channel::<()>();
        // Small request/response RPCs must not wait for Nagle's algorithm to meet the peer's
        // delayed ACK (about 40 ms a round trip otherwise).
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |accepted| {
                accepted.inspect(|stream| {
                    let _ = stream.set_nodelay(true);
                })
            },
        );
        let grpc = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        }));
        tracing::info!(node = node_id, %addr, metrics = %metrics_addr, "serving");
        Ok(Daemon {
            node,
            addr,
            registry,
            metrics,
            stop_grpc: Some(stop_grpc),
            grpc: Some(grpc),
        })
    }

    /// The raft node.
    pub fn node(&self) -> &RaftNode<S> {
        &self.node
    }

    /// The gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The daemon's metrics registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The metrics endpoint's address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// Stops serving, then stops raft.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop_grpc.take() {
            let _ = stop.send(());
        }
        if let Some(grpc) = self.grpc.take() {
            // In-flight RPCs finish or time out; a hung client cannot hold the stop forever.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), grpc).await;
        }
        self.node.shutdown().await;
        if let Some(metrics) = self.metrics.take() {
            metrics.shutdown().await;
        }
    }
}
