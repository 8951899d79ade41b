//! An RC queue pair as a reliable, ordered byte stream ([`RdmaConn`]).
//!
//! Each side owns a *receive ring* of `ring_slots` registered pool buffers that the peer may
//! RDMA-write into, and as many registered *staging* buffers for its own outgoing messages. A
//! `write` copies up to one slot of bytes into a free staging buffer (or, up to the inline size,
//! hands them to the provider inline) and posts an RDMA WRITE WITH IMMEDIATE into the peer's next
//! ring slot. The receive completion (its immediate says "data", its length is the message length)
//! tells the reader that slot `n mod ring_slots` is full; the reader copies it out and, once the
//! slot is drained, owes the writer a credit. Credits ride on the immediate of the next data message
//! going the other way, or, once a quarter of the ring is owed, on an empty SEND WITH IMMEDIATE.
//! A writer without credit waits: the peer's ring can never be overrun, whatever the link speed.
//!
//! End of stream is an empty SEND WITH IMMEDIATE ("fin"), ordered after all data. The TCP side
//! channel that set the queue pair up stays open and silent: its end (EOF or reset) means the peer
//! process is gone, which a queue pair alone would only reveal after its retry timeout on the next
//! send, and never to a reader.
//!
//! Blocking: a waiting thread polls the CQ for `poll_spin` (50 µs by default), then one thread at a
//! time sleeps in `poll(2)` on the completion channel, the side channel and a wake-up eventfd; the
//! others wait on a condition variable and are woken whenever completions were processed. Nothing
//! polls for long, which matters on emulated or shared CPUs.
//!
//! Posts happen without the state lock: a software device (rxe) does its protocol work inside
//! `ibv_post_send`, and the other thread must meanwhile be free to take completions.
//!
//! Kept whole (about 1,100 lines of code before its tests): the receive ring, credit flow control
//! and completion handling are one protocol over one queue pair, and their invariants are checked
//! against each other.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dwcp_core::pool::{BufferPool, SizeClass};
use dwcp_core::transport::Conn;
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::verbs::{
    CompletionChannel, CompletionQueue, Context, LINK_LAYER_ETHERNET, Local, LocalPath,
    PeerAddress, ProtectionDomain, QpCaps, QueuePair, RegisteredBuf, SendKind, SendRequest,
};
use crate::wire::{Endpoint, RemoteSlot};
use crate::{RdmaConfig, RdmaError};

/// Receive work requests carry this tag in their id; sends carry their staging slot + 1 (0: none).
const RECV_TAG: u64 = 1 << 63;
/// Immediate data: the message kind in the top four bits, returned credits in the low sixteen.
const KIND_SHIFT: u32 = 28;
const KIND_DATA: u32 = 1;
const KIND_CREDIT: u32 = 2;
const KIND_FIN: u32 = 3;
const CREDIT_MASK: u32 = 0xffff;
/// Longest a thread sleeps in one go before it re-checks flags and deadlines.
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// After the side channel ended, completions that were already on their way get this long to arrive
/// before a reader is told the peer is gone.
const PEER_GONE_GRACE: Duration = Duration::from_millis(200);
/// How long the last handle's drop waits for its outstanding sends (the fin included) to be
/// acknowledged, so that bytes written just before a close are not lost with the queue pair.
const LINGER: Duration = Duration::from_secs(3);
/// Largest inline size accepted in the configuration (bytes gathered on the stack).
pub(crate) const MAX_INLINE: u32 = 1024;

/// An opened device, port and protection domain, shared by every connection of a connector or
/// acceptor.
#[derive(Debug)]
pub(crate) struct Device {
    ctx: Arc<Context>,
    pd: Arc<ProtectionDomain>,
    path: LocalPath,
    lid: u16,
    gid: [u8; 16],
    link_layer: u8,
    pool: BufferPool,
    config: RdmaConfig,
}

