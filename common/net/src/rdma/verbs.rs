//! Safe wrappers over the verbs API (libibverbs through `rdma-sys`): an opened device with the
//! port and GID its connections use, protection domains, registered memory, completion queues
//! woken through their completion channel's file descriptor (tokio waits on it: no thread
//! busy-polls), and reliable-connected queue pairs.
//!
//! This module and `conn` hold all of fireflyer's `unsafe` code for RDMA, each block with the
//! reason it is sound. Every object keeps what it was made from alive (`Arc`), so the order
//! verbs require — queue pairs before their completion queues and memory, those before the
//! protection domain, that before the device — holds whatever order Rust drops them in.
//! Posting work requests is `unsafe`: the memory must stay registered and untouched until the
//! request completes, which only the caller (the connection's in-flight table) can promise.

#![allow(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::alloc::Layout;
use std::ffi::CStr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::raw::c_int;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::{
    ___ibv_query_port, ibv_access_flags, ibv_ack_cq_events, ibv_alloc_pd, ibv_close_device,
    ibv_comp_channel, ibv_context, ibv_cq, ibv_create_comp_channel, ibv_create_cq, ibv_create_qp,
    ibv_dealloc_pd, ibv_dereg_mr, ibv_destroy_comp_channel, ibv_destroy_cq, ibv_destroy_qp,
    ibv_device_attr, ibv_free_device_list, ibv_get_cq_event, ibv_get_device_list,
    ibv_get_device_name, ibv_gid, ibv_mr, ibv_mtu, ibv_open_device, ibv_pd, ibv_poll_cq,
    ibv_port_attr, ibv_port_state, ibv_post_recv, ibv_post_send, ibv_qp, ibv_qp_attr,
    ibv_qp_attr_mask, ibv_qp_init_attr, ibv_qp_state, ibv_qp_type, ibv_query_device, ibv_query_gid,
    ibv_recv_wr, ibv_reg_mr, ibv_req_notify_cq, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc,
    ibv_wc_opcode, ibv_wc_status, ibv_wc_status_str, ibv_wr_opcode,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Why an RDMA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// There is no usable RDMA device here; the message says why.
    #[error("no RDMA device: {0}")]
    NoDevice(String),
    /// A verbs call failed.
    #[error("{op}: {cause}")]
    Verbs {
        /// The verbs call.
        op: &'static str,
        /// What it returned.
        cause: std::io::Error,
    },
    /// A work request completed with an error (the queue pair is then in the error state).
    #[error("work request {wr_id} failed: {status}")]
    Completion {
        /// The request's id.
        wr_id: u64,
        /// The device's description of the failure.
        status: String,
    },
}

/// The failure of the verbs call `op` from its return value: verbs return the errno itself
/// (modify, post) or -1 with errno set (the rest).
fn check(rc: c_int, op: &'static str) -> Result<(), RdmaError> {
    match rc {
        0 => Ok(()),
        rc if rc > 0 => Err(RdmaError::Verbs {
            op,
            cause: std::io::Error::from_raw_os_error(rc),
        }),
        _ => Err(last_error(op)),
    }
}

fn last_error(op: &'static str) -> RdmaError {
    RdmaError::Verbs {
        op,
        cause: std::io::Error::last_os_error(),
    }
}

/// The port every connection uses (one-port devices, as RoCE NICs and Soft-RoCE are).
const PORT: u8 = 1;

/// An IPv4-mapped GID (`::ffff:a.b.c.d`): RoCE v2 over IPv4, routable between hosts.
fn is_ipv4_mapped(gid: &[u8; 16]) -> bool {
    gid[..10].iter().all(|b| *b == 0) && gid[10] == 0xff && gid[11] == 0xff
}

/// An open RDMA device with the port and GID its queue pairs use.
pub struct Device {
    context: NonNull<ibv_context>,
    name: String,
    gid_index: u8,
    gid: [u8; 16],
    mtu: ibv_mtu::Type,
    max_rd_atomic: u8,
}

