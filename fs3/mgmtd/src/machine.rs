//! The cluster manager's replicated state: one `ClusterState` (nodes, targets, chains, chain
//! tables and the routing version) kept in the raft group's `state.redb`. The whole state is
//! small (thousands of targets) and changes rarely — heartbeats are not replicated — so it is
//! stored and snapshotted as one record. Every change bumps the routing version, which clients
//! and services compare to know when to refresh.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use ff_raft::redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use ff_raft::{ApplyContext, StateMachine, StateMachineError};
use fs3_proto::mgmtd::{
    BootstrapRequest, Chain, ChainTable, ChainTarget, ClusterState, Command, CommandResult,
    CreateChainTableRequest, CreateChainsRequest, Node, PublicState, Query, RegisterTargets,
    RoutingInfo, SetTargetOfflineRequest, Target, UpdateChains, command,
};
use prost::Message as _;

const STATE: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("mgmtd_state");
const KEY: &str = "cluster";

/// The cluster manager's state machine.
#[derive(Debug, Default, Clone, Copy)]
pub struct MgmtdMachine;

fn load(txn: &impl TableSource) -> Result<ClusterState, StateMachineError> {
    let Some(bytes) = txn.read_state()? else {
        return Ok(ClusterState {
            routing: Some(RoutingInfo::default()),
        });
    };
    ClusterState::decode(bytes.as_slice())
        .map_err(|e| StateMachineError::Corrupt(format!("cluster state does not decode: {e}")))
}

/// Reading the state from either kind of transaction.
trait TableSource {
    fn read_state(&self) -> Result<Option<Vec<u8>>, StateMachineError>;
}

impl TableSource for WriteTransaction {
    fn read_state(&self) -> Result<Option<Vec<u8>>, StateMachineError> {
        let table = self.open_table(STATE)?;
        Ok(table.get(KEY)?.map(|v| v.value().to_vec()))
    }
}

impl TableSource for ReadTransaction {
    fn read_state(&self) -> Result<Option<Vec<u8>>, StateMachineError> {
        let table = self.open_table(STATE)?;
        Ok(table.get(KEY)?.map(|v| v.value().to_vec()))
    }
}

fn store(txn: &WriteTransaction, state: &ClusterState) -> Result<(), StateMachineError> {
    let mut table = txn.open_table(STATE)?;
    table.insert(KEY, state.encode_to_vec().as_slice())?;
    Ok(())
}

/// Applies one command to the routing information; `Err` is a refusal that changes nothing.
pub fn apply_command(routing: &mut RoutingInfo, command: Command) -> Result<bool, String> {
    match command.op {
        Some(command::Op::RegisterNode(node)) => register_node(routing, node),
        Some(command::Op::RegisterTargets(targets)) => register_targets(routing, targets),
        Some(command::Op::CreateChains(request)) => create_chains(routing, request),
        Some(command::Op::CreateChainTable(request)) => create_chain_table(routing, request),
        Some(command::Op::Bootstrap(request)) => bootstrap(routing, request),
        Some(command::Op::UpdateChains(updates)) => update_chains(routing, updates),
        Some(command::Op::SetTargetOffline(request)) => set_target_offline(routing, request),
        None => Err("empty command".to_string()),
    }
}

fn register_node(routing: &mut RoutingInfo, node: Node) -> Result<bool, String> {
    if node.id == 0 {
        return Err("node id 0 is invalid".to_string());
    }
    if node.addr.is_empty() {
        return Err(format!("node {} has no address", node.id));
    }
    match routing.nodes.iter_mut().find(|n| n.id == node.id) {
        Some(existing) if *existing == node => Ok(false),
        Some(existing) => {
            *existing = node;
            Ok(true)
        }
        None => {
            routing.nodes.push(node);
            routing.nodes.sort_by_key(|n| n.id);
            Ok(true)
        }
    }
}

fn register_targets(routing: &mut RoutingInfo, request: RegisterTargets) -> Result<bool, String> {
    for target in &request.targets {
        if target.id == 0 {
            return Err("target id 0 is invalid".to_string());
        }
        if !routing.nodes.iter().any(|n| n.id == target.node_id) {
            return Err(format!(
                "target {} names unknown node {}",
                target.id, target.node_id
            ));
        }
        if let Some(existing) = routing
            .targets
            .iter()
            .find(|t| t.id == target.id && t.node_id != target.node_id)
        {
            return Err(format!(
                "target {} belongs to node {}, not node {}",
                target.id, existing.node_id, target.node_id
            ));
        }
    }
    let mut changed = false;
    for target in request.targets {
        match routing.targets.iter_mut().find(|t| t.id == target.id) {
            Some(existing) if existing.path == target.path => {}
            Some(existing) => {
                existing.path = target.path;
                changed = true;
            }
            None => {
                routing.targets.push(Target {
                    admin_offline: false,
                    ..target
                });
                changed = true;
            }
        }
    }
    routing.targets.sort_by_key(|t| t.id);
    Ok(changed)
}

