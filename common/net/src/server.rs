//! The serving side: accepts connections, answers their hello (TCP frames, or an RDMA link when
//! both ends can: see `rdma::server`), reads request frames, runs the handler for each (up to a
//! bound per connection; beyond it the connection is not read, which pushes back on the
//! sender), and writes reply frames in completion order.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::frame::{FIXED, FrameHead, KIND_REQUEST, KIND_RESPONSE, Limits, read_head};
use crate::hello::{self, Abilities};
use crate::pool::{BufferPool, PooledBuf};
use crate::{NetConfig, NetError, RdmaHere};

/// A call as the handler sees it.
#[derive(Debug)]
pub struct Request {
    /// The method number.
    pub method: u16,
    /// Structured arguments.
    pub header: PooledBuf,
    /// Bulk bytes.
    pub payload: PooledBuf,
    /// Who called.
    pub peer: SocketAddr,
}

/// A successful answer.
#[derive(Debug, Default)]
pub struct Reply {
    /// Structured results.
    pub header: Bytes,
    /// Bulk bytes.
    pub payload: Bytes,
}

/// An error answer: `code` (never 0) and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The error code.
    pub code: u16,
    /// What went wrong.
    pub message: String,
}

/// What a service implements.
pub trait Handler: Send + Sync + 'static {
    /// Answers one call.
    fn handle(
        &self,
        request: Request,
    ) -> impl std::future::Future<Output = Result<Reply, Fault>> + Send;
}

/// A running server; dropping it stops accepting (open connections finish their calls).
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    rdma: bool,
}

/// What every connection of a server shares.
struct Serving<H> {
    handler: Arc<H>,
    config: NetConfig,
    pool: Arc<BufferPool>,
    rdma: Option<RdmaHere>,
}

impl Server {
    /// Serves `handler` on `listener`; fails when `transport = "rdma"` and this host cannot
    /// do RDMA (the error says why).
    pub fn start<H: Handler>(
        listener: TcpListener,
        handler: Arc<H>,
        config: &NetConfig,
    ) -> std::io::Result<Server> {
        let local_addr = listener.local_addr()?;
        let rdma = crate::rdma_here(config).map_err(std::io::Error::other)?;
        let (stop, stopped) = watch::channel(false);
        let serving = Arc::new(Serving {
            handler,
            config: config.clone(),
            pool: BufferPool::new(config.buffer_pool.as_usize()),
            rdma,
        });
        let rdma = serving.rdma.is_some();
        tokio::spawn(accept_loop(listener, serving, stopped));
        Ok(Server {
            local_addr,
            stop,
            rdma,
        })
    }

    /// Whether it serves RDMA to clients that can.
    pub fn has_rdma(&self) -> bool {
        self.rdma
    }

    /// The address served.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting new connections and closes idle ones.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn accept_loop<H: Handler>(
    listener: TcpListener,
    serving: Arc<Serving<H>>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let connection = greet(stream, peer, serving.clone(), stopped.clone());
                    tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(%peer, %error, "ff-net connection closed");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "ff-net accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Answers the hello, then serves the connection over the transport chosen.
async fn greet<H: Handler>(
    mut stream: TcpStream,
    peer: SocketAddr,
    serving: Arc<Serving<H>>,
    stopped: watch::Receiver<bool>,
) -> Result<(), NetError> {
    let config = &serving.config;
    let mine = Abilities::of(config.transport, serving.rdma.is_some());
    let use_rdma = tokio::time::timeout(
        config.connect_timeout.get(),
        hello::server(&mut stream, mine),
    )
    .await
    .map_err(|_| NetError::Protocol("no hello in time".to_string()))??;
    match serving.rdma.as_ref().filter(|_| use_rdma) {
        #[cfg(feature = "rdma")]
        Some(context) => {
            crate::rdma::server::serve(
                stream,
                peer,
                serving.handler.clone(),
                context.clone(),
                config,
                serving.pool.clone(),
                stopped,
            )
            .await
        }
        #[cfg(not(feature = "rdma"))]
        Some(never) => match *never {},
        None => {
            serve_connection(
                stream,
                peer,
                serving.handler.clone(),
                config.limits(),
                config.max_in_flight_per_connection,
                serving.pool.clone(),
                stopped,
            )
            .await
        }
    }
}

async fn serve_connection<H: Handler>(
    stream: TcpStream,
    peer: SocketAddr,
    handler: Arc<H>,
    limits: Limits,
    in_flight: usize,
    pool: Arc<BufferPool>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), NetError> {
    let (mut reader, writer) = stream.into_split();
    let (replies, outgoing) = mpsc::channel::<(u64, Result<Reply, Fault>)>(in_flight);
    let writer_task = tokio::spawn(write_replies(writer, outgoing));
    let permits = Arc::new(Semaphore::new(in_flight));
    let result = loop {
        let head = tokio::select! {
            _ = stopped.changed() => break Ok(()),
            head = read_head(&mut reader, &limits) => head,
        };
        let head = match head {
            Ok(Some(head)) => head,
            Ok(None) => break Ok(()),
            Err(error) => break Err(error),
        };
        if head.kind != KIND_REQUEST {
            break Err(NetError::Protocol(
                "a client sent a response frame".to_string(),
            ));
        }
        let mut header = pool.take(head.header_len as usize);
        let mut payload = pool.take(head.payload_len as usize);
        if let Err(error) = reader.read_exact(&mut header).await {
            break Err(NetError::Io(error));
        }
        if let Err(error) = reader.read_exact(&mut payload).await {
            break Err(NetError::Io(error));
        }
        // Waiting here leaves the socket unread: the bound on calls per connection.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break Ok(());
        };
        let handler = handler.clone();
        let replies = replies.clone();
        tokio::spawn(async move {
            let request = Request {
                method: head.code,
                header,
                payload,
                peer,
            };
            let reply = handler.handle(request).await;
            let _ = replies.send((head.id, reply)).await;
            drop(permit);
        });
    };
    drop(replies);
    let _ = writer_task.await;
    result
}

async fn write_replies(
    writer: tokio::net::tcp::OwnedWriteHalf,
    mut outgoing: mpsc::Receiver<(u64, Result<Reply, Fault>)>,
) -> Result<(), NetError> {
    let mut writer = BufWriter::with_capacity(64 * 1024, writer);
    while let Some((id, reply)) = outgoing.recv().await {
        let (code, header, payload) = match reply {
            Ok(reply) => (0, reply.header, reply.payload),
            Err(fault) => (
                fault.code.max(1),
                Bytes::from(fault.message.into_bytes()),
                Bytes::new(),
            ),
        };
        let head = FrameHead {
            kind: KIND_RESPONSE,
            code,
            id,
            header_len: header.len() as u32,
            payload_len: payload.len() as u32,
        };
        let fixed: [u8; FIXED] = head.encode();
        writer.write_all(&fixed).await?;
        writer.write_all(&header).await?;
        writer.write_all(&payload).await?;
        // Flush when nothing else is ready to go, so replies are batched under load.
        if outgoing.is_empty() {
            writer.flush().await?;
        }
    }
    writer.flush().await?;
    Ok(())
}
