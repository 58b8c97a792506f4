//! The training corpus: token sequences from a random but fixed Markov chain (each token has
//! three likely successors), so that a small model has real structure to learn and a known
//! floor (the chain's entropy) to approach. `prepare` writes it as shard files of
//! little-endian `u16` tokens with a manifest that records every shard's SHA-256; training
//! checks the shards it reads against the manifest and reads its batches from the files as it
//! goes (through the fs3 mount in production).

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Most tokens in a vocabulary (tokens are `u16`).
pub const MAX_VOCAB: usize = 1 << 16;

/// What `prepare` wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Tokens 0..vocab.
    pub vocab: usize,
    /// Tokens per sequence (inputs and the next-token targets overlap by all but one).
    pub sequence: usize,
    /// The chain's seed.
    pub seed: u64,
    /// The chain's entropy per token in nats: the loss a perfect model reaches.
    pub entropy: f64,
    /// The shards.
    pub shards: Vec<ShardInfo>,
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// File name within the corpus directory.
    pub name: String,
    /// Sequences in it.
    pub sequences: usize,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

/// Why the corpus cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        cause: std::io::Error,
    },
    /// The manifest or a shard is not what it should be.
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path, cause: std::io::Error) -> DataError {
    DataError::Io {
        path: path.display().to_string(),
        cause,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The chain: for every token, three successors with probabilities 0.6, 0.3 and 0.1.
struct Chain {
    successors: Vec<[u16; 3]>,
}

const SUCCESSOR_PROBABILITIES: [f64; 3] = [0.6, 0.3, 0.1];

impl Chain {
    fn new(vocab: usize, seed: u64) -> Chain {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let successors = (0..vocab)
            .map(|_| {
                [
                    rng.random_range(0..vocab) as u16,
                    rng.random_range(0..vocab) as u16,
                    rng.random_range(0..vocab) as u16,
                ]
            })
            .collect();
        Chain { successors }
    }

    fn entropy() -> f64 {
        -SUCCESSOR_PROBABILITIES
            .iter()
            .map(|p| p * p.ln())
            .sum::<f64>()
    }

    fn next(&self, token: u16, rng: &mut impl rand::Rng) -> u16 {
        let draw: f64 = rng.random();
        let options = &self.successors[token as usize];
        if draw < SUCCESSOR_PROBABILITIES[0] {
            options[0]
        } else if draw < SUCCESSOR_PROBABILITIES[0] + SUCCESSOR_PROBABILITIES[1] {
            options[1]
        } else {
            options[2]
        }
    }
}

/// Writes `shards` shards of `sequences` sequences of `sequence` tokens into `out`, and the
/// manifest last (a corpus without its manifest is not one).
pub fn prepare(
    out: &Path,
    vocab: usize,
    sequence: usize,
    shards: usize,
    sequences: usize,
    seed: u64,
) -> Result<Manifest, DataError> {
    if !(2..=MAX_VOCAB).contains(&vocab) || sequence < 2 || shards == 0 || sequences == 0 {
        return Err(DataError::Invalid(format!(
            "vocab must be 2 to {MAX_VOCAB}, sequence at least 2, shards and sequences at least 1"
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let chain = Chain::new(vocab, seed);
    let mut infos = Vec::with_capacity(shards);
    for shard in 0..shards {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (0x9e37_79b9 * (shard as u64 + 1)));
        let mut bytes = Vec::with_capacity(sequences * sequence * 2);
        for _ in 0..sequences {
            let mut token = rng.random_range(0..vocab) as u16;
            for _ in 0..sequence {
                bytes.extend_from_slice(&token.to_le_bytes());
                token = chain.next(token, &mut rng);
            }
        }
        let name = format!("shard-{shard:05}.bin");
        let path = out.join(&name);
        write_durably(&path, &bytes)?;
        infos.push(ShardInfo {
            name,
            sequences,
            sha256: hex(&Sha256::digest(&bytes)),
        });
    }
    let manifest = Manifest {
        vocab,
        sequence,
        seed,
        entropy: Chain::entropy(),
        shards: infos,
    };
    let text =
        serde_json::to_vec_pretty(&manifest).map_err(|e| DataError::Invalid(e.to_string()))?;
    write_durably(&out.join("manifest.json"), &text)?;
    Ok(manifest)
}

/// Writes `bytes` to a temporary name, syncs, and renames into place.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let temp = path.with_extension("tmp");
    let mut file = File::create(&temp).map_err(|e| io(&temp, e))?;
    file.write_all(bytes).map_err(|e| io(&temp, e))?;
    file.sync_all().map_err(|e| io(&temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| io(path, e))
}

/// Reads and checks the manifest in `dir`.
pub fn manifest(dir: &Path) -> Result<Manifest, DataError> {
    let path = dir.join("manifest.json");
    let text = std::fs::read(&path).map_err(|e| io(&path, e))?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| DataError::Invalid(format!("{}: {e}", path.display())))?;
    if !(2..=MAX_VOCAB).contains(&manifest.vocab)
        || manifest.sequence < 2
        || manifest.shards.is_empty()
    {
        return Err(DataError::Invalid(format!(
            "{}: vocab, sequence or shards out of range",
            path.display()
        )));
    }
    Ok(manifest)
}

/// One rank's view of the corpus: its shards (every `world`-th, from `rank`), checked, and
/// read batch by batch.
pub struct Reader {
    files: Vec<(PathBuf, File, usize)>,
    sequence: usize,
    total: usize,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("shards", &self.files.len())
            .field("sequences", &self.total)
            .finish()
    }
}

impl Reader {
    /// Opens rank `rank`'s shards of the corpus in `dir` and checks them against the manifest.
    pub fn open(
        dir: &Path,
        manifest: &Manifest,
        rank: usize,
        world: usize,
    ) -> Result<Reader, DataError> {
        let mut files = Vec::new();
        let mut total = 0;
        for info in manifest.shards.iter().skip(rank).step_by(world.max(1)) {
            let path = dir.join(&info.name);
            let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
            if hex(&Sha256::digest(&bytes)) != info.sha256 {
                return Err(DataError::Invalid(format!(
                    "{}: checksum does not match the manifest",
                    path.display()
                )));
            }
            if bytes.len() != info.sequences * manifest.sequence * 2 {
                return Err(DataError::Invalid(format!(
                    "{}: {} bytes, the manifest says {} sequences of {}",
                    path.display(),
                    bytes.len(),
                    info.sequences,
                    manifest.sequence
                )));
            }
            let file = File::open(&path).map_err(|e| io(&path, e))?;
            total += info.sequences;
            files.push((path, file, info.sequences));
        }
        if total == 0 {
            return Err(DataError::Invalid(format!(
                "rank {rank} of {world} has no shard: the corpus has {} (prepare more shards)",
                manifest.shards.len()
            )));
        }
        Ok(Reader {
            files,
            sequence: manifest.sequence,
            total,
        })
    }

    /// Sequences this rank has.
    pub fn sequences(&self) -> usize {
        self.total
    }

    /// Sequence `index` (modulo this rank's sequences), read from its shard file.
    pub fn read(&self, index: usize) -> Result<Vec<u16>, DataError> {
        let mut index = index % self.total;
        for (path, file, count) in &self.files {
            if index < *count {
                let mut bytes = vec![0u8; self.sequence * 2];
                file.read_exact_at(&mut bytes, (index * self.sequence * 2) as u64)
                    .map_err(|e| io(path, e))?;
                return Ok(bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect());
            }
            index -= count;
        }
        unreachable!("index was reduced modulo the total")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_corpora_are_checked_and_read_back_by_rank() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = prepare(dir.path(), 32, 9, 4, 10, 7).unwrap();
        assert_eq!(manifest.shards.len(), 4);
        assert!(manifest.entropy > 0.8 && manifest.entropy < 1.0);
        assert_eq!(super::manifest(dir.path()).unwrap(), manifest);
        let rank1 = Reader::open(dir.path(), &manifest, 1, 2).unwrap();
        assert_eq!(rank1.sequences(), 20);
        let sequence = rank1.read(3).unwrap();
        assert_eq!(sequence.len(), 9);
        assert!(sequence.iter().all(|t| *t < 32));
        // Same seed, same corpus.
        let again = tempfile::tempdir().unwrap();
        assert_eq!(prepare(again.path(), 32, 9, 4, 10, 7).unwrap(), manifest);
        // A damaged shard is refused by name.
        let shard = dir.path().join("shard-00001.bin");
        let mut bytes = std::fs::read(&shard).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&shard, bytes).unwrap();
        let error = Reader::open(dir.path(), &manifest, 1, 2)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("shard-00001.bin") && error.contains("checksum"),
            "{error}"
        );
        // More ranks than shards: the extra rank is told.
        assert!(Reader::open(dir.path(), &manifest, 4, 5).is_err());
    }
}
