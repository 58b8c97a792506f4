//! The calling side: a few persistent connections per peer, many calls in flight on each,
//! replies matched to callers by request id. Each connection starts with the hello (see
//! `hello`), which picks TCP frames or an RDMA link for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::oneshot;

use crate::frame::{FIXED, FrameHead, KIND_REQUEST, KIND_RESPONSE, Limits, read_head};
use crate::hello::{self, Abilities};
use crate::pool::BufferPool;
use crate::{Call, NetConfig, NetError, RdmaHere, Response, Transport};

type Waiters = Mutex<HashMap<u64, oneshot::Sender<Result<Response, NetError>>>>;

/// One connection to a peer, over TCP frames or an RDMA link.
enum Conn {
    Tcp(TcpConn),
    #[cfg(feature = "rdma")]
    Rdma(crate::rdma::client::RdmaConn),
}

impl Conn {
    /// Connects to `addr`, says hello and sets up the transport chosen.
    async fn open(
        addr: &str,
        config: &NetConfig,
        pool: Arc<BufferPool>,
        rdma: Option<&RdmaHere>,
    ) -> Result<Conn, NetError> {
        let refused = |reason: String| NetError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let timeout = config.connect_timeout.get();
        let no_answer = || refused(format!("no answer within {}", config.connect_timeout));
        let mut stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(refused(error.to_string())),
            Err(_) => return Err(no_answer()),
        };
        let _ = stream.set_nodelay(true);
        let mine = Abilities::of(config.transport, rdma.is_some());
        let use_rdma = match tokio::time::timeout(timeout, hello::client(&mut stream, mine)).await {
            Ok(Ok(use_rdma)) => use_rdma,
            Ok(Err(error)) => return Err(refused(error.to_string())),
            Err(_) => return Err(no_answer()),
        };
        match rdma.filter(|_| use_rdma) {
            #[cfg(feature = "rdma")]
            Some(context) => Ok(Conn::Rdma(
                crate::rdma::client::RdmaConn::establish(stream, context, config, pool, addr)
                    .await?,
            )),
            #[cfg(not(feature = "rdma"))]
            Some(never) => match *never {},
            None => Ok(Conn::Tcp(TcpConn::start(stream, config, pool, addr))),
        }
    }

    fn is_rdma(&self) -> bool {
        !matches!(self, Conn::Tcp(_))
    }

    fn alive(&self) -> bool {
        match self {
            Conn::Tcp(conn) => conn.alive.load(Ordering::Relaxed),
            #[cfg(feature = "rdma")]
            Conn::Rdma(conn) => conn.alive(),
        }
    }

    async fn call(
        &self,
        call: &Call,
        addr: &str,
        timeout: std::time::Duration,
    ) -> Result<Response, NetError> {
        match self {
            Conn::Tcp(conn) => conn.call(call, addr, timeout).await,
            #[cfg(feature = "rdma")]
            Conn::Rdma(conn) => conn.call(call, timeout).await,
        }
    }
}

/// One TCP connection to a peer.
struct TcpConn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    waiters: Arc<Waiters>,
    alive: Arc<AtomicBool>,
    next_id: AtomicU64,
}

impl TcpConn {
    /// Starts reading replies on a connection that said hello.
    fn start(stream: TcpStream, config: &NetConfig, pool: Arc<BufferPool>, addr: &str) -> TcpConn {
        let (reader, writer) = stream.into_split();
        let waiters: Arc<Waiters> = Arc::new(Mutex::new(HashMap::new()));
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(read_replies(
            reader,
            waiters.clone(),
            alive.clone(),
            config.limits(),
            pool,
            addr.to_string(),
        ));
        TcpConn {
            writer: tokio::sync::Mutex::new(writer),
            waiters,
            alive,
            next_id: AtomicU64::new(1),
        }
    }

    /// Makes `call` and waits up to `timeout` for its reply.
    async fn call(
        &self,
        call: &Call,
        addr: &str,
        timeout: std::time::Duration,
    ) -> Result<Response, NetError> {
        let (id, reply) = self.send(call, addr).await?;
        match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(NetError::Disconnected(addr.to_string())),
            Err(_) => {
                // Forget the call, so a server that never answers cannot grow the table.
                self.waiters().remove(&id);
                Err(NetError::Timeout {
                    addr: addr.to_string(),
                    timeout,
                })
            }
        }
    }

    fn waiters(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Result<Response, NetError>>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `call`; returns its request id and where the reply will arrive.
    async fn send(
        &self,
        call: &Call,
        addr: &str,
    ) -> Result<(u64, oneshot::Receiver<Result<Response, NetError>>), NetError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, reply) = oneshot::channel();
        self.waiters().insert(id, done);
        let head = FrameHead {
            kind: KIND_REQUEST,
            code: call.method,
            id,
            header_len: call.header.len() as u32,
            payload_len: call.payload.len() as u32,
        };
        let fixed: [u8; FIXED] = head.encode();
        let written = async {
            let mut writer = self.writer.lock().await;
            writer.write_all(&fixed).await?;
            writer.write_all(&call.header).await?;
            writer.write_all(&call.payload).await
        }
        .await;
        if let Err(error) = written {
            self.waiters().remove(&id);
            self.alive.store(false, Ordering::Relaxed);
            tracing::debug!(%addr, %error, "ff-net write failed");
            return Err(NetError::Disconnected(addr.to_string()));
        }
        Ok((id, reply))
    }
}

