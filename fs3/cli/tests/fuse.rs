//! fs3 through a real FUSE mount (`fs3 mount` as a process), next to a local ext4 directory:
//! the same generated operations give the same results and errno values; permissions as an
//! unprivileged user; large files, a tar tree with links, concurrent writers and readers; a
//! storage daemon killed under a read and a write stream; the FUSE daemon killed after fsync.

// Tests may panic on anything unexpected; that is how they fail.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write as _;
use std::os::unix::fs::{FileExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ff_harness::fs3::{Fs3Cluster, Mount};

/// Whether FUSE can be used here; outside CI a missing /dev/fuse skips with a reason.
fn fuse_available() -> bool {
    let ok = Path::new("/dev/fuse").exists() && nix::unistd::geteuid().is_root();
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the FUSE tests: /dev/fuse and root are required"
        );
        eprintln!("skipping: FUSE tests need /dev/fuse and root");
    }
    ok
}

/// A cluster with meta in a fresh directory, mounted at `DIR/mnt` (log `DIR/mount.log`); None
/// (with a printed reason) where FUSE cannot run outside CI.
async fn mounted_cluster() -> Option<(tempfile::TempDir, Fs3Cluster, Mount)> {
    if !fuse_available() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut spec = common::spec(dir.path(), 1, 3);
    spec.meta_replicas = 1;
    let cluster = common::start(spec).await;
    let mount = Mount::start(
        &cluster,
        &dir.path().join("mnt"),
        &dir.path().join("mount.log"),
        0,
    )
    .await
    .unwrap();
    Some((dir, cluster, mount))
}

// ---- the differential test -------------------------------------------------------------

/// A small deterministic generator (xorshift64*), so a failing sequence can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

#[derive(Debug, Clone)]
enum Op {
    Create(String, Vec<u8>),
    WriteAt(String, u64, Vec<u8>),
    Append(String, Vec<u8>),
    Truncate(String, u64),
    Rename(String, String),
    Link(String, String),
    Symlink(String, String),
    Chmod(String, u32),
    Unlink(String),
    Mkdir(String),
    Rmdir(String),
    ReadDir(String),
    Read(String),
    Stat(String),
}

fn generate(seed: u64, count: usize) -> Vec<Op> {
    let mut rng = Rng(seed | 1);
    let dirs = ["", "x/", "x/y/", "z/"];
    let names = ["a", "b", "y", "z"];
    let path = |rng: &mut Rng| format!("{}{}", rng.pick(&dirs), rng.pick(&names));
    (0..count)
        .map(|_| {
            let p = path(&mut rng);
            let data = |rng: &mut Rng| {
                let len = [0, 1, 100, 5000, 70_000][rng.below(5)];
                let seed = rng.next() as u8;
                (0..len)
                    .map(|i| (i as u8).wrapping_mul(7) ^ seed)
                    .collect::<Vec<u8>>()
            };
            match rng.below(16) {
                0 | 1 => Op::Create(p, data(&mut rng)),
                2 => Op::WriteAt(p, [0, 10, 4096, 1 << 20][rng.below(4)], data(&mut rng)),
                3 => Op::Append(p, data(&mut rng)),
                4 => Op::Truncate(p, [0, 3, 5000, 2 << 20][rng.below(4)]),
                5 => Op::Rename(p, path(&mut rng)),
                6 => Op::Link(p, path(&mut rng)),
                7 => Op::Symlink(rng.pick(&["a", "../a", "x/y", "/nowhere"]).to_string(), p),
                8 => Op::Chmod(p, [0o600, 0o755, 0o4711, 0o1777][rng.below(4)]),
                9 => Op::Unlink(p),
                10 | 11 => Op::Mkdir(p),
                12 => Op::Rmdir(p),
                13 => Op::ReadDir(rng.pick(&dirs).to_string()),
                14 => Op::Read(p),
                _ => Op::Stat(p),
            }
        })
        .collect()
}

#[allow(clippy::needless_pass_by_value)] // used as `map_err(errno)`
fn errno(error: std::io::Error) -> i32 {
    error.raw_os_error().unwrap_or(-1)
}

