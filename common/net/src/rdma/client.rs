//! The calling side of ff-net over an RDMA link. A call stages its payload (and a header too
//! large for a message) in a registered buffer the server pulls with an RDMA READ, and sends a
//! `Request`. A reply payload too large for a message is preceded by the server's `AskToWrite`:
//! this side takes a registered buffer from its bounded pool (waiting while it is full, which is
//! what stops many servers from overrunning it) and grants it. The reply is copied out into the
//! process's receive pool and the registered buffers go back to theirs.
//!
//! Calls in flight on a link are bounded by the receives the server posted (credits), so no
//! message ever finds the peer without a receive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, oneshot};

use super::context::Context;
use super::link::{Link, RemoteBuf};
use super::verbs::RegisteredMemory;
use super::wire::{
    INLINE_REQUEST_HEADER, MESSAGE_SIZE, MESSAGES_PER_CALL, Message, rdma_error, receive_message,
    send_message,
};
use crate::pool::BufferPool;
use crate::{Call, NetConfig, NetError, Response};

/// A call waiting for its reply, with the registered buffers the server may still touch. A call
/// whose caller gave up (timed out, cancelled) stays until its reply or the link's end, so
/// its buffers are never reused while the server may still read or write them.
struct Waiting {
    done: oneshot::Sender<Result<Response, NetError>>,
    /// The staged payload the server reads.
    staged: Option<RegisteredMemory>,
    /// The buffer granted for the reply payload.
    granted: Option<RegisteredMemory>,
}

type Calls = Mutex<HashMap<u64, Waiting>>;

/// One RDMA connection to a server.
pub(crate) struct RdmaConn {
    link: Arc<Link>,
    context: Arc<Context>,
    calls: Arc<Calls>,
    credits: Semaphore,
    next_id: AtomicU64,
    addr: String,
}

impl RdmaConn {
    /// Sets up the link on `stream` (after the hello chose RDMA) and starts reading replies.
    pub(crate) async fn establish(
        stream: tokio::net::TcpStream,
        context: &Arc<Context>,
        config: &NetConfig,
        pool: Arc<BufferPool>,
        addr: &str,
    ) -> Result<RdmaConn, NetError> {
        let calls = config.max_in_flight_per_connection as u32;
        let establish = Link::establish(
            stream,
            &context.pd,
            calls * MESSAGES_PER_CALL,
            calls * (MESSAGES_PER_CALL + 1),
            MESSAGE_SIZE,
        );
        let failed = |reason: String| NetError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let link = tokio::time::timeout(config.connect_timeout.get(), establish)
            .await
            .map_err(|_| {
                failed(format!(
                    "no RDMA handshake within {}",
                    config.connect_timeout
                ))
            })?
            .map_err(|e| failed(e.to_string()))?;
        let conn = RdmaConn {
            link: Arc::new(link),
            context: context.clone(),
            calls: Arc::new(Mutex::new(HashMap::new())),
            credits: Semaphore::new(config.max_in_flight_per_connection),
            next_id: AtomicU64::new(1),
            addr: addr.to_string(),
        };
        tokio::spawn(read_replies(
            conn.link.clone(),
            conn.context.clone(),
            conn.calls.clone(),
            pool,
            addr.to_string(),
        ));
        Ok(conn)
    }

    /// Whether the link still works.
    pub(crate) fn alive(&self) -> bool {
        !self.link.is_broken()
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiting>> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `call` and waits up to `timeout` for its reply.
    pub(crate) async fn call(
        &self,
        call: &Call,
        timeout: std::time::Duration,
    ) -> Result<Response, NetError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || NetError::Timeout {
            addr: self.addr.clone(),
            timeout,
        };
        let _credit = tokio::time::timeout_at(deadline, self.credits.acquire())
            .await
            .map_err(|_| timed_out())?
            .map_err(|_| NetError::Disconnected(self.addr.clone()))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let header_in_payload = call.header.len() > INLINE_REQUEST_HEADER;
        let staged_len = call.payload.len()
            + if header_in_payload {
                call.header.len()
            } else {
                0
            };
        let staged = if staged_len == 0 {
            None
        } else {
            let mut staged = tokio::time::timeout_at(deadline, self.context.pool.take(staged_len))
                .await
                .map_err(|_| timed_out())?
                .map_err(rdma_error)?;
            let bytes = staged.as_mut_slice();
            let mut at = 0;
            if header_in_payload {
                bytes[..call.header.len()].copy_from_slice(&call.header);
                at = call.header.len();
            }
            bytes[at..at + call.payload.len()].copy_from_slice(&call.payload);
            Some(staged)
        };
        let payload = staged
            .as_ref()
            .map_or(RemoteBuf::NONE, |staged| RemoteBuf::of(staged, staged_len));
        let (done, reply) = oneshot::channel();
        self.calls().insert(
            id,
            Waiting {
                done,
                staged,
                granted: None,
            },
        );
        let request = Message::Request {
            id,
            method: call.method,
            header_len: call.header.len() as u32,
            header_in_payload,
            payload,
            header: if header_in_payload {
                Vec::new()
            } else {
                call.header.to_vec()
            },
        };
        match tokio::time::timeout_at(deadline, send_message(&self.link, &request)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                // The link broke: nothing of this call will be read or written any more.
                self.calls().remove(&id);
                return Err(error);
            }
            Err(_) => return Err(timed_out()),
        }
        match tokio::time::timeout_at(deadline, reply).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(NetError::Disconnected(self.addr.clone())),
            // The call stays registered until its late reply (which returns its buffers) or
            // the link's end.
            Err(_) => Err(timed_out()),
        }
    }
}

