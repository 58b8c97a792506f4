//! Asking the replicas of a raft group (mgmtd, meta, hai servers) who leads: what tests and
//! readiness probes wait on after starting or killing replicas.

use std::time::Duration;

use ff_raft::proto::raft_client::RaftClient;
use ff_raft::proto::{StatusReply, StatusRequest};
use ff_rpc::LeaderClient;

use crate::NotReady;

/// The raft status of the replica `name` at `addr`.
pub async fn status(client: &LeaderClient, name: &str, addr: &str) -> Result<StatusReply, String> {
    let channel = client.channel_to(addr).map_err(|e| e.to_string())?;
    tokio::time::timeout(
        Duration::from_secs(2),
        RaftClient::new(channel).status(StatusRequest {}),
    )
    .await
    .map_err(|_| format!("{name}: status timed out"))?
    .map(tonic::Response::into_inner)
    .map_err(|s| format!("{name}: {}", s.message()))
}

/// The leader every replica in `members` (name, address) names, if they all name the same one
/// and it is not `not`: one probe for [`crate::wait_for`].
pub async fn agreed_leader(
    client: &LeaderClient,
    members: &[(String, String)],
    not: Option<u64>,
) -> Result<u64, NotReady> {
    let mut leaders = Vec::with_capacity(members.len());
    for (name, addr) in members {
        leaders.push(
            status(client, name, addr)
                .await
                .map_err(NotReady::from)?
                .leader_id,
        );
    }
    let first = leaders.first().copied().unwrap_or(0);
    if first != 0 && Some(first) != not && leaders.iter().all(|l| *l == first) {
        Ok(first)
    } else {
        Err(format!("leaders seen: {leaders:?}").into())
    }
}