impl Device {
    /// Opens the configured device and port, and checks the configuration against what it offers.
    pub(crate) fn open(config: &RdmaConfig) -> Result<Arc<Self>, RdmaError> {
        config.validate()?;
        let ctx = Context::open(config.device.as_deref())?;
        let port = ctx.port(config.port)?;
        if !port.active {
            return Err(RdmaError::NoDevice(format!(
                "port {} of {} is not active (link down?)",
                config.port,
                ctx.name()
            )));
        }
        let global = port.link_layer == LINK_LAYER_ETHERNET;
        let (gid_index, gid) = match config.gid_index {
            Some(i) => (i, ctx.gid(config.port, i.into())?),
            None => pick_gid(&ctx, config.port, port.gid_table_len)?,
        };
        if global && gid == [0; 16] {
            return Err(RdmaError::NoDevice(format!(
                "{} port {} is RoCE but has no GID (no IP address on its network interface?)",
                ctx.name(),
                config.port
            )));
        }
        if config.queue_depth > ctx.max_qp_wr() {
            return Err(RdmaError::Config(format!(
                "queue depth {} exceeds {}'s limit of {} work requests",
                config.queue_depth,
                ctx.name(),
                ctx.max_qp_wr()
            )));
        }
        if config.max_sge > ctx.max_sge() {
            return Err(RdmaError::Config(format!(
                "{} scatter-gather entries exceed {}'s limit of {}",
                config.max_sge,
                ctx.name(),
                ctx.max_sge()
            )));
        }
        if cq_entries(config) > ctx.max_cqe() {
            return Err(RdmaError::Config(format!(
                "a completion queue of {} entries exceeds {}'s limit of {}; lower the queue depth",
                cq_entries(config),
                ctx.name(),
                ctx.max_cqe()
            )));
        }
        let pool = match &config.buffer_pool {
            Some(p) => p.clone(),
            None => BufferPool::new(config.buffer_budget)
                .map_err(|e| RdmaError::Config(e.to_string()))?,
        };
        let pd = ProtectionDomain::new(&ctx)?;
        tracing::info!(
            device = ctx.name(),
            port = config.port,
            gid_index,
            roce = global,
            "RDMA device opened"
        );
        Ok(Arc::new(Self {
            path: LocalPath {
                port: config.port,
                gid_index,
                mtu: port.active_mtu,
                global,
            },
            lid: port.lid,
            gid,
            link_layer: port.link_layer,
            ctx,
            pd,
            pool,
            config: config.clone(),
        }))
    }

    pub(crate) fn name(&self) -> &str {
        self.ctx.name()
    }

    /// Creates a queue pair (in INIT, its receives posted) and registers its buffers: everything the
    /// peer needs to hear about before the pair can be connected.
    pub(crate) fn prepare(self: &Arc<Self>) -> Result<Prepared, RdmaError> {
        let cfg = &self.config;
        let channel = CompletionChannel::new(&self.ctx)?;
        let cq = CompletionQueue::new(&self.ctx, cq_entries(cfg), &channel)?;
        let qp = QueuePair::new_rc(
            &self.pd,
            &cq,
            QpCaps {
                send_wr: cfg.queue_depth,
                recv_wr: cfg.queue_depth,
                sge: cfg.max_sge,
                inline: cfg.max_inline,
            },
        )?;
        qp.init(self.path.port)?;
        for _ in 0..cfg.queue_depth {
            qp.post_empty_recv(RECV_TAG)?;
        }
        let register = |remote_write: bool| -> Result<RegisteredBuf, RdmaError> {
            let buf = self
                .pool
                .acquire_timeout(SizeClass::Large.nominal(), cfg.setup_timeout)
                .map_err(|e| RdmaError::Config(e.to_string()))?
                .ok_or_else(|| {
                    RdmaError::Config(format!(
                        "the RDMA buffer pool ({} bytes) stayed exhausted for {:?}: too many open \
                         connections for its budget",
                        self.pool.stats().budget_bytes,
                        cfg.setup_timeout
                    ))
                })?;
            RegisteredBuf::register(&self.pd, buf, remote_write)
        };
        let ring = (0..cfg.ring_slots)
            .map(|_| register(true))
            .collect::<Result<Vec<_>, _>>()?;
        let staging = (0..cfg.ring_slots)
            .map(|_| register(false))
            .collect::<Result<Vec<_>, _>>()?;
        // Any 24-bit start works; a random one keeps stale packets of an earlier pair from matching.
        let psn = (dwcp_core::handshake::new_session_id() as u32) & 0x00ff_ffff;
        let local = Endpoint {
            lid: self.lid,
            qpn: qp.qpn(),
            psn,
            gid: self.gid,
            mtu: self.path.mtu as u8,
            link_layer: self.link_layer,
            queue_depth: cfg.queue_depth,
            slot_len: ring[0].len() as u32,
            slots: ring
                .iter()
                .map(|b| RemoteSlot {
                    addr: b.addr() as u64,
                    rkey: b.rkey(),
                })
                .collect(),
        };
        Ok(Prepared {
            device: Arc::clone(self),
            qp,
            cq,
            channel,
            ring,
            staging,
            local,
        })
    }
}

fn cq_entries(cfg: &RdmaConfig) -> u32 {
    // Every posted send and every posted receive may complete before anyone polls.
    cfg.queue_depth.saturating_mul(2).saturating_add(16)
}

/// The GID to address this port by: an IPv4-mapped one (RoCE v2 over IPv4) if there is one,
/// otherwise the first non-zero entry. InfiniBand ports address by LID and need none.
fn pick_gid(ctx: &Context, port: u8, table_len: i32) -> Result<(u8, [u8; 16]), RdmaError> {
    let mut first = None;
    for i in 0..table_len.clamp(0, 32) {
        let Ok(gid) = ctx.gid(port, i) else { continue };
        if gid == [0; 16] {
            continue;
        }
        if gid[..10] == [0; 10] && gid[10..12] == [0xff, 0xff] {
            return Ok((i as u8, gid));
        }
        first.get_or_insert((i as u8, gid));
    }
    Ok(first.unwrap_or((0, [0; 16])))
}

