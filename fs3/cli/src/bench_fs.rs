//! `fs3 bench fs`: one workload on an fs3 mount, on a local directory of the same disk, and
//! (given `--gluster DIR`, a GlusterFS mount made by `scripts/glusterfs-bench-setup.sh`) on
//! GlusterFS, printed side by side with ratios. Workloads: a sequential write of `--size` in
//! 1 MiB writes with an fsync at the end; a cold sequential read of it (page cache dropped);
//! 4 KiB random O_DIRECT reads with 16 in flight; and create, stat and unlink of `--files` files
//! by 1 and by 16 parallel clients.
//!
//! Without `--mount`, a local cluster (1 mgmtd, 3 storage daemons with replication 3, 1 meta)
//! is started under `--dir` and mounted there with `fs3 mount`, all as processes of this binary.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use ff_config::ByteSize;
use ff_harness::ChildProcess;
use ff_harness::fs3::{Fs3Cluster, Fs3ClusterSpec};
use fs3_storage::buf::AlignedBuf;
use serde_json::json;

/// What `fs3 bench fs` measures.
#[derive(Debug, Clone)]
pub struct FsBench {
    /// Working directory (a local cluster and its mount, the local comparison directory).
    pub dir: PathBuf,
    /// An existing fs3 mount to measure instead of starting a cluster.
    pub mount: Option<PathBuf>,
    /// A GlusterFS mount to measure too.
    pub gluster: Option<PathBuf>,
    /// Bytes of the sequential file.
    pub size: ByteSize,
    /// Files in each metadata pass.
    pub files: usize,
    /// How long the random-read pass runs.
    pub random_time: Duration,
    /// Print JSON.
    pub json: bool,
}

const MIB: usize = 1 << 20;
const RANDOM_DEPTH: usize = 16;

/// Figures of one target, by workload name.
type Figures = Vec<(String, f64)>;

fn rate(amount: f64, took: Duration) -> f64 {
    amount / took.as_secs_f64().max(1e-9)
}

fn drop_caches() -> bool {
    // Dirty pages first, then the page cache; needs root (the benchmark says when it could not).
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn sequential(dir: &Path, size: u64) -> anyhow::Result<(f64, f64, bool)> {
    let path = dir.join("sequential.bin");
    let mut block = vec![0u8; MIB];
    for (i, byte) in block.iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(31) ^ 0x5A;
    }
    let started = Instant::now();
    let mut file =
        std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
    let mut written = 0u64;
    while written < size {
        block[..8].copy_from_slice(&written.to_le_bytes());
        file.write_all(&block)?;
        written += MIB as u64;
    }
    file.sync_all()?;
    drop(file);
    let write = rate(written as f64, started.elapsed());
    let cold = drop_caches();
    let started = Instant::now();
    let mut file = std::fs::File::open(&path)?;
    let mut read = 0u64;
    loop {
        let n = file.read(&mut block)?;
        if n == 0 {
            break;
        }
        read += n as u64;
    }
    anyhow::ensure!(read == written, "read {read} of {written} bytes back");
    Ok((write, rate(read as f64, started.elapsed()), cold))
}

fn random_reads(dir: &Path, size: u64, time: Duration) -> anyhow::Result<f64> {
    let path = dir.join("sequential.bin");
    let blocks = (size / 4096).max(1);
    let done = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..RANDOM_DEPTH)
        .map(|t| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path);
            let done = done.clone();
            let ops = ops.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let file = file?;
                let mut buf = AlignedBuf::zeroed(4096);
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                while !done.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let offset = (x % blocks) * 4096;
                    file.read_exact_at(buf.as_mut_slice(), offset)?;
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(time);
    done.store(true, Ordering::Relaxed);
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a reader thread panicked"))??;
    }
    Ok(rate(ops.load(Ordering::Relaxed) as f64, started.elapsed()))
}

