//! Buffers for Direct I/O: 4 KiB-aligned address and length, as `O_DIRECT` requires.

use aligned_vec::{AVec, ConstAlign};

/// The alignment and size granule of Direct I/O.
pub const BLOCK: usize = 4096;

/// Rounds `n` up to a multiple of [`BLOCK`].
pub const fn round_up(n: usize) -> usize {
    n.div_ceil(BLOCK) * BLOCK
}

/// A zero-initialised byte buffer whose address is [`BLOCK`]-aligned.
#[derive(Debug, Clone)]
pub struct AlignedBuf {
    bytes: AVec<u8, ConstAlign<BLOCK>>,
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes (`len` need not be a multiple of [`BLOCK`], but Direct I/O
    /// transfers must be).
    pub fn zeroed(len: usize) -> Self {
        let mut bytes = AVec::with_capacity(BLOCK, len.max(1));
        bytes.resize(len, 0);
        AlignedBuf { bytes }
    }

    /// A buffer holding a copy of `data`, padded with zeros to a multiple of [`BLOCK`].
    pub fn padded_copy(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(round_up(data.len()));
        buf.as_mut_slice()[..data.len()].copy_from_slice(data);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.bytes.as_mut_slice()
    }

    /// Changes the length, zero-filling any growth.
    pub fn resize(&mut self, len: usize) {
        self.bytes.resize(len, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_padded() {
        let buf = AlignedBuf::padded_copy(b"hello");
        assert_eq!(buf.len(), BLOCK);
        assert_eq!(buf.as_slice().as_ptr() as usize % BLOCK, 0);
        assert_eq!(&buf.as_slice()[..5], b"hello");
        assert!(buf.as_slice()[5..].iter().all(|b| *b == 0));
        assert_eq!(round_up(0), 0);
        assert_eq!(round_up(1), BLOCK);
        assert_eq!(round_up(BLOCK + 1), 2 * BLOCK);
    }
}