/// A queue pair and its buffers, ready to be connected to the peer described by an [`Endpoint`].
#[derive(Debug)]
pub(crate) struct Prepared {
    device: Arc<Device>,
    qp: QueuePair,
    cq: CompletionQueue,
    channel: Arc<CompletionChannel>,
    ring: Vec<RegisteredBuf>,
    staging: Vec<RegisteredBuf>,
    local: Endpoint,
}

impl Prepared {
    /// What to tell the peer.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.local
    }

    /// Connects the queue pair to `peer` (RTR, RTS) and wraps it as a stream; `side` is the TCP
    /// connection the setup went over, kept open to notice the peer's end.
    pub(crate) fn connect(self, peer: &Endpoint, side: TcpStream) -> Result<RdmaConn, RdmaError> {
        let peer_addr = side.peer_addr().map_err(|e| RdmaError::Io {
            context: "reading the side channel's peer address".into(),
            source: e,
        })?;
        let ours = self.ring.len() as u32;
        let theirs = peer.slots.len() as u32;
        // Our send queue carries up to `theirs` data messages, up to `ours` credit returns and a fin;
        // our receive queue the mirror image. Both sides check the same sum.
        let needed = ours + theirs + 2;
        if self.device.config.queue_depth < needed || peer.queue_depth < needed {
            return Err(RdmaError::Config(format!(
                "queue depths {} (ours) and {} (peer's) must each be at least {needed} for rings of \
                 {ours} and {theirs} slots",
                self.device.config.queue_depth, peer.queue_depth
            )));
        }
        if self.device.path.global && peer.link_layer != LINK_LAYER_ETHERNET {
            return Err(RdmaError::Setup(format!(
                "link layers differ: ours is Ethernet (RoCE), the peer's is {}",
                peer.link_layer
            )));
        }
        let path = LocalPath {
            mtu: self.device.path.mtu.min(u32::from(peer.mtu)),
            ..self.device.path
        };
        self.qp.connect(
            path,
            self.local.psn,
            PeerAddress {
                lid: peer.lid,
                qpn: peer.qpn,
                psn: peer.psn,
                gid: peer.gid,
            },
        )?;
        side.set_nodelay(true).ok();
        // The side channel is only watched with poll(2) and non-blocking peeks from now on.
        side.set_read_timeout(None).ok();
        side.set_write_timeout(None).ok();
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
        let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(RdmaError::Io {
                context: "creating an eventfd".into(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `wake` is a fresh descriptor owned by nobody else.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        let max_message = (self.staging[0].len() as u32).min(peer.slot_len) as usize;
        let inline = self.device.config.max_inline as usize;
        let queue_depth = self.device.config.queue_depth;
        let free_staging = (0..self.staging.len() as u16).rev().collect();
        Ok(RdmaConn {
            shared: Arc::new(Shared {
                res: Resources {
                    qp: self.qp,
                    cq: self.cq,
                    ring: self.ring,
                    staging: self.staging,
                },
                channel: self.channel,
                side,
                wake,
                peer_addr,
                remote: peer.slots.clone(),
                max_message,
                inline,
                queue_depth,
                credit_batch: (ours / 4).max(1),
                spin: self.device.config.poll_spin,
                state: Mutex::new(State {
                    recv_seq: 0,
                    ready: VecDeque::new(),
                    read_pos: 0,
                    fin_received: false,
                    credits_owed: 0,
                    credits: theirs,
                    send_seq: 0,
                    free_staging,
                    outstanding: 0,
                    fin_sent: false,
                    broken: None,
                    read_shut: false,
                    write_shut: false,
                    side_ended_at: None,
                    poller: false,
                    read_timeout: None,
                    write_timeout: None,
                    scratch: Vec::with_capacity(64),
                }),
                progressed: Condvar::new(),
                read_lock: Mutex::new(()),
                write_lock: Mutex::new(()),
                _device: self.device,
            }),
        })
    }
}

/// The verbs objects of one connection. Field order is drop order: the queue pair goes before the
/// completion queue it reports to and before the buffers the device may still touch.
#[derive(Debug)]
struct Resources {
    qp: QueuePair,
    cq: CompletionQueue,
    ring: Vec<RegisteredBuf>,
    staging: Vec<RegisteredBuf>,
}

#[derive(Debug)]
struct State {
    // Receiving.
    /// Data messages received so far: the next one is in ring slot `recv_seq mod ring`.
    recv_seq: u64,
    /// Received, not yet fully read messages: (ring slot, length).
    ready: VecDeque<(usize, usize)>,
    /// Bytes of `ready.front()` already read.
    read_pos: usize,
    fin_received: bool,
    /// Drained ring slots the peer has not been told about yet.
    credits_owed: u32,
    // Sending.
    /// Free slots of the peer's ring.
    credits: u32,
    send_seq: u64,
    free_staging: Vec<u16>,
    /// Posted sends whose completion has not been seen.
    outstanding: u32,
    fin_sent: bool,
    // Life cycle.
    broken: Option<String>,
    read_shut: bool,
    write_shut: bool,
    side_ended_at: Option<Instant>,
    /// A thread is sleeping in poll(2) for everyone.
    poller: bool,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    scratch: Vec<crate::verbs::Completion>,
}

impl State {
    fn peer_gone(&self) -> bool {
        self.side_ended_at
            .is_some_and(|t| t.elapsed() >= PEER_GONE_GRACE)
    }
}

struct Shared {
    res: Resources,
    channel: Arc<CompletionChannel>,
    side: TcpStream,
    wake: OwnedFd,
    peer_addr: SocketAddr,
    remote: Vec<RemoteSlot>,
    max_message: usize,
    inline: usize,
    queue_depth: u32,
    credit_batch: u32,
    spin: Duration,
    state: Mutex<State>,
    progressed: Condvar,
    read_lock: Mutex<()>,
    write_lock: Mutex<()>,
    _device: Arc<Device>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaConn")
            .field("peer", &self.peer_addr)
            .field("qpn", &self.res.qp.qpn())
            .field("ring_slots", &self.res.ring.len())
            .finish_non_exhaustive()
    }
}

fn kind_of(imm: u32) -> u32 {
    imm >> KIND_SHIFT
}

impl Shared {
    /// Marks the connection failed (first reason wins) and tells the peer at once by closing the side
    /// channel.
    fn fail(&self, st: &mut State, why: String) {
        if st.broken.is_none() {
            tracing::warn!(peer = %self.peer_addr, "RDMA connection failed: {why}");
            st.broken = Some(why);
            let _ = self.side.shutdown(Shutdown::Both);
        }
        self.progressed.notify_all();
    }

    /// Processes every completion waiting in the CQ; returns how many there were.
    fn drive(&self, st: &mut State) -> usize {
        let mut total = 0;
        let mut wcs = std::mem::take(&mut st.scratch);
        loop {
            let n = match self.res.cq.poll(&mut wcs, 64) {
                Ok(n) => n,
                Err(e) => {
                    self.fail(st, e.to_string());
                    break;
                }
            };
            for wc in &wcs {
                self.on_completion(st, wc);
            }
            total += n;
            if n < 64 {
                break;
            }
        }
        st.scratch = wcs;
        if total > 0 {
            self.return_credits(st, false);
            self.progressed.notify_all();
        }
        total
    }

    fn on_completion(&self, st: &mut State, wc: &crate::verbs::Completion) {
        let quiet_flush = |st: &State| wc.is_flush() && (st.broken.is_some() || st.peer_gone());
        if wc.wr_id & RECV_TAG == 0 {
            st.outstanding = st.outstanding.saturating_sub(1);
            if wc.wr_id > 0 {
                st.free_staging.push((wc.wr_id - 1) as u16);
            }
            if !wc.ok && !quiet_flush(st) {
                self.fail(
                    st,
                    format!(
                        "an RDMA send to {} failed: {} (the peer is gone or its queue pair is in error)",
                        self.peer_addr,
                        wc.status_text()
                    ),
                );
            }
            return;
        }
        if !wc.ok {
            if !quiet_flush(st) {
                self.fail(
                    st,
                    format!(
                        "an RDMA receive failed: {} (the queue pair is in the error state)",
                        wc.status_text()
                    ),
                );
            }
            return;
        }
        if let Err(e) = self.res.qp.post_empty_recv(RECV_TAG) {
            self.fail(st, format!("reposting a receive: {e}"));
            return;
        }
        let Some(imm) = wc.imm else {
            self.fail(
                st,
                "protocol violation: a message without immediate data".into(),
            );
            return;
        };
        let returned = imm & CREDIT_MASK;
        st.credits += returned;
        if st.credits > self.remote.len() as u32 {
            self.fail(
                st,
                format!(
                    "protocol violation: the peer returned credits for {} ring slots, it has {}",
                    st.credits,
                    self.remote.len()
                ),
            );
            return;
        }
        let expected_opcode = if kind_of(imm) == KIND_DATA {
            crate::verbs::OPCODE_RECV_WRITE_IMM
        } else {
            crate::verbs::OPCODE_RECV
        };
        if wc.opcode != expected_opcode {
            self.fail(
                st,
                format!(
                    "protocol violation: message kind {} arrived with opcode {}",
                    kind_of(imm),
                    wc.opcode
                ),
            );
            return;
        }
        match kind_of(imm) {
            KIND_DATA => {
                let len = wc.byte_len as usize;
                let slot = (st.recv_seq % self.res.ring.len() as u64) as usize;
                st.recv_seq += 1;
                if st.fin_received {
                    self.fail(
                        st,
                        "protocol violation: data after the end of the stream".into(),
                    );
                } else if st.ready.len() >= self.res.ring.len() {
                    // A peer that honours its credits cannot get here: refuse instead of queueing
                    // without bound.
                    self.fail(
                        st,
                        "protocol violation: the peer wrote more messages than it had credits for"
                            .into(),
                    );
                } else if len > self.res.ring[slot].len() {
                    self.fail(st, format!("protocol violation: a {len}-byte message"));
                } else if len == 0 || st.read_shut {
                    // Nothing to read, or nobody will read it: the slot is free again.
                    st.credits_owed += 1;
                } else {
                    st.ready.push_back((slot, len));
                }
            }
            KIND_CREDIT => {}
            KIND_FIN => st.fin_received = true,
            k => self.fail(st, format!("protocol violation: message kind {k}")),
        }
    }

    /// Sends owed credits in their own message once a batch is owed (or whenever any is owed and
    /// `force`); otherwise they wait for the next data message.
    fn return_credits(&self, st: &mut State, force: bool) {
        if let Some(imm) = self.take_credits(st, force) {
            if let Err(e) = self.post_credits(imm) {
                self.fail(st, format!("returning credits: {e}"));
            }
        }
    }

    /// Takes the owed credits for a credit message if one is due, counting it as outstanding;
    /// returns its immediate for [`post_credits`](Self::post_credits).
    fn take_credits(&self, st: &mut State, force: bool) -> Option<u32> {
        let due = st.credits_owed >= self.credit_batch || (force && st.credits_owed > 0);
        if !due || st.broken.is_some() || st.outstanding >= self.queue_depth {
            return None;
        }
        st.outstanding += 1;
        Some((KIND_CREDIT << KIND_SHIFT) | std::mem::take(&mut st.credits_owed))
    }

    fn post_credits(&self, imm: u32) -> Result<(), RdmaError> {
        self.res.qp.post_send(SendRequest {
            wr_id: 0,
            kind: SendKind::SendImm,
            imm,
            local: Local::Empty,
        })
    }

    /// Sends the end-of-stream marker once (after every data message already posted).
    fn send_fin(&self, st: &mut State) {
        if st.fin_sent || st.broken.is_some() {
            return;
        }
        st.fin_sent = true;
        let imm = (KIND_FIN << KIND_SHIFT) | std::mem::take(&mut st.credits_owed);
        match self.res.qp.post_send(SendRequest {
            wr_id: 0,
            kind: SendKind::SendImm,
            imm,
            local: Local::Empty,
        }) {
            Ok(()) => st.outstanding += 1,
            Err(e) => self.fail(st, format!("sending the end of stream: {e}")),
        }
    }

    /// Waits for something to happen (a completion, the side channel, a shutdown) or for `deadline`.
    fn wait(&self, st: &mut MutexGuard<'_, State>, deadline: Option<Instant>) -> io::Result<()> {
        let now = Instant::now();
        let slice = match deadline {
            Some(d) if now >= d => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "RDMA stream operation timed out",
                ));
            }
            Some(d) => (d - now).min(WAIT_SLICE),
            None => WAIT_SLICE,
        };
        if st.poller {
            self.progressed.wait_for(st, slice);
            return Ok(());
        }
        // Busy-poll for a short while first: completions often follow within microseconds, and a
        // thread (or, in a virtual machine, a whole vCPU) that goes to sleep is slow to wake.
        if !self.spin.is_zero() {
            let until = Instant::now() + self.spin.min(slice);
            loop {
                if self.drive(st) > 0 {
                    return Ok(());
                }
                if Instant::now() >= until || st.read_shut || st.write_shut {
                    break;
                }
                // Let the other thread at the state (it may be about to return a credit).
                MutexGuard::unlocked(st, std::hint::spin_loop);
            }
        }
        // Arm first, then look again: a completion that slipped in before arming is seen now, one
        // that comes later raises an event.
        self.res.cq.take_events();
        if let Err(e) = self.res.cq.arm() {
            self.fail(st, e.to_string());
            return Ok(());
        }
        if self.drive(st) > 0 {
            return Ok(());
        }
        let watch_side = st.side_ended_at.is_none() && st.broken.is_none();
        let timeout = if st.side_ended_at.is_some() {
            slice.min(Duration::from_millis(20))
        } else {
            slice
        };
        st.poller = true;
        let (side_ready, _) = MutexGuard::unlocked(st, || {
            poll_fds(
                self.channel.fd(),
                watch_side.then(|| self.side.as_raw_fd()),
                self.wake.as_raw_fd(),
                timeout,
            )
        });
        st.poller = false;
        if side_ready {
            self.check_side(st);
        }
        self.drive(st);
        self.progressed.notify_all();
        Ok(())
    }

    /// The side channel became readable: the peer closed it (or broke the protocol by writing).
    fn check_side(&self, st: &mut State) {
        let mut b = [0u8; 1];
        // SAFETY: `b` is a valid one-byte buffer; MSG_PEEK|MSG_DONTWAIT neither blocks nor consumes.
        let n = unsafe {
            libc::recv(
                self.side.as_raw_fd(),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            self.fail(
                st,
                "protocol violation: bytes on the RDMA side channel".into(),
            );
        } else if n == 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
            st.side_ended_at.get_or_insert_with(Instant::now);
        }
    }

    fn wake_all(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our own eventfd (non-blocking; a full counter
        // just means a wake-up is already pending).
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        self.progressed.notify_all();
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let _reader = self.read_lock.lock();
        let mut st = self.state.lock();
        let deadline = st.read_timeout.map(|t| Instant::now() + t);
        loop {
            self.drive(&mut st);
            if st.read_shut {
                return Ok(0);
            }
            if let Some(&(slot, len)) = st.ready.front() {
                let pos = st.read_pos;
                let n = buf.len().min(len - pos);
                let src = self.res.ring[slot].addr();
                MutexGuard::unlocked(&mut st, || {
                    // SAFETY: `pos + n <= len <= slot length`, inside the registered buffer. The slot
                    // is ours until its credit goes back (below), so the peer does not write it now,
                    // and readers are serialised by `read_lock`. `buf` is a distinct allocation.
                    unsafe { std::ptr::copy_nonoverlapping(src.add(pos), buf.as_mut_ptr(), n) };
                });
                if st.read_shut {
                    // Shut down for reading while we copied: the slot was handed back, so the bytes
                    // may be torn; the stream is over for readers anyway.
                    return Ok(0);
                }
                st.read_pos += n;
                if st.read_pos == len {
                    st.ready.pop_front();
                    st.read_pos = 0;
                    st.credits_owed += 1;
                    // Posted unlocked, like data: with a software device the post is slow.
                    if let Some(imm) = self.take_credits(&mut st, false) {
                        drop(st);
                        if let Err(e) = self.post_credits(imm) {
                            let mut st = self.state.lock();
                            self.fail(&mut st, format!("returning credits: {e}"));
                        }
                    }
                }
                return Ok(n);
            }
            if st.fin_received {
                return Ok(0);
            }
            if let Some(why) = &st.broken {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    why.clone(),
                ));
            }
            if st.peer_gone() {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!(
                        "the RDMA peer {} closed its side channel without ending the stream (process gone?)",
                        self.peer_addr
                    ),
                ));
            }
            self.wait(&mut st, deadline)?;
        }
    }

    fn write(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        let len = total.min(self.max_message);
        let inline = len <= self.inline;
        let _writer = self.write_lock.lock();
        let mut st = self.state.lock();
        let deadline = st.write_timeout.map(|t| Instant::now() + t);
        loop {
            self.drive(&mut st);
            if st.write_shut || st.fin_sent {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the RDMA stream was shut down for writing",
                ));
            }
            if let Some(why) = &st.broken {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    why.clone(),
                ));
            }
            if st.side_ended_at.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    format!("the RDMA peer {} has gone", self.peer_addr),
                ));
            }
            if st.credits > 0
                && st.outstanding < self.queue_depth
                && (inline || !st.free_staging.is_empty())
            {
                break;
            }
            self.wait(&mut st, deadline)?;
        }
        st.credits -= 1;
        let remote = self.remote[(st.send_seq % self.remote.len() as u64) as usize];
        st.send_seq += 1;
        let imm = (KIND_DATA << KIND_SHIFT) | std::mem::take(&mut st.credits_owed);
        let kind = SendKind::WriteImm {
            remote_addr: remote.addr,
            rkey: remote.rkey,
        };
        // Counted now, so that the queue-depth bound holds while the post happens unlocked.
        st.outstanding += 1;
        let slot = if inline {
            None
        } else {
            Some(st.free_staging.pop().expect("checked above") as usize)
        };
        // Copy and post without the state lock: with a software device (rxe) `ibv_post_send` does
        // the protocol work in the calling thread, milliseconds for a large message, and the reader
        // must meanwhile be free to take completions, copy out and return credits.
        let posted = MutexGuard::unlocked(&mut st, || match slot {
            None => {
                let mut gathered = [0u8; MAX_INLINE as usize];
                gather(bufs, &mut gathered[..len]);
                self.res.qp.post_send(SendRequest {
                    wr_id: 0,
                    kind,
                    imm,
                    local: Local::Inline(&gathered[..len]),
                })
            }
            Some(slot) => {
                let staging = &self.res.staging[slot];
                let dst = staging.addr();
                // SAFETY: `len <= max_message <= staging length`; the slot was taken off the free
                // list, so no posted send reads it, and only this writer (holding `write_lock`)
                // writes it. The slices of `bufs` are distinct allocations.
                let dst_slice = unsafe { std::slice::from_raw_parts_mut(dst, len) };
                gather(bufs, dst_slice);
                // Data messages are posted by the holder of `write_lock` only, so they leave in
                // `send_seq` order, each to the ring slot reserved for it.
                self.res.qp.post_send(SendRequest {
                    wr_id: slot as u64 + 1,
                    kind,
                    imm,
                    local: Local::Registered(dst, len as u32, staging.lkey()),
                })
            }
        });
        match posted {
            Ok(()) => Ok(len),
            Err(e) => {
                let msg = format!("posting an RDMA write: {e}");
                self.fail(&mut st, msg.clone());
                Err(io::Error::new(io::ErrorKind::ConnectionAborted, msg))
            }
        }
    }

    fn shutdown(&self, how: Shutdown) {
        {
            let mut st = self.state.lock();
            if matches!(how, Shutdown::Read | Shutdown::Both) {
                st.read_shut = true;
                // Nobody reads what is buffered or still arrives: free those slots for the peer.
                st.credits_owed += st.ready.len() as u32;
                st.ready.clear();
                st.read_pos = 0;
                self.return_credits(&mut st, true);
            }
            if matches!(how, Shutdown::Write | Shutdown::Both) {
                st.write_shut = true;
            }
        }
        self.wake_all();
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            // After any write in progress has posted its message: the fin must come last.
            let _writer = self.write_lock.lock();
            let mut st = self.state.lock();
            self.send_fin(&mut st);
        }
    }

    /// Moves the queue pair into the error state, as a device or link failure would.
    #[cfg(test)]
    fn inject_error(&self) -> Result<(), RdmaError> {
        self.res.qp.set_error()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let mut st = self.state.lock();
        self.send_fin(&mut st);
        // Give what was written a chance to land before the queue pair is destroyed.
        let deadline = Instant::now() + LINGER;
        while st.outstanding > 0 && st.broken.is_none() && !st.peer_gone() {
            if Instant::now() >= deadline {
                tracing::warn!(
                    peer = %self.peer_addr,
                    outstanding = st.outstanding,
                    "closing an RDMA connection with unacknowledged sends"
                );
                break;
            }
            if self.wait(&mut st, Some(deadline)).is_err() {
                break;
            }
        }
        drop(st);
        let _ = self.side.shutdown(Shutdown::Both);
    }
}