async fn read_replies(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    waiters: Arc<Waiters>,
    alive: Arc<AtomicBool>,
    limits: Limits,
    pool: Arc<BufferPool>,
    addr: String,
) {
    let outcome: Result<(), NetError> = async {
        while let Some(head) = read_head(&mut reader, &limits).await? {
            if head.kind != KIND_RESPONSE {
                return Err(NetError::Protocol(
                    "a server sent a request frame".to_string(),
                ));
            }
            let mut header = pool.take(head.header_len as usize);
            let mut payload = pool.take(head.payload_len as usize);
            reader.read_exact(&mut header).await?;
            reader.read_exact(&mut payload).await?;
            let result = if head.code == 0 {
                Ok(Response { header, payload })
            } else {
                Err(NetError::Remote {
                    code: head.code,
                    message: String::from_utf8_lossy(&header).into_owned(),
                })
            };
            // A caller that timed out is gone; its late reply is dropped.
            let waiter = waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&head.id);
            if let Some(waiter) = waiter {
                let _ = waiter.send(result);
            }
        }
        Ok(())
    }
    .await;
    if let Err(error) = outcome {
        tracing::debug!(%addr, %error, "ff-net connection failed");
    }
    alive.store(false, Ordering::Relaxed);
    let waiting: Vec<_> = waiters
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .collect();
    for (_, waiter) in waiting {
        let _ = waiter.send(Err(NetError::Disconnected(addr.clone())));
    }
}

/// A client's open connections, by transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Connections {
    /// Over TCP frames.
    pub tcp: usize,
    /// Over RDMA links.
    pub rdma: usize,
}

/// A client of ff-net services on any number of peers.
pub struct NetClient {
    config: NetConfig,
    pool: Arc<BufferPool>,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    rdma: Option<RdmaHere>,
}

/// Connections to one peer, used round-robin; a broken one is replaced on next use.
struct Peer {
    slots: Vec<tokio::sync::Mutex<Option<Arc<Conn>>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for NetClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetClient").finish_non_exhaustive()
    }
}

impl NetClient {
    /// A client with `config`'s limits and transport; fails only when `transport = "rdma"`
    /// and this host cannot do RDMA (the error says why).
    pub fn new(config: NetConfig) -> Result<NetClient, NetError> {
        let pool = BufferPool::new(config.buffer_pool.as_usize());
        let rdma = crate::rdma_here(&config)?;
        Ok(NetClient {
            config,
            pool,
            peers: Mutex::new(HashMap::new()),
            rdma,
        })
    }

    /// Whether connections this client opens use RDMA where the server can.
    pub fn has_rdma(&self) -> bool {
        self.rdma.is_some()
    }

    /// How many of its open connections use RDMA.
    pub async fn rdma_connections(&self) -> usize {
        self.connections().await.rdma
    }

    /// Its open connections, by transport.
    pub async fn connections(&self) -> Connections {
        let peers: Vec<Arc<Peer>> = self
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut count = Connections::default();
        for peer in peers {
            for slot in &peer.slots {
                match slot.lock().await.as_ref() {
                    Some(conn) if conn.alive() && conn.is_rdma() => count.rdma += 1,
                    Some(conn) if conn.alive() => count.tcp += 1,
                    _ => {}
                }
            }
        }
        count
    }

    fn peer(&self, addr: &str) -> Arc<Peer> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .entry(addr.to_string())
            .or_insert_with(|| {
                Arc::new(Peer {
                    slots: (0..self.config.connections_per_peer)
                        .map(|_| tokio::sync::Mutex::new(None))
                        .collect(),
                    next: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    async fn connection(&self, addr: &str) -> Result<Arc<Conn>, NetError> {
        let peer = self.peer(addr);
        let index = peer.next.fetch_add(1, Ordering::Relaxed) % peer.slots.len();
        let mut slot = peer.slots[index].lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| c.alive()) {
            return Ok(conn.clone());
        }
        let conn = Conn::open(addr, &self.config, self.pool.clone(), self.rdma.as_ref()).await?;
        let conn = Arc::new(conn);
        *slot = Some(conn.clone());
        Ok(conn)
    }
}

impl Transport for NetClient {
    async fn call(&self, addr: &str, call: Call) -> Result<Response, NetError> {
        let timeout = self.config.request_timeout.get();
        let conn = self.connection(addr).await?;
        conn.call(&call, addr, timeout).await
    }
}
