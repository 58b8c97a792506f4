//! moe-train: a Mixture-of-Experts transformer trained data-parallel on CPU with candle — the
//! job the fireflyer stack exists to run. It takes its ranks from hai's environment, reads its
//! data from fs3, averages gradients with hfreduce, and checkpoints to fs3 so that it survives
//! preemption and node loss.
//!
//! - [`data`]: the generated corpus, its manifest and checksums, and each rank's reader.
//! - [`model`]: the MoE transformer with DeepSeek-V3's auxiliary-loss-free balancing.
//! - [`optim`]: AdamW with checkpointable state.
//! - [`checkpoint`]: atomic checkpoints and resuming from the newest valid one.
//! - [`train`]: the data-parallel training loop.
//! - [`metrics`]: what rank 0 serves on `/metrics`.
//! - [`cli`]: the `moe-train` command line.

pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod train;

pub use model::ModelConfig;
pub use train::{Summary, TrainConfig, train};
