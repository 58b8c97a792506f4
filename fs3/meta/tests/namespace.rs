//! The namespace state machine on a real redb file: POSIX rules, permissions, refusals that
//! leave no trace, sessions and garbage, paging, snapshots.

// Tests may panic on anything unexpected; that is how they fail.
#![allow(clippy::unwrap_used)]

use ff_raft::redb::{Database, ReadableDatabase as _};
use ff_raft::{ApplyContext, StateMachine};
use fs3_meta::machine::MetaMachine;
use fs3_meta::namespace::ROOT;
use fs3_proto::meta::{
    CloseOp, Command, CommandResult, CreateOp, Credentials, GcQuery, InodeKind, LinkOp, Query,
    QueryResult, ReadDirQuery, RemoveOp, RenameOp, SetAttrOp, SetChainTableOp, TotalsQuery,
    command, query,
};

struct Ns {
    db: Database,
    index: u64,
    _dir: tempfile::TempDir,
}

fn root() -> Credentials {
    Credentials::default()
}

fn user(uid: u32) -> Credentials {
    Credentials {
        uid,
        gid: uid,
        groups: Vec::new(),
    }
}

impl Ns {
    fn new() -> Ns {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("meta.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        MetaMachine.init(&txn).unwrap();
        txn.commit().unwrap();
        let mut ns = Ns {
            db,
            index: 0,
            _dir: dir,
        };
        ns.ok(
            root(),
            command::Op::SetChainTable(SetChainTableOp {
                table_id: 1,
                chains: vec![1, 2, 3, 4],
            }),
        );
        ns
    }

    fn run(&mut self, creds: Credentials, op: command::Op) -> CommandResult {
        self.index += 1;
        let txn = self.db.begin_write().unwrap();
        let result = MetaMachine
            .apply(
                &txn,
                ApplyContext {
                    index: self.index,
                    term: 1,
                },
                Command {
                    creds: Some(creds),
                    now_ns: self.index as i64 * 1000,
                    op: Some(op),
                },
            )
            .unwrap();
        txn.commit().unwrap();
        result
    }

    fn ok(&mut self, creds: Credentials, op: command::Op) -> CommandResult {
        let result = self.run(creds, op);
        assert_eq!(result.errno, 0, "{}", result.message);
        result
    }

    fn errno(&mut self, creds: Credentials, op: command::Op) -> i32 {
        self.run(creds, op).errno
    }

    fn query(&self, creds: Credentials, op: query::Op) -> QueryResult {
        let txn = self.db.begin_read().unwrap();
        MetaMachine
            .query(
                &txn,
                Query {
                    creds: Some(creds),
                    op: Some(op),
                },
            )
            .unwrap()
    }

    fn lookup(&self, parent: u64, name: &str) -> Result<fs3_proto::meta::Inode, i32> {
        let result = self.query(
            root(),
            query::Op::Lookup(fs3_proto::meta::LookupQuery {
                parent,
                name: name.as_bytes().to_vec(),
            }),
        );
        match result.errno {
            0 => Ok(result.inode.unwrap()),
            errno => Err(errno),
        }
    }

    fn create(
        &mut self,
        creds: Credentials,
        parent: u64,
        name: &str,
        kind: InodeKind,
        mode: u32,
    ) -> u64 {
        self.ok(creds, create_op(parent, name, kind, mode))
            .inode
            .unwrap()
            .id
    }

    fn totals(&self) -> (u64, u64) {
        let t = self.query(root(), query::Op::Totals(TotalsQuery {}));
        (t.files, t.bytes)
    }
}

fn create_op(parent: u64, name: &str, kind: InodeKind, mode: u32) -> command::Op {
    command::Op::Create(CreateOp {
        parent,
        name: name.as_bytes().to_vec(),
        kind: kind as i32,
        mode,
        exclusive: true,
        ..CreateOp::default()
    })
}

fn remove_op(parent: u64, name: &str, directory: bool) -> command::Op {
    command::Op::Remove(RemoveOp {
        parent,
        name: name.as_bytes().to_vec(),
        directory,
    })
}

fn rename_op(parent: u64, name: &str, new_parent: u64, new_name: &str) -> command::Op {
    command::Op::Rename(RenameOp {
        parent,
        name: name.as_bytes().to_vec(),
        new_parent,
        new_name: new_name.as_bytes().to_vec(),
        no_replace: false,
    })
}

#[test]
fn directories_files_and_links_follow_posix() {
    let mut ns = Ns::new();
    let dir = ns.create(root(), ROOT, "d", InodeKind::Directory, 0o755);
    let file = ns.create(root(), dir, "f", InodeKind::File, 0o644);
    assert_eq!(ns.lookup(ROOT, "d").unwrap().nlink, 2);
    assert_eq!(ns.lookup(ROOT, ".").unwrap().nlink, 3);
    let f = ns.lookup(dir, "f").unwrap();
    assert_eq!((f.id, f.nlink), (file, 1));
    let layout = f.layout.unwrap();
    assert_eq!(layout.chains.len(), 4);
    assert_eq!(layout.chunk_size, 1 << 20);
    // Errors as ext4 gives them.
    assert_eq!(
        ns.errno(root(), create_op(dir, "f", InodeKind::File, 0o644)),
        libc::EEXIST
    );
    assert_eq!(
        ns.errno(root(), create_op(file, "x", InodeKind::File, 0o644)),
        libc::ENOTDIR
    );
    assert_eq!(
        ns.errno(root(), remove_op(ROOT, "d", true)),
        libc::ENOTEMPTY
    );
    assert_eq!(ns.errno(root(), remove_op(ROOT, "d", false)), libc::EISDIR);
    assert_eq!(ns.errno(root(), remove_op(dir, "f", true)), libc::ENOTDIR);
    assert_eq!(
        ns.errno(root(), remove_op(dir, "nope", false)),
        libc::ENOENT
    );
    let long = "x".repeat(256);
    assert_eq!(
        ns.errno(root(), create_op(dir, &long, InodeKind::File, 0o644)),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        ns.errno(root(), create_op(dir, "a/b", InodeKind::File, 0o644)),
        libc::EINVAL
    );
    assert_eq!(
        ns.errno(root(), create_op(dir, "a\0b", InodeKind::File, 0o644)),
        libc::EINVAL
    );
    // Hard links share the inode; directories cannot be linked.
    ns.ok(
        root(),
        command::Op::Link(LinkOp {
            inode: file,
            new_parent: ROOT,
            new_name: b"g".to_vec(),
        }),
    );
    assert_eq!(ns.lookup(ROOT, "g").unwrap().nlink, 2);
    assert_eq!(
        ns.errno(
            root(),
            command::Op::Link(LinkOp {
                inode: dir,
                new_parent: ROOT,
                new_name: b"dd".to_vec(),
            })
        ),
        libc::EPERM
    );
    // Renaming one link over the other does nothing (POSIX).
    ns.ok(root(), rename_op(ROOT, "g", dir, "f"));
    assert!(ns.lookup(ROOT, "g").is_ok());
    // A directory cannot move into itself; a non-empty directory cannot be replaced.
    let sub = ns.create(root(), dir, "sub", InodeKind::Directory, 0o755);
    assert_eq!(
        ns.errno(root(), rename_op(ROOT, "d", sub, "x")),
        libc::EINVAL
    );
    ns.create(root(), ROOT, "e", InodeKind::Directory, 0o755);
    assert_eq!(
        ns.errno(root(), rename_op(ROOT, "e", ROOT, "d")),
        libc::ENOTEMPTY
    );
    assert_eq!(
        ns.errno(root(), rename_op(ROOT, "g", ROOT, "e")),
        libc::EISDIR
    );
    assert_eq!(
        ns.errno(root(), rename_op(ROOT, "e", ROOT, "g")),
        libc::ENOTDIR
    );
    // Moving a directory updates '..' and the link counts.
    ns.ok(root(), rename_op(dir, "sub", ROOT, "moved"));
    assert_eq!(ns.lookup(ROOT, "moved").unwrap().parent, ROOT);
    assert_eq!(ns.lookup(ROOT, "d").unwrap().nlink, 2);
    assert_eq!(ns.lookup(ROOT, ".").unwrap().nlink, 5);
    // Symlinks keep their target.
    let link = ns.ok(
        root(),
        command::Op::Create(CreateOp {
            parent: ROOT,
            name: b"s".to_vec(),
            kind: InodeKind::Symlink as i32,
            symlink_target: b"d/f".to_vec(),
            exclusive: true,
            ..CreateOp::default()
        }),
    );
    assert_eq!(link.inode.unwrap().symlink_target, b"d/f");
}

#[test]
fn refusals_leave_no_trace() {
    let mut ns = Ns::new();
    let before = ns.totals();
    // No chain table 9: the create is refused after the inode id would have been taken.
    let dir = ns.create(root(), ROOT, "d", InodeKind::Directory, 0o755);
    ns.ok(
        root(),
        command::Op::SetLayout(fs3_proto::meta::SetLayoutOp {
            inode: dir,
            layout: Some(fs3_proto::meta::Layout {
                chunk_size: 1 << 20,
                stripe: 2,
                table_id: 1,
                chains: vec![],
            }),
        }),
    );
    let next = ns.create(root(), ROOT, "probe1", InodeKind::File, 0o644);
    assert_eq!(
        ns.errno(user(5), create_op(ROOT, "nope", InodeKind::File, 0o644)),
        libc::EACCES
    );
    let after = ns.create(root(), ROOT, "probe2", InodeKind::File, 0o644);
    assert_eq!(after, next + 1, "a refused create takes no inode id");
    assert_eq!(ns.totals().0, before.0 + 3);
    // A refused setattr (times by a stranger) leaves the length alone.
    assert_eq!(
        ns.errno(
            user(7),
            command::Op::SetAttr(SetAttrOp {
                inode: after,
                length: Some(10),
                mtime_ns: Some(1),
                ..SetAttrOp::default()
            })
        ),
        libc::EPERM
    );
    assert_eq!(ns.lookup(ROOT, "probe2").unwrap().length, 0);
    assert_eq!(ns.totals().1, 0);
}

#[test]
fn permissions_and_the_sticky_bit() {
    let mut ns = Ns::new();
    let tmp = ns.create(root(), ROOT, "tmp", InodeKind::Directory, 0o1777);
    let private = ns.create(root(), ROOT, "private", InodeKind::Directory, 0o700);
    assert_eq!(
        ns.errno(user(10), create_op(private, "x", InodeKind::File, 0o644)),
        libc::EACCES
    );
    assert_eq!(
        ns.errno(user(10), create_op(ROOT, "x", InodeKind::File, 0o644)),
        libc::EACCES
    );
    let mine = ns.create(user(10), tmp, "mine", InodeKind::File, 0o600);
    assert_eq!(ns.lookup(tmp, "mine").unwrap().uid, 10);
    // Someone else may not remove or rename it in a sticky directory; its owner and root may.
    assert_eq!(
        ns.errno(user(11), remove_op(tmp, "mine", false)),
        libc::EPERM
    );
    assert_eq!(
        ns.errno(user(11), rename_op(tmp, "mine", tmp, "theirs")),
        libc::EPERM
    );
    // Only the owner changes the mode; only root the owner.
    let chmod = |mode| {
        command::Op::SetAttr(SetAttrOp {
            inode: mine,
            mode: Some(mode),
            ..SetAttrOp::default()
        })
    };
    assert_eq!(ns.errno(user(11), chmod(0o777)), libc::EPERM);
    ns.ok(user(10), chmod(0o640));
    let chown = command::Op::SetAttr(SetAttrOp {
        inode: mine,
        uid: Some(11),
        ..SetAttrOp::default()
    });
    assert_eq!(ns.errno(user(10), chown.clone()), libc::EPERM);
    ns.ok(root(), chown);
    ns.ok(user(11), remove_op(tmp, "mine", false));
}

#[test]
fn a_trusted_opener_may_vouch_for_the_write_permission() {
    let mut ns = Ns::new();
    let file = ns.create(root(), ROOT, "x", InodeKind::File, 0o444);
    let open = |already_permitted| {
        command::Op::Open(fs3_proto::meta::OpenOp {
            inode: file,
            session_client: 5,
            truncate: false,
            already_permitted,
        })
    };
    assert_eq!(ns.errno(user(10), open(false)), libc::EACCES);
    let opened = ns.ok(user(10), open(true));
    assert_ne!(opened.session, 0);
    assert_eq!(opened.inode.unwrap().sessions, 1);
}

#[test]
fn unlinked_files_wait_for_their_sessions_then_for_collection() {
    let mut ns = Ns::new();
    let created = ns.ok(
        root(),
        command::Op::Create(CreateOp {
            parent: ROOT,
            name: b"f".to_vec(),
            kind: InodeKind::File as i32,
            mode: 0o644,
            exclusive: true,
            session_client: 77,
            ..CreateOp::default()
        }),
    );
    let inode = created.inode.unwrap().id;
    let close = |session, client, length, wrote, keep_open| {
        command::Op::Close(CloseOp {
            inode,
            session,
            length,
            keep_open,
            wrote,
            client,
        })
    };
    // A session is used only with its client's id (ids are guessable log indices).
    assert_eq!(
        ns.errno(root(), close(created.session, 78, 9000, true, true)),
        libc::EBADF
    );
    ns.ok(root(), close(created.session, 77, 5000, true, true));
    assert_eq!(ns.totals().1, 5000);
    // A report with nothing new written does not extend the file (it would undo a truncate).
    ns.ok(root(), close(created.session, 77, 8000, false, true));
    assert_eq!(ns.totals().1, 5000);
    ns.ok(root(), remove_op(ROOT, "f", false));
    let gc = |ns: &Ns, purged| {
        ns.query(
            root(),
            query::Op::Gc(GcQuery {
                before_ns: i64::MAX,
                limit: 10,
                purged,
            }),
        )
        .inodes
        .len()
    };
    assert_eq!(gc(&ns, false), 0, "open sessions keep an unlinked file");
    ns.ok(
        root(),
        command::Op::PruneSessions(fs3_proto::meta::PruneSessionsOp { client: 77 }),
    );
    assert_eq!(gc(&ns, false), 1);
    // A handle opened before the unlink starts its session late: the file leaves the queue.
    let reopened = ns.ok(
        root(),
        command::Op::Open(fs3_proto::meta::OpenOp {
            inode,
            session_client: 79,
            truncate: false,
            already_permitted: true,
        }),
    );
    assert_eq!(gc(&ns, false), 0, "a reopened unlinked file is not garbage");
    assert_eq!(
        ns.errno(
            root(),
            command::Op::Purge(fs3_proto::meta::PurgeOp { inode })
        ),
        libc::EBUSY
    );
    ns.ok(root(), close(reopened.session, 79, 0, false, false));
    assert_eq!(gc(&ns, false), 1);
    ns.ok(
        root(),
        command::Op::Purge(fs3_proto::meta::PurgeOp { inode }),
    );
    assert_eq!(
        (gc(&ns, false), gc(&ns, true)),
        (0, 1),
        "purged, chunks still to remove"
    );
    assert!(ns.lookup(ROOT, "f").is_err());
    ns.ok(
        root(),
        command::Op::Forget(fs3_proto::meta::ForgetOp { inode }),
    );
    assert_eq!(gc(&ns, true), 0);
    assert_eq!(ns.totals(), (1, 0));
}

#[test]
fn directories_are_read_in_stable_pages_and_snapshots_restore() {
    let mut ns = Ns::new();
    for i in 0..25 {
        ns.create(root(), ROOT, &format!("f{i:02}"), InodeKind::File, 0o644);
    }
    let mut names = Vec::new();
    let mut after = Vec::new();
    loop {
        let page = ns.query(
            root(),
            query::Op::ReadDir(ReadDirQuery {
                inode: ROOT,
                after: after.clone(),
                limit: 10,
            }),
        );
        names.extend(
            page.entries
                .iter()
                .map(|e| String::from_utf8(e.name.clone()).unwrap()),
        );
        after = page.entries.last().unwrap().name.clone();
        if !page.more {
            break;
        }
        if names.len() == 10 {
            // Entries removed between pages, before and after the cookie, do not disturb it.
            ns.ok(root(), remove_op(ROOT, "f00", false));
            ns.ok(root(), remove_op(ROOT, "f12", false));
        }
    }
    let expected: Vec<String> = (0..25)
        .filter(|i| *i != 12)
        .map(|i| format!("f{i:02}"))
        .collect();
    assert_eq!(names, expected);

    let mut snapshot = Vec::new();
    let txn = ns.db.begin_read().unwrap();
    MetaMachine.snapshot(&txn, &mut snapshot).unwrap();
    let other = Ns::new();
    let txn = other.db.begin_write().unwrap();
    MetaMachine.restore(&txn, &mut snapshot.as_slice()).unwrap();
    txn.commit().unwrap();
    assert!(other.lookup(ROOT, "f24").is_ok());
    assert_eq!(other.totals(), ns.totals());
    // A damaged snapshot is refused.
    let txn = other.db.begin_write().unwrap();
    assert!(
        MetaMachine
            .restore(&txn, &mut &snapshot[..snapshot.len() - 3])
            .is_err()
    );
}
