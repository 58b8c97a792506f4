//! Gradient bucketing, as PyTorch DDP does it: the tensors a backward pass produces are
//! grouped into buckets (25 MiB by default; the first one smaller, so that communication starts
//! early); each tensor is marked ready as it is produced, and a bucket is averaged over the ranks
//! asynchronously as soon as all its tensors are ready — in bucket order, which every rank
//! shares, so collectives line up across ranks whatever order tensors become ready in.

use crate::comm::{Communicator, Handle};
use crate::dtype::{Element, ReduceOp};
use crate::error::CommError;

/// DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;
/// DDP's default first bucket size.
pub const DEFAULT_FIRST_BUCKET_BYTES: usize = 1 << 20;

/// Where a tensor sits: its bucket and its offset (elements) in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    bucket: usize,
    offset: usize,
    len: usize,
}

enum State<T> {
    /// Filling: the bucket's flat data and how many of its tensors are in.
    Filling { data: Vec<T>, missing: usize },
    /// Being reduced.
    InFlight(Handle<Vec<T>>),
    /// Reduced (after `finish`).
    Done(Vec<T>),
}

/// Buckets of one backward pass.
pub struct Buckets<'c, T: Element> {
    comm: &'c Communicator,
    places: Vec<Place>,
    states: Vec<State<T>>,
    ready: Vec<bool>,
    /// Buckets launched so far (always a prefix).
    launched: usize,
}

impl<'c, T: Element> Buckets<'c, T> {
    /// Buckets for tensors of `lens` elements, in the order they will be produced, of at most
    /// `bucket_bytes` (the first at most `first_bucket_bytes`); a tensor larger than a bucket
    /// gets one of its own.
    pub fn new(
        comm: &'c Communicator,
        lens: &[usize],
        bucket_bytes: usize,
        first_bucket_bytes: usize,
    ) -> Result<Buckets<'c, T>, CommError> {
        if bucket_bytes == 0 || first_bucket_bytes == 0 {
            return Err(CommError::InvalidArgument(
                "bucket sizes must be above 0".to_string(),
            ));
        }
        let size = std::mem::size_of::<T>();
        let mut places = Vec::with_capacity(lens.len());
        let mut bucket_lens: Vec<(usize, usize)> = Vec::new(); // (elements, tensors)
        for &len in lens {
            let limit = if bucket_lens.len() <= 1 {
                first_bucket_bytes
            } else {
                bucket_bytes
            };
            let fits = bucket_lens
                .last()
                .is_some_and(|(elements, _)| (elements + len) * size <= limit);
            if !fits {
                bucket_lens.push((0, 0));
            }
            let bucket = bucket_lens.len() - 1;
            let (elements, tensors) = &mut bucket_lens[bucket];
            places.push(Place {
                bucket,
                offset: *elements,
                len,
            });
            *elements += len;
            *tensors += 1;
        }
        let states = bucket_lens
            .iter()
            .map(|(elements, tensors)| State::Filling {
                data: vec![T::zeroed(); *elements],
                missing: *tensors,
            })
            .collect();
        Ok(Buckets {
            comm,
            ready: vec![false; places.len()],
            places,
            states,
            launched: 0,
        })
    }

    /// The buckets' sizes in elements, in order.
    pub fn plan(&self) -> Vec<usize> {
        let mut sizes = vec![0; self.states.len()];
        for place in &self.places {
            sizes[place.bucket] += place.len;
        }
        sizes
    }

    /// Tensor `index` is produced: its values go into its bucket, and every bucket that is now
    /// complete (and follows launched ones) starts its average over the ranks.
    pub fn ready(&mut self, index: usize, values: &[T]) -> Result<(), CommError> {
        let place = *self
            .places
            .get(index)
            .ok_or_else(|| CommError::InvalidArgument(format!("no tensor {index}")))?;
        if values.len() != place.len {
            return Err(CommError::InvalidArgument(format!(
                "tensor {index} has {} elements, registered with {}",
                values.len(),
                place.len
            )));
        }
        if std::mem::replace(&mut self.ready[index], true) {
            return Err(CommError::InvalidArgument(format!(
                "tensor {index} marked ready twice"
            )));
        }
        if let State::Filling { data, missing } = &mut self.states[place.bucket] {
            data[place.offset..place.offset + place.len].copy_from_slice(values);
            *missing -= 1;
        }
        while self.launched < self.states.len() {
            let complete = matches!(
                &self.states[self.launched],
                State::Filling { missing: 0, .. }
            );
            if !complete {
                break;
            }
            let state = std::mem::replace(&mut self.states[self.launched], State::Done(Vec::new()));
            if let State::Filling { data, .. } = state {
                self.states[self.launched] =
                    State::InFlight(self.comm.allreduce_async(data, ReduceOp::Avg));
            }
            self.launched += 1;
        }
        Ok(())
    }

    /// Waits for every bucket and returns each tensor's averaged values, in registration order.
    pub fn finish(mut self) -> Result<Vec<Vec<T>>, CommError> {
        if let Some(missing) = self.ready.iter().position(|r| !r) {
            return Err(CommError::InvalidArgument(format!(
                "tensor {missing} was never marked ready"
            )));
        }
        for state in &mut self.states {
            if let State::InFlight(_) = state
                && let State::InFlight(handle) = std::mem::replace(state, State::Done(Vec::new()))
            {
                *state = State::Done(handle.wait()?);
            }
        }
        Ok(self
            .places
            .iter()
            .map(|place| match &self.states[place.bucket] {
                State::Done(data) => data[place.offset..place.offset + place.len].to_vec(),
                _ => Vec::new(),
            })
            .collect())
    }
}
