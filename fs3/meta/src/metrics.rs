//! Prometheus series of a meta replica (besides ff-raft's own): its API's requests by
//! operation and outcome, their latency, and the garbage collector's and session pruner's work.

use ff_metrics::RequestMetrics;
use fs3_proto::meta::{command, query};
use prometheus::{IntCounter, Registry};

/// The name of a command, as a label.
pub fn command_name(op: &command::Op) -> &'static str {
    use command::Op;
    match op {
        Op::Create(_) => "create",
        Op::Remove(_) => "remove",
        Op::Rename(_) => "rename",
        Op::Link(_) => "link",
        Op::SetAttr(_) => "set_attr",
        Op::Open(_) => "open",
        Op::Close(_) => "close",
        Op::SetLayout(_) => "set_layout",
        Op::SetChainTable(_) => "set_chain_table",
        Op::AddUser(_) => "add_user",
        Op::PruneSessions(_) => "prune_sessions",
        Op::Purge(_) => "purge",
        Op::Forget(_) => "forget",
    }
}

/// The name of a query, as a label.
pub fn query_name(op: &query::Op) -> &'static str {
    use query::Op;
    match op {
        Op::Lookup(_) => "lookup",
        Op::GetAttr(_) => "get_attr",
        Op::ReadDir(_) => "read_dir",
        Op::User(_) => "user",
        Op::Gc(_) => "gc",
        Op::Sessions(_) => "sessions",
        Op::ChainTable(_) => "chain_table",
        Op::Totals(_) => "totals",
    }
}

/// The metrics of one meta replica.
#[derive(Clone, Debug)]
pub struct MetaMetrics {
    /// The API's requests.
    pub requests: RequestMetrics,
    /// Unlinked files whose chunks were removed and which were forgotten.
    pub files_collected: IntCounter,
    /// Sessions ended because their client went silent.
    pub clients_expired: IntCounter,
}

impl MetaMetrics {
    /// Registers the series in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        ff_metrics::register_build_info(registry, "fs3_meta")?;
        let requests = RequestMetrics::register(
            registry,
            "fs3_meta",
            "meta API",
            &[
                "create", "remove", "rename", "lookup", "get_attr", "read_dir",
            ],
        )?;
        let files_collected = IntCounter::new(
            "fs3_meta_gc_files_total",
            "Unlinked files whose chunks were removed from storage",
        )?;
        let clients_expired = IntCounter::new(
            "fs3_meta_expired_clients_total",
            "Clients whose write sessions were ended because they went silent",
        )?;
        registry.register(Box::new(files_collected.clone()))?;
        registry.register(Box::new(clients_expired.clone()))?;
        Ok(MetaMetrics {
            requests,
            files_collected,
            clients_expired,
        })
    }
}
