//! `hai`: the scheduler's one binary — its server and agent daemons and the job CLI. The
//! command line lives here, as a library, so that `fireflyer` can carry it as a subcommand.

mod bench;
mod client;
mod jobfile;
mod show;

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use ff_raft::DaemonArgs;
use hai_agent::{AgentConfig, NodeAgent};
use hai_server::{Server, ServerConfig};

use crate::client::Connect;

#[derive(Parser)]
#[command(
    name = "hai",
    version,
    about = "hai: a Raft-replicated scheduler for multi-node training jobs"
)]
struct Cli {
    #[command(flatten)]
    connect: Connect,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scheduler replica.
    Server(DaemonArgs),
    /// Run a node agent (one per node).
    Agent(DaemonArgs),
    /// Queue a job: `hai submit [OPTIONS] -- COMMAND ARGS...` or `hai submit job.toml`.
    Submit(Box<jobfile::SubmitArgs>),
    /// List jobs (squeue-like).
    Jobs {
        /// Ended jobs too.
        #[arg(long)]
        all: bool,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one job in full.
    Show {
        /// The job id.
        id: u64,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop jobs for good (SIGTERM, SIGKILL after their grace).
    Cancel {
        /// Job ids, or ranges of them such as 12-19 (an array's tasks).
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
    /// Checkpoint and requeue running jobs (SIGUSR1 and the flag file).
    Suspend {
        /// Job ids, or ranges of them such as 12-19.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
    /// Print a job's rank logs (from the log directory, shared by the nodes).
    Logs {
        /// The job id.
        id: u64,
        /// Only this rank.
        #[arg(long)]
        rank: Option<u32>,
        /// Of this attempt (default: the latest that ran).
        #[arg(long)]
        attempt: Option<u32>,
        /// Keep printing as the logs grow, until the job ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// List nodes with their resources and jobs.
    Nodes {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take no new jobs on a node (running ones finish).
    Drain {
        /// The node.
        node: String,
    },
    /// Let a drained node take jobs again.
    Resume {
        /// The node.
        node: String,
    },
    /// Who the token acts as.
    Whoami,
    /// Start a local cluster and measure submission rate, start latency and failover.
    Bench(bench::BenchArgs),
    /// Users and tokens.
    Admin {
        #[command(subcommand)]
        command: AdminCmd,
    },
    /// Wraps one rank (started by the agent; records the exit code).
    #[command(hide = true)]
    RankExec {
        #[arg(long)]
        exit_file: PathBuf,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Users.
    User {
        #[command(subcommand)]
        command: UserCmd,
    },
    /// Print a new random token (for the servers' shared admin token file).
    NewToken,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user; prints their token.
    Add {
        /// The user's name.
        name: String,
        /// May cancel, suspend and drain anything.
        #[arg(long)]
        admin: bool,
        /// Most nodes at a priority: PRIORITY=NODES (repeatable).
        #[arg(long = "quota", value_name = "PRIORITY=NODES")]
        quotas: Vec<String>,
    },
    /// List users.
    List,
}

/// Most jobs one `hai cancel` or `hai suspend` acts on (an array's largest size).
const MAX_JOBS_AT_ONCE: u64 = 10_000;

/// Job ids from `12`, `12-19` and lists of them, in order; ranges are bounded.
fn job_ids(texts: &[String]) -> anyhow::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for text in texts {
        let parse = |t: &str| {
            t.trim()
                .parse::<u64>()
                .map_err(|_| anyhow::anyhow!("{text:?} is not a job id or a range such as 12-19"))
        };
        match text.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (parse(first)?, parse(last)?);
                if first > last || last - first >= MAX_JOBS_AT_ONCE {
                    bail!("{text:?}: a range runs up, over at most {MAX_JOBS_AT_ONCE} jobs");
                }
                ids.extend(first..=last);
            }
            None => ids.push(parse(text)?),
        }
        if ids.len() as u64 > MAX_JOBS_AT_ONCE {
            bail!("more than {MAX_JOBS_AT_ONCE} jobs at once");
        }
    }
    Ok(ids)
}

/// Applies `act` to every job of `texts`, going on past failures (each printed); fails if any
/// did.
async fn for_each_job<F, Fut>(texts: &[String], act: F) -> anyhow::Result<()>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let ids = job_ids(texts)?;
    let mut failed = 0;
    for id in &ids {
        if let Err(error) = act(*id).await {
            eprintln!("hai: job {id}: {error:#}");
            failed += 1;
        }
    }
    match (failed, ids.len()) {
        (0, _) => Ok(()),
        (1, 1) => bail!("nothing done"),
        (failed, all) => bail!("{failed} of {all} jobs not done"),
    }
}

/// Runs the `hai` command line `args` (the program name first); returns the exit code.
pub fn main_with(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return error.exit_code();
        }
    };
    if let Cmd::RankExec { exit_file, command } = &cli.command {
        return hai_agent::rank::rank_exec(exit_file, command);
    }
    // Daemons and the benchmark want every core; a CLI call is one request, and a thread
    // pool would cost more to start than the call takes.
    let daemon = matches!(cli.command, Cmd::Server(_) | Cmd::Agent(_) | Cmd::Bench(_));
    let runtime = if daemon {
        tokio::runtime::Runtime::new()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hai: cannot start: {error}");
            return 1;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("hai: {error:#}");
            1
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let connect = cli.connect;
    match cli.command {
        Cmd::Server(args) => {
            let Some(config) = args.config::<ServerConfig>()? else {
                return Ok(());
            };
            let server = Server::start(config).await?;
            ff_config::systemd::notify_ready();
            let failure =
                ff_raft::until_stopped(server.daemon().node(), args.exit_with_parent).await?;
            server.shutdown().await;
            failure.map_or(Ok(()), |reason| bail!("raft node stopped: {reason}"))
        }
        Cmd::Agent(args) => {
            let Some(config) = args.config::<AgentConfig>()? else {
                return Ok(());
            };
            let exe = std::env::current_exe().context("finding this program")?;
            let agent = NodeAgent::new(config, exe)?;
            ff_config::systemd::notify_ready();
            let exit_with_parent = args.exit_with_parent;
            agent
                .run(async move {
                    if let Err(error) = ff_raft::stop_signal(exit_with_parent).await {
                        tracing::warn!(%error, "signal handling failed; stopping");
                    }
                })
                .await?;
            Ok(())
        }
        Cmd::Submit(args) => {
            let client = connect.client()?;
            let spec = args.spec()?;
            let tasks = u64::from(spec.array_size.max(1));
            let first = client.submit(spec).await?;
            for id in first..first + tasks {
                println!("{id}");
            }
            Ok(())
        }
        Cmd::Jobs { all, json } => show::jobs(&connect.client()?, all, json).await,
        Cmd::Show { id, json } => show::job(&connect.client()?, id, json).await,
        Cmd::Cancel { ids } => {
            let client = connect.client()?;
            for_each_job(&ids, |id| client.cancel(id)).await
        }
        Cmd::Suspend { ids } => {
            let client = connect.client()?;
            for_each_job(&ids, |id| client.suspend(id)).await
        }
        Cmd::Logs {
            id,
            rank,
            attempt,
            follow,
        } => show::logs(&connect.client()?, id, rank, attempt, follow).await,
        Cmd::Nodes { json } => show::nodes(&connect.client()?, json).await,
        Cmd::Drain { node } => connect.client()?.set_drain(&node, true).await,
        Cmd::Resume { node } => connect.client()?.set_drain(&node, false).await,
        Cmd::Bench(args) => bench::run(args).await,
        Cmd::Whoami => {
            let user = connect.client()?.who_am_i().await?;
            println!("{}{}", user.name, if user.admin { " (admin)" } else { "" });
            Ok(())
        }
        Cmd::Admin { command } => match command {
            AdminCmd::NewToken => {
                println!("{}", ff_rpc::tokens::new_token());
                Ok(())
            }
            AdminCmd::User {
                command:
                    UserCmd::Add {
                        name,
                        admin,
                        quotas,
                    },
            } => {
                let quotas = quotas
                    .iter()
                    .map(|q| jobfile::parse_quota(q))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let token = connect.client()?.add_user(&name, admin, quotas).await?;
                println!("{token}");
                Ok(())
            }
            AdminCmd::User {
                command: UserCmd::List,
            } => show::users(&connect.client()?).await,
        },
        Cmd::RankExec { .. } => unreachable!("handled before the runtime starts"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_take_lists_and_bounded_ranges() {
        let ids =
            |texts: &[&str]| job_ids(&texts.iter().map(|t| t.to_string()).collect::<Vec<_>>());
        assert_eq!(ids(&["3", "7-9", "12"]).unwrap(), [3, 7, 8, 9, 12]);
        assert!(ids(&["9-7"]).is_err());
        assert!(
            ids(&["x"])
                .unwrap_err()
                .to_string()
                .contains("not a job id")
        );
        assert!(ids(&["1-100000"]).is_err());
    }
}
