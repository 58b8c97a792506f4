//! `fs3 bench storage`: the data plane's throughput next to the disk it runs on.
//!
//! First the raw disk: sequential O_DIRECT writes and reads of 1 MiB and 4 MiB blocks through
//! io_uring, and 4 KiB random reads, on a file in the benchmark directory. Then a local cluster
//! (real processes, this same binary) with replication 1 and with replication 3: sequential
//! chunk writes and reads of 1 MiB and 4 MiB through the chunk client, and 4 KiB random reads
//! of written chunks. Each figure is printed with its ratio to the raw disk; with replication 3
//! every byte is written three times to the one disk, so the fair ceiling for writes is a third.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use ff_config::ByteSize;
use ff_harness::fs3::{Fs3Cluster, Fs3ClusterSpec, TABLE_ID};
use fs3_client::{ChunkClient, ChunkUpdate};
use fs3_proto::storage::ChunkId;
use fs3_storage::buf::AlignedBuf;
use fs3_storage::io::{Io, IoBackend, open_direct};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;

/// What `fs3 bench storage` measures with.
#[derive(Debug, Clone)]
pub struct StorageBench {
    /// Directory on the disk to measure (created; the benchmark's files are removed after).
    pub dir: PathBuf,
    /// Bytes written and read in each sequential pass.
    pub size: ByteSize,
    /// Requests in flight at once in sequential passes.
    pub depth: usize,
    /// Requests in flight at once in random 4 KiB reads.
    pub random_depth: usize,
    /// How long each random-read pass runs.
    pub random_time: Duration,
    /// I/O backend of the raw pass and of the targets.
    pub io: IoBackend,
    /// The replication factors to measure (a local cluster each).
    pub replications: Vec<u32>,
    /// Print JSON instead of a table.
    pub json: bool,
}

