//! The storage data service: CRAQ chain writes, reads from serving replicas, and the requests
//! of recovery (chunk metadata dumps, whole-chunk copies, sync-done), served over ff-net.
//!
//! Writes enter at the chain's head, which takes the chunk's lock, gives the write the next
//! version, stages it, passes the chunk's whole new content to its successor and waits; the
//! tail commits first, and each replica commits as the acknowledgement comes back. Replicas
//! behind the head stage whatever content the head sent under the head's version (they may be
//! syncing and lack the previous version). Every request names the chain version it was routed
//! with; a stale one is refused with the current version. If the successor is unreachable the
//! replica keeps retrying, refreshing its routing, until mgmtd has taken the successor out of
//! the chain or the forward timeout passes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ff_net::{Call, Fault, Handler, NetClient, NetError, Reply, Request, Transport};
use fs3_client::RoutingCache;
use fs3_client::routing::{Routing, write_path};
use fs3_proto::mgmtd::{Chain, PublicState};
use fs3_proto::storage::{
    ChunkMetaEntry, DumpMetaReply, DumpMetaRequest, ReadReply, ReadRequest, SyncDoneReply,
    SyncDoneRequest, UpdateKind, WriteReply, WriteRequest, fault, method,
};
use prost::Message as _;

use crate::engine::locks::KeyLocks;
use crate::engine::{Apply, ChunkEngine, ChunkId, ChunkVersion, EngineError, Update};
use crate::metrics::StorageMetrics;

/// Where a local target stands in the restart and recovery protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Just started: reported offline until mgmtd has taken the target out of service, so that
    /// it cannot serve data it may have missed.
    Starting,
    /// Reported online: waiting for, or receiving, a copy from its predecessor.
    Recovering,
    /// Holds everything its chain committed.
    UpToDate,
}

impl Phase {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Recovering => "recovering",
            Phase::UpToDate => "up_to_date",
        }
    }
}

/// A local target.
pub struct Target {
    /// Its id.
    pub id: u64,
    /// Its directory.
    pub path: PathBuf,
    /// Its chunks.
    pub engine: ChunkEngine,
    /// Its phase.
    pub phase: Mutex<Phase>,
}

impl Target {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves to `phase`; returns whether it changed.
    pub fn set_phase(&self, phase: Phase) -> bool {
        let mut current = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        let changed = *current != phase;
        *current = phase;
        changed
    }
}

/// The state shared by the service, the heartbeat and the recovery tasks.
pub struct Storage {
    /// This service's node id.
    pub node_id: u64,
    /// Local targets by id.
    pub targets: BTreeMap<u64, Arc<Target>>,
    /// Routing from mgmtd.
    pub routing: Arc<RoutingCache>,
    /// Client for talking to other storage services.
    pub net: Arc<NetClient>,
    /// Per (target, chunk) locks held for a whole chain write or chunk copy.
    pub locks: KeyLocks<(u64, ChunkId)>,
    /// Repairs running, by (target, chunk).
    pub repairs: Mutex<std::collections::HashSet<(u64, ChunkId)>>,
    /// When mgmtd last accepted a heartbeat.
    pub last_heartbeat: Mutex<Option<Instant>>,
    /// Beyond this without a heartbeat, stop serving.
    pub isolation_timeout: Duration,
    /// How long a replica keeps trying to pass a write to its successor.
    pub forward_timeout: Duration,
    /// Metrics.
    pub metrics: StorageMetrics,
}

/// Most chunk entries in one DUMP_META reply (~40 bytes each, well under a frame's header).
pub const DUMP_PAGE: usize = 4096;

fn fault(code: u16, message: impl Into<String>) -> Fault {
    Fault {
        code,
        message: message.into(),
    }
}

fn bad(message: impl Into<String>) -> Fault {
    fault(fault::BAD_REQUEST, message)
}

/// The one place engine errors become faults.
#[allow(clippy::needless_pass_by_value)] // by value so it fits `map_err` directly
fn engine_fault(error: EngineError) -> Fault {
    let code = match &error {
        EngineError::NotFound(_) => fault::NOT_FOUND,
        EngineError::OnlyPending { .. } => fault::PENDING,
        EngineError::OutOfRange { .. } => fault::BAD_REQUEST,
        EngineError::NoSpace(_) => fault::NO_SPACE,
        EngineError::Corrupt { .. } => fault::CORRUPT,
        _ => fault::INTERNAL,
    };
    fault(code, error.to_string())
}

