//! The serving side of ff-net over an RDMA link: each `Request` is answered by its own task (at
//! most `max_in_flight_per_connection` per link; beyond that the link is not read, which pushes
//! back on the client). The server pulls the request payload with an RDMA READ, runs the
//! handler, and for a reply payload too large for a message asks the client for a buffer, then
//! pushes it with an RDMA WRITE before the `Reply`. One-sided transfers take a permit of the
//! process's `rdma_transfers` bound, and their staging buffers come from the bounded pool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{Semaphore, oneshot, watch};

use super::context::Context;
use super::link::{Link, RemoteBuf};
use super::wire::{
    INLINE_REPLY, MESSAGE_SIZE, MESSAGES_PER_CALL, Message, rdma_error, receive_message,
    send_message,
};
use crate::pool::{BufferPool, PooledBuf};
use crate::{Fault, Handler, NetConfig, NetError, Reply, Request};

type Grants = Mutex<HashMap<u64, oneshot::Sender<RemoteBuf>>>;

/// What every call of one link needs.
struct Serving<H> {
    link: Link,
    context: Arc<Context>,
    handler: Arc<H>,
    pool: Arc<BufferPool>,
    grants: Grants,
    peer: SocketAddr,
    grant_timeout: std::time::Duration,
    limits: crate::frame::Limits,
}

/// Serves calls on the RDMA link set up over `stream` until the client goes or the server
/// stops.
pub(crate) async fn serve<H: Handler>(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    handler: Arc<H>,
    context: Arc<Context>,
    config: &NetConfig,
    pool: Arc<BufferPool>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), NetError> {
    let calls = config.max_in_flight_per_connection;
    let establish = Link::establish(
        stream,
        &context.pd,
        calls as u32 * MESSAGES_PER_CALL,
        calls as u32 * (MESSAGES_PER_CALL + 1),
        MESSAGE_SIZE,
    );
    let link = tokio::time::timeout(config.connect_timeout.get(), establish)
        .await
        .map_err(|_| NetError::Protocol("no RDMA handshake in time".to_string()))?
        .map_err(rdma_error)?;
    let serving = Arc::new(Serving {
        link,
        context,
        handler,
        pool,
        grants: Mutex::new(HashMap::new()),
        peer,
        grant_timeout: config.request_timeout.get(),
        limits: config.limits(),
    });
    let permits = Arc::new(Semaphore::new(calls));
    let result = loop {
        let bytes = tokio::select! {
            _ = stopped.changed() => break Ok(()),
            bytes = receive_message(&serving.link) => match bytes {
                Ok(bytes) => bytes,
                // The client went away.
                Err(_) => break Ok(()),
            },
        };
        match Message::decode(&bytes) {
            Some(Message::Grant { id, buffer }) => {
                let waiter = serving
                    .grants
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(buffer);
                }
            }
            Some(Message::Request {
                header_len,
                header_in_payload,
                payload,
                ..
            }) if header_len as usize > serving.limits.max_header
                || payload.len as usize
                    > serving.limits.max_payload
                        + if header_in_payload {
                            header_len as usize
                        } else {
                            0
                        } =>
            {
                break Err(NetError::Protocol(format!(
                    "a request of {header_len} header and {} payload bytes is over the limits",
                    payload.len
                )));
            }
            Some(Message::Request {
                id,
                method,
                header_len,
                header_in_payload,
                payload,
                header,
            }) => {
                // Calls wait for a permit in their own task: the link is always read, so the
                // grants that running calls wait for are never stuck behind a new request.
                let permits = permits.clone();
                let serving = serving.clone();
                tokio::spawn(async move {
                    let Ok(permit) = permits.acquire_owned().await else {
                        return;
                    };
                    let reply = match serving
                        .take_request(method, header_len, header_in_payload, payload, header)
                        .await
                    {
                        Ok(request) => serving.handler.handle(request).await,
                        Err(error) => Err(Fault {
                            code: u16::MAX,
                            message: format!("reading the request payload: {error}"),
                        }),
                    };
                    if let Err(error) = serving.answer(id, reply).await {
                        tracing::debug!(peer = %serving.peer, %error, "rdma reply failed");
                        serving.link.close();
                    }
                    drop(permit);
                });
            }
            _ => {
                break Err(NetError::Protocol(
                    "a client sent a message a server cannot take".to_string(),
                ));
            }
        }
    };
    serving.link.close();
    result
}

