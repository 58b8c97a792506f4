//! The chunk engine's metadata records (stored protobuf-encoded in `meta.redb`).

/// A chunk's identity: the file (inode) it belongs to and its index in the file. Encoded
/// big-endian so that a file's chunks are contiguous in the metadata table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId {
    /// The file's inode id.
    pub inode: u64,
    /// The chunk's index within the file.
    pub index: u64,
}

impl ChunkId {
    /// The metadata key.
    pub fn key(&self) -> [u8; 16] {
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&self.inode.to_be_bytes());
        key[8..].copy_from_slice(&self.index.to_be_bytes());
        key
    }

    /// Parses a metadata key.
    pub fn from_key(key: &[u8]) -> Option<ChunkId> {
        let key: [u8; 16] = key.try_into().ok()?;
        let mut inode = [0u8; 8];
        let mut index = [0u8; 8];
        inode.copy_from_slice(&key[..8]);
        index.copy_from_slice(&key[8..]);
        Some(ChunkId {
            inode: u64::from_be_bytes(inode),
            index: u64::from_be_bytes(index),
        })
    }
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}:{}", self.inode, self.index)
    }
}

/// What a target holds of one chunk: the committed version readers see, and at most one
/// pending version a chain write has staged but not yet committed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChunkMeta {
    /// The version readers see.
    #[prost(message, optional, tag = "1")]
    pub committed: Option<ChunkVersion>,
    /// A staged, not yet committed version.
    #[prost(message, optional, tag = "2")]
    pub pending: Option<ChunkVersion>,
}

/// One version of a chunk's content and where it lives.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChunkVersion {
    /// Chain version number of the chunk (1 for its first write).
    #[prost(uint64, tag = "1")]
    pub version: u64,
    /// Content length in bytes.
    #[prost(uint32, tag = "2")]
    pub length: u32,
    /// CRC32C of the whole content, for comparing replicas.
    #[prost(fixed32, tag = "3")]
    pub crc32c: u32,
    /// Size class of the slot (slot size = 4 KiB << class).
    #[prost(uint32, tag = "4")]
    pub class: u32,
    /// Slot number within the class file.
    #[prost(uint64, tag = "5")]
    pub slot: u64,
    /// CRC32C of each 4 KiB block of the content (the last one over its valid bytes), so a
    /// read of any range verifies only the blocks it reads.
    #[prost(fixed32, repeated, tag = "6")]
    pub block_crcs: Vec<u32>,
    /// Identity of the write that produced this version, so a retried stage of the same write
    /// is recognised and a different write with the same version number is not.
    #[prost(uint64, tag = "7")]
    pub write_id: u64,
}