/// Runs `op(i)` for every file index, split over `clients` threads; returns operations/s.
fn parallel_files(
    clients: usize,
    files: usize,
    op: impl Fn(usize) -> std::io::Result<()> + Sync,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let op = &op;
                scope.spawn(move || -> std::io::Result<()> {
                    for i in (c..files).step_by(clients) {
                        op(i)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(rate(files as f64, started.elapsed()))
}

fn metadata(dir: &Path, files: usize, clients: usize) -> anyhow::Result<(f64, f64, f64)> {
    let root = dir.join(format!("meta-{clients}"));
    std::fs::create_dir_all(&root)?;
    // Spread over 16 directories, as jobs writing many files usually do.
    for d in 0..16 {
        std::fs::create_dir_all(root.join(format!("d{d}")))?;
    }
    let path = |i: usize| root.join(format!("d{}/f{i}", i % 16));
    let create = parallel_files(clients, files, |i| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path(i))
            .map(drop)
    })?;
    // Stats by other processes see no cached entries: drop the kernel's dentry and inode caches.
    drop_caches();
    let stat = parallel_files(clients, files, |i| std::fs::metadata(path(i)).map(drop))?;
    let unlink = parallel_files(clients, files, |i| std::fs::remove_file(path(i)))?;
    std::fs::remove_dir_all(&root)?;
    Ok((create, stat, unlink))
}

fn measure(target: &Path, bench: &FsBench) -> anyhow::Result<(Figures, bool)> {
    let dir = target.join(format!("fs3-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let size = bench.size.0.max(MIB as u64);
    let (write, read, cold) = sequential(&dir, size)?;
    let random = random_reads(&dir, size, bench.random_time)?;
    let mut figures: Figures = vec![
        ("sequential write (1 MiB, fsync)".into(), write),
        ("sequential read (1 MiB)".into(), read),
        ("4 KiB random read (O_DIRECT, 16)".into(), random),
    ];
    for clients in [1, 16] {
        let (create, stat, unlink) = metadata(&dir, bench.files, clients)?;
        figures.push((format!("create ({clients} clients)"), create));
        figures.push((format!("stat ({clients} clients)"), stat));
        figures.push((format!("unlink ({clients} clients)"), unlink));
    }
    std::fs::remove_dir_all(&dir)?;
    Ok((figures, cold))
}

/// A local cluster and its mount, stopped when dropped or by `stop`.
struct LocalMount {
    cluster: Fs3Cluster,
    mount: ChildProcess,
    point: PathBuf,
}

impl LocalMount {
    async fn start(dir: &Path) -> anyhow::Result<LocalMount> {
        let binary = std::env::current_exe().context("cannot find the fs3 binary")?;
        let cluster_dir = dir.join("cluster");
        let _ = std::fs::remove_dir_all(&cluster_dir);
        std::fs::create_dir_all(&cluster_dir)?;
        let mut spec = Fs3ClusterSpec::new(&binary, &cluster_dir, 1, 3, 3, 0);
        spec.meta_replicas = 1;
        spec.metrics = false;
        spec.base_port = ff_harness::free_port_block(spec.port_count())?;
        let cluster = Fs3Cluster::start(spec, Duration::from_secs(60)).await?;
        let point = dir.join("mnt");
        std::fs::create_dir_all(&point)?;
        let mut mount = ChildProcess::new(
            "fs3-mount",
            &binary,
            [
                "mount".to_string(),
                point.display().to_string(),
                "--mgmtd".to_string(),
                cluster.mgmtd_endpoints().join(","),
                "--token-file".to_string(),
                cluster.admin_token_path().display().to_string(),
            ],
            dir.join("mount.log"),
        );
        mount.spawn()?;
        let canonical = std::fs::canonicalize(&point)?.display().to_string();
        ff_harness::wait_for(
            "the fs3 mount",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || async {
                mount
                    .check_running()
                    .map_err(ff_harness::NotReady::Failed)?;
                let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
                if info
                    .lines()
                    .any(|l| l.split(' ').nth(4) == Some(canonical.as_str()))
                {
                    Ok(())
                } else {
                    Err("not mounted yet".to_string().into())
                }
            },
        )
        .await?;
        Ok(LocalMount {
            cluster,
            mount,
            point,
        })
    }

    async fn stop(mut self) {
        let _ = self.mount.stop(Duration::from_secs(10)).await;
        self.cluster.stop_all().await;
    }
}

pub async fn run(bench: FsBench) -> anyhow::Result<()> {
    std::fs::create_dir_all(&bench.dir)
        .with_context(|| format!("cannot create {}", bench.dir.display()))?;
    let dir = std::fs::canonicalize(&bench.dir)?;
    let local_mount = match &bench.mount {
        Some(_) => None,
        None => {
            eprintln!(
                "starting a local cluster and mounting it under {} ...",
                dir.display()
            );
            Some(LocalMount::start(&dir).await?)
        }
    };
    let fs3_point = bench
        .mount
        .clone()
        .or_else(|| local_mount.as_ref().map(|m| m.point.clone()))
        .context("no fs3 mount")?;
    let local = dir.join("local");
    std::fs::create_dir_all(&local)?;
    let mut targets = vec![("fs3".to_string(), fs3_point), ("local".to_string(), local)];
    if let Some(gluster) = &bench.gluster {
        targets.push(("glusterfs".to_string(), gluster.clone()));
    }
    let mut results = Vec::new();
    let mut all_cold = true;
    for (name, path) in &targets {
        eprintln!("measuring {name} at {} ...", path.display());
        let bench = bench.clone();
        let path = path.clone();
        let (figures, cold) = tokio::task::spawn_blocking(move || measure(&path, &bench)).await??;
        all_cold &= cold;
        results.push((name.clone(), figures));
    }
    if let Some(mount) = local_mount {
        mount.stop().await;
    }
    print(&bench, &results, all_cold);
    Ok(())
}

fn shown(workload: &str, value: f64) -> String {
    if workload.starts_with("sequential") {
        format!("{:.0} MiB/s", value / MIB as f64)
    } else {
        format!("{value:.0}/s")
    }
}

fn print(bench: &FsBench, results: &[(String, Figures)], cold: bool) {
    let workloads: Vec<String> = results[0].1.iter().map(|(w, _)| w.clone()).collect();
    let value = |target: usize, w: usize| results[target].1[w].1;
    if bench.json {
        let rows: Vec<serde_json::Value> = workloads
            .iter()
            .enumerate()
            .map(|(w, name)| {
                let mut row = json!({"workload": name});
                for (t, (target, _)) in results.iter().enumerate() {
                    row[target] = json!(value(t, w));
                }
                row
            })
            .collect();
        println!(
            "{}",
            json!({"size": bench.size.0, "files": bench.files, "cold_reads": cold, "results": rows})
        );
        return;
    }
    println!(
        "fs3 bench fs: {} sequential, {} files per metadata pass{}",
        bench.size,
        bench.files,
        if cold {
            ""
        } else {
            " (page cache NOT dropped: run as root for cold reads)"
        }
    );
    let mut header = format!("{:<34}", "workload");
    for (target, _) in results {
        header += &format!(" {target:>14}");
    }
    for (target, _) in results.iter().skip(1) {
        header += &format!(" {:>12}", format!("fs3/{target}"));
    }
    println!("{header}");
    for (w, name) in workloads.iter().enumerate() {
        let mut line = format!("{name:<34}");
        for t in 0..results.len() {
            line += &format!(" {:>14}", shown(name, value(t, w)));
        }
        for t in 1..results.len() {
            line += &format!(" {:>12.2}", value(0, w) / value(t, w).max(1e-9));
        }
        println!("{line}");
    }
}
