//! The chunk engine of one storage target: chunk content in size-class files written with
//! Direct I/O, chunk metadata in redb.
//!
//! Layout of a target directory:
//!
//! ```text
//! meta.redb              chunk id -> ChunkMeta; per class: capacity and free slots
//! class-4KiB.dat ...     one file per size class, slots of 4 KiB << class bytes
//! ```
//!
//! Every write is copy-on-write: the new content of the whole chunk goes to a free slot,
//! `fdatasync`, and only then does a metadata transaction point the chunk's pending version at
//! it; committing makes pending the committed version and frees the old slot. So the committed
//! version is never overwritten in place, a torn write can only hit a slot nothing points to,
//! and metadata never points at data that is not durable. Every 4 KiB block has a CRC32C in the
//! metadata and is verified on every read. Class files grow in steps written with zeros (not
//! fallocated), so later writes never pay for converting unwritten extents (ADR 003).

pub mod locks;
pub mod meta;
mod meta_writer;

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ff_config::{ByteSize, ConfigError, ensure};
use prost::Message as _;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::buf::{AlignedBuf, BLOCK, round_up};
use crate::io::{Io, IoBackend, open_direct};
use locks::KeyLocks;
pub use meta::{ChunkId, ChunkMeta, ChunkVersion};
use meta_writer::{MetaChange, MetaWriter};

const CHUNKS: TableDefinition<'static, &'static [u8], &'static [u8]> =
    TableDefinition::new("chunks");
/// class -> number of slots the class file holds.
const CAPACITY: TableDefinition<'static, u32, u64> = TableDefinition::new("class_capacity");
/// (class, slot) of every slot no version points to.
const FREE: TableDefinition<'static, (u32, u64), ()> = TableDefinition::new("free_slots");

/// Serialises class-file growth in this process (see `ChunkEngine::allocate`).
static GROWTH: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Largest single zero-fill write when a class file grows.
const GROWTH_WRITE: usize = 4 << 20;

/// Configuration of the chunk engines of a storage daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// `io_uring` (one ring per target) or `psync` (blocking syscalls, for kernels without
    /// io_uring).
    pub io: IoBackend,
    /// io_uring queue depth per target.
    pub ring_depth: u32,
    /// Largest chunk a target accepts; also the largest size class.
    pub max_chunk_size: ByteSize,
    /// How much a size-class file grows when it runs out of free slots (zero-filled at once).
    pub class_growth: ByteSize,
    /// Verify every page checksum of `meta.redb` when opening it.
    pub verify_on_open: bool,
    /// Space kept free on the target's filesystem: class files stop growing before it, so
    /// metadata commits (which need a few pages) still succeed on a disk full of chunks.
    pub reserved_space: ByteSize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            io: IoBackend::IoUring,
            ring_depth: 128,
            max_chunk_size: ByteSize::mib(64),
            class_growth: ByteSize::mib(64),
            verify_on_open: true,
            reserved_space: ByteSize::mib(256),
        }
    }
}

impl EngineConfig {
    /// Checks the values; `prefix` is the dotted path of this section.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let max = self.max_chunk_size.bytes();
        ensure(
            max >= BLOCK as u64 && max.is_power_of_two() && max <= 1 << 30,
            &format!("{prefix}.max_chunk_size"),
            "must be a power of two from 4KiB to 1GiB",
        )?;
        ensure(
            self.ring_depth >= 1 && self.ring_depth <= 4096,
            &format!("{prefix}.ring_depth"),
            "must be from 1 to 4096",
        )?;
        ensure(
            self.class_growth.bytes() >= max,
            &format!("{prefix}.class_growth"),
            format!("must be at least max_chunk_size ({})", self.max_chunk_size),
        )
    }
}

