//! Snapshot files: how a node's whole replicated state is written out, shipped and installed.
//!
//! A snapshot is generated on demand when raft-rs needs one for a lagging or new member. One
//! redb read transaction gives a consistent view of the applied state — ff-raft's own part
//! (applied position, configuration, members, request records) and the state machine's tables —
//! which is streamed to a file:
//!
//! ```text
//! "FFSNAP01" | meta length: u64 LE | SnapshotMeta (protobuf) | state machine data | CRC32C: u32 LE
//! ```
//!
//! The trailer covers every byte before it; installation verifies it while reading, inside the
//! write transaction that replaces the state, so a damaged file changes nothing. Files live in
//! `data_dir/snapshots/`; the raft `Snapshot` message carries only a `SnapshotDescriptor`
//! naming the file, and the transport streams the file itself in chunks.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{ConfState, SnapshotMetadata};
use redb::{Database, ReadableDatabase, WriteTransaction};

use crate::error::{RaftError, StorageError};
use crate::proto::{SnapshotDescriptor, SnapshotMeta};
use crate::state_machine::ErasedStateMachine;
use crate::state_store;

const MAGIC: &[u8; 8] = b"FFSNAP01";
/// Bytes of a file that are not metadata or state machine data.
const FRAMING: u64 = 8 + 8 + 4;
/// The smallest possible snapshot file.
pub(crate) const MIN_FILE_SIZE: u64 = FRAMING;
/// Largest metadata section accepted when reading, so a damaged length cannot exhaust memory.
const MAX_META_LEN: u64 = 1 << 30;

/// Counts and checksums everything written through it.
pub(crate) struct CrcWriter<W> {
    inner: W,
    crc: u32,
    len: u64,
}

impl<W: Write> CrcWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        CrcWriter {
            inner,
            crc: 0,
            len: 0,
        }
    }
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Checksums everything read through it.
struct CrcReader<R> {
    inner: R,
    crc: u32,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }
}

fn io_err(context: String) -> impl FnOnce(io::Error) -> StorageError {
    move |e| StorageError::io(context, e)
}

/// Writes a snapshot of the current applied state into `dir`; returns its raft metadata and
/// descriptor.
pub(crate) fn generate(
    db: &Database,
    sm: &dyn ErasedStateMachine,
    dir: &Path,
    cluster: &str,
) -> Result<(SnapshotMetadata, SnapshotDescriptor), RaftError> {
    let txn = db
        .begin_read()
        .map_err(|e| StorageError::db("begin snapshot read", e))?;
    let meta = state_store::snapshot_meta(&txn, cluster)?;
    let conf_state = ConfState::parse_from_bytes(&meta.conf_state)
        .map_err(|e| StorageError::Corrupt(format!("stored conf state: {e}")))?;
    let name = format!("gen-{}-{}.snap", meta.index, meta.term);
    let tmp = dir.join(format!("{name}.tmp"));
    let file = File::create(&tmp).map_err(io_err(format!("create {}", tmp.display())))?;
    let mut out = CrcWriter::new(BufWriter::with_capacity(1 << 20, file));
    let meta_bytes = meta.encode_to_vec();
    let write_context = format!("write {}", tmp.display());
    out.write_all(MAGIC)
        .and_then(|()| out.write_all(&(meta_bytes.len() as u64).to_le_bytes()))
        .and_then(|()| out.write_all(&meta_bytes))
        .map_err(io_err(write_context.clone()))?;
    sm.snapshot(&txn, &mut out)?;
    let content_crc = out.crc;
    let trailer = content_crc.to_le_bytes();
    out.write_all(&trailer)
        .map_err(io_err(write_context.clone()))?;
    let size = out.len;
    let file = out
        .inner
        .into_inner()
        .map_err(|e| StorageError::io(write_context.clone(), e.into_error()))?;
    file.sync_all()
        .map_err(io_err(format!("fsync {}", tmp.display())))?;
    let path = dir.join(&name);
    std::fs::rename(&tmp, &path).map_err(io_err(format!("rename {}", tmp.display())))?;
    let mut metadata = SnapshotMetadata {
        index: meta.index,
        term: meta.term,
        ..SnapshotMetadata::default()
    };
    metadata.set_conf_state(conf_state);
    let descriptor = SnapshotDescriptor {
        file: name,
        size,
        crc32c: crc32c::crc32c_append(content_crc, &trailer),
    };
    Ok((metadata, descriptor))
}

