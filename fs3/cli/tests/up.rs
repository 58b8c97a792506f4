//! `fs3 up` as a user runs it: the cluster comes up and says where it is, `fs3 admin` sees it,
//! the file commands work with the token it names, Ctrl-C stops it cleanly, and the directory
//! refuses a different shape later.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Kills `fs3 up` (and so its daemons, which exit with it) if the test ends early.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn up_runs_a_cluster_until_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let port = ff_harness::free_port_block(10).unwrap();
    let fs3 = env!("CARGO_BIN_EXE_fs3");
    let mut up = Command::new(fs3)
        .args(["up", "--port", &port.to_string(), "--dir"])
        .arg(dir.path().join("cluster"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut up = KillOnDrop(up);
    // `fs3 up` bounds each phase of its start itself, and exits if one overruns.
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "fs3 is up: every chain serving.");
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
    // Three storage daemons and the meta replica.
    assert_eq!(status["nodes_alive"], 4);
    assert_eq!(status["serving"], 3);

    // The file commands, with the token file `fs3 up` printed.
    let token_line = lines
        .by_ref()
        .map(Result::unwrap)
        .find(|l| l.trim_start().starts_with("token:"))
        .unwrap();
    let token_file = token_line.split_whitespace().nth(1).unwrap().to_string();
    let files = |args: &[&str]| {
        Command::new(fs3)
            .args(args)
            .env("FS3_MGMTD", format!("127.0.0.1:{port}"))
            .env("FS3_TOKEN_FILE", &token_file)
            .output()
            .unwrap()
    };
    let local = dir.path().join("local.bin");
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&local, &content).unwrap();
    assert!(files(&["mkdir", "-p", "/a/b"]).status.success());
    let copied = files(&["cp", local.to_str().unwrap(), "fs3:/a/b/"]);
    assert!(copied.status.success(), "{copied:?}");
    let cat = files(&["cat", "/a/b/local.bin"]);
    assert!(cat.status.success() && cat.stdout == content, "cat differs");
    let listing = files(&["ls", "--json", "/a/b"]);
    let listing: serde_json::Value = serde_json::from_slice(&listing.stdout).unwrap();
    assert_eq!(listing[0]["name"], "local.bin");
    assert_eq!(listing[0]["size"], 3_000_000);
    assert!(
        files(&["mv", "/a/b/local.bin", "/a/renamed"])
            .status
            .success()
    );
    let back = dir.path().join("back.bin");
    assert!(
        files(&["cp", "fs3:/a/renamed", back.to_str().unwrap()])
            .status
            .success()
    );
    assert!(
        std::fs::read(&back).unwrap() == content,
        "round trip differs"
    );
    let refused = files(&["rm", "/a"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is a directory"));
    assert!(files(&["rm", "-r", "/a"]).status.success());
    let missing = files(&["stat", "/a"]);
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no entry"),
        "{missing:?}"
    );
    let no_token = Command::new(fs3)
        .args(["ls", "/"])
        .env("FS3_MGMTD", format!("127.0.0.1:{port}"))
        .env_remove("FS3_TOKEN_FILE")
        .env_remove("FS3_TOKEN")
        .output()
        .unwrap();
    assert!(!no_token.status.success());
    assert!(String::from_utf8_lossy(&no_token.stderr).contains("token"));

    // Ctrl-C: every daemon stops and `fs3 up` exits cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let exit = up.0.wait().unwrap();
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
