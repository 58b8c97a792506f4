//! The communicator: rendezvous, then collectives run in call order on the library's own
//! threads. Every collective has a blocking form and an asynchronous one that returns a
//! [`Handle`]. Algorithms here are flat rings over all ranks (reduce-scatter then all-gather
//! for allreduce), pipelined by chunk: every message is at most `chunk_bytes`, and all chunks
//! of a ring step are in flight at once.
//!
//! After a failure (a dead or stalled peer, a mismatched call) the communicator tells every
//! peer to abort — their pending calls fail at once instead of at their timeouts — and stays
//! failed: later calls return the same error, as NCCL's do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ff_net::{Call, NetClient, NetConfig, PooledBuf, Transport as _};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;

use crate::config::{Algorithm, CommConfig};
use crate::dtype::{
    Buffer, DType, Element, ReduceOp, combine, compute_type, divide, narrow, widen, widen_into,
};
use crate::error::CommError;
use crate::wire::{DataHeader, Endpoint, Signature, method};

/// Collective kinds, as signatures carry them.
mod kind {
    pub const ALLREDUCE: u8 = 1;
    pub const BROADCAST: u8 = 2;
    pub const REDUCE_SCATTER: u8 = 3;
    pub const ALL_GATHER: u8 = 4;
    pub const ALL_TO_ALL: u8 = 5;
    pub const BARRIER: u8 = 6;
}

/// Calls queued and not yet run; more wait in `Communicator` calls.
const QUEUE_CAPACITY: usize = 1024;
/// All-to-all chunks in flight from one rank.
const ALL_TO_ALL_WINDOW: usize = 16;
/// Largest all-to-all piece accepted from one rank.
const PIECE_MAX: usize = 1 << 40;
/// Bits of a message tag that number messages within one collective.
const TAG_BITS: u32 = 32;

/// The pending result of an asynchronous collective.
#[derive(Debug)]
pub struct Handle<T> {
    result: std::sync::mpsc::Receiver<Result<T, CommError>>,
    done: Arc<AtomicBool>,
}

impl<T> Handle<T> {
    /// Waits for the collective and returns its result.
    pub fn wait(self) -> Result<T, CommError> {
        self.result.recv().unwrap_or(Err(CommError::Closed))
    }

    /// Whether the collective has finished (successfully or not).
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

type Job = Box<dyn FnOnce(Arc<Inner>, u64) -> futures::future::BoxFuture<'static, ()> + Send>;

/// Ranks in ring order, and where this rank stands among them.
#[derive(Debug, Clone)]
pub(crate) struct Ring {
    pub(crate) members: Vec<usize>,
    pub(crate) at: usize,
}

impl Ring {
    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    fn next(&self) -> usize {
        self.members[(self.at + 1) % self.len()]
    }

    fn prev(&self) -> usize {
        self.members[(self.at + self.len() - 1) % self.len()]
    }
}

/// Most idle working buffers kept for reuse (async calls in flight each hold one).
const SCRATCH_BUFFERS: usize = 8;

/// Most idle send buffers kept for reuse.
const SEND_POOL_BUFFERS: usize = 64;

/// Send buffers for reuse: a chunk copied out for sending comes back here once ff-net has
/// written it, so steady traffic allocates (and page-faults) nothing new.
#[derive(Default)]
struct SendPool {
    free: Mutex<Vec<Vec<u8>>>,
}

/// A send buffer on loan from a [`SendPool`].
struct Loaned {
    buf: Vec<u8>,
    pool: Arc<SendPool>,
}

impl AsRef<[u8]> for Loaned {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Loaned {
    fn drop(&mut self) {
        let mut free = self.pool.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < SEND_POOL_BUFFERS {
            free.push(std::mem::take(&mut self.buf));
        }
    }
}

/// What the collectives share.
pub(crate) struct Inner {
    rank: usize,
    world: usize,
    peers: Vec<String>,
    nodes: Vec<String>,
    endpoint: Arc<Endpoint>,
    net: NetClient,
    timeout: Duration,
    chunk_bytes: usize,
    /// Ring or tree for allreduce across the network (see [`Algorithm::choose`]).
    algorithm: Algorithm,
    tree_latency_bytes: usize,
    /// The first failure; every later call returns it.
    failed: Mutex<Option<CommError>>,
    sends: Arc<SendPool>,
    /// Working buffers kept between calls.
    scratch: Mutex<Vec<Buffer>>,
    /// Every rank, in rank order.
    everyone: Ring,
    /// This rank's node, when allreduce goes through it (ranks sharing memory).
    node: Option<crate::node::Node>,
}

/// A rank's communicator.
pub struct Communicator {
    config: CommConfig,
    inner: Arc<Inner>,
    /// Calls, in order, to the runner thread (None once closing).
    jobs: Option<std::sync::mpsc::SyncSender<Job>>,
    /// Runs the calls one after another on the runtime, then the closing handshake.
    runner: Option<std::thread::JoinHandle<()>>,
    _server: ff_net::Server,
    /// The communicator's threads (taken when dropping).
    runtime: Option<tokio::runtime::Runtime>,
}

/// How long a closing communicator waits for its peers to finish sending to it.
const FINISH_WAIT: Duration = Duration::from_secs(5);

impl Drop for Communicator {
    /// Closing: the runner finishes the queued calls, then the closing handshake
    /// ([`Inner::finish`]) runs on it; this waits for that.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(runner) = self.runner.take() {
            let _ = runner.join();
        }
        // Without blocking: dropping a runtime blocks, which panics inside a caller's runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("rank", &self.config.rank)
            .field("world_size", &self.config.world_size)
            .finish()
    }
}

