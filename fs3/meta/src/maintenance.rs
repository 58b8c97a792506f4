//! What a meta replica does besides answering requests: heartbeats to mgmtd (so clients find
//! meta through mgmtd), and, on the leader only, copying mgmtd's chain tables into the
//! namespace, ending the sessions of clients that went silent (with the lengths their chunks on
//! storage give, since a dead writer may not have reported its last writes), and collecting unlinked files
//! once `gc_delay` has passed: their chunks are removed from storage, then the inode is purged.

use std::time::{Duration, Instant};

use ff_raft::{Consistency, Role};
use fs3_client::ClientError;
use fs3_proto::meta::{
    ChainTableQuery, CloseOp, ForgetOp, GcQuery, GetAttrQuery, PruneSessionsOp, PurgeOp, Query,
    Session, SessionsQuery, SetChainTableOp, command, query,
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

/// The leader's housekeeping every `interval`: chain tables and expired sessions.
pub async fn run(api: MetaApi, interval: Duration) {
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
        if let Err(error) = expire_sessions(&api).await {
            tracing::debug!(%error, "expiring sessions failed");
        }
    }
}

/// The leader's garbage collector every `interval`, apart from the housekeeping so that a
/// large file's chunks never hold up session expiry.
pub async fn collect(api: MetaApi, interval: Duration, gc_delay: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if api.node.status().role != Role::Leader {
            continue;
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

async fn expire_sessions(api: &MetaApi) -> Result<(), String> {
    let lease = api.session_lease;
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
        for session in sessions.sessions.iter().filter(|s| s.client == client) {
            // A writer that died before reporting leaves bytes past the recorded length: the
            // length is taken from what the chunks hold.
            if let Err(error) = close_from_storage(api, session).await {
                tracing::warn!(inode = session.inode, %error, "could not recover a length from storage");
            }
        }
        propose(api, command::Op::PruneSessions(PruneSessionsOp { client })).await?;
        api.live().clients.remove(&client);
        api.metrics().clients_expired.inc();
    }
    Ok(())
}

/// Most chunks probed past a file's recorded end when recovering a dead writer's length.
const MAX_LENGTH_PROBES: u64 = 1 << 16;

/// Ends `session` with the length its file's chunks on storage give: the end of the last chunk
/// in the unbroken run of chunks from the recorded end on (writes past a hole are not found).
async fn close_from_storage(api: &MetaApi, session: &Session) -> Result<(), String> {
    let inode = local_query(
        api,
        query::Op::GetAttr(GetAttrQuery {
            inode: session.inode,
        }),
    )
    .await?
    .inode
    .ok_or_else(|| "no inode".to_string())?;
    let Some(layout) = inode
        .layout
        .as_ref()
        .filter(|l| !l.chains.is_empty() && l.chunk_size > 0)
    else {
        return Ok(());
    };
    let mut length = inode.length;
    let first = inode.length / layout.chunk_size;
    for index in first..first + MAX_LENGTH_PROBES {
        let (chain, id) = fs3_client::fs::chunk_place(inode.id, layout, index);
        match api.chunks.read(chain, id, 0, 0).await {
            Ok(chunk) => {
                let end = index
                    .saturating_mul(layout.chunk_size)
                    .saturating_add(u64::from(chunk.chunk_length));
                length = length.max(end.min(fs3_client::MAX_FILE_SIZE));
            }
            Err(ClientError::NotFound(_)) => break,
            Err(error) => return Err(error.to_string()),
        }
    }
    if length > inode.length {
        tracing::info!(
            inode = inode.id,
            from = inode.length,
            to = length,
            "recovered a dead writer's length"
        );
    }
    propose(
        api,
        command::Op::Close(CloseOp {
            inode: inode.id,
            session: session.id,
            length,
            keep_open: false,
            wrote: length > inode.length,
            client: session.client,
        }),
    )
    .await
}

/// Purges unlinked files whose delay has passed (nobody can open them after that), then removes
/// the chunks of purged files and forgets them. A file that fails is retried next round; the
/// others go on.
async fn collect_garbage(api: &MetaApi, delay: Duration) -> Result<(), String> {
    let delay_ns = i64::try_from(delay.as_nanos()).unwrap_or(i64::MAX);
    let due = local_query(
        api,
        query::Op::Gc(GcQuery {
            before_ns: now_ns().saturating_sub(delay_ns),
            limit: GC_BATCH,
            purged: false,
        }),
    )
    .await?;
    for inode in due.inodes {
        // Refused (EBUSY) if a session opened since the query: the file stays.
        if let Err(error) = propose(api, command::Op::Purge(PurgeOp { inode: inode.id })).await {
            tracing::debug!(inode = inode.id, %error, "not purged");
        }
    }
    let purged = local_query(
        api,
        query::Op::Gc(GcQuery {
            before_ns: 0,
            limit: GC_BATCH,
            purged: true,
        }),
    )
    .await?;
    for inode in purged.inodes {
        let extent = inode
            .max_length
            .max(inode.length)
            .min(fs3_client::MAX_FILE_SIZE);
        if let Err(error) = api.cut_chunks(&inode, 0, extent).await {
            tracing::warn!(inode = inode.id, %error, "removing a purged file's chunks failed; retrying later");
            continue;
        }
        propose(api, command::Op::Forget(ForgetOp { inode: inode.id })).await?;
        api.metrics().files_collected.inc();
        tracing::debug!(inode = inode.id, "collected an unlinked file");
    }
    Ok(())
}