/// Restores the state machine in `txn` from the snapshot in `path` and returns ff-raft's part
/// of it for the caller to restore. Fails, leaving `txn` to be dropped uncommitted, if the file
/// is damaged or is not the one raft expects.
pub(crate) fn restore(
    txn: &WriteTransaction,
    path: &Path,
    expected: &SnapshotMetadata,
    sm: &dyn ErasedStateMachine,
) -> Result<SnapshotMeta, RaftError> {
    let display = path.display().to_string();
    let corrupt = |what: String| StorageError::Corrupt(format!("snapshot {display}: {what}"));
    let file = File::open(path).map_err(io_err(format!("open {display}")))?;
    let size = file
        .metadata()
        .map_err(io_err(format!("stat {display}")))?
        .len();
    if size < FRAMING {
        return Err(corrupt(format!("only {size} bytes")).into());
    }
    let mut reader = CrcReader {
        inner: BufReader::with_capacity(1 << 20, file),
        crc: 0,
    };
    let read_context = format!("read {display}");
    let mut magic = [0u8; 8];
    reader
        .read_exact(&mut magic)
        .map_err(io_err(read_context.clone()))?;
    if &magic != MAGIC {
        return Err(corrupt("not a snapshot file (bad magic)".to_string()).into());
    }
    let mut len = [0u8; 8];
    reader
        .read_exact(&mut len)
        .map_err(io_err(read_context.clone()))?;
    let meta_len = u64::from_le_bytes(len);
    if meta_len > MAX_META_LEN || meta_len > size - FRAMING {
        return Err(corrupt(format!("metadata length {meta_len} exceeds the file")).into());
    }
    let mut meta_bytes = vec![0u8; meta_len as usize];
    reader
        .read_exact(&mut meta_bytes)
        .map_err(io_err(read_context.clone()))?;
    let meta = SnapshotMeta::decode(meta_bytes.as_slice())
        .map_err(|e| corrupt(format!("metadata does not decode: {e}")))?;
    if meta.index != expected.index || meta.term != expected.term {
        return Err(corrupt(format!(
            "holds index {} term {}, raft expects index {} term {}",
            meta.index, meta.term, expected.index, expected.term
        ))
        .into());
    }
    let data_len = size - FRAMING - meta_len;
    let mut data = (&mut reader).take(data_len);
    sm.restore(txn, &mut data)?;
    // Whatever the state machine did not read still counts toward the checksum.
    io::copy(&mut data, &mut io::sink()).map_err(io_err(read_context.clone()))?;
    let computed = reader.crc;
    let mut trailer = [0u8; 4];
    reader
        .inner
        .read_exact(&mut trailer)
        .map_err(io_err(read_context))?;
    if u32::from_le_bytes(trailer) != computed {
        return Err(corrupt("checksum mismatch".to_string()).into());
    }
    Ok(meta)
}

