//! `fs3 up` as a user runs it: the cluster comes up and says where it is, `fs3 admin` sees it,
//! Ctrl-C stops it cleanly, and the directory refuses a different shape later.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn up_runs_a_cluster_until_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let port = ff_harness::free_port_block(8).unwrap();
    let fs3 = env!("CARGO_BIN_EXE_fs3");
    let mut up = Command::new(fs3)
        .args(["up", "--port", &port.to_string(), "--dir"])
        .arg(dir.path().join("cluster"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let started = Instant::now();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "fs3 is up: every chain serving.");
    assert!(started.elapsed() < Duration::from_secs(60));
    let mgmtd = lines.next().unwrap().unwrap();
    assert_eq!(mgmtd.trim(), format!("mgmtd:   127.0.0.1:{port}"));

    let status = Command::new(fs3)
        .args([
            "admin",
            "--mgmtd",
            &format!("127.0.0.1:{port}"),
            "status",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["nodes_alive"], 3);
    assert_eq!(status["serving"], 3);

    // Ctrl-C: every daemon stops and `fs3 up` exits cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let exit = up.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "mgmtd still listens"
    );

    // The directory remembers its cluster's shape.
    let other = Command::new(fs3)
        .args([
            "up",
            "--storage",
            "2",
            "--replication",
            "2",
            "--port",
            &port.to_string(),
            "--dir",
        ])
        .arg(dir.path().join("cluster"))
        .output()
        .unwrap();
    assert!(!other.status.success());
    let message = String::from_utf8_lossy(&other.stderr);
    assert!(
        message.contains("holds a cluster created with"),
        "{message}"
    );
}