/// Copies the concatenation of `bufs` into `dst` (as many bytes as `dst` holds).
fn gather(bufs: &[IoSlice<'_>], dst: &mut [u8]) {
    let mut at = 0;
    for b in bufs {
        if at == dst.len() {
            break;
        }
        let n = b.len().min(dst.len() - at);
        dst[at..at + n].copy_from_slice(&b[..n]);
        at += n;
    }
}

/// poll(2) on the completion channel, the side channel (if any) and the wake-up eventfd. Returns
/// whether the side channel is readable and whether the eventfd fired (which is drained).
fn poll_fds(channel: RawFd, side: Option<RawFd>, wake: RawFd, timeout: Duration) -> (bool, bool) {
    let mut fds = [
        libc::pollfd {
            fd: channel,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: side.unwrap_or(-1),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        },
    ];
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid array of 3 pollfd; a negative fd is ignored by poll(2).
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 3, ms) };
    if rc <= 0 {
        return (false, false);
    }
    let woken = fds[1].revents != 0;
    if woken {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe { libc::read(wake, (&mut v as *mut u64).cast(), 8) };
    }
    (fds[2].revents != 0, woken)
}

/// One RDMA connection: a reliable-connected queue pair as a byte stream (see the module docs).
/// Cloning with [`Conn::try_clone_conn`] gives another handle to the same stream; the last handle
/// dropped ends the stream and releases the queue pair and its buffers.
#[derive(Debug)]
pub struct RdmaConn {
    shared: Arc<Shared>,
}