// SAFETY: libibverbs objects may be used from any thread: the verbs API is thread-safe (rdma-core
// documents every verb as such; providers lock internally where they need to).
unsafe impl Send for Device {}
// SAFETY: as above; `Device` only reads its context after opening it.
unsafe impl Sync for Device {}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("gid_index", &self.gid_index)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Opens the device called `name`, or (empty) the first one whose port is active, and
    /// picks its first IPv4-mapped GID.
    pub fn open(name: &str) -> Result<Arc<Device>, RdmaError> {
        let mut count: c_int = 0;
        // SAFETY: `count` is a valid out-pointer; the list is freed below.
        let list = unsafe { ibv_get_device_list(&mut count) };
        if list.is_null() {
            let cause = std::io::Error::last_os_error();
            return Err(RdmaError::NoDevice(format!(
                "this kernel offers no RDMA (no InfiniBand/RoCE support: {cause})"
            )));
        }
        let count = usize::try_from(count).unwrap_or(0);
        let mut found = Vec::new();
        let mut opened = Err(RdmaError::NoDevice("no RDMA device found".to_string()));
        for i in 0..count {
            // SAFETY: `list` holds `count` device pointers (ibv_get_device_list's contract).
            let device = unsafe { *list.add(i) };
            // SAFETY: `device` is a valid device of the list; the name is a C string it owns.
            let device_name = unsafe { CStr::from_ptr(ibv_get_device_name(device)) }
                .to_string_lossy()
                .into_owned();
            found.push(device_name.clone());
            if !name.is_empty() && device_name != name {
                continue;
            }
            // SAFETY: `device` is valid until the list is freed; the context outlives both.
            let context = unsafe { ibv_open_device(device) };
            let Some(context) = NonNull::new(context) else {
                opened = Err(last_error("ibv_open_device"));
                continue;
            };
            match Device::configure(context, device_name) {
                Ok(device) => {
                    opened = Ok(device);
                    break;
                }
                Err(error) => opened = Err(error),
            }
        }
        // SAFETY: `list` came from ibv_get_device_list; opened contexts stay valid after this.
        unsafe { ibv_free_device_list(list) };
        match opened {
            Err(RdmaError::NoDevice(_)) if !name.is_empty() => Err(RdmaError::NoDevice(format!(
                "no device called {name} (found: {})",
                if found.is_empty() {
                    "none".to_string()
                } else {
                    found.join(", ")
                }
            ))),
            other => other.map(Arc::new),
        }
    }

    /// Checks the port of an opened context and finds its GID; closes the context on failure.
    fn configure(context: NonNull<ibv_context>, name: String) -> Result<Device, RdmaError> {
        let mut device = Device {
            context,
            name,
            gid_index: 0,
            gid: [0; 16],
            mtu: ibv_mtu::IBV_MTU_1024,
            max_rd_atomic: 1,
        };
        // From here on, dropping `device` closes the context.
        // SAFETY: zeroed attribute structs are valid inputs; the context is open.
        let mut port: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `port` is a valid out-pointer.
        let rc = unsafe { ___ibv_query_port(context.as_ptr(), PORT, &mut port) };
        check(rc, "ibv_query_port")?;
        if port.state != ibv_port_state::IBV_PORT_ACTIVE {
            return Err(RdmaError::NoDevice(format!(
                "{}: port {PORT} is not active (state {})",
                device.name, port.state
            )));
        }
        device.mtu = port.active_mtu;
        // SAFETY: zeroed is a valid ibv_device_attr to be filled in.
        let mut attr: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `attr` a valid out-pointer.
        let rc = unsafe { ibv_query_device(context.as_ptr(), &mut attr) };
        check(rc, "ibv_query_device")?;
        device.max_rd_atomic = u8::try_from(attr.max_qp_rd_atom.clamp(1, 16)).unwrap_or(1);
        let table = port.gid_tbl_len.max(0);
        let mut first = None;
        for index in 0..table {
            // SAFETY: zeroed is a valid GID to be filled in.
            let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
            // SAFETY: the context is open, `index` is within the port's GID table.
            if unsafe { ibv_query_gid(context.as_ptr(), PORT, index, &mut gid) } != 0 {
                continue;
            }
            // SAFETY: every bit pattern is a valid `raw` view of the union.
            let raw = unsafe { gid.raw };
            if raw.iter().all(|b| *b == 0) {
                continue;
            }
            first.get_or_insert((index, raw));
            if is_ipv4_mapped(&raw) {
                first = Some((index, raw));
                break;
            }
        }
        let Some((index, gid)) = first else {
            return Err(RdmaError::NoDevice(format!(
                "{}: port {PORT} has no GID (no IP address on its network device?)",
                device.name
            )));
        };
        device.gid_index = u8::try_from(index).unwrap_or(0);
        device.gid = gid;
        Ok(device)
    }

    /// The device's name (`mlx5_0`, `rxe0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The GID its queue pairs are reached at.
    pub fn gid(&self) -> [u8; 16] {
        self.gid
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: the context was opened by `open`, and every object made from it holds an
        // `Arc<Device>`, so none is left when this runs.
        unsafe { ibv_close_device(self.context.as_ptr()) };
    }
}

