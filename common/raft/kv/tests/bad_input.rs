//! Bad input gets a clear error and loses nothing: damaged database files, invalid configs, and
//! garbage from a peer or a client.

// Tests may panic on anything unexpected; that is how they fail.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ff_harness::free_port_block;
use ff_raft::proto::raft_client::RaftClient;
use ff_raft::proto::raft_peer_client::RaftPeerClient;
use ff_raft::proto::{MessageBatch, ProposeRequest, SnapshotChunk, SnapshotHeader};
use ff_raft::{Consistency, RaftConfig};
use ff_raft_kv::local::{LocalCluster, fast_raft_config};
use ff_raft_kv::proto::{Command as KvCommand, Put, Query, Scan, command, query};
use protobuf::Message as _;

const BIN: &str = env!("CARGO_BIN_EXE_ff-kv");

/// Writes a single-node config under `dir` and returns its path.
fn single_node_config(dir: &Path) -> std::path::PathBuf {
    let port = free_port_block(1).unwrap();
    let addr = format!("127.0.0.1:{port}");
    let config = format!(
        r#"listen_addr = "{addr}"
metrics_addr = ""
[raft]
node_id = 1
cluster = "bad-input"
data_dir = "{}"
advertise_addr = "{addr}"
initial_members = [{{ id = 1, addr = "{addr}" }}]
tick_interval = "20ms"
"#,
        dir.join("data").display()
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Runs a healthy `ff-kv serve` until it says it is serving (its databases opened and
/// written; at most 60 s), then stops it; returns (exit code, stderr) like [`serve`].
fn serve_until_serving(config: &Path) -> (Option<i32>, String) {
    serve_until(config, Duration::from_secs(60), |stderr| {
        stderr.contains("serving")
    })
}

/// Runs `ff-kv serve` until it exits or `wait` passes; returns (exit code, stderr).
fn serve(config: &Path, wait: Duration) -> (Option<i32>, String) {
    serve_until(config, wait, |_| false)
}

/// Runs `ff-kv serve` until it exits, `done` says so of its stderr so far, or `wait` passes
/// (then SIGTERM); returns (exit code, stderr).
fn serve_until(
    config: &Path,
    wait: Duration,
    done: impl Fn(&str) -> bool,
) -> (Option<i32>, String) {
    // Stderr goes to a file, so that it can be read while the daemon runs.
    let log = config.with_extension("stderr");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stderr = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code(), stderr());
        }
        if done(&stderr()) || std::time::Instant::now() >= deadline {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            child.wait().unwrap();
            return (None, stderr());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_refused(code: Option<i32>, stderr: &str, expected: &[&str]) {
    assert_eq!(
        code,
        Some(1),
        "the daemon should refuse to start; stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "no panic expected:\n{stderr}");
    for text in expected {
        assert!(
            stderr.contains(text),
            "stderr should mention {text:?}:\n{stderr}"
        );
    }
}

#[test]
fn a_damaged_database_is_refused_not_trusted() {
    for (file, damage) in [
        ("state.redb", "garbage"),
        ("log.redb", "garbage"),
        ("state.redb", "truncate"),
        ("log.redb", "truncate"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = single_node_config(dir.path());
        // A healthy node writes its files first.
        let (code, stderr) = serve_until_serving(&config);
        assert_eq!(code, None, "healthy node exited early:\n{stderr}");
        let path = dir.path().join("data").join(file);
        let bytes = std::fs::read(&path).unwrap();
        match damage {
            "garbage" => {
                let mut garbage = bytes.clone();
                for (i, b) in garbage.iter_mut().enumerate() {
                    *b = (i as u8).wrapping_mul(31) ^ 0xa5;
                }
                std::fs::write(&path, garbage).unwrap();
            }
            _ => std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap(),
        }
        let (code, stderr) = serve(&config, Duration::from_secs(10));
        assert_refused(code, &stderr, &[file]);
        // Nothing was "repaired" into an empty database behind the user's back.
        assert!(std::fs::metadata(&path).unwrap().len() > 0);
    }
}

#[test]
fn a_data_directory_of_another_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = single_node_config(dir.path());
    let (code, _) = serve_until_serving(&config);
    assert_eq!(code, None);
    let text = std::fs::read_to_string(&config).unwrap();
    let other = text.replace("cluster = \"bad-input\"", "cluster = \"someone-else\"");
    std::fs::write(&config, other).unwrap();
    let (code, stderr) = serve(&config, Duration::from_secs(10));
    assert_refused(
        code,
        &stderr,
        &["belongs to node 1 of cluster \"bad-input\""],
    );
}

#[test]
fn invalid_configs_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "listen_addr = \"127.0.0.1:1\"\n[raft]\nnode_idd = 3\n",
            "node_idd",
        ),
        ("[raft]\nelection_ticks = 1\n", "raft.election_ticks"),
        ("[raft]\ntick_interval = \"soon\"\n", "tick_interval"),
        (
            "[raft.transport]\nmax_batch_size = \"12 parsecs\"\n",
            "unknown size unit",
        ),
        ("listen_addr = 7\n", "listen_addr"),
        ("this is not toml", "invalid config"),
    ];
    for (text, expected) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let (code, stderr) = serve(&path, Duration::from_secs(10));
        assert_refused(code, &stderr, &[expected]);
    }
    // A typo in an environment override is caught too.
    let path = dir.path().join("empty.toml");
    std::fs::write(&path, "").unwrap();
    let output = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .env("FF_KV__RAFT__TICK_INTERVALL", "5ms")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_refused(
        output.status.code(),
        &stderr,
        &["tick_intervall", "FF_KV__RAFT__TICK_INTERVALL"],
    );
    // A missing file is named.
    let (code, stderr) = serve(&dir.path().join("missing.toml"), Duration::from_secs(10));
    assert_refused(code, &stderr, &["missing.toml"]);
}