/// Targets that already belong to a chain.
fn chained_targets(routing: &RoutingInfo) -> BTreeSet<u64> {
    routing
        .chains
        .iter()
        .flat_map(|c| c.targets.iter().map(|t| t.target_id))
        .collect()
}

fn create_chains(routing: &mut RoutingInfo, request: CreateChainsRequest) -> Result<bool, String> {
    let mut used = chained_targets(routing);
    let mut new = Vec::new();
    for spec in request.chains {
        if spec.id == 0 {
            return Err("chain id 0 is invalid".to_string());
        }
        if let Some(existing) = routing.chains.iter().find(|c| c.id == spec.id) {
            let same: Vec<u64> = existing.targets.iter().map(|t| t.target_id).collect();
            if same == spec.targets {
                continue;
            }
            return Err(format!(
                "chain {} already exists with targets {same:?}",
                spec.id
            ));
        }
        if spec.targets.is_empty() {
            return Err(format!("chain {} has no targets", spec.id));
        }
        let mut nodes = BTreeSet::new();
        for target in &spec.targets {
            let record = routing
                .targets
                .iter()
                .find(|t| t.id == *target)
                .ok_or_else(|| format!("chain {}: target {target} is not registered", spec.id))?;
            if !used.insert(*target) {
                return Err(format!(
                    "chain {}: target {target} already belongs to a chain",
                    spec.id
                ));
            }
            if !nodes.insert(record.node_id) {
                return Err(format!(
                    "chain {}: two of its targets are on node {}; replicas must be on different nodes",
                    spec.id, record.node_id
                ));
            }
        }
        new.push(Chain {
            id: spec.id,
            version: 1,
            targets: spec
                .targets
                .iter()
                .map(|t| ChainTarget {
                    target_id: *t,
                    state: PublicState::Serving as i32,
                })
                .collect(),
        });
    }
    let changed = !new.is_empty();
    routing.chains.extend(new);
    routing.chains.sort_by_key(|c| c.id);
    Ok(changed)
}

fn create_chain_table(
    routing: &mut RoutingInfo,
    request: CreateChainTableRequest,
) -> Result<bool, String> {
    if request.id == 0 {
        return Err("chain table id 0 is invalid".to_string());
    }
    if request.chains.is_empty() {
        return Err(format!("chain table {} has no chains", request.id));
    }
    for chain in &request.chains {
        if !routing.chains.iter().any(|c| c.id == *chain) {
            return Err(format!(
                "chain table {}: chain {chain} does not exist",
                request.id
            ));
        }
    }
    let table = ChainTable {
        id: request.id,
        chains: request.chains,
    };
    match routing.tables.iter_mut().find(|t| t.id == table.id) {
        Some(existing) if *existing == table => Ok(false),
        Some(existing) => {
            *existing = table;
            Ok(true)
        }
        None => {
            routing.tables.push(table);
            routing.tables.sort_by_key(|t| t.id);
            Ok(true)
        }
    }
}

/// Chains every unchained target into chains of `replication` targets on distinct nodes,
/// taking each time from the nodes with the most unchained targets (so load spreads evenly),
/// and makes them chain table `table_id`.
fn bootstrap(routing: &mut RoutingInfo, request: BootstrapRequest) -> Result<bool, String> {
    let replication = request.replication as usize;
    if replication == 0 {
        return Err("replication must be at least 1".to_string());
    }
    if routing.tables.iter().any(|t| t.id == request.table_id) {
        return Err(format!("chain table {} already exists", request.table_id));
    }
    let used = chained_targets(routing);
    let mut free: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for target in routing.targets.iter().filter(|t| !used.contains(&t.id)) {
        free.entry(target.node_id).or_default().push(target.id);
    }
    if free.len() < replication {
        return Err(format!(
            "replication {replication} needs unchained targets on {replication} nodes; {} nodes have some",
            free.len()
        ));
    }
    let mut next_id = routing.chains.iter().map(|c| c.id).max().unwrap_or(0) + 1;
    let mut specs = Vec::new();
    let mut round = 0usize;
    loop {
        let mut nodes: Vec<(usize, u64)> = free
            .iter()
            .filter(|(_, targets)| !targets.is_empty())
            .map(|(node, targets)| (targets.len(), *node))
            .collect();
        if nodes.len() < replication {
            break;
        }
        // Most free targets first; rotate ties by round so heads spread over nodes.
        nodes.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut picked: Vec<u64> = nodes.iter().take(replication).map(|(_, n)| *n).collect();
        let shift = round % picked.len();
        picked.rotate_left(shift);
        let targets: Vec<u64> = picked
            .iter()
            .filter_map(|node| {
                free.get_mut(node)
                    .and_then(|t| (!t.is_empty()).then(|| t.remove(0)))
            })
            .collect();
        specs.push(fs3_proto::mgmtd::ChainSpec {
            id: next_id,
            targets,
        });
        next_id += 1;
        round += 1;
    }
    if specs.is_empty() {
        return Err("no unchained targets to build chains from".to_string());
    }
    let chain_ids: Vec<u64> = specs.iter().map(|s| s.id).collect();
    create_chains(routing, CreateChainsRequest { chains: specs })?;
    create_chain_table(
        routing,
        CreateChainTableRequest {
            id: request.table_id,
            chains: chain_ids,
        },
    )
}

