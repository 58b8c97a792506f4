//! Peer transport: raft messages between members over the `RaftPeer` gRPC service.
//!
//! Sending: one task per peer drains a bounded queue into batch RPCs, one batch in flight at a
//! time, so a burst of proposals becomes a few large batches. A failed batch is dropped (raft
//! retransmits what matters), the peer is reported unreachable to raft, and the task backs off
//! before trying again. A full queue drops the message and reports the peer unreachable rather
//! than block the raft loop. Snapshot messages leave the queue: their file is streamed in chunks
//! by a separate task, and the outcome is reported to raft.
//!
//! Receiving ([`PeerService`]): batches are checked (cluster name, addressee, every message
//! decodes and is well formed) before any message reaches raft; a bad batch is refused whole
//! with `INVALID_ARGUMENT` and nothing in it is stepped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::io::AsyncReadExt;
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::config::TransportConfig;
use crate::metrics::RaftMetrics;
use crate::proto::raft_peer_client::RaftPeerClient;
use crate::proto::raft_peer_server::RaftPeer;
use crate::proto::{MessageBatch, SendReply, SnapshotChunk, SnapshotDescriptor, SnapshotHeader};

/// What the transport tells the raft loop.
#[derive(Debug)]
pub(crate) enum PeerEvent {
    /// Messages received from a peer, already validated.
    Messages(Vec<Message>),
    /// A peer could not be reached.
    Unreachable(u64),
    /// A snapshot transfer to a peer finished (true) or failed (false).
    SnapshotStatus(u64, bool),
}

/// Capacity of the channel from the transport (and snapshot generation) to the raft loop.
pub(crate) const EVENT_QUEUE_CAPACITY: usize = 1024;

struct PeerLink {
    addr: String,
    queue: mpsc::Sender<Message>,
}

/// The sending side of the transport.
pub(crate) struct Transport {
    id: u64,
    cluster: String,
    self_addr: String,
    config: TransportConfig,
    chunk_size: usize,
    snapshot_dir: PathBuf,
    events: mpsc::Sender<PeerEvent>,
    metrics: RaftMetrics,
    addresses: Mutex<HashMap<u64, String>>,
    links: Mutex<HashMap<u64, PeerLink>>,
    snapshots_in_flight: Arc<Mutex<HashSet<u64>>>,
}

