//! Safe owners of the libibverbs objects this crate uses, on top of `rdma-sys`.
//!
//! Every object holds an `Arc` of its parent (a memory region its protection domain, a queue pair its
//! domain and completion queue, ...), so a parent is never destroyed while a child still lives, and
//! every object is destroyed in its `Drop`. Raw pointers never leave this module except as opaque
//! numbers placed in work requests.
//!
//! Kept whole (about 800 lines): every `unsafe` call into libibverbs of the crate is in this one
//! module, behind safe owners, so that it can be audited in one place.

use std::ffi::CStr;
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use dwcp_core::pool::PooledBuf;
use rdma_sys::*;

use crate::RdmaError;

/// `IBV_LINK_LAYER_ETHERNET` (a `#define` in verbs.h that the bindings do not carry): RoCE ports,
/// which address peers by GID instead of LID.
pub(crate) const LINK_LAYER_ETHERNET: u8 = 2;

/// The last OS error, for messages.
fn errno() -> io::Error {
    io::Error::last_os_error()
}

/// A verbs call that returns 0 or an errno value (most modify/query calls do, some set errno too).
fn check(what: &str, rc: i32) -> Result<(), RdmaError> {
    if rc == 0 {
        Ok(())
    } else {
        let source = if rc > 0 {
            io::Error::from_raw_os_error(rc)
        } else {
            errno()
        };
        Err(RdmaError::Verbs {
            call: what.to_string(),
            source,
        })
    }
}

/// Names of the RDMA devices libibverbs can see (empty when there are none).
pub fn device_names() -> Vec<String> {
    let mut n = 0;
    // SAFETY: `n` is a valid out-pointer; the returned list (or null) is freed below and its entries
    // are only read while it lives.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Vec::new();
    }
    let mut names = Vec::new();
    for i in 0..usize::try_from(n).unwrap_or(0) {
        // SAFETY: `i < n`, the length libibverbs reported for `list`; each entry is a device pointer
        // whose name is a NUL-terminated string owned by the device.
        let name = unsafe { CStr::from_ptr(ibv_get_device_name(*list.add(i))) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: `list` came from `ibv_get_device_list` and is freed once.
    unsafe { ibv_free_device_list(list) };
    names
}

/// Opcode of a receive completion for an RDMA WRITE WITH IMMEDIATE.
pub(crate) const OPCODE_RECV_WRITE_IMM: u32 = ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM;
/// Opcode of a receive completion for a SEND.
pub(crate) const OPCODE_RECV: u32 = ibv_wc_opcode::IBV_WC_RECV;

/// What a port reports about itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PortInfo {
    pub(crate) lid: u16,
    pub(crate) active_mtu: u32,
    pub(crate) link_layer: u8,
    pub(crate) gid_table_len: i32,
    pub(crate) active: bool,
}

/// An open RDMA device (`ibv_context`).
#[derive(Debug)]
pub(crate) struct Context {
    ctx: NonNull<ibv_context>,
    name: String,
    max_qp_wr: u32,
    max_sge: u32,
    max_cqe: u32,
}

// SAFETY: libibverbs is thread-safe: a context may be used from any thread, and concurrently.
unsafe impl Send for Context {}
// SAFETY: as above; `&Context` only exposes calls libibverbs allows concurrently.
unsafe impl Sync for Context {}