/// A protection domain: memory registered in it can be used by its queue pairs.
pub struct ProtectionDomain {
    pd: NonNull<ibv_pd>,
    device: Arc<Device>,
}

// SAFETY: verbs objects are thread-safe (see `Device`).
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl std::fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("device", &self.device.name)
            .finish()
    }
}

impl ProtectionDomain {
    /// Allocates a protection domain on `device`.
    pub fn new(device: &Arc<Device>) -> Result<Arc<ProtectionDomain>, RdmaError> {
        // SAFETY: the context is open for as long as `device` lives.
        let pd = unsafe { ibv_alloc_pd(device.context.as_ptr()) };
        let pd = NonNull::new(pd).ok_or_else(|| last_error("ibv_alloc_pd"))?;
        Ok(Arc::new(ProtectionDomain {
            pd,
            device: device.clone(),
        }))
    }

    /// The device it belongs to.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: memory regions and queue pairs hold an `Arc` of this domain: none is left.
        unsafe { ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

/// Page-aligned memory registered for local writes and remote reads and writes.
pub struct RegisteredMemory {
    ptr: NonNull<u8>,
    layout: Layout,
    mr: NonNull<ibv_mr>,
    /// Kept alive until the memory is deregistered.
    _pd: Arc<ProtectionDomain>,
    /// The pool whose bytes it counts in, told when it is deregistered.
    account: Option<Arc<super::pool::Account>>,
}

// SAFETY: the memory is owned by this value; the registration is a verbs object (thread-safe).
unsafe impl Send for RegisteredMemory {}
// SAFETY: shared access only reads (`as_slice`); writes need `&mut`.
unsafe impl Sync for RegisteredMemory {}

impl std::fmt::Debug for RegisteredMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredMemory")
            .field("len", &self.layout.size())
            .finish_non_exhaustive()
    }
}

impl RegisteredMemory {
    /// Allocates `len` zeroed bytes (at least one page) and registers them in `pd`.
    pub fn new(pd: &Arc<ProtectionDomain>, len: usize) -> Result<RegisteredMemory, RdmaError> {
        let layout =
            Layout::from_size_align(len.max(4096), 4096).map_err(|_| RdmaError::Verbs {
                op: "allocate",
                cause: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            })?;
        // SAFETY: the layout has a non-zero size.
        let ptr =
            NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or(RdmaError::Verbs {
                op: "allocate",
                cause: std::io::Error::from(std::io::ErrorKind::OutOfMemory),
            })?;
        let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
            | ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        // SAFETY: `ptr` points at `layout.size()` bytes owned by the value being built, which
        // deregisters before freeing them.
        let mr = unsafe {
            ibv_reg_mr(
                pd.pd.as_ptr(),
                ptr.as_ptr().cast(),
                layout.size(),
                c_int::try_from(access).unwrap_or(0),
            )
        };
        let Some(mr) = NonNull::new(mr) else {
            let error = last_error("ibv_reg_mr");
            // SAFETY: allocated above with this layout, never registered.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
            return Err(error);
        };
        Ok(RegisteredMemory {
            ptr,
            layout,
            mr,
            _pd: pd.clone(),
            account: None,
        })
    }