impl RdmaConn {
    /// The largest message one `write` sends (a receive-ring slot).
    pub fn max_message(&self) -> usize {
        self.shared.max_message
    }

    /// The device this connection runs on.
    pub fn device(&self) -> &str {
        self.shared._device.name()
    }

    #[cfg(test)]
    pub(crate) fn inject_qp_error(&self) -> Result<(), RdmaError> {
        self.shared.inject_error()
    }

    /// Marks a connection whose setup was abandoned, so that dropping it sends nothing.
    pub(crate) fn abandon(&self) {
        let mut st = self.shared.state.lock();
        st.broken.get_or_insert_with(|| "setup abandoned".into());
    }
}

impl Read for RdmaConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.shared.read(buf)
    }
}

impl Write for RdmaConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.write(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.shared.write(bufs)
    }

    /// Every `write` is posted at once; there is nothing to flush. Reports a failed connection.
    fn flush(&mut self) -> io::Result<()> {
        let st = self.shared.state.lock();
        match &st.broken {
            Some(why) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                why.clone(),
            )),
            None => Ok(()),
        }
    }
}

fn check_timeout(t: Option<Duration>) -> io::Result<()> {
    if t == Some(Duration::ZERO) {
        // As `TcpStream` does: a zero timeout is an error, not "no timeout".
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot set a 0 duration timeout",
        ));
    }
    Ok(())
}

