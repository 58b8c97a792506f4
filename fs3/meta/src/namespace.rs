//! The namespace operations, applied deterministically inside the meta group's write
//! transaction: every check (existence, type, emptiness, permissions, the sticky bit, rename
//! loops) happens against the committed state in the same transaction that changes it, so a
//! refused operation changes nothing and two replicas never disagree.

use ff_raft::StateMachineError;
use ff_raft::redb::{ReadableTable, Table};
use fs3_proto::meta::{
    CloseOp, CommandResult, CreateOp, Credentials, DirEntry, Inode, InodeKind, LinkOp, OpenOp,
    RemoveOp, RenameOp, SetAttrOp, SetChainTableOp, SetLayoutOp,
};
use prost::Message as _;

use crate::keys;
use crate::perm::{self, EXEC, READ, SET_GID, SET_UID, WRITE};

/// The root directory's inode id.
pub const ROOT: u64 = fs3_client::ROOT;
/// Longest name in a directory (as Linux's NAME_MAX).
pub const NAME_MAX: usize = 255;
/// Longest symlink target (as Linux's PATH_MAX).
pub const PATH_MAX: usize = 4096;
/// Smallest and largest chunk sizes a layout may use.
pub const CHUNK_SIZES: std::ops::RangeInclusive<u64> = (64 << 10)..=(64 << 20);
/// Most chains one file may spread over.
pub const MAX_STRIPE: u32 = 256;
/// Largest file length: beyond it, EFBIG (see [`fs3_client::MAX_FILE_SIZE`]).
pub const MAX_FILE_SIZE: u64 = fs3_client::MAX_FILE_SIZE;
/// The root's layout until an operator sets another: 1 MiB chunks over up to 16 chains of
/// chain table 1.
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// See [`DEFAULT_CHUNK_SIZE`].
pub const DEFAULT_STRIPE: u32 = 16;
/// See [`DEFAULT_CHUNK_SIZE`].
pub const DEFAULT_TABLE: u64 = 1;

/// The meta group's table: every record, keyed as [`keys`] describes.
pub type MetaTable<'t> = Table<'t, &'static [u8], &'static [u8]>;

/// Why an operation did not happen.
#[derive(Debug)]
pub enum OpError {
    /// A POSIX refusal: nothing changed.
    Refused {
        /// The errno.
        errno: i32,
        /// What was wrong, for people.
        message: String,
    },
    /// The database failed; the replica must stop.
    Storage(StateMachineError),
}

impl<E: Into<StateMachineError>> From<E> for OpError {
    fn from(error: E) -> Self {
        OpError::Storage(error.into())
    }
}

/// A refusal with `errno`.
pub fn refuse(errno: i32, message: impl Into<String>) -> OpError {
    OpError::Refused {
        errno,
        message: message.into(),
    }
}

/// Who does it and when.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    /// The caller.
    pub creds: &'a Credentials,
    /// The proposer's clock, in ns since the epoch.
    pub now: i64,
    /// The command's log index (unique, so it names new sessions).
    pub index: u64,
}

fn corrupt(what: String) -> OpError {
    OpError::Storage(StateMachineError::Corrupt(what))
}

/// A stored record of type `M`; a record that does not decode is corruption (`what` names it).
pub fn decode<M: prost::Message + Default>(
    bytes: &[u8],
    what: impl FnOnce() -> String,
) -> Result<M, OpError> {
    M::decode(bytes).map_err(|e| corrupt(format!("{} does not decode: {e}", what())))
}

/// The record at `key`, decoded, if there is one.
fn get_record<M: prost::Message + Default>(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
    what: impl FnOnce() -> String,
) -> Result<Option<M>, OpError> {
    match table.get(key)? {
        Some(bytes) => decode(bytes.value(), what).map(Some),
        None => Ok(None),
    }
}

/// The inode `id`, if it exists.
pub fn get_inode(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    id: u64,
) -> Result<Option<Inode>, OpError> {
    get_record(table, &keys::inode(id), || format!("inode {id}"))
}

/// The inode `id`, or ENOENT.
pub fn need_inode(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    id: u64,
) -> Result<Inode, OpError> {
    get_inode(table, id)?.ok_or_else(|| refuse(libc::ENOENT, format!("no inode {id}")))
}

/// The entry `name` of directory `parent`, if any.
pub fn get_entry(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    parent: u64,
    name: &[u8],
) -> Result<Option<DirEntry>, OpError> {
    get_record(table, &keys::dentry(parent, name), || {
        format!("entry in directory {parent}")
    })
}

/// A counter's value (0 if never set).
pub fn counter(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
) -> Result<u64, OpError> {
    match table.get(key)? {
        Some(bytes) => {
            let raw: [u8; 8] = bytes
                .value()
                .try_into()
                .map_err(|_| corrupt("counter is not 8 bytes".to_string()))?;
            Ok(u64::from_be_bytes(raw))
        }
        None => Ok(0),
    }
}

fn add_to_counter(table: &mut MetaTable<'_>, key: &[u8], delta: i128) -> Result<(), OpError> {
    let value = (i128::from(counter(table, key)?) + delta).clamp(0, i128::from(u64::MAX));
    let value = u64::try_from(value).unwrap_or(u64::MAX);
    table.insert(key, value.to_be_bytes().as_slice())?;
    Ok(())
}