    /// Counts it in `account` until it is deregistered.
    pub(super) fn charge(&mut self, account: &Arc<super::pool::Account>) {
        self.account = Some(account.clone());
    }

    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Never true (registrations are at least a page); here for symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Its address, as remote peers name it.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The key local work requests use.
    pub fn lkey(&self) -> u32 {
        // SAFETY: `mr` is a live registration.
        unsafe { self.mr.as_ref().lkey }
    }

    /// The key remote peers use to read and write it.
    pub fn rkey(&self) -> u32 {
        // SAFETY: `mr` is a live registration.
        unsafe { self.mr.as_ref().rkey }
    }

    /// The bytes. Only meaningful once no work request or peer is writing them (the
    /// connection's protocol says when).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` initialised (zeroed at allocation) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    /// The bytes, to fill before posting them.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }

    /// The scatter-gather entry for `len` bytes at `offset`, or None if out of range.
    fn sge(&self, offset: usize, len: usize) -> Option<ibv_sge> {
        let end = offset.checked_add(len)?;
        (end <= self.len()).then(|| ibv_sge {
            addr: self.addr() + offset as u64,
            length: u32::try_from(len).unwrap_or(u32::MAX),
            lkey: self.lkey(),
        })
    }
}

impl Drop for RegisteredMemory {
    fn drop(&mut self) {
        // SAFETY: the registration is live and no work request uses it (posting requires the
        // caller to keep the memory until completion); the memory was allocated with `layout`.
        unsafe {
            ibv_dereg_mr(self.mr.as_ptr());
            std::alloc::dealloc(self.ptr.as_ptr(), self.layout);
        }
        if let Some(account) = self.account.take() {
            account.release(self.layout.size());
        }
    }
}

/// A completed work request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The id given when posting.
    pub wr_id: u64,
    /// What completed.
    pub kind: CompletionKind,
    /// Bytes received (receives only).
    pub byte_len: u32,
    /// The device's description of a failure; None on success.
    pub error: Option<String>,
}

/// The kind of a completed work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionKind {
    /// A SEND left.
    Send,
    /// A SEND arrived in a posted receive.
    Recv,
    /// An RDMA WRITE finished.
    Write,
    /// An RDMA READ finished.
    Read,
    /// Anything else (flushed requests report no reliable kind).
    Other,
}

/// The file descriptor of a completion channel, for tokio to wait on.
struct ChannelFd(RawFd);

impl AsRawFd for ChannelFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Polls of an empty completion queue before waiting for its event.
const SPIN_POLLS: usize = 16;

/// A completion queue with its own completion channel: `poll` sleeps on the channel's file
/// descriptor until the device signals a completion.
pub struct CompletionQueue {
    channel: NonNull<ibv_comp_channel>,
    cq: NonNull<ibv_cq>,
    /// Always there until dropped, first, in `Drop` (before the channel's fd is closed).
    fd: Option<AsyncFd<ChannelFd>>,
    device: Arc<Device>,
}

// SAFETY: verbs objects are thread-safe (see `Device`); `poll` takes `&mut self`.
unsafe impl Send for CompletionQueue {}
// SAFETY: as above.
unsafe impl Sync for CompletionQueue {}

impl std::fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("device", &self.device.name)
            .finish_non_exhaustive()
    }
}

