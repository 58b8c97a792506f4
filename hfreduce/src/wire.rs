//! What travels between ranks, over ff-net: every rank serves one endpoint. Data messages land
//! in a mailbox keyed by (sender, tag) and wait there for the collective that expects them; an
//! abort from a failing rank fails every wait at once; rank 0's endpoint also serves the
//! rendezvous store (set and get of small keys).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use ff_net::{Fault, Handler, PooledBuf, Reply, Request};
use tokio::sync::{oneshot, watch};

use crate::error::CommError;

/// ff-net methods of a rank's endpoint.
pub mod method {
    /// A data message: header = [`super::DataHeader`], payload = bytes.
    pub const DATA: u16 = 1;
    /// A rank failed: header = sender rank (8 bytes LE), payload = the reason.
    pub const ABORT: u16 = 2;
    /// Store a key: header = key, payload = value (rank 0 only).
    pub const SET: u16 = 3;
    /// Read a key: header = key; reply payload = value, header = [1] if present, [0] if not.
    pub const GET: u16 = 4;
    /// The sender will send nothing more: header = sender rank (8 bytes LE).
    pub const DONE: u16 = 5;
}

/// Largest store key and value.
const MAX_KEY: usize = 256;
const MAX_VALUE: usize = 4096;
/// Most store entries (a world of ranks needs a few each).
const MAX_ENTRIES: usize = 4 * crate::config::MAX_WORLD + 64;

/// What every data message says of itself, so that a receiver can tell a mismatched call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    /// The sending rank.
    pub from: u64,
    /// Which message of which collective (the collective's sequence number and a step).
    pub tag: u64,
    /// The collective as the sender called it: kind, element type, reduction, element count.
    pub signature: Signature,
}

/// A collective as one rank called it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Signature {
    /// Which collective.
    pub kind: u8,
    /// Element type.
    pub dtype: u8,
    /// Reduction.
    pub op: u8,
    /// Elements (per rank, as the collective defines it).
    pub count: u64,
}

const HEADER_LEN: usize = 8 + 8 + 3 + 8;

impl DataHeader {
    /// The header's bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(HEADER_LEN);
        out.extend_from_slice(&self.from.to_le_bytes());
        out.extend_from_slice(&self.tag.to_le_bytes());
        out.extend_from_slice(&[self.signature.kind, self.signature.dtype, self.signature.op]);
        out.extend_from_slice(&self.signature.count.to_le_bytes());
        Bytes::from(out)
    }

    fn decode(bytes: &[u8]) -> Option<DataHeader> {
        if bytes.len() != HEADER_LEN {
            return None;
        }
        let u64_at = |at: usize| Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
        Some(DataHeader {
            from: u64_at(0)?,
            tag: u64_at(8)?,
            signature: Signature {
                kind: bytes[16],
                dtype: bytes[17],
                op: bytes[18],
                count: u64_at(19)?,
            },
        })
    }
}

/// A message that arrived (in a buffer of ff-net's receive pool, which it goes back to once
/// consumed), or a receiver waiting for one.
enum Slot {
    Arrived(Signature, PooledBuf),
    Waiting(oneshot::Sender<(Signature, PooledBuf)>),
}

/// One rank's endpoint state.
pub struct Endpoint {
    world: usize,
    slots: Mutex<HashMap<(usize, u64), Slot>>,
    /// The first abort received: (rank, reason).
    aborted: watch::Sender<Option<(usize, String)>>,
    /// Rank 0 only: the rendezvous store.
    store: Option<Mutex<HashMap<Vec<u8>, Vec<u8>>>>,
    /// Ranks that said they will send nothing more.
    done: watch::Sender<std::collections::BTreeSet<usize>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps; a panic elsewhere cannot leave them half-changed.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn bad(message: impl Into<String>) -> Fault {
    Fault {
        code: 1,
        message: message.into(),
    }
}

impl Endpoint {
    /// The endpoint of a rank in a world of `world`; `serve_store` on rank 0.
    pub fn new(world: usize, serve_store: bool) -> Endpoint {
        Endpoint {
            world,
            slots: Mutex::new(HashMap::new()),
            aborted: watch::channel(None).0,
            store: serve_store.then(|| Mutex::new(HashMap::new())),
            done: watch::channel(std::collections::BTreeSet::new()).0,
        }
    }

