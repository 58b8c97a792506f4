//! The messages of ff-net calls over an RDMA link (each one SEND into a posted receive):
//!
//! - `Request` (client → server): the call's id, method and header (inline, or at the front of
//!   the payload buffer when it does not fit a message), and the payload as a buffer of the
//!   client's for the server to pull with an RDMA READ.
//! - `AskToWrite` (server → client): the reply's payload is this large; where may it go? The
//!   server writes into a client only with the client's answer, so a client's memory bounds what
//!   any number of servers push into it (3FS's request-to-send).
//! - `Grant` (client → server): the buffer to write it into.
//! - `Reply` (server → client): the outcome and header; the payload is already in the granted
//!   buffer (RC delivers the SEND after the WRITE before it), or inline when small.

use super::link::{Link, RemoteBuf};
use crate::NetError;

/// Largest message (the size of every posted receive).
pub const MESSAGE_SIZE: usize = 16 * 1024;

const REQUEST: u8 = b'Q';
const ASK_TO_WRITE: u8 = b'S';
const GRANT: u8 = b'B';
const REPLY: u8 = b'P';

/// Bytes of a request before its inline header.
const REQUEST_FIXED: usize = 1 + 8 + 2 + 1 + 4 + RemoteBuf::ENCODED_LEN;
/// Bytes of a reply before its inline header and payload.
const REPLY_FIXED: usize = 1 + 8 + 2 + 4 + 4 + 1;

/// Most header bytes a request carries inline.
pub const INLINE_REQUEST_HEADER: usize = MESSAGE_SIZE - REQUEST_FIXED;
/// Most header plus payload bytes a reply carries inline.
pub const INLINE_REPLY: usize = MESSAGE_SIZE - REPLY_FIXED;

/// A message of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A call.
    Request {
        /// Call id (unique on the link while in flight).
        id: u64,
        /// The method.
        method: u16,
        /// The header's length.
        header_len: u32,
        /// Whether the header is at the front of `payload` instead of inline.
        header_in_payload: bool,
        /// The client's buffer holding the payload (length 0: none).
        payload: RemoteBuf,
        /// The inline header (empty when it is in the payload buffer).
        header: Vec<u8>,
    },
    /// The server asks where to write a reply payload of `len` bytes.
    AskToWrite {
        /// Call id.
        id: u64,
        /// The payload's length.
        len: u32,
    },
    /// The client's answer: write it here.
    Grant {
        /// Call id.
        id: u64,
        /// The buffer.
        buffer: RemoteBuf,
    },
    /// The outcome of a call.
    Reply {
        /// Call id.
        id: u64,
        /// 0 for success, else the fault code (the header is then the message).
        code: u16,
        /// The header.
        header: Vec<u8>,
        /// The payload's length.
        payload_len: u32,
        /// The payload when inline (else it is in the granted buffer).
        inline_payload: Option<Vec<u8>>,
    },
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

impl Message {
    /// Its encoding into `out` (cleared first); at most [`MESSAGE_SIZE`] bytes when the inline
    /// parts respect the `INLINE_*` limits.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        match self {
            Message::Request {
                id,
                method,
                header_len,
                header_in_payload,
                payload,
                header,
            } => {
                out.push(REQUEST);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&method.to_be_bytes());
                out.push(u8::from(*header_in_payload));
                out.extend_from_slice(&header_len.to_be_bytes());
                payload.encode(out);
                out.extend_from_slice(header);
            }
            Message::AskToWrite { id, len } => {
                out.push(ASK_TO_WRITE);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
            }
            Message::Grant { id, buffer } => {
                out.push(GRANT);
                out.extend_from_slice(&id.to_be_bytes());
                buffer.encode(out);
            }
            Message::Reply {
                id,
                code,
                header,
                payload_len,
                inline_payload,
            } => {
                out.push(REPLY);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&code.to_be_bytes());
                out.extend_from_slice(&(header.len() as u32).to_be_bytes());
                out.extend_from_slice(&payload_len.to_be_bytes());
                out.push(u8::from(inline_payload.is_some()));
                out.extend_from_slice(header);
                if let Some(payload) = inline_payload {
                    out.extend_from_slice(payload);
                }
            }
        }
    }

    /// Decodes a received message; None if it is malformed.
    pub fn decode(bytes: &[u8]) -> Option<Message> {
        let id = u64_at(bytes, 1)?;
        match *bytes.first()? {
            REQUEST => {
                let header_in_payload = *bytes.get(11)? != 0;
                let header_len = u32_at(bytes, 12)?;
                let payload = RemoteBuf::decode(bytes.get(16..)?)?;
                let header = bytes.get(REQUEST_FIXED..)?.to_vec();
                let consistent = if header_in_payload {
                    header.is_empty() && header_len <= payload.len
                } else {
                    header.len() == header_len as usize
                };
                consistent.then_some(Message::Request {
                    id,
                    method: u16_at(bytes, 9)?,
                    header_len,
                    header_in_payload,
                    payload,
                    header,
                })
            }
            ASK_TO_WRITE => (bytes.len() == 13).then_some(Message::AskToWrite {
                id,
                len: u32_at(bytes, 9)?,
            }),
            GRANT => Some(Message::Grant {
                id,
                buffer: RemoteBuf::decode(bytes.get(9..)?)?,
            }),
            REPLY => {
                let code = u16_at(bytes, 9)?;
                let header_len = u32_at(bytes, 11)? as usize;
                let payload_len = u32_at(bytes, 15)?;
                let inline = *bytes.get(19)? != 0;
                let header = bytes.get(REPLY_FIXED..REPLY_FIXED + header_len)?.to_vec();
                let rest = bytes.get(REPLY_FIXED + header_len..)?;
                let inline_payload = match (inline, rest.len()) {
                    (true, n) if n == payload_len as usize => Some(rest.to_vec()),
                    (false, 0) => None,
                    _ => return None,
                };
                Some(Message::Reply {
                    id,
                    code,
                    header,
                    payload_len,
                    inline_payload,
                })
            }
            _ => None,
        }
    }
}

