//! Keeping replicas whole: the restart protocol's phases, copying a predecessor's chunks to a
//! syncing successor, and repairing a chunk that failed its checksum from another replica.
//!
//! Copying (run by the last serving target of a chain for each syncing target behind it): ask
//! the successor for its chunk metadata, compare with the local chunks, and for every chunk the
//! successor lacks or holds at another version, take the chunk's lock, read the committed
//! content, and send it as a recovery write that the successor installs as committed; chunks
//! only the successor has are removed there. Foreground writes continue meanwhile: they pass
//! the same lock, and reach the successor as whole-chunk content. Then sync-done tells the
//! successor it is up to date, which it reports to mgmtd, which makes it serving.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ff_net::{Call, Transport};
use fs3_client::routing::Routing;
use fs3_proto::mgmtd::{LocalState, PublicState};
use fs3_proto::storage::{
    DumpMetaReply, DumpMetaRequest, ReadReply, ReadRequest, SyncDoneRequest, UpdateKind,
    WriteRequest, method,
};
use prost::Message as _;

use crate::engine::{ChunkId, EngineError};
use crate::service::{Phase, Storage, Target};

/// Moves local targets through the restart protocol as mgmtd's view of them changes. Routing
/// not yet fetched from mgmtd says nothing (an empty cache would look like "in no chain").
pub fn update_phases(storage: &Storage, routing: &Routing) {
    if !routing.from_mgmtd() {
        return;
    }
    storage
        .metrics
        .routing_version
        .set(i64::try_from(routing.version()).unwrap_or(i64::MAX));
    for target in storage.targets.values() {
        let public = routing.chain_of(target.id).map(|(_, state)| state);
        let next = match (target.phase(), public) {
            // Not in any chain yet: nothing to catch up with.
            (Phase::Starting, None) => Phase::UpToDate,
            // Out of service (or waiting): it may rejoin, through recovery.
            (
                Phase::Starting,
                Some(PublicState::Offline | PublicState::Lastsrv | PublicState::Waiting),
            ) => Phase::Recovering,
            // mgmtd made the last serving replica serve again.
            (Phase::Recovering, Some(PublicState::Serving)) => Phase::UpToDate,
            // Cut off from the chain while up to date: it must catch up again.
            (
                Phase::UpToDate,
                Some(PublicState::Offline | PublicState::Lastsrv | PublicState::Waiting),
            ) => Phase::Recovering,
            (phase, _) => phase,
        };
        if target.set_phase(next) {
            tracing::info!(
                target = target.id,
                phase = next.label(),
                "target phase changed"
            );
        }
    }
    for phase in [Phase::Starting, Phase::Recovering, Phase::UpToDate] {
        let count = storage
            .targets
            .values()
            .filter(|t| t.phase() == phase)
            .count();
        storage
            .metrics
            .targets
            .with_label_values(&[phase.label()])
            .set(count as i64);
    }
}

/// The local state a target reports in heartbeats.
pub fn local_state(phase: Phase) -> LocalState {
    match phase {
        Phase::Starting => LocalState::LocalOffline,
        Phase::Recovering => LocalState::Online,
        Phase::UpToDate => LocalState::UpToDate,
    }
}

/// Syncs in progress, by successor target.
#[derive(Debug, Default)]
pub struct Syncs {
    running: Mutex<HashSet<u64>>,
}

/// Starts a sync for every syncing target whose chain's last serving target is local.
pub fn start_syncs(storage: &Arc<Storage>, syncs: &Arc<Syncs>) {
    let routing = storage.routing.current();
    for chain in &routing.info().chains {
        let Some(source) = chain
            .targets
            .iter()
            .filter(|t| t.state == PublicState::Serving as i32)
            .map(|t| t.target_id)
            .next_back()
        else {
            continue;
        };
        let Some(source) = storage.targets.get(&source).cloned() else {
            continue;
        };
        for successor in chain
            .targets
            .iter()
            .filter(|t| t.state == PublicState::Syncing as i32)
        {
            let successor = successor.target_id;
            if !syncs
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(successor)
            {
                continue;
            }
            let (storage, syncs, source, chain_id) =
                (storage.clone(), syncs.clone(), source.clone(), chain.id);
            tokio::spawn(async move {
                match sync(&storage, &source, chain_id, successor).await {
                    Ok(copied) => {
                        tracing::info!(
                            from = source.id,
                            to = successor,
                            chain = chain_id,
                            copied,
                            "sync done"
                        )
                    }
                    Err(error) => {
                        tracing::warn!(from = source.id, to = successor, %error, "sync failed; will retry")
                    }
                }
                syncs
                    .running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&successor);
            });
        }
    }
}

