//! The node stage of allreduce, after HFReduce: the ranks of one node (equal node ids) share
//! their data through a file in `/dev/shm` (memory, not disk) and only the node's reduction
//! goes on the network.
//!
//! With lanes on (`HFREDUCE_LANES=1`) and every node holding the same number of ranks, every
//! rank works: rank `i` of a node reduces
//! part `i` of the data from all the node's slots, allreduces that part over the network with
//! rank `i` of every other node (its *lane*), and writes it to the node's result region, which
//! every rank of the node then reads. Otherwise (the default) the node's lowest rank, its
//! leader, does the reduction and the network part for the whole buffer.
//!
//! Ordering between ranks rides on small control messages through the mailbox: the leader
//! says the file is large enough, each local rank says its slot is written, the leader says
//! the result is in. A local rank reads the result before it can write its next call's slot,
//! so the leader never overwrites a result still being read.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::Mutex;

use bytes::Bytes;

use crate::comm::{Inner, Ring};
use crate::config::CommConfig;
use crate::dtype::{Buffer, DType, ReduceOp, combine};
use crate::error::CommError;
use crate::wire::Signature;

/// Message indices of the control messages, far above any network message's (those of stage
/// `k` start at `k` times one stage's share of tags, below `1 << 30`).
const WRITTEN: usize = 1 << 30;
const RESULT: usize = 2 << 30;
const GROWN: usize = 3 << 30;
const PART_DONE: usize = GROWN + 1;
/// Most pipeline stages in one call (stage `k` is told by index `WRITTEN + k`).
const STAGES_MAX: usize = 1 << 30;

/// This rank's node.
pub(crate) struct Node {
    /// The node's ranks, in rank order; the first leads.
    locals: Vec<usize>,
    /// This rank's index among them.
    at: usize,
    /// The leaders of every node (leaders only).
    leaders: Option<Ring>,
    /// Rank `at` of every node, when all nodes have the same number of ranks.
    lane: Option<Ring>,
    path: PathBuf,
    file: Mutex<Option<File>>,
    /// Bytes per pipeline stage.
    stage_bytes: usize,
    /// The leader's buffer for reading slots (kept between calls).
    slot: Mutex<Buffer>,
}

fn io(what: &str, path: &std::path::Path, error: &std::io::Error) -> CommError {
    CommError::SharedMemory(format!("{what} {}: {error}", path.display()))
}

impl Node {
    /// The node stage for this rank, if allreduce should use one: some node holds more than one
    /// rank and `/dev/shm` is there.
    pub(crate) fn plan(config: &CommConfig, nodes: &[String]) -> Option<Node> {
        let shared = nodes
            .iter()
            .any(|n| nodes.iter().filter(|m| *m == n).count() > 1);
        if !shared || !std::path::Path::new("/dev/shm").is_dir() {
            return None;
        }
        let mine = &nodes[config.rank];
        let locals: Vec<usize> = (0..nodes.len()).filter(|r| nodes[*r] == *mine).collect();
        let at = locals.iter().position(|r| *r == config.rank)?;
        let mut leaders_list: Vec<usize> = Vec::new();
        for (rank, node) in nodes.iter().enumerate() {
            if nodes[..rank].iter().all(|n| n != node) {
                leaders_list.push(rank);
            }
        }
        let sizes: Vec<usize> = leaders_list
            .iter()
            .map(|l| nodes.iter().filter(|n| **n == nodes[*l]).count())
            .collect();
        let lane = (config.lanes && sizes.iter().all(|s| *s == locals.len())).then(|| {
            let members: Vec<usize> = leaders_list
                .iter()
                .map(|l| {
                    let node = &nodes[*l];
                    (0..nodes.len())
                        .filter(|r| nodes[*r] == *node)
                        .nth(at)
                        .unwrap_or(*l)
                })
                .collect();
            Ring {
                at: members.iter().position(|r| *r == config.rank).unwrap_or(0),
                members,
            }
        });
        let leaders = (at == 0).then(|| Ring {
            at: leaders_list
                .iter()
                .position(|r| *r == config.rank)
                .unwrap_or(0),
            members: leaders_list,
        });
        let safe = |text: &str| -> String {
            text.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect()
        };
        let path = PathBuf::from("/dev/shm").join(format!(
            "hfreduce-{}-{}-{}",
            safe(&config.master_addr),
            config.master_port,
            safe(mine)
        ));
        Some(Node {
            locals,
            at,
            leaders,
            lane,
            path,
            file: Mutex::new(None),
            stage_bytes: config.stage_bytes,
            slot: Mutex::new(Buffer::default()),
        })
    }

