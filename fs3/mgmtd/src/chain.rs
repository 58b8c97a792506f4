//! How a chain changes when the local states of its targets change.
//!
//! Every target has a *public* state, replicated with the chain and seen by clients and
//! storage services, and a *local* state, reported by its storage service in heartbeats (or
//! inferred as offline when the service's lease runs out). The failure detector feeds local
//! states through [`next_chain`], which applies the transition rules of 3FS's cluster manager:
//!
//! - an up-to-date target becomes (or stays) serving, unless it was waiting or offline: those
//!   must sync first;
//! - an online target (alive, not yet up-to-date) syncs when it has a serving predecessor and
//!   waits otherwise;
//! - a target that goes offline becomes `lastsrv` if it was serving and no other target of the
//!   chain is left serving — it holds the only complete copy and serves again when it returns —
//!   and `offline` otherwise.
//!
//! Targets are then ordered serving, syncing, waiting, lastsrv, offline (stable within each
//! group): the head is the first serving target, writes flow through serving and syncing ones,
//! and a syncing target's predecessor is the serving target it copies from. Any change bumps the
//! chain version.

use serde::{Deserialize, Serialize};

/// A target's state as the cluster publishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PublicState {
    /// Alive and serving reads and writes.
    Serving,
    /// Alive and catching up from its predecessor: takes writes, not reads.
    Syncing,
    /// Alive, but no serving predecessor to sync from yet.
    Waiting,
    /// Down, and it was the last serving target of its chain.
    LastServing,
    /// Down, or its medium failed.
    Offline,
}

/// A target's state as its storage service reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LocalState {
    /// Alive and holding everything the chain committed.
    UpToDate,
    /// Alive but not (yet) up to date.
    Online,
    /// Down, or its medium failed.
    Offline,
}

impl PublicState {
    /// Lower-case name, as CLIs show it.
    pub fn as_str(self) -> &'static str {
        match self {
            PublicState::Serving => "serving",
            PublicState::Syncing => "syncing",
            PublicState::Waiting => "waiting",
            PublicState::LastServing => "lastsrv",
            PublicState::Offline => "offline",
        }
    }

    fn rank(self) -> u8 {
        match self {
            PublicState::Serving => 0,
            PublicState::Syncing => 1,
            PublicState::Waiting => 2,
            PublicState::LastServing => 3,
            PublicState::Offline => 4,
        }
    }

    /// Whether reads may go to a target in this state.
    pub fn readable(self) -> bool {
        self == PublicState::Serving
    }

    /// Whether chain writes flow through a target in this state.
    pub fn writable(self) -> bool {
        matches!(self, PublicState::Serving | PublicState::Syncing)
    }
}

/// One target's place in a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainTarget {
    /// The target.
    pub target: u64,
    /// Its public state.
    pub state: PublicState,
}

/// A chain: targets in order (head first) and a version bumped on every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    /// The chain's id.
    pub id: u64,
    /// Bumped whenever the order or any public state changes.
    pub version: u64,
    /// Targets, head first.
    pub targets: Vec<ChainTarget>,
}

impl Chain {
    /// The first serving target, which takes writes from clients.
    pub fn head(&self) -> Option<u64> {
        self.targets
            .iter()
            .find(|t| t.state == PublicState::Serving)
            .map(|t| t.target)
    }

    /// Targets a write goes through, in order.
    pub fn write_path(&self) -> Vec<u64> {
        self.targets
            .iter()
            .filter(|t| t.state.writable())
            .map(|t| t.target)
            .collect()
    }

    /// Targets that serve reads.
    pub fn readable(&self) -> Vec<u64> {
        self.targets
            .iter()
            .filter(|t| t.state.readable())
            .map(|t| t.target)
            .collect()
    }
}

