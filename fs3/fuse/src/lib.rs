//! fs3-fuse: fs3 as a FUSE file system over the native client (fuser, pure-Rust mount).
//!
//! Every kernel request is answered on the tokio runtime, so many are in flight at once
//! whatever fuser's thread count. Inode numbers are meta's inode ids (no translation table to
//! keep or lose). The kernel checks permissions itself (`default_permissions`) from the
//! attributes served here, and meta checks them again from the caller's uid, gid and
//! supplementary groups (read from `/proc`), so the native client and the mount agree.
//!
//! Consistency is close-to-open, as NFS: attributes and entries are cached by the kernel for
//! the configured timeout; a writer's length reaches meta when it closes or fsyncs the file,
//! and until then this mount serves the length it has written itself.

mod metrics;
mod writeback;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fs3_client::{Fs3, FsError, WriteSession};
use fs3_proto::meta::{Credentials, Inode, InodeKind, SetAttrOp};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;

use crate::writeback::InodeWrites;
pub use metrics::FuseMetrics;

/// The block size `stat` reports for files: tools like `cp` size their I/O by it.
const FILE_BLOCK_SIZE: u32 = 1 << 20;

/// How the mount behaves.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// How long the kernel caches attributes and entries.
    pub cache_timeout: Duration,
    /// Let users other than the mounter use the mount (`allow_other`).
    pub allow_other: bool,
    /// Read-only mount.
    pub read_only: bool,
    /// fuser threads reading requests from the kernel.
    pub threads: usize,
    /// Largest write the kernel sends in one request.
    pub max_write: u32,
    /// Most bytes the kernel reads ahead.
    pub max_readahead: u32,
    /// Mount over a non-empty directory.
    pub nonempty: bool,
    /// Most bytes of answered but unfinished writes (write-behind) in the whole mount.
    pub write_behind: u64,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            cache_timeout: Duration::from_secs(1),
            allow_other: false,
            read_only: false,
            threads: 4,
            max_write: 1 << 20,
            max_readahead: 4 << 20,
            nonempty: false,
            write_behind: 64 << 20,
        }
    }
}

/// Why a mount did not happen.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mountpoint is unusable; the message says why and what to do.
    #[error("{0}")]
    Mountpoint(String),
    /// The kernel refused the mount.
    #[error("mounting {path}: {cause}")]
    Mount {
        /// The mountpoint.
        path: String,
        /// What the kernel said.
        cause: std::io::Error,
    },
}

