//! hfreduce across real processes: this test binary launches itself once per rank (the
//! `rank_entry` test runs a scenario when `HFREDUCE_SCENARIO` is set), with the environment a
//! scheduler gives, on virtual nodes (`HFREDUCE_NODE_ID`). Checked: every collective, type and
//! operation at sizes 1, 7, a prime and a large one against references computed here, results
//! bit-identical on every rank; asynchronous calls overlapping computation; a killed rank, a
//! mismatched call and a missing rank failing every other rank with a clear error in time.

// Tests may panic on anything unexpected; that is how they fail.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hfreduce::{Communicator, ReduceOp, bf16, f16};

// ---- rank side -----------------------------------------------------------------------------

/// The value rank `rank` holds at `index` in test `seed`: small integers, so that float sums
/// are exact whatever the order and references are easy.
fn value(rank: usize, index: usize, seed: usize) -> i64 {
    ((index * 7 + rank * 13 + seed * 31) % 17) as i64 - 8
}

trait TestElement: hfreduce::Element + PartialEq + std::fmt::Debug {
    fn from_i64(v: i64) -> Self;
}
impl TestElement for f32 {
    fn from_i64(v: i64) -> Self {
        v as f32
    }
}
impl TestElement for f64 {
    fn from_i64(v: i64) -> Self {
        v as f64
    }
}
impl TestElement for f16 {
    fn from_i64(v: i64) -> Self {
        f16::from_f32(v as f32)
    }
}
impl TestElement for bf16 {
    fn from_i64(v: i64) -> Self {
        bf16::from_f32(v as f32)
    }
}
impl TestElement for i32 {
    fn from_i64(v: i64) -> Self {
        v as i32
    }
}
impl TestElement for i64 {
    fn from_i64(v: i64) -> Self {
        v
    }
}

fn reduce_reference(world: usize, index: usize, seed: usize, op: ReduceOp) -> i64 {
    let values = (0..world).map(|r| value(r, index, seed));
    match op {
        ReduceOp::Sum => values.sum(),
        // Every reference sum divides exactly or is checked as integer division.
        ReduceOp::Avg => values.sum::<i64>() / world as i64,
        ReduceOp::Min => values.min().unwrap(),
        ReduceOp::Max => values.max().unwrap(),
    }
}

fn fingerprint<T: bytemuck::Pod>(data: &[T]) -> i64 {
    bytemuck::cast_slice::<T, u8>(data)
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        }) as i64
}

/// All ranks hold the same bytes: their fingerprints, gathered, agree.
fn assert_identical<T: bytemuck::Pod>(comm: &Communicator, data: &[T], what: &str) {
    let all = comm.all_gather(&[fingerprint(data)]).unwrap();
    assert!(
        all.iter().all(|f| *f == all[0]),
        "{what}: ranks differ: {all:?}"
    );
}