/// Applies `op` under `root`; the outcome is what a caller can observe.
fn apply(root: &Path, op: &Op) -> Result<String, i32> {
    use std::fs;
    let at = |p: &str| root.join(p);
    match op {
        Op::Create(p, data) => {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(at(p))
                .map_err(errno)?;
            file.write_all(data).map_err(errno)?;
            Ok(String::new())
        }
        Op::WriteAt(p, offset, data) => {
            let file = fs::OpenOptions::new()
                .write(true)
                .open(at(p))
                .map_err(errno)?;
            file.write_all_at(data, *offset).map_err(errno)?;
            Ok(String::new())
        }
        Op::Append(p, data) => {
            let mut file = fs::OpenOptions::new()
                .append(true)
                .open(at(p))
                .map_err(errno)?;
            file.write_all(data).map_err(errno)?;
            Ok(String::new())
        }
        Op::Truncate(p, len) => {
            let file = fs::OpenOptions::new()
                .write(true)
                .open(at(p))
                .map_err(errno)?;
            file.set_len(*len).map_err(errno)?;
            Ok(String::new())
        }
        Op::Rename(a, b) => fs::rename(at(a), at(b))
            .map(|()| String::new())
            .map_err(errno),
        Op::Link(a, b) => fs::hard_link(at(a), at(b))
            .map(|()| String::new())
            .map_err(errno),
        Op::Symlink(target, p) => std::os::unix::fs::symlink(target, at(p))
            .map(|()| String::new())
            .map_err(errno),
        Op::Chmod(p, mode) => fs::set_permissions(at(p), fs::Permissions::from_mode(*mode))
            .map(|()| String::new())
            .map_err(errno),
        Op::Unlink(p) => fs::remove_file(at(p))
            .map(|()| String::new())
            .map_err(errno),
        Op::Mkdir(p) => fs::create_dir(at(p)).map(|()| String::new()).map_err(errno),
        Op::Rmdir(p) => fs::remove_dir(at(p)).map(|()| String::new()).map_err(errno),
        Op::ReadDir(p) => {
            let mut names: Vec<String> = fs::read_dir(at(p))
                .map_err(errno)?
                .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect();
            names.sort();
            Ok(names.join(","))
        }
        Op::Read(p) => {
            let data = fs::read(at(p)).map_err(errno)?;
            let sum = data
                .iter()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(*b)));
            Ok(format!("{} bytes, sum {sum:x}", data.len()))
        }
        Op::Stat(p) => {
            let meta = fs::symlink_metadata(at(p)).map_err(errno)?;
            describe(&meta).map_err(|()| -1)
        }
    }
}

fn describe(meta: &std::fs::Metadata) -> Result<String, ()> {
    use std::os::unix::fs::MetadataExt as _;
    let kind = if meta.is_dir() {
        "dir"
    } else if meta.file_type().is_symlink() {
        "symlink"
    } else {
        "file"
    };
    // Directory sizes differ between file systems by design; everything else must match.
    let size = if meta.is_dir() { 0 } else { meta.len() };
    Ok(format!(
        "{kind} size {size} mode {:o} nlink {}",
        meta.mode() & 0o7777,
        meta.nlink()
    ))
}