impl Transport {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        cluster: String,
        self_addr: String,
        config: TransportConfig,
        chunk_size: usize,
        snapshot_dir: PathBuf,
        events: mpsc::Sender<PeerEvent>,
        metrics: RaftMetrics,
    ) -> Self {
        Transport {
            id,
            cluster,
            self_addr,
            config,
            chunk_size,
            snapshot_dir,
            events,
            metrics,
            addresses: Mutex::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            snapshots_in_flight: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        // Every critical section here is a map insert or lookup; a poisoned map is still whole.
        mutex.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the address book with the group's members (ids learned from incoming batches
    /// are kept until the membership says otherwise).
    pub(crate) fn set_members(&self, members: &BTreeMap<u64, String>) {
        let mut addresses = Self::lock(&self.addresses);
        for (id, addr) in members {
            addresses.insert(*id, addr.clone());
        }
        let mut links = Self::lock(&self.links);
        // A link whose peer moved is rebuilt on the next send.
        links.retain(|id, link| addresses.get(id).is_some_and(|addr| *addr == link.addr));
    }

    /// Records the address of a peer that contacted us, if none is known.
    pub(crate) fn learn(&self, id: u64, addr: &str) {
        if id == self.id || addr.is_empty() {
            return;
        }
        Self::lock(&self.addresses)
            .entry(id)
            .or_insert_with(|| addr.to_string());
    }

    /// The address of a peer, if known.
    pub(crate) fn address_of(&self, id: u64) -> Option<String> {
        Self::lock(&self.addresses).get(&id).cloned()
    }

    /// Hands messages to their peers' queues; never blocks.
    pub(crate) fn send(&self, messages: Vec<Message>) {
        for message in messages {
            let to = message.to;
            self.metrics.messages_sent.inc();
            if message.get_msg_type() == MessageType::MsgSnapshot {
                self.send_snapshot(message);
                continue;
            }
            let queue = match self.link(to) {
                Some(queue) => queue,
                None => {
                    self.metrics.messages_dropped.inc();
                    self.report(PeerEvent::Unreachable(to));
                    continue;
                }
            };
            if queue.try_send(message).is_err() {
                self.metrics.messages_dropped.inc();
                self.report(PeerEvent::Unreachable(to));
            }
        }
    }

    fn report(&self, event: PeerEvent) {
        // If the loop's queue is full it is busy with other events; raft finds out anyway.
        let _ = self.events.try_send(event);
    }

    /// raft-rs keeps a peer in snapshot state until told the outcome, so this report must not
    /// be dropped on a full queue the way an unreachable report may.
    fn report_snapshot_failure(&self, to: u64) {
        let events = self.events.clone();
        tokio::spawn(async move {
            let _ = events.send(PeerEvent::SnapshotStatus(to, false)).await;
        });
    }

    fn link(&self, to: u64) -> Option<mpsc::Sender<Message>> {
        let mut links = Self::lock(&self.links);
        if let Some(link) = links.get(&to)
            && !link.queue.is_closed()
        {
            return Some(link.queue.clone());
        }
        let addr = self.address_of(to)?;
        let channel = ff_rpc::channel(&addr, &self.rpc_options()).ok()?;
        let (queue, receiver) = mpsc::channel(self.config.queue_capacity);
        let sender = BatchSender {
            from: self.id,
            to,
            cluster: self.cluster.clone(),
            self_addr: self.self_addr.clone(),
            addr: addr.clone(),
            client: RaftPeerClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
            config: self.config.clone(),
            events: self.events.clone(),
            metrics: self.metrics.clone(),
        };
        tokio::spawn(sender.run(receiver));
        links.insert(
            to,
            PeerLink {
                addr,
                queue: queue.clone(),
            },
        );
        Some(queue)
    }

    fn rpc_options(&self) -> ff_rpc::ClientOptions {
        ff_rpc::ClientOptions {
            connect_timeout: self.config.connect_timeout.get(),
            request_timeout: self.config.request_timeout.get(),
            ..ff_rpc::ClientOptions::default()
        }
    }

    fn send_snapshot(&self, message: Message) {
        let to = message.to;
        let Some(addr) = self.address_of(to) else {
            self.report_snapshot_failure(to);
            return;
        };
        if !Self::lock(&self.snapshots_in_flight).insert(to) {
            // raft-rs sends one snapshot per peer at a time; a duplicate is refused.
            self.report_snapshot_failure(to);
            return;
        }
        let options = ff_rpc::ClientOptions {
            request_timeout: self.config.snapshot_timeout.get(),
            ..self.rpc_options()
        };
        let transfer = SnapshotTransfer {
            header: SnapshotHeader {
                cluster: self.cluster.clone(),
                from: self.id,
                from_addr: self.self_addr.clone(),
                to,
                ..SnapshotHeader::default()
            },
            addr,
            options,
            chunk_size: self.chunk_size,
            dir: self.snapshot_dir.clone(),
            timeout: self.config.snapshot_timeout.get(),
        };
        let events = self.events.clone();
        let in_flight = self.snapshots_in_flight.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let result = transfer.run(message).await;
            let ok = match result {
                Ok(()) => {
                    metrics.snapshots_sent.with_label_values(&["ok"]).inc();
                    true
                }
                Err(error) => {
                    metrics.snapshots_sent.with_label_values(&["failed"]).inc();
                    tracing::warn!(peer = to, %error, "snapshot transfer failed");
                    false
                }
            };
            Self::lock(&in_flight).remove(&to);
            let _ = events.send(PeerEvent::SnapshotStatus(to, ok)).await;
        });
    }
}

/// The task that owns one peer's queue.
struct BatchSender {
    from: u64,
    to: u64,
    cluster: String,
    self_addr: String,
    addr: String,
    client: RaftPeerClient<Channel>,
    config: TransportConfig,
    events: mpsc::Sender<PeerEvent>,
    metrics: RaftMetrics,
}

