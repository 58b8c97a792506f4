//! The native file-system client: what training jobs link and what the FUSE mount and the
//! file CLI are built on. Metadata goes to the meta service (found through mgmtd's routing,
//! leader-following, every call bounded by a timeout); file data goes straight to storage in
//! chunks, each on the chain the file's layout gives it, the chunks of one large I/O in
//! parallel with a bound on the bytes in flight. Errors carry a POSIX errno.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ff_rpc::{ClientOptions, LeaderClient, with_token};
use fs3_proto::meta::meta_client::MetaClient;
use fs3_proto::meta::{
    CloseOp, Command, CommandResult, CreateOp, Credentials, DirEntry, GetAttrQuery, Inode,
    InodeKind, KeepAliveRequest, LinkOp, LookupQuery, OpenOp, Query, QueryResult, ReadDirQuery,
    RemoveOp, RenameOp, SetAttrOp, SetLayoutOp, StatfsReply, StatfsRequest, command, query,
};
use fs3_proto::mgmtd::NodeKind;
use fs3_proto::storage::ChunkId;
use futures::StreamExt as _;
use tokio::task::JoinHandle;
use tonic::{Code, Status};

use crate::{ChunkClient, ChunkUpdate, ClientError, RoutingCache};

/// A failed file-system call: a POSIX errno and what happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FsError {
    /// The errno a system call would return.
    pub errno: i32,
    /// What happened, for people.
    pub message: String,
}

impl FsError {
    /// An error with `errno`.
    pub fn new(errno: i32, message: impl Into<String>) -> FsError {
        FsError {
            errno,
            message: message.into(),
        }
    }

    fn from_status(status: &Status) -> FsError {
        let errno = match status.code() {
            Code::Unauthenticated | Code::PermissionDenied => libc::EACCES,
            Code::NotFound => libc::ENOENT,
            Code::InvalidArgument => libc::EINVAL,
            Code::DeadlineExceeded => libc::ETIMEDOUT,
            _ => libc::EIO,
        };
        FsError::new(errno, format!("meta: {}", status.message()))
    }

    fn from_client(error: &ClientError) -> FsError {
        let errno = match error {
            ClientError::NotFound(_) => libc::ENOENT,
            ClientError::NoSpace(_) => libc::ENOSPC,
            ClientError::BadRequest(_) => libc::EINVAL,
            _ => libc::EIO,
        };
        FsError::new(errno, format!("storage: {error}"))
    }
}

/// How a client connects and how much it keeps in flight.
#[derive(Debug, Clone)]
pub struct Fs3Options {
    /// mgmtd replicas (`host:port`).
    pub mgmtd: Vec<String>,
    /// The token meta authenticates this client with (empty: none).
    pub token: String,
    /// Time a chunk read or write may take with its retries.
    pub chunk_deadline: Duration,
    /// Most bytes of one I/O in flight at once.
    pub max_inflight_bytes: u64,
    /// Longest time between keep-alives of this client's write sessions; a third of meta's
    /// session lease (told in every keep-alive reply) when that is shorter.
    pub keep_alive_interval: Duration,
    /// How chunk data moves to and from storage (transport, limits).
    pub net: ff_net::NetConfig,
}

impl Default for Fs3Options {
    fn default() -> Self {
        Fs3Options {
            mgmtd: vec!["127.0.0.1:8000".to_string()],
            token: String::new(),
            chunk_deadline: Duration::from_secs(30),
            max_inflight_bytes: 64 << 20,
            keep_alive_interval: Duration::from_secs(10),
            net: ff_net::NetConfig::default(),
        }
    }
}

/// A file open for writing: the session meta knows it by, and how far it has written.
#[derive(Debug)]
pub struct WriteSession {
    /// The file's inode id.
    pub inode: u64,
    /// The session id.
    pub session: u64,
    written_to: AtomicU64,
    wrote: AtomicBool,
}

impl WriteSession {
    /// The largest offset written up to through this session.
    pub fn written_to(&self) -> u64 {
        self.written_to.load(Ordering::Acquire)
    }