/// Why a chunk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The chunk does not exist on this target.
    #[error("chunk {0} not found")]
    NotFound(ChunkId),
    /// The chunk exists only as a pending version; read it elsewhere (CRAQ).
    #[error("chunk {chunk} has only pending version {version}")]
    OnlyPending {
        /// The chunk.
        chunk: ChunkId,
        /// The pending version.
        version: u64,
    },
    /// A write for a version that does not follow (or, from a predecessor, exceed) the
    /// committed one.
    #[error("chunk {chunk}: version {got} does not follow committed version {committed}")]
    VersionMismatch {
        /// The chunk.
        chunk: ChunkId,
        /// Committed version here (0 if none).
        committed: u64,
        /// The version asked for.
        got: u64,
    },
    /// A commit for a version that is not pending.
    #[error("chunk {chunk}: version {version} is not pending")]
    NotPending {
        /// The chunk.
        chunk: ChunkId,
        /// The version asked for.
        version: u64,
    },
    /// Offsets or lengths outside what a chunk can hold.
    #[error("chunk {chunk}: {message}")]
    OutOfRange {
        /// The chunk.
        chunk: ChunkId,
        /// What is out of range.
        message: String,
    },
    /// The disk is full.
    #[error("target is full: {0}")]
    NoSpace(String),
    /// Stored data fails its checksum.
    #[error("chunk {chunk} version {version}: block {block} fails its checksum")]
    Corrupt {
        /// The chunk.
        chunk: ChunkId,
        /// The version read.
        version: u64,
        /// The 4 KiB block that failed.
        block: usize,
    },
    /// A file operation failed.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// What the operating system said.
        cause: std::io::Error,
    },
    /// The metadata database failed or holds something impossible.
    #[error("chunk metadata: {0}")]
    Meta(String),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
    let context = context.into();
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            EngineError::NoSpace(format!("{context}: {source}"))
        } else {
            EngineError::Io {
                context,
                cause: source,
            }
        }
    }
}

fn meta_err<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> EngineError {
    move |e| match e.into() {
        redb::Error::Io(io) if io.raw_os_error() == Some(libc::ENOSPC) => {
            EngineError::NoSpace(format!("chunk metadata: {context}: {io}"))
        }
        other => EngineError::Meta(format!("{context}: {other}")),
    }
}

/// A change to a chunk's content, applied copy-on-write into a new version.
#[derive(Debug, Clone, Copy)]
pub enum Update<'a> {
    /// Write `data` at `offset`, growing the chunk if needed.
    Write {
        /// Byte offset in the chunk.
        offset: u32,
        /// The bytes.
        data: &'a [u8],
    },
    /// Replace the whole content.
    Replace(&'a [u8]),
    /// Cut (or zero-extend) the content to `length` bytes.
    Truncate(u32),
}

/// How [`ChunkEngine::apply`] turns a write into a version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Apply {
    /// Accept any version, not only the one after the committed version (replicas behind the
    /// head take the version their predecessor chose).
    pub forced: bool,
    /// Record the new version as committed at once (the tail of a chain, which has no
    /// successor to wait for), instead of as pending.
    pub commit: bool,
}

/// What a read returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOutcome {
    /// The committed version read.
    pub version: u64,
    /// The chunk's committed length.
    pub length: u32,
    /// The bytes of the requested range that exist (short at the end of the chunk).
    pub data: Vec<u8>,
    /// A pending version also exists (CRAQ: the caller may need the tail's answer).
    pub pending: Option<u64>,
}

struct SizeClass {
    slot_size: u64,
    file: Arc<File>,
    path: PathBuf,
    slots: tokio::sync::Mutex<SlotState>,
}

/// In-memory view of a class's slots. Freed slots go to the back and new ones come from the
/// front, so a just-freed slot (which a reader may still be reading) is reused last.
struct SlotState {
    capacity: u64,
    free: VecDeque<u64>,
}

/// The chunk engine of one target.
pub struct ChunkEngine {
    dir: PathBuf,
    db: Arc<Database>,
    meta_writer: MetaWriter,
    io: Io,
    classes: Vec<SizeClass>,
    locks: KeyLocks<ChunkId>,
    max_chunk_size: u64,
    growth: u64,
    reserved: u64,
}

impl std::fmt::Debug for ChunkEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkEngine")
            .field("dir", &self.dir)
            .finish()
    }
}

