//! The contract between ff-raft and the replicated state a service keeps.
//!
//! A state machine keeps all of its state in redb tables of the database ff-raft opens for
//! the group. ff-raft hands it the write transaction in which a batch of committed entries is
//! applied, and that same transaction records the applied index, so state and applied index are
//! always consistent after a crash. Queries and snapshots run on read transactions (redb's MVCC
//! gives them a consistent view without blocking the writer).
//!
//! Rules for implementors:
//! - `apply` must be deterministic: the same commands in the same order give the same state and
//!   responses on every replica. No clocks, no randomness, no iteration over hash maps.
//! - Logical failures (key not found, permission denied) belong in `Response`. An `Err` from
//!   `apply` means storage failed; the node stops rather than skip an entry.
//! - Table names must not start with `raft_`; those belong to ff-raft.

use std::io::{Read, Write};

use redb::{ReadTransaction, WriteTransaction};

use crate::error::StateMachineError;

/// Where in the log an applied command sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyContext {
    /// The entry's log index.
    pub index: u64,
    /// The entry's term.
    pub term: u64,
}

/// State replicated by a raft group.
pub trait StateMachine: Send + Sync + 'static {
    /// A state-changing command, proposed through raft.
    type Command: prost::Message + Default;
    /// What applying a command answers.
    type Response: prost::Message + Default;
    /// A read-only query.
    type Query: prost::Message + Default;
    /// What a query answers.
    type QueryResponse: prost::Message + Default;

    /// Creates the machine's tables if they do not exist yet.
    fn init(&self, txn: &WriteTransaction) -> Result<(), StateMachineError>;

    /// Applies one committed command.
    fn apply(
        &self,
        txn: &WriteTransaction,
        ctx: ApplyContext,
        command: Self::Command,
    ) -> Result<Self::Response, StateMachineError>;

    /// Answers a query from a consistent view of the state.
    fn query(
        &self,
        txn: &ReadTransaction,
        query: Self::Query,
    ) -> Result<Self::QueryResponse, StateMachineError>;

    /// Writes the whole state to `out`.
    fn snapshot(&self, txn: &ReadTransaction, out: &mut dyn Write)
    -> Result<(), StateMachineError>;

    /// Replaces the whole state with what `snapshot` wrote to `input`.
    fn restore(
        &self,
        txn: &WriteTransaction,
        input: &mut dyn Read,
    ) -> Result<(), StateMachineError>;
}

/// A state machine seen through bytes, so that storage, snapshots and the gRPC service need not
/// be generic over the command types.
pub(crate) trait ErasedStateMachine: Send + Sync + 'static {
    fn init(&self, txn: &WriteTransaction) -> Result<(), StateMachineError>;
    /// `Ok(Err(reason))` when the bytes are not a command.
    fn apply_bytes(
        &self,
        txn: &WriteTransaction,
        ctx: ApplyContext,
        command: &[u8],
    ) -> Result<Result<Vec<u8>, String>, StateMachineError>;
    /// `Ok(Err(reason))` when the bytes are not a query.
    fn query_bytes(
        &self,
        txn: &ReadTransaction,
        query: &[u8],
    ) -> Result<Result<Vec<u8>, String>, StateMachineError>;
    fn snapshot(&self, txn: &ReadTransaction, out: &mut dyn Write)
    -> Result<(), StateMachineError>;
    fn restore(
        &self,
        txn: &WriteTransaction,
        input: &mut dyn Read,
    ) -> Result<(), StateMachineError>;
}

impl<S: StateMachine> ErasedStateMachine for S {
    fn init(&self, txn: &WriteTransaction) -> Result<(), StateMachineError> {
        StateMachine::init(self, txn)
    }

    fn apply_bytes(
        &self,
        txn: &WriteTransaction,
        ctx: ApplyContext,
        command: &[u8],
    ) -> Result<Result<Vec<u8>, String>, StateMachineError> {
        let command = match <S::Command as prost::Message>::decode(command) {
            Ok(command) => command,
            Err(error) => return Ok(Err(error.to_string())),
        };
        let response = self.apply(txn, ctx, command)?;
        Ok(Ok(prost::Message::encode_to_vec(&response)))
    }

    fn query_bytes(
        &self,
        txn: &ReadTransaction,
        query: &[u8],
    ) -> Result<Result<Vec<u8>, String>, StateMachineError> {
        let query = match <S::Query as prost::Message>::decode(query) {
            Ok(query) => query,
            Err(error) => return Ok(Err(error.to_string())),
        };
        let response = self.query(txn, query)?;
        Ok(Ok(prost::Message::encode_to_vec(&response)))
    }

    fn snapshot(
        &self,
        txn: &ReadTransaction,
        out: &mut dyn Write,
    ) -> Result<(), StateMachineError> {
        StateMachine::snapshot(self, txn, out)
    }

    fn restore(
        &self,
        txn: &WriteTransaction,
        input: &mut dyn Read,
    ) -> Result<(), StateMachineError> {
        StateMachine::restore(self, txn, input)
    }
}