impl Context {
    /// Opens `name`, or the first device when `name` is `None`.
    pub(crate) fn open(name: Option<&str>) -> Result<Arc<Self>, RdmaError> {
        let mut n = 0;
        // SAFETY: as in `device_names`.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(RdmaError::NoDevice(format!(
                "ibv_get_device_list failed: {} (is the ib_uverbs module loaded?)",
                errno()
            )));
        }
        let mut chosen = None;
        let mut seen = Vec::new();
        for i in 0..usize::try_from(n).unwrap_or(0) {
            // SAFETY: `i < n`; see `device_names`.
            let dev = unsafe { *list.add(i) };
            // SAFETY: `dev` is a live entry of `list`; its name is a NUL-terminated string.
            let dev_name = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) }
                .to_string_lossy()
                .into_owned();
            if chosen.is_none() && name.is_none_or(|want| want == dev_name) {
                chosen = Some((dev, dev_name.clone()));
            }
            seen.push(dev_name);
        }
        let opened = chosen.map(|(dev, dev_name)| {
            // SAFETY: `dev` belongs to `list`, which is still alive; the context stays valid after the
            // list is freed (documented by libibverbs).
            (unsafe { ibv_open_device(dev) }, dev_name)
        });
        // SAFETY: `list` came from `ibv_get_device_list` and is freed once, after its last use.
        unsafe { ibv_free_device_list(list) };
        let Some((ctx, dev_name)) = opened else {
            return Err(RdmaError::NoDevice(match name {
                None => "libibverbs lists no RDMA device (no RDMA NIC; for Soft-RoCE: modprobe rdma_rxe && rdma link add rxe0 type rxe netdev IFACE)".into(),
                Some(want) => format!("no RDMA device named {want:?} (found: {seen:?})"),
            }));
        };
        let ctx = NonNull::new(ctx).ok_or_else(|| RdmaError::Verbs {
            call: format!("ibv_open_device({dev_name})"),
            source: errno(),
        })?;
        let mut ctx = Self {
            ctx,
            name: dev_name,
            max_qp_wr: 0,
            max_sge: 0,
            max_cqe: 0,
        };
        // SAFETY: all-zero is a valid `ibv_device_attr` (integers and arrays of integers).
        let mut attr: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is an open context and `attr` a valid out-pointer of the right type.
        check("ibv_query_device", unsafe {
            ibv_query_device(ctx.ctx.as_ptr(), &mut attr)
        })?;
        ctx.max_qp_wr = u32::try_from(attr.max_qp_wr).unwrap_or(0);
        ctx.max_sge = u32::try_from(attr.max_sge).unwrap_or(0);
        ctx.max_cqe = u32::try_from(attr.max_cqe).unwrap_or(0);
        Ok(Arc::new(ctx))
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn max_qp_wr(&self) -> u32 {
        self.max_qp_wr
    }

    pub(crate) fn max_sge(&self) -> u32 {
        self.max_sge
    }

    pub(crate) fn max_cqe(&self) -> u32 {
        self.max_cqe
    }

    pub(crate) fn port(&self, port: u8) -> Result<PortInfo, RdmaError> {
        // SAFETY: all-zero is a valid `ibv_port_attr` (integers only).
        let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `attr` is the extended `ibv_port_attr` that
        // `___ibv_query_port` (the inline `ibv_query_port` of verbs.h) expects.
        check(&format!("ibv_query_port({}, {port})", self.name), unsafe {
            ___ibv_query_port(self.ctx.as_ptr(), port, &mut attr)
        })?;
        Ok(PortInfo {
            lid: attr.lid,
            active_mtu: attr.active_mtu,
            link_layer: attr.link_layer,
            gid_table_len: attr.gid_tbl_len,
            active: attr.state == ibv_port_state::IBV_PORT_ACTIVE,
        })
    }

    pub(crate) fn gid(&self, port: u8, index: i32) -> Result<[u8; 16], RdmaError> {
        let mut gid = ibv_gid { raw: [0; 16] };
        // SAFETY: the context is open and `gid` a valid out-pointer.
        let rc = unsafe { ibv_query_gid(self.ctx.as_ptr(), port, index, &mut gid) };
        check(
            &format!("ibv_query_gid({}, port {port}, index {index})", self.name),
            rc,
        )?;
        // SAFETY: every bit pattern is a valid `[u8; 16]`, and `raw` covers the whole union.
        Ok(unsafe { gid.raw })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every child holds an `Arc<Context>`, so none is left; the context is closed once.
        unsafe { ibv_close_device(self.ctx.as_ptr()) };
    }
}

