//! How the namespace is laid out in the meta group's one redb table, after 3FS: every record
//! has a four-byte kind prefix, integers are big-endian so that keys sort numerically, and a
//! directory's entries (`DENT` + parent + name) are contiguous, so reading a directory is a
//! range scan.

/// `INOD` + inode id -> `Inode`.
pub fn inode(id: u64) -> Vec<u8> {
    with_id(b"INOD", id)
}

/// `DENT` + parent + name -> `DirEntry`.
pub fn dentry(parent: u64, name: &[u8]) -> Vec<u8> {
    let mut key = with_id(b"DENT", parent);
    key.extend_from_slice(name);
    key
}

/// The prefix every entry of directory `parent` starts with.
pub fn dentry_prefix(parent: u64) -> Vec<u8> {
    with_id(b"DENT", parent)
}

/// `SESS` + inode + session id -> client id (u64 BE).
pub fn session(inode: u64, session: u64) -> Vec<u8> {
    let mut key = with_id(b"SESS", inode);
    key.extend_from_slice(&session.to_be_bytes());
    key
}

/// The prefix of every session record.
pub const SESSION_PREFIX: &[u8] = b"SESS";

/// `GCQ_` + inode -> unlink time (i64 BE): unlinked files whose chunks may go.
pub fn garbage(inode: u64) -> Vec<u8> {
    with_id(b"GCQ_", inode)
}

/// The prefix of every garbage record.
pub const GARBAGE_PREFIX: &[u8] = b"GCQ_";

/// `DEAD` + inode -> the purged file's last `Inode` (its chunks' extent), until they are
/// removed from storage.
pub fn purged(inode: u64) -> Vec<u8> {
    with_id(b"DEAD", inode)
}

/// The prefix of every purged-file record.
pub const PURGED_PREFIX: &[u8] = b"DEAD";

/// `USER` + SHA-256 of the token -> `UserRecord`.
pub fn user(token_sha256: &[u8]) -> Vec<u8> {
    let mut key = b"USER".to_vec();
    key.extend_from_slice(token_sha256);
    key
}

/// The prefix of every user record.
pub const USER_PREFIX: &[u8] = b"USER";

/// `TABL` + table id -> `SetChainTableOp` (the table's chains).
pub fn chain_table(id: u64) -> Vec<u8> {
    with_id(b"TABL", id)
}

/// The next inode id to hand out (u64 BE).
pub const NEXT_INODE: &[u8] = b"CNTRnext_inode";
/// How many files, directories and symlinks exist (u64 BE).
pub const FILES: &[u8] = b"CNTRfiles";
/// The sum of file lengths (u64 BE).
pub const BYTES: &[u8] = b"CNTRbytes";

/// The id in a key made by [`with_id`]-style helpers (prefix, then 8 bytes).
pub fn id_in(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(4..12)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// The session id in a key made by [`session`].
pub fn session_id_in(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(12..20)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

fn with_id(prefix: &[u8; 4], id: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(12);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The key right after every key starting with `prefix` (the end of a prefix range scan).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    // Only reachable for an all-0xFF prefix, which no record kind uses.
    vec![u8::MAX; prefix.len() + 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_a_directory_are_one_range() {
        let a = dentry(7, b"a");
        let z = dentry(7, b"zzz");
        let next_dir = dentry(8, b"");
        let prefix = dentry_prefix(7);
        let end = prefix_end(&prefix);
        assert!(prefix <= a && a < z && z < end && end <= next_dir);
        assert_eq!(id_in(&a), Some(7));
        assert_eq!(session_id_in(&session(3, 9)), Some(9));
        assert_eq!(id_in(&session(3, 9)), Some(3));
        assert_eq!(prefix_end(&[1, 0xFF]), vec![2]);
    }
}
