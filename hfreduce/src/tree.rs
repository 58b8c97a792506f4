//! Allreduce over a double binary tree, after NCCL's: the data is cut in two halves and each
//! half is reduced up its own binary tree to the root and broadcast back down, chunk by chunk
//! so that every level works at once. The second tree is the first one mirrored (member
//! `n − 1 − p` where the first has member `p`), so the members inner in one tree are leaves in
//! the other and every member forwards about as much as any other.
//!
//! A tree takes `2 log2 n` latency-bound hops where a ring takes `2 (n − 1)` steps, but every
//! rank moves about twice the data (against `2 (n − 1) / n`): it wins for small messages and
//! many members, which is where [`crate::config::Algorithm::choose`] takes it.

use bytes::Bytes;
use futures::StreamExt as _;

use crate::comm::{Inner, Ring};
use crate::dtype::{DType, ReduceOp, combine};
use crate::error::CommError;
use crate::wire::Signature;

/// One member's place in one of the two trees.
struct Tree {
    parent: Option<usize>,
    children: Vec<usize>,
}

impl Tree {
    /// The heap-shaped tree over `group` (position `p` has children `2p + 1` and `2p + 2`),
    /// over the members in order or, `mirrored`, in reverse order.
    fn new(group: &Ring, mirrored: bool) -> Tree {
        let n = group.members.len();
        let member =
            |position: usize| group.members[if mirrored { n - 1 - position } else { position }];
        let position = if mirrored { n - 1 - group.at } else { group.at };
        Tree {
            parent: (position > 0).then(|| member((position - 1) / 2)),
            children: [2 * position + 1, 2 * position + 2]
                .into_iter()
                .filter(|p| *p < n)
                .map(member)
                .collect(),
        }
    }
}

impl Inner {
    /// Allreduce of `bytes` over `group` through the two trees; message tags from `base`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn tree_allreduce(
        &self,
        group: &Ring,
        seq: u64,
        base: usize,
        signature: Signature,
        dtype: DType,
        op: ReduceOp,
        bytes: &mut [u8],
    ) -> Result<(), CommError> {
        if group.members.len() < 2 {
            return Ok(());
        }
        let size = dtype.size();
        let halves = Self::segments(2, bytes.len() / size, size);
        let (first, second) = bytes.split_at_mut(halves[0].1);
        // Each half's up and down messages get their own run of tags.
        let per_half = self.chunks((0, second.len()), size).len();
        let (first_tree, second_tree) = (Tree::new(group, false), Tree::new(group, true));
        tokio::try_join!(
            self.tree_half(
                &first_tree,
                seq,
                base,
                per_half,
                signature,
                dtype,
                op,
                first
            ),
            self.tree_half(
                &second_tree,
                seq,
                base + 2 * per_half,
                per_half,
                signature,
                dtype,
                op,
                second
            ),
        )?;
        Ok(())
    }

    /// One half through one tree: each chunk is combined with the children's, sent to the
    /// parent, and (from the root, once complete) passed back down. Going up and going down
    /// run at once, so chunk `c` descends while chunk `c + 1` still climbs.
    #[allow(clippy::too_many_arguments)]
    async fn tree_half(
        &self,
        tree: &Tree,
        seq: u64,
        base: usize,
        per_half: usize,
        signature: Signature,
        dtype: DType,
        op: ReduceOp,
        part: &mut [u8],
    ) -> Result<(), CommError> {
        let size = dtype.size();
        let step = self
            .chunks((0, part.len()), size)
            .first()
            .map_or(1, |(s, e)| e - s);
        let up = |c: usize| Self::tag(seq, base + c);
        let down = |c: usize| Self::tag(seq, base + per_half + c);
        // Chunks leave through this queue (at most two messages per chunk and child).
        let (outbox, queued) = futures::channel::mpsc::unbounded::<(usize, u64, Bytes)>();
        let (climbed, mut to_descend) = futures::channel::mpsc::unbounded::<(usize, &mut [u8])>();
        let climbing = {
            let outbox = outbox.clone();
            async move {
                for (c, chunk) in part.chunks_mut(step).enumerate() {
                    for child in &tree.children {
                        let data = self.receive(*child, up(c), signature).await?;
                        expect_len(*child, &data, chunk.len())?;
                        combine(dtype, op, chunk, &data);
                    }
                    if let Some(parent) = tree.parent {
                        let _ = outbox.unbounded_send((parent, up(c), self.copy_out(chunk)));
                    }
                    let _ = climbed.unbounded_send((c, chunk));
                }
                Ok::<_, CommError>(())
            }
        };
        let descending = async move {
            while let Some((c, chunk)) = to_descend.next().await {
                if let Some(parent) = tree.parent {
                    let data = self.receive(parent, down(c), signature).await?;
                    expect_len(parent, &data, chunk.len())?;
                    chunk.copy_from_slice(&data);
                }
                if !tree.children.is_empty() {
                    let data = self.copy_out(chunk);
                    for child in &tree.children {
                        let _ = outbox.unbounded_send((*child, down(c), data.clone()));
                    }
                }
            }
            Ok::<_, CommError>(())
        };
        // The first failure ends the others at once.
        tokio::try_join!(climbing, descending, self.send_all(queued, signature))?;
        Ok(())
    }
}

/// Checks a received chunk's length.
fn expect_len(from: usize, data: &[u8], expected: usize) -> Result<(), CommError> {
    if data.len() == expected {
        return Ok(());
    }
    Err(CommError::Mismatch(format!(
        "rank {from} sent {} bytes where {expected} were expected",
        data.len()
    )))
}