    fn file(&self, create: bool) -> Result<File, CommError> {
        let mut slot = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = slot.as_ref() {
            return file.try_clone().map_err(|e| io("reusing", &self.path, &e));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(&self.path)
            .map_err(|e| io("opening", &self.path, &e))?;
        *slot = Some(
            file.try_clone()
                .map_err(|e| io("reusing", &self.path, &e))?,
        );
        Ok(file)
    }

    /// The node's file, at least `needed` bytes long: the leader grows it and tells the other
    /// local ranks, which wait for that before using it.
    async fn sized_file(
        &self,
        inner: &Inner,
        seq: u64,
        signature: Signature,
        needed: u64,
    ) -> Result<File, CommError> {
        if self.at != 0 {
            inner
                .receive(self.locals[0], Inner::tag(seq, GROWN), signature)
                .await?;
            return self.file(false);
        }
        let file = self.file(true)?;
        let size = file
            .metadata()
            .map_err(|e| io("reading", &self.path, &e))?
            .len();
        if size < needed {
            file.set_len(needed)
                .map_err(|e| io("growing", &self.path, &e))?;
        }
        for local in &self.locals[1..] {
            self.control(inner, *local, seq, GROWN, signature).await?;
        }
        Ok(file)
    }

    async fn control(
        &self,
        inner: &Inner,
        to: usize,
        seq: u64,
        index: usize,
        signature: Signature,
    ) -> Result<(), CommError> {
        inner
            .send(to, Inner::tag(seq, index), signature, Bytes::new())
            .await
    }

    /// The node-stage allreduce of `buffer` (see the module documentation).
    pub(crate) async fn allreduce(
        &self,
        inner: &Inner,
        seq: u64,
        signature: Signature,
        dtype: DType,
        op: ReduceOp,
        buffer: &mut Buffer,
    ) -> Result<(), CommError> {
        if let (Some(lane), true) = (&self.lane, self.locals.len() > 1) {
            return self
                .allreduce_in_lanes(inner, lane, seq, signature, dtype, op, buffer)
                .await;
        }
        let stages = Inner::chunks_of(self.stage_bytes, (0, buffer.len()), dtype.size());
        if stages.len() >= STAGES_MAX {
            return Err(CommError::InvalidArgument(format!(
                "{} bytes make {} pipeline stages, more than {STAGES_MAX}: raise HFREDUCE_STAGE_BYTES",
                buffer.len(),
                stages.len()
            )));
        }
        let slots = self.locals.len();
        if slots == 1 {
            // Alone on its node: no file, but the same stages on the network as every leader.
            if let Some(leaders) = &self.leaders {
                let tags = Self::stage_tags(inner, leaders, &stages, dtype);
                for (k, (start, end)) in stages.iter().enumerate() {
                    let stage = &mut buffer.bytes_mut()[*start..*end];
                    inner
                        .group_allreduce(leaders, seq, k * tags, signature, dtype, op, stage)
                        .await?;
                }
            }
            return Ok(());
        }
        let file = self
            .sized_file(inner, seq, signature, (slots * buffer.len()) as u64)
            .await?;
        if self.at == 0 {
            self.lead(inner, &file, seq, signature, dtype, op, buffer, &stages)
        } else {
            self.follow(inner, &file, seq, signature, buffer, &stages)
                .await
        }
    }

    /// Message tags one stage's network allreduce takes (stage `k`'s start at `k` times this).
    fn stage_tags(inner: &Inner, leaders: &Ring, stages: &[(usize, usize)], dtype: DType) -> usize {
        stages.first().map_or(0, |(start, end)| {
            inner.allreduce_tags(leaders.len(), end - start, dtype.size())
        })
    }

    /// A local rank's part: writes its slot stage by stage, telling the leader as each is in,
    /// then reads each stage of the result as the leader says it is there.
    async fn follow(
        &self,
        inner: &Inner,
        file: &File,
        seq: u64,
        signature: Signature,
        buffer: &mut Buffer,
        stages: &[(usize, usize)],
    ) -> Result<(), CommError> {
        let leader = self.locals[0];
        let slot = (self.at * buffer.len()) as u64;
        for (k, (start, end)) in stages.iter().enumerate() {
            tokio::task::block_in_place(|| {
                file.write_all_at(&buffer.bytes()[*start..*end], slot + *start as u64)
            })
            .map_err(|e| io("writing", &self.path, &e))?;
            self.control(inner, leader, seq, WRITTEN + k, signature)
                .await?;
        }
        for (k, (start, end)) in stages.iter().enumerate() {
            inner
                .receive(leader, Inner::tag(seq, RESULT + k), signature)
                .await?;
            tokio::task::block_in_place(|| {
                file.read_exact_at(&mut buffer.bytes_mut()[*start..*end], *start as u64)
            })
            .map_err(|e| io("reading", &self.path, &e))?;
        }
        Ok(())
    }

    /// The leader's part, a two-stage pipeline: a reducer thread combines each stage of the
    /// node's slots into this rank's buffer while this thread carries the stage before it
    /// over the network, writes it to the result region and tells the local ranks.
    #[allow(clippy::too_many_arguments)]
    fn lead(
        &self,
        inner: &Inner,
        file: &File,
        seq: u64,
        signature: Signature,
        dtype: DType,
        op: ReduceOp,
        buffer: &mut Buffer,
        stages: &[(usize, usize)],
    ) -> Result<(), CommError> {
        let handle = tokio::runtime::Handle::current();
        let len = buffer.len();
        let tags = self
            .leaders
            .as_ref()
            .map_or(0, |leaders| Self::stage_tags(inner, leaders, stages, dtype));
        // Every stage can be waiting at once: the reducer never blocks on the network.
        let (reduced, mut to_send) = tokio::sync::mpsc::channel(stages.len().max(1));
        // Off the runtime: the reducer and this thread block (on files and on each other).
        tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                let reducer_handle = handle.clone();
                let reducer = scope.spawn(move || {
                    let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
                    let mut rest = buffer.bytes_mut();
                    for (k, (start, end)) in stages.iter().enumerate() {
                        let (stage, tail) = std::mem::take(&mut rest).split_at_mut(end - start);
                        rest = tail;
                        for local in &self.locals[1..] {
                            reducer_handle.block_on(inner.receive(
                                *local,
                                Inner::tag(seq, WRITTEN + k),
                                signature,
                            ))?;
                        }
                        slot.resize(end - start);
                        for index in 1..self.locals.len() {
                            file.read_exact_at(slot.bytes_mut(), (index * len + start) as u64)
                                .map_err(|e| io("reading", &self.path, &e))?;
                            combine_parallel(dtype, op, stage, slot.bytes());
                        }
                        if reduced.blocking_send((k, *start, stage)).is_err() {
                            break; // the network side failed; its error is the one returned
                        }
                    }
                    Ok::<_, CommError>(())
                });
                let sent = handle.block_on(async move {
                    while let Some((k, start, stage)) = to_send.recv().await {
                        if let Some(leaders) = &self.leaders {
                            inner
                                .group_allreduce(
                                    leaders,
                                    seq,
                                    k * tags,
                                    signature,
                                    dtype,
                                    op,
                                    stage,
                                )
                                .await?;
                        }
                        file.write_all_at(stage, start as u64)
                            .map_err(|e| io("writing", &self.path, &e))?;
                        for local in &self.locals[1..] {
                            self.control(inner, *local, seq, RESULT + k, signature)
                                .await?;
                        }
                    }
                    Ok::<_, CommError>(())
                });
                let reduced = reducer.join().unwrap_or_else(|_| {
                    Err(CommError::SharedMemory(
                        "the node's reducer panicked".to_string(),
                    ))
                });
                sent.and(reduced)
            })
        })
    }
}

