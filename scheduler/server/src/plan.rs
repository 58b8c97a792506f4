//! The scheduling policy, as a pure function of the state: what to place, whom to preempt, and
//! why every other waiting job waits. The leader's loop ([`crate::service`]) turns the plan into
//! commands; each is checked again when applied, so a plan made from a slightly old view is
//! safe. The reasons are never written: any replica answering a query runs the same function
//! over its state.
//!
//! Policy:
//! - Waiting jobs (pending, or suspended and requeued) go by priority, then submission order (a
//!   requeued job keeps its place).
//! - Gang placement: all of a job's nodes at once or none; a node takes a job if its free GPUs,
//!   CPUs and memory cover the job's per-node ask. Best fit: the fullest nodes that fit first.
//! - The first job that does not fit is the head: nodes are reserved for it, and later jobs may
//!   only backfill onto unreserved nodes, so they never delay it.
//! - Time-sharing: when the head does not fit even after the jobs already stopping have
//!   released their nodes, the cheapest set of running jobs of lower priority is suspended
//!   (lowest priority first, most recently started first — least work lost), then pruned of any
//!   job not needed. A job never preempts one of its own priority, so never one of the same
//!   user at the same priority.
//! - Jobs larger than the cluster, or over their user's quota, wait with that reason and do
//!   not block others; so do jobs that run after others (`after`) not completed yet. A job
//!   after one that is no longer in the plan's view has its dependency completed: the state
//!   cancels the jobs after one that fails or is cancelled in the same step.

use std::collections::{BTreeMap, BTreeSet};

use hai_proto::{Job, JobState, Node, NodeState, PlaceOp, PlacedNode, Placement, User};

use crate::state::{Demand, Resources, held_nodes, is_waiting, ranks_per_node};

/// What the leader should do now.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Jobs to start.
    pub place: Vec<PlaceOp>,
    /// Running jobs to suspend, with the reason they are told.
    pub preempt: Vec<(u64, String)>,
    /// Why each waiting job not placed waits.
    pub reasons: Vec<(u64, String)>,
}

/// Free resources per node, as they are now and as they will be once stopping jobs are gone.
struct Capacity<'n> {
    /// Usable nodes (up, not draining), by name.
    nodes: BTreeMap<&'n str, &'n Node>,
    free: BTreeMap<&'n str, Resources>,
    soon_free: BTreeMap<&'n str, Resources>,
    /// Master ports in use per node.
    ports: BTreeMap<String, BTreeSet<u32>>,
}

impl<'n> Capacity<'n> {
    fn new(nodes: &'n [Node], jobs: &[Job]) -> Capacity<'n> {
        let usable: BTreeMap<&str, &Node> = nodes
            .iter()
            .filter(|n| n.state() == NodeState::Up && !n.drain)
            .map(|n| (n.name.as_str(), n))
            .collect();
        let mut free: BTreeMap<&str, Resources> = usable
            .iter()
            .map(|(name, node)| (*name, Resources::of_node(node)))
            .collect();
        let mut soon_free = free.clone();
        let mut ports: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        for job in jobs {
            let want = Demand::of(&job.spec.clone().unwrap_or_default());
            let stopping = matches!(
                job.state(),
                JobState::Suspending | JobState::Cancelling | JobState::Failing
            );
            for held in held_nodes(job) {
                let Some(node) = usable.get(held.node.as_str()) else {
                    continue;
                };
                let used = want.on(node);
                if let Some(f) = free.get_mut(held.node.as_str()) {
                    *f = f.minus(&used);
                }
                if !stopping && let Some(f) = soon_free.get_mut(held.node.as_str()) {
                    *f = f.minus(&used);
                }
            }
            if let Some(placement) = &job.placement
                && let Some(first) = placement.nodes.first()
                && !first.exited
            {
                ports
                    .entry(first.node.clone())
                    .or_default()
                    .insert(placement.master_port);
            }
        }
        Capacity {
            nodes: usable,
            free,
            soon_free,
            ports,
        }
    }

    /// Usable nodes whose whole capacity covers `want`.
    fn capable(&self, want: &Demand) -> usize {
        self.nodes
            .values()
            .filter(|n| want.fits(n, &Resources::of_node(n)))
            .count()
    }

    /// Unreserved nodes where `want` fits in `room`, fullest first.
    fn fitting(
        &self,
        room: &BTreeMap<&'n str, Resources>,
        reserved: &BTreeSet<String>,
        want: &Demand,
    ) -> Vec<&'n str> {
        let mut fit: Vec<(&str, Resources)> = room
            .iter()
            .filter(|(name, free)| {
                !reserved.contains(**name) && want.fits(self.nodes[**name], free)
            })
            .map(|(name, free)| (*name, *free))
            .collect();
        fit.sort_by_key(|(name, free)| (free.gpus, free.cpus, free.memory_mb, *name));
        fit.into_iter().map(|(name, _)| name).collect()
    }

