//! One ff-kv node: the raft node, its gRPC server and its metrics endpoint, with explicit
//! start-up phases and a graceful stop.

use std::net::SocketAddr;

use ff_metrics::MetricsServer;
use ff_metrics::prometheus::Registry;
use ff_raft::{RaftError, RaftNode};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::KvConfig;
use crate::machine::KvMachine;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The gRPC address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The raft node could not start.
    #[error(transparent)]
    Raft(#[from] RaftError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] ff_metrics::MetricsError),
}

/// A running node.
pub struct KvServer {
    node: RaftNode<KvMachine>,
    addr: SocketAddr,
    metrics: Option<MetricsServer>,
    stop_grpc: Option<oneshot::Sender<()>>,
    grpc: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl std::fmt::Debug for KvServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl KvServer {
    /// Binds, opens storage, starts raft, then serves. `config` must be validated.
    pub async fn start(config: KvConfig) -> Result<Self, ServerError> {
        let listener = TcpListener::bind(&config.listen_addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.listen_addr.clone(),
                source,
            })?;
        Self::start_on(config, listener).await
    }

    /// Like [`KvServer::start`], on an already bound listener.
    pub async fn start_on(config: KvConfig, listener: TcpListener) -> Result<Self, ServerError> {
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen_addr.clone(),
            source,
        })?;
        let registry = Registry::new();
        let node = RaftNode::start(config.raft.clone(), KvMachine, &registry).await?;
        let metrics = if config.metrics_addr.is_empty() {
            None
        } else {
            Some(MetricsServer::start(&config.metrics_addr, registry).await?)
        };
        let (stop_grpc, stopped) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .add_service(node.peer_service())
            .add_service(node.raft_service());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let grpc = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        }));
        tracing::info!(node = config.raft.node_id, %addr, metrics = %config.metrics_addr, "ff-kv node serving");
        Ok(KvServer {
            node,
            addr,
            metrics,
            stop_grpc: Some(stop_grpc),
            grpc: Some(grpc),
        })
    }

    /// The raft node.
    pub fn node(&self) -> &RaftNode<KvMachine> {
        &self.node
    }

    /// The gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
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