impl<H: Handler> Serving<H> {
    /// The request as the handler sees it: header and payload pulled from the client if needed.
    async fn take_request(
        &self,
        method: u16,
        header_len: u32,
        header_in_payload: bool,
        payload: RemoteBuf,
        header: Vec<u8>,
    ) -> Result<Request, NetError> {
        let mut header_buf = self.pool.take(header_len as usize);
        let mut payload_buf: PooledBuf;
        if payload.len == 0 {
            header_buf.copy_from_slice(&header);
            payload_buf = self.pool.take(0);
        } else {
            let len = payload.len as usize;
            let _transfer = self.context.transfers.acquire().await.map_err(rdma_error)?;
            let staging = self.context.pool.take(len).await.map_err(rdma_error)?;
            let staging = self
                .link
                .read(staging, len, payload)
                .await
                .map_err(rdma_error)?;
            let bytes = &staging.as_slice()[..len];
            let split = if header_in_payload {
                header_buf.copy_from_slice(&bytes[..header_len as usize]);
                header_len as usize
            } else {
                header_buf.copy_from_slice(&header);
                0
            };
            payload_buf = self.pool.take(len - split);
            payload_buf.copy_from_slice(&bytes[split..]);
            self.context.pool.give(staging);
        }
        Ok(Request {
            method,
            header: header_buf,
            payload: payload_buf,
            peer: self.peer,
        })
    }

    /// Sends the outcome of call `id`: inline when small, else after writing the payload into
    /// the buffer the client grants.
    async fn answer(&self, id: u64, reply: Result<Reply, Fault>) -> Result<(), NetError> {
        let (code, header, payload) = match reply {
            Ok(reply) => (0, reply.header, reply.payload),
            Err(fault) => {
                let mut message = fault.message.into_bytes();
                message.truncate(INLINE_REPLY);
                (fault.code.max(1), Bytes::from(message), Bytes::new())
            }
        };
        if header.len() > INLINE_REPLY {
            let message = format!(
                "a reply header of {} bytes is over RDMA's {INLINE_REPLY}",
                header.len()
            );
            return self.fault(id, &message).await;
        }
        if header.len() + payload.len() <= INLINE_REPLY {
            let reply = Message::Reply {
                id,
                code,
                header: header.to_vec(),
                payload_len: payload.len() as u32,
                inline_payload: Some(payload.to_vec()),
            };
            return send_message(&self.link, &reply).await;
        }
        let (granted, grant) = oneshot::channel();
        self.grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, granted);
        let ask = Message::AskToWrite {
            id,
            len: payload.len() as u32,
        };
        send_message(&self.link, &ask).await?;
        let buffer = match tokio::time::timeout(self.grant_timeout, grant).await {
            Ok(Ok(buffer)) => buffer,
            _ => {
                self.grants
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                return Err(NetError::Protocol(
                    "the client granted no reply buffer".to_string(),
                ));
            }
        };
        if (buffer.len as usize) < payload.len() {
            // The call is gone on the client (a zero grant) or the grant is short.
            return self.fault(id, "no room granted for the reply").await;
        }
        {
            let _transfer = self.context.transfers.acquire().await.map_err(rdma_error)?;
            let mut staging = self
                .context
                .pool
                .take(payload.len())
                .await
                .map_err(rdma_error)?;
            staging.as_mut_slice()[..payload.len()].copy_from_slice(&payload);
            let staging = self
                .link
                .write(staging, payload.len(), buffer)
                .await
                .map_err(rdma_error)?;
            self.context.pool.give(staging);
        }
        let reply = Message::Reply {
            id,
            code,
            header: header.to_vec(),
            payload_len: payload.len() as u32,
            inline_payload: None,
        };
        send_message(&self.link, &reply).await
    }

    async fn fault(&self, id: u64, message: &str) -> Result<(), NetError> {
        let reply = Message::Reply {
            id,
            code: u16::MAX,
            header: message.as_bytes().to_vec(),
            payload_len: 0,
            inline_payload: Some(Vec::new()),
        };
        send_message(&self.link, &reply).await
    }
}