impl BatchSender {
    async fn run(mut self, mut queue: mpsc::Receiver<Message>) {
        let initial_backoff = Duration::from_millis(10);
        let mut backoff = initial_backoff;
        let mut reachable = true;
        let max_bytes = self.config.max_batch_size.bytes() as usize;
        while let Some(first) = queue.recv().await {
            let mut messages = Vec::new();
            let mut bytes = 0usize;
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message.write_to_bytes() {
                    Ok(encoded) => {
                        bytes += encoded.len();
                        messages.push(encoded);
                    }
                    Err(error) => tracing::error!(%error, "cannot encode raft message; dropped"),
                }
                if messages.len() < self.config.max_batch_messages && bytes < max_bytes {
                    next = queue.try_recv().ok();
                }
            }
            if messages.is_empty() {
                continue;
            }
            let batch = MessageBatch {
                cluster: self.cluster.clone(),
                from: self.from,
                from_addr: self.self_addr.clone(),
                to: self.to,
                messages,
            };
            let result =
                tokio::time::timeout(self.config.request_timeout.get(), self.client.send(batch))
                    .await;
            let error = match result {
                Ok(Ok(_)) => {
                    if !reachable {
                        tracing::info!(peer = self.to, addr = %self.addr, "peer reachable again");
                        reachable = true;
                    }
                    backoff = initial_backoff;
                    continue;
                }
                Ok(Err(status)) => format!("{}: {}", status.code(), status.message()),
                Err(_) => "timed out".to_string(),
            };
            self.metrics.peer_send_failures.inc();
            if reachable {
                tracing::warn!(peer = self.to, addr = %self.addr, %error, "cannot deliver raft messages");
                reachable = false;
            }
            let _ = self.events.try_send(PeerEvent::Unreachable(self.to));
            // What queued up while the peer was down is stale; raft will resend what it needs.
            while queue.try_recv().is_ok() {
                self.metrics.messages_dropped.inc();
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.max_backoff.get());
        }
    }
}

/// One snapshot file streamed to one peer.
struct SnapshotTransfer {
    header: SnapshotHeader,
    addr: String,
    options: ff_rpc::ClientOptions,
    chunk_size: usize,
    dir: PathBuf,
    timeout: Duration,
}

