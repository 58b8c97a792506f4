//! The `Raft` gRPC service: proposals, reads, status and membership for clients and operators.
//! Every error becomes a status through `From<RaftError> for Status` (in `error.rs`), the one
//! place where that mapping lives.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::node::{Consistency, GroupStatus, NodeCore};
use crate::proto::raft_server::Raft;
use crate::proto::{
    AddMemberRequest, MemberStatus, ProposeReply, ProposeRequest, ReadConsistency, ReadReply,
    ReadRequest, RemoveMemberRequest, StatusReply, StatusRequest, TransferLeaderRequest,
};

/// Request metadata marking a request already forwarded once; its receiver answers with a
/// leader hint instead of forwarding again, so forwarding can never loop.
pub(crate) const FORWARDED_KEY: &str = "ff-forwarded";

/// Implementation of the `Raft` gRPC service over one node.
pub struct RaftApi {
    core: Arc<NodeCore>,
}

impl RaftApi {
    pub(crate) fn new(core: Arc<NodeCore>) -> Self {
        RaftApi { core }
    }
}

fn may_forward<T>(request: &Request<T>) -> bool {
    request.metadata().get(FORWARDED_KEY).is_none()
}

/// The wire form of a status.
pub fn status_reply(status: &GroupStatus) -> StatusReply {
    StatusReply {
        id: status.id,
        role: status.role.as_str().to_string(),
        term: status.term,
        leader_id: status.leader_id,
        leader_addr: status.leader_addr.clone().unwrap_or_default(),
        commit_index: status.commit_index,
        applied_index: status.applied_index,
        first_index: status.first_index,
        last_index: status.last_index,
        members: status
            .members
            .iter()
            .map(|m| MemberStatus {
                id: m.id,
                addr: m.addr.clone(),
                voter: m.voter,
                matched: m.matched,
            })
            .collect(),
        cluster: status.cluster.clone(),
    }
}

#[tonic::async_trait]
impl Raft for RaftApi {
    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<Response<ProposeReply>, Status> {
        let forward = may_forward(&request);
        let ProposeRequest { id, command } = request.into_inner();
        // A client without its own id still gets at-most-once application of this node's
        // internal retries.
        let ticket;
        let id = match id.filter(|id| id.client != 0) {
            Some(id) => id,
            None => {
                ticket = self.core.ids().begin();
                ticket.id()
            }
        };
        let response = self.core.propose_bytes(id, command, forward).await?;
        Ok(Response::new(ProposeReply { response }))
    }

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadReply>, Status> {
        let ReadRequest { query, consistency } = request.into_inner();
        let consistency = match ReadConsistency::try_from(consistency) {
            Ok(ReadConsistency::Linearizable) => Consistency::Linearizable,
            Ok(ReadConsistency::Local) => Consistency::Local,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown read consistency {consistency}"
                )));
            }
        };
        let (response, applied_index) = self.core.read_bytes(query, consistency).await?;
        Ok(Response::new(ReadReply {
            response,
            applied_index,
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        Ok(Response::new(status_reply(&self.core.status())))
    }

    async fn add_member(
        &self,
        request: Request<AddMemberRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let forward = may_forward(&request);
        let AddMemberRequest {
            id,
            addr,
            learner_only,
        } = request.into_inner();
        self.core
            .add_member(id, &addr, learner_only, forward)
            .await?;
        Ok(Response::new(status_reply(&self.core.status())))
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let forward = may_forward(&request);
        let id = request.into_inner().id;
        self.core.remove_member(id, forward).await?;
        Ok(Response::new(status_reply(&self.core.status())))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let forward = may_forward(&request);
        let to = request.into_inner().to;
        self.core.transfer_leader(to, forward).await?;
        Ok(Response::new(status_reply(&self.core.status())))
    }
}
