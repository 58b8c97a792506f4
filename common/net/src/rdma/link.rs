//! A link: one connected reliable queue pair, set up over a TCP connection (both sides send
//! their endpoint, post their receives, connect, then say ready) that stays open beside it so a
//! vanished peer is noticed at once. A task per link waits on the completion queue and hands each
//! completion to whoever posted the request; receives arrive on a bounded channel.
//!
//! Memory posted in a work request belongs to the link until the request completes: the caller
//! gets it back with the result. So no buffer is reused, read or freed while the device may still
//! touch it, and every registration is released (dropped or returned) whatever happens. The
//! queue pair is destroyed before that memory is freed (field order in `Shared`).

#![allow(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

use super::verbs::{
    Completion, CompletionKind, CompletionQueue, Endpoint, ProtectionDomain, QueuePair, RdmaError,
    RegisteredMemory, SendOp,
};

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Setting the link up failed.
    #[error("rdma handshake with {peer}: {reason}")]
    Handshake {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The link is broken (peer gone, a request failed); it must be replaced.
    #[error("rdma link to {peer} broken: {reason}")]
    Broken {
        /// The peer.
        peer: String,
        /// The first failure seen.
        reason: String,
    },
    /// A verbs call failed.
    #[error(transparent)]
    Verbs(#[from] RdmaError),
}

/// A buffer of the peer's that this side may read or write (its address and key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteBuf {
    /// Address in the peer's memory.
    pub addr: u64,
    /// The peer's key for it.
    pub rkey: u32,
    /// Its length.
    pub len: u32,
}

impl RemoteBuf {
    /// Its encoding in a message: addr, rkey, len (big-endian).
    pub const ENCODED_LEN: usize = 16;

    /// No buffer (length 0).
    pub const NONE: RemoteBuf = RemoteBuf {
        addr: 0,
        rkey: 0,
        len: 0,
    };

    /// The remote view of `memory`'s first `len` bytes.
    pub fn of(memory: &RegisteredMemory, len: usize) -> RemoteBuf {
        RemoteBuf {
            addr: memory.addr(),
            rkey: memory.rkey(),
            len: u32::try_from(len.min(memory.len())).unwrap_or(u32::MAX),
        }
    }

    /// Encodes it into `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.addr.to_be_bytes());
        out.extend_from_slice(&self.rkey.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
    }

    /// Decodes one from the front of `bytes`.
    pub fn decode(bytes: &[u8]) -> Option<RemoteBuf> {
        let bytes = bytes.get(..Self::ENCODED_LEN)?;
        Some(RemoteBuf {
            addr: u64::from_be_bytes(bytes[..8].try_into().ok()?),
            rkey: u32::from_be_bytes(bytes[8..12].try_into().ok()?),
            len: u32::from_be_bytes(bytes[12..16].try_into().ok()?),
        })
    }
}

/// A request in flight: its memory, and who waits for it (receives have nobody: they go to the
/// link's receive channel).
struct Pending {
    memory: RegisteredMemory,
    waiter: Option<oneshot::Sender<Result<RegisteredMemory, String>>>,
}

/// What the link and its completion task share. The queue pair is declared first so it is
/// destroyed before the pending memory is freed.
struct Shared {
    qp: QueuePair,
    pending: Mutex<HashMap<u64, Pending>>,
    broken: Mutex<Option<String>>,
    closed: AtomicBool,
    /// Becomes true with `closed`: wakes the link's tasks (no timer polls for it).
    closing: watch::Sender<bool>,
    peer: String,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the link broken (keeping the first reason) and flushes every request.
    fn break_with(&self, reason: &str) {
        {
            let mut broken = self.broken.lock().unwrap_or_else(|p| p.into_inner());
            if broken.is_none() {
                tracing::debug!(peer = %self.peer, %reason, "rdma link broken");
                *broken = Some(reason.to_string());
            }
        }
        self.closed.store(true, Ordering::Release);
        self.closing.send_replace(true);
        self.qp.break_off();
    }

