//! The `moe-train` command line: `prepare` writes the corpus, `train` trains (one rank alone,
//! or the rank the scheduler's environment names).

use std::path::PathBuf;

use crate::{ModelConfig, TrainConfig};
use clap::{Parser as _, Subcommand};

#[derive(clap::Parser)]
#[command(
    name = "moe-train",
    version,
    about = "Train a Mixture-of-Experts transformer on CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a generated, tokenized corpus (shards, manifest, checksums).
    Prepare {
        /// Output directory (e.g. on the fs3 mount).
        #[arg(long)]
        out: PathBuf,
        /// Vocabulary size.
        #[arg(long, default_value_t = 64)]
        vocab: usize,
        /// Tokens per training window (each sequence holds one more, the last target).
        #[arg(long, default_value_t = 32)]
        context: usize,
        /// Shard files (at least one per rank).
        #[arg(long, default_value_t = 8)]
        shards: usize,
        /// Sequences per shard.
        #[arg(long, default_value_t = 4096)]
        sequences: usize,
        /// Seed of the generating chain.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Train (ranks from RANK, WORLD_SIZE, MASTER_ADDR... as hai sets them).
    Train(TrainArgs),
}

#[derive(clap::Args)]
struct TrainArgs {
    /// The corpus directory.
    #[arg(long)]
    data: PathBuf,
    /// Checkpoint directory (default: $HAI_CHECKPOINT_DIR).
    #[arg(long, env = "HAI_CHECKPOINT_DIR")]
    checkpoint_dir: PathBuf,
    /// Steps in all.
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Sequences per rank per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Checkpoint every this many steps (0: only at the end and when suspended).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Initialization seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Width of the residual stream.
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Routed experts per layer.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Hidden width of an expert.
    #[arg(long, default_value_t = 64)]
    expert_hidden: usize,
    /// No shared expert.
    #[arg(long)]
    no_shared_expert: bool,
    /// Routing bias step of the load balancing.
    #[arg(long, default_value_t = 0.01)]
    balance_rate: f32,
    /// Where rank 0 serves /metrics (e.g. 127.0.0.1:9900; port 0 picks one).
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Progress line every this many steps.
    #[arg(long, default_value_t = 10)]
    log_every: u64,
    /// Gradient bucket size in bytes.
    #[arg(long, default_value_t = 25 << 20)]
    bucket_bytes: usize,
}

/// Runs the `moe-train` command line `args` (the program name first); returns the exit code.
pub fn main_with(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return error.exit_code();
        }
    };
    let result = match cli.command {
        Cmd::Prepare {
            out,
            vocab,
            context,
            shards,
            sequences,
            seed,
        } => crate::data::prepare(&out, vocab, context + 1, shards, sequences, seed)
            .map(|manifest| {
                println!(
                    "wrote {} shards of {sequences} sequences ({} tokens each) to {}; the \
                     chain's entropy, the best loss reachable, is {:.3}",
                    manifest.shards.len(),
                    manifest.sequence,
                    out.display(),
                    manifest.entropy
                );
            })
            .map_err(anyhow::Error::from),
        Cmd::Train(args) => {
            let config = TrainConfig {
                data: args.data,
                checkpoint_dir: args.checkpoint_dir,
                steps: args.steps,
                batch: args.batch,
                checkpoint_every: args.checkpoint_every,
                lr: args.lr,
                seed: args.seed,
                model: ModelConfig {
                    vocab: 0,
                    context: 0,
                    dim: args.dim,
                    heads: args.heads,
                    layers: args.layers,
                    experts: args.experts,
                    top_k: args.top_k,
                    expert_hidden: args.expert_hidden,
                    shared_expert: !args.no_shared_expert,
                },
                balance_rate: args.balance_rate,
                metrics_addr: args.metrics_addr,
                control_dir: std::env::var_os("HAI_CONTROL_DIR").map(PathBuf::from),
                log_every: args.log_every,
                bucket_bytes: args.bucket_bytes,
            };
            crate::train(config).map(|_| ())
        }
    };
    match result {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("moe-train: {error:#}");
            1
        }
    }
}