/// CRC32C of each 4 KiB block of `content[..length]`, and of all of it (each block is
/// checksummed twice while it is in cache: combining block checksums with
/// `crc32c_combine` costs far more than a second hardware pass).
fn checksums(content: &[u8], length: usize) -> (Vec<u32>, u32) {
    let mut whole = 0;
    let blocks = content[..length]
        .chunks(BLOCK)
        .map(|block| {
            whole = crc32c::crc32c_append(whole, block);
            crc32c::crc32c(block)
        })
        .collect();
    (blocks, whole)
}

impl ChunkEngine {
    /// Opens (or creates) the target at `dir`.
    pub fn open(dir: &Path, config: &EngineConfig) -> Result<ChunkEngine, EngineError> {
        std::fs::create_dir_all(dir)
            .map_err(io_err(format!("create target directory {}", dir.display())))?;
        let meta_path = dir.join("meta.redb");
        let db = ff_db::open(&meta_path, config.verify_on_open)
            .map_err(|e| EngineError::Meta(e.to_string()))?;
        let max = config.max_chunk_size.bytes();
        let class_count = (max / BLOCK as u64).trailing_zeros() + 1;
        let txn = db.begin_write().map_err(meta_err("begin"))?;
        let mut states = Vec::new();
        {
            txn.open_table(CHUNKS).map_err(meta_err("open chunks"))?;
            let capacity = txn
                .open_table(CAPACITY)
                .map_err(meta_err("open class capacity"))?;
            let free = txn.open_table(FREE).map_err(meta_err("open free slots"))?;
            for class in 0..class_count {
                let slots = capacity
                    .get(class)
                    .map_err(meta_err("read class capacity"))?
                    .map_or(0, |v| v.value());
                let mut free_slots = VecDeque::new();
                for item in free
                    .range((class, 0)..(class, u64::MAX))
                    .map_err(meta_err("read free slots"))?
                {
                    let (key, _) = item.map_err(meta_err("read free slot"))?;
                    free_slots.push_back(key.value().1);
                }
                states.push(SlotState {
                    capacity: slots,
                    free: free_slots,
                });
            }
        }
        txn.commit().map_err(meta_err("commit"))?;
        let io = Io::start(config.io, config.ring_depth, &dir.display().to_string()).map_err(
            io_err("start I/O backend (set io = \"psync\" on kernels without io_uring)"),
        )?;
        let mut classes = Vec::new();
        for (class, state) in states.into_iter().enumerate() {
            let slot_size = (BLOCK as u64) << class;
            let path = dir.join(format!("class-{}.dat", ByteSize(slot_size)));
            let file = open_direct(&path).map_err(io_err(format!("open {}", path.display())))?;
            classes.push(SizeClass {
                slot_size,
                file: Arc::new(file),
                path,
                slots: tokio::sync::Mutex::new(state),
            });
        }
        let db = Arc::new(db);
        let meta_writer = MetaWriter::start(db.clone(), &dir.display().to_string())
            .map_err(io_err("start the metadata writer thread"))?;
        Ok(ChunkEngine {
            dir: dir.to_path_buf(),
            db,
            meta_writer,
            io,
            classes,
            locks: KeyLocks::default(),
            max_chunk_size: max,
            growth: config.class_growth.bytes(),
            reserved: config.reserved_space.bytes(),
        })
    }

    /// The target's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The largest chunk this target accepts.
    pub fn max_chunk_size(&self) -> u64 {
        self.max_chunk_size
    }

    fn class_for(&self, length: u64) -> u32 {
        let blocks = length.div_ceil(BLOCK as u64).max(1);
        blocks.next_power_of_two().trailing_zeros()
    }

    /// The metadata of chunk `id`, if the target has it.
    pub fn meta(&self, id: ChunkId) -> Result<Option<ChunkMeta>, EngineError> {
        let txn = self.db.begin_read().map_err(meta_err("begin read"))?;
        let table = txn.open_table(CHUNKS).map_err(meta_err("open chunks"))?;
        let Some(bytes) = table
            .get(id.key().as_slice())
            .map_err(meta_err("read chunk"))?
        else {
            return Ok(None);
        };
        ChunkMeta::decode(bytes.value())
            .map(Some)
            .map_err(|e| EngineError::Meta(format!("chunk {id} metadata does not decode: {e}")))
    }