impl CompletionQueue {
    /// A queue of `entries` completions on `device`; must be made inside a tokio runtime.
    pub fn new(device: &Arc<Device>, entries: u32) -> Result<CompletionQueue, RdmaError> {
        // SAFETY: the context is open for as long as `device` lives.
        let channel = unsafe { ibv_create_comp_channel(device.context.as_ptr()) };
        let channel = NonNull::new(channel).ok_or_else(|| last_error("ibv_create_comp_channel"))?;
        // SAFETY: `channel` is live.
        let fd = unsafe { channel.as_ref().fd };
        let destroy_channel = |error: RdmaError| {
            // SAFETY: `channel` is live and no completion queue uses it.
            unsafe { ibv_destroy_comp_channel(channel.as_ptr()) };
            error
        };
        // Non-blocking, so that reading an event never stalls a runtime thread.
        // SAFETY: `fd` is the channel's open descriptor.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(destroy_channel(last_error("fcntl")));
        }
        // SAFETY: the context and channel are live; no CQ context pointer is used.
        let cq = unsafe {
            ibv_create_cq(
                device.context.as_ptr(),
                c_int::try_from(entries).unwrap_or(c_int::MAX),
                std::ptr::null_mut(),
                channel.as_ptr(),
                0,
            )
        };
        let Some(cq) = NonNull::new(cq) else {
            return Err(destroy_channel(last_error("ibv_create_cq")));
        };
        // SAFETY: `fd` stays open while the AsyncFd lives: `Drop` drops it before destroying
        // the channel.
        let registered =
            unsafe { AsyncFd::register_with_interest(ChannelFd(fd), Interest::READABLE) };
        let fd = match registered {
            Ok(fd) => fd,
            Err(error) => {
                // SAFETY: both are live and unused.
                unsafe {
                    ibv_destroy_cq(cq.as_ptr());
                    ibv_destroy_comp_channel(channel.as_ptr());
                }
                return Err(RdmaError::Verbs {
                    op: "register the completion channel with tokio",
                    cause: error.into(),
                });
            }
        };
        let queue = CompletionQueue {
            channel,
            cq,
            fd: Some(fd),
            device: device.clone(),
        };
        queue.arm()?;
        Ok(queue)
    }

    /// Asks for an event at the next completion.
    fn arm(&self) -> Result<(), RdmaError> {
        // SAFETY: the CQ is live.
        let rc = unsafe { ibv_req_notify_cq(self.cq.as_ptr(), 0) };
        check(rc, "ibv_req_notify_cq")
    }

    /// Takes the completions already there into `out` (at most 64).
    fn drain(&self, out: &mut Vec<Completion>) -> Result<(), RdmaError> {
        const BATCH: usize = 64;
        // SAFETY: zeroed work completions are valid to be overwritten.
        let mut wcs: [ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: the CQ is live and `wcs` has room for BATCH entries.
        let n = unsafe { ibv_poll_cq(self.cq.as_ptr(), BATCH as c_int, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(RdmaError::Verbs {
                op: "ibv_poll_cq",
                cause: std::io::Error::from_raw_os_error(-n),
            });
        }
        for wc in wcs.iter().take(usize::try_from(n).unwrap_or(0)) {
            let error = (wc.status != ibv_wc_status::IBV_WC_SUCCESS).then(|| {
                // SAFETY: ibv_wc_status_str returns a static C string for any status.
                let text = unsafe { CStr::from_ptr(ibv_wc_status_str(wc.status)) };
                text.to_string_lossy().into_owned()
            });
            let kind = match wc.opcode {
                _ if error.is_some() => CompletionKind::Other,
                ibv_wc_opcode::IBV_WC_SEND => CompletionKind::Send,
                ibv_wc_opcode::IBV_WC_RECV => CompletionKind::Recv,
                ibv_wc_opcode::IBV_WC_RDMA_WRITE => CompletionKind::Write,
                ibv_wc_opcode::IBV_WC_RDMA_READ => CompletionKind::Read,
                _ => CompletionKind::Other,
            };
            out.push(Completion {
                wr_id: wc.wr_id,
                kind,
                byte_len: wc.byte_len,
                error,
            });
        }
        Ok(())
    }

    /// Waits for completions and appends them to `out` (at least one).
    pub async fn poll(&self, out: &mut Vec<Completion>) -> Result<(), RdmaError> {
        // A completion is often a few microseconds away (the reply to a message just sent):
        // look again a few times, letting other tasks run, before paying for an event.
        for _ in 0..SPIN_POLLS {
            self.drain(out)?;
            if !out.is_empty() {
                return Ok(());
            }
            tokio::task::yield_now().await;
        }
        loop {
            self.drain(out)?;
            if !out.is_empty() {
                return Ok(());
            }
            let Some(fd) = &self.fd else {
                return Ok(());
            };
            let mut ready = fd.readable().await.map_err(|cause| RdmaError::Verbs {
                op: "wait for the completion channel",
                cause,
            })?;
            let mut cq = std::ptr::null_mut();
            let mut context = std::ptr::null_mut();
            // SAFETY: the channel is live; the out-pointers are valid; the fd is non-blocking.
            let got = unsafe { ibv_get_cq_event(self.channel.as_ptr(), &mut cq, &mut context) };
            if got != 0 {
                let cause = std::io::Error::last_os_error();
                if cause.kind() == std::io::ErrorKind::WouldBlock {
                    ready.clear_ready();
                    continue;
                }
                return Err(RdmaError::Verbs {
                    op: "ibv_get_cq_event",
                    cause,
                });
            }
            // SAFETY: one event was read from this CQ's channel; acknowledging it is required
            // before the CQ can be destroyed.
            unsafe { ibv_ack_cq_events(self.cq.as_ptr(), 1) };
            // Re-arm before draining: a completion after the drain then raises a new event.
            self.arm()?;
        }
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // Deregistered from tokio while its descriptor is still open.
        drop(self.fd.take());
        // SAFETY: queue pairs hold an `Arc` of their CQ, so none is left; every event read was
        // acknowledged in `poll`.
        unsafe {
            ibv_destroy_cq(self.cq.as_ptr());
            ibv_destroy_comp_channel(self.channel.as_ptr());
        }
    }
}

/// What a peer needs to connect its queue pair to ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number it sends with.
    pub psn: u32,
    /// The GID it is reached at.
    pub gid: [u8; 16],
    /// Its device's active MTU (verbs' enum value).
    pub mtu: u8,
    /// RDMA READs it can answer at once.
    pub rd_atomic: u8,
}

