//! The meta group's state machine: commands and queries dispatched to [`namespace`] over one
//! redb table, snapshots as a stream of its records.

use std::io::{Read, Write};

use ff_raft::records::{read_record, write_record};
use ff_raft::redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use ff_raft::{ApplyContext, StateMachine, StateMachineError};
use fs3_proto::meta::{
    Command, CommandResult, Credentials, Query, QueryResult, Session, User, UserRecord, command,
    query,
};
use prost::Message as _;

use crate::keys;
use crate::namespace::{self, Ctx, OpError};

/// Every record of the namespace (see [`keys`]).
pub const META: TableDefinition<'static, &'static [u8], &'static [u8]> =
    TableDefinition::new("meta");

/// Most entries one directory read returns.
pub const MAX_READ_DIR: u32 = 4096;
/// Largest key and value a snapshot may hold (names are at most 255 bytes; inodes are small).
const MAX_RECORD: usize = 64 << 10;

/// The metadata service's state machine.
#[derive(Debug, Default, Clone, Copy)]
pub struct MetaMachine;

fn refusal(error: OpError) -> Result<(i32, String), StateMachineError> {
    match error {
        OpError::Refused { errno, message } => Ok((errno, message)),
        OpError::Storage(error) => Err(error),
    }
}

fn apply_op(
    table: &mut namespace::MetaTable<'_>,
    ctx: Ctx<'_>,
    op: command::Op,
) -> Result<CommandResult, OpError> {
    use command::Op;
    match op {
        Op::Create(op) => namespace::create(table, ctx, op),
        Op::Remove(op) => namespace::remove(table, ctx, &op),
        Op::Rename(op) => namespace::rename(table, ctx, op),
        Op::Link(op) => namespace::link(table, ctx, op),
        Op::SetAttr(op) => namespace::set_attr(table, ctx, op),
        Op::Open(op) => namespace::open(table, ctx, op),
        Op::Close(op) => namespace::close(table, ctx, op),
        Op::SetLayout(op) => namespace::set_layout(table, ctx, op),
        Op::SetChainTable(op) => namespace::set_chain_table(table, ctx, &op),
        Op::AddUser(op) => add_user(table, op),
        Op::PruneSessions(op) => {
            namespace::prune_sessions(table, ctx, op.client).map(|_| CommandResult::default())
        }
        Op::Purge(op) => namespace::purge(table, op.inode),
        Op::Forget(op) => namespace::forget(table, op.inode),
    }
}

fn add_user(
    table: &mut namespace::MetaTable<'_>,
    op: fs3_proto::meta::AddUserOp,
) -> Result<CommandResult, OpError> {
    if op.name.is_empty() || op.token_sha256.len() != 32 {
        return Err(namespace::refuse(
            libc::EINVAL,
            "a user needs a name and a 32-byte token hash",
        ));
    }
    if users(table)?.iter().any(|u| u.name == op.name) {
        return Err(namespace::refuse(
            libc::EEXIST,
            format!("user {} exists", op.name),
        ));
    }
    let record = UserRecord {
        user: Some(User {
            name: op.name,
            uid: op.uid,
            gid: op.gid,
            trusted: op.trusted,
        }),
        token_sha256: op.token_sha256.clone(),
    };
    table.insert(
        keys::user(&op.token_sha256).as_slice(),
        record.encode_to_vec().as_slice(),
    )?;
    Ok(CommandResult::default())
}

fn users(table: &impl ReadableTable<&'static [u8], &'static [u8]>) -> Result<Vec<User>, OpError> {
    let end = keys::prefix_end(keys::USER_PREFIX);
    let mut users = Vec::new();
    for item in table.range::<&[u8]>(keys::USER_PREFIX..end.as_slice())? {
        let (_, value) = item?;
        let record: UserRecord = namespace::decode(value.value(), || "user record".to_string())?;
        users.extend(record.user);
    }
    Ok(users)
}

