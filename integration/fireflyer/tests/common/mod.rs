//! What the stack tests share: whether this machine can run the stack (and must, in CI), and a
//! fresh stack in a temporary directory.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

use fireflyer::stack::Stack;

/// Whether the stack can run here (root, `/dev/fuse`, and the `tools` named); in CI it must.
pub fn can_run(tools: &[&str]) -> bool {
    let fuse = Path::new("/dev/fuse").exists() && nix::unistd::geteuid().is_root();
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            std::process::Command::new(t)
                .arg("--version")
                .output()
                .is_err()
        })
        .collect();
    let ok = fuse && missing.is_empty();
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the stack tests: /dev/fuse, root and {tools:?} are required"
        );
        eprintln!("skipping: the stack needs /dev/fuse, root and {tools:?} (missing {missing:?})");
    }
    ok
}

/// A stack from this build's `fireflyer`, in a fresh directory (kept as long as the handle).
pub async fn fresh_stack() -> (tempfile::TempDir, Stack) {
    let dir = tempfile::tempdir().unwrap();
    let stack = Stack::start_with(
        &dir.path().join("stack"),
        Path::new(env!("CARGO_BIN_EXE_fireflyer")),
    )
    .await
    .unwrap();
    (dir, stack)
}
