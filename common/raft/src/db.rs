//! Helpers shared by the two redb databases of a node (`log.redb` and `state.redb`): opening
//! with clear errors, the identity check, encodings and error wrapping.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};

use crate::config::RaftConfig;
use crate::error::StorageError;

/// Key-value metadata table; each database has one.
pub(crate) const META: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("raft_meta");

const KEY_CLUSTER: &str = "cluster";
const KEY_NODE_ID: &str = "node_id";

/// Index and term every founding member starts from (TiKV's `RAFT_INIT_LOG_INDEX`). A member
/// added later starts with an empty log below this index, so the leader must send it a snapshot
/// — which carries the founding membership — before any entry.
pub(crate) const INIT: IndexTerm = IndexTerm { index: 5, term: 5 };

/// A log position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct IndexTerm {
    pub index: u64,
    pub term: u64,
}

impl IndexTerm {
    pub(crate) fn encode(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.index.to_le_bytes());
        out[8..].copy_from_slice(&self.term.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8], what: &str) -> Result<Self, StorageError> {
        if bytes.len() != 16 {
            return Err(StorageError::Corrupt(format!(
                "{what} has {} bytes, not 16",
                bytes.len()
            )));
        }
        let mut index = [0u8; 8];
        let mut term = [0u8; 8];
        index.copy_from_slice(&bytes[..8]);
        term.copy_from_slice(&bytes[8..]);
        Ok(IndexTerm {
            index: u64::from_le_bytes(index),
            term: u64::from_le_bytes(term),
        })
    }
}

pub(crate) fn db_err<E: Into<redb::Error>>(
    context: &'static str,
) -> impl FnOnce(E) -> StorageError {
    move |e| StorageError::db(context, e)
}

pub(crate) fn decode_pb<M: protobuf::Message>(bytes: &[u8], what: &str) -> Result<M, StorageError> {
    M::parse_from_bytes(bytes).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

pub(crate) fn encode_pb<M: protobuf::Message>(
    message: &M,
    what: &str,
) -> Result<Vec<u8>, StorageError> {
    message
        .write_to_bytes()
        .map_err(|e| StorageError::Corrupt(format!("cannot encode {what}: {e}")))
}

/// Reads a required metadata value.
pub(crate) fn get_meta(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Vec<u8>>, StorageError> {
    Ok(meta
        .get(key)
        .map_err(db_err("read raft meta"))?
        .map(|v| v.value().to_vec()))
}

/// Like [`get_meta`], but a missing value is corruption.
pub(crate) fn require_meta(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Vec<u8>, StorageError> {
    get_meta(meta, key)?.ok_or_else(|| StorageError::Corrupt(format!("raft meta has no {key}")))
}

/// Opens a database file with clear errors (`ff-db`), adding what a raft node can do about a
/// damaged one.
pub(crate) fn open_database(path: &Path, verify: bool) -> Result<Database, StorageError> {
    ff_db::open(path, verify).map_err(|error| match error {
        ff_db::OpenError::Damaged { .. } => StorageError::Corrupt(format!(
            "{error}, or move the node's data_dir aside and re-add the node to the group so that \
             it receives a snapshot"
        )),
        other => StorageError::Corrupt(other.to_string()),
    })
}

/// Checks that a database belongs to this node and cluster, stamping a fresh one.
pub(crate) fn check_identity(
    meta: &mut redb::Table<'_, &str, &[u8]>,
    config: &RaftConfig,
    dir: &Path,
) -> Result<(), StorageError> {
    match (get_meta(meta, KEY_CLUSTER)?, get_meta(meta, KEY_NODE_ID)?) {
        (Some(cluster), Some(node)) => {
            let node: [u8; 8] = node
                .as_slice()
                .try_into()
                .map_err(|_| StorageError::Corrupt("stored node id is not 8 bytes".to_string()))?;
            let node = u64::from_le_bytes(node);
            let cluster = String::from_utf8_lossy(&cluster).into_owned();
            if cluster != config.cluster || node != config.node_id {
                return Err(StorageError::WrongIdentity {
                    dir: dir.display().to_string(),
                    found: format!("node {node} of cluster {cluster:?}"),
                    expected: format!("node {} of cluster {:?}", config.node_id, config.cluster),
                });
            }
        }
        _ => {
            meta.insert(KEY_CLUSTER, config.cluster.as_bytes())
                .map_err(db_err("write identity"))?;
            meta.insert(KEY_NODE_ID, config.node_id.to_le_bytes().as_slice())
                .map_err(db_err("write identity"))?;
        }
    }
    Ok(())
}