fn store_error(master: &str, message: impl Into<String>) -> CommError {
    CommError::Store {
        master: master.to_string(),
        message: message.into(),
    }
}

/// Sets `key` in the store, retrying until it answers or `deadline` passes.
async fn store_set(
    net: &NetClient,
    master: &str,
    key: &str,
    value: &str,
    deadline: Instant,
) -> Result<(), CommError> {
    loop {
        let call = Call {
            method: method::SET,
            header: Bytes::copy_from_slice(key.as_bytes()),
            payload: Bytes::copy_from_slice(value.as_bytes()),
        };
        match net.call(master, call).await {
            Ok(_) => return Ok(()),
            Err(error) if Instant::now() >= deadline => {
                return Err(store_error(master, error.to_string()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Reads `key` from the store; None if absent (or the store is not up yet).
async fn store_get(net: &NetClient, master: &str, key: &str) -> Option<String> {
    let call = Call {
        method: method::GET,
        header: Bytes::copy_from_slice(key.as_bytes()),
        payload: Bytes::new(),
    };
    let reply = net.call(master, call).await.ok()?;
    (reply.header.first() == Some(&1)).then(|| String::from_utf8_lossy(&reply.payload).into_owned())
}

impl Communicator {
    /// A communicator from the environment (see [`CommConfig::from_env`]).
    pub fn from_env() -> Result<Communicator, CommError> {
        Communicator::new(CommConfig::from_env()?)
    }

    /// Starts the rank's endpoint, meets every other rank through rank 0's store, and returns
    /// once all are known (or fails naming the ranks that never came).
    pub fn new(config: CommConfig) -> Result<Communicator, CommError> {
        config.validate()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("hfreduce-{}", config.rank))
            .enable_all()
            .build()
            .map_err(|e| CommError::Config(format!("cannot start threads: {e}")))?;
        // Everything that waits on the runtime runs on threads of the communicator's own, never
        // on the caller's: a caller inside an async runtime must not block on another one.
        let handle = runtime.handle().clone();
        let (inner, server) = std::thread::scope(|scope| {
            scope
                .spawn(|| handle.block_on(rendezvous(&config)))
                .join()
                .unwrap_or_else(|_| Err(CommError::Config("rendezvous panicked".to_string())))
        })?;
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(QUEUE_CAPACITY);
        let runner_inner = inner.clone();
        let runner = std::thread::Builder::new()
            .name(format!("hfreduce-{}-calls", config.rank))
            .spawn(move || {
                let mut seq: u64 = 0;
                while let Ok(job) = queue.recv() {
                    seq += 1;
                    handle.block_on(job(runner_inner.clone(), seq));
                }
                // The queue closed: the communicator is being dropped.
                handle.block_on(runner_inner.finish());
            })
            .map_err(|e| CommError::Config(format!("cannot start threads: {e}")))?;
        Ok(Communicator {
            config,
            inner,
            jobs: Some(jobs),
            runner: Some(runner),
            _server: server,
            runtime: Some(runtime),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.config.rank
    }

    /// Ranks in the job.
    pub fn world_size(&self) -> usize {
        self.config.world_size
    }

    /// The node id of every rank, by rank.
    pub fn nodes(&self) -> &[String] {
        &self.inner.nodes
    }

    /// Queues `work` (a collective on the communicator's threads); its result goes to a handle.
    fn submit<T, F>(&self, work: F) -> Handle<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>, u64) -> futures::future::BoxFuture<'static, Result<T, CommError>>
            + Send
            + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let done = Arc::new(AtomicBool::new(false));
        let finished = done.clone();
        let job: Job = Box::new(move |inner, seq| {
            Box::pin(async move {
                let result = match inner.failure() {
                    Some(error) => Err(error),
                    None => {
                        let result = work(inner.clone(), seq).await;
                        if let Err(error) = &result {
                            inner.fail(error.clone()).await;
                        }
                        result
                    }
                };
                let _ = tx.send(result);
                finished.store(true, Ordering::Release);
            })
        });
        // The queue is bounded: a caller far ahead of the network waits here.
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let _ = tx.send(Err(CommError::Closed));
            return Handle {
                result: rx,
                done: Arc::new(AtomicBool::new(true)),
            };
        }
        Handle { result: rx, done }
    }

    /// Reduces `data` over all ranks in place.
    pub fn allreduce<T: Element>(&self, data: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        // Straight through a reused working buffer: one copy in, one out, no fresh memory.
        let mut buffer = self.inner.take_scratch(widened_len::<T>(data.len()));
        widen_into(data, &mut buffer);
        self.allreduce_buffer::<T>(buffer, data.len(), op)
            .wait()
            .map(|buffer| {
                narrow(&buffer, data);
                self.inner.give_scratch(buffer);
            })
    }

    /// [`Communicator::allreduce`], asynchronously: the data comes back through the handle.
    pub fn allreduce_async<T: Element>(&self, mut data: Vec<T>, op: ReduceOp) -> Handle<Vec<T>> {
        let mut buffer = self.inner.take_scratch(widened_len::<T>(data.len()));
        widen_into(&data, &mut buffer);
        self.submit(move |inner, seq| {
            Box::pin(async move {
                let buffer = inner.reduce_all::<T>(seq, buffer, data.len(), op).await?;
                narrow(&buffer, &mut data);
                inner.give_scratch(buffer);
                Ok(data)
            })
        })
    }

    /// Allreduce of a working buffer holding `count` elements of `T` (widened).
    fn allreduce_buffer<T: Element>(
        &self,
        buffer: Buffer,
        count: usize,
        op: ReduceOp,
    ) -> Handle<Buffer> {
        self.submit(move |inner, seq| {
            Box::pin(async move { inner.reduce_all::<T>(seq, buffer, count, op).await })
        })
    }

    /// Copies `root`'s `data` to every rank.
    pub fn broadcast<T: Element>(&self, data: &mut [T], root: usize) -> Result<(), CommError> {
        let result = self.broadcast_async(data.to_vec(), root).wait()?;
        data.copy_from_slice(&result);
        Ok(())
    }

    /// [`Communicator::broadcast`], asynchronously.
    pub fn broadcast_async<T: Element>(&self, mut data: Vec<T>, root: usize) -> Handle<Vec<T>> {
        self.submit(move |inner, seq| {
            Box::pin(async move {
                if root >= inner.world {
                    return Err(CommError::InvalidArgument(format!(
                        "root {root} is not a rank"
                    )));
                }
                let bytes = bytemuck::cast_slice_mut::<T, u8>(&mut data);
                let signature = signature(kind::BROADCAST, T::DTYPE, ReduceOp::Sum, bytes.len());
                inner.broadcast(seq, signature, root, bytes).await?;
                Ok(data)
            })
        })
    }

    /// Every rank's `data` (equal lengths), in rank order.
    pub fn all_gather<T: Element>(&self, data: &[T]) -> Result<Vec<T>, CommError> {
        self.all_gather_async(data.to_vec()).wait()
    }

    /// [`Communicator::all_gather`], asynchronously.
    pub fn all_gather_async<T: Element>(&self, data: Vec<T>) -> Handle<Vec<T>> {
        self.submit(move |inner, seq| {
            Box::pin(async move {
                let each = std::mem::size_of_val(data.as_slice());
                let mut out = vec![T::zeroed(); data.len() * inner.world];
                let bytes = bytemuck::cast_slice_mut::<T, u8>(&mut out);
                bytes[inner.rank * each..(inner.rank + 1) * each]
                    .copy_from_slice(bytemuck::cast_slice(&data));
                let signature = signature(kind::ALL_GATHER, T::DTYPE, ReduceOp::Sum, data.len());
                let bounds: Vec<(usize, usize)> = (0..inner.world)
                    .map(|r| (r * each, (r + 1) * each))
                    .collect();
                inner
                    .ring_gather(&inner.everyone, seq, signature, bytes, &bounds, 0)
                    .await?;
                Ok(out)
            })
        })
    }

    /// Reduces `data` (a multiple of the world size long) over all ranks, and returns this
    /// rank's part: elements `[rank * n / world, (rank + 1) * n / world)`.
    pub fn reduce_scatter<T: Element>(
        &self,
        data: &[T],
        op: ReduceOp,
    ) -> Result<Vec<T>, CommError> {
        self.reduce_scatter_async(data.to_vec(), op).wait()
    }

    /// [`Communicator::reduce_scatter`], asynchronously.
    pub fn reduce_scatter_async<T: Element>(&self, data: Vec<T>, op: ReduceOp) -> Handle<Vec<T>> {
        self.submit(move |inner, seq| {
            Box::pin(async move {
                if !data.len().is_multiple_of(inner.world) {
                    return Err(CommError::InvalidArgument(format!(
                        "reduce-scatter of {} elements over {} ranks: not a multiple",
                        data.len(),
                        inner.world
                    )));
                }
                let dtype = compute_type(T::DTYPE);
                let mut buffer = widen(&data);
                let bounds = Inner::segments(inner.world, data.len(), dtype.size());
                let signature = signature(kind::REDUCE_SCATTER, T::DTYPE, op, data.len());
                inner
                    .ring_reduce(
                        &inner.everyone,
                        seq,
                        0,
                        signature,
                        dtype,
                        op,
                        buffer.bytes_mut(),
                        &bounds,
                    )
                    .await?;
                let (start, end) = bounds[inner.rank];
                let mut part = Buffer::from_bytes(&buffer.bytes()[start..end]);
                if op == ReduceOp::Avg {
                    divide(dtype, part.bytes_mut(), inner.world);
                }
                let mut out = vec![T::zeroed(); data.len() / inner.world];
                narrow(&part, &mut out);
                Ok(out)
            })
        })
    }

    /// Sends `send_counts[r]` consecutive elements of `data` to each rank `r`; returns what
    /// every rank sent here, in rank order, with the count from each (uneven splits allowed).
    pub fn all_to_all<T: Element>(
        &self,
        data: &[T],
        send_counts: &[usize],
    ) -> Result<(Vec<T>, Vec<usize>), CommError> {
        let mut out = Vec::new();
        let counts = self.all_to_all_into(data, send_counts, &mut out)?;
        Ok((out, counts))
    }

    /// [`Communicator::all_to_all`] into `out` (replacing its contents, keeping its memory):
    /// called in a loop with the same `out`, it allocates nothing once warm.
    pub fn all_to_all_into<T: Element>(
        &self,
        data: &[T],
        send_counts: &[usize],
        out: &mut Vec<T>,
    ) -> Result<Vec<usize>, CommError> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut input = self.inner.take_scratch(bytes.len());
        input.bytes_mut().copy_from_slice(bytes);
        let count = data.len();
        let send_counts = send_counts.to_vec();
        let pieces = self
            .submit(move |inner, seq| {
                Box::pin(async move {
                    let pieces = inner
                        .exchange::<T>(seq, input.bytes(), count, &send_counts)
                        .await;
                    inner.give_scratch(input);
                    pieces
                })
            })
            .wait()?;
        Ok(self.inner.assemble(pieces, out))
    }

    /// [`Communicator::all_to_all`], asynchronously.
    pub fn all_to_all_async<T: Element>(
        &self,
        data: Vec<T>,
        send_counts: Vec<usize>,
    ) -> Handle<(Vec<T>, Vec<usize>)> {
        self.submit(move |inner, seq| {
            Box::pin(async move {
                let pieces = inner
                    .exchange::<T>(seq, bytemuck::cast_slice(&data), data.len(), &send_counts)
                    .await?;
                let mut out = Vec::new();
                let counts = inner.assemble(pieces, &mut out);
                Ok((out, counts))
            })
        })
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<(), CommError> {
        self.submit(move |inner, seq| {
            Box::pin(async move {
                let mut token = Buffer::zeroed(8);
                let signature = signature(kind::BARRIER, DType::I64, ReduceOp::Sum, 1);
                inner
                    .allreduce(seq, signature, DType::I64, ReduceOp::Sum, &mut token)
                    .await
            })
        })
        .wait()
    }
}

/// Bytes of `count` elements of `T` once widened for reduction.
fn widened_len<T: Element>(count: usize) -> usize {
    count * compute_type(T::DTYPE).size()
}

fn signature(kind: u8, dtype: DType, op: ReduceOp, count: usize) -> Signature {
    Signature {
        kind,
        dtype: dtype as u8,
        op: op as u8,
        count: count as u64,
    }
}

fn describe(signature: &Signature) -> String {
    let kind = match signature.kind {
        kind::ALLREDUCE => "allreduce",
        kind::BROADCAST => "broadcast",
        kind::REDUCE_SCATTER => "reduce-scatter",
        kind::ALL_GATHER => "all-gather",
        kind::ALL_TO_ALL => "all-to-all",
        kind::BARRIER => "barrier",
        _ => "unknown",
    };
    format!(
        "{kind} (type {}, op {}, {} elements)",
        signature.dtype, signature.op, signature.count
    )
}

async fn rendezvous(config: &CommConfig) -> Result<(Arc<Inner>, ff_net::Server), CommError> {
    let master = config.master();
    let deadline = Instant::now() + config.timeout;
    let net_config = NetConfig {
        max_payload: ff_config::ByteSize((config.chunk_bytes as u64).max(1 << 20) + (1 << 20)),
        connections_per_peer: 2,
        connect_timeout: ff_config::Duration(config.timeout.min(Duration::from_secs(5))),
        request_timeout: ff_config::Duration(config.timeout),
        transport: config.transport,
        ..NetConfig::default()
    };
    let bind = if config.rank == 0 {
        master.clone()
    } else {
        format!("{}:0", config.listen_host)
    };
    let listener = tokio::net::TcpListener::bind(&bind).await.map_err(|e| {
        CommError::Config(format!("rank {} cannot listen on {bind}: {e}", config.rank))
    })?;
    let endpoint = Arc::new(Endpoint::new(config.world_size, config.rank == 0));
    let server = ff_net::Server::start(listener, endpoint.clone(), &net_config)
        .map_err(|e| CommError::Config(format!("cannot serve: {e}")))?;
    let addr = format!("{}:{}", config.listen_host, server.local_addr().port());
    let net = NetClient::new(net_config).map_err(|e| CommError::Config(e.to_string()))?;
    store_set(
        &net,
        &master,
        &format!("rank/{}", config.rank),
        &format!("{addr} {} {}", config.plan_settings(), config.node_id),
        deadline,
    )
    .await?;
    let mut entries: Vec<Option<(String, String)>> = vec![None; config.world_size];
    loop {
        for (rank, entry) in entries.iter_mut().enumerate() {
            if entry.is_none()
                && let Some(value) = store_get(&net, &master, &format!("rank/{rank}")).await
            {
                let mut fields = value.splitn(3, ' ');
                let (peer, settings, node) = (
                    fields.next().unwrap_or(""),
                    fields.next().unwrap_or(""),
                    fields.next().unwrap_or(""),
                );
                if settings != config.plan_settings() {
                    return Err(CommError::Config(format!(
                        "rank {rank} runs with {settings} but rank {} with {}: every rank \
                         must use the same HFREDUCE_* settings",
                        config.rank,
                        config.plan_settings()
                    )));
                }
                *entry = Some((peer.to_string(), node.to_string()));
            }
        }
        let missing: Vec<usize> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_none())
            .map(|(r, _)| r)
            .collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(CommError::Rendezvous {
                master,
                missing,
                timeout: config.timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (peers, nodes): (Vec<String>, Vec<String>) = entries.into_iter().flatten().unzip();
    let nodes_of = nodes.clone();
    let inner = Arc::new(Inner {
        rank: config.rank,
        world: config.world_size,
        peers,
        nodes,
        endpoint,
        net,
        timeout: config.timeout,
        chunk_bytes: config.chunk_bytes,
        algorithm: config.algorithm,
        tree_latency_bytes: config.tree_latency_bytes,
        failed: Mutex::new(None),
        sends: Arc::new(SendPool::default()),
        scratch: Mutex::new(Vec::new()),
        everyone: Ring {
            members: (0..config.world_size).collect(),
            at: config.rank,
        },
        node: crate::node::Node::plan(config, &nodes_of),
    });
    // Rank 0 keeps its store up until every rank has read the table: the first barrier.
    let mut token = Buffer::zeroed(8);
    let signature = signature(kind::BARRIER, DType::I64, ReduceOp::Sum, 1);
    inner
        .allreduce(0, signature, DType::I64, ReduceOp::Sum, &mut token)
        .await?;
    Ok((inner, server))
}

impl Inner {
    fn failure(&self) -> Option<CommError> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records the first failure and tells every peer to abort (best effort, bounded).
    async fn fail(&self, error: CommError) {
        {
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            if failed.is_some() {
                return;
            }
            *failed = Some(error.clone());
        }
        self.endpoint.abort(self.rank, error.to_string());
        if matches!(error, CommError::Aborted { .. }) {
            return;
        }
        let message = Bytes::from(format!("rank {}: {error}", self.rank));
        self.tell_peers(method::ABORT, message, Duration::from_secs(2))
            .await;
    }

    /// Every rank tells every peer it will send nothing more, and keeps serving until all peers
    /// have said the same (bounded), so that no rank exits while a peer's last message to it
    /// still waits for its acknowledgement.
    async fn finish(&self) {
        let wait = if self.failure().is_some() {
            Duration::from_millis(200)
        } else {
            FINISH_WAIT.min(self.timeout)
        };
        self.tell_peers(method::DONE, Bytes::new(), wait).await;
        self.endpoint.wait_done(self.world - 1, wait).await;
    }

    /// Sends `method` (with this rank's header and `payload`) to every peer at once, each call
    /// bounded by `wait`; failures are ignored (the peer may be gone, which is what these
    /// notices are about).
    async fn tell_peers(&self, method: u16, payload: Bytes, wait: Duration) {
        let calls = (0..self.world).filter(|p| *p != self.rank).map(|peer| {
            let call = Call {
                method,
                header: crate::wire::rank_header(self.rank),
                payload: payload.clone(),
            };
            let addr = self.peers[peer].clone();
            async move {
                let _ = tokio::time::timeout(wait, self.net.call(&addr, call)).await;
            }
        });
        futures::future::join_all(calls).await;
    }

    /// Allreduce (with the average's division) of a working buffer of `count` `T`s.
    async fn reduce_all<T: Element>(
        &self,
        seq: u64,
        mut buffer: Buffer,
        count: usize,
        op: ReduceOp,
    ) -> Result<Buffer, CommError> {
        let dtype = compute_type(T::DTYPE);
        let signature = signature(kind::ALLREDUCE, T::DTYPE, op, count);
        self.allreduce(seq, signature, dtype, op, &mut buffer)
            .await?;
        if op == ReduceOp::Avg {
            divide(dtype, buffer.bytes_mut(), self.world);
        }
        Ok(buffer)
    }

    /// A working buffer from the pool (keeps its memory between calls) `len` bytes long: the
    /// smallest that holds `len`, else the largest, so that buffers of different sizes keep
    /// their roles from call to call instead of reallocating.
    fn take_scratch(&self, len: usize) -> Buffer {
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let fitting = scratch
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .or_else(|| scratch.iter().enumerate().max_by_key(|(_, b)| b.capacity()))
            .map(|(at, _)| at);
        let mut buffer = fitting
            .map(|at| scratch.swap_remove(at))
            .unwrap_or_default();
        drop(scratch);
        buffer.resize(len);
        buffer
    }

    /// Returns a working buffer to the pool.
    fn give_scratch(&self, buffer: Buffer) {
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        // Enough for an all-to-all's pieces plus its input.
        if scratch.len() < SCRATCH_BUFFERS.max(self.world + 1) {
            scratch.push(buffer);
        }
    }

    /// `data` copied into a pooled send buffer.
    pub(crate) fn copy_out(&self, data: &[u8]) -> Bytes {
        let mut buf = self
            .sends
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(data);
        Bytes::from_owner(Loaned {
            buf,
            pool: self.sends.clone(),
        })
    }

    fn next(&self) -> usize {
        self.everyone.next()
    }

    fn prev(&self) -> usize {
        self.everyone.prev()
    }

    /// Byte bounds of `parts` near-equal segments of `elements` elements of `size` bytes.
    pub(crate) fn segments(parts: usize, elements: usize, size: usize) -> Vec<(usize, usize)> {
        (0..parts)
            .map(|i| {
                (
                    i * elements / parts * size,
                    (i + 1) * elements / parts * size,
                )
            })
            .collect()
    }

    /// Chunk bounds within `[start, end)`, each at most `chunk_bytes` and a whole number of
    /// `size`-byte elements.
    pub(crate) fn chunks(&self, bounds: (usize, usize), size: usize) -> Vec<(usize, usize)> {
        Self::chunks_of(self.chunk_bytes, bounds, size)
    }

    /// Bounds within `[start, end)`, each at most `limit` bytes and a whole number of
    /// `size`-byte elements.
    pub(crate) fn chunks_of(
        limit: usize,
        (start, end): (usize, usize),
        size: usize,
    ) -> Vec<(usize, usize)> {
        let step = (limit / size).max(1) * size;
        let mut out = Vec::new();
        let mut at = start;
        while at < end {
            out.push((at, (at + step).min(end)));
            at += step;
        }
        out
    }

    /// Message indices one ring step needs: the most chunks of any segment, plus one.
    fn per_step(&self, bounds: &[(usize, usize)], size: usize) -> usize {
        bounds
            .iter()
            .map(|b| self.chunks(*b, size).len())
            .max()
            .unwrap_or(0)
            + 1
    }

    pub(crate) fn tag(seq: u64, index: usize) -> u64 {
        (seq << TAG_BITS) | (index as u64 & ((1 << TAG_BITS) - 1))
    }

    pub(crate) async fn send(
        &self,
        to: usize,
        tag: u64,
        signature: Signature,
        payload: Bytes,
    ) -> Result<(), CommError> {
        let header = DataHeader {
            from: self.rank as u64,
            tag,
            signature,
        };
        let call = Call {
            method: method::DATA,
            header: header.encode(),
            payload,
        };
        self.net
            .call(&self.peers[to], call)
            .await
            .map(|_| ())
            .map_err(|e| CommError::Peer {
                peer: to,
                message: format!("sending {}: {e}", describe(&signature)),
            })
    }

    /// Receives message `tag` from `from`, checking that it belongs to the same collective
    /// (all-to-all pieces may differ in count).
    pub(crate) async fn receive(
        &self,
        from: usize,
        tag: u64,
        signature: Signature,
    ) -> Result<PooledBuf, CommError> {
        let (theirs, data) = self
            .endpoint
            .receive(from, tag, self.timeout, &describe(&signature))
            .await?;
        let same = if signature.kind == kind::ALL_TO_ALL {
            (theirs.kind, theirs.dtype) == (signature.kind, signature.dtype)
        } else {
            theirs == signature
        };
        if !same {
            return Err(CommError::Mismatch(format!(
                "rank {} called {} but rank {from} called {}",
                self.rank,
                describe(&signature),
                describe(&theirs)
            )));
        }
        Ok(data)
    }

    /// One ring step: sends `outgoing` chunks to the next rank (tags from `base`) while
    /// receiving the chunks `incoming` from the previous one; returns each received chunk with
    /// its bounds, its length checked.
    async fn ring_step(
        &self,
        ring: &Ring,
        seq: u64,
        signature: Signature,
        base: usize,
        outgoing: Vec<Bytes>,
        incoming: &[(usize, usize)],
    ) -> Result<Vec<((usize, usize), PooledBuf)>, CommError> {
        let sends = async {
            let mut sends: FuturesUnordered<_> = outgoing
                .into_iter()
                .enumerate()
                .map(|(c, bytes)| {
                    self.send(ring.next(), Self::tag(seq, base + c), signature, bytes)
                })
                .collect();
            while let Some(sent) = sends.next().await {
                sent?;
            }
            Ok::<_, CommError>(())
        };
        let receives = async {
            let mut receives: FuturesUnordered<_> = incoming
                .iter()
                .enumerate()
                .map(|(c, bounds)| async move {
                    let data = self
                        .receive(ring.prev(), Self::tag(seq, base + c), signature)
                        .await?;
                    Ok::<_, CommError>((*bounds, data))
                })
                .collect();
            let mut arrived = Vec::with_capacity(incoming.len());
            while let Some(received) = receives.next().await {
                let ((start, end), data) = received?;
                if data.len() != end - start {
                    return Err(CommError::Mismatch(format!(
                        "rank {} sent {} bytes where {} were expected",
                        ring.prev(),
                        data.len(),
                        end - start
                    )));
                }
                arrived.push(((start, end), data));
            }
            Ok::<_, CommError>(arrived)
        };
        let (sent, arrived) = tokio::join!(sends, receives);
        sent?;
        arrived
    }

    /// Ring reduce-scatter over segment `bounds`: afterwards this rank's segment holds the
    /// reduction over all ranks.
    #[allow(clippy::too_many_arguments)]
    async fn ring_reduce(
        &self,
        ring: &Ring,
        seq: u64,
        index_base: usize,
        signature: Signature,
        dtype: DType,
        op: ReduceOp,
        bytes: &mut [u8],
        bounds: &[(usize, usize)],
    ) -> Result<(), CommError> {
        let n = ring.len();
        let size = dtype.size();
        for step in 0..n.saturating_sub(1) {
            let send_seg = (ring.at + 2 * n - step - 1) % n;
            let recv_seg = (ring.at + 2 * n - step - 2) % n;
            let outgoing = self
                .chunks(bounds[send_seg], size)
                .iter()
                .map(|(s, e)| self.copy_out(&bytes[*s..*e]))
                .collect();
            let incoming = self.chunks(bounds[recv_seg], size);
            let base = index_base + step * self.per_step(bounds, size);
            for ((start, end), data) in self
                .ring_step(ring, seq, signature, base, outgoing, &incoming)
                .await?
            {
                combine(dtype, op, &mut bytes[start..end], &data);
            }
        }
        Ok(())
    }

    /// Ring all-gather over segment `bounds`, starting from this rank's own segment;
    /// `index_base` keeps its message tags apart from an earlier phase of the same call.
    async fn ring_gather(
        &self,
        ring: &Ring,
        seq: u64,
        signature: Signature,
        bytes: &mut [u8],
        bounds: &[(usize, usize)],
        index_base: usize,
    ) -> Result<(), CommError> {
        let n = ring.len();
        for step in 0..n.saturating_sub(1) {
            let send_seg = (ring.at + n - step) % n;
            let recv_seg = (ring.at + 2 * n - step - 1) % n;
            let outgoing = self
                .chunks(bounds[send_seg], 1)
                .iter()
                .map(|(s, e)| self.copy_out(&bytes[*s..*e]))
                .collect();
            let incoming = self.chunks(bounds[recv_seg], 1);
            let base = index_base + step * self.per_step(bounds, 1);
            for ((start, end), data) in self
                .ring_step(ring, seq, signature, base, outgoing, &incoming)
                .await?
            {
                bytes[start..end].copy_from_slice(&data);
            }
        }
        Ok(())
    }

    /// Allreduce: through the node (shared memory, then the leaders on the network) when ranks
    /// share nodes, else over every rank at once.
    async fn allreduce(
        &self,
        seq: u64,
        signature: Signature,
        dtype: DType,
        op: ReduceOp,
        buffer: &mut Buffer,
    ) -> Result<(), CommError> {
        match &self.node {
            Some(node) => {
                node.allreduce(self, seq, signature, dtype, op, buffer)
                    .await
            }
            None => {
                self.group_allreduce(
                    &self.everyone,
                    seq,
                    0,
                    signature,
                    dtype,
                    op,
                    buffer.bytes_mut(),
                )
                .await
            }
        }
    }

    /// Allreduce over `group` by ring or double binary tree, as configured for this size;
    /// message tags from `base` (see [`Inner::allreduce_tags`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn group_allreduce(
        &self,
        group: &Ring,
        seq: u64,
        base: usize,
        signature: Signature,
        dtype: DType,
        op: ReduceOp,
        bytes: &mut [u8],
    ) -> Result<(), CommError> {
        let algorithm = self
            .algorithm
            .choose(bytes.len(), group.len(), self.tree_latency_bytes);
        match algorithm {
            Algorithm::Tree => {
                self.tree_allreduce(group, seq, base, signature, dtype, op, bytes)
                    .await
            }
            Algorithm::Ring | Algorithm::Auto => {
                self.ring_allreduce(group, seq, base, signature, dtype, op, bytes)
                    .await
            }
        }
    }

    /// How many message tags an allreduce of `len` bytes over `members` uses at most (by
    /// either algorithm), so that several can run in one call with disjoint tags.
    pub(crate) fn allreduce_tags(&self, members: usize, len: usize, size: usize) -> usize {
        let ring = 2 * members * self.per_step(&Self::segments(members, len / size, size), size);
        let half = Self::segments(2, len / size, size)[1];
        let tree = 4 * self.chunks(half, size).len();
        ring.max(tree)
    }

    /// Ring allreduce over `ring`: reduce-scatter, then all-gather of the reduced segments;
    /// message tags from `base`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn ring_allreduce(
        &self,
        ring: &Ring,
        seq: u64,
        base: usize,
        signature: Signature,
        dtype: DType,
        op: ReduceOp,
        bytes: &mut [u8],
    ) -> Result<(), CommError> {
        if ring.len() == 1 {
            return Ok(());
        }
        let size = dtype.size();
        let bounds = Self::segments(ring.len(), bytes.len() / size, size);
        self.ring_reduce(ring, seq, base, signature, dtype, op, bytes, &bounds)
            .await?;
        // All-gather tags start past every reduce-scatter tag.
        let index_base = base + ring.len() * self.per_step(&bounds, size);
        self.ring_gather(ring, seq, signature, bytes, &bounds, index_base)
            .await
    }

    /// Pipelined chain from `root` around the ring: each rank forwards a chunk while it
    /// receives the next.
    async fn broadcast(
        &self,
        seq: u64,
        signature: Signature,
        root: usize,
        bytes: &mut [u8],
    ) -> Result<(), CommError> {
        let n = self.world;
        if n == 1 {
            return Ok(());
        }
        let position = (self.rank + n - root) % n;
        let chunks = self.chunks((0, bytes.len()), 1);
        let forward = position < n - 1;
        let (outbox, queued) = futures::channel::mpsc::unbounded::<(usize, u64, Bytes)>();
        let receiving = async move {
            for (c, (start, end)) in chunks.iter().enumerate() {
                let data = if position == 0 {
                    self.copy_out(&bytes[*start..*end])
                } else {
                    let data = self
                        .receive(self.prev(), Self::tag(seq, c), signature)
                        .await?;
                    if data.len() != end - start {
                        return Err(CommError::Mismatch(format!(
                            "rank {} broadcast {} bytes where {} were expected",
                            self.prev(),
                            data.len(),
                            end - start
                        )));
                    }
                    bytes[*start..*end].copy_from_slice(&data);
                    self.copy_out(&data)
                };
                if forward {
                    let _ = outbox.unbounded_send((self.next(), Self::tag(seq, c), data));
                }
            }
            Ok::<_, CommError>(())
        };
        tokio::try_join!(receiving, self.send_all(queued, signature))?;
        Ok(())
    }

    /// Sends every message `(to, tag, payload)` that comes through `queued`, all at once,
    /// until the queue closes and every send is done.
    pub(crate) async fn send_all(
        &self,
        mut queued: futures::channel::mpsc::UnboundedReceiver<(usize, u64, Bytes)>,
        signature: Signature,
    ) -> Result<(), CommError> {
        let mut sends = FuturesUnordered::new();
        loop {
            tokio::select! {
                next = queued.next() => match next {
                    Some((to, tag, data)) => sends.push(self.send(to, tag, signature, data)),
                    None => break,
                },
                Some(sent) = sends.next(), if !sends.is_empty() => sent?,
            }
        }
        while let Some(sent) = sends.next().await {
            sent?;
        }
        Ok(())
    }

    /// All-to-all of `count` elements of `T` in `data` (as bytes), after checking the counts.
    async fn exchange<T: Element>(
        &self,
        seq: u64,
        data: &[u8],
        count: usize,
        send_counts: &[usize],
    ) -> Result<Vec<Buffer>, CommError> {
        if send_counts.len() != self.world || send_counts.iter().sum::<usize>() != count {
            return Err(CommError::InvalidArgument(format!(
                "all-to-all needs one count per rank ({}) summing to the data's {count} elements",
                self.world
            )));
        }
        self.all_to_all(seq, T::DTYPE, data, send_counts).await
    }

    /// The received pieces, in rank order, copied into `out` (whose memory is kept); the
    /// pieces' buffers go back to the pool. Returns the element count from each rank.
    fn assemble<T: Element>(&self, pieces: Vec<Buffer>, out: &mut Vec<T>) -> Vec<usize> {
        let size = std::mem::size_of::<T>();
        let counts: Vec<usize> = pieces.iter().map(|p| p.len() / size).collect();
        out.clear();
        out.resize(counts.iter().sum(), T::zeroed());
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
        let mut at = 0;
        for piece in pieces {
            bytes[at..at + piece.len()].copy_from_slice(piece.bytes());
            at += piece.len();
            self.give_scratch(piece);
        }
        counts
    }

    /// Every rank sends its piece to every other directly, chunked; the first chunk's header
    /// carries the piece's element count, so uneven pieces need no size exchange. Pieces
    /// arrive in pooled working buffers.
    async fn all_to_all(
        &self,
        seq: u64,
        dtype: DType,
        data: &[u8],
        counts: &[usize],
    ) -> Result<Vec<Buffer>, CommError> {
        let size = dtype.size();
        let mut offsets = Vec::with_capacity(counts.len());
        let mut at = 0;
        for count in counts {
            offsets.push((at * size, (at + count) * size));
            at += count;
        }
        let mut pieces: Vec<Buffer> = (0..self.world).map(|_| Buffer::default()).collect();
        let (own_start, own_end) = offsets[self.rank];
        pieces[self.rank] = self.take_scratch(own_end - own_start);
        pieces[self.rank]
            .bytes_mut()
            .copy_from_slice(&data[own_start..own_end]);
        // Chunks go out in a bounded window (peers interleaved, so that every receiver is fed
        // at once): send buffers and the receivers' queues stay bounded whatever the size.
        let mut messages = Vec::new();
        for peer in (0..self.world).filter(|p| *p != self.rank) {
            let (start, end) = offsets[peer];
            let chunks = self.chunks((start, end), size);
            let piece_signature = signature(kind::ALL_TO_ALL, dtype, ReduceOp::Sum, counts[peer]);
            if chunks.is_empty() {
                messages.push((0, peer, piece_signature, (start, start)));
            }
            for (c, bounds) in chunks.into_iter().enumerate() {
                messages.push((c, peer, piece_signature, bounds));
            }
        }
        messages.sort_by_key(|(c, peer, _, _)| (*c, *peer));
        let sends = async {
            let mut sends = futures::stream::iter(messages)
                .map(|(c, peer, piece_signature, (s, e))| {
                    self.send(
                        peer,
                        Self::tag(seq, c),
                        piece_signature,
                        self.copy_out(&data[s..e]),
                    )
                })
                .buffer_unordered(ALL_TO_ALL_WINDOW);
            while let Some(sent) = sends.next().await {
                sent?;
            }
            Ok::<_, CommError>(())
        };
        let receives = async {
            let mut received = FuturesUnordered::new();
            for peer in (0..self.world).filter(|p| *p != self.rank) {
                received.push(async move {
                    let probe = signature(kind::ALL_TO_ALL, dtype, ReduceOp::Sum, 0);
                    let (theirs, first) = self
                        .endpoint
                        .receive(peer, Self::tag(seq, 0), self.timeout, "all-to-all")
                        .await?;
                    if (theirs.kind, theirs.dtype) != (probe.kind, probe.dtype) {
                        return Err(CommError::Mismatch(format!(
                            "rank {} called {} but rank {peer} called {}",
                            self.rank,
                            describe(&probe),
                            describe(&theirs)
                        )));
                    }
                    // The count came from the network: bounded before anything is sized by it.
                    let total = usize::try_from(theirs.count)
                        .ok()
                        .and_then(|count| count.checked_mul(size))
                        .filter(|total| *total <= PIECE_MAX)
                        .ok_or_else(|| {
                            CommError::Mismatch(format!(
                                "rank {peer} announced an all-to-all piece of {} elements, \
                                 more than {PIECE_MAX} bytes",
                                theirs.count
                            ))
                        })?;
                    let mut piece = self.take_scratch(total);
                    let chunks = self.chunks((0, total), size);
                    let mut first = Some(first);
                    for (c, (start, end)) in chunks.iter().enumerate() {
                        let data = match first.take() {
                            Some(data) => data,
                            None => self.receive(peer, Self::tag(seq, c), theirs).await?,
                        };
                        if data.len() != end - start {
                            return Err(CommError::Mismatch(format!(
                                "rank {peer} sent {} bytes of an all-to-all piece where {} \
                                 were expected",
                                data.len(),
                                end - start
                            )));
                        }
                        piece.bytes_mut()[*start..*end].copy_from_slice(&data);
                    }
                    Ok((peer, piece))
                });
            }
            let mut out = Vec::new();
            while let Some(piece) = received.next().await {
                out.push(piece?);
            }
            Ok::<_, CommError>(out)
        };
        let (sent, arrived) = tokio::join!(sends, receives);
        sent?;
        for (peer, piece) in arrived? {
            pieces[peer] = piece;
        }
        Ok(pieces)
    }
}