impl Drop for RdmaConn {
    fn drop(&mut self) {
        self.link.close();
    }
}

/// Answers the server's asks and completes calls with their replies until the link breaks,
/// then fails every call still waiting.
async fn read_replies(
    link: Arc<Link>,
    context: Arc<Context>,
    calls: Arc<Calls>,
    pool: Arc<BufferPool>,
    addr: String,
) {
    let lock = || calls.lock().unwrap_or_else(|p| p.into_inner());
    let outcome: Result<(), NetError> = async {
        loop {
            let bytes = receive_message(&link).await?;
            match Message::decode(&bytes) {
                Some(Message::AskToWrite { id, len }) => {
                    // The server has run the call, so it has read the staged payload: that
                    // memory can serve the grant (calls holding payloads never starve replies).
                    let staged = lock().get_mut(&id).and_then(|w| w.staged.take());
                    if let Some(staged) = staged {
                        context.pool.give(staged);
                    }
                    // Granting may wait for registered memory: not on this loop.
                    tokio::spawn(grant(link.clone(), context.clone(), calls.clone(), id, len));
                }
                Some(Message::Reply {
                    id,
                    code,
                    header,
                    payload_len,
                    inline_payload,
                }) => {
                    let Some(waiting) = lock().remove(&id) else {
                        // A call that timed out: its reply is dropped.
                        continue;
                    };
                    let result = if code != 0 {
                        Err(NetError::Remote {
                            code,
                            message: String::from_utf8_lossy(&header).into_owned(),
                        })
                    } else {
                        let payload = match (&inline_payload, &waiting.granted) {
                            (Some(inline), _) => Some(inline.as_slice()),
                            (None, Some(granted)) => granted.as_slice().get(..payload_len as usize),
                            (None, None) => (payload_len == 0).then_some(&[][..]),
                        };
                        match payload {
                            Some(payload) => {
                                let mut header_buf = pool.take(header.len());
                                header_buf.copy_from_slice(&header);
                                let mut payload_buf = pool.take(payload.len());
                                payload_buf.copy_from_slice(payload);
                                Ok(Response {
                                    header: header_buf,
                                    payload: payload_buf,
                                })
                            }
                            None => Err(NetError::Protocol(format!(
                                "a reply of {payload_len} bytes arrived without a buffer"
                            ))),
                        }
                    };
                    for buffer in [waiting.staged, waiting.granted].into_iter().flatten() {
                        context.pool.give(buffer);
                    }
                    let _ = waiting.done.send(result);
                }
                _ => {
                    return Err(NetError::Protocol(
                        "the server sent a message a client cannot take".to_string(),
                    ));
                }
            }
        }
    }
    .await;
    if let Err(error) = outcome {
        tracing::debug!(%addr, %error, "rdma connection ended");
    }
    link.close();
    let waiting: Vec<Waiting> = lock().drain().map(|(_, w)| w).collect();
    for call in waiting {
        let _ = call.done.send(Err(NetError::Disconnected(addr.clone())));
    }
}

/// Grants the buffer the server asked for (a zero-length one when the call is gone).
async fn grant(link: Arc<Link>, context: Arc<Context>, calls: Arc<Calls>, id: u64, len: u32) {
    let waiting = calls
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains_key(&id);
    let granted = if waiting {
        context.pool.take(len as usize).await.ok()
    } else {
        None
    };
    let buffer = match granted {
        Some(granted) => {
            let remote = RemoteBuf::of(&granted, len as usize);
            let mut calls = calls.lock().unwrap_or_else(|p| p.into_inner());
            match calls.get_mut(&id) {
                Some(waiting) => {
                    waiting.granted = Some(granted);
                    remote
                }
                // Timed out meanwhile: never shown to the server, so it can be reused.
                None => {
                    context.pool.give(granted);
                    RemoteBuf::NONE
                }
            }
        }
        None => RemoteBuf::NONE,
    };
    if let Err(error) = send_message(&link, &Message::Grant { id, buffer }).await {
        tracing::debug!(%error, "could not grant a reply buffer");
    }
}
