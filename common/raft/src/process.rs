//! What every fireflyer daemon binary does around its service: its command-line arguments
//! (`--config`, `--print-default-config`), logging to stderr filtered by `RUST_LOG`, and
//! waiting for the signal to stop — SIGTERM, Ctrl-C, or (for daemons whose
//! supervisor holds their stdin open) the end of standard input — or for the raft node to stop
//! on its own.

use std::path::PathBuf;

use ff_config::{ConfigError, DaemonConfig};

use crate::node::RaftNode;
use crate::state_machine::StateMachine;

/// How a daemon subcommand is run (`fs3 meta`, `hai server`, ...).
#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    /// Config file (TOML); see --print-default-config.
    #[arg(long, required_unless_present = "print_default_config")]
    pub config: Option<PathBuf>,
    /// Print the documented default config and exit.
    #[arg(long)]
    pub print_default_config: bool,
    /// Exit when standard input closes (used by supervisors that pipe it).
    #[arg(long, hide = true)]
    pub exit_with_parent: bool,
}

impl DaemonArgs {
    /// The daemon's validated config from its file (and the environment), logging set up; or,
    /// with `--print-default-config`, the documented template printed and nothing to run.
    pub fn config<C: DaemonConfig>(&self) -> Result<Option<C>, ConfigError> {
        if self.print_default_config {
            print!("{}", C::TEMPLATE);
            return Ok(None);
        }
        init_logging();
        ff_config::load(self.config.as_deref()).map(Some)
    }
}

/// Logs to stderr, `info` unless `RUST_LOG` says otherwise (colours only on a terminal).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves when the daemon should stop: SIGTERM, Ctrl-C, or (with `exit_with_parent`) the end
/// of standard input.
pub async fn stop_signal(exit_with_parent: bool) -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let parent_gone = async {
        if exit_with_parent {
            // The supervisor holds our stdin open; end of input means it is gone.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
        () = parent_gone => {}
    }
    Ok(())
}

/// Waits for [`stop_signal`], or for `node` to stop on its own; returns why it stopped then.
pub async fn until_stopped<S: StateMachine>(
    node: &RaftNode<S>,
    exit_with_parent: bool,
) -> std::io::Result<Option<String>> {
    let failure = tokio::select! {
        stop = stop_signal(exit_with_parent) => { stop?; None }
        reason = node.stopped() => Some(reason),
    };
    tracing::info!("stopping");
    Ok(failure)
}