impl Endpoint {
    /// Its encoding in the handshake: qpn, psn (big-endian), gid, mtu, rd_atomic.
    pub const ENCODED_LEN: usize = 26;

    /// Encodes it for the handshake.
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0; Self::ENCODED_LEN];
        out[..4].copy_from_slice(&self.qpn.to_be_bytes());
        out[4..8].copy_from_slice(&self.psn.to_be_bytes());
        out[8..24].copy_from_slice(&self.gid);
        out[24] = self.mtu;
        out[25] = self.rd_atomic;
        out
    }

    /// Decodes a handshake's endpoint.
    pub fn decode(bytes: &[u8; Self::ENCODED_LEN]) -> Endpoint {
        let word = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let mut gid = [0; 16];
        gid.copy_from_slice(&bytes[8..24]);
        Endpoint {
            qpn: word(0),
            psn: word(4) & 0x00ff_ffff,
            gid,
            mtu: bytes[24],
            rd_atomic: bytes[25],
        }
    }
}

/// A reliable-connected queue pair whose sends and receives complete on one completion queue.
pub struct QueuePair {
    qp: NonNull<ibv_qp>,
    psn: u32,
    /// Kept alive until the queue pair is destroyed.
    _cq: Arc<CompletionQueue>,
    pd: Arc<ProtectionDomain>,
}

// SAFETY: verbs objects are thread-safe (see `Device`); posting from several threads is allowed.
unsafe impl Send for QueuePair {}
// SAFETY: as above.
unsafe impl Sync for QueuePair {}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("qpn", &self.qpn())
            .finish_non_exhaustive()
    }
}

/// Work requests one queue pair may have outstanding each way, at most.
pub const MAX_WORK_REQUESTS: u32 = 512;