/// The chain after applying `local` (the local state of each target, by target id; a target
/// missing from it keeps its public state, unless it can no longer be syncing). `None` if
/// nothing changes.
pub fn next_chain(chain: &Chain, local: impl Fn(u64) -> Option<LocalState>) -> Option<Chain> {
    use LocalState as L;
    use PublicState as P;
    // Serving targets that stay up. If none do, the first serving target to go down keeps the
    // chain's data: it becomes lastsrv and serves again when it returns.
    let still_serving = chain
        .targets
        .iter()
        .any(|t| t.state == P::Serving && local(t.target) != Some(L::Offline));
    let mut last_serving_assigned = false;
    // `None`: alive and not up to date — syncs if the new chain has a serving target.
    let decided: Vec<(u64, Option<PublicState>)> = chain
        .targets
        .iter()
        .map(|t| {
            let state = match (local(t.target), t.state) {
                (None, P::Syncing) => None,
                (None, state) => Some(state),
                (Some(L::Offline), P::Serving) if !still_serving && !last_serving_assigned => {
                    last_serving_assigned = true;
                    Some(P::LastServing)
                }
                (Some(L::Offline), P::LastServing) => Some(P::LastServing),
                (Some(L::Offline), _) => Some(P::Offline),
                (Some(L::UpToDate), P::Serving | P::Syncing | P::LastServing) => Some(P::Serving),
                (Some(L::UpToDate), P::Waiting | P::Offline) => Some(P::Waiting),
                (Some(L::Online), P::Serving | P::LastServing) => Some(P::Serving),
                (Some(L::Online), P::Offline) => Some(P::Waiting),
                (Some(L::Online), P::Syncing | P::Waiting) => None,
            };
            (t.target, state)
        })
        .collect();
    // Serving targets come first in the new order, so any of them precedes a syncing one.
    let serving = decided.iter().any(|(_, s)| *s == Some(P::Serving));
    let mut targets: Vec<ChainTarget> = decided
        .into_iter()
        .map(|(target, state)| ChainTarget {
            target,
            state: state.unwrap_or(if serving { P::Syncing } else { P::Waiting }),
        })
        .collect();
    targets.sort_by_key(|t| t.state.rank());
    if targets == chain.targets {
        return None;
    }
    Some(Chain {
        id: chain.id,
        version: chain.version + 1,
        targets,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use LocalState as L;
    use PublicState as P;

    fn chain(states: &[(u64, PublicState)]) -> Chain {
        Chain {
            id: 1,
            version: 10,
            targets: states
                .iter()
                .map(|(target, state)| ChainTarget {
                    target: *target,
                    state: *state,
                })
                .collect(),
        }
    }

    fn apply(chain: &Chain, local: &[(u64, LocalState)]) -> Vec<(u64, PublicState)> {
        let local: HashMap<u64, LocalState> = local.iter().copied().collect();
        let next = next_chain(chain, |t| local.get(&t).copied()).unwrap_or_else(|| chain.clone());
        next.targets.iter().map(|t| (t.target, t.state)).collect()
    }

    #[test]
    fn healthy_chains_do_not_change() {
        let c = chain(&[(1, P::Serving), (2, P::Serving), (3, P::Serving)]);
        let up = [(1, L::UpToDate), (2, L::UpToDate), (3, L::UpToDate)];
        assert!(next_chain(&c, |t| up.iter().find(|(id, _)| *id == t).map(|(_, l)| *l)).is_none());
        assert!(next_chain(&c, |_| None).is_none());
    }

    #[test]
    fn a_failed_middle_target_moves_to_the_end_offline() {
        let c = chain(&[(1, P::Serving), (2, P::Serving), (3, P::Serving)]);
        let next = next_chain(&c, |t| (t == 2).then_some(L::Offline)).unwrap();
        assert_eq!(next.version, 11);
        assert_eq!(
            apply(&c, &[(2, L::Offline)]),
            vec![(1, P::Serving), (3, P::Serving), (2, P::Offline)]
        );
        assert_eq!(next.head(), Some(1));
        assert_eq!(next.write_path(), vec![1, 3]);
    }

    #[test]
    fn a_failed_head_hands_over_to_the_next_serving_target() {
        let c = chain(&[(1, P::Serving), (2, P::Serving), (3, P::Serving)]);
        let next = next_chain(&c, |t| (t == 1).then_some(L::Offline)).unwrap();
        assert_eq!(next.head(), Some(2));
        assert_eq!(next.targets.last().map(|t| t.state), Some(P::Offline));
    }

    #[test]
    fn the_last_serving_target_to_fail_keeps_the_data() {
        let c = chain(&[(1, P::Serving), (2, P::Offline), (3, P::Offline)]);
        assert_eq!(
            apply(&c, &[(1, L::Offline)]),
            vec![(1, P::LastServing), (2, P::Offline), (3, P::Offline)]
        );
        // All at once: only one becomes lastsrv.
        let c = chain(&[(1, P::Serving), (2, P::Serving), (3, P::Serving)]);
        assert_eq!(
            apply(&c, &[(1, L::Offline), (2, L::Offline), (3, L::Offline)]),
            vec![(1, P::LastServing), (2, P::Offline), (3, P::Offline)]
        );
        // A lastsrv target stays lastsrv while down, and serves again when back.
        let c = chain(&[(1, P::LastServing), (2, P::Offline), (3, P::Offline)]);
        assert!(next_chain(&c, |t| (t == 1).then_some(L::Offline)).is_none());
        assert_eq!(
            apply(&c, &[(1, L::Online), (2, L::Offline), (3, L::Offline)]),
            vec![(1, P::Serving), (2, P::Offline), (3, P::Offline)]
        );
    }

    #[test]
    fn a_returning_target_waits_syncs_then_serves() {
        let c = chain(&[(1, P::Serving), (3, P::Serving), (2, P::Offline)]);
        // Back online: it must not serve with what it had before.
        let waiting = next_chain(&c, |t| (t == 2).then_some(L::Online)).unwrap();
        assert_eq!(waiting.targets[2].state, P::Waiting);
        // With a serving predecessor it syncs (and takes writes).
        let syncing = next_chain(&waiting, |t| (t == 2).then_some(L::Online)).unwrap();
        assert_eq!(syncing.targets[2].state, P::Syncing);
        assert_eq!(syncing.write_path(), vec![1, 3, 2]);
        assert_eq!(syncing.readable(), vec![1, 3]);
        // Sync done: serving, still at the end.
        let serving = next_chain(&syncing, |t| (t == 2).then_some(L::UpToDate)).unwrap();
        assert_eq!(
            serving
                .targets
                .iter()
                .map(|t| (t.target, t.state))
                .collect::<Vec<_>>(),
            vec![(1, P::Serving), (3, P::Serving), (2, P::Serving)]
        );
        assert_eq!(serving.version, c.version + 3);
        // An up-to-date report from an offline target is not trusted: it waits.
        assert_eq!(
            apply(&c, &[(2, L::UpToDate)]),
            vec![(1, P::Serving), (3, P::Serving), (2, P::Waiting)]
        );
    }

    #[test]
    fn without_a_serving_target_returning_targets_wait() {
        let c = chain(&[(1, P::LastServing), (2, P::Offline)]);
        assert_eq!(
            apply(&c, &[(2, L::Online)]),
            vec![(2, P::Waiting), (1, P::LastServing)]
        );
        // When the last serving target returns, the waiting one can sync from it.
        let c = chain(&[(1, P::LastServing), (2, P::Waiting)]);
        assert_eq!(
            apply(&c, &[(1, L::Online), (2, L::Online)]),
            vec![(1, P::Serving), (2, P::Syncing)]
        );
        // A syncing target whose source died waits again.
        let c = chain(&[(1, P::Serving), (2, P::Syncing)]);
        assert_eq!(
            apply(&c, &[(1, L::Offline), (2, L::Online)]),
            vec![(2, P::Waiting), (1, P::LastServing)]
        );
    }

    #[test]
    fn every_combination_is_total_and_keeps_a_copy_of_the_data() {
        let states = [
            P::Serving,
            P::Syncing,
            P::Waiting,
            P::LastServing,
            P::Offline,
        ];
        let locals = [None, Some(L::UpToDate), Some(L::Online), Some(L::Offline)];
        for a in states {
            for b in states {
                for c in states {
                    let chain = chain(&[(1, a), (2, b), (3, c)]);
                    let had_copy = chain
                        .targets
                        .iter()
                        .any(|t| matches!(t.state, P::Serving | P::LastServing));
                    for la in locals {
                        for lb in locals {
                            for lc in locals {
                                let local = [la, lb, lc];
                                let next = next_chain(&chain, |t| local[(t - 1) as usize])
                                    .unwrap_or_else(|| chain.clone());
                                // Never lose every holder of the data.
                                let has_copy = next
                                    .targets
                                    .iter()
                                    .any(|t| matches!(t.state, P::Serving | P::LastServing));
                                assert!(
                                    !had_copy || has_copy,
                                    "{chain:?} with {local:?} lost the data: {next:?}"
                                );
                                // Order: serving, syncing, waiting, lastsrv, offline.
                                assert!(
                                    next.targets
                                        .windows(2)
                                        .all(|w| w[0].state.rank() <= w[1].state.rank())
                                );
                                // Nothing syncs without a serving target to sync from.
                                if next.targets.iter().any(|t| t.state == P::Syncing) {
                                    assert!(next.head().is_some(), "{next:?}");
                                }
                                assert_eq!(next.targets.len(), 3);
                            }
                        }
                    }
                }
            }
        }
    }
}