    fn broken_error(&self) -> LinkError {
        let reason = self
            .broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "closed".to_string());
        LinkError::Broken {
            peer: self.peer.clone(),
            reason,
        }
    }
}

/// A connected queue pair with its completion task and side channel.
pub struct Link {
    shared: Arc<Shared>,
    pd: Arc<ProtectionDomain>,
    /// Registered buffers for outgoing messages, this link's own (not the shared pool's: a
    /// message must never wait for memory that calls in flight hold).
    message_buffers: Mutex<Vec<RegisteredMemory>>,
    next_id: AtomicU64,
    received: tokio::sync::Mutex<mpsc::Receiver<(RegisteredMemory, usize)>>,
    recv_size: usize,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.shared.peer)
            .finish_non_exhaustive()
    }
}

/// Receive ids have the top bit set, so they never meet send-queue ids.
const RECV_BIT: u64 = 1 << 63;

impl Link {
    /// Sets up a link over the connected `stream`: `receives` buffers of `recv_size` bytes are
    /// posted (the most messages the peer may have in flight towards this side), and up to
    /// `sends` send-queue requests may be outstanding.
    pub async fn establish(
        mut stream: TcpStream,
        pd: &Arc<ProtectionDomain>,
        receives: u32,
        sends: u32,
        recv_size: usize,
    ) -> Result<Link, LinkError> {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        let failed = |reason: String| LinkError::Handshake {
            peer: peer.clone(),
            reason,
        };
        let cq = Arc::new(CompletionQueue::new(pd.device(), (receives + sends) * 2)?);
        let qp = QueuePair::new(pd, &cq, sends, receives)?;
        let shared = Arc::new(Shared {
            qp,
            pending: Mutex::new(HashMap::new()),
            broken: Mutex::new(None),
            closed: AtomicBool::new(false),
            closing: watch::channel(false).0,
            peer: peer.clone(),
        });
        let (deliver, received) = mpsc::channel(receives as usize);
        let link = Link {
            shared: shared.clone(),
            pd: pd.clone(),
            message_buffers: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            received: tokio::sync::Mutex::new(received),
            recv_size,
        };
        // Receives go up before the peer can send (it sends only after our "ready").
        for _ in 0..receives {
            link.post_receive(RegisteredMemory::new(pd, recv_size)?)?;
        }
        let mine = shared.qp.endpoint().encode();
        let mut theirs = [0; Endpoint::ENCODED_LEN];
        let exchange = async {
            stream.write_all(&mine).await?;
            stream.read_exact(&mut theirs).await?;
            Ok::<_, std::io::Error>(())
        };
        exchange.await.map_err(|e| failed(e.to_string()))?;
        shared.qp.connect(&Endpoint::decode(&theirs))?;
        let mut ready = [0u8; 1];
        let handshake = async {
            stream.write_all(b"R").await?;
            stream.read_exact(&mut ready).await?;
            Ok::<_, std::io::Error>(())
        };
        handshake.await.map_err(|e| failed(e.to_string()))?;
        if ready != *b"R" {
            return Err(failed("the peer sent no ready mark".to_string()));
        }
        tokio::spawn(complete(shared.clone(), cq, deliver));
        tokio::spawn(watch_side_channel(shared, stream));
        Ok(link)
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// Whether the link is broken (it then fails every operation).
    pub fn is_broken(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Breaks the link on purpose (its requests complete with errors).
    pub fn close(&self) {
        self.shared.break_with("closed by this side");
    }

    fn post_receive(&self, memory: RegisteredMemory) -> Result<(), LinkError> {
        let id = RECV_BIT | self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut pending = self.shared.pending();
        // Checked under the lock the completion task decides to exit under: a request posted
        // here is always seen (and flushed) by it.
        if self.is_broken() {
            return Err(self.shared.broken_error());
        }
        // SAFETY: the memory moves into `pending` before the request is posted, and leaves it
        // only when the request's completion arrives (or with the queue pair).
        unsafe {
            self.shared
                .qp
                .post_recv(id, &memory, 0, self.recv_size.min(memory.len()))?;
        }
        pending.insert(
            id,
            Pending {
                memory,
                waiter: None,
            },
        );
        Ok(())
    }

    /// Waits for the next message from the peer: its buffer and length. Give the buffer back
    /// with [`Link::repost`] once read, or the peer runs out of credit.
    pub async fn recv(&self) -> Result<(RegisteredMemory, usize), LinkError> {
        let mut received = self.received.lock().await;
        match received.recv().await {
            Some(message) => Ok(message),
            None => Err(self.shared.broken_error()),
        }
    }

    /// Posts a received buffer again for the next message.
    pub fn repost(&self, memory: RegisteredMemory) -> Result<(), LinkError> {
        if self.is_broken() {
            return Err(self.shared.broken_error());
        }
        self.post_receive(memory)
    }

    /// Runs one send-queue request on `memory[..len]` and returns the memory when it completes.
    async fn run(
        &self,
        op: SendOp,
        memory: RegisteredMemory,
        len: usize,
    ) -> Result<RegisteredMemory, LinkError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) & !RECV_BIT;
        let (waiter, done) = oneshot::channel();
        {
            let mut pending = self.shared.pending();
            // Under the lock, as in `post_receive`.
            if self.is_broken() {
                return Err(self.shared.broken_error());
            }
            // SAFETY: as in `post_receive`: the memory is the link's until completion.
            unsafe { self.shared.qp.post_send(id, op, &memory, 0, len)? };
            pending.insert(
                id,
                Pending {
                    memory,
                    waiter: Some(waiter),
                },
            );
        }
        match done.await {
            Ok(Ok(memory)) => Ok(memory),
            Ok(Err(_)) | Err(_) => Err(self.shared.broken_error()),
        }
    }