    /// The lowest free master port of `node`.
    fn free_port(&self, node: &str) -> Option<u32> {
        let record = self.nodes.get(node)?;
        let used = self.ports.get(node);
        (record.port_min..=record.port_max).find(|p| used.is_none_or(|u| !u.contains(p)))
    }
}

/// Nodes `owner`'s jobs at `priority` hold now.
fn nodes_held(jobs: &[Job], owner: &str, priority: i32) -> u32 {
    jobs.iter()
        .filter(|j| j.owner == owner && j.spec.as_ref().is_some_and(|s| s.priority == priority))
        .map(|j| held_nodes(j).count() as u32)
        .sum()
}

/// The plan for `jobs` (every job not ended) on `nodes`, with `users`' quotas.
pub fn plan(nodes: &[Node], jobs: &[Job], users: &[User]) -> Plan {
    let mut capacity = Capacity::new(nodes, jobs);
    let mut waiting: Vec<&Job> = jobs.iter().filter(|j| is_waiting(j.state())).collect();
    waiting.sort_by_key(|j| (-j.spec.as_ref().map_or(0, |s| s.priority), j.id));
    let mut out = Plan::default();
    let mut reserved: BTreeSet<String> = BTreeSet::new();
    let mut head: Option<u64> = None;
    let not_ended: BTreeSet<u64> = jobs.iter().map(|j| j.id).collect();
    for job in waiting {
        let spec = job.spec.clone().unwrap_or_default();
        let before: Vec<String> = spec
            .after
            .iter()
            .filter(|id| not_ended.contains(id))
            .map(u64::to_string)
            .collect();
        if !before.is_empty() {
            out.reasons.push((
                job.id,
                format!("waiting for job(s) {} to complete", before.join(", ")),
            ));
            continue;
        }
        let want = Demand::of(&spec);
        let needed = spec.nodes as usize;
        let capable = capacity.capable(&want);
        if capable < needed {
            out.reasons.push((
                job.id,
                format!(
                    "too large: needs {}; the cluster has {capable} such node(s) up",
                    want.describe(spec.nodes)
                ),
            ));
            continue;
        }
        let quota = users
            .iter()
            .find(|u| u.name == job.owner)
            .and_then(|u| u.quotas.iter().find(|q| q.priority == spec.priority));
        if let Some(quota) = quota {
            let held = nodes_held(jobs, &job.owner, spec.priority);
            if held + spec.nodes > quota.max_nodes {
                out.reasons.push((
                    job.id,
                    format!(
                        "quota: {} may hold {} node(s) at priority {}; holds {held}",
                        job.owner, quota.max_nodes, spec.priority
                    ),
                ));
                continue;
            }
        }
        let fitting = capacity.fitting(&capacity.free, &reserved, &want);
        if fitting.len() >= needed {
            let chosen: Vec<&str> = fitting[..needed].to_vec();
            let Some(port) = capacity.free_port(chosen[0]) else {
                out.reasons
                    .push((job.id, format!("no free port on node {}", chosen[0])));
                continue;
            };
            let per_node = ranks_per_node(&spec);
            let placed: Vec<PlacedNode> = chosen
                .iter()
                .enumerate()
                .map(|(i, name)| PlacedNode {
                    node: (*name).to_string(),
                    first_rank: i as u32 * per_node,
                    ranks: per_node,
                    ..PlacedNode::default()
                })
                .collect();
            for name in &chosen {
                let used = want.on(capacity.nodes[name]);
                for room in [&mut capacity.free, &mut capacity.soon_free] {
                    if let Some(f) = room.get_mut(name) {
                        *f = f.minus(&used);
                    }
                }
            }
            capacity
                .ports
                .entry(chosen[0].to_string())
                .or_default()
                .insert(port);
            out.place.push(PlaceOp {
                job_id: job.id,
                attempt: job.attempt,
                placement: Some(Placement {
                    master_addr: capacity.nodes[chosen[0]].host.clone(),
                    master_port: port,
                    nodes: placed,
                }),
            });
            continue;
        }
        if let Some(head) = head {
            let reason = if capacity
                .fitting(&capacity.free, &BTreeSet::new(), &want)
                .len()
                >= needed
            {
                format!("waiting behind job {head}, which has its nodes reserved")
            } else {
                format!("waiting for resources: needs {}", want.describe(spec.nodes))
            };
            out.reasons.push((job.id, reason));
            continue;
        }
        head = Some(job.id);
        let reason = plan_head(
            jobs,
            job,
            &want,
            needed,
            &mut capacity,
            &mut reserved,
            &mut out,
        );
        out.reasons.push((job.id, reason));
    }
    out
}