/// Deletes every file in the snapshot directory: after a restart no transfer is in flight and
/// no generated snapshot is published, so all of them are leftovers.
pub(crate) fn remove_partial_files(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use redb::{
        ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
    };

    use super::*;
    use crate::config::{MemberConfig, RaftConfig};
    use crate::error::StateMachineError;
    use crate::state_machine::{ApplyContext, StateMachine};
    use crate::state_store::StateStore;

    const VALUES: TableDefinition<'static, u64, u64> = TableDefinition::new("values");

    /// A state machine that stores one number per key, with a byte-per-number snapshot.
    struct Numbers;

    impl StateMachine for Numbers {
        type Command = u64;
        type Response = u64;
        type Query = u64;
        type QueryResponse = u64;

        fn init(&self, txn: &WriteTransaction) -> Result<(), StateMachineError> {
            txn.open_table(VALUES)?;
            Ok(())
        }
        fn apply(
            &self,
            txn: &WriteTransaction,
            ctx: ApplyContext,
            value: u64,
        ) -> Result<u64, StateMachineError> {
            txn.open_table(VALUES)?.insert(ctx.index, value)?;
            Ok(value)
        }
        fn query(&self, txn: &ReadTransaction, key: u64) -> Result<u64, StateMachineError> {
            Ok(txn.open_table(VALUES)?.get(key)?.map_or(0, |v| v.value()))
        }
        fn snapshot(
            &self,
            txn: &ReadTransaction,
            out: &mut dyn Write,
        ) -> Result<(), StateMachineError> {
            for item in txn.open_table(VALUES)?.iter()? {
                let (k, v) = item?;
                out.write_all(&k.value().to_le_bytes())?;
                out.write_all(&v.value().to_le_bytes())?;
            }
            Ok(())
        }
        fn restore(
            &self,
            txn: &WriteTransaction,
            input: &mut dyn Read,
        ) -> Result<(), StateMachineError> {
            let mut table = txn.open_table(VALUES)?;
            table.retain(|_, _| false)?;
            let mut bytes = Vec::new();
            input.read_to_end(&mut bytes)?;
            for pair in bytes.chunks(16) {
                let k = u64::from_le_bytes(
                    pair[..8]
                        .try_into()
                        .map_err(|_| StateMachineError::Corrupt("short".into()))?,
                );
                let v = u64::from_le_bytes(
                    pair[8..]
                        .try_into()
                        .map_err(|_| StateMachineError::Corrupt("short".into()))?,
                );
                table.insert(k, v)?;
            }
            Ok(())
        }
    }

    fn store(dir: &std::path::Path) -> StateStore {
        let config = RaftConfig {
            data_dir: dir.to_path_buf(),
            initial_members: vec![MemberConfig {
                id: 1,
                addr: "127.0.0.1:7100".to_string(),
            }],
            ..RaftConfig::default()
        };
        StateStore::open(&config, std::sync::Arc::new(Numbers))
            .unwrap()
            .0
    }

    fn numbers(store: &StateStore) -> Vec<(u64, u64)> {
        let txn = store.db().begin_read().unwrap();
        let table = txn.open_table(VALUES).unwrap();
        table
            .iter()
            .unwrap()
            .map(|item| {
                let (k, v) = item.unwrap();
                (k.value(), v.value())
            })
            .collect()
    }

    #[test]
    fn a_snapshot_round_trips_and_a_damaged_one_changes_nothing() {
        let source_dir = tempfile::tempdir().unwrap();
        let source = store(source_dir.path());
        {
            let txn = source.db().begin_write().unwrap();
            {
                let mut table = txn.open_table(VALUES).unwrap();
                for i in 0..1000u64 {
                    table.insert(i, i * 7).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let snap_dir = source_dir.path().join("snaps");
        std::fs::create_dir_all(&snap_dir).unwrap();
        let (metadata, descriptor) =
            generate(source.db(), source.machine().as_ref(), &snap_dir, "c").unwrap();
        let path = snap_dir.join(&descriptor.file);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, descriptor.size);
        assert_eq!(crc32c::crc32c(&bytes), descriptor.crc32c);

        let target_dir = tempfile::tempdir().unwrap();
        let target = store(target_dir.path());
        {
            let txn = target.db().begin_write().unwrap();
            txn.open_table(VALUES).unwrap().insert(5000, 1).unwrap();
            txn.commit().unwrap();
        }
        // Every single flipped byte, and a truncation, is caught before anything changes.
        for position in [0, 9, 20, bytes.len() / 2, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[position] ^= 0x40;
            std::fs::write(&path, &damaged).unwrap();
            let txn = target.db().begin_write().unwrap();
            let result = restore(&txn, &path, &metadata, target.machine().as_ref());
            assert!(result.is_err(), "damage at byte {position} went unnoticed");
            drop(txn);
            assert_eq!(numbers(&target), vec![(5000, 1)]);
        }
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let txn = target.db().begin_write().unwrap();
        assert!(restore(&txn, &path, &metadata, target.machine().as_ref()).is_err());
        drop(txn);

        // The intact file restores exactly the source state.
        std::fs::write(&path, &bytes).unwrap();
        let txn = target.db().begin_write().unwrap();
        restore(&txn, &path, &metadata, target.machine().as_ref()).unwrap();
        txn.commit().unwrap();
        assert_eq!(numbers(&target), numbers(&source));
    }
}