fn run_query(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    creds: &Credentials,
    op: query::Op,
) -> Result<QueryResult, OpError> {
    use query::Op;
    let mut result = QueryResult::default();
    match op {
        Op::Lookup(q) => result.inode = Some(namespace::lookup(table, creds, q.parent, &q.name)?),
        Op::GetAttr(q) => result.inode = Some(namespace::need_inode(table, q.inode)?),
        Op::ReadDir(q) => {
            let limit = q.limit.clamp(1, MAX_READ_DIR) as usize;
            let (entries, more) = namespace::read_dir(table, creds, q.inode, &q.after, limit)?;
            result.entries = entries;
            result.more = more;
        }
        Op::User(q) => {
            if q.token_sha256.is_empty() {
                result.users = users(table)?;
            } else if let Some(bytes) = table.get(keys::user(&q.token_sha256).as_slice())? {
                let record: UserRecord =
                    namespace::decode(bytes.value(), || "user record".to_string())?;
                result.users.extend(record.user);
            }
        }
        Op::Gc(q) => {
            let limit = q.limit.clamp(1, MAX_READ_DIR) as usize;
            let prefix = if q.purged {
                keys::PURGED_PREFIX
            } else {
                keys::GARBAGE_PREFIX
            };
            let end = keys::prefix_end(prefix);
            for item in table.range::<&[u8]>(prefix..end.as_slice())? {
                let (key, value) = item?;
                let Some(id) = keys::id_in(key.value()) else {
                    continue;
                };
                let inode = if q.purged {
                    namespace::decode(value.value(), || format!("purged record {id}"))?
                } else {
                    let due = <[u8; 8]>::try_from(value.value())
                        .map(i64::from_be_bytes)
                        .is_ok_and(|t| t < q.before_ns);
                    // Never offer a file somebody can still reach or write.
                    match namespace::get_inode(table, id)? {
                        Some(inode) if due && inode.nlink == 0 && inode.sessions == 0 => inode,
                        _ => continue,
                    }
                };
                result.inodes.push(inode);
                if result.inodes.len() == limit {
                    result.more = true;
                    break;
                }
            }
        }
        Op::Sessions(_) => {
            let end = keys::prefix_end(keys::SESSION_PREFIX);
            for item in table.range::<&[u8]>(keys::SESSION_PREFIX..end.as_slice())? {
                let (key, value) = item?;
                let client = <[u8; 8]>::try_from(value.value()).map(u64::from_be_bytes);
                if let (Some(inode), Some(id), Ok(client)) = (
                    keys::id_in(key.value()),
                    keys::session_id_in(key.value()),
                    client,
                ) {
                    result.sessions.push(Session { id, inode, client });
                }
            }
        }
        Op::ChainTable(q) => result.chains = namespace::chain_table(table, q.table_id)?,
        Op::Totals(_) => {
            result.files = namespace::counter(table, keys::FILES)?;
            result.bytes = namespace::counter(table, keys::BYTES)?;
        }
    }
    Ok(result)
}

impl StateMachine for MetaMachine {
    type Command = Command;
    type Response = CommandResult;
    type Query = Query;
    type QueryResponse = QueryResult;

    fn init(&self, txn: &WriteTransaction) -> Result<(), StateMachineError> {
        let mut table = txn.open_table(META)?;
        namespace::init(&mut table).or_else(|e| refusal(e).map(|_| ()))
    }

    fn apply(
        &self,
        txn: &WriteTransaction,
        ctx: ApplyContext,
        command: Command,
    ) -> Result<CommandResult, StateMachineError> {
        let Some(op) = command.op else {
            return Ok(CommandResult {
                errno: libc::EINVAL,
                message: "empty command".to_string(),
                ..CommandResult::default()
            });
        };
        let creds = command.creds.unwrap_or_default();
        let ctx = Ctx {
            creds: &creds,
            now: command.now_ns,
            index: ctx.index,
        };
        // A refused operation changes nothing: every operation in `namespace` makes all its
        // checks before its first write (the batch's transaction cannot be rolled back for
        // one command).
        let mut table = txn.open_table(META)?;
        match apply_op(&mut table, ctx, op) {
            Ok(result) => Ok(result),
            Err(error) => {
                let (errno, message) = refusal(error)?;
                Ok(CommandResult {
                    errno,
                    message,
                    ..CommandResult::default()
                })
            }
        }
    }

    fn query(&self, txn: &ReadTransaction, query: Query) -> Result<QueryResult, StateMachineError> {
        let Some(op) = query.op else {
            return Ok(QueryResult {
                errno: libc::EINVAL,
                message: "empty query".to_string(),
                ..QueryResult::default()
            });
        };
        let table = txn.open_table(META)?;
        let creds = query.creds.unwrap_or_default();
        match run_query(&table, &creds, op) {
            Ok(result) => Ok(result),
            Err(error) => {
                let (errno, message) = refusal(error)?;
                Ok(QueryResult {
                    errno,
                    message,
                    ..QueryResult::default()
                })
            }
        }
    }

    fn snapshot(
        &self,
        txn: &ReadTransaction,
        out: &mut dyn Write,
    ) -> Result<(), StateMachineError> {
        let table = txn.open_table(META)?;
        for item in table.iter()? {
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
        let mut table = txn.open_table(META)?;
        table.retain(|_, _| false)?;
        while let Some((key, value)) = read_record(input, MAX_RECORD, MAX_RECORD)? {
            table.insert(key.as_slice(), value.as_slice())?;
        }
        Ok(())
    }
}
