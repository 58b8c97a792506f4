//! `hfreduce-bench`: allreduce and all-to-all bandwidth in the nccl-tests format, and how much
//! of an allreduce hides behind computation.
//!
//! `hfreduce-bench --nodes 2 --ranks-per-node 2` launches its own ranks (this binary, on
//! virtual nodes of this machine); under a scheduler's environment (`RANK`, `WORLD_SIZE`, …)
//! it runs as one rank. Rank 0 prints the table: size, count, type, time (µs), algbw and busbw
//! (GB/s; busbw = algbw × 2(n−1)/n for allreduce, × (n−1)/n for all-to-all, as nccl-tests),
//! and #wrong (elements that differ from the reference, checked on the first iteration).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hfreduce::{Communicator, ReduceOp};

struct Args {
    nodes: usize,
    ranks_per_node: usize,
    min_bytes: usize,
    max_bytes: usize,
    iters: usize,
    warmup: usize,
    ops: Vec<String>,
    overlap: bool,
}

fn parse_size(text: &str) -> anyhow::Result<usize> {
    let bytes: ff_config::ByteSize = text.parse().map_err(|e| anyhow::anyhow!("{text}: {e}"))?;
    usize::try_from(bytes.0).context("size too large")
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        nodes: 2,
        ranks_per_node: 2,
        min_bytes: 1 << 20,
        max_bytes: 256 << 20,
        iters: 5,
        warmup: 1,
        ops: vec!["allreduce".into(), "alltoall".into()],
        overlap: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--nodes" => args.nodes = value()?.parse()?,
            "--ranks-per-node" => args.ranks_per_node = value()?.parse()?,
            "--min" => args.min_bytes = parse_size(&value()?)?,
            "--max" => args.max_bytes = parse_size(&value()?)?,
            "--iters" => args.iters = value()?.parse()?,
            "--warmup" => args.warmup = value()?.parse()?,
            "--ops" => args.ops = value()?.split(',').map(str::to_string).collect(),
            "--no-overlap" => args.overlap = false,
            "--help" | "-h" => {
                println!(
                    "hfreduce-bench [--nodes N] [--ranks-per-node R] [--min 1MiB] [--max 256MiB] \
                     [--iters 5] [--warmup 1] [--ops allreduce,alltoall] [--no-overlap]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown option {other} (see --help)"),
        }
    }
    if args.nodes == 0 || args.ranks_per_node == 0 || args.iters == 0 {
        bail!("--nodes, --ranks-per-node and --iters must be at least 1");
    }
    if args.min_bytes < 4 || args.min_bytes > args.max_bytes {
        bail!("--min must be at least 4 bytes and at most --max");
    }
    if let Some(op) = args
        .ops
        .iter()
        .find(|o| !["allreduce", "alltoall"].contains(&o.as_str()))
    {
        bail!("unknown op {op} (allreduce, alltoall)");
    }
    Ok(args)
}