    /// Whether something was written since the last report to meta.
    pub fn has_unreported_write(&self) -> bool {
        self.wrote.load(Ordering::Acquire)
    }

    /// The file was truncated to `length`: what was written past it no longer counts.
    pub fn truncated_to(&self, length: u64) {
        self.written_to.fetch_min(length, Ordering::AcqRel);
    }
}

/// A connected client. Cheap to share behind an `Arc`.
pub struct Fs3 {
    meta: LeaderClient,
    token: String,
    chunks: Arc<ChunkClient>,
    client_id: u64,
    max_inflight_bytes: u64,
    keep_alive: JoinHandle<()>,
}

impl std::fmt::Debug for Fs3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs3")
            .field("client_id", &self.client_id)
            .finish()
    }
}

impl Drop for Fs3 {
    fn drop(&mut self) {
        self.keep_alive.abort();
    }
}

/// One piece of an I/O: chunk `index`, `[offset, offset + len)` within it, at `at` in the buffer.
#[derive(Debug, Clone, Copy)]
struct Piece {
    index: u64,
    offset: u64,
    len: u64,
    at: usize,
}

fn pieces(chunk_size: u64, offset: u64, len: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut pos = offset;
    let end = offset.saturating_add(len);
    while pos < end {
        let index = pos / chunk_size;
        let within = pos % chunk_size;
        let take = (chunk_size - within).min(end - pos);
        out.push(Piece {
            index,
            offset: within,
            len: take,
            at: (pos - offset) as usize,
        });
        pos += take;
    }
    out
}

/// Where chunk `index` of file `inode` lives: its chain (`chains[index % stripe]`) and id.
/// `layout` must have chains.
pub fn chunk_place(inode: u64, layout: &fs3_proto::meta::Layout, index: u64) -> (u64, ChunkId) {
    let chain = layout.chains[(index % layout.chains.len() as u64) as usize];
    (chain, ChunkId { inode, index })
}

fn layout_of(inode: &Inode) -> Result<&fs3_proto::meta::Layout, FsError> {
    inode
        .layout
        .as_ref()
        .filter(|l| !l.chains.is_empty() && l.chunk_size > 0)
        .ok_or_else(|| FsError::new(libc::EIO, format!("inode {} has no layout", inode.id)))
}

impl Fs3 {
    /// Connects: fetches routing from mgmtd, finds the meta replicas there, starts keep-alives.
    pub async fn connect(options: Fs3Options) -> Result<Fs3, FsError> {
        let routing = Arc::new(
            RoutingCache::new(options.mgmtd.clone()).map_err(|e| FsError::from_client(&e))?,
        );
        let info = routing
            .refresh()
            .await
            .map_err(|e| FsError::new(libc::EIO, format!("cannot reach mgmtd: {e}")))?;
        let metas: Vec<String> = info
            .info()
            .nodes
            .iter()
            .filter(|n| n.kind == NodeKind::Meta as i32)
            .map(|n| n.addr.clone())
            .collect();
        if metas.is_empty() {
            return Err(FsError::new(
                libc::EIO,
                "no meta service has registered at mgmtd; is `fs3 meta` running?",
            ));
        }
        let meta_options = ClientOptions {
            request_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(30),
            ..ClientOptions::default()
        };
        let meta = LeaderClient::new(metas, meta_options)
            .map_err(|e| FsError::new(libc::EINVAL, e.to_string()))?;
        let net = ff_net::NetClient::new(options.net.clone())
            .map_err(|e| FsError::new(libc::EINVAL, e.to_string()))?;
        let chunks = Arc::new(ChunkClient::new(
            routing,
            Arc::new(net),
            options.chunk_deadline,
        ));
        let client_id = rand::random_range(1..u64::MAX);
        let keep_alive = tokio::spawn(keep_alive(
            LeaderClient::new(meta.endpoints(), meta.options().clone())
                .map_err(|e| FsError::new(libc::EINVAL, e.to_string()))?,
            options.token.clone(),
            client_id,
            options.keep_alive_interval,
        ));
        let fs = Fs3 {
            meta,
            token: options.token,
            chunks,
            client_id,
            max_inflight_bytes: options.max_inflight_bytes.max(1),
            keep_alive,
        };
        // Fail now, with a clear message, if the token is refused (a read of the root: statfs
        // would also ask mgmtd about every target).
        fs.getattr(&Credentials::default(), crate::ROOT).await?;
        Ok(fs)
    }

