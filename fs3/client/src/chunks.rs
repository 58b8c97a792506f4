//! Reading and writing chunks on CRAQ chains: writes go to the chain's head and return once the
//! whole chain has committed them; reads go to any serving replica. Every request carries the
//! chain version the client routed with; a stale one makes the client refresh its routing and
//! retry (writes keep their write id, so a retried write is recognised, not applied twice).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ff_net::{Call, NetClient, NetError, Transport};
use fs3_proto::storage::{
    ChunkId, ChunkMetaEntry, DumpMetaReply, DumpMetaRequest, ReadReply, ReadRequest, UpdateKind,
    WriteReply, WriteRequest, fault, method,
};
use prost::Message as _;
use tokio::time::Instant;

use crate::ClientError;
use crate::routing::{Routing, RoutingCache, readable, write_path};

/// A change to a chunk.
#[derive(Debug, Clone)]
pub struct ChunkUpdate {
    /// What kind of change.
    pub kind: UpdateKind,
    /// Where a write starts.
    pub offset: u32,
    /// The new length (truncate).
    pub length: u32,
    /// The bytes (write, replace).
    pub data: Bytes,
}

impl ChunkUpdate {
    /// Write `data` at `offset`.
    pub fn write(offset: u32, data: Bytes) -> Self {
        ChunkUpdate {
            kind: UpdateKind::Write,
            offset,
            length: data.len() as u32,
            data,
        }
    }

    /// Replace the whole content with `data`.
    pub fn replace(data: Bytes) -> Self {
        ChunkUpdate {
            kind: UpdateKind::Replace,
            offset: 0,
            length: data.len() as u32,
            data,
        }
    }

    /// Cut or zero-extend to `length`.
    pub fn truncate(length: u32) -> Self {
        ChunkUpdate {
            kind: UpdateKind::Truncate,
            offset: 0,
            length,
            data: Bytes::new(),
        }
    }

    /// Remove the chunk.
    pub fn remove() -> Self {
        ChunkUpdate {
            kind: UpdateKind::Remove,
            offset: 0,
            length: 0,
            data: Bytes::new(),
        }
    }
}

/// What a read returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkData {
    /// The committed version read.
    pub version: u64,
    /// The chunk's length.
    pub chunk_length: u32,
    /// The bytes read (short at the end of the chunk).
    pub data: Vec<u8>,
}

/// Reads and writes chunks.
pub struct ChunkClient {
    routing: Arc<RoutingCache>,
    net: Arc<NetClient>,
    deadline: Duration,
}

impl std::fmt::Debug for ChunkClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkClient").finish_non_exhaustive()
    }
}

/// What to do after a failed attempt.
enum Next {
    Retry,
    Fail(ClientError),
}

fn classify(error: NetError) -> (Next, String) {
    let text = error.to_string();
    let next = match error {
        NetError::Remote { code, message } => match code {
            fault::STALE_CHAIN
            | fault::NOT_SERVING
            | fault::UNKNOWN_TARGET
            | fault::CHAIN_UNAVAILABLE
            | fault::PENDING
            | fault::CORRUPT => Next::Retry,
            fault::NOT_FOUND => Next::Fail(ClientError::NotFound(message)),
            fault::NO_SPACE => Next::Fail(ClientError::NoSpace(message)),
            fault::BAD_REQUEST => Next::Fail(ClientError::BadRequest(message)),
            _ => Next::Fail(ClientError::Storage(message)),
        },
        NetError::Protocol(message) => Next::Fail(ClientError::Protocol(message)),
        // Unreachable, lost or slow: the chain may be changing; retry after a refresh.
        _ => Next::Retry,
    };
    (next, text)
}

impl ChunkClient {
    /// A client routing through `routing`, talking ff-net through `net`; each operation gives
    /// up after `deadline` of retries.
    pub fn new(routing: Arc<RoutingCache>, net: Arc<NetClient>, deadline: Duration) -> Self {
        ChunkClient {
            routing,
            net,
            deadline,
        }
    }