impl Conn for RdmaConn {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(RdmaConn {
            shared: Arc::clone(&self.shared),
        }))
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.shared.shutdown(how);
        Ok(())
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        check_timeout(timeout)?;
        self.shared.state.lock().read_timeout = timeout;
        Ok(())
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        check_timeout(timeout)?;
        self.shared.state.lock().write_timeout = timeout;
        Ok(())
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.shared.peer_addr)
    }

    fn transport(&self) -> &'static str {
        "rdma"
    }
}

/// Tests of the data path itself, on a real device (they skip where there is none, unless
/// `DWCP_RDMA_REQUIRED=1`). The connection-level and migration tests are in `tests/rdma.rs`.
#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn device_or_skip(test: &str) -> Option<Arc<Device>> {
        let config = RdmaConfig {
            setup_timeout: Duration::from_secs(60),
            ..Default::default()
        };
        match Device::open(&config) {
            Ok(d) => Some(d),
            Err(e) if std::env::var("DWCP_RDMA_REQUIRED").as_deref() == Ok("1") => {
                panic!("{test}: DWCP_RDMA_REQUIRED=1 but the device cannot be used: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED {test}: {e} (`cargo xtask rdma-guest` runs it on Soft-RoCE)");
                None
            }
        }
    }

    /// Two connected queue pairs on one device, set up without the wire exchange.
    fn pair(device: &Arc<Device>) -> (RdmaConn, RdmaConn) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a_side = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b_side, _) = l.accept().unwrap();
        let a = device.prepare().unwrap();
        let b = device.prepare().unwrap();
        let (a_ep, b_ep) = (a.endpoint().clone(), b.endpoint().clone());
        (
            a.connect(&b_ep, a_side).unwrap(),
            b.connect(&a_ep, b_side).unwrap(),
        )
    }

    #[test]
    fn credits_stop_a_writer_after_one_ring_of_unread_messages() {
        let Some(device) = device_or_skip("credits_stop_a_writer") else {
            return;
        };
        let (mut a, mut b) = pair(&device);
        a.set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let msg = vec![0x5a; a.max_message()];
        let ring = device.config.ring_slots as usize;
        for i in 0..ring {
            assert_eq!(
                a.write(&msg).unwrap(),
                msg.len(),
                "message {i} fits the ring"
            );
        }
        // The peer has read nothing: every slot of its ring is full, so there is no credit left.
        let e = a.write(&msg).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        // Reading one message returns one credit (batched: a quarter of the ring at most waits).
        let mut got = vec![0u8; msg.len()];
        for _ in 0..(ring / 4).max(1) {
            b.read_exact(&mut got).unwrap();
            assert_eq!(got, msg);
        }
        a.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(a.write(&msg).unwrap(), msg.len());
    }

    #[test]
    fn a_queue_pair_in_error_fails_both_ends_instead_of_hanging() {
        let Some(device) = device_or_skip("a_queue_pair_in_error") else {
            return;
        };
        let (mut a, mut b) = pair(&device);
        b.write_all(b"before the failure").unwrap();
        let mut got = [0u8; 18];
        a.read_exact(&mut got).unwrap();
        a.inject_qp_error().unwrap();
        a.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let e = a.read(&mut got).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
        assert!(e.to_string().contains("error state"), "{e}");
        assert!(a.write(b"x").is_err(), "a failed connection refuses writes");
        // The peer learns without waiting for its own timeout: the side channel closed.
        b.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let e = (0..64)
            .find_map(|_| b.write(&[1u8; 4096]).err())
            .expect("writes to a failed peer fail");
        assert!(
            !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        let e = b.read(&mut got).unwrap_err();
        assert!(
            !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
    }

    #[test]
    fn shutdown_ends_the_stream_after_the_data_and_wakes_blocked_readers() {
        let Some(device) = device_or_skip("shutdown_ends_the_stream") else {
            return;
        };
        let (mut a, b) = pair(&device);
        a.write_all(b"last words").unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        assert_eq!(
            a.write(b"more").unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
        let mut reader = b.try_clone_conn().unwrap();
        let mut all = Vec::new();
        reader.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"last words");

        // A reader blocked without a timeout returns when another handle shuts the stream down.
        let mut blocked = a.try_clone_conn().unwrap();
        let t = std::thread::spawn(move || blocked.read(&mut [0u8; 16]));
        std::thread::sleep(Duration::from_millis(50));
        a.shutdown(Shutdown::Both).unwrap();
        assert_eq!(t.join().unwrap().unwrap(), 0);
    }

    #[test]
    fn read_timeouts_surface_as_would_block() {
        let Some(device) = device_or_skip("read_timeouts_surface_as_would_block") else {
            return;
        };
        let (mut a, _b) = pair(&device);
        a.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let e = a.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(a.set_read_timeout(Some(Duration::ZERO)).is_err());
    }
}