fn update_chains(routing: &mut RoutingInfo, request: UpdateChains) -> Result<bool, String> {
    let mut changed = false;
    for update in request.updates {
        let Some(new) = update.chain else { continue };
        let Some(chain) = routing.chains.iter_mut().find(|c| c.id == new.id) else {
            continue;
        };
        // A decision made on an older version of the chain is stale; the detector retries.
        if chain.version != update.expected_version || new.version != update.expected_version + 1 {
            continue;
        }
        let mut before: Vec<u64> = chain.targets.iter().map(|t| t.target_id).collect();
        let mut after: Vec<u64> = new.targets.iter().map(|t| t.target_id).collect();
        before.sort_unstable();
        after.sort_unstable();
        if before != after {
            return Err(format!(
                "chain {}: an update may reorder targets, not change them",
                new.id
            ));
        }
        *chain = new;
        changed = true;
    }
    Ok(changed)
}

fn set_target_offline(
    routing: &mut RoutingInfo,
    request: SetTargetOfflineRequest,
) -> Result<bool, String> {
    let target = routing
        .targets
        .iter_mut()
        .find(|t| t.id == request.target_id)
        .ok_or_else(|| format!("target {} is not registered", request.target_id))?;
    if target.admin_offline == request.offline {
        return Ok(false);
    }
    target.admin_offline = request.offline;
    Ok(true)
}

impl StateMachine for MgmtdMachine {
    type Command = Command;
    type Response = CommandResult;
    type Query = Query;
    type QueryResponse = RoutingInfo;

    fn init(&self, txn: &WriteTransaction) -> Result<(), StateMachineError> {
        txn.open_table(STATE)?;
        Ok(())
    }

    fn apply(
        &self,
        txn: &WriteTransaction,
        _ctx: ApplyContext,
        command: Command,
    ) -> Result<CommandResult, StateMachineError> {
        let mut state = load(txn)?;
        let routing = state.routing.get_or_insert_with(RoutingInfo::default);
        let mut candidate = routing.clone();
        match apply_command(&mut candidate, command) {
            Ok(true) => {
                candidate.version += 1;
                *routing = candidate;
                let version = routing.version;
                store(txn, &state)?;
                Ok(CommandResult {
                    error: String::new(),
                    routing_version: version,
                })
            }
            Ok(false) => Ok(CommandResult {
                error: String::new(),
                routing_version: routing.version,
            }),
            Err(error) => Ok(CommandResult {
                error,
                routing_version: routing.version,
            }),
        }
    }

    fn query(&self, txn: &ReadTransaction, query: Query) -> Result<RoutingInfo, StateMachineError> {
        let routing = load(txn)?.routing.unwrap_or_default();
        // A caller that knows this version or a newer one (this replica may lag) gets nothing.
        if query.known_version >= routing.version && query.known_version != 0 {
            return Ok(RoutingInfo {
                version: routing.version,
                changed: false,
                ..RoutingInfo::default()
            });
        }
        Ok(RoutingInfo {
            changed: true,
            ..routing
        })
    }

    fn snapshot(
        &self,
        txn: &ReadTransaction,
        out: &mut dyn Write,
    ) -> Result<(), StateMachineError> {
        out.write_all(&load(txn)?.encode_to_vec())?;
        Ok(())
    }