/// Launches `nodes × ranks_per_node` copies of this binary as ranks; returns rank 0's status.
fn launch(args: &Args) -> anyhow::Result<()> {
    let world = args.nodes * args.ranks_per_node;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    drop(listener);
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for rank in 0..world {
        let node = rank / args.ranks_per_node;
        let child = Command::new(&exe)
            .args(std::env::args().skip(1))
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", (rank % args.ranks_per_node).to_string())
            .env("LOCAL_WORLD_SIZE", args.ranks_per_node.to_string())
            .env("HFREDUCE_NODE_ID", format!("node{node}"))
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdout(if rank == 0 {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        children.push(child);
    }
    let mut failed = Vec::new();
    for (rank, mut child) in children.into_iter().enumerate() {
        if !child.wait()?.success() {
            failed.push(rank);
        }
    }
    if !failed.is_empty() {
        bail!("ranks {failed:?} failed");
    }
    Ok(())
}

fn value(rank: usize, index: usize) -> f32 {
    ((index * 7 + rank * 13) % 17) as f32 - 8.0
}

fn bench_allreduce(comm: &Communicator, args: &Args, bytes: usize) -> anyhow::Result<(f64, usize)> {
    let n = comm.world_size();
    let count = bytes / 4;
    let mut data: Vec<f32> = (0..count).map(|i| value(comm.rank(), i)).collect();
    comm.allreduce(&mut data, ReduceOp::Sum)?;
    let wrong = (0..count)
        .filter(|&i| data[i] != (0..n).map(|r| value(r, i)).sum::<f32>())
        .count();
    for _ in 0..args.warmup {
        comm.allreduce(&mut data, ReduceOp::Sum)?;
    }
    comm.barrier()?;
    let started = Instant::now();
    for _ in 0..args.iters {
        comm.allreduce(&mut data, ReduceOp::Sum)?;
    }
    Ok((started.elapsed().as_secs_f64() / args.iters as f64, wrong))
}

fn bench_alltoall(comm: &Communicator, args: &Args, bytes: usize) -> anyhow::Result<(f64, usize)> {
    let n = comm.world_size();
    let per_peer = bytes / 4 / n;
    let count = per_peer * n;
    let data: Vec<f32> = (0..count).map(|i| value(comm.rank(), i)).collect();
    let counts = vec![per_peer; n];
    // Into one reused output, as a training loop would call it.
    let mut got = Vec::new();
    comm.all_to_all_into(&data, &counts, &mut got)?;
    for _ in 0..args.warmup {
        comm.all_to_all_into(&data, &counts, &mut got)?;
    }
    comm.barrier()?;
    let started = Instant::now();
    for _ in 0..args.iters {
        comm.all_to_all_into(&data, &counts, &mut got)?;
    }
    let elapsed = started.elapsed();
    let wrong = (0..count)
        .filter(|&i| {
            let (source, at) = (i / per_peer, i % per_peer);
            got[i] != value(source, comm.rank() * per_peer + at)
        })
        .count();
    Ok((elapsed.as_secs_f64() / args.iters as f64, wrong))
}

/// A fixed amount of floating-point work on a private buffer (the "backward pass").
fn compute(seconds_hint: Duration) -> f64 {
    let mut acc = vec![1.0f32; 1 << 16];
    let started = Instant::now();
    let mut rounds = 0u64;
    while started.elapsed() < seconds_hint {
        for (i, x) in acc.iter_mut().enumerate() {
            *x = (*x * 1.000_01 + i as f32 * 1e-7).sqrt();
        }
        rounds += 1;
    }
    f64::from(acc[7]) + rounds as f64
}

/// Compute alone, allreduce alone, and both: the share of the allreduce hidden by compute.
fn overlap(comm: &Communicator, bytes: usize) -> anyhow::Result<(f64, f64, f64)> {
    let count = bytes / 4;
    let data: Vec<f32> = (0..count).map(|i| value(comm.rank(), i)).collect();
    comm.barrier()?;
    let started = Instant::now();
    let data = comm.allreduce_async(data, ReduceOp::Sum).wait()?;
    let comm_alone = started.elapsed();
    comm.barrier()?;
    let started = Instant::now();
    std::hint::black_box(compute(comm_alone));
    let compute_alone = started.elapsed();
    comm.barrier()?;
    let started = Instant::now();
    let handle = comm.allreduce_async(data, ReduceOp::Sum);
    std::hint::black_box(compute(compute_alone));
    handle.wait()?;
    let both = started.elapsed();
    let hidden = ((comm_alone + compute_alone).as_secs_f64() - both.as_secs_f64())
        / comm_alone.as_secs_f64();
    Ok((
        comm_alone.as_secs_f64(),
        compute_alone.as_secs_f64(),
        hidden.clamp(0.0, 1.0),
    ))
}

fn run_rank(args: &Args) -> anyhow::Result<()> {
    let comm = Communicator::from_env()?;
    let n = comm.world_size();
    let lead = comm.rank() == 0;
    if lead {
        println!(
            "# hfreduce-bench: {n} ranks on {} nodes, f32 sum, {} iterations (+{} warm-up)",
            {
                let mut nodes = comm.nodes().to_vec();
                nodes.sort();
                nodes.dedup();
                nodes.len()
            },
            args.iters,
            args.warmup
        );
    }
    for op in &args.ops {
        if lead {
            println!("# {op}");
            println!(
                "{:>12} {:>12} {:>6} {:>10} {:>8} {:>8} {:>7}",
                "size", "count", "type", "time(us)", "algbw", "busbw", "#wrong"
            );
        }
        let mut bytes = args.min_bytes;
        while bytes <= args.max_bytes {
            let (seconds, wrong) = match op.as_str() {
                "allreduce" => bench_allreduce(&comm, args, bytes)?,
                _ => bench_alltoall(&comm, args, bytes)?,
            };
            let algbw = bytes as f64 / seconds / 1e9;
            let factor = if op == "allreduce" {
                2.0 * (n as f64 - 1.0) / n as f64
            } else {
                (n as f64 - 1.0) / n as f64
            };
            if lead {
                println!(
                    "{bytes:>12} {:>12} {:>6} {:>10.1} {algbw:>8.3} {:>8.3} {wrong:>7}",
                    bytes / 4,
                    "float",
                    seconds * 1e6,
                    algbw * factor
                );
            }
            bytes *= 2;
        }
    }
    if args.overlap {
        let bytes = (64 << 20).min(args.max_bytes);
        let (alone, compute_alone, hidden) = overlap(&comm, bytes)?;
        if lead {
            println!(
                "# overlap at {} MiB: allreduce alone {:.1} ms, compute alone {:.1} ms, hidden {:.0}%",
                bytes >> 20,
                alone * 1e3,
                compute_alone * 1e3,
                hidden * 100.0
            );
        }
    }
    comm.barrier()?;
    Ok(())
}

fn main() {
    let result = parse_args().and_then(|args| {
        if std::env::var("RANK").is_ok() {
            run_rank(&args)
        } else {
            launch(&args)
        }
    });
    if let Err(error) = result {
        eprintln!("hfreduce-bench: {error:#}");
        std::process::exit(1);
    }
}