fn chunk_id(chunk: Option<fs3_proto::storage::ChunkId>) -> Result<ChunkId, Fault> {
    let chunk = chunk.ok_or_else(|| bad("request names no chunk"))?;
    Ok(ChunkId {
        inode: chunk.inode,
        index: chunk.index,
    })
}

fn wire_chunk(id: ChunkId) -> fs3_proto::storage::ChunkId {
    fs3_proto::storage::ChunkId {
        inode: id.inode,
        index: id.index,
    }
}

impl Storage {
    fn target(&self, id: u64) -> Result<&Arc<Target>, Fault> {
        self.targets.get(&id).ok_or_else(|| {
            fault(
                fault::UNKNOWN_TARGET,
                format!("target {id} is not on node {}", self.node_id),
            )
        })
    }

    fn check_isolation(&self) -> Result<(), Fault> {
        let last = *self
            .last_heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match last {
            Some(at) if at.elapsed() <= self.isolation_timeout => Ok(()),
            _ => Err(fault(
                fault::NOT_SERVING,
                format!(
                    "node {} has not reached mgmtd recently and does not serve",
                    self.node_id
                ),
            )),
        }
    }

    /// The chain as of `version`, refreshing routing if the caller knows a newer one.
    async fn chain_at(&self, chain_id: u64, version: u64) -> Result<(Arc<Routing>, Chain), Fault> {
        let mut routing = self.routing.current();
        if routing.chain(chain_id).is_none_or(|c| c.version < version) {
            routing = self
                .routing
                .refresh_after(routing.version())
                .await
                .map_err(|e| fault(fault::INTERNAL, format!("cannot refresh routing: {e}")))?;
        }
        let chain = routing
            .chain(chain_id)
            .ok_or_else(|| {
                fault(
                    fault::STALE_CHAIN,
                    format!("chain {chain_id} is unknown here"),
                )
            })?
            .clone();
        if chain.version != version {
            return Err(fault(
                fault::STALE_CHAIN,
                format!(
                    "chain {chain_id} is at version {}, not {version}",
                    chain.version
                ),
            ));
        }
        Ok((routing, chain))
    }

