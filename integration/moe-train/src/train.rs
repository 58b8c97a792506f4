//! The training loop: data-parallel ranks from the scheduler's environment (`RANK WORLD_SIZE
//! ...`, one rank alone without it), each reading its shards of the corpus; gradients averaged
//! with hfreduce's buckets (asynchronously, as they are produced); AdamW; the routing biases
//! balanced from the load over all ranks. Checkpoints every `checkpoint_every` steps and when
//! the scheduler asks (SIGUSR1 or `$HAI_CONTROL_DIR/suspend`): every rank learns of the request
//! at the same step (it rides on the per-step load reduction), rank 0 writes the checkpoint,
//! and all exit 0. On start, training resumes from the newest valid checkpoint.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use candle_core::{Device, Tensor};
use hfreduce::{Buckets, Communicator, ReduceOp};

use crate::checkpoint::{self, Position};
use crate::data::{self, Reader};
use crate::metrics::TrainMetrics;
use crate::model::{Model, ModelConfig};
use crate::optim::{AdamW, AdamWConfig};

/// Prints a progress line; a closed standard output (the log's reader gone) is not a reason to
/// stop training, so write errors are ignored rather than panicking as `println!` would.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// What to train and how.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// The corpus directory (`prepare`'s output).
    pub data: PathBuf,
    /// Where checkpoints go.
    pub checkpoint_dir: PathBuf,
    /// Steps to train in all.
    pub steps: u64,
    /// Sequences per rank per step.
    pub batch: usize,
    /// Checkpoint every this many steps (0: only at the end and when asked).
    pub checkpoint_every: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Seed of the initialization.
    pub seed: u64,
    /// The model's shape except vocabulary and context, which come from the corpus.
    pub model: ModelConfig,
    /// How far a routing bias moves per step.
    pub balance_rate: f32,
    /// Where rank 0 serves `/metrics` (None: nowhere).
    pub metrics_addr: Option<String>,
    /// The scheduler's control directory (`suspend` appears there).
    pub control_dir: Option<PathBuf>,
    /// Print a progress line every this many steps.
    pub log_every: u64,
    /// Gradient bucket size in bytes (the first bucket is 1/25 of it, as in PyTorch DDP).
    pub bucket_bytes: usize,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The step training started from (0, or the checkpoint's).
    pub resumed_from: u64,
    /// The step it stopped at.
    pub step: u64,
    /// Loss of the first step run here.
    pub first_loss: f32,
    /// Loss of the last step.
    pub last_loss: f32,
    /// Whether it stopped because the scheduler asked.
    pub suspended: bool,
}

/// This rank's place: from the scheduler's environment, or alone.
fn place() -> anyhow::Result<(usize, usize)> {
    let number = |name: &str| -> anyhow::Result<Option<usize>> {
        match std::env::var(name) {
            Ok(value) => {
                Ok(Some(value.trim().parse().with_context(|| {
                    format!("{name}={value:?} is not a number")
                })?))
            }
            Err(_) => Ok(None),
        }
    };
    Ok((
        number("RANK")?.unwrap_or(0),
        number("WORLD_SIZE")?.unwrap_or(1),
    ))
}

/// SIGUSR1 arrived (the handler runs on a thread of its own runtime).
fn watch_suspend_signal(runtime: &tokio::runtime::Runtime) -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    let mut signal = runtime.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
    })?;
    runtime.spawn(async move {
        while signal.recv().await.is_some() {
            set.store(true, Ordering::SeqCst);
        }
    });
    Ok(flag)
}

/// The learning rate at `step`: linear warm-up over 20 steps, then cosine to a tenth.
fn learning_rate(peak: f64, step: u64, steps: u64) -> f64 {
    let warmup = 20.min(steps.max(1));
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (steps.saturating_sub(warmup)).max(1) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()))
}

