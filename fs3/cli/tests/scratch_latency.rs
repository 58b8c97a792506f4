#![allow(clippy::unwrap_used)]
mod common;
use fs3_proto::meta::{Credentials, InodeKind};
use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = common::spec(dir.path(), 1, 3);
    spec.meta_replicas = 1;
    let mut cluster = common::start(spec).await;
    let fs = cluster.fs_client().await.unwrap();
    let root = Credentials::default();
    let t = Instant::now();
    for i in 0..200 {
        fs.create(
            &root,
            1,
            format!("f{i}").as_bytes(),
            InodeKind::File,
            0o644,
            b"",
        )
        .await
        .unwrap();
    }
    eprintln!("create: {:?} per op", t.elapsed() / 200);
    let t = Instant::now();
    for i in 0..200 {
        fs.lookup(&root, 1, format!("f{i}").as_bytes())
            .await
            .unwrap();
    }
    eprintln!("lookup: {:?} per op", t.elapsed() / 200);
    let mut v = Vec::new();
    for i in 0..30 {
        let t = Instant::now();
        fs.lookup(&root, 1, format!("f{i}").as_bytes())
            .await
            .unwrap();
        v.push(t.elapsed().as_micros());
    }
    eprintln!("lookups us: {v:?}");
    let mut v = Vec::new();
    for i in 0..30 {
        let t = Instant::now();
        fs.getattr(&root, 2 + i).await.unwrap();
        v.push(t.elapsed().as_micros());
    }
    eprintln!("getattr us: {v:?}");
    let t = Instant::now();
    for _ in 0..200 {
        fs.statfs().await.unwrap();
    }
    eprintln!("statfs: {:?} per op", t.elapsed() / 200);
    cluster.stop_all().await;
}