impl QueuePair {
    /// A queue pair in `pd` completing on `cq`, ready (INIT) to post receives and connect.
    pub fn new(
        pd: &Arc<ProtectionDomain>,
        cq: &Arc<CompletionQueue>,
        max_send: u32,
        max_recv: u32,
    ) -> Result<QueuePair, RdmaError> {
        // SAFETY: zeroed is a valid starting point for the init attributes.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.cq.as_ptr();
        init.recv_cq = cq.cq.as_ptr();
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.cap.max_send_wr = max_send.clamp(1, MAX_WORK_REQUESTS);
        init.cap.max_recv_wr = max_recv.clamp(1, MAX_WORK_REQUESTS);
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: the domain and CQ are live and kept alive by the queue pair.
        let qp = unsafe { ibv_create_qp(pd.pd.as_ptr(), &mut init) };
        let qp = NonNull::new(qp).ok_or_else(|| last_error("ibv_create_qp"))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let pair = QueuePair {
            qp,
            psn: (nanos ^ std::process::id().rotate_left(12)) & 0x00ff_ffff,
            _cq: cq.clone(),
            pd: pd.clone(),
        };
        // SAFETY: zeroed is a valid starting point for QP attributes.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = PORT;
        attr.qp_access_flags = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
            | ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE.0
            | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX.0
            | ibv_qp_attr_mask::IBV_QP_PORT.0
            | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS.0;
        pair.modify(&mut attr, mask, "ibv_modify_qp(INIT)")?;
        Ok(pair)
    }

    fn modify(&self, attr: &mut ibv_qp_attr, mask: u32, op: &'static str) -> Result<(), RdmaError> {
        // SAFETY: the QP is live and `attr` holds every field `mask` names.
        let rc = unsafe {
            rdma_sys::ibv_modify_qp(self.qp.as_ptr(), attr, c_int::try_from(mask).unwrap_or(0))
        };
        check(rc, op)
    }

    /// Its queue pair number.
    pub fn qpn(&self) -> u32 {
        // SAFETY: the QP is live.
        unsafe { self.qp.as_ref().qp_num }
    }

    /// What the peer needs to connect to it.
    pub fn endpoint(&self) -> Endpoint {
        let device = &self.pd.device;
        Endpoint {
            qpn: self.qpn(),
            psn: self.psn,
            gid: device.gid,
            mtu: u8::try_from(device.mtu).unwrap_or(1),
            rd_atomic: device.max_rd_atomic,
        }
    }

    /// Connects it to the peer's queue pair `remote` (INIT → RTR → RTS), with the path MTU and
    /// outstanding READs both ends support.
    pub fn connect(&self, remote: &Endpoint) -> Result<(), RdmaError> {
        let device = &self.pd.device;
        let mtu = device.mtu.min(ibv_mtu::Type::from(remote.mtu.max(1)));
        let rd_atomic = device.max_rd_atomic.min(remote.rd_atomic.max(1));
        // SAFETY: zeroed is a valid starting point for QP attributes.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = mtu;
        attr.dest_qp_num = remote.qpn;
        attr.rq_psn = remote.psn;
        attr.max_dest_rd_atomic = device.max_rd_atomic;
        // The peer reads from us at most its own rd_atomic, so ours as responder stays.
        attr.min_rnr_timer = 12;
        attr.ah_attr.is_global = 1;
        attr.ah_attr.grh.dgid = ibv_gid { raw: remote.gid };
        attr.ah_attr.grh.sgid_index = device.gid_index;
        attr.ah_attr.grh.hop_limit = 64;
        attr.ah_attr.port_num = PORT;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE.0
            | ibv_qp_attr_mask::IBV_QP_AV.0
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU.0
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN.0
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN.0
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC.0
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER.0;
        self.modify(&mut attr, mask, "ibv_modify_qp(RTR)")?;
        // SAFETY: as above.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTS;
        attr.timeout = 14;
        attr.retry_cnt = 7;
        // Receivers post their buffers before credit is given, so RNR should not happen; if it
        // does, retry rather than break the connection.
        attr.rnr_retry = 7;
        attr.sq_psn = self.psn;
        attr.max_rd_atomic = rd_atomic;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE.0
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT.0
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT.0
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY.0
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN.0
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC.0;
        self.modify(&mut attr, mask, "ibv_modify_qp(RTS)")
    }