impl SnapshotTransfer {
    async fn run(mut self, mut message: Message) -> Result<(), String> {
        let descriptor = SnapshotDescriptor::decode(message.get_snapshot().get_data())
            .map_err(|e| format!("bad snapshot descriptor: {e}"))?;
        let path = self.dir.join(&descriptor.file);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        message.mut_snapshot().data = Default::default();
        self.header.message = message
            .write_to_bytes()
            .map_err(|e| format!("encode snapshot message: {e}"))?;
        self.header.size = descriptor.size;
        self.header.crc32c = descriptor.crc32c;
        let channel = ff_rpc::channel(&self.addr, &self.options).map_err(|e| e.to_string())?;
        let mut client = RaftPeerClient::new(channel);
        // The stream reads the file as the peer consumes it; at most a couple of chunks are
        // buffered in memory.
        let (chunks, receiver) = mpsc::channel::<SnapshotChunk>(2);
        let header = self.header;
        let chunk_size = self.chunk_size;
        let reader = tokio::spawn(async move {
            let mut first = Some(header);
            let mut sent = 0u64;
            loop {
                let mut buf = vec![0u8; chunk_size];
                let mut filled = 0;
                while filled < buf.len() {
                    let n = file
                        .read(&mut buf[filled..])
                        .await
                        .map_err(|e| e.to_string())?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buf.truncate(filled);
                if filled == 0 && first.is_none() {
                    return Ok::<u64, String>(sent);
                }
                sent += filled as u64;
                let chunk = SnapshotChunk {
                    header: first.take(),
                    data: buf,
                };
                if chunks.send(chunk).await.is_err() {
                    return Err("peer stopped reading".to_string());
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
        let outcome = tokio::time::timeout(self.timeout, client.send_snapshot(stream)).await;
        let read = reader.await.map_err(|e| e.to_string())?;
        match outcome {
            Ok(Ok(_)) => {
                let sent = read?;
                if sent != descriptor.size {
                    return Err(format!("sent {sent} bytes of {}", descriptor.size));
                }
                Ok(())
            }
            Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
            Err(_) => Err(format!("not finished within {:?}", self.timeout)),
        }
    }
}

/// The receiving side: the `RaftPeer` gRPC service.
pub struct PeerService {
    id: u64,
    cluster: String,
    transport: Arc<Transport>,
    events: mpsc::Sender<PeerEvent>,
    snapshot_dir: PathBuf,
    metrics: RaftMetrics,
    /// One incoming snapshot at a time bounds the disk and memory they use.
    receiving: Semaphore,
}

impl PeerService {
    pub(crate) fn new(
        id: u64,
        cluster: String,
        transport: Arc<Transport>,
        events: mpsc::Sender<PeerEvent>,
        snapshot_dir: PathBuf,
        metrics: RaftMetrics,
    ) -> Self {
        PeerService {
            id,
            cluster,
            transport,
            events,
            snapshot_dir,
            metrics,
            receiving: Semaphore::new(1),
        }
    }

    fn check_envelope(&self, cluster: &str, to: u64, from: u64) -> Result<(), Status> {
        if cluster != self.cluster {
            return Err(Status::permission_denied(format!(
                "message for cluster {cluster:?} reached a node of cluster {:?}",
                self.cluster
            )));
        }
        if to != self.id {
            return Err(Status::invalid_argument(format!(
                "message for node {to} reached node {}",
                self.id
            )));
        }
        if from == 0 || from == self.id {
            return Err(Status::invalid_argument(format!(
                "invalid sender id {from}"
            )));
        }
        Ok(())
    }

    async fn deliver(&self, messages: Vec<Message>) -> Result<(), Status> {
        self.metrics.messages_received.inc_by(messages.len() as u64);
        self.events
            .send(PeerEvent::Messages(messages))
            .await
            .map_err(|_| Status::unavailable("raft node is stopped"))
    }
}

/// Decodes one raft message and checks what raft-rs would otherwise panic on.
pub(crate) fn decode_message(bytes: &[u8], from: u64, to: u64) -> Result<Message, String> {
    let message = Message::parse_from_bytes(bytes).map_err(|e| format!("does not decode: {e}"))?;
    if message.from != from || message.to != to {
        return Err(format!(
            "claims to be from {} to {} inside a batch from {from} to {to}",
            message.from, message.to
        ));
    }
    match message.get_msg_type() {
        MessageType::MsgReadIndex | MessageType::MsgReadIndexResp if message.entries.len() != 1 => {
            Err("read-index message without exactly one entry".to_string())
        }
        // Local message types are never sent between nodes.
        MessageType::MsgHup
        | MessageType::MsgBeat
        | MessageType::MsgUnreachable
        | MessageType::MsgSnapStatus
        | MessageType::MsgCheckQuorum => {
            Err(format!("{:?} is a local message", message.get_msg_type()))
        }
        MessageType::MsgSnapshot => Err("snapshots travel through SendSnapshot".to_string()),
        MessageType::MsgAppend => {
            // raft-rs trusts the leader's append to be a contiguous run after `index`.
            let contiguous =
                message.entries.iter().enumerate().all(|(i, e)| {
                    e.index == message.index + 1 + i as u64 && e.term <= message.term
                });
            if !contiguous {
                Err("append whose entries do not follow its index or exceed its term".to_string())
            } else if message.index != 0 && message.log_term == 0 {
                Err("append with no term for its previous entry".to_string())
            } else {
                Ok(message)
            }
        }
        _ => Ok(message),
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotChunk, Status>> + Send>>;

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn send(&self, request: Request<MessageBatch>) -> Result<Response<SendReply>, Status> {
        let batch = request.into_inner();
        self.check_envelope(&batch.cluster, batch.to, batch.from)?;
        let mut messages = Vec::with_capacity(batch.messages.len());
        for (i, bytes) in batch.messages.iter().enumerate() {
            let message = decode_message(bytes, batch.from, batch.to).map_err(|reason| {
                Status::invalid_argument(format!(
                    "raft message {i} of batch from node {}: {reason}",
                    batch.from
                ))
            })?;
            messages.push(message);
        }
        self.transport.learn(batch.from, &batch.from_addr);
        self.deliver(messages).await?;
        Ok(Response::new(SendReply {}))
    }

    async fn send_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SendReply>, Status> {
        let _permit = self
            .receiving
            .try_acquire()
            .map_err(|_| Status::resource_exhausted("another snapshot is being received"))?;
        let mut stream: SnapshotStream = Box::pin(request.into_inner());
        let received = receive_snapshot(&mut stream, &self.snapshot_dir).await?;
        let header = received.header;
        self.check_envelope(&header.cluster, header.to, header.from)?;
        let mut message = Message::parse_from_bytes(&header.message).map_err(|e| {
            Status::invalid_argument(format!("snapshot message does not decode: {e}"))
        })?;
        if message.get_msg_type() != MessageType::MsgSnapshot
            || message.from != header.from
            || message.to != header.to
            || message.get_snapshot().get_metadata().index == 0
        {
            let _ = std::fs::remove_file(self.snapshot_dir.join(&received.file));
            return Err(Status::invalid_argument(
                "snapshot header carries no valid MsgSnapshot",
            ));
        }
        let descriptor = SnapshotDescriptor {
            file: received.file,
            size: header.size,
            crc32c: header.crc32c,
        };
        message.mut_snapshot().data = descriptor.encode_to_vec().into();
        self.transport.learn(header.from, &header.from_addr);
        self.metrics.snapshots_received.inc();
        self.deliver(vec![message]).await?;
        Ok(Response::new(SendReply {}))
    }
}

struct ReceivedSnapshot {
    header: SnapshotHeader,
    file: String,
}

/// Writes an incoming snapshot stream to a file, checking its size and checksum.
async fn receive_snapshot(
    stream: &mut SnapshotStream,
    dir: &std::path::Path,
) -> Result<ReceivedSnapshot, Status> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;

    let first = stream
        .next()
        .await
        .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
    let header = first
        .header
        .clone()
        .ok_or_else(|| Status::invalid_argument("first snapshot chunk has no header"))?;
    if header.size < crate::snapshot::MIN_FILE_SIZE {
        return Err(Status::invalid_argument(format!(
            "snapshot of {} bytes is smaller than any snapshot file",
            header.size
        )));
    }
    let name = format!("recv-{}-{}.snap", header.from, rand::random::<u64>());
    let tmp = dir.join(format!("{name}.tmp"));
    let internal =
        |what: &str, e: std::io::Error| Status::internal(format!("{what} {}: {e}", tmp.display()));
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| internal("create", e))?;
    let result: Result<(), Status> = async {
        let mut crc = 0u32;
        let mut size = 0u64;
        let mut chunk = Some(first);
        while let Some(current) = chunk.take() {
            size += current.data.len() as u64;
            if size > header.size {
                return Err(Status::invalid_argument(format!(
                    "snapshot stream exceeds its declared {} bytes",
                    header.size
                )));
            }
            crc = crc32c::crc32c_append(crc, &current.data);
            file.write_all(&current.data)
                .await
                .map_err(|e| internal("write", e))?;
            chunk = stream.next().await.transpose()?;
        }
        if size != header.size || crc != header.crc32c {
            return Err(Status::data_loss(format!(
                "snapshot stream ended at {size} of {} bytes or fails its checksum",
                header.size
            )));
        }
        file.sync_all().await.map_err(|e| internal("fsync", e))?;
        Ok(())
    }
    .await;
    if let Err(status) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(status);
    }
    tokio::fs::rename(&tmp, dir.join(&name))
        .await
        .map_err(|e| internal("rename", e))?;
    Ok(ReceivedSnapshot { header, file: name })
}
