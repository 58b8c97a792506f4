//! The meta gRPC API: authentication, proposing namespace changes with the proposer's clock,
//! linearizable reads, keep-alives, statfs; and, after a truncate, cutting the file's chunks
//! on storage.
//!
//! Identity: every request carries a token. The administrator's token (from the replica's
//! token file) may do anything, including the service-only commands (users, chain tables,
//! session pruning, purges). A *trusted* user's token (a FUSE mount's) acts as whatever
//! credentials the request claims, the way the kernel passes each caller's uid and gid. Any
//! other user's token acts as that user's uid and gid, whatever is claimed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ff_raft::{Consistency, RaftError, RaftNode};
use fs3_client::{ChunkClient, ChunkUpdate, ClientError};
use fs3_proto::meta::meta_server::Meta;
use fs3_proto::meta::{
    Command, CommandResult, Credentials, Inode, KeepAliveReply, KeepAliveRequest, Query,
    QueryResult, StatfsReply, StatfsRequest, TotalsQuery, User, UserQuery, command, query,
};
use fs3_proto::mgmtd::ListNodesRequest;
use fs3_proto::mgmtd::mgmtd_client::MgmtdClient;
use tonic::{Request, Response, Status};

use crate::machine::MetaMachine;
use crate::metrics::MetaMetrics;

/// How long a token's identity is cached before it is looked up again.
const USER_CACHE_TTL: Duration = Duration::from_secs(10);
/// Most tokens cached at once.
const USER_CACHE_CAPACITY: usize = 4096;
/// Most chunks cut in parallel after a truncate.
const CUT_PARALLELISM: usize = 16;

pub use ff_rpc::tokens::{new_token, token_hash};

/// Token -> (when looked up, who it stands for if anyone).
type IdentityCache = HashMap<String, (Instant, Option<Identity>)>;

/// Who a request comes from.
#[derive(Debug, Clone)]
enum Identity {
    Admin,
    Trusted,
    User(User),
}

/// Liveness of clients with sessions, as the leader has seen it.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    /// When this replica last became leader (None while it is not).
    pub(crate) leader_since: Option<Instant>,
    /// Last keep-alive per client.
    pub(crate) clients: HashMap<u64, Instant>,
}

/// The meta API of one replica. Cheap to clone.
#[derive(Clone)]
pub struct MetaApi {
    pub(crate) node: RaftNode<MetaMachine>,
    auth: bool,
    admin_hash: Arc<Vec<u8>>,
    identities: Arc<Mutex<IdentityCache>>,
    pub(crate) live: Arc<Mutex<Liveness>>,
    pub(crate) chunks: Arc<ChunkClient>,
    metrics: MetaMetrics,
    /// A client silent for this long loses its write sessions (told to clients in keep-alive
    /// replies, so that they pace themselves by it).
    pub(crate) session_lease: Duration,
}

/// The proposer's clock in ns since the epoch.
pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// The one place meta's raft errors become statuses.
fn status(error: RaftError) -> Status {
    error.into()
}

impl MetaApi {
    /// The API over `node`; `admin_token` is the administrator's token.
    pub fn new(
        node: RaftNode<MetaMachine>,
        auth: bool,
        admin_token: &str,
        chunks: Arc<ChunkClient>,
        metrics: MetaMetrics,
        session_lease: Duration,
    ) -> Self {
        MetaApi {
            node,
            auth,
            admin_hash: Arc::new(token_hash(admin_token)),
            identities: Arc::new(Mutex::new(HashMap::new())),
            live: Arc::new(Mutex::new(Liveness::default())),
            chunks,
            metrics,
            session_lease,
        }
    }

    pub(crate) fn metrics(&self) -> &MetaMetrics {
        &self.metrics
    }