/// A protection domain.
#[derive(Debug)]
pub(crate) struct ProtectionDomain {
    pd: NonNull<ibv_pd>,
    _ctx: Arc<Context>,
}

// SAFETY: libibverbs objects may be used from any thread.
unsafe impl Send for ProtectionDomain {}
// SAFETY: the methods taking `&self` are thread-safe verbs calls.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    pub(crate) fn new(ctx: &Arc<Context>) -> Result<Arc<Self>, RdmaError> {
        // SAFETY: the context is open.
        let pd = unsafe { ibv_alloc_pd(ctx.ctx.as_ptr()) };
        let pd = NonNull::new(pd).ok_or_else(|| RdmaError::Verbs {
            call: "ibv_alloc_pd".into(),
            source: errno(),
        })?;
        Ok(Arc::new(Self {
            pd,
            _ctx: Arc::clone(ctx),
        }))
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: memory regions and queue pairs hold an `Arc` of the domain, so none is left.
        unsafe { ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

/// A pool buffer registered with the device for the whole of its capacity.
///
/// The buffer is owned (and returned to its pool on drop, after deregistration). Its bytes are only
/// reached through raw pointers: the device may write them at any time while they are registered.
#[derive(Debug)]
pub(crate) struct RegisteredBuf {
    mr: NonNull<ibv_mr>,
    addr: *mut u8,
    len: usize,
    _buf: PooledBuf,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: the region is a verbs object (thread-safe) over heap memory owned by this value.
unsafe impl Send for RegisteredBuf {}
// SAFETY: `&self` only hands out the addresses and keys, never references into the memory.
unsafe impl Sync for RegisteredBuf {}

impl RegisteredBuf {
    /// Registers the whole capacity of `buf`. `remote_write` lets the peer RDMA-write into it.
    pub(crate) fn register(
        pd: &Arc<ProtectionDomain>,
        mut buf: PooledBuf,
        remote_write: bool,
    ) -> Result<Self, RdmaError> {
        // Fill to capacity without reallocating: the address must stay fixed while registered.
        let cap = buf.capacity();
        buf.resize(cap, 0);
        let addr = buf.as_mut_ptr();
        let mut access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        if remote_write {
            access |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        }
        // SAFETY: `addr..addr+cap` is a live heap allocation owned by `buf`, which is moved into the
        // returned value and neither grown nor freed before `ibv_dereg_mr` in `Drop`.
        let mr = unsafe { ibv_reg_mr(pd.pd.as_ptr(), addr.cast(), cap, access as i32) };
        let mr = NonNull::new(mr).ok_or_else(|| RdmaError::Verbs {
            call: format!(
                "ibv_reg_mr({cap} bytes; check `ulimit -l`, registered memory is pinned)"
            ),
            source: errno(),
        })?;
        Ok(Self {
            mr,
            addr,
            len: cap,
            _buf: buf,
            _pd: Arc::clone(pd),
        })
    }

    pub(crate) fn addr(&self) -> *mut u8 {
        self.addr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn lkey(&self) -> u32 {
        // SAFETY: `mr` is a registered region until `Drop`; reading its key is a plain field read.
        unsafe { (*self.mr.as_ptr()).lkey }
    }

    pub(crate) fn rkey(&self) -> u32 {
        // SAFETY: as for `lkey`.
        unsafe { (*self.mr.as_ptr()).rkey }
    }
}

impl Drop for RegisteredBuf {
    fn drop(&mut self) {
        // SAFETY: the region is deregistered once; the buffer is freed only afterwards (fields drop
        // after this body), so the device never writes freed memory. Queue pairs that could target it
        // are destroyed before the buffers (see `conn::Shared`'s field order).
        unsafe { ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

/// A completion channel: a file descriptor that becomes readable when an armed CQ gets a completion.
#[derive(Debug)]
pub(crate) struct CompletionChannel {
    ch: NonNull<ibv_comp_channel>,
    _ctx: Arc<Context>,
}

// SAFETY: libibverbs objects may be used from any thread.
unsafe impl Send for CompletionChannel {}
// SAFETY: `ibv_get_cq_event` on a non-blocking channel is safe to call concurrently.
unsafe impl Sync for CompletionChannel {}

impl CompletionChannel {
    pub(crate) fn new(ctx: &Arc<Context>) -> Result<Arc<Self>, RdmaError> {
        // SAFETY: the context is open.
        let ch = unsafe { ibv_create_comp_channel(ctx.ctx.as_ptr()) };
        let ch = NonNull::new(ch).ok_or_else(|| RdmaError::Verbs {
            call: "ibv_create_comp_channel".into(),
            source: errno(),
        })?;
        let channel = Self {
            ch,
            _ctx: Arc::clone(ctx),
        };
        let fd = channel.fd();
        // SAFETY: `fd` is the channel's open descriptor; F_GETFL/F_SETFL only change its flags.
        let rc = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        };
        if rc < 0 {
            return Err(RdmaError::Verbs {
                call: "fcntl(completion channel, O_NONBLOCK)".into(),
                source: errno(),
            });
        }
        Ok(Arc::new(channel))
    }

    pub(crate) fn fd(&self) -> RawFd {
        // SAFETY: the channel is live; `fd` is a plain field.
        unsafe { (*self.ch.as_ptr()).fd }
    }
}

impl Drop for CompletionChannel {
    fn drop(&mut self) {
        // SAFETY: completion queues using the channel hold an `Arc` of it, so none is left.
        unsafe { ibv_destroy_comp_channel(self.ch.as_ptr()) };
    }
}

/// One work completion, copied out of the CQ.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    pub(crate) wr_id: u64,
    pub(crate) ok: bool,
    /// The raw `ibv_wc_status`.
    pub(crate) status: u32,
    pub(crate) vendor_err: u32,
    pub(crate) opcode: u32,
    pub(crate) byte_len: u32,
    /// Immediate data in host order, when the completion carries one.
    pub(crate) imm: Option<u32>,
}

impl Completion {
    /// The provider's description of a failed completion.
    pub(crate) fn status_text(&self) -> String {
        // SAFETY: `ibv_wc_status_str` returns a static NUL-terminated string for any value.
        let text = unsafe { CStr::from_ptr(ibv_wc_status_str(self.status)) };
        format!(
            "{} (status {}, vendor error {:#x})",
            text.to_string_lossy(),
            self.status,
            self.vendor_err
        )
    }

    pub(crate) fn is_flush(&self) -> bool {
        self.status == ibv_wc_status::IBV_WC_WR_FLUSH_ERR
    }
}

/// A completion queue bound to a completion channel.
#[derive(Debug)]
pub(crate) struct CompletionQueue {
    cq: NonNull<ibv_cq>,
    channel: Arc<CompletionChannel>,
}

// SAFETY: libibverbs objects may be used from any thread.
unsafe impl Send for CompletionQueue {}
// SAFETY: polling and arming a CQ are thread-safe in libibverbs providers (they lock internally).
unsafe impl Sync for CompletionQueue {}

impl CompletionQueue {
    pub(crate) fn new(
        ctx: &Arc<Context>,
        entries: u32,
        channel: &Arc<CompletionChannel>,
    ) -> Result<Self, RdmaError> {
        let cqe = i32::try_from(entries)
            .map_err(|_| RdmaError::Config(format!("{entries} CQ entries")))?;
        // SAFETY: the context and channel are live; no CQ context pointer is used.
        let cq = unsafe {
            ibv_create_cq(
                ctx.ctx.as_ptr(),
                cqe,
                std::ptr::null_mut(),
                channel.ch.as_ptr(),
                0,
            )
        };
        let cq = NonNull::new(cq).ok_or_else(|| RdmaError::Verbs {
            call: format!("ibv_create_cq({entries} entries)"),
            source: errno(),
        })?;
        Ok(Self {
            cq,
            channel: Arc::clone(channel),
        })
    }

    /// Asks for an event on the channel at the next completion.
    pub(crate) fn arm(&self) -> Result<(), RdmaError> {
        // SAFETY: the CQ is live.
        check("ibv_req_notify_cq", unsafe {
            ibv_req_notify_cq(self.cq.as_ptr(), 0)
        })
    }

    /// Consumes the pending channel events (non-blocking); returns how many there were.
    pub(crate) fn take_events(&self) -> u32 {
        let mut n = 0;
        loop {
            let mut cq = std::ptr::null_mut();
            let mut cq_ctx = std::ptr::null_mut();
            // SAFETY: the channel is non-blocking and live; the out-pointers are valid.
            let rc = unsafe { ibv_get_cq_event(self.channel.ch.as_ptr(), &mut cq, &mut cq_ctx) };
            if rc != 0 {
                break;
            }
            // SAFETY: each event taken is acknowledged once, on the CQ it named (ours: the channel
            // serves this CQ only), before the CQ is destroyed.
            unsafe { ibv_ack_cq_events(cq, 1) };
            n += 1;
        }
        n
    }

    /// Moves up to `out.capacity()` completions into `out` (cleared first); returns how many.
    pub(crate) fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize, RdmaError> {
        out.clear();
        const BATCH: usize = 32;
        // SAFETY: all-zero is a valid `ibv_wc` (integers and a union of integers).
        let mut wcs: [ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        while out.len() < max {
            let want = (max - out.len()).min(BATCH) as i32;
            // SAFETY: `wcs` has room for `want <= BATCH` entries; the CQ is live.
            let got = unsafe { ibv_poll_cq(self.cq.as_ptr(), want, wcs.as_mut_ptr()) };
            if got < 0 {
                return Err(RdmaError::Verbs {
                    call: "ibv_poll_cq".into(),
                    source: errno(),
                });
            }
            for wc in &wcs[..got as usize] {
                let with_imm = wc.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
                // SAFETY: both union members are plain `u32`s, so reading either is defined; with
                // IBV_WC_WITH_IMM it holds the immediate data (network order).
                let imm_be = unsafe { wc.imm_data_invalidated_rkey_union.imm_data };
                out.push(Completion {
                    wr_id: wc.wr_id,
                    ok: wc.status == ibv_wc_status::IBV_WC_SUCCESS,
                    status: wc.status,
                    vendor_err: wc.vendor_err,
                    opcode: wc.opcode,
                    byte_len: wc.byte_len,
                    imm: with_imm.then(|| u32::from_be(imm_be)),
                });
            }
            if (got as usize) < want as usize {
                break;
            }
        }
        Ok(out.len())
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // Events raised after the last `take_events` must be acknowledged before the CQ goes.
        self.take_events();
        // SAFETY: the queue pair using this CQ is destroyed first (it is dropped before the CQ in
        // `conn::Shared`), and every event was acknowledged.
        unsafe { ibv_destroy_cq(self.cq.as_ptr()) };
    }
}

/// Capabilities requested for a queue pair.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QpCaps {
    pub(crate) send_wr: u32,
    pub(crate) recv_wr: u32,
    pub(crate) sge: u32,
    pub(crate) inline: u32,
}

/// Where the peer's queue pair is, as exchanged over the side channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerAddress {
    pub(crate) lid: u16,
    pub(crate) qpn: u32,
    pub(crate) psn: u32,
    pub(crate) gid: [u8; 16],
}

/// Parameters of the local port used to reach the peer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalPath {
    pub(crate) port: u8,
    pub(crate) gid_index: u8,
    pub(crate) mtu: u32,
    pub(crate) global: bool,
}

/// A reliable-connected queue pair.
#[derive(Debug)]
pub(crate) struct QueuePair {
    qp: NonNull<ibv_qp>,
    caps: QpCaps,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: libibverbs objects may be used from any thread.
unsafe impl Send for QueuePair {}
// SAFETY: posting work requests and modifying a QP are thread-safe (providers lock their queues).
unsafe impl Sync for QueuePair {}

/// A send work request as this crate uses them: one SGE or inline bytes, always signalled.
pub(crate) struct SendRequest<'a> {
    pub(crate) wr_id: u64,
    pub(crate) kind: SendKind,
    pub(crate) imm: u32,
    /// Local bytes: a registered slice (`lkey`), or inline bytes copied at post time.
    pub(crate) local: Local<'a>,
}

/// What to post.
pub(crate) enum SendKind {
    /// RDMA WRITE WITH IMMEDIATE into `remote_addr` under `rkey`.
    WriteImm { remote_addr: u64, rkey: u32 },
    /// SEND WITH IMMEDIATE (the peer's receive needs no buffer when there are no bytes).
    SendImm,
}

/// The local side of a send.
pub(crate) enum Local<'a> {
    /// No bytes.
    Empty,
    /// Bytes of a registered buffer: `(addr, len, lkey)`.
    Registered(*const u8, u32, u32),
    /// Bytes the provider copies at post time (at most the QP's inline size).
    Inline(&'a [u8]),
}

impl QueuePair {
    pub(crate) fn new_rc(
        pd: &Arc<ProtectionDomain>,
        cq: &CompletionQueue,
        caps: QpCaps,
    ) -> Result<Self, RdmaError> {
        // SAFETY: all-zero is a valid `ibv_qp_init_attr` (null pointers and integers).
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.cq.as_ptr();
        init.recv_cq = cq.cq.as_ptr();
        init.cap = ibv_qp_cap {
            max_send_wr: caps.send_wr,
            max_recv_wr: caps.recv_wr,
            max_send_sge: caps.sge,
            max_recv_sge: caps.sge,
            max_inline_data: caps.inline,
        };
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 1;
        // SAFETY: the domain and CQ are live; `init` is fully initialised.
        let qp = unsafe { ibv_create_qp(pd.pd.as_ptr(), &mut init) };
        let qp = NonNull::new(qp).ok_or_else(|| RdmaError::Verbs {
            call: format!(
                "ibv_create_qp(RC, {} send / {} recv WRs, {} SGEs, {} inline bytes)",
                caps.send_wr, caps.recv_wr, caps.sge, caps.inline
            ),
            source: errno(),
        })?;
        Ok(Self {
            qp,
            caps,
            _pd: Arc::clone(pd),
        })
    }

    pub(crate) fn qpn(&self) -> u32 {
        // SAFETY: the QP is live; `qp_num` is a plain field.
        unsafe { (*self.qp.as_ptr()).qp_num }
    }

    fn modify(
        &self,
        attr: &mut ibv_qp_attr,
        mask: ibv_qp_attr_mask,
        what: &str,
    ) -> Result<(), RdmaError> {
        // SAFETY: the QP is live and `attr` holds every field `mask` names.
        check(what, unsafe {
            ibv_modify_qp(self.qp.as_ptr(), attr, mask.0 as i32)
        })
    }

    /// RESET → INIT: receives may be posted from now on.
    pub(crate) fn init(&self, port: u8) -> Result<(), RdmaError> {
        use ibv_qp_attr_mask as m;
        // SAFETY: all-zero is a valid `ibv_qp_attr`.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = port;
        a.qp_access_flags = ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
            | ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        self.modify(
            &mut a,
            m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )
    }

    /// INIT → RTR → RTS, connected to `peer`.
    pub(crate) fn connect(
        &self,
        path: LocalPath,
        local_psn: u32,
        peer: PeerAddress,
    ) -> Result<(), RdmaError> {
        use ibv_qp_attr_mask as m;
        // SAFETY: as above.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = path.mtu;
        a.dest_qp_num = peer.qpn;
        a.rq_psn = peer.psn;
        a.max_dest_rd_atomic = 1;
        a.min_rnr_timer = 12;
        a.ah_attr.dlid = peer.lid;
        a.ah_attr.sl = 0;
        a.ah_attr.src_path_bits = 0;
        a.ah_attr.port_num = path.port;
        if path.global {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid = ibv_gid { raw: peer.gid };
            a.ah_attr.grh.sgid_index = path.gid_index;
            a.ah_attr.grh.hop_limit = 64;
        }
        self.modify(
            &mut a,
            m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER,
            "ibv_modify_qp(RTR)",
        )?;

        // SAFETY: as above.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        // 4.096 µs × 2^14 ≈ 67 ms per try, 7 tries: a vanished peer fails sends within about half a
        // second, while a slow (emulated) peer is not mistaken for a dead one.
        a.timeout = 14;
        a.retry_cnt = 7;
        // 7 = retry forever while the peer has no receive posted; credits keep that from happening.
        a.rnr_retry = 7;
        a.sq_psn = local_psn;
        a.max_rd_atomic = 1;
        self.modify(
            &mut a,
            m::IBV_QP_STATE
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp(RTS)",
        )
    }

    #[cfg(test)]
    /// Moves the queue pair to the error state: outstanding work requests complete with a flush error.
    pub(crate) fn set_error(&self) -> Result<(), RdmaError> {
        // SAFETY: all-zero is a valid `ibv_qp_attr`.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_ERR;
        self.modify(&mut a, ibv_qp_attr_mask::IBV_QP_STATE, "ibv_modify_qp(ERR)")
    }

    /// Posts one receive without buffers (it completes for a WRITE WITH IMMEDIATE or an empty SEND).
    pub(crate) fn post_empty_recv(&self, wr_id: u64) -> Result<(), RdmaError> {
        let mut wr = ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: std::ptr::null_mut(),
            num_sge: 0,
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is live; `wr` is a single valid request (no SGEs) that the provider copies
        // before returning.
        check("ibv_post_recv", unsafe {
            ibv_post_recv(self.qp.as_ptr(), &mut wr, &mut bad)
        })
    }

    /// Posts one signalled send.
    pub(crate) fn post_send(&self, req: SendRequest<'_>) -> Result<(), RdmaError> {
        let mut sge = ibv_sge {
            addr: 0,
            length: 0,
            lkey: 0,
        };
        let mut flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        let num_sge = match req.local {
            Local::Empty => 0,
            Local::Registered(addr, len, lkey) => {
                sge = ibv_sge {
                    addr: addr as u64,
                    length: len,
                    lkey,
                };
                1
            }
            Local::Inline(bytes) => {
                if bytes.len() > self.caps.inline as usize {
                    return Err(RdmaError::Config(format!(
                        "{} inline bytes exceed the queue pair's {}",
                        bytes.len(),
                        self.caps.inline
                    )));
                }
                flags |= ibv_send_flags::IBV_SEND_INLINE.0;
                sge = ibv_sge {
                    addr: bytes.as_ptr() as u64,
                    length: bytes.len() as u32,
                    lkey: 0,
                };
                1
            }
        };
        // SAFETY: all-zero is a valid `ibv_send_wr` (null pointers, integers, unions of those).
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = req.wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = num_sge;
        wr.send_flags = flags;
        wr.imm_data_invalidated_rkey_union.imm_data = req.imm.to_be();
        match req.kind {
            SendKind::WriteImm { remote_addr, rkey } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
                wr.wr.rdma = rdma_t { remote_addr, rkey };
            }
            SendKind::SendImm => wr.opcode = ibv_wr_opcode::IBV_WR_SEND_WITH_IMM,
        }
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is live; `wr` and `sge` outlive the call; a registered SGE lies inside a
        // region registered on this QP's domain that stays registered until the send completes (the
        // caller keeps its staging slot reserved until then); inline bytes are copied before return.
        check("ibv_post_send", unsafe {
            ibv_post_send(self.qp.as_ptr(), &mut wr, &mut bad)
        })
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: destroyed once; the CQ and registered buffers it used outlive it (field order of
        // `conn::Shared`).
        unsafe { ibv_destroy_qp(self.qp.as_ptr()) };
    }
}
