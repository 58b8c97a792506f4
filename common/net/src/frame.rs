//! The wire format: every message is one frame.
//!
//! ```text
//! magic "FFN1" | kind u8 | reserved u8 | code u16 | request id u64 | header len u32 | payload len u32
//! header bytes | payload bytes
//! ```
//!
//! All integers little-endian; 24 bytes of fixed header. A request's `code` is its method; a
//! response's `code` is 0 for success or an error code, with the error message as header.
//! The header is small structured data (usually protobuf); the payload is bulk bytes that
//! never pass through an encoder.

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::NetError;

pub(crate) const MAGIC: [u8; 4] = *b"FFN1";
pub(crate) const FIXED: usize = 24;
pub(crate) const KIND_REQUEST: u8 = 1;
pub(crate) const KIND_RESPONSE: u8 = 2;

/// The fixed part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHead {
    pub kind: u8,
    pub code: u16,
    pub id: u64,
    pub header_len: u32,
    pub payload_len: u32,
}

impl FrameHead {
    pub(crate) fn encode(&self) -> [u8; FIXED] {
        let mut out = [0u8; FIXED];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = self.kind;
        out[6..8].copy_from_slice(&self.code.to_le_bytes());
        out[8..16].copy_from_slice(&self.id.to_le_bytes());
        out[16..20].copy_from_slice(&self.header_len.to_le_bytes());
        out[20..24].copy_from_slice(&self.payload_len.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8; FIXED], limits: &Limits) -> Result<FrameHead, NetError> {
        if bytes[..4] != MAGIC {
            return Err(NetError::Protocol(
                "not an ff-net frame (bad magic)".to_string(),
            ));
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[8..16]);
        let head = FrameHead {
            kind: bytes[4],
            code: u16::from_le_bytes([bytes[6], bytes[7]]),
            id: u64::from_le_bytes(id),
            header_len: u32_at(16),
            payload_len: u32_at(20),
        };
        if head.kind != KIND_REQUEST && head.kind != KIND_RESPONSE {
            return Err(NetError::Protocol(format!(
                "unknown frame kind {}",
                head.kind
            )));
        }
        if head.header_len as usize > limits.max_header {
            return Err(NetError::Protocol(format!(
                "frame header of {} bytes exceeds the limit of {}",
                head.header_len, limits.max_header
            )));
        }
        if head.payload_len as usize > limits.max_payload {
            return Err(NetError::Protocol(format!(
                "frame payload of {} bytes exceeds the limit of {}",
                head.payload_len, limits.max_payload
            )));
        }
        Ok(head)
    }
}

/// Size limits a peer's frames are held to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_header: usize,
    pub max_payload: usize,
}

/// Reads one frame's fixed part; `Ok(None)` at a clean end of stream.
pub(crate) async fn read_head<R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: &Limits,
) -> Result<Option<FrameHead>, NetError> {
    let mut fixed = [0u8; FIXED];
    match reader.read_exact(&mut fixed).await {
        Ok(_) => FrameHead::decode(&fixed, limits).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(NetError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_round_trip_and_bad_ones_are_refused() {
        let limits = Limits {
            max_header: 100,
            max_payload: 1000,
        };
        let head = FrameHead {
            kind: KIND_REQUEST,
            code: 7,
            id: 0x1122_3344_5566_7788,
            header_len: 10,
            payload_len: 999,
        };
        assert_eq!(FrameHead::decode(&head.encode(), &limits).unwrap(), head);
        let mut bad = head.encode();
        bad[0] = b'X';
        assert!(FrameHead::decode(&bad, &limits).is_err());
        let too_big = FrameHead {
            payload_len: 1001,
            ..head
        };
        assert!(FrameHead::decode(&too_big.encode(), &limits).is_err());
        let odd_kind = FrameHead { kind: 9, ..head };
        assert!(FrameHead::decode(&odd_kind.encode(), &limits).is_err());
    }
}