    /// Waits until `count` peers have said they are done sending, or `timeout` passes.
    pub async fn wait_done(&self, count: usize, timeout: Duration) {
        let mut done = self.done.subscribe();
        let _ = tokio::time::timeout(timeout, done.wait_for(|ranks| ranks.len() >= count)).await;
    }

    fn deposit(&self, header: DataHeader, payload: PooledBuf) -> Result<(), Fault> {
        let from = usize::try_from(header.from)
            .ok()
            .filter(|f| *f < self.world)
            .ok_or_else(|| bad(format!("rank {} is not in this world", header.from)))?;
        let mut slots = lock(&self.slots);
        match slots.entry((from, header.tag)) {
            Entry::Occupied(occupied) => match occupied.remove() {
                Slot::Waiting(waiter) => {
                    let _ = waiter.send((header.signature, payload));
                    Ok(())
                }
                Slot::Arrived(signature, data) => {
                    slots.insert((from, header.tag), Slot::Arrived(signature, data));
                    Err(bad(format!(
                        "message {} from rank {from} arrived twice",
                        header.tag
                    )))
                }
            },
            Entry::Vacant(vacant) => {
                vacant.insert(Slot::Arrived(header.signature, payload));
                Ok(())
            }
        }
    }

    /// Waits up to `timeout` for message `tag` from `from`, failing at once on an abort.
    pub async fn receive(
        &self,
        from: usize,
        tag: u64,
        timeout: Duration,
        during: &str,
    ) -> Result<(Signature, PooledBuf), CommError> {
        let waiter = {
            let mut slots = lock(&self.slots);
            match slots.remove(&(from, tag)) {
                Some(Slot::Arrived(signature, data)) => return Ok((signature, data)),
                Some(Slot::Waiting(_)) | None => {
                    let (tx, rx) = oneshot::channel();
                    slots.insert((from, tag), Slot::Waiting(tx));
                    rx
                }
            }
        };
        let mut aborted = self.aborted.subscribe();
        let abort = async {
            loop {
                if let Some((peer, message)) = aborted.borrow_and_update().clone() {
                    return CommError::Aborted { peer, message };
                }
                if aborted.changed().await.is_err() {
                    return CommError::Closed;
                }
            }
        };
        let outcome = tokio::select! {
            got = tokio::time::timeout(timeout, waiter) => match got {
                Ok(Ok(message)) => Ok(message),
                Ok(Err(_)) => Err(CommError::Closed),
                Err(_) => Err(CommError::Timeout { peer: from, timeout, during: during.to_string() }),
            },
            error = abort => Err(error),
        };
        if outcome.is_err() {
            lock(&self.slots).remove(&(from, tag));
        }
        outcome
    }

    /// Fails every present and future wait (this rank, or another, failed).
    pub fn abort(&self, peer: usize, message: String) {
        self.aborted.send_if_modified(|current| {
            if current.is_none() {
                *current = Some((peer, message));
                true
            } else {
                false
            }
        });
    }

