//! The chunk engine on a real target directory: versions, copy-on-write, checksums, slot
//! reuse, restarts, crashes between data and metadata, a full disk, both I/O backends.

// Tests may panic on anything unexpected; that is how they fail.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use ff_config::ByteSize;
use fs3_storage::engine::{Apply, ChunkEngine, ChunkId, EngineConfig, EngineError, Update};
use fs3_storage::io::IoBackend;

fn config(io: IoBackend) -> EngineConfig {
    EngineConfig {
        io,
        max_chunk_size: ByteSize::mib(4),
        class_growth: ByteSize::mib(4),
        ..EngineConfig::default()
    }
}

fn chunk(index: u64) -> ChunkId {
    ChunkId { inode: 7, index }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn write(engine: &ChunkEngine, id: ChunkId, version: u64, update: Update<'_>) {
    engine.stage(id, version, version, update).await.unwrap();
    engine.commit(id, version).await.unwrap();
}

async fn versions_and_ranges(io: IoBackend) {
    let dir = tempfile::tempdir().unwrap();
    let engine = ChunkEngine::open(dir.path(), &config(io)).unwrap();
    let id = chunk(0);
    let first = pattern(300_000, 1);
    write(&engine, id, 1, Update::Replace(&first.clone())).await;
    let read = engine.read(id, 0, 1 << 20).await.unwrap();
    assert_eq!(
        (read.version, read.length, read.pending),
        (1, 300_000, None)
    );
    assert_eq!(read.data, first);
    // Unaligned ranges, and ranges past the end come back short.
    let read = engine.read(id, 4095, 10_000).await.unwrap();
    assert_eq!(read.data, first[4095..14_095]);
    assert_eq!(
        engine.read(id, 299_990, 100).await.unwrap().data,
        first[299_990..]
    );
    assert!(engine.read(id, 400_000, 10).await.unwrap().data.is_empty());

    // A partial write grows the chunk and keeps the rest.
    let patch = pattern(5000, 9);
    write(
        &engine,
        id,
        2,
        Update::Write {
            offset: 298_000,
            data: &patch,
        },
    )
    .await;
    let mut expected = first.clone();
    expected.truncate(298_000);
    expected.extend_from_slice(&patch);
    let read = engine.read(id, 0, 1 << 20).await.unwrap();
    assert_eq!((read.version, read.length), (2, 303_000));
    assert_eq!(read.data, expected);

    // Truncate down, then up (zero-filled).
    write(&engine, id, 3, Update::Truncate(1000)).await;
    write(&engine, id, 4, Update::Truncate(9000)).await;
    let read = engine.read(id, 0, 1 << 20).await.unwrap();
    assert_eq!(read.data[..1000], expected[..1000]);
    assert!(read.data[1000..].iter().all(|b| *b == 0));
    assert_eq!(read.length, 9000);

    // Replicas compare whole-chunk checksums.
    let meta = engine.meta(id).unwrap().unwrap();
    assert_eq!(meta.committed.unwrap().crc32c, crc32c::crc32c(&read.data));
}

#[tokio::test]
async fn versions_and_ranges_with_io_uring() {
    versions_and_ranges(IoBackend::IoUring).await;
}

#[tokio::test]
async fn versions_and_ranges_with_psync() {
    versions_and_ranges(IoBackend::Psync).await;
}

#[tokio::test]
async fn a_tail_commits_at_once_and_recognises_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let engine = ChunkEngine::open(dir.path(), &config(IoBackend::IoUring)).unwrap();
    let id = chunk(9);
    let tail = Apply {
        forced: true,
        commit: true,
    };
    // Committed directly, whatever version the head chose.
    engine
        .apply(id, 4, 40, Update::Replace(b"four"), tail)
        .await
        .unwrap();
    let read = engine.read(id, 0, 10).await.unwrap();
    assert_eq!(
        (read.data.as_slice(), read.version, read.pending),
        (&b"four"[..], 4, None)
    );
    // The same write again (a retried forward) changes nothing.
    let again = engine
        .apply(id, 4, 40, Update::Replace(b"ignored"), tail)
        .await
        .unwrap();
    assert_eq!((again.version, again.length), (4, 4));
    assert_eq!(engine.read(id, 0, 10).await.unwrap().data, b"four");
    // A write staged as pending before this replica became the tail is promoted, not redone.
    engine
        .stage_replace_forced(id, 5, 50, b"five")
        .await
        .unwrap();
    engine
        .apply(id, 5, 50, Update::Replace(b"other"), tail)
        .await
        .unwrap();
    let read = engine.read(id, 0, 10).await.unwrap();
    assert_eq!(
        (read.data.as_slice(), read.version, read.pending),
        (&b"five"[..], 5, None)
    );
    // Only the live version's slot stays claimed.
    let usage = engine.usage().await;
    let (free, total) = usage[&4096];
    assert_eq!(total - free, 1, "{usage:?}");
}

