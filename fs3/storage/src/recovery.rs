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

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ff_net::{Call, Transport};
use fs3_client::routing::Routing;
use fs3_proto::mgmtd::{LocalState, PublicState};
use fs3_proto::storage::{
    ChunkMetaEntry, DumpMetaReply, DumpMetaRequest, ReadReply, ReadRequest, SyncDoneRequest,
    UpdateKind, WriteRequest, method,
};
use prost::Message as _;

use crate::engine::{ChunkId, ChunkMeta, ChunkVersion, EngineError};
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

/// A syncing successor's chunk list, fetched a page at a time, in id order.
struct RemoteChunks<'a> {
    storage: &'a Storage,
    successor: u64,
    page: std::collections::VecDeque<ChunkMetaEntry>,
    after: Option<fs3_proto::storage::ChunkId>,
    more: bool,
}

impl RemoteChunks<'_> {
    async fn next(&mut self) -> Result<Option<(ChunkId, ChunkMetaEntry)>, String> {
        if self.page.is_empty() && self.more {
            let routing = self.storage.routing.current();
            let reply = call(
                self.storage,
                &routing,
                self.successor,
                method::DUMP_META,
                DumpMetaRequest {
                    target_id: self.successor,
                    after: self.after,
                    limit: 0,
                }
                .encode_to_vec(),
                Bytes::new(),
            )
            .await?;
            let page =
                DumpMetaReply::decode(&reply.header[..]).map_err(|e| format!("dump reply: {e}"))?;
            self.after = page.chunks.last().and_then(|c| c.chunk);
            self.more = page.more && self.after.is_some();
            self.page = page.chunks.into();
        }
        Ok(self.page.pop_front().and_then(|entry| {
            let chunk = entry.chunk?;
            Some((
                ChunkId {
                    inode: chunk.inode,
                    index: chunk.index,
                },
                entry,
            ))
        }))
    }
}

/// The source's own chunk list, read a page at a time, in id order.
struct LocalChunks<'a> {
    target: &'a Target,
    page: std::collections::VecDeque<(ChunkId, ChunkMeta)>,
    after: Option<ChunkId>,
    more: bool,
}

impl LocalChunks<'_> {
    fn next(&mut self) -> Result<Option<(ChunkId, ChunkMeta)>, String> {
        if self.page.is_empty() && self.more {
            let page = self
                .target
                .engine
                .list_after(self.after, SYNC_PAGE)
                .map_err(|e| e.to_string())?;
            self.more = page.len() == SYNC_PAGE;
            self.after = page.last().map(|(id, _)| *id);
            self.page = page.into();
        }
        Ok(self.page.pop_front())
    }
}

/// Chunks of the source's own list held in memory at once during a sync.
const SYNC_PAGE: usize = 1024;

/// What a successor's copy of a chunk needs, judged from the two lists.
fn successor_differs(local: &ChunkMeta, remote: &ChunkMetaEntry) -> bool {
    match &local.committed {
        // Only the successor has it committed: it goes.
        None => true,
        Some(committed) => {
            committed.version != remote.committed_version
                || committed.crc32c != remote.crc32c
                // A stale pending version would make the successor answer "pending".
                || remote.pending_version != 0
        }
    }
}