    pub(crate) fn live(&self) -> std::sync::MutexGuard<'_, Liveness> {
        // Timestamps only; a poisoned lock still holds usable values.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn identify<T>(&self, request: &Request<T>) -> Result<Identity, Status> {
        let Some(token) = ff_rpc::token_of(request) else {
            if !self.auth {
                return Ok(Identity::Trusted);
            }
            return Err(Status::unauthenticated(
                "no token; pass --token, FS3_TOKEN or FS3_TOKEN_FILE (fs3 admin user add prints one)",
            ));
        };
        // Known tokens skip the hash and the lookup: this runs on every request.
        let cached = {
            let identities = self.identities.lock().unwrap_or_else(|p| p.into_inner());
            identities
                .get(token)
                .filter(|(at, _)| at.elapsed() < USER_CACHE_TTL)
                .map(|(_, identity)| identity.clone())
        };
        let identity = match cached {
            Some(identity) => identity,
            None => {
                let identity = self.look_up(token).await?;
                let mut identities = self.identities.lock().unwrap_or_else(|p| p.into_inner());
                if identities.len() >= USER_CACHE_CAPACITY {
                    identities.clear();
                }
                identities.insert(token.to_string(), (Instant::now(), identity.clone()));
                identity
            }
        };
        match identity {
            Some(identity) => Ok(identity),
            None if !self.auth => Ok(Identity::Trusted),
            None => Err(Status::unauthenticated("unknown token")),
        }
    }

    /// Who `token` stands for (None: nobody), from the admin token and the users table.
    async fn look_up(&self, token: &str) -> Result<Option<Identity>, Status> {
        let hash = token_hash(token);
        if hash == *self.admin_hash {
            return Ok(Some(Identity::Admin));
        }
        let result = self
            .node
            .read_with(
                Query {
                    creds: None,
                    op: Some(query::Op::User(UserQuery { token_sha256: hash })),
                },
                Consistency::Local,
            )
            .await
            .map_err(status)?;
        Ok(result.users.into_iter().next().map(|user| {
            if user.trusted {
                Identity::Trusted
            } else {
                Identity::User(user)
            }
        }))
    }

    /// The credentials a request acts with.
    fn credentials(identity: &Identity, claimed: Option<Credentials>) -> Credentials {
        match identity {
            Identity::Admin | Identity::Trusted => claimed.unwrap_or_default(),
            Identity::User(user) => Credentials {
                uid: user.uid,
                gid: user.gid,
                groups: Vec::new(),
            },
        }
    }

    /// Proposes `command` as the replica's own (service commands: chain tables, pruning,
    /// purges), with root credentials and this replica's clock.
    pub(crate) async fn propose_internal(
        &self,
        op: command::Op,
    ) -> Result<CommandResult, RaftError> {
        self.node
            .propose(Command {
                creds: Some(Credentials::default()),
                now_ns: now_ns(),
                op: Some(op),
            })
            .await
    }

    /// Cuts chunks of `inode` from `length` up to `upto` bytes: the chunk holding the new end
    /// is truncated, those wholly beyond it removed.
    pub(crate) async fn cut_chunks(
        &self,
        inode: &Inode,
        length: u64,
        upto: u64,
    ) -> Result<(), ClientError> {
        let Some(layout) = inode.layout.as_ref().filter(|l| !l.chains.is_empty()) else {
            return Ok(());
        };
        let chunk_size = layout.chunk_size.max(1);
        let first = length / chunk_size;
        let end = upto.min(fs3_client::MAX_FILE_SIZE).div_ceil(chunk_size);
        let jobs = (first..end).map(|index| {
            let (chain, id) = fs3_client::fs::chunk_place(inode.id, layout, index);
            let within = length.saturating_sub(index * chunk_size);
            let update = if within == 0 {
                ChunkUpdate::remove()
            } else {
                ChunkUpdate::truncate(u32::try_from(within).unwrap_or(u32::MAX))
            };
            let chunks = self.chunks.clone();
            async move {
                match chunks.write(chain, id, update).await {
                    Ok(_) | Err(ClientError::NotFound(_)) => Ok(()),
                    Err(error) => Err(error),
                }
            }
        });
        use futures::StreamExt as _;
        let results: Vec<Result<(), ClientError>> = futures::stream::iter(jobs)
            .buffer_unordered(CUT_PARALLELISM)
            .collect()
            .await;
        results.into_iter().collect()
    }

    async fn mutate(&self, request: Request<Command>) -> Result<CommandResult, Status> {
        let identity = self.identify(&request).await?;
        let mut command = request.into_inner();
        let Some(op) = command.op.as_ref() else {
            return Err(Status::invalid_argument("empty command"));
        };
        let service_only = matches!(
            op,
            command::Op::SetChainTable(_)
                | command::Op::AddUser(_)
                | command::Op::PruneSessions(_)
                | command::Op::Purge(_)
                | command::Op::Forget(_)
        );
        if service_only && !matches!(identity, Identity::Admin) {
            return Err(Status::permission_denied(
                "only the administrator's token may do this",
            ));
        }
        let truncating = match op {
            command::Op::SetAttr(op) => op.length,
            command::Op::Open(op) if op.truncate => Some(0),
            command::Op::Create(op) if op.truncate => Some(0),
            _ => None,
        };
        command.creds = Some(Self::credentials(&identity, command.creds.take()));
        command.now_ns = now_ns();
        if let (Identity::User(_), Some(command::Op::Open(open))) = (&identity, command.op.as_mut())
        {
            // Only a trusted client (a mount, whose kernel checked at open) may vouch for it.
            open.already_permitted = false;
        }
        let result = self.node.propose(command).await.map_err(status)?;
        if let (0, Some(length), Some(inode)) = (result.errno, truncating, result.inode.as_ref())
            && length < inode.max_length
        {
            // The new length is committed; chunks beyond it must go before the caller writes
            // again, or a later extension would show their old bytes.
            self.cut_chunks(inode, length, inode.max_length)
                .await
                .map_err(|e| Status::unavailable(format!("truncating chunks on storage: {e}")))?;
        }
        Ok(result)
    }

    async fn read(&self, request: Request<Query>) -> Result<QueryResult, Status> {
        let identity = self.identify(&request).await?;
        let mut query = request.into_inner();
        let Some(op) = query.op.as_ref() else {
            return Err(Status::invalid_argument("empty query"));
        };
        let service_only = matches!(
            op,
            query::Op::User(_) | query::Op::Gc(_) | query::Op::Sessions(_)
        );
        if service_only && !matches!(identity, Identity::Admin) {
            return Err(Status::permission_denied(
                "only the administrator's token may do this",
            ));
        }
        query.creds = Some(Self::credentials(&identity, query.creds.take()));
        self.node.read(query).await.map_err(status)
    }

    async fn statfs(&self, request: Request<StatfsRequest>) -> Result<StatfsReply, Status> {
        self.identify(&request).await?;
        let totals = self
            .node
            .read_with(
                Query {
                    creds: None,
                    op: Some(query::Op::Totals(TotalsQuery {})),
                },
                Consistency::Local,
            )
            .await
            .map_err(status)?;
        let (capacity, free) = self.storage_space().await;
        Ok(StatfsReply {
            capacity_bytes: capacity,
            free_bytes: free,
            used_bytes: totals.bytes,
            files: totals.files,
        })
    }

    /// Capacity and free space of the storage targets (as mgmtd last heard), divided by the
    /// replication factor; zeros when mgmtd cannot say.
    async fn storage_space(&self) -> (u64, u64) {
        let routing = self.chunks.routing().current();
        let replication = routing
            .info()
            .chains
            .iter()
            .map(|c| c.targets.len() as u64)
            .max()
            .unwrap_or(1)
            .max(1);
        let reply = self
            .chunks
            .routing()
            .mgmtd()
            .call_idempotent(|channel| async move {
                MgmtdClient::new(channel)
                    .list_nodes(ListNodesRequest {})
                    .await
            })
            .await;
        let Ok(reply) = reply else {
            return (0, 0);
        };
        let (capacity, free) = reply.targets.iter().fold((0u64, 0u64), |(c, f), t| {
            (
                c.saturating_add(t.capacity_bytes),
                f.saturating_add(t.free_bytes),
            )
        });
        (capacity / replication, free / replication)
    }
}