/// Trains; returns what the run did.
pub fn train(mut config: TrainConfig) -> anyhow::Result<Summary> {
    let (rank, world) = place()?;
    let device = Device::Cpu;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let suspend_signal = watch_suspend_signal(&runtime)?;
    let manifest = data::manifest(&config.data)?;
    config.model.vocab = manifest.vocab;
    config.model.context = manifest.sequence - 1;
    config.model.validate().map_err(anyhow::Error::msg)?;
    let reader = Reader::open(&config.data, &manifest, rank, world)?;
    let comm = if world > 1 {
        Some(Communicator::from_env().context("joining the other ranks")?)
    } else {
        None
    };
    let mut model = Model::new(config.model, config.seed, &device)?;
    let mut optimizer = AdamW::new(
        AdamWConfig {
            lr: config.lr,
            ..AdamWConfig::default()
        },
        &model.params,
    )?;
    let mut position = Position {
        step: 0,
        tokens: 0,
        loss: f32::NAN,
        seed: config.seed,
        model: config.model,
        world_size: world,
        sha256: String::new(),
    };
    match checkpoint::restore(&config.checkpoint_dir, &mut model, &mut optimizer)? {
        Some((path, found)) => {
            say!(
                "rank {rank}: resumed from {} (step {}, loss {:.4})",
                path.display(),
                found.step,
                found.loss
            );
            position.step = found.step;
            position.tokens = found.tokens;
            position.loss = found.loss;
        }
        None => {
            // Every rank starts from rank 0's weights.
            if let Some(comm) = &comm {
                for p in &model.params {
                    let mut values = p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                    comm.broadcast(&mut values, 0)?;
                    p.var.set(&Tensor::from_vec(
                        values,
                        p.var.as_tensor().dims(),
                        &device,
                    )?)?;
                }
            }
        }
    }
    let resumed_from = position.step;
    let registry = prometheus::Registry::new();
    let metrics = TrainMetrics::register(&registry)?;
    let _server = match (&config.metrics_addr, rank) {
        (Some(addr), 0) => {
            let server = runtime.block_on(ff_metrics::MetricsServer::start(addr, registry))?;
            say!("metrics at http://{}/metrics", server.local_addr());
            Some(server)
        }
        _ => None,
    };
    let lens: Vec<usize> = model
        .params
        .iter()
        .map(|p| p.var.as_tensor().elem_count())
        .collect();
    let tokens_per_step = (config.batch * config.model.context * world) as u64;
    let mut first_loss = None;
    let mut last_loss = f32::NAN;
    let mut window = (Instant::now(), 0u64, Duration::ZERO, Duration::ZERO);
    while position.step < config.steps {
        let step = position.step;
        let started = Instant::now();
        // This rank's batch: its next sequences, in order (the data position is the step).
        let mut tokens = Vec::with_capacity(config.batch * manifest.sequence);
        for i in 0..config.batch {
            let sequence = reader.read(step as usize * config.batch + i)?;
            tokens.extend(sequence.into_iter().map(u32::from));
        }
        let tokens = Tensor::from_vec(tokens, (config.batch, manifest.sequence), &device)?;
        let (loss, routing) = model.loss(&tokens)?;
        let grads = loss.backward()?;
        let computed = started.elapsed();
        // Gradients, last layer first (the order a backward pass produces them).
        let mut averaged: Vec<Vec<f32>> = Vec::with_capacity(lens.len());
        let mut local_loss = loss.to_scalar::<f32>()?;
        let mut loads: Vec<f32> = routing.loads.concat();
        let stop_here = suspend_signal.load(Ordering::SeqCst)
            || config
                .control_dir
                .as_ref()
                .is_some_and(|d| d.join("suspend").exists());
        // Whether every rank stops after this step: decided by the vote below, never by
        // reading the signal flag again (a signal arriving on one rank after the vote would
        // make it stop alone while the others go on).
        let suspended = match &comm {
            Some(comm) => {
                let mut buckets = Buckets::<f32>::new(
                    comm,
                    &lens,
                    config.bucket_bytes,
                    (config.bucket_bytes / 25).max(4096),
                )?;
                for (i, p) in model.params.iter().enumerate().rev() {
                    let grad = grads
                        .get(p.var.as_tensor())
                        .with_context(|| format!("no gradient for {}", p.name))?;
                    buckets.ready(i, &grad.flatten_all()?.to_vec1::<f32>()?)?;
                }
                averaged = buckets.finish()?;
                // Loads, the loss and the stop request, summed over the ranks in one call.
                loads.push(local_loss);
                loads.push(if stop_here { 1.0 } else { 0.0 });
                comm.allreduce(&mut loads, ReduceOp::Sum)?;
                let stop_votes = loads.pop().unwrap_or(0.0);
                local_loss = loads.pop().unwrap_or(local_loss) / world as f32;
                stop_votes > 0.0
            }
            None => {
                for p in &model.params {
                    let grad = grads
                        .get(p.var.as_tensor())
                        .with_context(|| format!("no gradient for {}", p.name))?;
                    averaged.push(grad.flatten_all()?.to_vec1::<f32>()?);
                }
                stop_here
            }
        };
        let reduced = started.elapsed() - computed;
        let grads: Vec<Tensor> = averaged
            .into_iter()
            .zip(&model.params)
            .map(|(g, p)| Tensor::from_vec(g, p.var.as_tensor().dims(), &device))
            .collect::<Result<_, _>>()?;
        optimizer.step(
            &model.params,
            &grads,
            learning_rate(config.lr, step, config.steps),
        )?;
        let per_layer: Vec<Vec<f32>> = loads
            .chunks(config.model.experts)
            .map(<[f32]>::to_vec)
            .collect();
        model.balance(&per_layer, config.balance_rate);
        position.step += 1;
        position.tokens += tokens_per_step;
        position.loss = local_loss;
        last_loss = local_loss;
        first_loss.get_or_insert(local_loss);
        let (min_share, max_share) = load_shares(&per_layer);
        window.1 += tokens_per_step;
        window.2 += computed;
        window.3 += reduced;
        metrics.observe(
            position.step,
            local_loss,
            min_share,
            max_share,
            tokens_per_step,
        );
        let last = position.step == config.steps;
        if position.step.is_multiple_of(config.log_every.max(1)) || last || suspended {
            let elapsed = window.0.elapsed().as_secs_f64().max(1e-9);
            let steps_in_window = (window.1 / tokens_per_step.max(1)).max(1) as u32;
            let tokens_per_second = window.1 as f64 / elapsed;
            metrics.tokens_per_second.set(tokens_per_second);
            if rank == 0 {
                say!(
                    "step {}/{} loss {:.4} tokens/s {:.0} expert load min {:.3} max {:.3} compute {:.1}ms allreduce {:.1}ms",
                    position.step,
                    config.steps,
                    local_loss,
                    tokens_per_second,
                    min_share,
                    max_share,
                    (window.2 / steps_in_window).as_secs_f64() * 1000.0,
                    (window.3 / steps_in_window).as_secs_f64() * 1000.0,
                );
            }
            window = (Instant::now(), 0, Duration::ZERO, Duration::ZERO);
        }
        let due =
            config.checkpoint_every > 0 && position.step.is_multiple_of(config.checkpoint_every);
        if due || last || suspended {
            if rank == 0 {
                let path =
                    checkpoint::save(&config.checkpoint_dir, &model, &optimizer, position.clone())?;
                say!("checkpoint {} at step {}", path.display(), position.step);
            }
            if let Some(comm) = &comm {
                comm.barrier()?;
            }
        }
        if suspended && !last {
            say!(
                "rank {rank}: suspended at step {} after checkpointing",
                position.step
            );
            return Ok(Summary {
                resumed_from,
                step: position.step,
                first_loss: first_loss.unwrap_or(f32::NAN),
                last_loss,
                suspended: true,
            });
        }
    }
    if !last_loss.is_finite() && resumed_from < config.steps {
        bail!("the loss is not finite");
    }
    if rank == 0 {
        say!(
            "finished at step {}: first loss {:.4}, last loss {:.4}",
            position.step,
            first_loss.unwrap_or(position.loss),
            last_loss
        );
    }
    Ok(Summary {
        resumed_from,
        step: position.step,
        first_loss: first_loss.unwrap_or(position.loss),
        last_loss: if last_loss.is_nan() {
            position.loss
        } else {
            last_loss
        },
        suspended: false,
    })
}

/// The smallest and largest share of any expert in its layer's routing.
fn load_shares(loads: &[Vec<f32>]) -> (f32, f32) {
    let mut min = f32::INFINITY;
    let mut max = 0f32;
    for layer in loads {
        let total: f32 = layer.iter().sum::<f32>().max(1.0);
        for load in layer {
            min = min.min(load / total);
            max = max.max(load / total);
        }
    }
    (if min.is_finite() { min } else { 0.0 }, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learning_rate_warms_up_then_decays_to_a_tenth() {
        assert!(learning_rate(1.0, 0, 100) < 0.1);
        assert!((learning_rate(1.0, 19, 100) - 1.0).abs() < 1e-9);
        assert!((learning_rate(1.0, 100, 100) - 0.1).abs() < 1e-9);
        assert_eq!(load_shares(&[vec![1.0, 3.0]]), (0.25, 0.75));
    }
}