/// One measured figure.
#[derive(Debug, Clone)]
struct Figure {
    what: String,
    /// Bytes per second, or operations per second for random reads.
    rate: f64,
    /// The raw-disk figure this one compares with, and how (e.g. "raw/3").
    baseline: Option<(f64, &'static str)>,
    unit: &'static str,
}

const MIB: usize = 1 << 20;
const BLOCK: usize = 4096;

async fn timed<F: std::future::Future<Output = anyhow::Result<()>>>(
    run: F,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    run.await?;
    Ok(started.elapsed())
}

/// Raw sequential O_DIRECT writes then reads of `size` bytes in `block`-byte requests.
async fn raw_sequential(
    io: &Arc<Io>,
    path: &Path,
    size: usize,
    block: usize,
    depth: usize,
) -> anyhow::Result<(f64, f64)> {
    let file = Arc::new(open_direct(path).with_context(|| format!("open {}", path.display()))?);
    let blocks = size / block;
    let write = timed(async {
        futures::stream::iter(0..blocks)
            .map(|i| {
                let (io, file) = (io.clone(), file.clone());
                async move {
                    let mut buf = AlignedBuf::zeroed(block);
                    buf.as_mut_slice()[..8].copy_from_slice(&(i as u64).to_le_bytes());
                    io.write_at(&file, (i * block) as u64, buf).await.map(drop)
                }
            })
            .buffer_unordered(depth)
            .try_collect::<()>()
            .await?;
        io.sync_data(&file).await?;
        Ok(())
    })
    .await?;
    let read = timed(async {
        futures::stream::iter(0..blocks)
            .map(|i| {
                let (io, file) = (io.clone(), file.clone());
                async move { io.read_at(&file, (i * block) as u64, block).await.map(drop) }
            })
            .buffer_unordered(depth)
            .try_collect::<()>()
            .await?;
        Ok(())
    })
    .await?;
    let bytes = (blocks * block) as f64;
    Ok((bytes / write.as_secs_f64(), bytes / read.as_secs_f64()))
}

/// Operations per second of `op`, run with `depth` in flight for `time`.
async fn ops_per_second<F, Fut>(depth: usize, time: Duration, op: F) -> anyhow::Result<f64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let deadline = Instant::now() + time;
    let started = Instant::now();
    let done = futures::stream::iter(0..)
        .take_while(|_| std::future::ready(Instant::now() < deadline))
        .map(|_| op())
        .buffer_unordered(depth)
        .try_fold(0u64, |n, ()| std::future::ready(Ok(n + 1)))
        .await?;
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

/// Raw 4 KiB random reads over the first `size` bytes of `path` for `time`; operations/s.
async fn raw_random(
    io: &Arc<Io>,
    path: &Path,
    size: usize,
    depth: usize,
    time: Duration,
) -> anyhow::Result<f64> {
    let file = Arc::new(open_direct(path)?);
    let blocks = (size / BLOCK) as u64;
    ops_per_second(depth, time, || {
        let (io, file) = (io.clone(), file.clone());
        async move {
            let block = rand::random_range(0..blocks);
            io.read_at(&file, block * BLOCK as u64, BLOCK).await?;
            Ok(())
        }
    })
    .await
}

fn chunk(inode: u64, index: u64) -> ChunkId {
    ChunkId { inode, index }
}

/// Rates of one sequential client pass, bytes per second.
struct Sequential {
    /// Writing chunks that do not exist yet (class files grow meanwhile).
    create: f64,
    /// Replacing every chunk again (steady state: slots are reused).
    overwrite: f64,
    /// Reading every chunk.
    read: f64,
}

/// Writes `size` bytes in `chunk_size` chunks of `inode`, writes them all again, then reads
/// them, `depth` requests in flight.
async fn client_sequential(
    client: &Arc<ChunkClient>,
    chain: u64,
    inode: u64,
    size: usize,
    chunk_size: usize,
    depth: usize,
) -> anyhow::Result<Sequential> {
    let chunks = (size / chunk_size) as u64;
    let data = Bytes::from(
        (0..chunk_size)
            .map(|i| (i as u8).wrapping_mul(31))
            .collect::<Vec<u8>>(),
    );
    let write_all = || async {
        futures::stream::iter(0..chunks)
            .map(|index| {
                let (client, data) = (client.clone(), data.clone());
                async move {
                    client
                        .write(chain, chunk(inode, index), ChunkUpdate::replace(data))
                        .await
                        .map(drop)
                }
            })
            .buffer_unordered(depth)
            .try_collect::<()>()
            .await?;
        anyhow::Ok(())
    };
    let create = timed(write_all()).await?;
    let overwrite = timed(write_all()).await?;
    let read = timed(async {
        futures::stream::iter(0..chunks)
            .map(|index| {
                let client = client.clone();
                async move {
                    let read = client
                        .read(chain, chunk(inode, index), 0, chunk_size as u32)
                        .await?;
                    anyhow::ensure!(read.data.len() == chunk_size, "short read of chunk {index}");
                    Ok(())
                }
            })
            .buffer_unordered(depth)
            .try_collect::<()>()
            .await?;
        Ok(())
    })
    .await?;
    let bytes = (chunks as usize * chunk_size) as f64;
    Ok(Sequential {
        create: bytes / create.as_secs_f64(),
        overwrite: bytes / overwrite.as_secs_f64(),
        read: bytes / read.as_secs_f64(),
    })
}

/// 4 KiB random reads over the `chunks` chunks of `inode` (each `chunk_size` long); ops/s.
async fn client_random(
    client: &Arc<ChunkClient>,
    chain: u64,
    inode: u64,
    chunks: u64,
    chunk_size: usize,
    depth: usize,
    time: Duration,
) -> anyhow::Result<f64> {
    let blocks = (chunk_size / BLOCK) as u32;
    ops_per_second(depth, time, || {
        let client = client.clone();
        async move {
            let index = rand::random_range(0..chunks);
            let offset = rand::random_range(0..blocks) * BLOCK as u32;
            client
                .read(chain, chunk(inode, index), offset, BLOCK as u32)
                .await?;
            Ok(())
        }
    })
    .await
}

/// Brings up a local cluster of `nodes` storage daemons with `replication` in `dir`.
async fn local_cluster(
    bench: &StorageBench,
    dir: &Path,
    nodes: u64,
    replication: u32,
) -> anyhow::Result<Fs3Cluster> {
    let binary = std::env::current_exe().context("cannot find the fs3 binary")?;
    let mut spec = Fs3ClusterSpec::new(binary, dir, 1, nodes, replication, 0);
    spec.metrics = false;
    spec.base_port = ff_harness::free_port_block(spec.port_count())?;
    spec.engine.io = bench.io;
    spec.engine.max_chunk_size = ByteSize::mib(4);
    spec.engine.class_growth = ByteSize::mib(256);
    Fs3Cluster::start(spec, Duration::from_secs(60)).await
}

async fn cluster_figures(
    bench: &StorageBench,
    replication: u32,
    raw: &RawFigures,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    let dir = bench.dir.join(format!("cluster-r{replication}"));
    let mut cluster = local_cluster(bench, &dir, u64::from(replication), replication).await?;
    let result = async {
        let client = Arc::new(cluster.chunk_client(Duration::from_secs(60))?);
        let routing = cluster.routing().await?;
        let chain = routing
            .tables
            .iter()
            .find(|t| t.id == TABLE_ID)
            .and_then(|t| t.chains.first().copied())
            .context("the bootstrapped table has no chain")?;
        let size = bench.size.as_usize();
        let write_baseline = if replication == 1 { "raw" } else { "raw/3" };
        let write_divisor = f64::from(replication);
        for (inode, chunk_size, raw_write, raw_read) in [
            (1, MIB, raw.write_1m, raw.read_1m),
            (2, 4 * MIB, raw.write_4m, raw.read_4m),
        ] {
            let rates =
                client_sequential(&client, chain, inode, size, chunk_size, bench.depth).await?;
            let label = format!("r{replication} client {} MiB chunks", chunk_size / MIB);
            let write_ceiling = Some((raw_write / write_divisor, write_baseline));
            figures.push(Figure {
                what: format!("{label} create"),
                rate: rates.create,
                baseline: write_ceiling,
                unit: "MB/s",
            });
            figures.push(Figure {
                what: format!("{label} overwrite"),
                rate: rates.overwrite,
                baseline: write_ceiling,
                unit: "MB/s",
            });
            figures.push(Figure {
                what: format!("{label} read"),
                rate: rates.read,
                baseline: Some((raw_read, "raw")),
                unit: "MB/s",
            });
        }
        let iops = client_random(
            &client,
            chain,
            1,
            (size / MIB) as u64,
            MIB,
            bench.random_depth,
            bench.random_time,
        )
        .await?;
        figures.push(Figure {
            what: format!("r{replication} client 4 KiB random read"),
            rate: iops,
            baseline: Some((raw.random_iops, "raw")),
            unit: "IOPS",
        });
        anyhow::Ok(())
    }
    .await;
    cluster.stop_all().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

struct RawFigures {
    write_1m: f64,
    read_1m: f64,
    write_4m: f64,
    read_4m: f64,
    random_iops: f64,
}

/// Runs the benchmark and prints its figures.
pub async fn run(bench: StorageBench) -> anyhow::Result<()> {
    anyhow::ensure!(
        bench.size.bytes() >= 16 * MIB as u64,
        "--size must be at least 16MiB"
    );
    // A directory of its own, so that runs side by side do not collide.
    let mut bench = bench;
    bench.dir = bench.dir.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&bench.dir)
        .with_context(|| format!("cannot create {}", bench.dir.display()))?;
    let result = run_in(&bench).await;
    let _ = std::fs::remove_dir_all(&bench.dir);
    result
}

async fn run_in(bench: &StorageBench) -> anyhow::Result<()> {
    let size = bench.size.as_usize() / (4 * MIB) * (4 * MIB);
    let io = Arc::new(Io::start(bench.io, 256, "bench")?);
    let raw_path = bench.dir.join("raw.dat");
    let mut figures = Vec::new();
    eprintln!("measuring the raw disk under {} ...", bench.dir.display());
    let raw = async {
        let (write_1m, read_1m) = raw_sequential(&io, &raw_path, size, MIB, bench.depth).await?;
        let (write_4m, read_4m) =
            raw_sequential(&io, &raw_path, size, 4 * MIB, bench.depth).await?;
        let random_iops =
            raw_random(&io, &raw_path, size, bench.random_depth, bench.random_time).await?;
        anyhow::Ok(RawFigures {
            write_1m,
            read_1m,
            write_4m,
            read_4m,
            random_iops,
        })
    }
    .await;
    let _ = std::fs::remove_file(&raw_path);
    let raw = raw?;
    for (what, rate, unit) in [
        ("raw O_DIRECT 1 MiB write", raw.write_1m, "MB/s"),
        ("raw O_DIRECT 1 MiB read", raw.read_1m, "MB/s"),
        ("raw O_DIRECT 4 MiB write", raw.write_4m, "MB/s"),
        ("raw O_DIRECT 4 MiB read", raw.read_4m, "MB/s"),
        ("raw O_DIRECT 4 KiB random read", raw.random_iops, "IOPS"),
    ] {
        figures.push(Figure {
            what: what.to_string(),
            rate,
            baseline: None,
            unit,
        });
    }
    for &replication in &bench.replications {
        eprintln!("measuring a local cluster with replication {replication} ...");
        cluster_figures(bench, replication, &raw, &mut figures).await?;
    }
    print(bench, &figures);
    Ok(())
}

fn shown(rate: f64, unit: &str) -> String {
    if unit == "MB/s" {
        format!("{:.0}", rate / 1e6)
    } else {
        format!("{rate:.0}")
    }
}

fn print(bench: &StorageBench, figures: &[Figure]) {
    if bench.json {
        let rows: Vec<_> = figures
            .iter()
            .map(|f| {
                json!({
                    "what": f.what,
                    "unit": f.unit,
                    "rate": if f.unit == "MB/s" { f.rate / 1e6 } else { f.rate },
                    "baseline": f.baseline.map(|(b, _)| if f.unit == "MB/s" { b / 1e6 } else { b }),
                    "baseline_kind": f.baseline.map(|(_, kind)| kind),
                    "ratio": f.baseline.map(|(b, _)| f.rate / b),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "size": bench.size.to_string(),
                "depth": bench.depth,
                "random_depth": bench.random_depth,
                "io": format!("{:?}", bench.io),
                "figures": rows,
            }))
            .unwrap_or_default()
        );
        return;
    }
    println!(
        "fs3 bench storage: {} per pass, {} in flight ({} for random reads), {:?}",
        bench.size, bench.depth, bench.random_depth, bench.io
    );
    println!(
        "{:<40} {:>10} {:>6} {:>12} {:>7}",
        "measurement", "rate", "unit", "baseline", "ratio"
    );
    for f in figures {
        let (baseline, ratio) = match f.baseline {
            Some((b, kind)) => (
                format!("{} {kind}", shown(b, f.unit)),
                format!("{:.2}", f.rate / b),
            ),
            None => (String::new(), String::new()),
        };
        println!(
            "{:<40} {:>10} {:>6} {:>12} {:>7}",
            f.what,
            shown(f.rate, f.unit),
            f.unit,
            baseline,
            ratio
        );
    }
}