fn put(key: &str) -> KvCommand {
    KvCommand {
        op: Some(command::Op::Put(Put {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_from_peers_and_clients_is_refused_and_the_group_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let template = RaftConfig {
        cluster: "garbage".to_string(),
        ..fast_raft_config()
    };
    let cluster = LocalCluster::start(dir.path(), 3, template).await.unwrap();
    let leader = cluster
        .wait_for_leader(Duration::from_secs(15))
        .await
        .unwrap();
    let target = (1..=3).find(|id| *id != leader).unwrap();
    let node = cluster.node(target).unwrap();
    let cluster_name = node.status().cluster;
    let addr = cluster.addr(target).unwrap();
    let channel = ff_rpc::channel(&addr, &ff_rpc::ClientOptions::default()).unwrap();
    let mut peer = RaftPeerClient::new(channel.clone());
    let batch = |cluster: &str, to: u64, messages: Vec<Vec<u8>>| MessageBatch {
        cluster: cluster.to_string(),
        from: leader,
        from_addr: String::new(),
        to,
        messages,
    };

    let status = peer
        .send(batch(&cluster_name, target, vec![vec![0xff; 40]]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("does not decode"), "{status:?}");

    let status = peer
        .send(batch("other-cluster", target, vec![]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    let status = peer
        .send(batch(&cluster_name, 99, vec![]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // Well-formed protobuf that raft-rs would panic on (a read-index request without its entry).
    let mut message = raft::prelude::Message::default();
    message.set_msg_type(raft::prelude::MessageType::MsgReadIndex);
    message.from = leader;
    message.to = target;
    let status = peer
        .send(batch(
            &cluster_name,
            target,
            vec![message.write_to_bytes().unwrap()],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // An append whose entries do not follow its index: raft-rs would trust it.
    let mut append = raft::prelude::Message::default();
    append.set_msg_type(raft::prelude::MessageType::MsgAppend);
    append.from = leader;
    append.to = target;
    append.term = node.status().term;
    append.index = 7;
    append.log_term = 6;
    let entry = raft::prelude::Entry {
        index: 42,
        term: append.term,
        ..Default::default()
    };
    append.set_entries(vec![entry].into());
    let status = peer
        .send(batch(
            &cluster_name,
            target,
            vec![append.write_to_bytes().unwrap()],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // A snapshot stream declaring an impossible size.
    let empty = vec![SnapshotChunk {
        header: Some(SnapshotHeader {
            cluster: cluster_name.clone(),
            from: leader,
            from_addr: String::new(),
            to: target,
            message: Vec::new(),
            size: 0,
            crc32c: 0,
        }),
        data: Vec::new(),
    }];
    let status = peer
        .send_snapshot(futures::stream::iter(empty))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // A snapshot stream whose bytes do not match its checksum.
    let header = SnapshotHeader {
        cluster: cluster_name.clone(),
        from: leader,
        from_addr: String::new(),
        to: target,
        message: Vec::new(),
        size: 64,
        crc32c: 12345,
    };
    let chunks = vec![SnapshotChunk {
        header: Some(header),
        data: vec![7; 64],
    }];
    let status = peer
        .send_snapshot(futures::stream::iter(chunks))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");

    // A client proposal whose command is not a command.
    let mut raft = RaftClient::new(channel);
    let status = raft
        .propose(ProposeRequest {
            id: None,
            command: vec![0xff, 0xff, 0xff],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("invalid command"), "{status:?}");

    // The node took part all along: the group commits, the node applies, nothing was lost.
    assert_eq!(node.status().role, ff_raft::Role::Follower);
    node.propose(put("after-garbage")).await.unwrap();
    let items = node
        .read_with(
            Query {
                op: Some(query::Op::Scan(Scan::default())),
            },
            Consistency::Linearizable,
        )
        .await
        .unwrap()
        .items;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].key, b"after-garbage");
    cluster.shutdown().await;
}
