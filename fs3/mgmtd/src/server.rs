//! One mgmtd replica: an ff-raft daemon with the mgmtd API and, on the leader, the failure
//! detector.

use std::time::Duration;

use ff_raft::{Daemon, DaemonError};
use fs3_proto::mgmtd::mgmtd_server::MgmtdServer;
use tokio::task::JoinHandle;

use crate::config::MgmtdConfig;
use crate::machine::MgmtdMachine;
use crate::metrics::MgmtdMetrics;
use crate::service::MgmtdApi;

/// A running mgmtd replica.
pub struct Mgmtd {
    daemon: Daemon<MgmtdMachine>,
    api: MgmtdApi,
    detector: JoinHandle<()>,
}

impl std::fmt::Debug for Mgmtd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mgmtd")
            .field("addr", &self.daemon.addr())
            .finish()
    }
}

impl Mgmtd {
    /// Binds, starts raft, serves the API, and runs the failure detector. `config` must be
    /// validated.
    pub async fn start(config: MgmtdConfig) -> Result<Mgmtd, DaemonError> {
        let lease = config.lease.get();
        let mut api_slot = None;
        let mut metrics_error = None;
        let daemon = Daemon::start(
            &config.listen_addr,
            &config.metrics_addr,
            config.raft.clone(),
            MgmtdMachine,
            |node, registry, router| {
                let metrics = match MgmtdMetrics::register(registry) {
                    Ok(metrics) => metrics,
                    Err(error) => {
                        metrics_error = Some(error);
                        return router;
                    }
                };
                let api = MgmtdApi::new(node.clone(), lease, metrics);
                api_slot = Some(api.clone());
                router.add_service(MgmtdServer::new(api))
            },
        )
        .await?;
        let api = api_slot.ok_or_else(|| {
            DaemonError::Raft(ff_raft::RaftError::Stopped(format!(
                "mgmtd API was not created: {}",
                metrics_error.map_or_else(|| "unknown reason".to_string(), |e| e.to_string())
            )))
        })?;
        let detector = tokio::spawn(run_detector(api.clone(), config.detector_interval.get()));
        Ok(Mgmtd {
            daemon,
            api,
            detector,
        })
    }

    /// The raft daemon.
    pub fn daemon(&self) -> &Daemon<MgmtdMachine> {
        &self.daemon
    }

    /// The API (for in-process inspection).
    pub fn api(&self) -> &MgmtdApi {
        &self.api
    }

    /// Stops the detector, then the daemon.
    pub async fn shutdown(self) {
        self.detector.abort();
        self.daemon.shutdown().await;
    }
}

async fn run_detector(api: MgmtdApi, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(error) = api.detect().await {
            tracing::debug!(%error, "failure detector round failed");
        }
    }
}