#[tokio::test]
async fn pending_versions_follow_craq_rules() {
    let dir = tempfile::tempdir().unwrap();
    let engine = ChunkEngine::open(dir.path(), &config(IoBackend::IoUring)).unwrap();
    let id = chunk(1);
    // A chunk that exists only as pending is not readable here.
    engine
        .stage(id, 1, 11, Update::Replace(b"one"))
        .await
        .unwrap();
    assert!(matches!(
        engine.read(id, 0, 10).await,
        Err(EngineError::OnlyPending { version: 1, .. })
    ));
    engine.commit(id, 1).await.unwrap();
    engine.commit(id, 1).await.unwrap(); // idempotent

    // Readers keep seeing the committed version while the next is pending.
    engine
        .stage(id, 2, 22, Update::Replace(b"two"))
        .await
        .unwrap();
    let read = engine.read(id, 0, 10).await.unwrap();
    assert_eq!((read.data.as_slice(), read.pending), (&b"one"[..], Some(2)));
    // The same write staged again is recognised; another write replaces the stale pending.
    let again = engine
        .stage(id, 2, 22, Update::Replace(b"ignored"))
        .await
        .unwrap();
    assert_eq!(again.length, 3);
    engine
        .stage(id, 2, 23, Update::Replace(b"deux"))
        .await
        .unwrap();
    engine.commit(id, 2).await.unwrap();
    assert_eq!(engine.read(id, 0, 10).await.unwrap().data, b"deux");

    // Versions must follow the committed one; commits must match what is pending.
    assert!(matches!(
        engine.stage(id, 5, 1, Update::Replace(&[1])).await,
        Err(EngineError::VersionMismatch {
            committed: 2,
            got: 5,
            ..
        })
    ));
    assert!(matches!(
        engine.commit(id, 3).await,
        Err(EngineError::NotPending { .. })
    ));
    // A replica behind the head takes any newer version, but never one it has committed with
    // another write (that would give one version two contents across the chain); the same
    // write again is recognised as already done.
    assert!(matches!(
        engine.stage_replace_forced(id, 2, 99, b"other").await,
        Err(EngineError::VersionMismatch {
            committed: 2,
            got: 2,
            ..
        })
    ));
    assert!(matches!(
        engine.stage_replace_forced(id, 1, 11, b"one").await,
        Err(EngineError::VersionMismatch { got: 1, .. })
    ));
    assert_eq!(
        engine
            .stage_replace_forced(id, 2, 23, b"deux")
            .await
            .unwrap()
            .version,
        2
    );
    assert_eq!(engine.read(id, 0, 10).await.unwrap().pending, None);
    engine
        .stage(id, 3, 33, Update::Replace(b"three"))
        .await
        .unwrap();
    engine.abort(id, 3).await.unwrap();
    assert_eq!(engine.read(id, 0, 10).await.unwrap().pending, None);

    // Bad ranges are refused.
    assert!(matches!(
        engine
            .stage(
                id,
                3,
                34,
                Update::Write {
                    offset: 4 << 20,
                    data: &[1]
                }
            )
            .await,
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(matches!(
        engine.read(chunk(99), 0, 1).await,
        Err(EngineError::NotFound(_))
    ));
}

#[tokio::test]
async fn rewriting_a_chunk_reuses_slots_and_removal_frees_them() {
    let dir = tempfile::tempdir().unwrap();
    let engine = ChunkEngine::open(dir.path(), &config(IoBackend::IoUring)).unwrap();
    let id = chunk(2);
    for version in 1..=50 {
        write(
            &engine,
            id,
            version,
            Update::Replace(&pattern(100_000, version as u8)),
        )
        .await;
    }
    // 100 KB chunks live in the 128 KiB class; two slots (old and new) are all it ever needs.
    let usage = engine.usage().await;
    let (free, total) = usage[&(128 * 1024)];
    assert_eq!(total - free, 1, "one slot in use");
    assert_eq!(total, 32, "the class grew once (4 MiB of 128 KiB slots)");
    engine.remove(id).await.unwrap();
    assert!(engine.meta(id).unwrap().is_none());
    let (free, total) = engine.usage().await[&(128 * 1024)];
    assert_eq!(free, total);
}

#[tokio::test]
async fn everything_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = ChunkEngine::open(dir.path(), &config(IoBackend::IoUring)).unwrap();
        for index in 0..20 {
            write(
                &engine,
                chunk(index),
                1,
                Update::Replace(&pattern(70_000, index as u8)),
            )
            .await;
        }
        engine
            .stage(chunk(0), 2, 5, Update::Replace(b"pending"))
            .await
            .unwrap();
    }
    let engine = ChunkEngine::open(dir.path(), &config(IoBackend::IoUring)).unwrap();
    for index in 0..20 {
        let read = engine.read(chunk(index), 0, 1 << 20).await.unwrap();
        assert_eq!(read.data, pattern(70_000, index as u8));
    }
    assert_eq!(engine.read(chunk(0), 0, 1).await.unwrap().pending, Some(2));
    engine.commit(chunk(0), 2).await.unwrap();
    assert_eq!(
        engine.read(chunk(0), 0, 100).await.unwrap().data,
        b"pending"
    );
    assert_eq!(engine.list().unwrap().len(), 20);
}

fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0x01;
    file.write_all_at(&byte, offset).unwrap();
    file.sync_all().unwrap();
}

#[tokio::test]
async fn a_flipped_bit_is_caught_in_the_block_that_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine = ChunkEngine::open(dir.path(), &config(IoBackend::IoUring)).unwrap();
    let id = chunk(3);
    let data = pattern(64 * 1024, 3);
    write(&engine, id, 1, Update::Replace(&data.clone())).await;
    let version = engine.meta(id).unwrap().unwrap().committed.unwrap();
    assert_eq!(version.class, 4); // 64 KiB slots
    let file = dir.path().join("class-64KiB.dat");
    flip_byte(&file, version.slot * 65536 + 5 * 4096 + 17);
    match engine.read(id, 0, 1 << 20).await {
        Err(EngineError::Corrupt {
            block: 5,
            version: 1,
            ..
        }) => {}
        other => panic!("expected block 5 to fail its checksum, got {other:?}"),
    }
    // Blocks that are intact still read.
    assert_eq!(
        engine.read(id, 0, 5 * 4096).await.unwrap().data,
        data[..5 * 4096]
    );
    assert_eq!(
        engine.read(id, 6 * 4096, 4096).await.unwrap().data,
        data[6 * 4096..7 * 4096]
    );
}

#[tokio::test]
async fn a_full_disk_is_a_clear_error_and_loses_nothing() {
    // A small tmpfs is a disk that fills up; mounting needs root.
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var("CI").is_err(),
            "CI must be able to mount a tmpfs"
        );
        eprintln!("skipping: cannot mount a tmpfs here (needs root)");
        return;
    }
    /// Unmounts however the test ends.
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(dir.path());
    let result = async {
        let small = EngineConfig {
            reserved_space: ByteSize::mib(2),
            ..config(IoBackend::IoUring)
        };
        let engine = ChunkEngine::open(dir.path(), &small).unwrap();
        let mut written = Vec::new();
        let mut error = None;
        for index in 0..64 {
            let data = pattern(1 << 20, index as u8);
            match engine
                .stage(chunk(index), 1, 1, Update::Replace(&data.clone()))
                .await
            {
                Ok(_) => {
                    engine.commit(chunk(index), 1).await.unwrap();
                    written.push((index, data));
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let error = error.expect("12 MiB cannot hold 64 MiB");
        assert!(matches!(error, EngineError::NoSpace(_)), "{error}");
        // Everything written before the disk filled still reads back.
        for (index, data) in &written {
            assert_eq!(
                &engine.read(chunk(*index), 0, 1 << 20).await.unwrap().data,
                data
            );
        }
        // And freeing space makes writes possible again.
        for (index, _) in &written {
            engine.remove(chunk(*index)).await.unwrap();
        }
        engine
            .stage(chunk(100), 1, 1, Update::Replace(&vec![1; 1 << 20]))
            .await
            .unwrap();
        written.len()
    }
    .await;
    assert!(result > 0);
}
