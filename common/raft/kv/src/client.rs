//! A client of an ff-kv cluster: key-value operations and raft administration over the generic
//! `Raft` gRPC service, following the leader with ff-rpc's `LeaderClient`.

use ff_raft::RequestIds;
use ff_raft::proto::raft_client::RaftClient;
use ff_raft::proto::{
    AddMemberRequest, ProposeRequest, ReadConsistency, ReadRequest, RemoveMemberRequest, RequestId,
    StatusReply, StatusRequest, TransferLeaderRequest,
};
use ff_rpc::{ClientOptions, LeaderClient};
use prost::Message as _;
use tonic::Status;
use tonic::transport::Channel;

use crate::proto::{
    Command, CommandResult, Delete, Get, Item, Put, Query, QueryResult, Scan, command, query,
};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The cluster answered with an error, or could not be reached.
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(Status),
    /// The store refused the command (e.g. an oversized key).
    #[error("refused: {0}")]
    Refused(String),
    /// The reply did not decode.
    #[error("invalid reply: {0}")]
    Decode(String),
    /// An endpoint address is unusable.
    #[error(transparent)]
    Endpoint(#[from] ff_rpc::RpcError),
}

impl From<Status> for KvError {
    fn from(status: Status) -> Self {
        KvError::Rpc(status)
    }
}

/// A client of one cluster.
#[derive(Debug)]
pub struct KvClient {
    leader: LeaderClient,
    ids: RequestIds,
}

fn raft(channel: Channel) -> RaftClient<Channel> {
    RaftClient::new(channel).max_decoding_message_size(64 << 20)
}

impl KvClient {
    /// A client over `endpoints` (`host:port` of any members).
    pub fn new(endpoints: Vec<String>, options: ClientOptions) -> Result<Self, KvError> {
        Ok(KvClient {
            leader: LeaderClient::new(endpoints, options)?,
            ids: RequestIds::new(),
        })
    }

    /// A fresh request id that is never marked settled, for callers that retry a request
    /// themselves: a retry must reuse its id.
    pub fn next_id(&self) -> RequestId {
        self.ids.untracked()
    }

    /// Proposes `command` under request id `id`; the cluster applies one id at most once.
    pub async fn propose(
        &self,
        id: RequestId,
        command: &Command,
    ) -> Result<CommandResult, KvError> {
        let bytes = command.encode_to_vec();
        let reply = self
            .leader
            .call_idempotent(|channel| {
                let request = ProposeRequest {
                    id: Some(id),
                    command: bytes.clone(),
                };
                async move { raft(channel).propose(request).await }
            })
            .await?;
        let result = CommandResult::decode(reply.response.as_slice())
            .map_err(|e| KvError::Decode(e.to_string()))?;
        if !result.error.is_empty() {
            return Err(KvError::Refused(result.error));
        }
        Ok(result)
    }

    /// Sets `key` to `value`; returns the key's new version.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<u64, KvError> {
        let command = Command {
            op: Some(command::Op::Put(Put {
                key: key.to_vec(),
                value: value.to_vec(),
            })),
        };
        let ticket = self.ids.begin();
        Ok(self.propose(ticket.id(), &command).await?.version)
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, KvError> {
        let command = Command {
            op: Some(command::Op::Delete(Delete { key: key.to_vec() })),
        };
        let ticket = self.ids.begin();
        Ok(self.propose(ticket.id(), &command).await?.existed)
    }

    async fn query(&self, query: &Query) -> Result<QueryResult, KvError> {
        let bytes = query.encode_to_vec();
        let reply = self
            .leader
            .call_idempotent(|channel| {
                let request = ReadRequest {
                    query: bytes.clone(),
                    consistency: ReadConsistency::Linearizable as i32,
                };
                async move { raft(channel).read(request).await }
            })
            .await?;
        QueryResult::decode(reply.response.as_slice()).map_err(|e| KvError::Decode(e.to_string()))
    }

    /// The item at `key`, linearizably.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Item>, KvError> {
        let query = Query {
            op: Some(query::Op::Get(Get { key: key.to_vec() })),
        };
        Ok(self.query(&query).await?.items.into_iter().next())
    }

    /// Items with keys in `[start, end)` (`end` empty: no bound), at most `limit`, linearizably.
    pub async fn scan(&self, start: &[u8], end: &[u8], limit: u32) -> Result<Vec<Item>, KvError> {
        Ok(self.query(&scan_query(start, end, limit)).await?.items)
    }

    /// A scan answered by the node at `endpoint` from its own applied state.
    pub async fn scan_local(
        &self,
        endpoint: &str,
        start: &[u8],
        end: &[u8],
        limit: u32,
    ) -> Result<(Vec<Item>, u64), KvError> {
        let request = ReadRequest {
            query: scan_query(start, end, limit).encode_to_vec(),
            consistency: ReadConsistency::Local as i32,
        };
        let reply = raft(self.leader.channel_to(endpoint)?)
            .read(request)
            .await?
            .into_inner();
        let result = QueryResult::decode(reply.response.as_slice())
            .map_err(|e| KvError::Decode(e.to_string()))?;
        Ok((result.items, reply.applied_index))
    }

    /// The status of the node at `endpoint`.
    pub async fn status_of(&self, endpoint: &str) -> Result<StatusReply, KvError> {
        Ok(raft(self.leader.channel_to(endpoint)?)
            .status(StatusRequest {})
            .await?
            .into_inner())
    }

    /// The status of every known endpoint.
    pub async fn statuses(&self) -> Vec<(String, Result<StatusReply, KvError>)> {
        let endpoints = self.leader.endpoints();
        let calls = endpoints.iter().map(|e| self.status_of(e));
        let results = futures::future::join_all(calls).await;
        endpoints.into_iter().zip(results).collect()
    }

    /// Adds member `id` at `addr` (a learner first, then a voter unless `learner_only`).
    pub async fn add_member(
        &self,
        id: u64,
        addr: &str,
        learner_only: bool,
    ) -> Result<StatusReply, KvError> {
        let request = AddMemberRequest {
            id,
            addr: addr.to_string(),
            learner_only,
        };
        Ok(self
            .leader
            .call(|channel| {
                let request = request.clone();
                async move { raft(channel).add_member(request).await }
            })
            .await?)
    }

    /// Removes member `id`.
    pub async fn remove_member(&self, id: u64) -> Result<StatusReply, KvError> {
        Ok(self
            .leader
            .call(|channel| async move {
                raft(channel)
                    .remove_member(RemoveMemberRequest { id })
                    .await
            })
            .await?)
    }

    /// Moves leadership to `to`.
    pub async fn transfer_leader(&self, to: u64) -> Result<StatusReply, KvError> {
        Ok(self
            .leader
            .call(|channel| async move {
                raft(channel)
                    .transfer_leader(TransferLeaderRequest { to })
                    .await
            })
            .await?)
    }
}

fn scan_query(start: &[u8], end: &[u8], limit: u32) -> Query {
    Query {
        op: Some(query::Op::Scan(Scan {
            start: start.to_vec(),
            end: end.to_vec(),
            limit,
        })),
    }
}