    /// Every chunk's metadata, in id order (for comparing replicas and resync).
    pub fn list(&self) -> Result<Vec<(ChunkId, ChunkMeta)>, EngineError> {
        self.list_after(None, usize::MAX)
    }

    /// Up to `limit` chunks in id order, starting after `after` (from the first with None):
    /// the page-by-page form of [`ChunkEngine::list`], for targets with many chunks.
    pub fn list_after(
        &self,
        after: Option<ChunkId>,
        limit: usize,
    ) -> Result<Vec<(ChunkId, ChunkMeta)>, EngineError> {
        let txn = self.db.begin_read().map_err(meta_err("begin read"))?;
        let table = txn.open_table(CHUNKS).map_err(meta_err("open chunks"))?;
        let start = after.map(|id| id.key());
        let range = match &start {
            Some(key) => table.range::<&[u8]>((
                std::ops::Bound::Excluded(key.as_slice()),
                std::ops::Bound::Unbounded,
            )),
            None => table.range::<&[u8]>(..),
        }
        .map_err(meta_err("scan chunks"))?;
        let mut chunks = Vec::new();
        for item in range.take(limit) {
            let (key, value) = item.map_err(meta_err("read chunk"))?;
            let id = ChunkId::from_key(key.value())
                .ok_or_else(|| EngineError::Meta("chunk key is not 16 bytes".to_string()))?;
            let meta = ChunkMeta::decode(value.value()).map_err(|e| {
                EngineError::Meta(format!("chunk {id} metadata does not decode: {e}"))
            })?;
            chunks.push((id, meta));
        }
        Ok(chunks)
    }