fn check_type<T: TestElement>(comm: &Communicator, sizes: &[usize], seed: &mut usize) {
    let (rank, world) = (comm.rank(), comm.world_size());
    let ops = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Min, ReduceOp::Max];
    for &n in sizes {
        for op in ops {
            *seed += 1;
            let mut data: Vec<T> = (0..n).map(|i| T::from_i64(value(rank, i, *seed))).collect();
            comm.allreduce(&mut data, op).unwrap();
            for (i, got) in data.iter().enumerate() {
                let sum: i64 = (0..world).map(|r| value(r, i, *seed)).sum();
                let expected = match op {
                    // Floats divide exactly; integers truncate.
                    ReduceOp::Avg
                        if !matches!(T::DTYPE, hfreduce::DType::I32 | hfreduce::DType::I64) =>
                    {
                        None
                    }
                    _ => Some(T::from_i64(reduce_reference(world, i, *seed, op))),
                };
                match expected {
                    Some(expected) => assert_eq!(*got, expected, "allreduce {op:?} n={n} at {i}"),
                    None => {
                        let avg = sum as f64 / world as f64;
                        let got = format!("{got:?}").parse::<f64>().unwrap();
                        assert!((got - avg).abs() < 0.02, "avg n={n} at {i}: {got} vs {avg}");
                    }
                }
            }
            assert_identical(comm, &data, "allreduce");
        }
        // Broadcast from the last rank.
        *seed += 1;
        let root = world - 1;
        let mut data: Vec<T> = (0..n).map(|i| T::from_i64(value(rank, i, *seed))).collect();
        comm.broadcast(&mut data, root).unwrap();
        let expected: Vec<T> = (0..n).map(|i| T::from_i64(value(root, i, *seed))).collect();
        assert_eq!(data, expected, "broadcast n={n}");
        // All-gather.
        let s = *seed;
        let mine: Vec<T> = (0..n).map(|i| T::from_i64(value(rank, i, s))).collect();
        let all = comm.all_gather(&mine).unwrap();
        let expected: Vec<T> = (0..world)
            .flat_map(|r| (0..n).map(move |i| T::from_i64(value(r, i, s))))
            .collect();
        assert_eq!(all, expected, "all-gather n={n}");
        // Reduce-scatter of world × n elements.
        let total = world * n;
        let data: Vec<T> = (0..total)
            .map(|i| T::from_i64(value(rank, i, *seed)))
            .collect();
        let part = comm.reduce_scatter(&data, ReduceOp::Sum).unwrap();
        let expected: Vec<T> = (rank * n..(rank + 1) * n)
            .map(|i| T::from_i64(reduce_reference(world, i, *seed, ReduceOp::Sum)))
            .collect();
        assert_eq!(part, expected, "reduce-scatter n={n}");
        // All-to-all with uneven pieces: rank r sends (r + p) % 3 * n elements to p.
        let counts: Vec<usize> = (0..world).map(|p| (rank + p) % 3 * n).collect();
        let send: Vec<T> = (0..counts.iter().sum())
            .map(|i| T::from_i64(value(rank, i, *seed)))
            .collect();
        let (got, got_counts) = comm.all_to_all(&send, &counts).unwrap();
        let mut expected = Vec::new();
        for source in 0..world {
            let offset: usize = (0..rank).map(|p| (source + p) % 3 * n).sum();
            let count = (source + rank) % 3 * n;
            expected.extend((offset..offset + count).map(|i| T::from_i64(value(source, i, *seed))));
        }
        assert_eq!(
            got_counts,
            (0..world).map(|s| (s + rank) % 3 * n).collect::<Vec<_>>()
        );
        assert_eq!(got, expected, "all-to-all n={n}");
        // Into a reused output that held more: replaced, not appended to; the async form agrees.
        let mut reused = vec![T::from_i64(5); expected.len() + 11];
        let reused_counts = comm.all_to_all_into(&send, &counts, &mut reused).unwrap();
        assert_eq!((&reused, &reused_counts), (&expected, &got_counts));
        let (async_got, _) = comm.all_to_all_async(send, counts).wait().unwrap();
        assert_eq!(async_got, expected, "async all-to-all n={n}");
    }
}

fn scenario_collectives(comm: &Communicator) {
    let mut seed = 0;
    let sizes = [1, 7, 10_007];
    check_type::<f32>(comm, &sizes, &mut seed);
    check_type::<f64>(comm, &sizes, &mut seed);
    check_type::<f16>(comm, &sizes, &mut seed);
    check_type::<bf16>(comm, &sizes, &mut seed);
    check_type::<i32>(comm, &sizes, &mut seed);
    check_type::<i64>(comm, &sizes, &mut seed);
    // A large allreduce: 64 MiB of f32 per rank.
    let n = 16 << 20;
    let mut data: Vec<f32> = (0..n).map(|i| value(comm.rank(), i, 999) as f32).collect();
    comm.allreduce(&mut data, ReduceOp::Sum).unwrap();
    for i in (0..n).step_by(4099) {
        assert_eq!(
            data[i],
            reduce_reference(comm.world_size(), i, 999, ReduceOp::Sum) as f32
        );
    }
    assert_identical(comm, &data, "large allreduce");
    comm.barrier().unwrap();
}

/// Floats whose sum depends on the order of additions, reduced; prints their fingerprint so
/// that runs over different transports can be compared bit for bit.
fn scenario_fingerprint(comm: &Communicator) {
    let n = 4 << 20;
    let rank = comm.rank() as f32 + 1.0;
    let mut data: Vec<f32> = (0..n)
        .map(|i| (i as f32 * 0.001 * rank).sin() * 1e3 / (1.0 + (i % 977) as f32))
        .collect();
    comm.allreduce(&mut data, ReduceOp::Sum).unwrap();
    assert_identical(comm, &data, "fingerprint allreduce");
    println!("fingerprint {}", fingerprint(&data));
}