/// The head job does not fit now: waits for stopping jobs, or preempts, or waits; reserves its
/// nodes either way. Returns its reason.
fn plan_head<'n>(
    jobs: &[Job],
    job: &Job,
    want: &Demand,
    needed: usize,
    capacity: &mut Capacity<'n>,
    reserved: &mut BTreeSet<String>,
    out: &mut Plan,
) -> String {
    let priority = job.spec.as_ref().map_or(0, |s| s.priority);
    let soon = capacity.fitting(&capacity.soon_free, reserved, want);
    if soon.len() >= needed {
        let nodes: BTreeSet<&str> = soon[..needed].iter().copied().collect();
        reserved.extend(nodes.iter().map(|n| n.to_string()));
        let stopping: Vec<String> = jobs
            .iter()
            .filter(|j| {
                matches!(
                    j.state(),
                    JobState::Suspending | JobState::Cancelling | JobState::Failing
                ) && held_nodes(j).any(|h| nodes.contains(h.node.as_str()))
            })
            .map(|j| j.id.to_string())
            .collect();
        return format!("waiting for job(s) {} to stop", stopping.join(", "));
    }
    // Preemption: lower priority only, least loss first.
    let mut victims: Vec<&Job> = jobs
        .iter()
        .filter(|j| {
            j.state() == JobState::Running && j.spec.as_ref().map_or(0, |s| s.priority) < priority
        })
        .collect();
    victims.sort_by_key(|j| {
        (
            j.spec.as_ref().map_or(0, |s| s.priority),
            -j.attempt_started_ms,
            j.id,
        )
    });
    let mut room = capacity.soon_free.clone();
    let nodes = capacity.nodes.clone();
    let release = |room: &mut BTreeMap<&'n str, Resources>, victim: &Job, add: bool| {
        let theirs = Demand::of(&victim.spec.clone().unwrap_or_default());
        for held in held_nodes(victim) {
            let (Some(r), Some(node)) = (
                room.get_mut(held.node.as_str()),
                nodes.get(held.node.as_str()),
            ) else {
                continue;
            };
            let used = theirs.on(node);
            *r = if add { r.plus(&used) } else { r.minus(&used) };
        }
    };
    let mut chosen: Vec<&Job> = Vec::new();
    for victim in victims {
        if capacity.fitting(&room, reserved, want).len() >= needed {
            break;
        }
        release(&mut room, victim, true);
        chosen.push(victim);
    }
    if capacity.fitting(&room, reserved, want).len() < needed {
        let fitting_now = capacity.fitting(&capacity.free, reserved, want).len();
        // Reserve the nodes with the most room, so that backfill does not take them.
        let mut by_room: Vec<(&str, Resources)> = capacity
            .soon_free
            .iter()
            .filter(|(name, _)| {
                let node = capacity.nodes[**name];
                want.fits(node, &Resources::of_node(node))
            })
            .map(|(n, r)| (*n, *r))
            .collect();
        by_room.sort_by_key(|(name, r)| (std::cmp::Reverse((r.gpus, r.cpus, r.memory_mb)), *name));
        reserved.extend(by_room.iter().take(needed).map(|(n, _)| n.to_string()));
        return format!(
            "waiting for resources: needs {}; {fitting_now} free now",
            want.describe(needed as u32)
        );
    }
    // Prune: a victim whose release is not needed keeps running.
    for index in (0..chosen.len()).rev() {
        let mut without = room.clone();
        release(&mut without, chosen[index], false);
        if capacity.fitting(&without, reserved, want).len() >= needed {
            room = without;
            chosen.remove(index);
        }
    }
    let chosen_nodes = capacity.fitting(&room, reserved, want);
    reserved.extend(chosen_nodes[..needed].iter().map(|n| n.to_string()));
    let ids: Vec<String> = chosen.iter().map(|j| j.id.to_string()).collect();
    for victim in &chosen {
        out.preempt.push((
            victim.id,
            format!("preempted by job {} (priority {priority})", job.id),
        ));
    }
    // The victims' nodes will be free: treat them so for the rest of this plan.
    capacity.soon_free = room;
    format!("preempting job(s) {} (lower priority)", ids.join(", "))
}