    /// Sends `bytes` (at most the receive size) as one message, from one of the link's own
    /// registered message buffers.
    pub async fn send_bytes(&self, bytes: &[u8]) -> Result<(), LinkError> {
        if bytes.len() > self.recv_size {
            return Err(LinkError::Broken {
                peer: self.shared.peer.clone(),
                reason: format!("a {} byte message is over {}", bytes.len(), self.recv_size),
            });
        }
        let idle = self
            .message_buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let mut buffer = match idle {
            Some(buffer) => buffer,
            None => RegisteredMemory::new(&self.pd, self.recv_size)?,
        };
        buffer.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
        let buffer = self.send(buffer, bytes.len()).await?;
        self.message_buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(buffer);
        Ok(())
    }

    /// Sends `memory[..len]` as one message into the peer's next posted receive.
    pub async fn send(
        &self,
        memory: RegisteredMemory,
        len: usize,
    ) -> Result<RegisteredMemory, LinkError> {
        self.run(SendOp::Send, memory, len).await
    }

    /// Writes `memory[..len]` into the peer's `remote` buffer (RDMA WRITE).
    pub async fn write(
        &self,
        memory: RegisteredMemory,
        len: usize,
        remote: RemoteBuf,
    ) -> Result<RegisteredMemory, LinkError> {
        self.one_sided(true, memory, len, remote).await
    }

    /// Reads `len` bytes of the peer's `remote` buffer into `memory` (RDMA READ).
    pub async fn read(
        &self,
        memory: RegisteredMemory,
        len: usize,
        remote: RemoteBuf,
    ) -> Result<RegisteredMemory, LinkError> {
        self.one_sided(false, memory, len, remote).await
    }