    /// Moves it to the error state: every outstanding request completes (flushed), and the
    /// peer's next request fails.
    pub fn break_off(&self) {
        // SAFETY: zeroed is a valid starting point for QP attributes.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_ERR;
        let _ = self.modify(
            &mut attr,
            ibv_qp_attr_mask::IBV_QP_STATE.0,
            "ibv_modify_qp(ERR)",
        );
    }

    /// Posts a receive of up to `len` bytes into `memory` at `offset`.
    ///
    /// # Safety
    /// `memory` must stay alive and unread until the request completes (or the queue pair is
    /// destroyed).
    pub unsafe fn post_recv(
        &self,
        wr_id: u64,
        memory: &RegisteredMemory,
        offset: usize,
        len: usize,
    ) -> Result<(), RdmaError> {
        let mut sge = memory.sge(offset, len).ok_or(RdmaError::Verbs {
            op: "ibv_post_recv",
            cause: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: zeroed is a valid starting point for a work request.
        let mut wr: ibv_recv_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is live; `wr` and `sge` are read during the call only; the memory
        // stays valid until completion (the caller's promise).
        let rc = unsafe { ibv_post_recv(self.qp.as_ptr(), &mut wr, &mut bad) };
        check(rc, "ibv_post_recv")
    }

    /// Posts a send of `len` bytes of `memory` at `offset` (opcode SEND), or an RDMA WRITE or
    /// READ of them to/from the peer's `remote` (address, rkey).
    ///
    /// # Safety
    /// `memory` must stay alive and unwritten (reads: untouched) until the request completes.
    pub unsafe fn post_send(
        &self,
        wr_id: u64,
        op: SendOp,
        memory: &RegisteredMemory,
        offset: usize,
        len: usize,
    ) -> Result<(), RdmaError> {
        let mut sge = memory.sge(offset, len).ok_or(RdmaError::Verbs {
            op: "ibv_post_send",
            cause: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: zeroed is a valid starting point for a work request.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        match op {
            SendOp::Send => wr.opcode = ibv_wr_opcode::IBV_WR_SEND,
            SendOp::Write { addr, rkey } | SendOp::Read { addr, rkey } => {
                wr.opcode = if matches!(op, SendOp::Write { .. }) {
                    ibv_wr_opcode::IBV_WR_RDMA_WRITE
                } else {
                    ibv_wr_opcode::IBV_WR_RDMA_READ
                };
                wr.wr.rdma = rdma_sys::rdma_t {
                    remote_addr: addr,
                    rkey,
                };
            }
        }
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is live; `wr` and `sge` are read during the call only; the memory
        // stays valid until completion (the caller's promise).
        let rc = unsafe { ibv_post_send(self.qp.as_ptr(), &mut wr, &mut bad) };
        check(rc, "ibv_post_send")
    }
}

/// What a send-queue work request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// A two-sided SEND into the peer's next posted receive.
    Send,
    /// A one-sided RDMA WRITE into the peer's memory at `addr` (registered with `rkey`).
    Write {
        /// Remote address.
        addr: u64,
        /// Remote key.
        rkey: u32,
    },
    /// A one-sided RDMA READ from the peer's memory at `addr` (registered with `rkey`).
    Read {
        /// Remote address.
        addr: u64,
        /// Remote key.
        rkey: u32,
    },
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: the QP is live; its CQ and domain outlive it (held by `Arc`).
        unsafe { ibv_destroy_qp(self.qp.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_survive_the_handshake_encoding() {
        let endpoint = Endpoint {
            qpn: 0x00ab_cdef,
            psn: 0x0012_3456,
            gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 2, 15],
            mtu: 3,
            rd_atomic: 16,
        };
        assert_eq!(Endpoint::decode(&endpoint.encode()), endpoint);
        assert!(is_ipv4_mapped(&endpoint.gid));
        assert!(!is_ipv4_mapped(&[
            0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
        ]));
    }
}