async fn call(
    storage: &Storage,
    routing: &Routing,
    target: u64,
    method: u16,
    header: Vec<u8>,
    payload: Bytes,
) -> Result<ff_net::Response, String> {
    let addr = routing
        .target_addr(target)
        .ok_or_else(|| format!("target {target} has no known address"))?;
    storage
        .net
        .call(
            addr,
            Call {
                method,
                header: header.into(),
                payload,
            },
        )
        .await
        .map_err(|e| e.to_string())
}

/// Copies every chunk `successor` lacks from `source`; returns how many were sent.
async fn sync(
    storage: &Storage,
    source: &Arc<Target>,
    chain_id: u64,
    successor: u64,
) -> Result<usize, String> {
    let routing = storage.routing.current();
    let reply = call(
        storage,
        &routing,
        successor,
        method::DUMP_META,
        DumpMetaRequest {
            target_id: successor,
        }
        .encode_to_vec(),
        Bytes::new(),
    )
    .await?;
    let remote: HashMap<ChunkId, (u64, u32)> = DumpMetaReply::decode(&reply.header[..])
        .map_err(|e| format!("dump reply: {e}"))?
        .chunks
        .into_iter()
        .filter_map(|c| {
            let chunk = c.chunk?;
            Some((
                ChunkId {
                    inode: chunk.inode,
                    index: chunk.index,
                },
                (c.committed_version, c.crc32c),
            ))
        })
        .collect();
    let local = source.engine.list().map_err(|e| e.to_string())?;
    let mut copied = 0;
    let local_ids: HashSet<ChunkId> = local.iter().map(|(id, _)| *id).collect();
    for (id, meta) in local {
        let Some(committed) = meta.committed else {
            continue;
        };
        if remote.get(&id) == Some(&(committed.version, committed.crc32c)) {
            continue;
        }
        let _lock = storage.locks.lock((source.id, id)).await;
        // Re-read under the lock: a foreground write may have moved the chunk on.
        let (version, content) = match source.engine.read_committed(id).await {
            Ok((version, content)) => (version, content),
            Err(crate::engine::EngineError::NotFound(_)) => continue,
            Err(error) => return Err(error.to_string()),
        };
        send_recovery_write(
            storage,
            chain_id,
            successor,
            id,
            UpdateKind::Replace,
            version.version,
            content.into(),
        )
        .await?;
        storage
            .metrics
            .recovery
            .with_label_values(&["synced"])
            .inc();
        copied += 1;
    }
    for id in remote.keys().filter(|id| !local_ids.contains(id)) {
        let _lock = storage.locks.lock((source.id, *id)).await;
        if source
            .engine
            .meta(*id)
            .map_err(|e| e.to_string())?
            .is_some()
        {
            continue; // created meanwhile by a foreground write, which reached the successor too
        }
        send_recovery_write(
            storage,
            chain_id,
            successor,
            *id,
            UpdateKind::Remove,
            0,
            Bytes::new(),
        )
        .await?;
        storage
            .metrics
            .recovery
            .with_label_values(&["removed"])
            .inc();
    }
    let routing = storage.routing.current();
    let chain_version = routing.chain(chain_id).map_or(0, |c| c.version);
    call(
        storage,
        &routing,
        successor,
        method::SYNC_DONE,
        SyncDoneRequest {
            target_id: successor,
            chain_id,
            chain_version,
        }
        .encode_to_vec(),
        Bytes::new(),
    )
    .await?;
    Ok(copied)
}