    /// An RDMA WRITE (`write`) or READ of `len` bytes between `memory` and `remote`.
    async fn one_sided(
        &self,
        write: bool,
        memory: RegisteredMemory,
        len: usize,
        remote: RemoteBuf,
    ) -> Result<RegisteredMemory, LinkError> {
        if len > remote.len as usize {
            return Err(LinkError::Broken {
                peer: self.shared.peer.clone(),
                reason: format!(
                    "{len} bytes do not fit the peer's {} byte buffer",
                    remote.len
                ),
            });
        }
        let (addr, rkey) = (remote.addr, remote.rkey);
        let op = if write {
            SendOp::Write { addr, rkey }
        } else {
            SendOp::Read { addr, rkey }
        };
        self.run(op, memory, len).await
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Flushes what is in flight; the completion task then frees it and the queue pair.
        self.shared.break_with("dropped");
    }
}

/// Hands every completion to its poster until the link breaks and nothing is left in flight.
async fn complete(
    shared: Arc<Shared>,
    cq: Arc<CompletionQueue>,
    deliver: mpsc::Sender<(RegisteredMemory, usize)>,
) {
    let mut batch: Vec<Completion> = Vec::with_capacity(64);
    let mut closing = shared.closing.subscribe();
    loop {
        let closed = {
            let pending = shared.pending();
            let closed = shared.closed.load(Ordering::Acquire);
            if closed && pending.is_empty() {
                break;
            }
            closed
        };
        batch.clear();
        // Once broken, every request left completes (flushed): only the queue is waited on.
        let polled = if closed {
            cq.poll(&mut batch).await
        } else {
            tokio::select! {
                polled = cq.poll(&mut batch) => polled,
                _ = closing.wait_for(|closed| *closed) => continue,
            }
        };
        match polled {
            Ok(()) => {}
            Err(error) => {
                // Without completions nothing more can be learnt: every waiter is told. The
                // memory stays in `shared`, freed only after the queue pair is destroyed.
                shared.break_with(&error.to_string());
                for pending in shared.pending().values_mut() {
                    if let Some(waiter) = pending.waiter.take() {
                        let _ = waiter.send(Err(error.to_string()));
                    }
                }
                break;
            }
        }
        for completion in batch.drain(..) {
            let Some(pending) = shared.pending().remove(&completion.wr_id) else {
                continue;
            };
            if let Some(error) = &completion.error {
                shared.break_with(&format!("a work request failed: {error}"));
                if let Some(waiter) = pending.waiter {
                    let _ = waiter.send(Err(error.clone()));
                }
                continue;
            }
            match (completion.kind, pending.waiter) {
                (CompletionKind::Recv, _) => {
                    let len = completion.byte_len as usize;
                    // The channel holds as many messages as receives are posted: never full.
                    if deliver.try_send((pending.memory, len)).is_err() {
                        shared.break_with("received a message nobody reads");
                    }
                }
                (_, Some(waiter)) => {
                    let _ = waiter.send(Ok(pending.memory));
                }
                (_, None) => {}
            }
        }
    }
    drop(deliver);
}

/// Breaks the link when the TCP connection beside it closes (the peer is gone) or the link is
/// closed here (then the connection is closed, telling the peer).
async fn watch_side_channel(shared: Arc<Shared>, mut stream: TcpStream) {
    let mut byte = [0u8; 1];
    let mut closing = shared.closing.subscribe();
    loop {
        tokio::select! {
            read = stream.read(&mut byte) => match read {
                Ok(0) => {
                    shared.break_with("the peer closed the connection");
                    break;
                }
                Err(error) => {
                    shared.break_with(&format!("the peer's connection failed: {error}"));
                    break;
                }
                Ok(_) => {}
            },
            _ = closing.wait_for(|closed| *closed) => break,
        }
    }
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_buffers_survive_encoding() {
        let remote = RemoteBuf {
            addr: 0x7f00_1234_5000,
            rkey: 0xdead_beef,
            len: 1 << 20,
        };
        let mut bytes = Vec::new();
        remote.encode(&mut bytes);
        assert_eq!(bytes.len(), RemoteBuf::ENCODED_LEN);
        assert_eq!(RemoteBuf::decode(&bytes), Some(remote));
        assert_eq!(RemoteBuf::decode(&bytes[..10]), None);
    }
}
