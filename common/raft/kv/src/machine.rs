//! The replicated key-value state machine: one redb table, key -> (version, value).

use std::io::{Read, Write};

use ff_raft::records::{read_record, write_record};
use ff_raft::redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use ff_raft::{ApplyContext, StateMachine, StateMachineError};

use crate::proto::{Command, CommandResult, Item, Query, QueryResult, command, query};

/// key -> (version, value).
const KV: TableDefinition<'static, &'static [u8], (u64, &'static [u8])> =
    TableDefinition::new("kv");

/// Largest key accepted.
pub const MAX_KEY_SIZE: usize = 4096;
/// Largest value accepted.
pub const MAX_VALUE_SIZE: usize = 1 << 20;
/// Most items one scan returns.
pub const MAX_SCAN_LIMIT: u32 = 10_000;

/// The key-value store.
#[derive(Debug, Default, Clone, Copy)]
pub struct KvMachine;

fn refused(error: String) -> CommandResult {
    CommandResult {
        error,
        ..CommandResult::default()
    }
}

impl StateMachine for KvMachine {
    type Command = Command;
    type Response = CommandResult;
    type Query = Query;
    type QueryResponse = QueryResult;

    fn init(&self, txn: &WriteTransaction) -> Result<(), StateMachineError> {
        txn.open_table(KV)?;
        Ok(())
    }

    fn apply(
        &self,
        txn: &WriteTransaction,
        _ctx: ApplyContext,
        command: Command,
    ) -> Result<CommandResult, StateMachineError> {
        let mut table = txn.open_table(KV)?;
        match command.op {
            Some(command::Op::Put(put)) => {
                if put.key.is_empty() || put.key.len() > MAX_KEY_SIZE {
                    return Ok(refused(format!("key must be 1 to {MAX_KEY_SIZE} bytes")));
                }
                if put.value.len() > MAX_VALUE_SIZE {
                    return Ok(refused(format!("value exceeds {MAX_VALUE_SIZE} bytes")));
                }
                let previous = table.get(put.key.as_slice())?.map(|v| v.value().0);
                let version = previous.unwrap_or(0) + 1;
                table.insert(put.key.as_slice(), (version, put.value.as_slice()))?;
                Ok(CommandResult {
                    version,
                    existed: previous.is_some(),
                    error: String::new(),
                })
            }
            Some(command::Op::Delete(delete)) => {
                let existed = table.remove(delete.key.as_slice())?.is_some();
                Ok(CommandResult {
                    version: 0,
                    existed,
                    error: String::new(),
                })
            }
            None => Ok(refused("empty command".to_string())),
        }
    }

    fn query(&self, txn: &ReadTransaction, query: Query) -> Result<QueryResult, StateMachineError> {
        let table = txn.open_table(KV)?;
        let mut items = Vec::new();
        match query.op {
            Some(query::Op::Get(get)) => {
                if let Some(value) = table.get(get.key.as_slice())? {
                    let (version, bytes) = value.value();
                    items.push(Item {
                        key: get.key,
                        value: bytes.to_vec(),
                        version,
                    });
                }
            }
            Some(query::Op::Scan(scan)) => {
                let limit = match scan.limit {
                    0 => MAX_SCAN_LIMIT,
                    n => n.min(MAX_SCAN_LIMIT),
                } as usize;
                let range = if scan.end.is_empty() {
                    table.range(scan.start.as_slice()..)?
                } else {
                    table.range(scan.start.as_slice()..scan.end.as_slice())?
                };
                for item in range.take(limit) {
                    let (key, value) = item?;
                    let (version, bytes) = value.value();
                    items.push(Item {
                        key: key.value().to_vec(),
                        value: bytes.to_vec(),
                        version,
                    });
                }
            }
            None => {}
        }
        Ok(QueryResult { items })
    }

    fn snapshot(
        &self,
        txn: &ReadTransaction,
        out: &mut dyn Write,
    ) -> Result<(), StateMachineError> {
        let table = txn.open_table(KV)?;
        for item in table.iter()? {
            let (key, value) = item?;
            let (version, bytes) = value.value();
            // The value record is the version (8 bytes LE) followed by the value.
            let mut record = Vec::with_capacity(8 + bytes.len());
            record.extend_from_slice(&version.to_le_bytes());
            record.extend_from_slice(bytes);
            write_record(out, key.value(), &record)?;
        }
        Ok(())
    }

    fn restore(
        &self,
        txn: &WriteTransaction,
        input: &mut dyn Read,
    ) -> Result<(), StateMachineError> {
        let mut table = txn.open_table(KV)?;
        table.retain(|_, _| false)?;
        while let Some((key, record)) = read_record(input, MAX_KEY_SIZE, 8 + MAX_VALUE_SIZE)? {
            let (version, value) = record.split_first_chunk::<8>().ok_or_else(|| {
                StateMachineError::Corrupt("value record shorter than its version".to_string())
            })?;
            table.insert(key.as_slice(), (u64::from_le_bytes(*version), value))?;
        }
        Ok(())
    }
}