/// Stores `inode`.
pub fn put_inode(table: &mut MetaTable<'_>, inode: &Inode) -> Result<(), OpError> {
    table.insert(
        keys::inode(inode.id).as_slice(),
        inode.encode_to_vec().as_slice(),
    )?;
    Ok(())
}

fn put_entry(table: &mut MetaTable<'_>, parent: u64, entry: &DirEntry) -> Result<(), OpError> {
    table.insert(
        keys::dentry(parent, &entry.name).as_slice(),
        entry.encode_to_vec().as_slice(),
    )?;
    Ok(())
}

fn is_dir(inode: &Inode) -> bool {
    inode.kind == InodeKind::Directory as i32
}

fn is_file(inode: &Inode) -> bool {
    inode.kind == InodeKind::File as i32
}

/// Checks a name for a new or existing entry: not empty, not `.` or `..`, no `/` or NUL,
/// at most NAME_MAX bytes. `dots` is the errno for `.` and `..`.
fn check_name(name: &[u8], dots: i32) -> Result<(), OpError> {
    if name.is_empty() {
        return Err(refuse(libc::ENOENT, "empty name"));
    }
    if name.len() > NAME_MAX {
        return Err(refuse(
            libc::ENAMETOOLONG,
            format!("name of {} bytes (at most {NAME_MAX})", name.len()),
        ));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(refuse(libc::EINVAL, "names may not contain '/' or NUL"));
    }
    if name == b"." || name == b".." {
        return Err(refuse(dots, "'.' and '..' cannot be used here"));
    }
    Ok(())
}

/// A directory the caller may search, or ENOTDIR / EACCES.
fn searchable_dir(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    id: u64,
    creds: &Credentials,
    also: u32,
) -> Result<Inode, OpError> {
    let dir = need_inode(table, id)?;
    if !is_dir(&dir) {
        return Err(refuse(
            libc::ENOTDIR,
            format!("inode {id} is not a directory"),
        ));
    }
    if !perm::allowed(&dir, creds, EXEC | also) {
        return Err(refuse(
            libc::EACCES,
            format!("no permission in directory {id}"),
        ));
    }
    Ok(dir)
}

/// Looks `name` up in `parent` (`.` and `..` included).
pub fn lookup(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    creds: &Credentials,
    parent: u64,
    name: &[u8],
) -> Result<Inode, OpError> {
    let dir = searchable_dir(table, parent, creds, 0)?;
    match name {
        b"." => return Ok(dir),
        b".." => return need_inode(table, dir.parent),
        _ => {}
    }
    check_name(name, libc::EINVAL)?;
    let entry = get_entry(table, parent, name)?.ok_or_else(|| {
        refuse(
            libc::ENOENT,
            format!(
                "no entry {} in directory {parent}",
                String::from_utf8_lossy(name)
            ),
        )
    })?;
    need_inode(table, entry.inode)
}

/// Entries of directory `id` after `after`, at most `limit`; and whether more follow.
pub fn read_dir(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    creds: &Credentials,
    id: u64,
    after: &[u8],
    limit: usize,
) -> Result<(Vec<DirEntry>, bool), OpError> {
    let dir = need_inode(table, id)?;
    if !is_dir(&dir) {
        return Err(refuse(
            libc::ENOTDIR,
            format!("inode {id} is not a directory"),
        ));
    }
    if !perm::allowed(&dir, creds, READ) {
        return Err(refuse(libc::EACCES, format!("no permission to list {id}")));
    }
    let prefix = keys::dentry_prefix(id);
    let start = keys::dentry(id, after);
    let end = keys::prefix_end(&prefix);
    let mut entries = Vec::new();
    let mut more = false;
    for item in table.range::<&[u8]>(start.as_slice()..end.as_slice())? {
        let (key, value) = item?;
        if key.value() == start.as_slice() && !after.is_empty() {
            continue;
        }
        if entries.len() == limit {
            more = true;
            break;
        }
        entries.push(decode(value.value(), || {
            format!("entry in directory {id}")
        })?);
    }
    Ok((entries, more))
}

/// A 64-bit mix of `x` (splitmix64's finaliser), for choosing and shuffling chains.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The chains of chain table `id`, as the leader last copied them from mgmtd.
pub fn chain_table(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    id: u64,
) -> Result<Vec<u64>, OpError> {
    Ok(
        get_record::<SetChainTableOp>(table, &keys::chain_table(id), || {
            format!("chain table {id}")
        })?
        .map(|t| t.chains)
        .unwrap_or_default(),
    )
}

