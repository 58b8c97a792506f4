//! POSIX permission checks on an inode's owner, group and mode, as the kernel makes them:
//! root may read and write anything and execute anything that has an execute bit (or is a
//! directory); everyone else gets the owner's, the group's or the others' bits, in that order.

use fs3_proto::meta::{Credentials, Inode, InodeKind};

/// Read permission.
pub const READ: u32 = 4;
/// Write permission.
pub const WRITE: u32 = 2;
/// Execute (search, for directories) permission.
pub const EXEC: u32 = 1;

/// The set-user-id bit.
pub const SET_UID: u32 = 0o4000;
/// The set-group-id bit.
pub const SET_GID: u32 = 0o2000;
/// The sticky bit.
pub const STICKY: u32 = 0o1000;

/// Whether `creds` belong to group `gid`.
pub fn in_group(creds: &Credentials, gid: u32) -> bool {
    creds.gid == gid || creds.groups.contains(&gid)
}

/// Whether `creds` may access `inode` for every right in `want` (a mix of READ, WRITE, EXEC).
pub fn allowed(inode: &Inode, creds: &Credentials, want: u32) -> bool {
    if creds.uid == 0 {
        let exec_ok = want & EXEC == 0
            || inode.kind == InodeKind::Directory as i32
            || inode.mode & 0o111 != 0;
        return exec_ok;
    }
    let bits = if creds.uid == inode.uid {
        inode.mode >> 6
    } else if in_group(creds, inode.gid) {
        inode.mode >> 3
    } else {
        inode.mode
    } & 0o7;
    bits & want == want
}

/// Whether `creds` may remove or rename `child` out of directory `dir` as far as the sticky
/// bit goes: in a sticky directory only the owner of the entry, of the directory, or root.
pub fn sticky_allows(dir: &Inode, child: &Inode, creds: &Credentials) -> bool {
    dir.mode & STICKY == 0 || creds.uid == 0 || creds.uid == dir.uid || creds.uid == child.uid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode(mode: u32, uid: u32, gid: u32, kind: InodeKind) -> Inode {
        Inode {
            mode,
            uid,
            gid,
            kind: kind as i32,
            ..Inode::default()
        }
    }

    fn who(uid: u32, gid: u32, groups: &[u32]) -> Credentials {
        Credentials {
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn owner_group_other_in_that_order() {
        let file = inode(0o640, 10, 20, InodeKind::File);
        assert!(allowed(&file, &who(10, 0, &[]), READ | WRITE));
        assert!(!allowed(&file, &who(10, 0, &[]), EXEC));
        assert!(allowed(&file, &who(11, 20, &[]), READ));
        assert!(!allowed(&file, &who(11, 20, &[]), WRITE));
        assert!(allowed(&file, &who(11, 5, &[20]), READ));
        assert!(!allowed(&file, &who(11, 5, &[]), READ));
        // The owner's bits apply to the owner even when the group's would allow more.
        let odd = inode(0o070, 10, 20, InodeKind::File);
        assert!(!allowed(&odd, &who(10, 20, &[]), READ));
    }

    #[test]
    fn root_bypasses_all_but_execute() {
        let file = inode(0o000, 10, 20, InodeKind::File);
        assert!(allowed(&file, &who(0, 0, &[]), READ | WRITE));
        assert!(!allowed(&file, &who(0, 0, &[]), EXEC));
        assert!(allowed(
            &inode(0o001, 10, 20, InodeKind::File),
            &who(0, 0, &[]),
            EXEC
        ));
        assert!(allowed(
            &inode(0o000, 10, 20, InodeKind::Directory),
            &who(0, 0, &[]),
            EXEC
        ));
    }

    #[test]
    fn sticky_directories_protect_other_users_entries() {
        let tmp = inode(0o1777, 0, 0, InodeKind::Directory);
        let theirs = inode(0o644, 10, 10, InodeKind::File);
        assert!(!sticky_allows(&tmp, &theirs, &who(11, 11, &[])));
        assert!(sticky_allows(&tmp, &theirs, &who(10, 10, &[])));
        assert!(sticky_allows(&tmp, &theirs, &who(0, 0, &[])));
        let open = inode(0o777, 0, 0, InodeKind::Directory);
        assert!(sticky_allows(&open, &theirs, &who(11, 11, &[])));
    }
}
