//! A crash between the durable data write and the metadata commit: the chunk keeps its old
//! committed version and the slot is not lost. Fail points are process-wide, so this test has
//! its own binary.

// Tests may panic on anything unexpected; that is how they fail.
#![allow(clippy::unwrap_used)]

use ff_config::ByteSize;
use fs3_storage::engine::{ChunkEngine, ChunkId, EngineConfig, Update};

#[tokio::test]
async fn a_crash_before_the_metadata_commit_leaves_the_old_version_intact() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        max_chunk_size: ByteSize::mib(1),
        class_growth: ByteSize::mib(1),
        ..EngineConfig::default()
    };
    let id = ChunkId { inode: 1, index: 0 };
    {
        let engine = ChunkEngine::open(dir.path(), &config).unwrap();
        engine
            .stage(id, 1, 1, Update::Replace(&vec![1; 50_000]))
            .await
            .unwrap();
        engine.commit(id, 1).await.unwrap();
        fail::cfg("engine::before_record", "return").unwrap();
        assert!(
            engine
                .stage(id, 2, 2, Update::Replace(&vec![2; 50_000]))
                .await
                .is_err()
        );
        fail::remove("engine::before_record");
        // The process "dies" here.
    }
    let engine = ChunkEngine::open(dir.path(), &config).unwrap();
    let read = engine.read(id, 0, 100_000).await.unwrap();
    assert_eq!((read.version, read.pending), (1, None));
    assert!(read.data.iter().all(|b| *b == 1));
    // The slot written before the crash is free again: 16 slots of 64 KiB, one in use.
    let (free, total) = engine.usage().await[&(64 * 1024)];
    assert_eq!((free, total), (15, 16));
    engine
        .stage(id, 2, 3, Update::Replace(&vec![3; 50_000]))
        .await
        .unwrap();
    engine.commit(id, 2).await.unwrap();
    assert!(
        engine
            .read(id, 0, 100_000)
            .await
            .unwrap()
            .data
            .iter()
            .all(|b| *b == 3)
    );
}