/// A new file's layout from its directory's: `stripe` consecutive chains of the table from a
/// position given by the inode id, in an order shuffled by the inode id (as 3FS does), so that
/// files spread over every chain and a file's chunks over its chains.
fn file_layout(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    dir_layout: &fs3_proto::meta::Layout,
    inode: u64,
) -> Result<fs3_proto::meta::Layout, OpError> {
    let chains = chain_table(table, dir_layout.table_id)?;
    if chains.is_empty() {
        return Err(refuse(
            libc::ENOSPC,
            format!(
                "chain table {} is not known to meta yet; is the cluster bootstrapped?",
                dir_layout.table_id
            ),
        ));
    }
    let len = chains.len();
    let stripe = (dir_layout.stripe.max(1) as usize).min(len);
    let start = (mix(inode) % len as u64) as usize;
    let mut chosen: Vec<u64> = (0..stripe).map(|i| chains[(start + i) % len]).collect();
    let mut seed = mix(inode ^ 0x5EED);
    for i in (1..chosen.len()).rev() {
        seed = mix(seed);
        chosen.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    Ok(fs3_proto::meta::Layout {
        chunk_size: dir_layout.chunk_size,
        stripe: stripe as u32,
        table_id: dir_layout.table_id,
        chains: chosen,
    })
}

/// Checks a layout an operator asks for.
pub fn check_layout(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    layout: &fs3_proto::meta::Layout,
) -> Result<(), OpError> {
    if !layout.chunk_size.is_power_of_two() || !CHUNK_SIZES.contains(&layout.chunk_size) {
        return Err(refuse(
            libc::EINVAL,
            format!(
                "chunk size {} must be a power of two from {} to {} bytes",
                layout.chunk_size,
                CHUNK_SIZES.start(),
                CHUNK_SIZES.end()
            ),
        ));
    }
    if layout.stripe == 0 || layout.stripe > MAX_STRIPE {
        return Err(refuse(
            libc::EINVAL,
            format!("stripe {} must be 1 to {MAX_STRIPE}", layout.stripe),
        ));
    }
    if chain_table(table, layout.table_id)?.is_empty() {
        return Err(refuse(
            libc::EINVAL,
            format!("chain table {} does not exist", layout.table_id),
        ));
    }
    Ok(())
}

fn set_length(table: &mut MetaTable<'_>, inode: &mut Inode, length: u64) -> Result<(), OpError> {
    add_to_counter(
        table,
        keys::BYTES,
        i128::from(length) - i128::from(inode.length),
    )?;
    inode.length = length;
    inode.max_length = inode.max_length.max(length);
    Ok(())
}

fn touch(inode: &mut Inode, now: i64) {
    inode.mtime_ns = now;
    inode.ctime_ns = now;
}

/// Creates the root directory if the namespace is empty.
pub fn init(table: &mut MetaTable<'_>) -> Result<(), OpError> {
    if get_inode(table, ROOT)?.is_some() {
        return Ok(());
    }
    let root = Inode {
        id: ROOT,
        kind: InodeKind::Directory as i32,
        mode: 0o755,
        nlink: 2,
        parent: ROOT,
        layout: Some(fs3_proto::meta::Layout {
            chunk_size: DEFAULT_CHUNK_SIZE,
            stripe: DEFAULT_STRIPE,
            table_id: DEFAULT_TABLE,
            chains: Vec::new(),
        }),
        ..Inode::default()
    };
    put_inode(table, &root)?;
    table.insert(keys::NEXT_INODE, (ROOT + 1).to_be_bytes().as_slice())?;
    add_to_counter(table, keys::FILES, 1)?;
    Ok(())
}

fn open_session(
    table: &mut MetaTable<'_>,
    ctx: Ctx<'_>,
    inode: &mut Inode,
    client: u64,
) -> Result<u64, OpError> {
    let session = ctx.index;
    table.insert(
        keys::session(inode.id, session).as_slice(),
        client.to_be_bytes().as_slice(),
    )?;
    inode.sessions += 1;
    Ok(session)
}

/// Truncates a file (length and times) for O_TRUNC or setattr.
fn truncate(
    table: &mut MetaTable<'_>,
    inode: &mut Inode,
    length: u64,
    now: i64,
) -> Result<(), OpError> {
    set_length(table, inode, length)?;
    touch(inode, now);
    Ok(())
}

/// create, mkdir, symlink; or, for an existing file without `exclusive`, open it.
pub fn create(
    table: &mut MetaTable<'_>,
    ctx: Ctx<'_>,
    op: CreateOp,
) -> Result<CommandResult, OpError> {
    let kind = InodeKind::try_from(op.kind)
        .ok()
        .filter(|k| *k != InodeKind::Unspecified)
        .ok_or_else(|| refuse(libc::EINVAL, format!("unknown inode kind {}", op.kind)))?;
    let mut parent = searchable_dir(table, op.parent, ctx.creds, 0)?;
    check_name(&op.name, libc::EEXIST)?;
    if let Some(existing) = get_entry(table, op.parent, &op.name)? {
        if op.exclusive || kind != InodeKind::File {
            return Err(refuse(
                libc::EEXIST,
                format!("{} exists", String::from_utf8_lossy(&op.name)),
            ));
        }
        let mut inode = need_inode(table, existing.inode)?;
        if is_dir(&inode) {
            return Err(refuse(libc::EISDIR, "is a directory"));
        }
        if !is_file(&inode) {
            return Err(refuse(libc::EEXIST, "exists and is not a regular file"));
        }
        return open_inode(
            table,
            ctx,
            &mut inode,
            op.session_client,
            op.truncate,
            false,
        );
    }
    if !perm::allowed(&parent, ctx.creds, WRITE | EXEC) {
        return Err(refuse(
            libc::EACCES,
            format!("no permission to create in directory {}", op.parent),
        ));
    }
    if kind == InodeKind::Symlink
        && (op.symlink_target.is_empty() || op.symlink_target.len() > PATH_MAX)
    {
        return Err(refuse(
            if op.symlink_target.is_empty() {
                libc::ENOENT
            } else {
                libc::ENAMETOOLONG
            },
            "a symlink target must be 1 to 4096 bytes",
        ));
    }
    let id = counter(table, keys::NEXT_INODE)?;
    let dir_layout = parent.layout.clone().unwrap_or_default();
    // Chosen before anything is written: a refusal must leave no trace.
    let layout = match kind {
        InodeKind::File => Some(file_layout(table, &dir_layout, id)?),
        InodeKind::Directory => Some(dir_layout),
        _ => None,
    };
    table.insert(keys::NEXT_INODE, (id + 1).to_be_bytes().as_slice())?;
    // New entries take the directory's group if it is set-group-id (directories keep the bit).
    let setgid_dir = parent.mode & SET_GID != 0;
    let gid = if setgid_dir {
        parent.gid
    } else {
        ctx.creds.gid
    };
    let mut mode = op.mode & 0o7777;
    if kind == InodeKind::Directory {
        // As Linux's mkdir: set-user-id and set-group-id are not taken from the mode; the
        // group bit comes from a set-group-id parent.
        mode &= !(SET_UID | SET_GID);
        if setgid_dir {
            mode |= SET_GID;
        }
    }
    if kind == InodeKind::File
        && mode & SET_GID != 0
        && ctx.creds.uid != 0
        && !perm::in_group(ctx.creds, gid)
    {
        mode &= !SET_GID;
    }
    if kind == InodeKind::Symlink {
        mode = 0o777;
    }
    let mut inode = Inode {
        id,
        kind: kind as i32,
        mode,
        uid: ctx.creds.uid,
        gid,
        nlink: if kind == InodeKind::Directory { 2 } else { 1 },
        length: if kind == InodeKind::Symlink {
            op.symlink_target.len() as u64
        } else {
            0
        },
        atime_ns: ctx.now,
        mtime_ns: ctx.now,
        ctime_ns: ctx.now,
        symlink_target: if kind == InodeKind::Symlink {
            op.symlink_target
        } else {
            Vec::new()
        },
        layout,
        parent: if kind == InodeKind::Directory {
            op.parent
        } else {
            0
        },
        sessions: 0,
        max_length: 0,
    };
    let mut session = 0;
    if kind == InodeKind::File && op.session_client != 0 {
        session = open_session(table, ctx, &mut inode, op.session_client)?;
    }
    if kind == InodeKind::Directory {
        parent.nlink += 1;
    }
    put_inode(table, &inode)?;
    put_entry(
        table,
        op.parent,
        &DirEntry {
            name: op.name,
            inode: id,
            kind: kind as i32,
        },
    )?;
    parent.length += 1;
    touch(&mut parent, ctx.now);
    put_inode(table, &parent)?;
    add_to_counter(table, keys::FILES, 1)?;
    Ok(CommandResult {
        inode: Some(inode),
        session,
        ..CommandResult::default()
    })
}

fn open_inode(
    table: &mut MetaTable<'_>,
    ctx: Ctx<'_>,
    inode: &mut Inode,
    client: u64,
    truncate_it: bool,
    already_permitted: bool,
) -> Result<CommandResult, OpError> {
    if !is_file(inode) {
        return Err(refuse(
            if is_dir(inode) {
                libc::EISDIR
            } else {
                libc::EINVAL
            },
            "only regular files are opened for writing",
        ));
    }
    if (client != 0 || truncate_it) && !already_permitted && !perm::allowed(inode, ctx.creds, WRITE)
    {
        return Err(refuse(
            libc::EACCES,
            format!("no permission to write inode {}", inode.id),
        ));
    }
    let old_length = inode.length;
    if truncate_it && inode.length != 0 {
        truncate(table, inode, 0, ctx.now)?;
    }
    let session = if client != 0 {
        if inode.nlink == 0 {
            // An unlinked file still open (a handle opened before the unlink starting its
            // session late): out of the garbage queue until its last session ends.
            table.remove(keys::garbage(inode.id).as_slice())?;
        }
        open_session(table, ctx, inode, client)?
    } else {
        0
    };
    put_inode(table, inode)?;
    Ok(CommandResult {
        inode: Some(inode.clone()),
        session,
        old_length,
        ..CommandResult::default()
    })
}

/// Opens a write session on an existing file.
pub fn open(table: &mut MetaTable<'_>, ctx: Ctx<'_>, op: OpenOp) -> Result<CommandResult, OpError> {
    let mut inode = need_inode(table, op.inode)?;
    if op.session_client == 0 && !op.truncate {
        return Err(refuse(
            libc::EINVAL,
            "open without a session or truncate does nothing",
        ));
    }
    open_inode(
        table,
        ctx,
        &mut inode,
        op.session_client,
        op.truncate,
        op.already_permitted,
    )
}

/// Drops one link to `inode` (already out of its directory); a file with no links left keeps
/// its data while sessions are open, then waits for garbage collection.
fn drop_link(table: &mut MetaTable<'_>, ctx: Ctx<'_>, mut inode: Inode) -> Result<(), OpError> {
    inode.nlink = inode.nlink.saturating_sub(1);
    inode.ctime_ns = ctx.now;
    if inode.nlink > 0 {
        return put_inode(table, &inode);
    }
    if is_file(&inode) {
        put_inode(table, &inode)?;
        if inode.sessions == 0 {
            queue_garbage(table, inode.id, ctx.now)?;
        }
        return Ok(());
    }
    table.remove(keys::inode(inode.id).as_slice())?;
    add_to_counter(table, keys::FILES, -1)?;
    Ok(())
}

fn queue_garbage(table: &mut MetaTable<'_>, inode: u64, now: i64) -> Result<(), OpError> {
    table.insert(
        keys::garbage(inode).as_slice(),
        now.to_be_bytes().as_slice(),
    )?;
    Ok(())
}

fn dir_is_empty(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    id: u64,
) -> Result<bool, OpError> {
    let prefix = keys::dentry_prefix(id);
    let end = keys::prefix_end(&prefix);
    Ok(table
        .range::<&[u8]>(prefix.as_slice()..end.as_slice())?
        .next()
        .is_none())
}

/// Removes entry `name` from `parent` whose inode is `child` (checks done by the caller).
fn unlink_entry(
    table: &mut MetaTable<'_>,
    ctx: Ctx<'_>,
    parent: &mut Inode,
    name: &[u8],
    child: Inode,
) -> Result<(), OpError> {
    table.remove(keys::dentry(parent.id, name).as_slice())?;
    parent.length = parent.length.saturating_sub(1);
    touch(parent, ctx.now);
    if is_dir(&child) {
        parent.nlink = parent.nlink.saturating_sub(1);
        table.remove(keys::inode(child.id).as_slice())?;
        add_to_counter(table, keys::FILES, -1)?;
        Ok(())
    } else {
        drop_link(table, ctx, child)
    }
}

/// Checks that `child` (entry of `dir`) may be removed or replaced by the caller as `victim`
/// of an unlink, rmdir or rename.
fn check_removable(
    dir: &Inode,
    child: &Inode,
    creds: &Credentials,
    want_dir: bool,
) -> Result<(), OpError> {
    if !perm::sticky_allows(dir, child, creds) {
        return Err(refuse(libc::EPERM, "the sticky bit protects this entry"));
    }
    if want_dir && !is_dir(child) {
        return Err(refuse(libc::ENOTDIR, "not a directory"));
    }
    if !want_dir && is_dir(child) {
        return Err(refuse(libc::EISDIR, "is a directory"));
    }
    if child.id == ROOT {
        return Err(refuse(libc::EBUSY, "the root cannot be removed"));
    }
    Ok(())
}

/// unlink, or rmdir with `directory`.
pub fn remove(
    table: &mut MetaTable<'_>,
    ctx: Ctx<'_>,
    op: &RemoveOp,
) -> Result<CommandResult, OpError> {
    // As Linux: search permission, then the name must exist, then write permission.
    let mut parent = searchable_dir(table, op.parent, ctx.creds, 0)?;
    match op.name.as_slice() {
        b"." if op.directory => return Err(refuse(libc::EINVAL, "cannot remove '.'")),
        b".." if op.directory => return Err(refuse(libc::ENOTEMPTY, "cannot remove '..'")),
        _ => check_name(
            &op.name,
            if op.directory {
                libc::EINVAL
            } else {
                libc::EISDIR
            },
        )?,
    }
    let entry = get_entry(table, op.parent, &op.name)?.ok_or_else(|| {
        refuse(
            libc::ENOENT,
            format!("no entry {}", String::from_utf8_lossy(&op.name)),
        )
    })?;
    let child = need_inode(table, entry.inode)?;
    require_write(&parent, ctx.creds)?;
    check_removable(&parent, &child, ctx.creds, op.directory)?;
    if op.directory && !dir_is_empty(table, child.id)? {
        return Err(refuse(libc::ENOTEMPTY, "directory not empty"));
    }
    unlink_entry(table, ctx, &mut parent, &op.name, child)?;
    put_inode(table, &parent)?;
    Ok(CommandResult::default())
}

/// Write permission on a directory whose entries change.
fn require_write(dir: &Inode, creds: &Credentials) -> Result<(), OpError> {
    if perm::allowed(dir, creds, WRITE) {
        Ok(())
    } else {
        Err(refuse(
            libc::EACCES,
            format!("no permission to change directory {}", dir.id),
        ))
    }
}

/// Whether `ancestor` is `dir` or one of its ancestors.
fn is_ancestor(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    ancestor: u64,
    mut dir: u64,
) -> Result<bool, OpError> {
    // Bounded: a loop in stored parent pointers would be corruption, not an infinite walk.
    for _ in 0..65_536 {
        if dir == ancestor {
            return Ok(true);
        }
        if dir == ROOT {
            return Ok(false);
        }
        dir = need_inode(table, dir)?.parent;
    }
    Err(corrupt(format!(
        "directory {dir} is over 65536 levels deep"
    )))
}

/// rename, with POSIX's replace rules and RENAME_NOREPLACE.
pub fn rename(
    table: &mut MetaTable<'_>,
    ctx: Ctx<'_>,
    op: RenameOp,
) -> Result<CommandResult, OpError> {
    let dots = |name: &[u8]| name == b"." || name == b"..";
    if dots(&op.name) || dots(&op.new_name) {
        return Err(refuse(libc::EBUSY, "cannot rename '.' or '..'"));
    }
    check_name(&op.name, libc::EBUSY)?;
    check_name(&op.new_name, libc::EBUSY)?;
    let mut src_dir = searchable_dir(table, op.parent, ctx.creds, 0)?;
    let mut dst_dir = searchable_dir(table, op.new_parent, ctx.creds, 0)?;
    let entry = get_entry(table, op.parent, &op.name)?.ok_or_else(|| {
        refuse(
            libc::ENOENT,
            format!("no entry {}", String::from_utf8_lossy(&op.name)),
        )
    })?;
    let mut moving = need_inode(table, entry.inode)?;
    require_write(&src_dir, ctx.creds)?;
    require_write(&dst_dir, ctx.creds)?;
    if !perm::sticky_allows(&src_dir, &moving, ctx.creds) {
        return Err(refuse(libc::EPERM, "the sticky bit protects this entry"));
    }
    let same_dir = op.parent == op.new_parent;
    if same_dir && op.name == op.new_name {
        if op.no_replace {
            return Err(refuse(libc::EEXIST, "the target exists"));
        }
        return Ok(CommandResult::default());
    }
    let moving_dir = is_dir(&moving);
    if moving_dir && !same_dir {
        if is_ancestor(table, moving.id, op.new_parent)? {
            return Err(refuse(libc::EINVAL, "cannot move a directory into itself"));
        }
        // Its '..' entry changes.
        if !perm::allowed(&moving, ctx.creds, WRITE) {
            return Err(refuse(libc::EACCES, "no permission to move this directory"));
        }
    }
    if let Some(existing) = get_entry(table, op.new_parent, &op.new_name)? {
        if op.no_replace {
            return Err(refuse(libc::EEXIST, "the target exists"));
        }
        if existing.inode == moving.id {
            // Two links to one file: POSIX says do nothing.
            return Ok(CommandResult::default());
        }
        let victim = need_inode(table, existing.inode)?;
        check_removable(&dst_dir, &victim, ctx.creds, moving_dir)?;
        if moving_dir && !dir_is_empty(table, victim.id)? {
            return Err(refuse(libc::ENOTEMPTY, "the target directory is not empty"));
        }
        if moving_dir && is_ancestor(table, victim.id, op.parent)? {
            return Err(refuse(libc::ENOTEMPTY, "the target contains the source"));
        }
        unlink_entry(table, ctx, &mut dst_dir, &op.new_name, victim)?;
        if same_dir {
            src_dir = dst_dir.clone();
        }
    }
    table.remove(keys::dentry(op.parent, &op.name).as_slice())?;
    src_dir.length = src_dir.length.saturating_sub(1);
    touch(&mut src_dir, ctx.now);
    if same_dir {
        dst_dir = src_dir.clone();
    }
    put_entry(
        table,
        op.new_parent,
        &DirEntry {
            name: op.new_name,
            inode: moving.id,
            kind: moving.kind,
        },
    )?;
    dst_dir.length += 1;
    touch(&mut dst_dir, ctx.now);
    if moving_dir && !same_dir {
        moving.parent = op.new_parent;
        src_dir.nlink = src_dir.nlink.saturating_sub(1);
        dst_dir.nlink += 1;
    }
    moving.ctime_ns = ctx.now;
    put_inode(table, &moving)?;
    if same_dir {
        put_inode(table, &dst_dir)?;
    } else {
        put_inode(table, &src_dir)?;
        put_inode(table, &dst_dir)?;
    }
    Ok(CommandResult {
        inode: Some(moving),
        ..CommandResult::default()
    })
}

/// A hard link.
pub fn link(table: &mut MetaTable<'_>, ctx: Ctx<'_>, op: LinkOp) -> Result<CommandResult, OpError> {
    let mut inode = need_inode(table, op.inode)?;
    if is_dir(&inode) {
        return Err(refuse(libc::EPERM, "directories cannot be hard-linked"));
    }
    let mut dir = searchable_dir(table, op.new_parent, ctx.creds, WRITE)?;
    check_name(&op.new_name, libc::EEXIST)?;
    if get_entry(table, op.new_parent, &op.new_name)?.is_some() {
        return Err(refuse(libc::EEXIST, "the target exists"));
    }
    if inode.nlink == 0 {
        return Err(refuse(libc::ENOENT, "the file was removed"));
    }
    inode.nlink = inode
        .nlink
        .checked_add(1)
        .ok_or_else(|| refuse(libc::EMLINK, "too many links"))?;
    inode.ctime_ns = ctx.now;
    put_entry(
        table,
        op.new_parent,
        &DirEntry {
            name: op.new_name,
            inode: inode.id,
            kind: inode.kind,
        },
    )?;
    put_inode(table, &inode)?;
    dir.length += 1;
    touch(&mut dir, ctx.now);
    put_inode(table, &dir)?;
    Ok(CommandResult {
        inode: Some(inode),
        ..CommandResult::default()
    })
}

/// chmod, chown, truncate, utimes.
pub fn set_attr(
    table: &mut MetaTable<'_>,
    ctx: Ctx<'_>,
    op: SetAttrOp,
) -> Result<CommandResult, OpError> {
    let mut inode = need_inode(table, op.inode)?;
    let creds = ctx.creds;
    let owner_or_root = creds.uid == 0 || creds.uid == inode.uid;
    let old_length = inode.length;
    // Every check comes before the first write: a refusal must leave no trace.
    let explicit = op.atime_ns.is_some() || op.mtime_ns.is_some();
    let to_now = op.atime_now || op.mtime_now;
    if explicit && !owner_or_root {
        return Err(refuse(libc::EPERM, "only the owner may set times"));
    }
    if to_now && !owner_or_root && !perm::allowed(&inode, creds, WRITE) {
        return Err(refuse(libc::EACCES, "no permission to touch"));
    }
    if let Some(mode) = op.mode {
        if !owner_or_root {
            return Err(refuse(libc::EPERM, "only the owner may change the mode"));
        }
        let mut mode = mode & 0o7777;
        if creds.uid != 0 && !is_dir(&inode) && !perm::in_group(creds, inode.gid) {
            mode &= !SET_GID;
        }
        inode.mode = mode;
    }
    if op.uid.is_some() || op.gid.is_some() {
        let new_uid = op.uid.unwrap_or(inode.uid);
        let new_gid = op.gid.unwrap_or(inode.gid);
        if creds.uid != 0 {
            if new_uid != inode.uid {
                return Err(refuse(libc::EPERM, "only root may change the owner"));
            }
            if new_gid != inode.gid && (creds.uid != inode.uid || !perm::in_group(creds, new_gid)) {
                return Err(refuse(
                    libc::EPERM,
                    "the owner may only choose one of their groups",
                ));
            }
        }
        if !is_dir(&inode) {
            // As Linux: chown clears set-user-id, and set-group-id when group-executable.
            inode.mode &= !SET_UID;
            if inode.mode & 0o010 != 0 {
                inode.mode &= !SET_GID;
            }
        }
        inode.uid = new_uid;
        inode.gid = new_gid;
    }
    if let Some(length) = op.length {
        if is_dir(&inode) {
            return Err(refuse(libc::EISDIR, "is a directory"));
        }
        if !is_file(&inode) {
            return Err(refuse(libc::EINVAL, "not a regular file"));
        }
        if length > MAX_FILE_SIZE {
            return Err(refuse(
                libc::EFBIG,
                format!("{length} bytes exceeds the largest file ({MAX_FILE_SIZE})"),
            ));
        }
        let by_session = op.session != 0
            && session_client(table, inode.id, op.session)? == Some(op.session_client);
        if !by_session && !perm::allowed(&inode, creds, WRITE) {
            return Err(refuse(libc::EACCES, "no permission to truncate"));
        }
        truncate(table, &mut inode, length, ctx.now)?;
    }
    if let Some(atime) = op.atime_ns {
        inode.atime_ns = atime;
    }
    if let Some(mtime) = op.mtime_ns {
        inode.mtime_ns = mtime;
    }
    if op.atime_now {
        inode.atime_ns = ctx.now;
    }
    if op.mtime_now {
        inode.mtime_ns = ctx.now;
    }
    inode.ctime_ns = ctx.now;
    put_inode(table, &inode)?;
    Ok(CommandResult {
        inode: Some(inode),
        old_length,
        ..CommandResult::default()
    })
}

/// Records a session's length; without `keep_open`, ends the session.
pub fn close(
    table: &mut MetaTable<'_>,
    ctx: Ctx<'_>,
    op: CloseOp,
) -> Result<CommandResult, OpError> {
    let mut inode = need_inode(table, op.inode)?;
    if !is_file(&inode) {
        return Err(refuse(libc::EINVAL, "not a regular file"));
    }
    // The session id with its client is the capability: ids are log indices, easy to guess;
    // client ids are random.
    if session_client(table, inode.id, op.session)? != Some(op.client) {
        return Err(refuse(
            libc::EBADF,
            format!(
                "no session {} of this client on inode {}",
                op.session, inode.id
            ),
        ));
    }
    if op.length > MAX_FILE_SIZE {
        return Err(refuse(libc::EFBIG, "length exceeds the largest file"));
    }
    if op.wrote {
        if op.length > inode.length {
            set_length(table, &mut inode, op.length)?;
        }
        touch(&mut inode, ctx.now);
    }
    if !op.keep_open {
        table.remove(keys::session(inode.id, op.session).as_slice())?;
        end_session(table, ctx.now, &mut inode)?;
    }
    put_inode(table, &inode)?;
    Ok(CommandResult {
        inode: Some(inode),
        ..CommandResult::default()
    })
}

/// The client holding session `session` of `inode`, if it is open.
fn session_client(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    inode: u64,
    session: u64,
) -> Result<Option<u64>, OpError> {
    match table.get(keys::session(inode, session).as_slice())? {
        Some(value) => {
            let raw: [u8; 8] = value
                .value()
                .try_into()
                .map_err(|_| corrupt("session record is not 8 bytes".to_string()))?;
            Ok(Some(u64::from_be_bytes(raw)))
        }
        None => Ok(None),
    }
}

fn end_session(table: &mut MetaTable<'_>, now: i64, inode: &mut Inode) -> Result<(), OpError> {
    inode.sessions = inode.sessions.saturating_sub(1);
    if inode.sessions == 0 && inode.nlink == 0 {
        queue_garbage(table, inode.id, now)?;
    }
    Ok(())
}

/// Ends every session of `client` (it stopped sending keep-alives).
pub fn prune_sessions(
    table: &mut MetaTable<'_>,
    ctx: Ctx<'_>,
    client: u64,
) -> Result<u64, OpError> {
    let end = keys::prefix_end(keys::SESSION_PREFIX);
    let mut doomed = Vec::new();
    for item in table.range::<&[u8]>(keys::SESSION_PREFIX..end.as_slice())? {
        let (key, value) = item?;
        if value.value() == client.to_be_bytes() {
            doomed.push(key.value().to_vec());
        }
    }
    for key in &doomed {
        table.remove(key.as_slice())?;
        let id = keys::id_in(key).ok_or_else(|| corrupt("short session key".to_string()))?;
        if let Some(mut inode) = get_inode(table, id)? {
            end_session(table, ctx.now, &mut inode)?;
            put_inode(table, &inode)?;
        }
    }
    Ok(doomed.len() as u64)
}

/// Forgets an unlinked file whose chunks are gone.
pub fn purge(table: &mut MetaTable<'_>, id: u64) -> Result<CommandResult, OpError> {
    let Some(mut inode) = get_inode(table, id)? else {
        table.remove(keys::garbage(id).as_slice())?;
        return Ok(CommandResult::default());
    };
    if inode.nlink != 0 || inode.sessions != 0 {
        return Err(refuse(libc::EBUSY, format!("inode {id} is still in use")));
    }
    // Nobody can open it once this commits, so removing its chunks afterwards is safe; the
    // record of their extent stays until they are gone.
    let extent = inode.clone();
    set_length(table, &mut inode, 0)?;
    table.remove(keys::inode(id).as_slice())?;
    table.remove(keys::garbage(id).as_slice())?;
    table.insert(
        keys::purged(id).as_slice(),
        extent.encode_to_vec().as_slice(),
    )?;
    add_to_counter(table, keys::FILES, -1)?;
    Ok(CommandResult::default())
}

/// Drops a purged file's record once its chunks are removed from storage.
pub fn forget(table: &mut MetaTable<'_>, id: u64) -> Result<CommandResult, OpError> {
    table.remove(keys::purged(id).as_slice())?;
    Ok(CommandResult::default())
}

/// Sets a directory's layout (for files created in it from now on), or an empty file's.
pub fn set_layout(
    table: &mut MetaTable<'_>,
    ctx: Ctx<'_>,
    op: SetLayoutOp,
) -> Result<CommandResult, OpError> {
    let mut inode = need_inode(table, op.inode)?;
    let layout = op.layout.unwrap_or_default();
    check_layout(table, &layout)?;
    if ctx.creds.uid != 0 && ctx.creds.uid != inode.uid {
        return Err(refuse(libc::EPERM, "only the owner may change the layout"));
    }
    if is_dir(&inode) {
        inode.layout = Some(fs3_proto::meta::Layout {
            chains: Vec::new(),
            ..layout
        });
    } else if is_file(&inode) {
        if inode.max_length != 0 || inode.sessions != 0 {
            return Err(refuse(
                libc::EBUSY,
                "a file's layout can only change while it is empty and nobody writes it",
            ));
        }
        inode.layout = Some(file_layout(table, &layout, inode.id)?);
    } else {
        return Err(refuse(libc::EINVAL, "symlinks have no layout"));
    }
    inode.ctime_ns = ctx.now;
    put_inode(table, &inode)?;
    Ok(CommandResult {
        inode: Some(inode),
        ..CommandResult::default()
    })
}

/// Records a chain table's chains. The first one also dates the root directory: `init` runs
/// on every replica without a clock, and this is the first command every namespace sees.
pub fn set_chain_table(
    table: &mut MetaTable<'_>,
    ctx: Ctx<'_>,
    op: &SetChainTableOp,
) -> Result<CommandResult, OpError> {
    if op.table_id == 0 || op.chains.is_empty() {
        return Err(refuse(libc::EINVAL, "a chain table needs an id and chains"));
    }
    table.insert(
        keys::chain_table(op.table_id).as_slice(),
        op.encode_to_vec().as_slice(),
    )?;
    if let Some(mut root) = get_inode(table, ROOT)?
        && root.ctime_ns == 0
    {
        root.atime_ns = ctx.now;
        root.mtime_ns = ctx.now;
        root.ctime_ns = ctx.now;
        put_inode(table, &root)?;
    }
    Ok(CommandResult::default())
}