/// Messages each side may have in flight per call (request and grant; ask and reply).
pub(crate) const MESSAGES_PER_CALL: u32 = 2;

/// Sends `message` on `link`.
pub(crate) async fn send_message(link: &Link, message: &Message) -> Result<(), NetError> {
    let mut bytes = Vec::with_capacity(256);
    message.encode(&mut bytes);
    link.send_bytes(&bytes)
        .await
        .map_err(|e| NetError::Disconnected(e.to_string()))
}

/// Receives the next message on `link`: its bytes (the receive is posted again at once).
pub(crate) async fn receive_message(link: &Link) -> Result<Vec<u8>, NetError> {
    let (buffer, len) = link
        .recv()
        .await
        .map_err(|e| NetError::Disconnected(e.to_string()))?;
    let bytes = buffer.as_slice()[..len].to_vec();
    link.repost(buffer)
        .map_err(|e| NetError::Disconnected(e.to_string()))?;
    Ok(bytes)
}

pub(crate) fn rdma_error(error: impl std::fmt::Display) -> NetError {
    NetError::Io(std::io::Error::other(format!("rdma: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(message: Message) {
        let mut bytes = Vec::new();
        message.encode(&mut bytes);
        assert!(bytes.len() <= MESSAGE_SIZE);
        assert_eq!(Message::decode(&bytes), Some(message));
        // Every truncation is refused, not misread.
        for cut in 0..bytes.len() {
            let decoded = Message::decode(&bytes[..cut]);
            assert!(decoded.is_none(), "{cut} bytes decoded as {decoded:?}");
        }
    }

    #[test]
    fn messages_survive_encoding_and_truncations_are_refused() {
        let buffer = RemoteBuf {
            addr: 0x7000_0000,
            rkey: 7,
            len: 1 << 20,
        };
        round_trip(Message::Request {
            id: 9,
            method: 3,
            header_len: 5,
            header_in_payload: false,
            payload: buffer,
            header: b"hello".to_vec(),
        });
        round_trip(Message::Request {
            id: 10,
            method: 3,
            header_len: 70_000,
            header_in_payload: true,
            payload: buffer,
            header: Vec::new(),
        });
        round_trip(Message::AskToWrite { id: 11, len: 4096 });
        round_trip(Message::Grant { id: 12, buffer });
        round_trip(Message::Reply {
            id: 13,
            code: 0,
            header: b"ok".to_vec(),
            payload_len: 3,
            inline_payload: Some(b"abc".to_vec()),
        });
        round_trip(Message::Reply {
            id: 14,
            code: 5,
            header: b"no such chunk".to_vec(),
            payload_len: 1 << 20,
            inline_payload: None,
        });
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(Message::decode(b""), None);
        assert_eq!(Message::decode(b"Zxxxxxxxxxxxxxxxxxxxxx"), None);
        // A header length that disagrees with the bytes.
        let mut bytes = Vec::new();
        Message::Request {
            id: 1,
            method: 1,
            header_len: 2,
            header_in_payload: false,
            payload: RemoteBuf {
                addr: 0,
                rkey: 0,
                len: 0,
            },
            header: b"ab".to_vec(),
        }
        .encode(&mut bytes);
        bytes.push(b'c');
        assert_eq!(Message::decode(&bytes), None);
    }
}