    /// This client's id (its sessions carry it).
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// The chunk client (for tools that work below files).
    pub fn chunks(&self) -> &Arc<ChunkClient> {
        &self.chunks
    }

    /// Runs a namespace command.
    pub async fn mutate(
        &self,
        creds: &Credentials,
        op: command::Op,
    ) -> Result<CommandResult, FsError> {
        let command = Command {
            creds: Some(creds.clone()),
            now_ns: 0,
            op: Some(op),
        };
        let result = self
            .meta
            .call(|channel| {
                let request = with_token(tonic::Request::new(command.clone()), &self.token);
                async move { MetaClient::new(channel).mutate(request).await }
            })
            .await
            .map_err(|s| FsError::from_status(&s))?;
        if result.errno != 0 {
            return Err(FsError::new(result.errno, result.message));
        }
        Ok(result)
    }

    /// Runs a namespace query.
    pub async fn query(&self, creds: &Credentials, op: query::Op) -> Result<QueryResult, FsError> {
        let query = Query {
            creds: Some(creds.clone()),
            op: Some(op),
        };
        let result = self
            .meta
            .call_idempotent(|channel| {
                let request = with_token(tonic::Request::new(query.clone()), &self.token);
                async move { MetaClient::new(channel).read(request).await }
            })
            .await
            .map_err(|s| FsError::from_status(&s))?;
        if result.errno != 0 {
            return Err(FsError::new(result.errno, result.message));
        }
        Ok(result)
    }

    fn inode_of(result: CommandResult) -> Result<Inode, FsError> {
        result
            .inode
            .ok_or_else(|| FsError::new(libc::EIO, "meta answered without an inode"))
    }

    /// The entry `name` of directory `parent`.
    pub async fn lookup(
        &self,
        creds: &Credentials,
        parent: u64,
        name: &[u8],
    ) -> Result<Inode, FsError> {
        self.query(
            creds,
            query::Op::Lookup(LookupQuery {
                parent,
                name: name.to_vec(),
            }),
        )
        .await?
        .inode
        .ok_or_else(|| FsError::new(libc::EIO, "meta answered without an inode"))
    }

    /// Inode `id`.
    pub async fn getattr(&self, creds: &Credentials, id: u64) -> Result<Inode, FsError> {
        self.query(creds, query::Op::GetAttr(GetAttrQuery { inode: id }))
            .await?
            .inode
            .ok_or_else(|| FsError::new(libc::EIO, "meta answered without an inode"))
    }

    /// Up to `limit` entries of directory `id` after the name `after`; and whether more follow.
    pub async fn readdir(
        &self,
        creds: &Credentials,
        id: u64,
        after: &[u8],
        limit: u32,
    ) -> Result<(Vec<DirEntry>, bool), FsError> {
        let result = self
            .query(
                creds,
                query::Op::ReadDir(ReadDirQuery {
                    inode: id,
                    after: after.to_vec(),
                    limit,
                }),
            )
            .await?;
        Ok((result.entries, result.more))
    }

    /// Every entry of directory `id`.
    pub async fn readdir_all(
        &self,
        creds: &Credentials,
        id: u64,
    ) -> Result<Vec<DirEntry>, FsError> {
        let mut entries: Vec<DirEntry> = Vec::new();
        loop {
            let after = entries.last().map(|e| e.name.clone()).unwrap_or_default();
            let (page, more) = self.readdir(creds, id, &after, 4096).await?;
            entries.extend(page);
            if !more {
                return Ok(entries);
            }
        }
    }

    /// Creates a directory, symlink or (not opened) file.
    pub async fn create(
        &self,
        creds: &Credentials,
        parent: u64,
        name: &[u8],
        kind: InodeKind,
        mode: u32,
        symlink_target: &[u8],
    ) -> Result<Inode, FsError> {
        Self::inode_of(
            self.mutate(
                creds,
                command::Op::Create(CreateOp {
                    parent,
                    name: name.to_vec(),
                    kind: kind as i32,
                    mode,
                    symlink_target: symlink_target.to_vec(),
                    exclusive: true,
                    ..CreateOp::default()
                }),
            )
            .await?,
        )
    }

