//! hai's state machine: commands and queries dispatched to [`crate::state`] over one redb table;
//! snapshots as a stream of its records.

use std::io::{Read, Write};

use ff_raft::records::{read_record, write_record};
use ff_raft::redb::{ReadTransaction, WriteTransaction};
use ff_raft::{ApplyContext, StateMachine, StateMachineError};
use hai_proto::{Command, CommandResult, Query, QueryResult, command, query};

use crate::state::{self, HAI, Refusal};

/// Largest key and value a snapshot may hold (a job with its spec is small; 1 MiB is ample).
const MAX_RECORD: usize = 1 << 20;

/// The scheduler's state machine.
#[derive(Debug, Default, Clone, Copy)]
pub struct HaiMachine;

fn apply_op(
    table: &mut ff_raft::redb::Table<'_, &'static [u8], &'static [u8]>,
    now: i64,
    op: command::Op,
) -> Result<CommandResult, Refusal> {
    use command::Op;
    let mut result = CommandResult::default();
    match op {
        Op::Submit(op) => {
            result.job_id = state::submit(
                table,
                now,
                &op.spec.unwrap_or_default(),
                &op.owner,
                &op.request_id,
            )?;
        }
        Op::Register(node) => state::register(table, now, node)?,
        Op::Place(op) => state::place(table, now, op)?,
        Op::Exited(op) => state::exited(table, now, &op.node, &op.exit.unwrap_or_default())?,
        Op::Stop(op) => state::stop(table, now, op)?,
        Op::NodeDown(op) => state::node_down(table, now, &op.node, &op.reason)?,
        Op::SetDrain(op) => state::set_drain(table, &op.node, op.drain)?,
        Op::AddUser(op) => state::add_user(table, op.user.unwrap_or_default(), &op.token_sha256)?,
        Op::Forget(op) => result.forgotten = state::forget(table, op.ended_before_ms)?,
    }
    Ok(result)
}

impl StateMachine for HaiMachine {
    type Command = Command;
    type Response = CommandResult;
    type Query = Query;
    type QueryResponse = QueryResult;

    fn init(&self, txn: &WriteTransaction) -> Result<(), StateMachineError> {
        state::rebuild_indexes(&mut txn.open_table(HAI)?)
    }

    fn apply(
        &self,
        txn: &WriteTransaction,
        _ctx: ApplyContext,
        command: Command,
    ) -> Result<CommandResult, StateMachineError> {
        let Some(op) = command.op else {
            return Ok(CommandResult {
                error: "empty command".to_string(),
                code: state::code::INVALID_ARGUMENT,
                ..CommandResult::default()
            });
        };
        // Every transition checks before it writes: a refusal leaves no trace.
        let mut table = txn.open_table(HAI)?;
        match apply_op(&mut table, command.now_ms, op) {
            Ok(result) => Ok(result),
            Err(Refusal::Refused { code, message }) => Ok(CommandResult {
                error: message,
                code,
                ..CommandResult::default()
            }),
            Err(Refusal::Storage(error)) => Err(error),
        }
    }

    fn query(&self, txn: &ReadTransaction, query: Query) -> Result<QueryResult, StateMachineError> {
        let table = txn.open_table(HAI)?;
        let mut result = QueryResult::default();
        let answer = (|| -> Result<(), Refusal> {
            match query.op {
                Some(query::Op::Jobs(q)) => result.jobs = state::jobs(&table, q.all)?,
                Some(query::Op::Job(q)) => result.jobs.extend(state::job(&table, q.job_id)?),
                Some(query::Op::Nodes(_)) => {
                    result.nodes = state::nodes(&table)?;
                    result.jobs = state::jobs(&table, false)?;
                }
                Some(query::Op::User(sha)) if sha.is_empty() => {
                    result.users = state::users(&table)?
                }
                Some(query::Op::User(sha)) => result.users.extend(state::user(&table, &sha)?),
                None => {}
            }
            Ok(())
        })();
        answer.map(|()| result).map_err(Refusal::into_storage_error)
    }

    fn snapshot(
        &self,
        txn: &ReadTransaction,
        out: &mut dyn Write,
    ) -> Result<(), StateMachineError> {
        let table = txn.open_table(HAI)?;
        for item in ff_raft::redb::ReadableTable::iter(&table)? {
            let (key, value) = item?;
            write_record(out, key.value(), value.value())?;
        }
        Ok(())
    }

    fn restore(
        &self,
        txn: &WriteTransaction,
        input: &mut dyn Read,
    ) -> Result<(), StateMachineError> {
        let mut table = txn.open_table(HAI)?;
        table.retain(|_, _| false)?;
        while let Some((key, value)) = read_record(input, MAX_RECORD, MAX_RECORD)? {
            table.insert(key.as_slice(), value.as_slice())?;
        }
        state::rebuild_indexes(&mut table)
    }
}