/// Brings the successor's copies up to the source's committed versions: walks both chunk lists
/// in id order (a page at a time), and for each chunk that differs sends the committed content
/// (installed there as committed) or, if the source has no committed version, a removal.
/// Returns how many chunks were sent.
async fn sync(
    storage: &Storage,
    source: &Arc<Target>,
    chain_id: u64,
    successor: u64,
) -> Result<usize, String> {
    let mut remote = RemoteChunks {
        storage,
        successor,
        page: Default::default(),
        after: None,
        more: true,
    };
    let mut local = LocalChunks {
        target: source,
        page: Default::default(),
        after: None,
        more: true,
    };
    let mut theirs = remote.next().await?;
    let mut ours = local.next()?;
    let mut copied = 0;
    loop {
        // (chunk, whether the successor has it) for a chunk to bring over, if any.
        let step = match (&ours, &theirs) {
            (None, None) => break,
            (Some((mine, meta)), Some((their_id, entry))) if mine == their_id => {
                let step = successor_differs(meta, entry).then_some((*mine, true));
                ours = local.next()?;
                theirs = remote.next().await?;
                step
            }
            (Some((mine, meta)), Some((their_id, _))) if mine < their_id => {
                let step = meta.committed.is_some().then_some((*mine, false));
                ours = local.next()?;
                step
            }
            (Some((mine, meta)), None) => {
                let step = meta.committed.is_some().then_some((*mine, false));
                ours = local.next()?;
                step
            }
            (_, Some((their_id, _))) => {
                let step = Some((*their_id, true));
                theirs = remote.next().await?;
                step
            }
        };
        if let Some((id, successor_has)) = step {
            copied += bring_over(storage, source, chain_id, successor, id, successor_has).await?;
        }
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

/// Sends chunk `id`'s committed content to the successor (or removes it there if the source
/// has no committed version and the successor has the chunk), under the source's chunk lock:
/// foreground writes pass the same lock, so none is half-way meanwhile. Returns 1 if content
/// was sent.
async fn bring_over(
    storage: &Storage,
    source: &Target,
    chain_id: u64,
    successor: u64,
    id: ChunkId,
    successor_has: bool,
) -> Result<usize, String> {
    let _lock = storage.locks.lock((source.id, id)).await;
    match source.engine.read_committed(id).await {
        Ok((version, content)) => {
            send_recovery_write(
                storage,
                chain_id,
                successor,
                id,
                UpdateKind::Replace,
                (version.version, version.write_id),
                content.into(),
            )
            .await?;
            storage
                .metrics
                .recovery
                .with_label_values(&["synced"])
                .inc();
            Ok(1)
        }
        Err(EngineError::NotFound(_)) => {
            if successor_has {
                send_recovery_write(
                    storage,
                    chain_id,
                    successor,
                    id,
                    UpdateKind::Remove,
                    (0, 0),
                    Bytes::new(),
                )
                .await?;
                storage
                    .metrics
                    .recovery
                    .with_label_values(&["removed"])
                    .inc();
            }
            Ok(0)
        }
        Err(error) => Err(error.to_string()),
    }
}

async fn send_recovery_write(
    storage: &Storage,
    chain_id: u64,
    successor: u64,
    id: ChunkId,
    kind: UpdateKind,
    (version, write_id): (u64, u64),
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
        write_id,
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
/// serving replica of its chain. One repair per chunk at a time: corrupt reads arriving while
/// one runs do not start more.
pub fn spawn_repair(storage: Arc<Storage>, target: Arc<Target>, chain_id: u64, id: ChunkId) {
    let key = (target.id, id);
    if !storage
        .repairs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key)
    {
        return;
    }
    tokio::spawn(async move {
        let result = repair(&storage, &target, chain_id, id).await;
        storage
            .repairs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        match result {
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

/// Repairs `id` on `target` from a peer holding the same committed version with the same
/// checksum, unless the local copy is whole by now or has moved on. Returns the peer repaired
/// from. The peer is read without holding the chunk's lock (writes are not held up behind a
/// slow peer); the lock is taken to check again and install.
async fn repair(
    storage: &Storage,
    target: &Target,
    chain_id: u64,
    id: ChunkId,
) -> Result<Option<u64>, String> {
    let committed = |target: &Target| -> Result<Option<ChunkVersion>, String> {
        Ok(target
            .engine
            .meta(id)
            .map_err(|e| e.to_string())?
            .and_then(|m| m.committed))
    };
    let Some(expected) = committed(target)? else {
        return Ok(None);
    };
    match target.engine.read_committed(id).await {
        Ok(_) => return Ok(None),
        Err(EngineError::Corrupt { .. }) => {}
        Err(error) => return Err(error.to_string()),
    }
    let (peer, content) = fetch_from_peer(storage, target, chain_id, id, &expected).await?;
    let _lock = storage.locks.lock((target.id, id)).await;
    let now = committed(target)?;
    if now.as_ref().map(|c| (c.version, c.write_id)) != Some((expected.version, expected.write_id))
        || target.engine.read_committed(id).await.is_ok()
    {
        return Ok(None);
    }
    target
        .engine
        .install(id, expected.version, expected.write_id, &content)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Some(peer))
}

/// The content of `expected` (same version, same checksum) from a serving peer of the chain.
async fn fetch_from_peer(
    storage: &Storage,
    target: &Target,
    chain_id: u64,
    id: ChunkId,
    expected: &ChunkVersion,
) -> Result<(u64, Bytes), String> {
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
                let content = Bytes::copy_from_slice(&reply.payload);
                if meta.version != expected.version || crc32c::crc32c(&content) != expected.crc32c {
                    last = format!(
                        "target {peer} holds version {} with other content",
                        meta.version
                    );
                    continue;
                }
                return Ok((peer, content));
            }
            Err(error) => last = format!("target {peer}: {error}"),
        }
    }
    Err(last)
}
