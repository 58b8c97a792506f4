//! What a meta replica does besides answering requests: heartbeats to mgmtd (so clients find
//! meta through mgmtd), and, on the leader only, copying mgmtd's chain tables into the
//! namespace, ending the sessions of clients that went silent, and collecting unlinked files
//! once `gc_delay` has passed: their chunks are removed from storage, then the inode is purged.

use std::time::{Duration, Instant};

use ff_raft::{Consistency, Role};
use fs3_proto::meta::{
    ChainTableQuery, GcQuery, PruneSessionsOp, PurgeOp, Query, SessionsQuery, SetChainTableOp,
    command, query,
};
use fs3_proto::mgmtd::mgmtd_client::MgmtdClient;
use fs3_proto::mgmtd::{HeartbeatRequest, NodeKind};

use crate::service::{MetaApi, now_ns};

/// Most unlinked files collected per round.
const GC_BATCH: u32 = 256;

/// Heartbeats mgmtd every `interval` as node `node_id` at `addr`, forever.
pub async fn heartbeats(api: MetaApi, node_id: u64, addr: String, interval: Duration) {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let beat = HeartbeatRequest {
            node_id,
            kind: NodeKind::Meta as i32,
            addr: addr.clone(),
            hostname: hostname.clone(),
            targets: Vec::new(),
        };
        let result = api
            .chunks
            .routing()
            .mgmtd()
            .call_idempotent(|channel| {
                let beat = beat.clone();
                async move { MgmtdClient::new(channel).heartbeat(beat).await }
            })
            .await;
        match result {
            Ok(reply) if reply.routing_version > api.chunks.routing().current().version() => {
                if let Err(error) = api.chunks.routing().refresh().await {
                    tracing::debug!(%error, "routing refresh failed");
                }
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "heartbeat to mgmtd failed"),
        }
    }
}

/// The leader's housekeeping every `interval`: chain tables, sessions, garbage.
pub async fn run(api: MetaApi, interval: Duration, session_lease: Duration, gc_delay: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let leader = api.node.status().role == Role::Leader;
        {
            let mut live = api.live();
            match (leader, live.leader_since) {
                (true, None) => live.leader_since = Some(Instant::now()),
                (false, Some(_)) => {
                    live.leader_since = None;
                    live.clients.clear();
                }
                _ => {}
            }
        }
        if !leader {
            continue;
        }
        if let Err(error) = copy_chain_tables(&api).await {
            tracing::debug!(%error, "copying chain tables failed");
        }
        if let Err(error) = expire_sessions(&api, session_lease).await {
            tracing::debug!(%error, "expiring sessions failed");
        }
        if let Err(error) = collect_garbage(&api, gc_delay).await {
            tracing::warn!(%error, "garbage collection round failed");
        }
    }
}

async fn local_query(api: &MetaApi, op: query::Op) -> Result<fs3_proto::meta::QueryResult, String> {
    api.node
        .read_with(
            Query {
                creds: None,
                op: Some(op),
            },
            Consistency::Local,
        )
        .await
        .map_err(|e| e.to_string())
}

async fn propose(api: &MetaApi, op: command::Op) -> Result<(), String> {
    let result = api.propose_internal(op).await.map_err(|e| e.to_string())?;
    if result.errno != 0 {
        return Err(result.message);
    }
    Ok(())
}

async fn copy_chain_tables(api: &MetaApi) -> Result<(), String> {
    let routing = api.chunks.routing().current();
    if !routing.from_mgmtd() {
        api.chunks
            .routing()
            .refresh()
            .await
            .map_err(|e| e.to_string())?;
    }
    let routing = api.chunks.routing().current();
    for table in &routing.info().tables {
        let known = local_query(
            api,
            query::Op::ChainTable(ChainTableQuery { table_id: table.id }),
        )
        .await?;
        if known.chains != table.chains && !table.chains.is_empty() {
            tracing::info!(
                table = table.id,
                chains = table.chains.len(),
                "copying chain table from mgmtd"
            );
            propose(
                api,
                command::Op::SetChainTable(SetChainTableOp {
                    table_id: table.id,
                    chains: table.chains.clone(),
                }),
            )
            .await?;
        }
    }
    Ok(())
}

async fn expire_sessions(api: &MetaApi, lease: Duration) -> Result<(), String> {
    // A new leader has heard from no one yet: it judges nobody for a full lease.
    if api.live().leader_since.is_none_or(|t| t.elapsed() < lease) {
        return Ok(());
    }
    let sessions = local_query(api, query::Op::Sessions(SessionsQuery {})).await?;
    let mut clients: Vec<u64> = sessions.sessions.iter().map(|s| s.client).collect();
    clients.sort_unstable();
    clients.dedup();
    let expired: Vec<u64> = {
        let live = api.live();
        clients
            .into_iter()
            .filter(|c| live.clients.get(c).is_none_or(|t| t.elapsed() > lease))
            .collect()
    };
    for client in expired {
        tracing::info!(client, "client went silent; ending its write sessions");
        propose(api, command::Op::PruneSessions(PruneSessionsOp { client })).await?;
        api.live().clients.remove(&client);
        api.metrics().clients_expired.inc();
    }
    Ok(())
}

async fn collect_garbage(api: &MetaApi, delay: Duration) -> Result<(), String> {
    let delay_ns = i64::try_from(delay.as_nanos()).unwrap_or(i64::MAX);
    let due = local_query(
        api,
        query::Op::Gc(GcQuery {
            before_ns: now_ns().saturating_sub(delay_ns),
            limit: GC_BATCH,
        }),
    )
    .await?;
    for inode in due.inodes {
        api.cut_chunks(&inode, 0, inode.max_length.max(inode.length))
            .await
            .map_err(|e| format!("removing the chunks of inode {}: {e}", inode.id))?;
        propose(api, command::Op::Purge(PurgeOp { inode: inode.id })).await?;
        api.metrics().files_collected.inc();
        tracing::debug!(inode = inode.id, "collected an unlinked file");
    }
    Ok(())
}