    async fn write(self: &Arc<Self>, request: Request) -> Result<Reply, Fault> {
        let header = WriteRequest::decode(&request.header[..])
            .map_err(|e| bad(format!("write header: {e}")))?;
        let id = chunk_id(header.chunk)?;
        let target = self.target(header.target_id)?.clone();
        self.check_isolation()?;
        let (_routing, chain) = self.chain_at(header.chain_id, header.chain_version).await?;
        let path = write_path(&chain);
        let position = path.iter().position(|t| *t == target.id).ok_or_else(|| {
            fault(
                fault::NOT_SERVING,
                format!("target {} takes no writes in chain {}", target.id, chain.id),
            )
        })?;
        let kind = UpdateKind::try_from(header.kind)
            .map_err(|_| bad(format!("unknown update kind {}", header.kind)))?;
        let _lock = self.locks.lock((target.id, id)).await;
        let payload = &request.payload[..];
        if header.sync {
            // A predecessor copying a chunk during recovery.
            return match kind {
                UpdateKind::Remove => {
                    target.engine.remove(id).await.map_err(engine_fault)?;
                    Ok(Reply::default())
                }
                _ => {
                    let installed = target
                        .engine
                        .install(id, header.version, header.write_id, payload)
                        .await
                        .map_err(engine_fault)?;
                    Ok(write_reply(
                        installed.version,
                        installed.length,
                        installed.crc32c,
                    ))
                }
            };
        }
        match (position, header.version) {
            (0, 0) => {}
            (0, _) => {
                return Err(fault(
                    fault::STALE_CHAIN,
                    "a forwarded write reached the head",
                ));
            }
            (_, 0) => {
                return Err(fault(
                    fault::NOT_SERVING,
                    format!(
                        "target {} is not the head of chain {}; target {} is",
                        target.id, chain.id, path[0]
                    ),
                ));
            }
            _ => {}
        }
        if kind == UpdateKind::Remove {
            if position + 1 < path.len() {
                self.forward(
                    &chain,
                    target.id,
                    id,
                    UpdateKind::Remove,
                    header.version.max(1),
                    header.write_id,
                    Bytes::new(),
                )
                .await?;
            }
            target.engine.remove(id).await.map_err(engine_fault)?;
            return Ok(Reply::default());
        }
        // The tail has no successor to wait for: it records the write as committed at once.
        let is_tail = position + 1 == path.len();
        let staged = if position == 0 {
            if header.write_id == 0 {
                return Err(bad("write id 0 is reserved"));
            }
            let meta = target
                .engine
                .meta(id)
                .map_err(engine_fault)?
                .unwrap_or_default();
            if let Some(done) = meta
                .committed
                .as_ref()
                .filter(|c| c.write_id == header.write_id)
            {
                // A retry of a write the chain has committed (its reply was lost).
                return Ok(write_reply(done.version, done.length, done.crc32c));
            }
            let committed = match meta.pending.filter(|p| p.write_id != header.write_id) {
                // An earlier write failed after this head staged it, and may have been
                // committed downstream (and read there): finish it before building on it.
                Some(stale) => {
                    self.roll_forward(&chain, &target, id, is_tail, &stale)
                        .await?;
                    stale.version
                }
                None => meta.committed.as_ref().map_or(0, |c| c.version),
            };
            let version = committed
                .checked_add(1)
                .ok_or_else(|| bad(format!("chunk {id} has no versions left")))?;
            let update = match kind {
                UpdateKind::Write => Update::Write {
                    offset: header.offset,
                    data: payload,
                },
                UpdateKind::Replace => Update::Replace(payload),
                UpdateKind::Truncate => Update::Truncate(header.length),
                UpdateKind::Remove => return Err(bad("remove handled above")),
            };
            let how = Apply {
                forced: false,
                commit: is_tail,
            };
            // The head stores its version before passing it on: successors must never hold a
            // version the head lacks, or the head would later reuse its number.
            let staged = target
                .engine
                .apply(id, version, header.write_id, update, how)
                .await
                .map_err(|error| self.engine_fault_repairing(&target, chain.id, id, error))?;
            if !is_tail {
                let content = if kind == UpdateKind::Replace {
                    Bytes::copy_from_slice(payload)
                } else {
                    // A partial write's or truncate's new content was assembled by the engine.
                    Bytes::from(
                        target
                            .engine
                            .read_pending(id, staged.version)
                            .await
                            .map_err(engine_fault)?,
                    )
                };
                self.forward(
                    &chain,
                    target.id,
                    id,
                    UpdateKind::Replace,
                    version,
                    header.write_id,
                    content,
                )
                .await?;
            }
            staged
        } else {
            // Replicas behind the head take the whole content at the head's version.
            let how = Apply {
                forced: true,
                commit: is_tail,
            };
            let stage = target.engine.apply(
                id,
                header.version,
                header.write_id,
                Update::Replace(payload),
                how,
            );
            if is_tail {
                stage.await.map_err(engine_fault)?
            } else {
                // Store it here while the successors store theirs, so the replicas write in
                // parallel. If only the forward succeeds, the head keeps the write pending and
                // finishes it before its next write to the chunk.
                let forward = self.forward(
                    &chain,
                    target.id,
                    id,
                    UpdateKind::Replace,
                    header.version,
                    header.write_id,
                    Bytes::copy_from_slice(payload),
                );
                let (staged, forwarded) = tokio::join!(stage, forward);
                let staged = staged.map_err(engine_fault)?;
                forwarded?;
                staged
            }
        };
        if !is_tail {
            target
                .engine
                .commit(id, staged.version)
                .await
                .map_err(engine_fault)?;
        }
        if position == 0 {
            self.metrics
                .bytes
                .with_label_values(&["write"])
                .inc_by(payload.len() as u64);
        }
        Ok(write_reply(staged.version, staged.length, staged.crc32c))
    }

