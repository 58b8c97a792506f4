//! The io_uring backend: one ring per target, driven by one thread that batches submissions
//! from a bounded queue and hands completions back through oneshot channels.
//!
//! Safety of the ring: the kernel reads from and writes into operation buffers until the
//! completion arrives, so every buffer (and the file whose descriptor the entry names) is owned
//! by the in-flight table until its completion has been reaped; nothing else can touch or free
//! it in between. A short transfer is resubmitted for its remainder.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{IoUring, opcode, squeue, types};
use tokio::sync::{mpsc, oneshot};

use crate::buf::AlignedBuf;

enum Kind {
    Read,
    Write,
    Sync,
}

struct Request {
    kind: Kind,
    file: Arc<File>,
    offset: u64,
    buf: AlignedBuf,
    done: oneshot::Sender<io::Result<AlignedBuf>>,
}

/// An operation the kernel owns until its completion is reaped.
struct InFlight {
    request: Request,
    /// Bytes transferred so far (a short transfer is resubmitted for the rest).
    transferred: usize,
}

/// A ring and the thread that drives it.
#[derive(Debug)]
pub struct UringIo {
    requests: mpsc::Sender<Request>,
}

impl UringIo {
    /// Creates a ring of `depth` entries and starts its thread.
    pub fn start(depth: u32, name: &str) -> io::Result<UringIo> {
        let ring = IoUring::new(depth)?;
        let (requests, queue) = mpsc::channel(depth as usize * 4);
        std::thread::Builder::new()
            .name(format!("uring-{name}"))
            .spawn(move || drive(ring, queue, depth as usize))?;
        Ok(UringIo { requests })
    }

    async fn submit(
        &self,
        kind: Kind,
        file: Arc<File>,
        offset: u64,
        buf: AlignedBuf,
    ) -> io::Result<AlignedBuf> {
        let (done, completion) = oneshot::channel();
        let request = Request {
            kind,
            file,
            offset,
            buf,
            done,
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| io::Error::other("the io_uring thread has stopped"))?;
        completion
            .await
            .map_err(|_| io::Error::other("the io_uring thread has stopped"))?
    }

    pub(super) async fn read_at(
        &self,
        file: Arc<File>,
        offset: u64,
        buf: AlignedBuf,
    ) -> io::Result<AlignedBuf> {
        self.submit(Kind::Read, file, offset, buf).await
    }

    pub(super) async fn write_at(
        &self,
        file: Arc<File>,
        offset: u64,
        buf: AlignedBuf,
    ) -> io::Result<AlignedBuf> {
        self.submit(Kind::Write, file, offset, buf).await
    }

    pub(super) async fn sync_data(&self, file: Arc<File>) -> io::Result<()> {
        self.submit(Kind::Sync, file, 0, AlignedBuf::zeroed(0))
            .await
            .map(|_| ())
    }
}

fn entry(op: &mut InFlight, key: u64) -> squeue::Entry {
    let request = &mut op.request;
    let fd = types::Fd(request.file.as_raw_fd());
    let offset = request.offset + op.transferred as u64;
    let remaining = (request.buf.len() - op.transferred) as u32;
    match request.kind {
        Kind::Read => {
            let ptr = request.buf.as_mut_slice()[op.transferred..].as_mut_ptr();
            opcode::Read::new(fd, ptr, remaining).offset(offset).build()
        }
        Kind::Write => {
            let ptr = request.buf.as_slice()[op.transferred..].as_ptr();
            opcode::Write::new(fd, ptr, remaining)
                .offset(offset)
                .build()
        }
        Kind::Sync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    }
    .user_data(key)
}

/// The ring's thread: takes requests, submits them in batches, completes them.
fn drive(mut ring: IoUring, mut queue: mpsc::Receiver<Request>, depth: usize) {
    let mut slots: Vec<Option<InFlight>> = Vec::with_capacity(depth);
    let mut free: Vec<usize> = Vec::new();
    let mut in_flight = 0usize;
    let mut closed = false;
    loop {
        // Block for work only when nothing is in flight; otherwise top up without waiting.
        if in_flight == 0 {
            if closed {
                return;
            }
            match queue.blocking_recv() {
                Some(request) => in_flight += push(&mut ring, &mut slots, &mut free, request),
                None => return,
            }
        }
        while in_flight < depth {
            match queue.try_recv() {
                Ok(request) => in_flight += push(&mut ring, &mut slots, &mut free, request),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if in_flight == 0 {
            continue;
        }
        if let Err(error) = ring.submit_and_wait(1) {
            if error.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // The ring is unusable: fail everything in flight and stop.
            for slot in slots.iter_mut() {
                if let Some(op) = slot.take() {
                    let _ = op
                        .request
                        .done
                        .send(Err(io::Error::new(error.kind(), error.to_string())));
                }
            }
            return;
        }
        let completions: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (key, result) in completions {
            let index = key as usize;
            let Some(mut op) = slots.get_mut(index).and_then(Option::take) else {
                continue;
            };
            if result < 0 {
                free.push(index);
                in_flight -= 1;
                let _ = op
                    .request
                    .done
                    .send(Err(io::Error::from_raw_os_error(-result)));
                continue;
            }
            op.transferred += result as usize;
            let finished =
                matches!(op.request.kind, Kind::Sync) || op.transferred >= op.request.buf.len();
            if finished {
                free.push(index);
                in_flight -= 1;
                let _ = op.request.done.send(Ok(op.request.buf));
            } else if result == 0 {
                free.push(index);
                in_flight -= 1;
                let _ = op.request.done.send(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "transfer ended after {} of {} bytes",
                        op.transferred,
                        op.request.buf.len()
                    ),
                )));
            } else {
                // A short transfer: submit the rest from the same slot.
                let sqe = entry(&mut op, key);
                slots[index] = Some(op);
                submit_entry(&mut ring, &sqe);
            }
        }
    }
}

/// Places a request in a free slot and queues its entry; returns 1 (one more in flight).
fn push(
    ring: &mut IoUring,
    slots: &mut Vec<Option<InFlight>>,
    free: &mut Vec<usize>,
    request: Request,
) -> usize {
    let index = match free.pop() {
        Some(index) => index,
        None => {
            slots.push(None);
            slots.len() - 1
        }
    };
    let mut op = InFlight {
        request,
        transferred: 0,
    };
    let sqe = entry(&mut op, index as u64);
    slots[index] = Some(op);
    submit_entry(ring, &sqe);
    1
}

fn submit_entry(ring: &mut IoUring, sqe: &squeue::Entry) {
    loop {
        // SAFETY: the entry points into a buffer and names a file that the in-flight slot owns
        // until its completion is reaped (see the module comment).
        let pushed = unsafe { ring.submission().push(sqe) };
        if pushed.is_ok() {
            return;
        }
        // The submission queue is full: hand what is queued to the kernel and retry.
        if let Err(error) = ring.submit() {
            tracing::warn!(%error, "io_uring submit failed while draining a full queue");
        }
    }
}