    fn restore(
        &self,
        txn: &WriteTransaction,
        input: &mut dyn Read,
    ) -> Result<(), StateMachineError> {
        let mut bytes = Vec::new();
        input.read_to_end(&mut bytes)?;
        let state = ClusterState::decode(bytes.as_slice()).map_err(|e| {
            StateMachineError::Corrupt(format!("cluster state in snapshot does not decode: {e}"))
        })?;
        store(txn, &state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fs3_proto::mgmtd::{ChainSpec, ChainUpdate, NodeKind};

    fn cluster(nodes: u64, targets_per_node: u64) -> RoutingInfo {
        let mut routing = RoutingInfo::default();
        for n in 1..=nodes {
            let node = Node {
                id: n,
                kind: NodeKind::Storage as i32,
                addr: format!("127.0.0.1:{}", 9000 + n),
                hostname: format!("host{n}"),
            };
            assert!(register_node(&mut routing, node).unwrap());
            let targets = (1..=targets_per_node)
                .map(|t| Target {
                    id: n * 100 + t,
                    node_id: n,
                    path: format!("/disk{t}"),
                    admin_offline: false,
                })
                .collect();
            register_targets(&mut routing, RegisterTargets { targets }).unwrap();
        }
        routing
    }

    #[test]
    fn bootstrap_spreads_replicas_over_distinct_nodes() {
        let mut routing = cluster(3, 4);
        bootstrap(
            &mut routing,
            BootstrapRequest {
                table_id: 1,
                replication: 3,
            },
        )
        .unwrap();
        assert_eq!(routing.chains.len(), 4);
        assert_eq!(routing.tables[0].chains, vec![1, 2, 3, 4]);
        let mut heads = BTreeMap::new();
        for chain in &routing.chains {
            let nodes: BTreeSet<u64> = chain.targets.iter().map(|t| t.target_id / 100).collect();
            assert_eq!(nodes.len(), 3, "{chain:?}");
            *heads.entry(chain.targets[0].target_id / 100).or_insert(0) += 1;
        }
        // Heads rotate over the nodes.
        assert!(heads.len() >= 2, "{heads:?}");
        // Every target is used once.
        assert_eq!(chained_targets(&routing).len(), 12);
        // Bootstrapping the same table again is refused; nothing left to chain anyway.
        assert!(
            bootstrap(
                &mut routing,
                BootstrapRequest {
                    table_id: 1,
                    replication: 3
                }
            )
            .is_err()
        );
        assert!(
            bootstrap(
                &mut routing,
                BootstrapRequest {
                    table_id: 2,
                    replication: 3
                }
            )
            .is_err()
        );
    }

    #[test]
    fn bootstrap_with_too_few_nodes_is_refused() {
        let mut routing = cluster(2, 3);
        let error = bootstrap(
            &mut routing,
            BootstrapRequest {
                table_id: 1,
                replication: 3,
            },
        )
        .unwrap_err();
        assert!(error.contains("3 nodes"), "{error}");
        bootstrap(
            &mut routing,
            BootstrapRequest {
                table_id: 1,
                replication: 1,
            },
        )
        .unwrap();
        assert_eq!(routing.chains.len(), 6);
    }

    #[test]
    fn bad_chains_are_refused_whole() {
        let mut routing = cluster(3, 2);
        let before = routing.clone();
        let request = CreateChainsRequest {
            chains: vec![
                ChainSpec {
                    id: 1,
                    targets: vec![101, 201, 301],
                },
                ChainSpec {
                    id: 2,
                    targets: vec![102, 103],
                },
            ],
        };
        assert!(create_chains(&mut routing.clone(), request).is_err());
        let same_node = CreateChainsRequest {
            chains: vec![ChainSpec {
                id: 3,
                targets: vec![101, 102],
            }],
        };
        assert!(
            create_chains(&mut routing, same_node)
                .unwrap_err()
                .contains("different nodes")
        );
        let unknown = CreateChainsRequest {
            chains: vec![ChainSpec {
                id: 3,
                targets: vec![999],
            }],
        };
        assert!(create_chains(&mut routing, unknown).is_err());
        assert_eq!(routing, before);
        let moved = RegisterTargets {
            targets: vec![Target {
                id: 101,
                node_id: 2,
                path: "/x".into(),
                admin_offline: false,
            }],
        };
        assert!(
            register_targets(&mut routing, moved)
                .unwrap_err()
                .contains("belongs to node 1")
        );
    }

    #[test]
    fn stale_chain_updates_are_ignored() {
        let mut routing = cluster(3, 1);
        create_chains(
            &mut routing,
            CreateChainsRequest {
                chains: vec![ChainSpec {
                    id: 1,
                    targets: vec![101, 201, 301],
                }],
            },
        )
        .unwrap();
        let mut next = routing.chains[0].clone();
        next.version = 2;
        next.targets.rotate_left(1);
        next.targets[2].state = PublicState::Offline as i32;
        let update = |expected| UpdateChains {
            updates: vec![ChainUpdate {
                expected_version: expected,
                chain: Some(next.clone()),
            }],
        };
        assert!(!update_chains(&mut routing, update(7)).unwrap());
        assert!(update_chains(&mut routing, update(1)).unwrap());
        assert_eq!(routing.chains[0].version, 2);
        assert!(!update_chains(&mut routing, update(1)).unwrap());
    }
}