#[tonic::async_trait]
impl Meta for MetaApi {
    async fn mutate(&self, request: Request<Command>) -> Result<Response<CommandResult>, Status> {
        let op = match request.get_ref().op.as_ref() {
            Some(op) => crate::metrics::command_name(op),
            None => "empty",
        };
        self.metrics
            .requests
            .timed(op, MetaApi::mutate(self, request))
            .await
            .map(Response::new)
    }

    async fn read(&self, request: Request<Query>) -> Result<Response<QueryResult>, Status> {
        let op = match request.get_ref().op.as_ref() {
            Some(op) => crate::metrics::query_name(op),
            None => "empty",
        };
        self.metrics
            .requests
            .timed(op, MetaApi::read(self, request))
            .await
            .map(Response::new)
    }

    async fn keep_alive(
        &self,
        request: Request<KeepAliveRequest>,
    ) -> Result<Response<KeepAliveReply>, Status> {
        self.identify(&request).await?;
        // Only the leader judges session leases, so only the leader hears keep-alives.
        self.node.require_leader("meta")?;
        let client = request.into_inner().client;
        if client == 0 {
            return Err(Status::invalid_argument("client id 0 is reserved"));
        }
        self.live().clients.insert(client, Instant::now());
        Ok(Response::new(KeepAliveReply {
            session_lease_ms: u64::try_from(self.session_lease.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn statfs(
        &self,
        request: Request<StatfsRequest>,
    ) -> Result<Response<StatfsReply>, Status> {
        self.metrics
            .requests
            .timed("statfs", MetaApi::statfs(self, request))
            .await
            .map(Response::new)
    }
}
