//! Checkpoints: the model, the optimizer's moments, the routing biases (safetensors) and the
//! training position (JSON with the tensors' SHA-256), in `DIR/step-NNNNNNNN/`. A checkpoint
//! is written under a temporary name, synced and renamed, so a crash never leaves a torn one
//! under a real name; on start the newest checkpoint that reads back and matches its checksum
//! is used, and damaged ones are skipped with a warning. The newest few are kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::data::write_durably;
use crate::model::{Model, ModelConfig};
use crate::optim::AdamW;

/// Checkpoints kept (older ones are removed once a newer one is written).
pub const KEEP: usize = 3;

/// Where training stood.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    /// Steps done.
    pub step: u64,
    /// Tokens trained on, over all ranks.
    pub tokens: u64,
    /// The loss of the last step.
    pub loss: f32,
    /// The seed the run started from (data order and initialization derive from it and the
    /// step: the data position and the random state together).
    pub seed: u64,
    /// The model's shape (a checkpoint of another shape is refused).
    pub model: ModelConfig,
    /// The ranks that trained.
    pub world_size: usize,
    /// SHA-256 of `tensors.safetensors`, hex.
    pub sha256: String,
}

/// Why a checkpoint could not be written or used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// The checkpoint is damaged or does not fit the model.
    #[error("{0}")]
    Invalid(String),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io(what: &Path, error: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Io(format!("{}: {error}", what.display()))
}

/// Writes a checkpoint of `model`, `optimizer` and `position` (its checksum filled in) into
/// `dir`; returns its directory.
pub fn save(
    dir: &Path,
    model: &Model,
    optimizer: &AdamW,
    mut position: Position,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let name = format!("step-{:08}", position.step);
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&temp);
    std::fs::create_dir_all(&temp).map_err(|e| io(&temp, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (i, p) in model.params.iter().enumerate() {
        tensors.insert(format!("param.{}", p.name), p.var.as_tensor().clone());
        tensors.insert(format!("adam_m.{}", p.name), optimizer.m[i].clone());
        tensors.insert(format!("adam_v.{}", p.name), optimizer.v[i].clone());
    }
    for (l, biases) in model.biases.iter().enumerate() {
        let t = Tensor::from_slice(biases, biases.len(), &Device::Cpu)
            .map_err(|e| CheckpointError::Invalid(e.to_string()))?;
        tensors.insert(format!("bias.{l}"), t);
    }
    tensors.insert(
        "adam_steps".to_string(),
        Tensor::from_slice(&[optimizer.steps as f32], 1, &Device::Cpu)
            .map_err(|e| CheckpointError::Invalid(e.to_string()))?,
    );
    let tensors_path = temp.join("tensors.safetensors");
    candle_core::safetensors::save(&tensors, &tensors_path).map_err(|e| io(&tensors_path, e))?;
    // The checksum of what landed in the file, which is then made durable.
    let bytes = std::fs::read(&tensors_path).map_err(|e| io(&tensors_path, e))?;
    position.sha256 = hex(&Sha256::digest(&bytes));
    std::fs::File::open(&tensors_path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(&tensors_path, e))?;
    let meta = serde_json::to_vec_pretty(&position)
        .map_err(|e| CheckpointError::Invalid(e.to_string()))?;
    write_durably(&temp.join("position.json"), &meta)
        .map_err(|e| CheckpointError::Io(e.to_string()))?;
    let final_dir = dir.join(&name);
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&temp, &final_dir).map_err(|e| io(&final_dir, e))?;
    prune(dir);
    Ok(final_dir)
}

/// Checkpoint directories in `dir`, newest first.
fn listed(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("step-"))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.reverse();
    found
}

fn prune(dir: &Path) {
    for old in listed(dir).into_iter().skip(KEEP) {
        let _ = std::fs::remove_dir_all(old);
    }
}

/// Checks the checkpoint in `path` against its checksum; its position and tensors.
pub fn verify(path: &Path) -> Result<(Position, HashMap<String, Tensor>), CheckpointError> {
    let meta = std::fs::read(path.join("position.json")).map_err(|e| io(path, e))?;
    let position: Position = serde_json::from_slice(&meta)
        .map_err(|e| CheckpointError::Invalid(format!("{}: position.json: {e}", path.display())))?;
    let bytes = std::fs::read(path.join("tensors.safetensors")).map_err(|e| io(path, e))?;
    if hex(&Sha256::digest(&bytes)) != position.sha256 {
        return Err(CheckpointError::Invalid(format!(
            "{}: tensors do not match their checksum",
            path.display()
        )));
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| CheckpointError::Invalid(format!("{}: {e}", path.display())))?;
    Ok((position, tensors))
}

/// Checkpoint directories in `dir`, newest first.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    listed(dir)
}

/// One checkpoint read back, checked, and of the model's shape.
fn read(
    path: &Path,
    config: &ModelConfig,
) -> Result<(Position, HashMap<String, Tensor>), CheckpointError> {
    let (position, tensors) = verify(path)?;
    if position.model != *config {
        return Err(CheckpointError::Invalid(format!(
            "{}: a model of another shape",
            path.display()
        )));
    }
    Ok((position, tensors))
}

/// Restores the newest valid checkpoint in `dir` into `model` and `optimizer`; its position,
/// or None when there is none. Damaged checkpoints are skipped with a warning each.
pub fn restore(
    dir: &Path,
    model: &mut Model,
    optimizer: &mut AdamW,
) -> Result<Option<(PathBuf, Position)>, CheckpointError> {
    for path in listed(dir) {
        let (position, tensors) = match read(&path, &model.config) {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(%error, "skipping a damaged checkpoint");
                eprintln!("warning: skipping checkpoint {}: {error}", path.display());
                continue;
            }
        };
        let take = |name: &str| -> Result<Tensor, CheckpointError> {
            tensors.get(name).cloned().ok_or_else(|| {
                CheckpointError::Invalid(format!("{}: no tensor {name}", path.display()))
            })
        };
        for (i, p) in model.params.iter().enumerate() {
            let value = take(&format!("param.{}", p.name))?;
            if value.dims() != p.var.as_tensor().dims() {
                return Err(CheckpointError::Invalid(format!(
                    "{}: {} has shape {:?}",
                    path.display(),
                    p.name,
                    value.dims()
                )));
            }
            p.var
                .set(&value)
                .map_err(|e| CheckpointError::Invalid(e.to_string()))?;
            optimizer.m[i] = take(&format!("adam_m.{}", p.name))?;
            optimizer.v[i] = take(&format!("adam_v.{}", p.name))?;
        }
        for (l, biases) in model.biases.iter_mut().enumerate() {
            *biases = take(&format!("bias.{l}"))?
                .to_vec1::<f32>()
                .map_err(|e| CheckpointError::Invalid(e.to_string()))?;
        }
        optimizer.steps = take("adam_steps")?
            .to_vec1::<f32>()
            .map_err(|e| CheckpointError::Invalid(e.to_string()))?
            .first()
            .copied()
            .unwrap_or(0.0) as u64;
        return Ok(Some((path, position)));
    }
    Ok(None)
}
