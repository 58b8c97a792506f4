//! `fs3 admin ...`: the operator's view of mgmtd, as tables or JSON.

use std::time::Duration;

use anyhow::{Context, bail};
use ff_rpc::{ClientOptions, LeaderClient};
use fs3_proto::meta::{AddUserOp, Credentials, UserQuery, command, query};
use fs3_proto::mgmtd::mgmtd_client::MgmtdClient;
use fs3_proto::mgmtd::{
    BootstrapRequest, ChainSpec, CreateChainTableRequest, CreateChainsRequest, GetRoutingRequest,
    ListNodesReply, ListNodesRequest, LocalState, NodeKind, PublicState, RoutingInfo,
    SetTargetOfflineRequest,
};
use serde_json::json;

use crate::files::Connect;

/// A failed call, said in a line that names the replicas tried.
fn failed(client: &LeaderClient, status: &tonic::Status) -> anyhow::Error {
    let endpoints = client.endpoints().join(",");
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            anyhow::anyhow!(
                "cannot reach an mgmtd leader at {endpoints}: {} (is mgmtd running? the \
                 replicas are given with --mgmtd or FS3_MGMTD)",
                status.message()
            )
        }
        _ => anyhow::anyhow!("mgmtd refused: {}", status.message()),
    }
}

/// A client of the mgmtd replicas at `endpoints`.
pub fn client(endpoints: Vec<String>) -> anyhow::Result<LeaderClient> {
    // Long enough to ride out a leader election, short enough for a person waiting.
    let options = ClientOptions {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(5),
        total_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    LeaderClient::new(endpoints, options).context("invalid mgmtd address")
}

pub async fn routing(client: &LeaderClient) -> anyhow::Result<RoutingInfo> {
    client
        .call(|channel| async move {
            MgmtdClient::new(channel)
                .get_routing(GetRoutingRequest { known_version: 0 })
                .await
        })
        .await
        .map_err(|s| failed(client, &s))
}

async fn nodes(client: &LeaderClient) -> anyhow::Result<ListNodesReply> {
    client
        .call(|channel| async move {
            MgmtdClient::new(channel)
                .list_nodes(ListNodesRequest {})
                .await
        })
        .await
        .map_err(|s| failed(client, &s))
}

fn public(state: i32) -> &'static str {
    match PublicState::try_from(state) {
        Ok(PublicState::Serving) => "serving",
        Ok(PublicState::Syncing) => "syncing",
        Ok(PublicState::Waiting) => "waiting",
        Ok(PublicState::Lastsrv) => "lastsrv",
        Ok(PublicState::Offline) => "offline",
        _ => "unknown",
    }
}

fn local(state: i32) -> &'static str {
    match LocalState::try_from(state) {
        Ok(LocalState::UpToDate) => "up-to-date",
        Ok(LocalState::Online) => "online",
        Ok(LocalState::LocalOffline) => "offline",
        _ => "-",
    }
}

fn kind(kind: i32) -> &'static str {
    match NodeKind::try_from(kind) {
        Ok(NodeKind::Storage) => "storage",
        Ok(NodeKind::Meta) => "meta",
        Ok(NodeKind::Client) => "client",
        _ => "unknown",
    }
}