    /// The routing cache.
    pub fn routing(&self) -> &Arc<RoutingCache> {
        &self.routing
    }

    /// The routing, refreshed first if it does not know chain `chain_id`.
    async fn routing_with(&self, chain_id: u64) -> Result<Arc<Routing>, ClientError> {
        let routing = self.routing.current();
        if routing.chain(chain_id).is_some() {
            return Ok(routing);
        }
        self.routing.refresh_after(routing.version()).await
    }

    /// After a round in which no replica served: fails with `last` past the deadline, else
    /// refreshes the routing seen and backs off (bounded, growing) before the next round.
    async fn next_round(
        &self,
        seen: &Routing,
        deadline: Instant,
        attempt: &mut u32,
        last: &str,
    ) -> Result<(), ClientError> {
        if Instant::now() >= deadline {
            return Err(ClientError::Unavailable(last.to_string()));
        }
        let _ = self.routing.refresh_after(seen.version()).await;
        let millis = (20u64 << (*attempt).min(5)).min(500);
        tokio::time::sleep(Duration::from_millis(millis)).await;
        *attempt += 1;
        Ok(())
    }

    /// Applies `update` to `chunk` on chain `chain_id`; returns once every replica committed.
    pub async fn write(
        &self,
        chain_id: u64,
        chunk: ChunkId,
        update: ChunkUpdate,
    ) -> Result<WriteReply, ClientError> {
        let write_id: u64 = rand::random_range(1..u64::MAX);
        let deadline = Instant::now() + self.deadline;
        let mut attempt = 0;
        loop {
            let routing = self.routing_with(chain_id).await?;
            let chain = routing.chain(chain_id).ok_or_else(|| {
                ClientError::BadRequest(format!("chain {chain_id} does not exist"))
            })?;
            let head = write_path(chain).first().copied();
            let target = head.and_then(|h| routing.target_addr(h).map(|a| (h, a.to_string())));
            let last = match target {
                Some((head, addr)) => {
                    let header = WriteRequest {
                        chain_id,
                        chain_version: chain.version,
                        target_id: head,
                        chunk: Some(chunk),
                        kind: update.kind as i32,
                        offset: update.offset,
                        length: update.length,
                        write_id,
                        version: 0,
                        sync: false,
                    };
                    let call = Call {
                        method: method::WRITE,
                        header: header.encode_to_vec().into(),
                        payload: update.data.clone(),
                    };
                    match self.net.call(&addr, call).await {
                        Ok(reply) => {
                            return WriteReply::decode(&reply.header[..])
                                .map_err(|e| ClientError::Protocol(format!("write reply: {e}")));
                        }
                        Err(error) => {
                            let (next, text) = classify(error);
                            if let Next::Fail(error) = next {
                                return Err(error);
                            }
                            format!("head {head} at {addr}: {text}")
                        }
                    }
                }
                None => format!("chain {chain_id} has no writable target"),
            };
            self.next_round(&routing, deadline, &mut attempt, &last)
                .await?;
        }
    }

    /// Reads `[offset, offset + length)` of `chunk` from a serving replica of chain `chain_id`.
    pub async fn read(
        &self,
        chain_id: u64,
        chunk: ChunkId,
        offset: u32,
        length: u32,
    ) -> Result<ChunkData, ClientError> {
        let deadline = Instant::now() + self.deadline;
        let mut attempt = 0;
        let mut last = String::from("no attempt made");
        loop {
            let routing = self.routing_with(chain_id).await?;
            let chain = routing.chain(chain_id).ok_or_else(|| {
                ClientError::BadRequest(format!("chain {chain_id} does not exist"))
            })?;
            let mut replicas = readable(chain);
            // Spread reads over the replicas.
            if !replicas.is_empty() {
                let start = rand::random_range(0..replicas.len());
                replicas.rotate_left(start);
            }
            for target in replicas {
                let Some(addr) = routing.target_addr(target) else {
                    continue;
                };
                match self
                    .read_once(addr, chain_id, chain.version, target, chunk, offset, length)
                    .await
                {
                    Ok(data) => return Ok(data),
                    Err(error) => {
                        let (next, text) = classify(error);
                        if let Next::Fail(error) = next {
                            return Err(error);
                        }
                        last = format!("target {target} at {addr}: {text}");
                    }
                }
            }
            self.next_round(&routing, deadline, &mut attempt, &last)
                .await?;
        }
    }