#[cfg(test)]
mod tests {
    use hai_proto::{JobSpec, Quota};

    use super::*;

    fn node(name: &str, gpus: u32) -> Node {
        Node {
            name: name.to_string(),
            host: "127.0.0.1".to_string(),
            gpus,
            cpus: 8,
            memory_mb: 1024,
            port_min: 30000,
            port_max: 30009,
            ..Node::default()
        }
    }

    fn job(id: u64, owner: &str, nodes: u32, gpus: u32, priority: i32) -> Job {
        Job {
            id,
            owner: owner.to_string(),
            spec: Some(JobSpec {
                command: vec!["true".to_string()],
                nodes,
                gpus_per_node: gpus,
                priority,
                ..JobSpec::default()
            }),
            ..Job::default()
        }
    }

    fn running(mut job: Job, on: &[&str], started: i64) -> Job {
        job.state = JobState::Running as i32;
        job.attempt_started_ms = started;
        job.placement = Some(Placement {
            nodes: on
                .iter()
                .map(|n| PlacedNode {
                    node: n.to_string(),
                    ranks: 1,
                    ..PlacedNode::default()
                })
                .collect(),
            master_addr: "127.0.0.1".to_string(),
            master_port: 30000,
        });
        job
    }

    fn placed_on(plan: &Plan, id: u64) -> Vec<String> {
        plan.place
            .iter()
            .find(|p| p.job_id == id)
            .map(|p| {
                p.placement
                    .as_ref()
                    .unwrap()
                    .nodes
                    .iter()
                    .map(|n| n.node.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn reason(plan: &Plan, id: u64) -> String {
        plan.reasons
            .iter()
            .find(|(j, _)| *j == id)
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    }

    #[test]
    fn a_job_asking_for_nothing_takes_whole_nodes() {
        let nodes = [node("a", 4), node("b", 4)];
        let sharing = running(job(1, "x", 1, 1, 0), &["a"], 100);
        let plan1 = plan(&nodes, &[sharing.clone(), job(2, "u", 1, 0, 0)], &[]);
        assert_eq!(placed_on(&plan1, 2), ["b"], "a is partly used: {plan1:?}");
        let whole = running(job(2, "u", 1, 0, 0), &["b"], 100);
        let plan2 = plan(&nodes, &[sharing, whole, job(3, "v", 1, 1, 0)], &[]);
        assert_eq!(placed_on(&plan2, 3), ["a"], "b is taken whole: {plan2:?}");
    }

    #[test]
    fn gangs_are_placed_whole_with_ranks_numbered_across_nodes() {
        let nodes = [node("a", 4), node("b", 4)];
        let mut two = job(1, "u", 2, 2, 0);
        two.spec.as_mut().unwrap().ranks_per_node = 2;
        let plan = plan(&nodes, &[two], &[]);
        assert_eq!(placed_on(&plan, 1), ["a", "b"]);
        let placement = plan.place[0].placement.as_ref().unwrap();
        assert_eq!(
            placement
                .nodes
                .iter()
                .map(|n| n.first_rank)
                .collect::<Vec<_>>(),
            [0, 2]
        );
        assert_eq!(placement.master_port, 30000);
    }

    #[test]
    fn a_job_after_others_waits_for_them_without_blocking_or_reserving() {
        let nodes = [node("a", 4), node("b", 4)];
        let first = running(job(1, "u", 1, 4, 0), &["a"], 100);
        let mut after = job(2, "u", 1, 4, 9);
        after.spec.as_mut().unwrap().after = vec![1, 7];
        let other = job(3, "u", 1, 4, 0);
        let waiting = plan(&nodes, &[first, after.clone(), other], &[]);
        assert_eq!(
            reason(&waiting, 2),
            "waiting for job(s) 1 to complete",
            "{waiting:?}"
        );
        // The high-priority job that waits neither preempts nor holds the free node.
        assert!(waiting.preempt.is_empty(), "{waiting:?}");
        assert_eq!(placed_on(&waiting, 3), ["b"], "{waiting:?}");
        // Job 1 gone from the jobs not ended (completed; 7 long since): job 2 starts.
        let ready = plan(&nodes, &[after], &[]);
        assert_eq!(placed_on(&ready, 2).len(), 1, "{ready:?}");
    }

    #[test]
    fn a_job_larger_than_the_cluster_waits_with_its_reason_and_blocks_nobody() {
        let nodes = [node("a", 4), node("b", 4)];
        let plan = plan(
            &nodes,
            &[
                job(1, "u", 3, 1, 5),
                job(2, "u", 1, 8, 5),
                job(3, "u", 1, 1, 0),
            ],
            &[],
        );
        assert!(reason(&plan, 1).contains("too large"), "{plan:?}");
        assert!(reason(&plan, 2).contains("too large"), "{plan:?}");
        assert_eq!(placed_on(&plan, 3).len(), 1);
    }

    #[test]
    fn higher_priority_goes_first_and_backfill_never_takes_the_heads_nodes() {
        let nodes = [node("a", 4), node("b", 4), node("c", 4)];
        // b and c are busy; the head needs two whole nodes; a small job may not take a.
        let busy = running(job(1, "x", 2, 4, 9), &["b", "c"], 100);
        let head = job(2, "u", 2, 4, 5);
        let small = job(3, "v", 1, 1, 1);
        let plan = plan(&nodes, &[busy, head, small], &[]);
        assert!(plan.place.is_empty(), "{plan:?}");
        assert!(plan.preempt.is_empty(), "priority 9 is not preempted by 5");
        assert!(
            reason(&plan, 2).contains("waiting for resources"),
            "{plan:?}"
        );
        assert!(reason(&plan, 3).contains("behind job 2"), "{plan:?}");
    }

    #[test]
    fn backfill_uses_nodes_the_head_does_not_need() {
        // c is too small for the head, so a small job may use it; b is reserved for the head.
        let nodes = [node("a", 4), node("b", 4), node("c", 2)];
        let full = running(job(1, "x", 1, 4, 9), &["a"], 100);
        let half = running(job(2, "x", 1, 2, 9), &["b"], 100);
        let head = job(3, "u", 1, 4, 5);
        let small = job(4, "v", 1, 1, 1);
        let plan = plan(&nodes, &[full, half, head, small], &[]);
        assert_eq!(placed_on(&plan, 4), ["c"], "{plan:?}");
        assert!(
            reason(&plan, 3).contains("waiting for resources"),
            "{plan:?}"
        );
    }

    #[test]
    fn preemption_suspends_the_cheapest_lower_priority_jobs_only() {
        let nodes = [node("a", 4), node("b", 4)];
        let old_low = running(job(1, "x", 1, 4, 0), &["a"], 100);
        let new_low = running(job(2, "y", 1, 4, 0), &["b"], 200);
        let urgent = job(3, "u", 1, 4, 10);
        let plan = plan(&nodes, &[old_low, new_low, urgent], &[]);
        // One node is enough: the most recently started low job goes.
        assert_eq!(plan.preempt.len(), 1, "{plan:?}");
        assert_eq!(plan.preempt[0].0, 2);
        assert!(reason(&plan, 3).contains("preempting job(s) 2"), "{plan:?}");
    }

    #[test]
    fn whole_node_jobs_are_preempted_for_whole_node_jobs() {
        let nodes = [node("a", 2), node("b", 2)];
        let low = running(job(1, "x", 2, 0, 0), &["a", "b"], 100);
        let plan = plan(&nodes, &[low, job(2, "u", 2, 0, 10)], &[]);
        assert_eq!(plan.preempt.len(), 1, "{plan:?}");
    }

    #[test]
    fn equal_priority_is_never_preempted() {
        let nodes = [node("a", 4)];
        let mine = running(job(1, "u", 1, 4, 5), &["a"], 100);
        let plan = plan(&nodes, &[mine, job(2, "u", 1, 4, 5)], &[]);
        assert!(plan.preempt.is_empty());
        assert!(reason(&plan, 2).contains("waiting for resources"));
    }

    #[test]
    fn a_head_waits_for_jobs_already_stopping_instead_of_preempting_more() {
        let nodes = [node("a", 4), node("b", 4)];
        let mut stopping = running(job(1, "x", 1, 4, 0), &["a"], 100);
        stopping.state = JobState::Suspending as i32;
        let other = running(job(2, "y", 1, 4, 0), &["b"], 200);
        let plan = plan(&nodes, &[stopping, other, job(3, "u", 1, 4, 10)], &[]);
        assert!(plan.preempt.is_empty(), "{plan:?}");
        assert!(reason(&plan, 3).contains("job(s) 1 to stop"), "{plan:?}");
    }

    #[test]
    fn quotas_cap_nodes_per_user_and_priority() {
        let nodes = [node("a", 4), node("b", 4), node("c", 4)];
        let users = [User {
            name: "u".to_string(),
            quotas: vec![Quota {
                priority: 0,
                max_nodes: 2,
            }],
            ..User::default()
        }];
        let held = running(job(1, "u", 1, 1, 0), &["a"], 100);
        let plan = plan(
            &nodes,
            &[held, job(2, "u", 2, 1, 0), job(3, "u", 1, 1, 0)],
            &users,
        );
        assert!(reason(&plan, 2).contains("quota"), "{plan:?}");
        assert_eq!(
            placed_on(&plan, 3).len(),
            1,
            "one more node is within the quota"
        );
    }

    #[test]
    fn drained_and_down_nodes_take_nothing_and_ports_are_not_reused() {
        let mut drained = node("a", 4);
        drained.drain = true;
        let mut down = node("b", 4);
        down.state = NodeState::Down as i32;
        let nodes = [drained, down, node("c", 4)];
        let holding = running(job(1, "x", 1, 1, 0), &["c"], 100);
        let plan = plan(&nodes, &[holding, job(2, "u", 1, 1, 0)], &[]);
        assert_eq!(placed_on(&plan, 2), ["c"]);
        assert_eq!(plan.place[0].placement.as_ref().unwrap().master_port, 30001);
    }
}