impl Node {
    /// Every local rank reduces its part and carries it on its lane (see the module docs).
    /// File layout: one slot per local rank, then the result region.
    #[allow(clippy::too_many_arguments)]
    async fn allreduce_in_lanes(
        &self,
        inner: &Inner,
        lane: &Ring,
        seq: u64,
        signature: Signature,
        dtype: DType,
        op: ReduceOp,
        buffer: &mut Buffer,
    ) -> Result<(), CommError> {
        let len = buffer.len();
        let slots = self.locals.len();
        let others: Vec<usize> = self
            .locals
            .iter()
            .copied()
            .filter(|r| *r != self.locals[self.at])
            .collect();
        let file = self
            .sized_file(inner, seq, signature, ((slots + 1) * len) as u64)
            .await?;
        let at = |slot: usize, offset: usize| (slot * len + offset) as u64;
        // 1. Every slot written.
        tokio::task::block_in_place(|| file.write_all_at(buffer.bytes(), at(self.at, 0)))
            .map_err(|e| io("writing", &self.path, &e))?;
        for local in &others {
            self.control(inner, *local, seq, WRITTEN, signature).await?;
        }
        for local in &others {
            inner
                .receive(*local, Inner::tag(seq, WRITTEN), signature)
                .await?;
        }
        // 2. This rank's part reduced over the node's slots, then over its lane.
        let size = dtype.size();
        let parts = Inner::segments(slots, len / size, size);
        let (start, end) = parts[self.at];
        {
            let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
            slot.resize(end - start);
            for other in (0..slots).filter(|s| *s != self.at) {
                tokio::task::block_in_place(|| {
                    file.read_exact_at(slot.bytes_mut(), at(other, start))
                })
                .map_err(|e| io("reading", &self.path, &e))?;
                tokio::task::block_in_place(|| {
                    combine_parallel(dtype, op, &mut buffer.bytes_mut()[start..end], slot.bytes());
                });
            }
        }
        inner
            .group_allreduce(
                lane,
                seq,
                0,
                signature,
                dtype,
                op,
                &mut buffer.bytes_mut()[start..end],
            )
            .await?;
        // 3. The part into the result region; then every other part from it.
        tokio::task::block_in_place(|| {
            file.write_all_at(&buffer.bytes()[start..end], at(slots, start))
        })
        .map_err(|e| io("writing", &self.path, &e))?;
        for local in &others {
            self.control(inner, *local, seq, PART_DONE, signature)
                .await?;
        }
        for local in &others {
            inner
                .receive(*local, Inner::tag(seq, PART_DONE), signature)
                .await?;
        }
        for (part, (s, e)) in parts.iter().enumerate() {
            if part != self.at {
                tokio::task::block_in_place(|| {
                    file.read_exact_at(&mut buffer.bytes_mut()[*s..*e], at(slots, *s))
                })
                .map_err(|e| io("reading", &self.path, &e))?;
            }
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.at == 0 && self.locals.len() > 1 {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Threads the node's reduction is split over.
const REDUCE_THREADS: usize = 2;

/// [`combine`] split across threads on element boundaries.
fn combine_parallel(dtype: DType, op: ReduceOp, acc: &mut [u8], src: &[u8]) {
    let size = dtype.size();
    let elements = acc.len() / size;
    if elements < 1 << 16 {
        combine(dtype, op, acc, src);
        return;
    }
    let per = elements.div_ceil(REDUCE_THREADS) * size;
    std::thread::scope(|scope| {
        for (a, s) in acc.chunks_mut(per).zip(src.chunks(per)) {
            scope.spawn(move || combine(dtype, op, a, s));
        }
    });
}