fn scenario_overlap(comm: &Communicator) {
    // Several allreduces in flight while this thread computes.
    let handles: Vec<_> = (0..4)
        .map(|k| {
            let data: Vec<f32> = (0..1 << 20)
                .map(|i| value(comm.rank(), i, k) as f32)
                .collect();
            comm.allreduce_async(data, ReduceOp::Sum)
        })
        .collect();
    let mut acc = 0u64;
    for i in 0..20_000_000u64 {
        acc = acc.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i);
    }
    assert_ne!(acc, 1);
    for (k, handle) in handles.into_iter().enumerate() {
        let data = handle.wait().unwrap();
        for i in (0..data.len()).step_by(997) {
            assert_eq!(
                data[i],
                reduce_reference(comm.world_size(), i, k, ReduceOp::Sum) as f32
            );
        }
    }
}

fn scenario_killed(comm: &Communicator) {
    println!("started");
    // The parent kills the last rank while these run; everyone else must fail, not hang.
    for _ in 0..1000 {
        let data = vec![1.0f32; 4 << 20];
        if let Err(error) = comm.allreduce_async(data, ReduceOp::Sum).wait() {
            println!("failed: {error}");
            return;
        }
    }
    panic!("allreduces kept succeeding with a rank killed");
}

fn scenario_mismatch(comm: &Communicator) {
    let op = if comm.rank() == 1 {
        ReduceOp::Max
    } else {
        ReduceOp::Sum
    };
    let mut data = vec![1i32; 1000];
    // The rank that sees the mismatch says so; the others fail too, with its abort or because
    // it is already gone.
    match comm.allreduce(&mut data, op) {
        Err(error) => println!("failed: {error}"),
        Ok(()) => panic!("a mismatched allreduce succeeded"),
    }
    // The communicator stays failed.
    assert!(comm.barrier().is_err());
}

fn scenario_buckets(comm: &Communicator) {
    // Tensors as a backward pass might produce them; 64 KiB first bucket, 1 MiB others.
    let lens = [1000, 300_000, 5, 70_000, 250_000, 7, 16_000, 1];
    let mut buckets = hfreduce::Buckets::<f32>::new(comm, &lens, 1 << 20, 64 << 10).unwrap();
    let plan = buckets.plan();
    assert!(
        plan[0] * 4 <= 64 << 10,
        "the first bucket is the small one: {plan:?}"
    );
    assert!(
        plan.iter()
            .skip(1)
            .all(|b| *b * 4 <= 1 << 20 || lens.contains(b)),
        "{plan:?}"
    );
    assert_eq!(plan.iter().sum::<usize>(), lens.iter().sum::<usize>());
    // Ranks produce tensors in different orders; buckets still line up.
    let order: Vec<usize> = if comm.rank().is_multiple_of(2) {
        (0..lens.len()).collect()
    } else {
        (0..lens.len()).rev().collect()
    };
    for &t in &order {
        let values: Vec<f32> = (0..lens[t])
            .map(|i| value(comm.rank(), i, t) as f32)
            .collect();
        buckets.ready(t, &values).unwrap();
    }
    let reduced = buckets.finish().unwrap();
    let world = comm.world_size() as f32;
    for (t, tensor) in reduced.iter().enumerate() {
        assert_eq!(tensor.len(), lens[t]);
        for i in (0..lens[t]).step_by(101) {
            let sum: i64 = (0..comm.world_size()).map(|r| value(r, i, t)).sum();
            assert!(
                (tensor[i] - sum as f32 / world).abs() < 1e-5,
                "tensor {t} at {i}"
            );
        }
    }
    // Misuse is refused.
    let mut again = hfreduce::Buckets::<f32>::new(comm, &[3], 1 << 20, 64 << 10).unwrap();
    assert!(again.ready(0, &[1.0]).is_err(), "wrong length");
    assert!(again.ready(5, &[1.0, 2.0, 3.0]).is_err(), "no such tensor");
    assert!(again.finish().is_err(), "never marked ready");
}

#[test]
fn rank_entry() {
    let Ok(scenario) = std::env::var("HFREDUCE_SCENARIO") else {
        return; // Run by the parent tests below as a child process.
    };
    if scenario == "inside_runtime" {
        // An async program: create, use and drop the communicator inside its own runtime.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let comm = Communicator::from_env().unwrap();
            let mut data = vec![comm.rank() as f32; 1000];
            comm.allreduce(&mut data, ReduceOp::Sum).unwrap();
            let world = comm.world_size();
            assert!(data.iter().all(|v| *v == (world * (world - 1) / 2) as f32));
            drop(comm);
        });
        println!("done");
        return;
    }
    let comm = match Communicator::from_env() {
        Ok(comm) => comm,
        Err(error) => {
            println!("failed: {error}");
            return;
        }
    };
    match scenario.as_str() {
        "collectives" => scenario_collectives(&comm),
        "fingerprint" => scenario_fingerprint(&comm),
        "overlap" => scenario_overlap(&comm),
        "killed" => scenario_killed(&comm),
        "mismatch" => scenario_mismatch(&comm),
        "buckets" => scenario_buckets(&comm),
        other => panic!("unknown scenario {other}"),
    }
    println!("done");
}