    /// Reads `[offset, offset + len)` of the committed version, verifying every block read.
    /// The range is clipped to the chunk's length (a read past the end is short or empty); an
    /// offset no chunk can reach is [`EngineError::OutOfRange`].
    pub async fn read(
        &self,
        id: ChunkId,
        offset: u32,
        len: u32,
    ) -> Result<ReadOutcome, EngineError> {
        if u64::from(offset) > self.max_chunk_size {
            return Err(EngineError::OutOfRange {
                chunk: id,
                message: format!(
                    "offset {offset} is beyond the target's largest chunk ({} bytes)",
                    self.max_chunk_size
                ),
            });
        }
        // A slot freed by a concurrent commit may be reused while we read it; the checksum
        // catches that, and a second look at the metadata finds the new location.
        let mut retried = false;
        loop {
            let meta = self.meta(id)?.ok_or(EngineError::NotFound(id))?;
            let Some(committed) = meta.committed.clone() else {
                return Err(match meta.pending {
                    Some(p) => EngineError::OnlyPending {
                        chunk: id,
                        version: p.version,
                    },
                    None => EngineError::NotFound(id),
                });
            };
            let start = u64::from(offset).min(u64::from(committed.length));
            let end = (u64::from(offset) + u64::from(len)).min(u64::from(committed.length));
            let pending = meta.pending.as_ref().map(|p| p.version);
            if start == end {
                return Ok(ReadOutcome {
                    version: committed.version,
                    length: committed.length,
                    data: Vec::new(),
                    pending,
                });
            }
            match self.read_blocks(id, &committed, start, end).await {
                Ok(data) => {
                    return Ok(ReadOutcome {
                        version: committed.version,
                        length: committed.length,
                        data,
                        pending,
                    });
                }
                Err(error @ EngineError::Corrupt { .. }) if !retried => {
                    // If the chunk moved meanwhile, read it again from its new place; if not,
                    // the stored data really is damaged.
                    let current = self.meta(id)?.and_then(|m| m.committed);
                    if current.as_ref() == Some(&committed) {
                        return Err(error);
                    }
                    retried = true;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Reads the blocks covering `[start, end)` of `version` and verifies them.
    async fn read_blocks(
        &self,
        id: ChunkId,
        version: &ChunkVersion,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, EngineError> {
        let class = self.class(version.class)?;
        let first = (start / BLOCK as u64) as usize;
        let last = end.div_ceil(BLOCK as u64) as usize;
        let offset = version.slot * class.slot_size + (first * BLOCK) as u64;
        let buf = self
            .io
            .read_at(&class.file, offset, (last - first) * BLOCK)
            .await
            .map_err(io_err(format!("read {}", class.path.display())))?;
        let length = version.length as usize;
        for block in first..last {
            let valid = (length - block * BLOCK).min(BLOCK);
            let bytes = &buf.as_slice()[(block - first) * BLOCK..][..valid];
            if version.block_crcs.get(block) != Some(&crc32c::crc32c(bytes)) {
                return Err(EngineError::Corrupt {
                    chunk: id,
                    version: version.version,
                    block,
                });
            }
        }
        let from = start as usize - first * BLOCK;
        Ok(buf.as_slice()[from..from + (end - start) as usize].to_vec())
    }

    fn class(&self, class: u32) -> Result<&SizeClass, EngineError> {
        self.classes.get(class as usize).ok_or_else(|| {
            EngineError::Meta(format!("size class {class} does not exist on this target"))
        })
    }

    /// The whole content of the committed version (for copying a chunk to another replica).
    pub async fn read_committed(
        &self,
        id: ChunkId,
    ) -> Result<(ChunkVersion, Vec<u8>), EngineError> {
        let meta = self.meta(id)?.ok_or(EngineError::NotFound(id))?;
        let committed = meta.committed.ok_or(EngineError::NotFound(id))?;
        let data = if committed.length == 0 {
            Vec::new()
        } else {
            self.read_blocks(id, &committed, 0, u64::from(committed.length))
                .await?
        };
        Ok((committed, data))
    }

    /// Stages `update` as pending `version` (which must follow the committed version), with
    /// `write_id` identifying the write. Returns the pending version. Staging the same write
    /// again returns the same pending version; a different write replaces a stale pending one.
    pub async fn stage(
        &self,
        id: ChunkId,
        version: u64,
        write_id: u64,
        update: Update<'_>,
    ) -> Result<ChunkVersion, EngineError> {
        self.apply(id, version, write_id, update, Apply::default())
            .await
    }

    /// Stages `content` as pending `version` whatever the committed version is: for replicas
    /// behind the head, which receive the whole new content of each write from their
    /// predecessor. Idempotent like [`ChunkEngine::stage`].
    pub async fn stage_replace_forced(
        &self,
        id: ChunkId,
        version: u64,
        write_id: u64,
        content: &[u8],
    ) -> Result<ChunkVersion, EngineError> {
        let how = Apply {
            forced: true,
            commit: false,
        };
        self.apply(id, version, write_id, Update::Replace(content), how)
            .await
    }

    /// Writes `update` as `version` of chunk `id` (see [`Apply`]): copy-on-write into a fresh
    /// slot, then one metadata commit recording it as pending, or directly as committed.
    /// Repeating a write (same version and write id) returns what the first one made.
    pub async fn apply(
        &self,
        id: ChunkId,
        version: u64,
        write_id: u64,
        update: Update<'_>,
        how: Apply,
    ) -> Result<ChunkVersion, EngineError> {
        let _guard = self.locks.lock(id).await;
        let meta = self.meta(id)?.unwrap_or_default();
        let same_write = |v: &&ChunkVersion| v.version == version && v.write_id == write_id;
        if let Some(committed) = meta.committed.as_ref().filter(same_write) {
            // Already committed here (a retried forward after a lost ack).
            return Ok(committed.clone());
        }
        if let Some(pending) = meta.pending.as_ref().filter(same_write) {
            if !how.commit {
                return Ok(pending.clone());
            }
            let pending = pending.clone();
            drop(_guard);
            self.commit(id, version).await?;
            return Ok(pending);
        }
        let committed = meta.committed.as_ref().map_or(0, |c| c.version);
        // A replica takes its predecessor's version, but never one it has committed already
        // with other content (that would give one version two contents across replicas).
        let acceptable = if how.forced {
            version > committed
        } else {
            Some(version) == committed.checked_add(1)
        };
        if !acceptable {
            return Err(EngineError::VersionMismatch {
                chunk: id,
                committed,
                got: version,
            });
        }
        let old = match (&meta.committed, &update) {
            (Some(c), Update::Write { .. } | Update::Truncate(_)) if c.length > 0 => {
                self.read_blocks(id, c, 0, u64::from(c.length)).await?
            }
            _ => Vec::new(),
        };
        let (content, length) = self.apply_update(id, &old, update)?;
        let written = self
            .write_version(id, version, write_id, content, length)
            .await?;
        // Tests crash here: the new content is written, nothing points to it yet.
        fail::fail_point!("engine::before_record", |_| {
            Err(EngineError::Meta(
                "fail point engine::before_record".to_string(),
            ))
        });
        let (new_meta, replaced): (ChunkMeta, Vec<&ChunkVersion>) = if how.commit {
            (
                ChunkMeta {
                    committed: Some(written.clone()),
                    pending: None,
                },
                meta.committed.iter().chain(meta.pending.iter()).collect(),
            )
        } else {
            (
                ChunkMeta {
                    committed: meta.committed.clone(),
                    pending: Some(written.clone()),
                },
                meta.pending.iter().collect(),
            )
        };
        self.point_to(id, &new_meta, written, &replaced).await
    }

    /// Makes `content` the committed `version` directly, dropping any pending version (recovery
    /// copies chunks this way from a predecessor).
    pub async fn install(
        &self,
        id: ChunkId,
        version: u64,
        write_id: u64,
        content: &[u8],
    ) -> Result<ChunkVersion, EngineError> {
        let _guard = self.locks.lock(id).await;
        let meta = self.meta(id)?.unwrap_or_default();
        let (content, length) = self.apply_update(id, &[], Update::Replace(content))?;
        let installed = self
            .write_version(id, version, write_id, content, length)
            .await?;
        let new_meta = ChunkMeta {
            committed: Some(installed.clone()),
            pending: None,
        };
        let freed: Vec<&ChunkVersion> = meta.committed.iter().chain(meta.pending.iter()).collect();
        self.point_to(id, &new_meta, installed, &freed).await
    }

    /// Records `new_meta` (which points at the freshly written `version`) and frees the slots of
    /// the `replaced` versions; if the record fails, `version`'s slot is freed instead and the
    /// chunk stays as it was.
    async fn point_to(
        &self,
        id: ChunkId,
        new_meta: &ChunkMeta,
        version: ChunkVersion,
        replaced: &[&ChunkVersion],
    ) -> Result<ChunkVersion, EngineError> {
        if let Err(error) = self.record(id, new_meta, Some(&version), replaced).await {
            self.release(&version).await;
            return Err(error);
        }
        for old in replaced {
            self.release(old).await;
        }
        Ok(version)
    }

    /// The whole content of the pending `version` of chunk `id`.
    pub async fn read_pending(&self, id: ChunkId, version: u64) -> Result<Vec<u8>, EngineError> {
        let meta = self.meta(id)?.ok_or(EngineError::NotFound(id))?;
        let pending = meta
            .pending
            .filter(|p| p.version == version)
            .ok_or(EngineError::NotPending { chunk: id, version })?;
        if pending.length == 0 {
            return Ok(Vec::new());
        }
        self.read_blocks(id, &pending, 0, u64::from(pending.length))
            .await
    }

    /// Builds the new content of a chunk from its old content and an update.
    fn apply_update(
        &self,
        id: ChunkId,
        old: &[u8],
        update: Update<'_>,
    ) -> Result<(AlignedBuf, usize), EngineError> {
        let max = self.max_chunk_size as usize;
        let too_large = |length: u64| EngineError::OutOfRange {
            chunk: id,
            message: format!("length {length} exceeds the target's largest chunk ({max} bytes)"),
        };
        let (length, content) = match update {
            Update::Replace(data) => {
                if data.len() > max {
                    return Err(too_large(data.len() as u64));
                }
                (data.len(), self.io.pool().padded_copy(data))
            }
            Update::Write { offset, data } => {
                let end = u64::from(offset) + data.len() as u64;
                if end > max as u64 {
                    return Err(too_large(end));
                }
                let length = (end as usize).max(old.len());
                let mut content = self.io.pool().zeroed(round_up(length));
                content.as_mut_slice()[..old.len()].copy_from_slice(old);
                content.as_mut_slice()[offset as usize..end as usize].copy_from_slice(data);
                (length, content)
            }
            Update::Truncate(length) => {
                let length = length as usize;
                if length > max {
                    return Err(too_large(length as u64));
                }
                let mut content = self.io.pool().zeroed(round_up(length));
                let kept = old.len().min(length);
                content.as_mut_slice()[..kept].copy_from_slice(&old[..kept]);
                (length, content)
            }
        };
        Ok((content, length))
    }

    /// Writes content into a fresh slot; the slot is not recorded (nor the data durable) yet.
    async fn write_version(
        &self,
        id: ChunkId,
        version: u64,
        write_id: u64,
        mut content: AlignedBuf,
        length: usize,
    ) -> Result<ChunkVersion, EngineError> {
        if content.len() < BLOCK {
            content.resize(BLOCK);
        }
        let class_id = self.class_for(length as u64);
        let class = self.class(class_id)?;
        let slot = self.allocate(class_id).await?;
        let (block_crcs, crc32c) = checksums(content.as_slice(), length);
        let staged = ChunkVersion {
            version,
            length: length as u32,
            crc32c,
            class: class_id,
            slot,
            block_crcs,
            write_id,
        };
        // Made durable (fdatasync) by the metadata commit that records it.
        let written = self
            .io
            .write_at(&class.file, slot * class.slot_size, content)
            .await
            .map_err(io_err(format!(
                "write chunk {id} to {}",
                class.path.display()
            )));
        if let Err(error) = written {
            self.release(&staged).await;
            return Err(error);
        }
        Ok(staged)
    }

    /// Commits pending `version` of chunk `id`: readers see it from now on, and the slot of the
    /// version it replaces is freed. Committing a version that is already committed is a no-op.
    pub async fn commit(&self, id: ChunkId, version: u64) -> Result<(), EngineError> {
        let _guard = self.locks.lock(id).await;
        let meta = self
            .meta(id)?
            .ok_or(EngineError::NotPending { chunk: id, version })?;
        if meta
            .committed
            .as_ref()
            .is_some_and(|c| c.version == version)
        {
            return Ok(());
        }
        let pending = meta
            .pending
            .clone()
            .filter(|p| p.version == version)
            .ok_or(EngineError::NotPending { chunk: id, version })?;
        let old = meta.committed.clone();
        let new_meta = ChunkMeta {
            committed: Some(pending),
            pending: None,
        };
        self.record(
            id,
            &new_meta,
            None,
            old.iter().collect::<Vec<_>>().as_slice(),
        )
        .await?;
        if let Some(old) = old {
            self.release(&old).await;
        }
        Ok(())
    }

    /// Drops pending `version` (a chain write that will not complete).
    pub async fn abort(&self, id: ChunkId, version: u64) -> Result<(), EngineError> {
        let _guard = self.locks.lock(id).await;
        let Some(meta) = self.meta(id)? else {
            return Ok(());
        };
        let Some(pending) = meta.pending.clone().filter(|p| p.version == version) else {
            return Ok(());
        };
        let new_meta = ChunkMeta {
            committed: meta.committed.clone(),
            pending: None,
        };
        self.record(id, &new_meta, None, &[&pending]).await?;
        self.release(&pending).await;
        Ok(())
    }

    /// Removes chunk `id` entirely (both versions). Removing a missing chunk is a no-op.
    pub async fn remove(&self, id: ChunkId) -> Result<(), EngineError> {
        let _guard = self.locks.lock(id).await;
        let Some(meta) = self.meta(id)? else {
            return Ok(());
        };
        let freed = meta
            .committed
            .iter()
            .chain(meta.pending.iter())
            .map(|v| (v.class, v.slot))
            .collect();
        self.meta_writer
            .commit(MetaChange::Remove { id, freed }, None)
            .await?;
        for version in meta.committed.iter().chain(meta.pending.iter()) {
            self.release(version).await;
        }
        Ok(())
    }

    /// Writes chunk metadata durably, after the data of `claimed` (a slot just written): the
    /// slot of `claimed` leaves the free set, those of `freed` join it.
    async fn record(
        &self,
        id: ChunkId,
        meta: &ChunkMeta,
        claimed: Option<&ChunkVersion>,
        freed: &[&ChunkVersion],
    ) -> Result<(), EngineError> {
        let sync = match claimed {
            Some(version) => Some(self.class(version.class)?.file.clone()),
            None => None,
        };
        let change = MetaChange::Put {
            id,
            meta: meta.clone(),
            claimed: claimed.map(|v| (v.class, v.slot)),
            freed: freed.iter().map(|v| (v.class, v.slot)).collect(),
        };
        self.meta_writer.commit(change, sync).await
    }

    /// Takes a free slot of `class`, growing the class file when none is left.
    async fn allocate(&self, class_id: u32) -> Result<u64, EngineError> {
        let class = self.class(class_id)?;
        let mut slots = class.slots.lock().await;
        if let Some(slot) = slots.free.pop_front() {
            return Ok(slot);
        }
        // Grow by whole slots, written with zeros so that data writes never convert extents.
        // Targets of one daemon often share a filesystem: one growth at a time, so that each
        // sees the space the others took.
        let _one_growth = GROWTH.lock().await;
        let count = (self.growth / class.slot_size).max(1);
        let needed = count * class.slot_size + self.reserved;
        let available = nix::sys::statvfs::statvfs(&self.dir)
            .map(|s| s.blocks_available() * s.fragment_size())
            .map_err(|e| io_err(format!("statvfs {}", self.dir.display()))(e.into()))?;
        if available < needed {
            return Err(EngineError::NoSpace(format!(
                "{} has {available} bytes free; growing {} needs {} plus {} kept for metadata",
                self.dir.display(),
                class.path.display(),
                count * class.slot_size,
                self.reserved
            )));
        }
        let start = slots.capacity;
        let grown = async {
            let mut offset = start * class.slot_size;
            let end = (start + count) * class.slot_size;
            let zeros = AlignedBuf::zeroed(GROWTH_WRITE.min((end - offset) as usize));
            while offset < end {
                let piece = (zeros.len() as u64).min(end - offset) as usize;
                let buf = if piece == zeros.len() {
                    zeros.clone()
                } else {
                    AlignedBuf::zeroed(piece)
                };
                self.io
                    .write_at(&class.file, offset, buf)
                    .await
                    .map_err(io_err(format!("grow {}", class.path.display())))?;
                offset += piece as u64;
            }
            self.meta_writer
                .commit(
                    MetaChange::Grow {
                        class: class_id,
                        capacity: start + count,
                        new_slots: start..start + count,
                    },
                    Some(class.file.clone()),
                )
                .await
        }
        .await;
        if let Err(error) = grown {
            // Give the space back (another process on the filesystem may have taken what the
            // check saw), so that the reserve for metadata commits is there again.
            let _ = class.file.set_len(start * class.slot_size);
            return Err(error);
        }
        slots.capacity = start + count;
        slots.free.extend(start + 1..start + count);
        Ok(start)
    }

    /// Returns a slot to the in-memory free list (its durable state is already "free").
    async fn release(&self, version: &ChunkVersion) {
        if let Ok(class) = self.class(version.class) {
            class.slots.lock().await.free.push_back(version.slot);
        }
    }

    /// Free and total slots per size class (for metrics and tests).
    pub async fn usage(&self) -> BTreeMap<u64, (u64, u64)> {
        let mut usage = BTreeMap::new();
        for class in &self.classes {
            let slots = class.slots.lock().await;
            usage.insert(class.slot_size, (slots.free.len() as u64, slots.capacity));
        }
        usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_combined_checksum_is_the_whole_contents() {
        let data: Vec<u8> = (0..3 * BLOCK + 100).map(|i| (i * 7) as u8).collect();
        let (blocks, whole) = checksums(&data, data.len());
        assert_eq!(blocks.len(), 4);
        assert_eq!(whole, crc32c::crc32c(&data));
        assert_eq!(blocks[3], crc32c::crc32c(&data[3 * BLOCK..]));
        assert_eq!(checksums(&data, 0), (Vec::new(), 0));
    }
}
