//! Request ids for proposals: one random client id per process, sequence numbers per request,
//! and the "everything below this is settled" mark that lets the group forget old records.

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::proto::RequestId;

/// Hands out request ids for one client and tracks which are still in flight.
#[derive(Debug)]
pub struct RequestIds {
    client: u64,
    state: Mutex<IdState>,
}

#[derive(Debug, Default)]
struct IdState {
    next: u64,
    in_flight: BTreeSet<u64>,
}

/// One request in flight; its id is settled (and may be forgotten by the group) once dropped.
#[derive(Debug)]
pub struct RequestTicket<'a> {
    ids: &'a RequestIds,
    id: RequestId,
}

impl RequestIds {
    /// Ids of a new client with a random, non-zero client id.
    pub fn new() -> Self {
        RequestIds {
            client: rand::random_range(1..u64::MAX),
            state: Mutex::new(IdState {
                next: 1,
                in_flight: BTreeSet::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IdState> {
        // The state is a counter and a set; a panic elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a request. Retries of it must reuse `ticket.id()`.
    pub fn begin(&self) -> RequestTicket<'_> {
        let mut state = self.lock();
        let seq = state.next;
        state.next += 1;
        state.in_flight.insert(seq);
        let acked_below = state.in_flight.first().copied().unwrap_or(seq);
        RequestTicket {
            ids: self,
            id: RequestId {
                client: self.client,
                seq,
                acked_below,
            },
        }
    }

    /// An id that is never reported settled: the group keeps its record for the whole
    /// deduplication window. For callers that manage retries themselves.
    pub fn untracked(&self) -> RequestId {
        let mut state = self.lock();
        let seq = state.next;
        state.next += 1;
        RequestId {
            client: self.client,
            seq,
            acked_below: 0,
        }
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestTicket<'_> {
    /// The request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }
}

impl Drop for RequestTicket<'_> {
    fn drop(&mut self) {
        self.ids.lock().in_flight.remove(&self.id.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_below_is_the_oldest_request_still_in_flight() {
        let ids = RequestIds::new();
        let first = ids.begin();
        let second = ids.begin();
        assert_eq!(first.id().acked_below, 1);
        assert_eq!(second.id().acked_below, 1);
        drop(first);
        let third = ids.begin();
        assert_eq!(third.id().acked_below, 2);
        drop(second);
        drop(third);
        let fourth = ids.begin();
        assert_eq!(fourth.id().seq, 4);
        assert_eq!(fourth.id().acked_below, 4);
        assert_eq!(ids.untracked().acked_below, 0);
    }
}