    /// Reads from replica `target` only, without retrying elsewhere: for checking one copy
    /// (scrubbing, tests). A bad checksum there is [`ClientError::Corrupt`].
    pub async fn read_replica(
        &self,
        chain_id: u64,
        target: u64,
        chunk: ChunkId,
        offset: u32,
        length: u32,
    ) -> Result<ChunkData, ClientError> {
        let routing = self.routing.refresh().await?;
        let chain = routing
            .chain(chain_id)
            .ok_or_else(|| ClientError::BadRequest(format!("chain {chain_id} does not exist")))?;
        let addr = routing
            .target_addr(target)
            .ok_or_else(|| ClientError::BadRequest(format!("target {target} is unknown")))?;
        self.read_once(addr, chain_id, chain.version, target, chunk, offset, length)
            .await
            .map_err(|error| match error {
                NetError::Remote { code, message } => match code {
                    fault::CORRUPT => ClientError::Corrupt(message),
                    fault::NOT_FOUND => ClientError::NotFound(message),
                    fault::BAD_REQUEST => ClientError::BadRequest(message),
                    _ => ClientError::Storage(message),
                },
                other => ClientError::Unavailable(other.to_string()),
            })
    }

    #[allow(clippy::too_many_arguments)] // one read request's fields
    async fn read_once(
        &self,
        addr: &str,
        chain_id: u64,
        chain_version: u64,
        target: u64,
        chunk: ChunkId,
        offset: u32,
        length: u32,
    ) -> Result<ChunkData, NetError> {
        let header = ReadRequest {
            chain_id,
            chain_version,
            target_id: target,
            chunk: Some(chunk),
            offset,
            length,
        };
        let call = Call {
            method: method::READ,
            header: header.encode_to_vec().into(),
            payload: Bytes::new(),
        };
        let reply = self.net.call(addr, call).await?;
        let meta = ReadReply::decode(&reply.header[..])
            .map_err(|e| NetError::Protocol(format!("read reply: {e}")))?;
        Ok(ChunkData {
            version: meta.version,
            chunk_length: meta.chunk_length,
            data: reply.payload.into_vec(),
        })
    }

    /// The chunks stored on `target` (for comparing replicas), fetched page by page.
    pub async fn dump_meta(&self, target: u64) -> Result<Vec<ChunkMetaEntry>, ClientError> {
        let routing = self.routing.refresh().await?;
        let addr = routing
            .target_addr(target)
            .ok_or_else(|| ClientError::BadRequest(format!("target {target} is unknown")))?;
        let mut chunks = Vec::new();
        let mut after = None;
        loop {
            let call = Call {
                method: method::DUMP_META,
                header: DumpMetaRequest {
                    target_id: target,
                    after,
                    limit: 0,
                }
                .encode_to_vec()
                .into(),
                payload: Bytes::new(),
            };
            let reply = self
                .net
                .call(addr, call)
                .await
                .map_err(|e| ClientError::Unavailable(e.to_string()))?;
            let page = DumpMetaReply::decode(&reply.header[..])
                .map_err(|e| ClientError::Protocol(format!("dump reply: {e}")))?;
            after = page.chunks.last().and_then(|c| c.chunk);
            chunks.extend(page.chunks);
            if !page.more || after.is_none() {
                return Ok(chunks);
            }
        }
    }
}