// ---- parent side ---------------------------------------------------------------------------

thread_local! {
    /// The master port of this thread's last launch.
    static LAST_PORT: std::cell::Cell<u16> = const { std::cell::Cell::new(0) };
}

/// Starts one process per rank: `nodes[r]` is rank r's virtual node.
fn launch(scenario: &str, nodes: &[usize], only: Option<usize>, timeout_secs: u64) -> Vec<Child> {
    launch_with(scenario, nodes, only, timeout_secs, &[])
}

/// [`launch`] with extra environment: `(None, name, value)` for every rank, `(Some(r), ...)`
/// for rank r only.
fn launch_with(
    scenario: &str,
    nodes: &[usize],
    only: Option<usize>,
    timeout_secs: u64,
    env: &[(Option<usize>, &str, &str)],
) -> Vec<Child> {
    let world = nodes.len();
    let port = ff_harness::free_port_block(1).unwrap();
    LAST_PORT.with(|p| p.set(port));
    (0..only.unwrap_or(world))
        .map(|rank| {
            let node = nodes[rank];
            let local_world = nodes.iter().filter(|n| **n == node).count();
            let local_rank = nodes[..rank].iter().filter(|n| **n == node).count();
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "rank_entry",
                    "--exact",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env("HFREDUCE_SCENARIO", scenario)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", local_rank.to_string())
                .env("LOCAL_WORLD_SIZE", local_world.to_string())
                .env("HFREDUCE_NODE_ID", format!("node{node}"))
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("HFREDUCE_TIMEOUT", timeout_secs.to_string())
                .envs(
                    env.iter()
                        .filter(|(to, _, _)| to.is_none_or(|r| r == rank))
                        .map(|(_, name, value)| (*name, *value)),
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn finish(children: Vec<Child>) -> Vec<Output> {
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn assert_all_done(outputs: &[Output]) {
    for (rank, output) in outputs.iter().enumerate() {
        assert!(
            output.status.success() && stdout(output).contains("done"),
            "rank {rank} failed:\n{}\n{}",
            stdout(output),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Shared-memory files of jobs on `port` still in /dev/shm.
fn leftovers(port: u16) -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("hfreduce-") && name.contains(&format!("-{port}-")))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_collective_on_two_nodes_of_two() {
    let children = launch("collectives", &[0, 0, 1, 1], None, 60);
    let port = LAST_PORT.with(|p| p.get());
    assert_all_done(&finish(children));
    assert_eq!(
        leftovers(port),
        Vec::<String>::new(),
        "the node files are removed"
    );
}

#[test]
fn every_collective_through_lanes_on_two_nodes_of_two() {
    let children = launch_with(
        "collectives",
        &[0, 0, 1, 1],
        None,
        60,
        &[(None, "HFREDUCE_LANES", "1")],
    );
    assert_all_done(&finish(children));
}

#[test]
fn every_collective_by_double_binary_tree_on_five_nodes() {
    let children = launch_with(
        "collectives",
        &[0, 1, 2, 3, 4],
        None,
        60,
        &[(None, "HFREDUCE_ALGO", "tree")],
    );
    assert_all_done(&finish(children));
}

#[test]
fn every_collective_through_a_many_stage_node_pipeline_and_trees() {
    // 16 KiB stages: the small sizes take one or a few, the large one thousands; the leaders'
    // network part of each stage by tree.
    let children = launch_with(
        "collectives",
        &[0, 0, 1, 1, 2],
        None,
        60,
        &[
            (None, "HFREDUCE_STAGE_BYTES", "16384"),
            (None, "HFREDUCE_ALGO", "tree"),
        ],
    );
    assert_all_done(&finish(children));
}

#[test]
fn ranks_with_different_settings_are_refused_at_rendezvous() {
    let children = launch_with(
        "collectives",
        &[0, 1, 2],
        None,
        // Also the rendezvous deadline: generous, so that a late start is not what fails.
        10,
        &[(Some(1), "HFREDUCE_CHUNK_BYTES", "65536")],
    );
    let outputs = finish(children);
    for output in &outputs {
        assert!(stdout(output).contains("failed:"), "{}", stdout(output));
    }
    let all = outputs.iter().map(stdout).collect::<String>();
    assert!(
        all.contains("chunk=65536") && all.contains("must use the same HFREDUCE_* settings"),
        "{all}"
    );
}

#[test]
fn every_collective_on_uneven_nodes() {
    assert_all_done(&finish(launch("collectives", &[0, 0, 1], None, 60)));
}

#[test]
fn every_collective_on_three_nodes_of_one() {
    assert_all_done(&finish(launch("collectives", &[0, 1, 2], None, 60)));
}

#[test]
fn every_collective_on_one_node_of_four() {
    assert_all_done(&finish(launch("collectives", &[0, 0, 0, 0], None, 60)));
}

#[test]
fn async_collectives_overlap_computation() {
    assert_all_done(&finish(launch("overlap", &[0, 0, 1, 1], None, 60)));
}

#[test]
fn a_communicator_works_inside_an_async_runtime() {
    assert_all_done(&finish(launch("inside_runtime", &[0, 0, 1], None, 30)));
}

#[test]
fn gradient_buckets_are_averaged_in_order_whatever_order_tensors_come_in() {
    assert_all_done(&finish(launch("buckets", &[0, 0, 1, 1], None, 60)));
}

#[test]
fn a_killed_rank_fails_every_other_rank_in_time() {
    let timeout = 5;
    let mut children = launch("killed", &[0, 0, 1], None, timeout);
    // Wait until the last rank is past rendezvous and in its allreduces, then kill it (its
    // "started" may share a line with libtest's "test rank_entry ... ").
    let last = children[2].stdout.take().unwrap();
    let in_allreduces = std::io::BufRead::lines(std::io::BufReader::new(last))
        .map_while(Result::ok)
        .any(|line| line.ends_with("started"));
    assert!(in_allreduces, "the last rank never started its allreduces");
    children[2].kill().unwrap();
    let started = Instant::now();
    let outputs = finish(children);
    assert!(
        started.elapsed() < Duration::from_secs(timeout * 4),
        "took {:?}",
        started.elapsed()
    );
    for output in &outputs[..2] {
        let text = stdout(output);
        assert!(text.contains("failed:") && text.contains("done"), "{text}");
    }
}

#[test]
fn a_mismatched_call_fails_every_rank() {
    let outputs = finish(launch("mismatch", &[0, 1, 2], None, 10));
    for output in &outputs {
        let text = stdout(output);
        assert!(
            text.contains("failed:") && text.contains("done"),
            "{text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let all = outputs.iter().map(stdout).collect::<String>();
    assert!(all.contains("mismatched collectives"), "{all}");
}

#[test]
fn a_missing_rank_is_named_at_rendezvous() {
    // Three ranks expected, two started (the deadline leaves the two time to find each other).
    let outputs = finish(launch("collectives", &[0, 1, 2], Some(2), 5));
    for output in &outputs {
        let text = stdout(output);
        assert!(
            text.contains("failed:") && text.contains("ranks [2] never arrived"),
            "{text}"
        );
    }
}

/// Two nodes of one rank each, over RDMA only (`HFREDUCE_TRANSPORT=rdma`) and over TCP: the
/// allreduced floats are bit-identical. Runs in the Soft-RoCE guest (integration/rdma).
#[cfg(feature = "rdma")]
#[test]
fn allreduce_over_rdma_is_bit_identical_to_tcp() {
    if !ff_harness::rdma_device_here() {
        return;
    }
    let fingerprints = |transport: &str| -> Vec<String> {
        let outputs = finish(launch_with(
            "fingerprint",
            &[0, 1],
            None,
            120,
            &[(None, "HFREDUCE_TRANSPORT", transport)],
        ));
        assert_all_done(&outputs);
        outputs
            .iter()
            .map(|o| {
                stdout(o)
                    .lines()
                    // libtest's "test rank_entry ... " may precede it on the line.
                    .find_map(|l| l.split("fingerprint ").nth(1).map(str::to_string))
                    .unwrap()
            })
            .collect()
    };
    let over_tcp = fingerprints("tcp");
    let over_rdma = fingerprints("rdma");
    assert_eq!(
        over_rdma, over_tcp,
        "RDMA and TCP reduced to different bits"
    );
}