/// The admin subcommands.
#[derive(clap::Subcommand)]
pub enum AdminCmd {
    /// Routing version and a summary of nodes, targets and chains.
    Status,
    /// Nodes and their liveness.
    Nodes,
    /// Targets with public and local state.
    Targets,
    /// Chains with their targets in order (head first).
    Chains,
    /// Build chains of REPLICATION targets on distinct nodes from every unchained target, as
    /// chain table TABLE.
    Bootstrap {
        #[arg(long, default_value_t = 1)]
        table: u64,
        #[arg(long, default_value_t = 3)]
        replication: u32,
    },
    /// Create a chain from registered targets, head first (replicas on distinct nodes).
    CreateChain {
        /// The new chain's id.
        #[arg(long)]
        id: u64,
        /// Target ids, head first (comma separated).
        #[arg(long, value_delimiter = ',', required = true)]
        targets: Vec<u64>,
    },
    /// Create (or replace) a chain table from existing chains.
    CreateTable {
        /// The table's id.
        #[arg(long)]
        id: u64,
        /// Chain ids in table order (comma separated).
        #[arg(long, value_delimiter = ',', required = true)]
        chains: Vec<u64>,
    },
    /// Take a target out of service by hand.
    Offline { target: u64 },
    /// Let a target taken out by hand return.
    Online { target: u64 },
    /// Print a new random token (for a meta group's shared admin_token_file).
    NewToken,
    /// Users of the file system (needs the administrator's token).
    User {
        #[command(subcommand)]
        command: UserCmd,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum UserCmd {
    /// Add a user and print its new token (shown once; meta keeps only its hash).
    Add {
        name: String,
        /// The uid its requests act as.
        #[arg(long, default_value_t = 0)]
        uid: u32,
        /// The gid its requests act as.
        #[arg(long, default_value_t = 0)]
        gid: u32,
        /// Let the token act as any uid and gid it claims (for FUSE mounts, which pass each
        /// caller's identity).
        #[arg(long)]
        trusted: bool,
    },
    /// List users.
    List,
}

async fn users(command: UserCmd, connect: &Connect, json_output: bool) -> anyhow::Result<()> {
    let fs = connect.connect().await?;
    let admin = Credentials::default();
    match command {
        UserCmd::Add {
            name,
            uid,
            gid,
            trusted,
        } => {
            let token = fs3_meta::new_token();
            fs.mutate(
                &admin,
                command::Op::AddUser(AddUserOp {
                    name: name.clone(),
                    uid,
                    gid,
                    trusted,
                    token_sha256: fs3_meta::token_hash(&token),
                }),
            )
            .await
            .map_err(|e| anyhow::anyhow!("adding user {name}: {e}"))?;
            if json_output {
                println!(
                    "{}",
                    json!({"name": name, "uid": uid, "gid": gid, "trusted": trusted, "token": token})
                );
            } else {
                println!("{token}");
                eprintln!(
                    "user {name} (uid {uid}, gid {gid}{}) added; keep the token above, it is not shown again",
                    if trusted { ", trusted" } else { "" }
                );
            }
        }
        UserCmd::List => {
            let result = fs
                .query(&admin, query::Op::User(UserQuery::default()))
                .await
                .map_err(|e| anyhow::anyhow!("listing users: {e}"))?;
            if json_output {
                let list: Vec<_> = result
                    .users
                    .iter()
                    .map(|u| json!({"name": u.name, "uid": u.uid, "gid": u.gid, "trusted": u.trusted}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<20} {:>6} {:>6} trusted", "name", "uid", "gid");
                for u in &result.users {
                    println!("{:<20} {:>6} {:>6} {}", u.name, u.uid, u.gid, u.trusted);
                }
            }
        }
    }
    Ok(())
}

pub async fn run(
    command: AdminCmd,
    client: &LeaderClient,
    connect: &Connect,
    json_output: bool,
) -> anyhow::Result<()> {
    match command {
        AdminCmd::User { command } => return users(command, connect, json_output).await,
        AdminCmd::NewToken => {
            println!("{}", fs3_meta::new_token());
            return Ok(());
        }
        AdminCmd::Status => {
            let routing = routing(client).await?;
            let live = nodes(client).await?;
            let alive = live.nodes.iter().filter(|n| n.alive).count();
            let count = |state: PublicState| {
                routing
                    .chains
                    .iter()
                    .flat_map(|c| c.targets.iter())
                    .filter(|t| t.state == state as i32)
                    .count()
            };
            if json_output {
                println!(
                    "{}",
                    json!({
                        "routing_version": routing.version,
                        "nodes": routing.nodes.len(), "nodes_alive": alive,
                        "targets": routing.targets.len(), "chains": routing.chains.len(),
                        "chain_tables": routing.tables.len(),
                        "serving": count(PublicState::Serving), "syncing": count(PublicState::Syncing),
                        "waiting": count(PublicState::Waiting), "lastsrv": count(PublicState::Lastsrv),
                        "offline": count(PublicState::Offline),
                    })
                );
            } else {
                println!("routing version {}", routing.version);
                println!("nodes      {} ({alive} alive)", routing.nodes.len());
                println!("targets    {}", routing.targets.len());
                println!(
                    "chains     {} in {} table(s); replicas: {} serving, {} syncing, {} waiting, {} lastsrv, {} offline",
                    routing.chains.len(),
                    routing.tables.len(),
                    count(PublicState::Serving),
                    count(PublicState::Syncing),
                    count(PublicState::Waiting),
                    count(PublicState::Lastsrv),
                    count(PublicState::Offline)
                );
            }
        }
        AdminCmd::Nodes => {
            let live = nodes(client).await?;
            if json_output {
                let list: Vec<_> = live
                    .nodes
                    .iter()
                    .filter_map(|s| {
                        let n = s.node.as_ref()?;
                        Some(json!({"id": n.id, "kind": kind(n.kind), "addr": n.addr, "hostname": n.hostname,
                            "alive": s.alive, "last_heartbeat_ms_ago": s.last_heartbeat_ms_ago}))
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                println!(
                    "{:>6} {:<8} {:<22} {:<16} {:<6} {:>12}",
                    "ID", "KIND", "ADDRESS", "HOST", "ALIVE", "LAST SEEN"
                );
                for s in &live.nodes {
                    let Some(n) = &s.node else { continue };
                    let seen = s
                        .last_heartbeat_ms_ago
                        .map_or("never".to_string(), |ms| format!("{ms} ms ago"));
                    println!(
                        "{:>6} {:<8} {:<22} {:<16} {:<6} {:>12}",
                        n.id,
                        kind(n.kind),
                        n.addr,
                        n.hostname,
                        if s.alive { "yes" } else { "no" },
                        seen
                    );
                }
            }
        }
        AdminCmd::Targets => {
            let routing = routing(client).await?;
            let live = nodes(client).await?;
            let mut rows = Vec::new();
            for target in &routing.targets {
                let chain = routing
                    .chains
                    .iter()
                    .find(|c| c.targets.iter().any(|t| t.target_id == target.id));
                let state = chain
                    .and_then(|c| c.targets.iter().find(|t| t.target_id == target.id))
                    .map_or("unchained", |t| public(t.state));
                let local_state = live
                    .targets
                    .iter()
                    .find(|t| t.target_id == target.id)
                    .map_or("-", |t| local(t.local_state));
                rows.push((target, chain.map(|c| c.id), state, local_state));
            }
            if json_output {
                let list: Vec<_> = rows
                    .iter()
                    .map(|(t, chain, state, local_state)| {
                        json!({"id": t.id, "node": t.node_id, "path": t.path, "chain": chain, "state": state,
                            "local_state": local_state, "admin_offline": t.admin_offline})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                println!(
                    "{:>8} {:>6} {:>6} {:<10} {:<11} {:<6} PATH",
                    "TARGET", "NODE", "CHAIN", "STATE", "LOCAL", "ADMIN"
                );
                for (t, chain, state, local_state) in rows {
                    println!(
                        "{:>8} {:>6} {:>6} {:<10} {:<11} {:<6} {}",
                        t.id,
                        t.node_id,
                        chain.map_or("-".to_string(), |c| c.to_string()),
                        state,
                        local_state,
                        if t.admin_offline { "off" } else { "" },
                        t.path
                    );
                }
            }
        }
        AdminCmd::Chains => {
            let routing = routing(client).await?;
            if json_output {
                let list: Vec<_> = routing
                    .chains
                    .iter()
                    .map(|c| {
                        let targets: Vec<_> = c
                            .targets
                            .iter()
                            .map(|t| json!({"target": t.target_id, "state": public(t.state)}))
                            .collect();
                        json!({"id": c.id, "version": c.version, "targets": targets})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                println!("{:>6} {:>8}  TARGETS (head first)", "CHAIN", "VERSION");
                for c in &routing.chains {
                    let targets: Vec<String> = c
                        .targets
                        .iter()
                        .map(|t| format!("{}:{}", t.target_id, public(t.state)))
                        .collect();
                    println!("{:>6} {:>8}  {}", c.id, c.version, targets.join("  "));
                }
                for t in &routing.tables {
                    println!("table {}: chains {:?}", t.id, t.chains);
                }
            }
        }
        AdminCmd::Bootstrap { table, replication } => {
            let reply = client
                .call(|channel| async move {
                    MgmtdClient::new(channel)
                        .bootstrap(BootstrapRequest {
                            table_id: table,
                            replication,
                        })
                        .await
                })
                .await
                .map_err(|s| failed(client, &s))?;
            let routing = reply.routing.unwrap_or_default();
            let Some(created) = routing.tables.iter().find(|t| t.id == table) else {
                bail!("mgmtd did not report chain table {table}");
            };
            println!(
                "chain table {table}: {} chains of {replication} replicas",
                created.chains.len()
            );
        }
        AdminCmd::CreateChain { id, targets } => {
            let request = CreateChainsRequest {
                chains: vec![ChainSpec {
                    id,
                    targets: targets.clone(),
                }],
            };
            client
                .call(|channel| {
                    let request = request.clone();
                    async move { MgmtdClient::new(channel).create_chains(request).await }
                })
                .await
                .map_err(|s| failed(client, &s))?;
            println!("chain {id} created: {targets:?} (head first)");
        }
        AdminCmd::CreateTable { id, chains } => {
            let request = CreateChainTableRequest {
                id,
                chains: chains.clone(),
            };
            client
                .call(|channel| {
                    let request = request.clone();
                    async move { MgmtdClient::new(channel).create_chain_table(request).await }
                })
                .await
                .map_err(|s| failed(client, &s))?;
            println!("chain table {id}: chains {chains:?}");
        }
        AdminCmd::Offline { target } | AdminCmd::Online { target } => {
            let offline = matches!(command, AdminCmd::Offline { .. });
            client
                .call(|channel| async move {
                    MgmtdClient::new(channel)
                        .set_target_offline(SetTargetOfflineRequest {
                            target_id: target,
                            offline,
                        })
                        .await
                })
                .await
                .map_err(|s| failed(client, &s))?;
            println!(
                "target {target} {}",
                if offline {
                    "taken offline"
                } else {
                    "may return"
                }
            );
        }
    }
    Ok(())
}