    /// Creates (or, without `exclusive`, opens) a file for writing.
    pub async fn create_file(
        &self,
        creds: &Credentials,
        parent: u64,
        name: &[u8],
        mode: u32,
        exclusive: bool,
        truncate: bool,
    ) -> Result<(Inode, WriteSession), FsError> {
        let result = self
            .create_regular(
                creds,
                parent,
                name,
                mode,
                exclusive,
                truncate,
                self.client_id,
            )
            .await?;
        Self::with_session(result)
    }

    /// Creates (or, without `exclusive`, opens) a file without a write session: for callers
    /// that open the session at the first write ([`Fs3::open_write`]), so that a file created
    /// and closed unwritten costs one namespace change.
    pub async fn create_file_unopened(
        &self,
        creds: &Credentials,
        parent: u64,
        name: &[u8],
        mode: u32,
        exclusive: bool,
        truncate: bool,
    ) -> Result<Inode, FsError> {
        let result = self
            .create_regular(creds, parent, name, mode, exclusive, truncate, 0)
            .await?;
        Self::inode_of(result)
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_regular(
        &self,
        creds: &Credentials,
        parent: u64,
        name: &[u8],
        mode: u32,
        exclusive: bool,
        truncate: bool,
        session_client: u64,
    ) -> Result<CommandResult, FsError> {
        self.mutate(
            creds,
            command::Op::Create(CreateOp {
                parent,
                name: name.to_vec(),
                kind: InodeKind::File as i32,
                mode,
                symlink_target: Vec::new(),
                exclusive,
                session_client,
                truncate,
            }),
        )
        .await
    }

    fn with_session(result: CommandResult) -> Result<(Inode, WriteSession), FsError> {
        let session = result.session;
        let inode = Self::inode_of(result)?;
        let written_to = inode.length;
        Ok((
            inode.clone(),
            WriteSession {
                inode: inode.id,
                session,
                written_to: AtomicU64::new(written_to),
                wrote: AtomicBool::new(false),
            },
        ))
    }

    /// Opens an existing file for writing: starts a session (and checks write permission,
    /// unless a trusted caller says it `already_permitted` the open).
    pub async fn open_write(
        &self,
        creds: &Credentials,
        id: u64,
        truncate: bool,
        already_permitted: bool,
    ) -> Result<(Inode, WriteSession), FsError> {
        let result = self
            .mutate(
                creds,
                command::Op::Open(OpenOp {
                    inode: id,
                    session_client: self.client_id,
                    truncate,
                    already_permitted,
                }),
            )
            .await?;
        Self::with_session(result)
    }

    /// Reports what a session wrote (fsync), or ends it (close). Returns the inode after.
    pub async fn sync_session(
        &self,
        creds: &Credentials,
        session: &WriteSession,
        keep_open: bool,
    ) -> Result<Inode, FsError> {
        Self::inode_of(
            self.mutate(
                creds,
                command::Op::Close(CloseOp {
                    inode: session.inode,
                    session: session.session,
                    length: session.written_to(),
                    keep_open,
                    wrote: session.wrote.swap(false, Ordering::AcqRel),
                    client: self.client_id,
                }),
            )
            .await?,
        )
    }

    /// unlink, or rmdir with `directory`.
    pub async fn remove(
        &self,
        creds: &Credentials,
        parent: u64,
        name: &[u8],
        directory: bool,
    ) -> Result<(), FsError> {
        self.mutate(
            creds,
            command::Op::Remove(RemoveOp {
                parent,
                name: name.to_vec(),
                directory,
            }),
        )
        .await
        .map(|_| ())
    }

    /// rename (RENAME_NOREPLACE with `no_replace`).
    pub async fn rename(
        &self,
        creds: &Credentials,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        no_replace: bool,
    ) -> Result<(), FsError> {
        self.mutate(
            creds,
            command::Op::Rename(RenameOp {
                parent,
                name: name.to_vec(),
                new_parent,
                new_name: new_name.to_vec(),
                no_replace,
            }),
        )
        .await
        .map(|_| ())
    }

    /// A hard link to `id` as `new_name` in `new_parent`.
    pub async fn link(
        &self,
        creds: &Credentials,
        id: u64,
        new_parent: u64,
        new_name: &[u8],
    ) -> Result<Inode, FsError> {
        Self::inode_of(
            self.mutate(
                creds,
                command::Op::Link(LinkOp {
                    inode: id,
                    new_parent,
                    new_name: new_name.to_vec(),
                }),
            )
            .await?,
        )
    }

    /// chmod, chown, truncate, utimes in one.
    pub async fn setattr(&self, creds: &Credentials, op: SetAttrOp) -> Result<Inode, FsError> {
        Self::inode_of(self.mutate(creds, command::Op::SetAttr(op)).await?)
    }

    /// Sets a directory's (or an empty file's) layout.
    pub async fn set_layout(
        &self,
        creds: &Credentials,
        id: u64,
        layout: fs3_proto::meta::Layout,
    ) -> Result<Inode, FsError> {
        Self::inode_of(
            self.mutate(
                creds,
                command::Op::SetLayout(SetLayoutOp {
                    inode: id,
                    layout: Some(layout),
                }),
            )
            .await?,
        )
    }

    /// Space and file totals.
    pub async fn statfs(&self) -> Result<StatfsReply, FsError> {
        self.meta
            .call_idempotent(|channel| {
                let request = with_token(tonic::Request::new(StatfsRequest {}), &self.token);
                async move { MetaClient::new(channel).statfs(request).await }
            })
            .await
            .map_err(|s| FsError::from_status(&s))
    }

    /// Resolves `path` (absolute, `/`-separated, from the root) without following a final
    /// symlink; intermediate symlinks are followed up to 40 times, as Linux does.
    pub async fn resolve(&self, creds: &Credentials, path: &str) -> Result<Inode, FsError> {
        let mut inode = self.getattr(creds, crate::ROOT).await?;
        let mut parts: std::collections::VecDeque<String> = path
            .split('/')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        let mut followed = 0;
        while let Some(part) = parts.pop_front() {
            let next = self.lookup(creds, inode.id, part.as_bytes()).await?;
            if next.kind == InodeKind::Symlink as i32 && !parts.is_empty() {
                followed += 1;
                if followed > 40 {
                    return Err(FsError::new(libc::ELOOP, "too many symlinks"));
                }
                let target = String::from_utf8_lossy(&next.symlink_target).to_string();
                if target.starts_with('/') {
                    inode = self.getattr(creds, crate::ROOT).await?;
                }
                for piece in target.split('/').filter(|p| !p.is_empty()).rev() {
                    parts.push_front(piece.to_string());
                }
                continue;
            }
            inode = next;
        }
        Ok(inode)
    }

    fn parallelism(&self, chunk_size: u64) -> usize {
        usize::try_from((self.max_inflight_bytes / chunk_size.max(1)).clamp(1, 256)).unwrap_or(1)
    }

    /// Reads up to `len` bytes at `offset` of a file whose length is `length` (holes and
    /// short chunks read as zeros; nothing past `length`).
    pub async fn read_at(
        &self,
        inode: &Inode,
        length: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, FsError> {
        if offset >= length || len == 0 {
            return Ok(Vec::new());
        }
        let len = len.min(length - offset);
        let layout = layout_of(inode)?;
        let mut out = vec![
            0u8;
            usize::try_from(len)
                .map_err(|_| FsError::new(libc::EINVAL, "read too large"))?
        ];
        let jobs = pieces(layout.chunk_size, offset, len)
            .into_iter()
            .map(|piece| {
                let (chain, id) = chunk_place(inode.id, layout, piece.index);
                let chunks = self.chunks.clone();
                async move {
                    let read = chunks
                        .read(chain, id, piece.offset as u32, piece.len as u32)
                        .await;
                    (piece, read)
                }
            });
        let mut stream =
            futures::stream::iter(jobs).buffer_unordered(self.parallelism(layout.chunk_size));
        while let Some((piece, read)) = stream.next().await {
            match read {
                Ok(data) => {
                    let n = data.data.len().min(piece.len as usize);
                    out[piece.at..piece.at + n].copy_from_slice(&data.data[..n]);
                }
                // A chunk never written is a hole.
                Err(ClientError::NotFound(_)) => {}
                Err(error) => return Err(FsError::from_client(&error)),
            }
        }
        Ok(out)
    }

    /// Writes `data` at `offset` through `session`; returns once every replica has it.
    pub async fn write_at(
        &self,
        inode: &Inode,
        session: &WriteSession,
        offset: u64,
        data: Bytes,
    ) -> Result<(), FsError> {
        if data.is_empty() {
            return Ok(());
        }
        let layout = layout_of(inode)?;
        let len = data.len() as u64;
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= crate::MAX_FILE_SIZE)
            .ok_or_else(|| FsError::new(libc::EFBIG, "write past the largest file size"))?;
        let chunk_size = layout.chunk_size;
        let jobs = pieces(chunk_size, offset, len).into_iter().map(|piece| {
            let (chain, id) = chunk_place(inode.id, layout, piece.index);
            let bytes = data.slice(piece.at..piece.at + piece.len as usize);
            let update = if piece.offset == 0 && piece.len == chunk_size {
                ChunkUpdate::replace(bytes)
            } else {
                ChunkUpdate::write(piece.offset as u32, bytes)
            };
            let chunks = self.chunks.clone();
            async move { chunks.write(chain, id, update).await }
        });
        let mut stream = futures::stream::iter(jobs).buffer_unordered(self.parallelism(chunk_size));
        while let Some(result) = stream.next().await {
            result.map_err(|e| FsError::from_client(&e))?;
        }
        session.written_to.fetch_max(end, Ordering::AcqRel);
        session.wrote.store(true, Ordering::Release);
        Ok(())
    }
}

/// Keeps this client's write sessions alive: at once (meta learns of the client), then every
/// `longest` or a third of the lease meta judges by, whichever is shorter, so that a late tick
/// on a loaded machine never costs a live writer its sessions.
async fn keep_alive(meta: LeaderClient, token: String, client: u64, longest: Duration) {
    let mut interval = longest;
    loop {
        let result = meta
            .call_idempotent(|channel| {
                let request = with_token(tonic::Request::new(KeepAliveRequest { client }), &token);
                async move { MetaClient::new(channel).keep_alive(request).await }
            })
            .await;
        match result {
            Ok(reply) => interval = keep_alive_interval(longest, reply.session_lease_ms),
            Err(status) => tracing::debug!(message = status.message(), "keep-alive failed"),
        }
        tokio::time::sleep(interval).await;
    }
}

/// The pause between keep-alives: `longest`, or a third of meta's lease when that is shorter
/// (a lease of 0 comes from a meta that does not say; `longest` stands).
fn keep_alive_interval(longest: Duration, lease_ms: u64) -> Duration {
    if lease_ms == 0 {
        return longest;
    }
    longest.min(Duration::from_millis(lease_ms) / 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_splits_at_chunk_boundaries() {
        let p = pieces(100, 250, 200);
        let got: Vec<(u64, u64, u64, usize)> =
            p.iter().map(|p| (p.index, p.offset, p.len, p.at)).collect();
        assert_eq!(got, vec![(2, 50, 50, 0), (3, 0, 100, 50), (4, 0, 50, 150)]);
        assert!(pieces(100, 5, 0).is_empty());
    }

    #[test]
    fn keep_alives_come_three_times_per_lease_at_most_every_interval() {
        let longest = Duration::from_secs(10);
        assert_eq!(keep_alive_interval(longest, 60_000), longest);
        assert_eq!(
            keep_alive_interval(longest, 10_000),
            Duration::from_secs(10) / 3
        );
        assert_eq!(
            keep_alive_interval(longest, 2_000),
            Duration::from_secs(2) / 3
        );
        assert_eq!(keep_alive_interval(longest, 0), longest);
    }
}