    /// Forgets messages of collectives before `tag_floor` (left by a failed collective).
    pub fn clear_below(&self, tag_floor: u64) {
        lock(&self.slots).retain(|(_, tag), _| *tag >= tag_floor);
    }
}

/// The header of a DONE or ABORT message: the sender's rank.
pub fn rank_header(rank: usize) -> Bytes {
    Bytes::copy_from_slice(&(rank as u64).to_le_bytes())
}

impl Endpoint {
    /// The sender named by a [`rank_header`], if it is a rank of this world.
    fn sender(&self, header: &[u8], what: &str) -> Result<usize, Fault> {
        header
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .and_then(|p| usize::try_from(p).ok())
            .filter(|p| *p < self.world)
            .ok_or_else(|| bad(format!("malformed {what}")))
    }
}

impl Handler for Endpoint {
    async fn handle(&self, request: Request) -> Result<Reply, Fault> {
        match request.method {
            method::DATA => {
                let header = DataHeader::decode(&request.header)
                    .ok_or_else(|| bad("malformed data header"))?;
                self.deposit(header, request.payload)?;
                Ok(Reply::default())
            }
            method::DONE => {
                let peer = self.sender(&request.header, "done")?;
                self.done.send_modify(|ranks| {
                    ranks.insert(peer);
                });
                Ok(Reply::default())
            }
            method::ABORT => {
                let peer = self.sender(&request.header, "abort")?;
                self.abort(peer, String::from_utf8_lossy(&request.payload).into_owned());
                Ok(Reply::default())
            }
            method::SET | method::GET => {
                let store = self
                    .store
                    .as_ref()
                    .ok_or_else(|| bad("this rank serves no store"))?;
                let key = request.header.to_vec();
                if key.is_empty() || key.len() > MAX_KEY {
                    return Err(bad("store keys are 1 to 256 bytes"));
                }
                let mut store = lock(store);
                if request.method == method::SET {
                    if request.payload.len() > MAX_VALUE {
                        return Err(bad("store values are at most 4 KiB"));
                    }
                    if store.len() >= MAX_ENTRIES && !store.contains_key(&key) {
                        return Err(bad("the store is full"));
                    }
                    store.insert(key, request.payload.to_vec());
                    return Ok(Reply::default());
                }
                Ok(match store.get(&key) {
                    Some(value) => Reply {
                        header: Bytes::from_static(&[1]),
                        payload: Bytes::copy_from_slice(value),
                    },
                    None => Reply {
                        header: Bytes::from_static(&[0]),
                        payload: Bytes::new(),
                    },
                })
            }
            other => Err(bad(format!("unknown method {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_garbage_is_refused() {
        let header = DataHeader {
            from: 3,
            tag: 99,
            signature: Signature {
                kind: 1,
                dtype: 2,
                op: 3,
                count: 12345,
            },
        };
        assert_eq!(DataHeader::decode(&header.encode()), Some(header));
        assert_eq!(DataHeader::decode(&[1, 2, 3]), None);
    }

    #[tokio::test]
    async fn messages_meet_their_receivers_in_either_order() {
        let endpoint = Endpoint::new(4, false);
        let header = |from, tag| DataHeader {
            from,
            tag,
            signature: Signature::default(),
        };
        endpoint
            .deposit(header(1, 7), PooledBuf::detached(vec![1]))
            .unwrap();
        let early = endpoint
            .receive(1, 7, Duration::from_secs(1), "t")
            .await
            .unwrap();
        assert_eq!(&early.1[..], &[1]);
        let late = endpoint.receive(2, 8, Duration::from_secs(1), "t");
        let deposit = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            endpoint
                .deposit(header(2, 8), PooledBuf::detached(vec![2]))
                .unwrap();
        };
        let (late, ()) = tokio::join!(late, deposit);
        assert_eq!(&late.unwrap().1[..], &[2]);
        assert!(
            endpoint
                .deposit(header(9, 1), PooledBuf::detached(vec![]))
                .is_err(),
            "rank outside the world"
        );
        let silent = endpoint
            .receive(3, 1, Duration::from_millis(30), "allreduce")
            .await;
        assert!(matches!(silent, Err(CommError::Timeout { peer: 3, .. })));
        endpoint.abort(2, "boom".into());
        let aborted = endpoint
            .receive(3, 2, Duration::from_secs(5), "allreduce")
            .await;
        assert!(matches!(aborted, Err(CommError::Aborted { peer: 2, .. })));
    }
}