/// Every path under `root` with what `describe` says of it, and file contents.
fn snapshot(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let mut line = format!("{rel}: {}", describe(&meta).unwrap());
            if meta.file_type().is_symlink() {
                line += &format!(" -> {}", std::fs::read_link(&path).unwrap().display());
            } else if meta.is_file() {
                line += &format!(" content {:?}", apply(root, &Op::Read(rel.clone())));
            } else {
                stack.push(path);
            }
            out.push(line);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posix_semantics_match_a_local_directory() {
    let Some((_dir, mut cluster, mount)) = mounted_cluster().await else {
        return;
    };
    // The comparison directory is on the machine's ext4 root file system.
    let local_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let local = local_dir.path().to_path_buf();
    let fs3 = mount.point().join("diff");
    std::fs::create_dir(&fs3).unwrap();

    for seed in [1u64, 2, 3] {
        for root in [&local, &fs3] {
            for entry in std::fs::read_dir(root).unwrap() {
                let path = entry.unwrap().path();
                if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                    std::fs::remove_dir_all(&path).unwrap();
                } else {
                    std::fs::remove_file(&path).unwrap();
                }
            }
            std::fs::create_dir(root.join("x")).unwrap();
        }
        let mut succeeded = 0;
        let mut errnos = std::collections::BTreeSet::new();
        for (step, op) in generate(seed, 400).iter().enumerate() {
            let expected = apply(&local, op);
            let got = apply(&fs3, op);
            assert_eq!(got, expected, "seed {seed} step {step}: {op:?}");
            match expected {
                Ok(_) => succeeded += 1,
                Err(errno) => {
                    errnos.insert(errno);
                }
            }
        }
        // The sequence must exercise both paths: real changes and a spread of refusals.
        assert!(
            succeeded >= 100,
            "seed {seed}: only {succeeded} operations succeeded"
        );
        assert!(errnos.len() >= 5, "seed {seed}: errnos seen {errnos:?}");
        eprintln!("seed {seed}: {succeeded} of 400 succeeded; errnos {errnos:?}");
        assert_eq!(
            snapshot(&fs3),
            snapshot(&local),
            "seed {seed}: final trees differ"
        );
    }

    // Bad input: long names, renaming a directory into itself, listing a file.
    for root in [&local, &fs3] {
        let long = "n".repeat(256);
        std::fs::create_dir_all(root.join("p/q")).unwrap();
        std::fs::write(root.join("plain"), b"x").unwrap();
        let outcomes = [
            errno(std::fs::write(root.join(&long), b"x").unwrap_err()),
            errno(std::fs::create_dir(root.join(&long)).unwrap_err()),
            errno(std::fs::rename(root.join("p"), root.join("p/q/r")).unwrap_err()),
            errno(
                std::fs::read_dir(root.join("plain"))
                    .map(|_| ())
                    .unwrap_err(),
            ),
            errno(std::fs::remove_dir(root.join("p")).unwrap_err()),
        ];
        assert_eq!(
            outcomes,
            [
                libc::ENAMETOOLONG,
                libc::ENAMETOOLONG,
                libc::EINVAL,
                libc::ENOTDIR,
                libc::ENOTEMPTY
            ],
            "{}",
            root.display()
        );
    }
    // A file created read-only stays writable through the descriptor that created it.
    for root in [&local, &fs3] {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(root.join("readonly"))
            .unwrap();
        file.write_all(b"written anyway").unwrap();
        file.set_len(7).unwrap();
        file.sync_all().unwrap();
        drop(file);
        assert_eq!(std::fs::read(root.join("readonly")).unwrap(), b"written");
        let again = std::fs::OpenOptions::new()
            .write(true)
            .open(root.join("readonly"));
        // Root may open it again; the mode still says read-only.
        assert!(again.is_ok());
        let mode = std::fs::metadata(root.join("readonly"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444);
    }
    // An unlinked file lives while open, even past meta's collection delay (2 s here), and
    // even when the first write comes after the unlink.
    for root in [&local, &fs3] {
        use std::io::{Read as _, Seek as _};
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(root.join("doomed"))
            .unwrap();
        std::fs::remove_file(root.join("doomed")).unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        file.write_all(b"still here").unwrap();
        file.sync_all().unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        file.rewind().unwrap();
        let mut back = String::new();
        file.read_to_string(&mut back).unwrap();
        assert_eq!(back, "still here", "{}", root.display());
    }
    // NUL never reaches the kernel; the native client refuses it with EINVAL.
    let client = cluster.fs_client().await.unwrap();
    let nul = client
        .create(
            &Default::default(),
            fs3_client::ROOT,
            b"a\0b",
            fs3_proto::meta::InodeKind::File,
            0o644,
            b"",
        )
        .await
        .unwrap_err();
    assert_eq!(nul.errno, libc::EINVAL);

    // Permissions as nobody: the same refusals as ext4.
    for root in [&local, &fs3] {
        let private = root.join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::write(private.join("secret"), b"s").unwrap();
        std::fs::set_permissions(
            private.join("secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let shared = root.join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::write(shared.join("roots"), b"r").unwrap();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = "cd \"$1\"; \
        cat private/secret >/dev/null 2>&1; echo read=$?; \
        echo x > private/new 2>/dev/null; echo create=$?; \
        ls private >/dev/null 2>&1; echo list=$?; \
        mkdir newdir 2>/dev/null; echo mkdir=$?; \
        echo mine > shared/mine; echo shared=$?; \
        rm -f shared/roots 2>/dev/null; echo sticky=$?; \
        chmod 777 private/secret 2>/dev/null; echo chmod=$?; \
        cat shared/mine; rm shared/mine; echo own=$?";
    let as_nobody = |root: &Path| {
        let out = Command::new("runuser")
            .args(["-u", "nobody", "--", "sh", "-c", script, "sh"])
            .arg(root)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let expected = as_nobody(&local);
    assert!(
        expected.contains("read=1") && expected.contains("sticky=1"),
        "{expected}"
    );
    assert_eq!(as_nobody(&fs3), expected);
    drop(mount);
    cluster.stop_all().await;
}

// ---- large files, trees, concurrency -----------------------------------------------------

fn run(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn sha256(path: &Path) -> String {
    run(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A tree of `dirs` × `dirs` directories with `files` files each, plus symlinks and hard links.
fn make_tree(root: &Path, dirs: usize, files: usize) -> usize {
    let mut count = 0;
    for a in 0..dirs {
        for b in 0..dirs {
            let dir = root.join(format!("d{a}/e{b}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..files {
                let body = format!("{a}/{b}/{f}\n").repeat(f * 37 + 1);
                std::fs::write(dir.join(format!("f{f}")), body).unwrap();
                count += 1;
            }
            std::os::unix::fs::symlink("f0", dir.join("to-f0")).unwrap();
            std::os::unix::fs::symlink("../../d0", dir.join("to-d0")).unwrap();
            std::fs::hard_link(dir.join("f1"), dir.join("f1-hard")).unwrap();
        }
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_files_trees_and_concurrency() {
    let Some((dir, mut cluster, mount)) = mounted_cluster().await else {
        return;
    };
    let mnt = mount.point().to_path_buf();
    // The cluster keeps three replicas of what goes through the mount on disk (768 MiB for the
    // big file, plus class growth); the files it is compared against (source, copy, tree and
    // tarball: under 640 MiB) live in memory where there is room.
    let scratch = ff_harness::disk::memory_scratch(640 << 20).unwrap();
    let local = scratch.path();
    let on_disk = if local.starts_with("/dev/shm") {
        0
    } else {
        640 << 20
    };
    ff_harness::disk::require_free(
        dir.path(),
        (1280 << 20) + on_disk,
        "the 256 MiB file, three times",
    )
    .unwrap();

    // 256 MiB of random bytes: dd in, cp out, cmp and sha256 through the mount.
    let source = local.join("random.bin");
    run(Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=256", "status=none"])
        .arg(format!("of={}", source.display())));
    run(Command::new("dd")
        .args(["bs=1M", "status=none", "conv=fsync"])
        .arg(format!("if={}", source.display()))
        .arg(format!("of={}", mnt.join("big.bin").display())));
    run(Command::new("cp")
        .arg(mnt.join("big.bin"))
        .arg(local.join("back.bin")));
    run(Command::new("cmp").arg(&source).arg(local.join("back.bin")));
    assert_eq!(sha256(&mnt.join("big.bin")), sha256(&source));
    std::fs::remove_file(local.join("back.bin")).unwrap();

    // The mount's own series saw that traffic, and a failed lookup as an error.
    assert!(std::fs::metadata(mnt.join("no-such-file")).is_err());
    let metrics = ff_metrics::http_get(mount.metrics_addr(), "/metrics")
        .await
        .unwrap();
    let series = |name: &str| common::metric_value(&metrics, name);
    assert!(series("fs3_fuse_bytes_total{direction=\"write\"}") >= (256 << 20) as f64);
    assert!(series("fs3_fuse_requests_total{op=\"write\",outcome=\"ok\"}") >= 256.0);
    assert!(series("fs3_fuse_requests_total{op=\"lookup\",outcome=\"error\"}") >= 1.0);
    assert!(series("fs3_fuse_request_seconds_count{op=\"flush\"}") >= 1.0);
    assert_eq!(series("fs3_fuse_writeback_errors_total"), 0.0);

    // A tree of over a thousand files with symlinks and hard links, through tar.
    let tree = local.join("tree");
    let files = make_tree(&tree, 8, 16);
    assert!(files >= 1000, "{files} files");
    let tarball = local.join("tree.tar");
    run(Command::new("tar")
        .arg("cf")
        .arg(&tarball)
        .arg("-C")
        .arg(local)
        .arg("tree"));
    run(Command::new("tar")
        .arg("xf")
        .arg(&tarball)
        .arg("-C")
        .arg(&mnt));
    run(Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(&tree)
        .arg(mnt.join("tree")));
    let hard = std::fs::metadata(mnt.join("tree/d3/e4/f1-hard")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&hard), 2);

    // Several processes writing different files in one directory at once, readers alongside.
    std::fs::create_dir(mnt.join("busy")).unwrap();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "for i in $(seq 1 25); do head -c 300000 /dev/zero | tr '\\0' '{}' > busy/w{w}-$i || exit 1; done",
                    (b'a' + w as u8) as char
                ))
                .current_dir(&mnt)
                .spawn()
                .unwrap()
        })
        .collect();
    let reader = Command::new("sh")
        .arg("-c")
        .arg("for i in $(seq 1 20); do sha256sum big.bin > /dev/null || exit 1; ls busy > /dev/null || exit 1; done")
        .current_dir(&mnt)
        .spawn()
        .unwrap();
    for mut child in writers.into_iter().chain([reader]) {
        assert!(child.wait().unwrap().success());
    }
    let names = std::fs::read_dir(mnt.join("busy")).unwrap().count();
    assert_eq!(names, 100);
    for w in 0..4u8 {
        let data = std::fs::read(mnt.join(format!("busy/w{w}-25"))).unwrap();
        assert_eq!(data.len(), 300_000);
        assert!(data.iter().all(|b| *b == b'a' + w));
    }
    drop(mount);
    cluster.stop_all().await;
}

// ---- faults ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_and_fuse_daemons_die_under_the_mount() {
    let Some((dir, mut cluster, mount)) = mounted_cluster().await else {
        return;
    };
    let log = dir.path().join("mount.log");
    let mnt = mount.point().to_path_buf();

    // A file to read while a storage daemon dies, and a write stream at the same time.
    let source = dir.path().join("random.bin");
    run(Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=64", "status=none"])
        .arg(format!("of={}", source.display())));
    std::fs::copy(&source, mnt.join("read.bin")).unwrap();
    let reader = Command::new("sh")
        .arg("-c")
        .arg("for i in $(seq 1 6); do cat read.bin > /dev/null || exit 1; done")
        .current_dir(&mnt)
        .spawn()
        .unwrap();
    let writer = Command::new("dd")
        .args(["bs=1M", "count=64", "status=none", "conv=fsync"])
        .arg(format!("if={}", source.display()))
        .arg(format!("of={}", mnt.join("write.bin").display()))
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.storage(2).unwrap().kill().await.unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let mut children = [reader, writer];
        children
            .iter_mut()
            .map(|c| c.wait().unwrap().success())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(
        status,
        vec![true, true],
        "the streams must survive a storage daemon's death"
    );
    assert_eq!(sha256(&mnt.join("write.bin")), sha256(&source));
    assert_eq!(sha256(&mnt.join("read.bin")), sha256(&source));
    cluster.storage(2).unwrap().spawn().unwrap();

    // fsync'd data survives the FUSE daemon's death and a remount.
    let mut file = std::fs::File::create(mnt.join("synced.txt")).unwrap();
    file.write_all(b"durable bytes").unwrap();
    file.sync_all().unwrap();
    let mut mount = mount;
    mount.process.kill().await.unwrap();
    drop(file);
    let stale = std::fs::metadata(&mnt).unwrap_err();
    assert_eq!(stale.raw_os_error(), Some(libc::ENOTCONN));
    let refused = Command::new(env!("CARGO_BIN_EXE_fs3"))
        .arg("mount")
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("stale mount"),
        "{refused:?}"
    );
    nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).unwrap();
    let remounted = Mount::start(&cluster, &mnt, &log, 0).await.unwrap();
    assert_eq!(
        std::fs::read(mnt.join("synced.txt")).unwrap(),
        b"durable bytes"
    );
    drop(remounted);
    drop(mount);
    cluster.stop_all().await;
}