    /// Finishes a write this head staged but could not complete: passes its content down the
    /// chain again (successors that have it answer at once) and commits it here.
    async fn roll_forward(
        &self,
        chain: &Chain,
        target: &Target,
        id: ChunkId,
        is_tail: bool,
        stale: &ChunkVersion,
    ) -> Result<(), Fault> {
        if !is_tail {
            let content = target
                .engine
                .read_pending(id, stale.version)
                .await
                .map_err(engine_fault)?;
            self.forward(
                chain,
                target.id,
                id,
                UpdateKind::Replace,
                stale.version,
                stale.write_id,
                Bytes::from(content),
            )
            .await?;
        }
        target
            .engine
            .commit(id, stale.version)
            .await
            .map_err(engine_fault)?;
        tracing::info!(target = target.id, chunk = %id, version = stale.version, "finished an interrupted write");
        Ok(())
    }

    /// [`engine_fault`], starting a repair when the local copy turned out to be corrupt.
    fn engine_fault_repairing(
        self: &Arc<Self>,
        target: &Arc<Target>,
        chain_id: u64,
        id: ChunkId,
        error: EngineError,
    ) -> Fault {
        if matches!(error, EngineError::Corrupt { .. }) {
            tracing::warn!(target = target.id, %error, "corrupt chunk; repairing from a replica");
            crate::recovery::spawn_repair(self.clone(), target.clone(), chain_id, id);
        }
        engine_fault(error)
    }