/// Whether `path` is the mountpoint of a mount (from `/proc/self/mountinfo`).
fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.as_os_str().as_bytes();
    info.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|point| unescape_mount_path(point) == wanted)
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` (three octal digits).
fn unescape_mount_path(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if let Some(&[b'\\', a, b, c]) = bytes.get(i..i + 4)
            && [a, b, c].iter().all(|d| (b'0'..=b'7').contains(d))
        {
            out.push(((a - b'0') << 6) | ((b - b'0') << 3) | (c - b'0'));
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Checks that `path` can take a mount, with a one-line explanation when it cannot.
pub fn check_mountpoint(path: &Path, nonempty: bool) -> Result<std::path::PathBuf, MountError> {
    let shown = path.display();
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(MountError::Mountpoint(format!(
                "{shown} is a stale mount (its FUSE daemon is gone); run `umount -l {shown}` and mount again"
            )));
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(MountError::Mountpoint(format!(
                "{shown} does not exist; create it with `mkdir -p {shown}`"
            )));
        }
        Err(error) => {
            return Err(MountError::Mountpoint(format!("{shown}: {error}")));
        }
    };
    if !metadata.is_dir() {
        return Err(MountError::Mountpoint(format!(
            "{shown} is not a directory"
        )));
    }
    let canonical =
        std::fs::canonicalize(path).map_err(|e| MountError::Mountpoint(format!("{shown}: {e}")))?;
    if is_mounted(&canonical) {
        return Err(MountError::Mountpoint(format!(
            "{shown} is already a mountpoint; unmount it first (`umount {shown}`)"
        )));
    }
    let busy = std::fs::read_dir(&canonical)
        .map_err(|e| MountError::Mountpoint(format!("{shown}: {e}")))?
        .next()
        .is_some();
    if busy && !nonempty {
        return Err(MountError::Mountpoint(format!(
            "{shown} is not empty; mount on an empty directory (or pass -o nonempty)"
        )));
    }
    Ok(canonical)
}

/// Mounts `fs` at `mountpoint` and serves it on background threads until the returned session
/// is dropped (which unmounts) or the file system is unmounted from outside.
pub fn mount(
    fs: Arc<Fs3>,
    runtime: Handle,
    mountpoint: &Path,
    options: &MountOptions,
    metrics: FuseMetrics,
) -> Result<fuser::BackgroundSession, MountError> {
    let mountpoint = check_mountpoint(mountpoint, options.nonempty)?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("fs3".to_string()),
        fuser::MountOption::Subtype("fs3".to_string()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        if options.read_only {
            fuser::MountOption::RO
        } else {
            fuser::MountOption::RW
        },
    ];
    if options.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(options.threads.max(1));
    let adapter = Fs3Fuse {
        inner: Arc::new(Inner {
            fs,
            options: options.clone(),
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            sizes: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            groups: GroupsCache::default(),
            write_budget: Arc::new(Semaphore::new(budget_units(options.write_behind))),
            write_budget_units: u32::try_from(budget_units(options.write_behind))
                .unwrap_or(u32::MAX),
            metrics,
        }),
        runtime,
    };
    fuser::spawn_mount(adapter, &mountpoint, &config).map_err(|cause| MountError::Mount {
        path: mountpoint.display().to_string(),
        cause,
    })
}

/// An open directory's entries, `.` and `..` first: (inode, type, name).
type Listing = Vec<(u64, FileType, Vec<u8>)>;

/// An open file.
#[derive(Debug)]
struct OpenFile {
    inode: Inode,
    /// The length when opened.
    open_length: u64,
    /// Opened for writing (the kernel checked the permission at open).
    writable: bool,
    /// Who opened it: the write session is opened in their name.
    opener: Credentials,
    /// The write session, opened at the first write (or ftruncate), with the inode as it was
    /// then (its layout is final once a session is open): a file created or opened for
    /// writing and closed unwritten costs meta nothing more.
    session: tokio::sync::OnceCell<(Inode, WriteSession)>,
    /// The length last reported to meta through this handle.
    reported: AtomicU64,
    /// The file's write-back failures this handle has been told of.
    seen_error: AtomicU64,
}

impl OpenFile {
    fn new(inode: Inode, writable: bool, opener: Credentials) -> OpenFile {
        let open_length = inode.length;
        OpenFile {
            inode,
            open_length,
            writable,
            opener,
            session: tokio::sync::OnceCell::new(),
            reported: AtomicU64::new(open_length),
            seen_error: AtomicU64::new(0),
        }
    }

    /// The inode to do I/O with: as of the session's opening if it has one, else of the open.
    fn current_inode(&self) -> &Inode {
        self.session.get().map_or(&self.inode, |(inode, _)| inode)
    }
}

/// What this mount has written to a file and not yet necessarily reported: open writers, the
/// largest end written, and the writes still in flight.
#[derive(Debug, Default, Clone)]
struct LocalSize {
    writers: usize,
    size: u64,
    writes: Arc<InodeWrites>,
}

/// The write budget counts KiB (a semaphore's permits are bounded).
const BUDGET_UNIT: u64 = 1024;

fn budget_units(bytes: u64) -> usize {
    usize::try_from(
        bytes
            .div_ceil(BUDGET_UNIT)
            .clamp(1024, u64::from(u32::MAX) >> 3),
    )
    .unwrap_or(1024)
}

struct Inner {
    fs: Arc<Fs3>,
    options: MountOptions,
    handles: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<Listing>>>,
    sizes: Mutex<HashMap<u64, LocalSize>>,
    next_handle: AtomicU64,
    groups: GroupsCache,
    write_budget: Arc<Semaphore>,
    write_budget_units: u32,
    metrics: FuseMetrics,
}

/// The FUSE file system.
pub struct Fs3Fuse {
    inner: Arc<Inner>,
    runtime: Handle,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps; a panic elsewhere cannot leave them half-changed.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn errno(error: &FsError) -> Errno {
    Errno::from_i32(error.errno)
}

/// Answers an operation with nothing to return; whether it succeeded.
fn empty_reply(reply: ReplyEmpty, result: Result<(), FsError>) -> bool {
    match result {
        Ok(()) => {
            reply.ok();
            true
        }
        Err(error) => {
            reply.error(errno(&error));
            false
        }
    }
}

/// How long a caller's supplementary groups are reused before `/proc` is read again.
const GROUPS_TTL: Duration = Duration::from_secs(1);
/// Most callers whose groups are remembered.
const GROUPS_CACHE: usize = 1024;

/// Supplementary groups by process, read from `/proc/PID/status` at most once per
/// [`GROUPS_TTL`] (a read on every request cost a few per cent of the daemon's CPU).
#[derive(Default)]
struct GroupsCache {
    by_pid: Mutex<HashMap<u32, (std::time::Instant, Vec<u32>)>>,
}

impl GroupsCache {
    fn groups(&self, pid: u32) -> Vec<u32> {
        if let Some((at, groups)) = lock(&self.by_pid).get(&pid)
            && at.elapsed() < GROUPS_TTL
        {
            return groups.clone();
        }
        let groups: Vec<u32> = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Groups:"))
                    .map(|g| {
                        g.split_whitespace()
                            .filter_map(|n| n.parse().ok())
                            .collect()
                    })
            })
            .unwrap_or_default();
        let mut by_pid = lock(&self.by_pid);
        if by_pid.len() >= GROUPS_CACHE {
            by_pid.clear();
        }
        by_pid.insert(pid, (std::time::Instant::now(), groups.clone()));
        groups
    }

    /// The caller's credentials, supplementary groups included.
    fn credentials(&self, req: &Request) -> Credentials {
        Credentials {
            uid: req.uid(),
            gid: req.gid(),
            groups: self.groups(req.pid()),
        }
    }
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn time_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

fn file_type(kind: i32) -> FileType {
    match InodeKind::try_from(kind) {
        Ok(InodeKind::Directory) => FileType::Directory,
        Ok(InodeKind::Symlink) => FileType::Symlink,
        _ => FileType::RegularFile,
    }
}

impl Inner {
    /// The length this mount knows for `inode`: meta's, or more if this mount wrote more.
    fn size_of(&self, inode: &Inode) -> u64 {
        let local = lock(&self.sizes).get(&inode.id).map_or(0, |s| s.size);
        inode.length.max(local)
    }

    /// The in-flight writes of `ino` from this mount (none unless a writer has it open).
    fn writes_of(&self, ino: u64) -> Option<Arc<InodeWrites>> {
        lock(&self.sizes).get(&ino).map(|s| s.writes.clone())
    }

    /// Waits for this mount's pending writes to `ino`.
    async fn wait_writes(&self, ino: u64) {
        if let Some(writes) = self.writes_of(ino) {
            writes.all().await;
        }
    }

    /// Waits for this mount's pending writes to the file, and returns the first failure among
    /// them that `file` has not been told of.
    async fn settle(&self, file: &OpenFile) -> Result<(), FsError> {
        match self.writes_of(file.inode.id) {
            Some(writes) => {
                writes.all().await;
                writes.error_since(&file.seen_error).map_or(Ok(()), Err)
            }
            None => Ok(()),
        }
    }

    fn attr(&self, inode: &Inode) -> FileAttr {
        let kind = file_type(inode.kind);
        let size = match kind {
            FileType::Directory => 4096,
            _ => self.size_of(inode),
        };
        FileAttr {
            ino: INodeNo(inode.id),
            size,
            blocks: size.div_ceil(512),
            atime: time(inode.atime_ns),
            mtime: time(inode.mtime_ns),
            ctime: time(inode.ctime_ns),
            crtime: time(inode.ctime_ns),
            kind,
            perm: (inode.mode & 0o7777) as u16,
            nlink: inode.nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev: 0,
            blksize: if kind == FileType::RegularFile {
                FILE_BLOCK_SIZE
            } else {
                4096
            },
            flags: 0,
        }
    }

    fn add_handle(&self, file: OpenFile) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        {
            let mut sizes = lock(&self.sizes);
            if file.writable {
                let local = sizes.entry(file.inode.id).or_default();
                local.writers += 1;
                local.size = local.size.max(file.open_length);
            }
            // Failures before the open are not this handle's to report.
            if let Some(local) = sizes.get(&file.inode.id) {
                file.seen_error
                    .store(local.writes.error_generation(), Ordering::Release);
            }
        }
        lock(&self.handles).insert(fh, Arc::new(file));
        self.metrics.open_files.inc();
        fh
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<OpenFile>, Errno> {
        lock(&self.handles).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// The handle's write session, opened now if this is its first write.
    async fn session_of<'f>(&self, file: &'f OpenFile) -> Result<&'f WriteSession, FsError> {
        if !file.writable {
            return Err(FsError::new(libc::EBADF, "not open for writing"));
        }
        file.session
            .get_or_try_init(|| self.fs.open_write(&file.opener, file.inode.id, false, true))
            .await
            .map(|(_, session)| session)
    }

    /// Reports a handle's written length to meta unless it is already there.
    async fn report(
        &self,
        creds: &Credentials,
        file: &OpenFile,
        keep_open: bool,
    ) -> Result<(), FsError> {
        // fsync and close through any handle wait for this mount's writes to the file.
        self.settle(file).await?;
        let Some((_, session)) = file.session.get() else {
            return Ok(());
        };
        let written = session.written_to();
        if keep_open
            && file.reported.load(Ordering::Acquire) == written
            && !session.has_unreported_write()
        {
            return Ok(());
        }
        self.fs.sync_session(creds, session, keep_open).await?;
        file.reported.store(written, Ordering::Release);
        Ok(())
    }

    /// Writable handles here whose session is not open yet would lose the file to garbage
    /// collection once it is unlinked (POSIX keeps it while open): open theirs first.
    async fn open_sessions_before_unlink(&self, creds: &Credentials, parent: u64, name: &[u8]) {
        let unopened: Vec<Arc<OpenFile>> = lock(&self.handles)
            .values()
            .filter(|f| f.writable && f.session.get().is_none())
            .cloned()
            .collect();
        if unopened.is_empty() {
            return;
        }
        let Ok(target) = self.fs.lookup(creds, parent, name).await else {
            return;
        };
        for file in unopened.iter().filter(|f| f.inode.id == target.id) {
            if let Err(error) = self.session_of(file).await {
                tracing::warn!(inode = target.id, %error, "could not open a session before unlink");
            }
        }
    }

    /// Answers with the entry or the error; whether it was the entry.
    fn entry_reply(&self, reply: ReplyEntry, result: Result<Inode, FsError>) -> bool {
        match result {
            Ok(inode) => {
                reply.entry(
                    &self.options.cache_timeout,
                    &self.attr(&inode),
                    Generation(0),
                );
                true
            }
            Err(error) => {
                reply.error(errno(&error));
                false
            }
        }
    }

    fn is_writable(flags: OpenFlags) -> bool {
        let access = flags.0 & libc::O_ACCMODE;
        access == libc::O_WRONLY || access == libc::O_RDWR
    }
}

impl Fs3Fuse {
    /// Runs `work`, the answer to one `op` request, on the runtime; its result goes to the
    /// kernel through the reply it owns, and whether that was a success (`true`) to the
    /// request series.
    fn spawn<F>(&self, op: &'static str, work: F)
    where
        F: std::future::Future<Output = bool> + Send + 'static,
    {
        let started = Instant::now();
        let metrics = self.inner.metrics.clone();
        self.runtime.spawn(async move {
            let ok = work.await;
            metrics.requests.observe(op, started, ok);
        });
    }

    /// Counts an `op` request answered without going to the runtime.
    fn answered(&self, op: &'static str, started: Instant, ok: bool) {
        self.inner.metrics.requests.observe(op, started, ok);
    }
}

impl Filesystem for Fs3Fuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_write(self.inner.options.max_write) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_readahead(self.inner.options.max_readahead) {
            let _ = config.set_max_readahead(nearest);
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let inner = self.inner.clone();
        let creds = self.inner.groups.credentials(req);
        let name = name.as_bytes().to_vec();
        self.spawn("lookup", async move {
            let result = inner.fs.lookup(&creds, parent.0, &name).await;
            inner.entry_reply(reply, result)
        });
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let inner = self.inner.clone();
        let creds = self.inner.groups.credentials(req);
        self.spawn("getattr", async move {
            match inner.fs.getattr(&creds, ino.0).await {
                Ok(inode) => {
                    reply.attr(&inner.options.cache_timeout, &inner.attr(&inode));
                    true
                }
                Err(error) => {
                    reply.error(errno(&error));
                    false
                }
            }
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let inner = self.inner.clone();
        let creds = self.inner.groups.credentials(req);
        let by_handle = fh
            .and_then(|fh| inner.handle(fh).ok())
            .filter(|f| f.writable && size.is_some());
        let mut op = SetAttrOp {
            inode: ino.0,
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            length: size,
            ..SetAttrOp::default()
        };
        match atime {
            Some(TimeOrNow::Now) => op.atime_now = true,
            Some(TimeOrNow::SpecificTime(t)) => op.atime_ns = Some(time_ns(t)),
            None => {}
        }
        match mtime {
            Some(TimeOrNow::Now) => op.mtime_now = true,
            Some(TimeOrNow::SpecificTime(t)) => op.mtime_ns = Some(time_ns(t)),
            None => {}
        }
        self.spawn("setattr", async move {
            if size.is_some() {
                inner.wait_writes(ino.0).await;
            }
            // ftruncate: the handle's session stands for the permission checked at open.
            if let Some(file) = &by_handle {
                match inner.session_of(file).await {
                    Ok(session) => op.session = session.session,
                    Err(error) => {
                        reply.error(errno(&error));
                        return false;
                    }
                }
            }
            match inner.fs.setattr(&creds, op).await {
                Ok(inode) => {
                    if let Some(length) = size {
                        // Writers here must not report the old end again on close.
                        if let Some(local) = lock(&inner.sizes).get_mut(&ino.0) {
                            local.size = length;
                        }
                        for file in lock(&inner.handles).values() {
                            if let Some((_, session)) =
                                file.session.get().filter(|(_, s)| s.inode == ino.0)
                            {
                                session.truncated_to(length);
                            }
                        }
                    }
                    reply.attr(&inner.options.cache_timeout, &inner.attr(&inode));
                    true
                }
                Err(error) => {
                    reply.error(errno(&error));
                    false
                }
            }
        });
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let inner = self.inner.clone();
        let creds = self.inner.groups.credentials(req);
        self.spawn("readlink", async move {
            match inner.fs.getattr(&creds, ino.0).await {
                Ok(inode) if inode.kind == InodeKind::Symlink as i32 => {
                    reply.data(&inode.symlink_target);
                    true
                }
                Ok(_) => {
                    reply.error(Errno::EINVAL);
                    false
                }
                Err(error) => {
                    reply.error(errno(&error));
                    false
                }
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            // Devices, FIFOs and sockets have no place on a distributed data store.
            reply.error(Errno::EPERM);
            self.answered("mknod", Instant::now(), false);
            return;
        }
        self.create_entry(
            req,
            parent,
            name,
            InodeKind::File,
            mode & !umask & 0o7777,
            b"",
            reply,
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.create_entry(
            req,
            parent,
            name,
            InodeKind::Directory,
            mode & !umask & 0o7777,
            b"",
            reply,
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(req, parent, name, false, reply);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(req, parent, name, true, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let target = target.as_os_str().as_bytes();
        self.create_entry(
            req,
            parent,
            link_name,
            InodeKind::Symlink,
            0o777,
            target,
            reply,
        );
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            self.answered("rename", Instant::now(), false);
            return;
        }
        let inner = self.inner.clone();
        let creds = self.inner.groups.credentials(req);
        let name = name.as_bytes().to_vec();
        let newname = newname.as_bytes().to_vec();
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        self.spawn("rename", async move {
            let result = inner
                .fs
                .rename(&creds, parent.0, &name, newparent.0, &newname, no_replace)
                .await;
            empty_reply(reply, result)
        });
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let inner = self.inner.clone();
        let creds = self.inner.groups.credentials(req);
        let newname = newname.as_bytes().to_vec();
        self.spawn("link", async move {
            let result = inner.fs.link(&creds, ino.0, newparent.0, &newname).await;
            inner.entry_reply(reply, result)
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let inner = self.inner.clone();
        let creds = self.inner.groups.credentials(req);
        // The kernel has checked the permission (default_permissions) and applies O_TRUNC
        // itself with a setattr; a writer's session waits for its first write.
        let writable = Inner::is_writable(flags);
        self.spawn("open", async move {
            match inner.fs.getattr(&creds, ino.0).await {
                Ok(inode) => {
                    let fh = inner.add_handle(OpenFile::new(inode, writable, creds));
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                    true
                }
                Err(error) => {
                    reply.error(errno(&error));
                    false
                }
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let inner = self.inner.clone();
        let creds = self.inner.groups.credentials(req);
        let name = name.as_bytes().to_vec();
        let exclusive = flags & libc::O_EXCL != 0;
        let truncate = flags & libc::O_TRUNC != 0;
        self.spawn("create", async move {
            match inner
                .fs
                .create_file_unopened(
                    &creds,
                    parent.0,
                    &name,
                    mode & !umask & 0o7777,
                    exclusive,
                    truncate,
                )
                .await
            {
                Ok(inode) => {
                    let attr = inner.attr(&inode);
                    let fh = inner.add_handle(OpenFile::new(inode, true, creds));
                    reply.created(
                        &inner.options.cache_timeout,
                        &attr,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                    );
                    true
                }
                Err(error) => {
                    reply.error(errno(&error));
                    false
                }
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let inner = self.inner.clone();
        let file = match inner.handle(fh) {
            Ok(file) => file,
            Err(error) => {
                reply.error(error);
                return self.answered("read", Instant::now(), false);
            }
        };
        self.spawn("read", async move {
            // Reads see this mount's own writes.
            if let Some(writes) = inner.writes_of(file.inode.id) {
                writes
                    .overlapping(offset, offset.saturating_add(u64::from(size)))
                    .await;
            }
            let inode = file.current_inode();
            let length = inner.size_of(inode).max(file.open_length);
            match inner
                .fs
                .read_at(inode, length, offset, u64::from(size))
                .await
            {
                Ok(data) => {
                    inner.metrics.read(data.len());
                    reply.data(&data);
                    true
                }
                Err(error) => {
                    reply.error(errno(&error));
                    false
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let inner = self.inner.clone();
        let file = match inner.handle(fh) {
            Ok(file) => file,
            Err(error) => {
                reply.error(error);
                return self.answered("write", Instant::now(), false);
            }
        };
        let data = Bytes::copy_from_slice(data);
        self.spawn("write", async move {
            let Some(writes) = inner.writes_of(ino.0).filter(|_| file.writable) else {
                reply.error(Errno::EBADF);
                return false;
            };
            if let Some(error) = writes.error_since(&file.seen_error) {
                reply.error(errno(&error));
                return false;
            }
            // The session exists before any data lands (an unlinked file keeps it).
            if let Err(error) = inner.session_of(&file).await {
                reply.error(errno(&error));
                return false;
            }
            let len = data.len() as u64;
            let end = offset.saturating_add(len);
            // Overlapping writes land in the order they were made.
            writes.overlapping(offset, end).await;
            let units = u32::try_from(len.div_ceil(BUDGET_UNIT))
                .unwrap_or(u32::MAX)
                .min(inner.write_budget_units);
            let Ok(permit) = inner.write_budget.clone().acquire_many_owned(units).await else {
                reply.error(Errno::EIO);
                return false;
            };
            let fs = inner.fs.clone();
            let background = file.clone();
            let metrics = inner.metrics.clone();
            writes.start(offset, end, async move {
                let result = match background.session.get() {
                    Some((inode, session)) => fs.write_at(inode, session, offset, data).await,
                    None => Ok(()),
                };
                drop(permit);
                if result.is_err() {
                    metrics.writeback_errors.inc();
                }
                result
            });
            if let Some(local) = lock(&inner.sizes).get_mut(&ino.0) {
                local.size = local.size.max(end);
            }
            inner.metrics.written(len);
            reply.written(u32::try_from(len).unwrap_or(u32::MAX));
            true
        });
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) waits for this: the length reaches meta before close returns
        // (close-to-open consistency for other clients).
        self.report_length("flush", req, fh, reply);
    }

    fn fsync(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Data is durable on every replica once a write returns; fsync makes the length so.
        self.report_length("fsync", req, fh, reply);
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let inner = self.inner.clone();
        let Some(file) = lock(&inner.handles).remove(&fh.0) else {
            reply.error(Errno::EBADF);
            return self.answered("release", Instant::now(), false);
        };
        inner.metrics.open_files.dec();
        // close(2) does not wait for release, and flush already made the length visible: the
        // session ends in the background (its errors can only be logged, as the kernel's are).
        reply.ok();
        let creds = self.inner.groups.credentials(req);
        self.spawn("release", async move {
            let reported = inner.report(&creds, &file, false).await;
            if let Err(error) = &reported {
                tracing::warn!(inode = ino.0, %error, "reporting at close failed");
                // The session must end whatever failed before, or an unlinked file would be
                // kept for as long as this mount lives.
                if let Some((_, session)) = file.session.get()
                    && let Err(error) = inner.fs.sync_session(&creds, session, false).await
                {
                    tracing::warn!(inode = ino.0, %error, "closing a write session failed");
                }
            }
            if file.writable {
                let mut sizes = lock(&inner.sizes);
                if let Some(local) = sizes.get_mut(&ino.0) {
                    local.writers = local.writers.saturating_sub(1);
                    if local.writers == 0 {
                        sizes.remove(&ino.0);
                    }
                }
            }
            reported.is_ok()
        });
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let inner = self.inner.clone();
        let creds = self.inner.groups.credentials(req);
        self.spawn("opendir", async move {
            let listing = async {
                let dir = inner.fs.getattr(&creds, ino.0).await?;
                let entries = inner.fs.readdir_all(&creds, ino.0).await?;
                let mut all = Vec::with_capacity(entries.len() + 2);
                all.push((ino.0, FileType::Directory, b".".to_vec()));
                all.push((dir.parent.max(1), FileType::Directory, b"..".to_vec()));
                all.extend(
                    entries
                        .into_iter()
                        .map(|e| (e.inode, file_type(e.kind), e.name)),
                );
                Ok::<_, FsError>(all)
            };
            match listing.await {
                Ok(all) => {
                    let fh = inner.next_handle.fetch_add(1, Ordering::Relaxed);
                    lock(&inner.dirs).insert(fh, Arc::new(all));
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                    true
                }
                Err(error) => {
                    reply.error(errno(&error));
                    false
                }
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let started = Instant::now();
        let Some(entries) = lock(&self.inner.dirs).get(&fh.0).cloned() else {
            reply.error(Errno::EBADF);
            return self.answered("readdir", started, false);
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(start) {
            if reply.add(
                INodeNo(*ino),
                (i + 1) as u64,
                *kind,
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
        self.answered("readdir", started, true);
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let known = lock(&self.inner.dirs).remove(&fh.0).is_some();
        reply.ok();
        self.answered("releasedir", Instant::now(), known);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let inner = self.inner.clone();
        self.spawn("statfs", async move {
            match inner.fs.statfs().await {
                Ok(s) => {
                    const BLOCK: u64 = 4096;
                    let blocks = s.capacity_bytes / BLOCK;
                    let free = s.free_bytes / BLOCK;
                    reply.statfs(
                        blocks,
                        free,
                        free,
                        s.files,
                        u64::MAX >> 1,
                        BLOCK as u32,
                        255,
                        BLOCK as u32,
                    );
                    true
                }
                Err(error) => {
                    reply.error(errno(&error));
                    false
                }
            }
        });
    }
}

impl Fs3Fuse {
    /// flush and fsync: the handle's written length reaches meta before the answer.
    fn report_length(&self, op: &'static str, req: &Request, fh: FileHandle, reply: ReplyEmpty) {
        let inner = self.inner.clone();
        let file = match inner.handle(fh) {
            Ok(file) => file,
            Err(error) => {
                reply.error(error);
                return self.answered(op, Instant::now(), false);
            }
        };
        let creds = self.inner.groups.credentials(req);
        self.spawn(op, async move {
            let result = inner.report(&creds, &file, true).await;
            empty_reply(reply, result)
        });
    }

    /// mknod (regular files), mkdir and symlink: create the entry, reply with it.
    #[allow(clippy::too_many_arguments)]
    fn create_entry(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        kind: InodeKind,
        mode: u32,
        symlink_target: &[u8],
        reply: ReplyEntry,
    ) {
        let inner = self.inner.clone();
        let creds = self.inner.groups.credentials(req);
        let name = name.as_bytes().to_vec();
        let target = symlink_target.to_vec();
        let op = match kind {
            InodeKind::Directory => "mkdir",
            InodeKind::Symlink => "symlink",
            _ => "mknod",
        };
        self.spawn(op, async move {
            let result = inner
                .fs
                .create(&creds, parent.0, &name, kind, mode, &target)
                .await;
            inner.entry_reply(reply, result)
        });
    }

    fn remove(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        directory: bool,
        reply: ReplyEmpty,
    ) {
        let inner = self.inner.clone();
        let creds = self.inner.groups.credentials(req);
        let name = name.as_bytes().to_vec();
        let op = if directory { "rmdir" } else { "unlink" };
        self.spawn(op, async move {
            if !directory {
                inner
                    .open_sessions_before_unlink(&creds, parent.0, &name)
                    .await;
            }
            let result = inner.fs.remove(&creds, parent.0, &name, directory).await;
            empty_reply(reply, result)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/mnt/a\\040b"), b"/mnt/a b");
        assert_eq!(unescape_mount_path("/plain"), b"/plain");
        assert_eq!(unescape_mount_path("/odd\\"), b"/odd\\");
    }

    #[test]
    fn mountpoints_are_checked_with_clear_messages() {
        let dir = std::env::temp_dir().join(format!("fs3-fuse-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let missing = check_mountpoint(&dir, false).unwrap_err().to_string();
        assert!(missing.contains("does not exist"), "{missing}");
        std::fs::create_dir_all(dir.join("inside")).unwrap();
        let busy = check_mountpoint(&dir, false).unwrap_err().to_string();
        assert!(busy.contains("not empty"), "{busy}");
        assert!(check_mountpoint(&dir, true).is_ok());
        let file = dir.join("inside").join("f");
        std::fs::write(&file, b"x").unwrap();
        let not_dir = check_mountpoint(&file, false).unwrap_err().to_string();
        assert!(not_dir.contains("not a directory"), "{not_dir}");
        let proc_mounted = check_mountpoint(Path::new("/proc"), true)
            .unwrap_err()
            .to_string();
        assert!(
            proc_mounted.contains("already a mountpoint"),
            "{proc_mounted}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