async fn send_recovery_write(
    storage: &Storage,
    chain_id: u64,
    successor: u64,
    id: ChunkId,
    kind: UpdateKind,
    version: u64,
    content: Bytes,
) -> Result<(), String> {
    let routing = storage.routing.current();
    let chain = routing
        .chain(chain_id)
        .ok_or_else(|| format!("chain {chain_id} disappeared"))?;
    let header = WriteRequest {
        chain_id,
        chain_version: chain.version,
        target_id: successor,
        chunk: Some(fs3_proto::storage::ChunkId {
            inode: id.inode,
            index: id.index,
        }),
        kind: kind as i32,
        offset: 0,
        length: content.len() as u32,
        write_id: 0,
        version,
        sync: true,
    };
    call(
        storage,
        &routing,
        successor,
        method::WRITE,
        header.encode_to_vec(),
        content,
    )
    .await
    .map(|_| ())
}

/// Replaces a local chunk that failed its checksum with the committed content of another
/// serving replica of its chain.
pub fn spawn_repair(storage: Arc<Storage>, target: Arc<Target>, chain_id: u64, id: ChunkId) {
    tokio::spawn(async move {
        match repair(&storage, &target, chain_id, id).await {
            Ok(None) => {}
            Ok(Some(peer)) => {
                storage
                    .metrics
                    .recovery
                    .with_label_values(&["repaired"])
                    .inc();
                tracing::info!(target = target.id, chunk = %id, from = peer, "chunk repaired")
            }
            Err(error) => tracing::warn!(target = target.id, chunk = %id, %error, "repair failed"),
        }
    });
}

/// Repairs `id` on `target` from a peer, unless the local copy is whole by now (another repair
/// or a write got there first). Returns the peer repaired from. Holds the chunk's lock
/// throughout, so no write to the chunk passes this replica meanwhile and the peers' committed
/// version is the one the local copy should have.
async fn repair(
    storage: &Storage,
    target: &Target,
    chain_id: u64,
    id: ChunkId,
) -> Result<Option<u64>, String> {
    let _lock = storage.locks.lock((target.id, id)).await;
    let expected = match target.engine.read_committed(id).await {
        Ok(_) => return Ok(None),
        Err(EngineError::Corrupt { .. }) => target
            .engine
            .meta(id)
            .map_err(|e| e.to_string())?
            .and_then(|m| m.committed)
            .map(|c| c.version)
            .ok_or_else(|| "the chunk has no committed version any more".to_string())?,
        Err(error) => return Err(error.to_string()),
    };
    let routing = storage.routing.current();
    let chain = routing
        .chain(chain_id)
        .ok_or_else(|| format!("chain {chain_id} is unknown"))?;
    let peers: Vec<u64> = chain
        .targets
        .iter()
        .filter(|t| t.state == PublicState::Serving as i32 && t.target_id != target.id)
        .map(|t| t.target_id)
        .collect();
    let mut last = String::from("no other serving replica");
    for peer in peers {
        let header = ReadRequest {
            chain_id,
            chain_version: chain.version,
            target_id: peer,
            chunk: Some(fs3_proto::storage::ChunkId {
                inode: id.inode,
                index: id.index,
            }),
            offset: 0,
            length: u32::MAX,
        };
        match call(
            storage,
            &routing,
            peer,
            method::READ,
            header.encode_to_vec(),
            Bytes::new(),
        )
        .await
        {
            Ok(reply) => {
                let meta =
                    ReadReply::decode(&reply.header[..]).map_err(|e| format!("read reply: {e}"))?;
                if meta.version != expected {
                    last = format!(
                        "target {peer} holds version {}, not {expected}",
                        meta.version
                    );
                    continue;
                }
                target
                    .engine
                    .install(id, meta.version, 0, &reply.payload)
                    .await
                    .map_err(|e| e.to_string())?;
                return Ok(Some(peer));
            }
            Err(error) => last = format!("target {peer}: {error}"),
        }
    }
    Err(last)
}