    /// Passes a write to the successor of `from` in chain `chain`, following chain changes,
    /// until it is acknowledged, `from` becomes the tail, or the forward timeout passes.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        chain: &Chain,
        from: u64,
        id: ChunkId,
        kind: UpdateKind,
        version: u64,
        write_id: u64,
        content: Bytes,
    ) -> Result<(), Fault> {
        let deadline = Instant::now() + self.forward_timeout;
        let mut routing = self.routing.current();
        let mut current = chain.clone();
        let mut attempt = 0u32;
        loop {
            let path = write_path(&current);
            let position = path.iter().position(|t| *t == from).ok_or_else(|| {
                fault(
                    fault::STALE_CHAIN,
                    format!("target {from} left chain {} during a write", current.id),
                )
            })?;
            let Some(successor) = path.get(position + 1).copied() else {
                // The successor left the chain: this replica is the tail now.
                return Ok(());
            };
            let error = match routing.target_addr(successor) {
                Some(addr) => {
                    let header = WriteRequest {
                        chain_id: current.id,
                        chain_version: current.version,
                        target_id: successor,
                        chunk: Some(wire_chunk(id)),
                        kind: kind as i32,
                        offset: 0,
                        length: content.len() as u32,
                        write_id,
                        version,
                        sync: false,
                    };
                    let call = Call {
                        method: method::WRITE,
                        header: header.encode_to_vec().into(),
                        payload: content.clone(),
                    };
                    match self.net.call(addr, call).await {
                        Ok(_) => return Ok(()),
                        Err(NetError::Remote { code, message })
                            if !matches!(
                                code,
                                fault::STALE_CHAIN
                                    | fault::NOT_SERVING
                                    | fault::UNKNOWN_TARGET
                                    | fault::CHAIN_UNAVAILABLE
                            ) =>
                        {
                            return Err(fault(code, message));
                        }
                        Err(error) => error.to_string(),
                    }
                }
                None => format!("target {successor} has no known address"),
            };
            if Instant::now() >= deadline {
                return Err(fault(
                    fault::CHAIN_UNAVAILABLE,
                    format!("could not pass the write to target {successor}: {error}"),
                ));
            }
            tracing::debug!(chain = current.id, successor, %error, "forward failed; retrying");
            tokio::time::sleep(Duration::from_millis((20u64 << attempt.min(4)).min(300))).await;
            attempt += 1;
            routing = self
                .routing
                .refresh_after(routing.version())
                .await
                .unwrap_or_else(|_| self.routing.current());
            current = routing.chain(chain.id).cloned().ok_or_else(|| {
                fault(
                    fault::STALE_CHAIN,
                    format!("chain {} disappeared", chain.id),
                )
            })?;
        }
    }

    async fn read(self: &Arc<Self>, request: Request) -> Result<Reply, Fault> {
        let header = ReadRequest::decode(&request.header[..])
            .map_err(|e| bad(format!("read header: {e}")))?;
        let id = chunk_id(header.chunk)?;
        let target = self.target(header.target_id)?.clone();
        self.check_isolation()?;
        let (_routing, chain) = self.chain_at(header.chain_id, header.chain_version).await?;
        let serving = chain
            .targets
            .iter()
            .any(|t| t.target_id == target.id && t.state == PublicState::Serving as i32);
        if !serving {
            return Err(fault(
                fault::NOT_SERVING,
                format!("target {} does not serve reads now", target.id),
            ));
        }
        match target.engine.read(id, header.offset, header.length).await {
            Ok(outcome) if outcome.pending.is_some() => Err(fault(
                fault::PENDING,
                format!("chunk {id} has a write in progress here; read another replica"),
            )),
            Ok(outcome) => {
                self.metrics
                    .bytes
                    .with_label_values(&["read"])
                    .inc_by(outcome.data.len() as u64);
                Ok(Reply {
                    header: ReadReply {
                        version: outcome.version,
                        chunk_length: outcome.length,
                    }
                    .encode_to_vec()
                    .into(),
                    payload: outcome.data.into(),
                })
            }
            Err(error) => Err(self.engine_fault_repairing(&target, chain.id, id, error)),
        }
    }

    fn dump_meta(&self, request: &Request) -> Result<Reply, Fault> {
        let header = DumpMetaRequest::decode(&request.header[..])
            .map_err(|e| bad(format!("dump header: {e}")))?;
        let target = self.target(header.target_id)?;
        let limit = match header.limit as usize {
            0 => DUMP_PAGE,
            n => n.min(DUMP_PAGE),
        };
        let after = header.after.map(|c| ChunkId {
            inode: c.inode,
            index: c.index,
        });
        // One more than asked tells whether more follow.
        let mut page = target
            .engine
            .list_after(after, limit + 1)
            .map_err(engine_fault)?;
        let more = page.len() > limit;
        page.truncate(limit);
        let chunks = page
            .into_iter()
            .map(|(id, meta)| ChunkMetaEntry {
                chunk: Some(wire_chunk(id)),
                committed_version: meta.committed.as_ref().map_or(0, |c| c.version),
                pending_version: meta.pending.as_ref().map_or(0, |p| p.version),
                length: meta.committed.as_ref().map_or(0, |c| c.length),
                crc32c: meta.committed.as_ref().map_or(0, |c| c.crc32c),
            })
            .collect();
        Ok(Reply {
            header: DumpMetaReply { chunks, more }.encode_to_vec().into(),
            payload: Bytes::new(),
        })
    }

    fn sync_done(&self, request: &Request) -> Result<Reply, Fault> {
        let header = SyncDoneRequest::decode(&request.header[..])
            .map_err(|e| bad(format!("sync-done header: {e}")))?;
        let target = self.target(header.target_id)?;
        if target.phase() == Phase::Recovering {
            target.set_phase(Phase::UpToDate);
            tracing::info!(
                target = target.id,
                chain = header.chain_id,
                "recovery complete; up to date"
            );
        }
        Ok(Reply {
            header: SyncDoneReply {}.encode_to_vec().into(),
            payload: Bytes::new(),
        })
    }
}

fn write_reply(version: u64, length: u32, crc32c: u32) -> Reply {
    Reply {
        header: WriteReply {
            version,
            length,
            crc32c,
        }
        .encode_to_vec()
        .into(),
        payload: Bytes::new(),
    }
}

/// The ff-net handler of a storage service.
pub struct StorageHandler(pub Arc<Storage>);

impl Handler for StorageHandler {
    async fn handle(&self, request: Request) -> Result<Reply, Fault> {
        let started = Instant::now();
        let (op, result) = match request.method {
            method::WRITE => ("write", self.0.write(request).await),
            method::READ => ("read", self.0.read(request).await),
            method::DUMP_META => ("dump_meta", self.0.dump_meta(&request)),
            method::SYNC_DONE => ("sync_done", self.0.sync_done(&request)),
            other => return Err(bad(format!("unknown method {other}"))),
        };
        self.0.metrics.requests.observe(op, started, result.is_ok());
        result
    }
}
