//! Datacenter mode: RDMA when both sides have a device, TCP (with a logged reason) otherwise.
//!
//! Every connection starts as TCP. A connector with a usable device sends an RDMA Hello (see
//! [`crate::wire`]); the acceptor answers with its own queue pair, or refuses with a reason, in which
//! case both sides keep the TCP connection as the stream. A connector without a device sends nothing
//! special: its first bytes are the engine's own handshake, which the acceptor recognises and
//! passes through. Each connection decides on its own, so a half-working device degrades stream by
//! stream instead of failing a migration.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dwcp_core::Error;
use dwcp_core::transport::{Acceptor, Conn, Connector};

#[cfg(feature = "rdma")]
use crate::conn::Device;
use crate::wire::{self, Reply};
use crate::{RdmaConfig, RdmaError};

/// Connections being set up at once by an acceptor; more are turned away (a flood of silent
/// strangers must not create threads without bound).
const MAX_PENDING_SETUPS: usize = 64;
/// Set-up connections waiting for `accept_timeout`.
const ACCEPT_QUEUE: usize = 16;

#[cfg(feature = "rdma")]
type LocalDevice = Result<Arc<Device>, String>;
#[cfg(not(feature = "rdma"))]
type LocalDevice = Result<std::convert::Infallible, String>;

fn open_device(config: &RdmaConfig) -> LocalDevice {
    #[cfg(feature = "rdma")]
    {
        Device::open(config).map_err(|e| e.to_string())
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = config;
        Err("dwcp-rdma was built without its `rdma` feature".into())
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> RdmaError {
    let context = context.into();
    move |source| RdmaError::Io { context, source }
}

fn clear_timeouts(tcp: &TcpStream) {
    tcp.set_read_timeout(None).ok();
    tcp.set_write_timeout(None).ok();
}

/// What a setup ended with.
enum Outcome {
    #[cfg(feature = "rdma")]
    Rdma(crate::RdmaConn),
    /// Plain TCP on the same connection, and why.
    Tcp(TcpStream, String),
}

/// Opens datacenter-mode connections to one peer: RDMA queue pairs when both sides have a device,
/// TCP streams otherwise (see the module docs). Use it with `dwcp::Migration::over`.
pub struct DatacenterConnector {
    peer: SocketAddr,
    config: RdmaConfig,
    device: LocalDevice,
}

impl fmt::Debug for DatacenterConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatacenterConnector")
            .field("peer", &self.peer)
            .field("rdma", &self.rdma_status())
            .finish_non_exhaustive()
    }
}

impl DatacenterConnector {
    /// A connector to `peer` (the address a [`DatacenterAcceptor`] listens on). Opens the local
    /// device now; without one, every connection is TCP (logged once, here), or, with
    /// `fallback_to_tcp` off, an error.
    pub fn new(peer: SocketAddr, config: RdmaConfig) -> Result<Self, Error> {
        config.validate()?;
        let device = open_device(&config);
        if let Err(reason) = &device {
            if !config.fallback_to_tcp {
                return Err(RdmaError::NoDevice(reason.clone()).into());
            }
            tracing::warn!(%peer, "datacenter mode: RDMA unavailable here, using TCP: {reason}");
        }
        Ok(Self {
            peer,
            config,
            device,
        })
    }

    /// `Ok(device name)` when connections try RDMA, `Err(reason)` when they go straight to TCP.
    pub fn rdma_status(&self) -> Result<&str, &str> {
        match &self.device {
            #[cfg(feature = "rdma")]
            Ok(d) => Ok(d.name()),
            #[cfg(not(feature = "rdma"))]
            Ok(never) => match *never {},
            Err(reason) => Err(reason),
        }
    }

    fn fallback(&self, tcp: TcpStream, reason: &str) -> Result<Box<dyn Conn>, Error> {
        if !self.config.fallback_to_tcp {
            return Err(RdmaError::Setup(format!("{reason} (and fallback to TCP is off)")).into());
        }
        tracing::warn!(peer = %self.peer, "datacenter mode: this stream uses TCP: {reason}");
        clear_timeouts(&tcp);
        Ok(Box::new(tcp))
    }
}

impl Connector for DatacenterConnector {
    fn connect(&self, timeout: Duration) -> Result<Box<dyn Conn>, Error> {
        let tcp = TcpStream::connect_timeout(&self.peer, timeout)
            .map_err(|e| Error::io(format!("connecting to {}", self.peer), e))?;
        tcp.set_nodelay(true).ok();
        match &self.device {
            Err(reason) => {
                if self.config.fallback_to_tcp {
                    // Logged once when the connector was made.
                    Ok(Box::new(tcp))
                } else {
                    self.fallback(tcp, reason)
                }
            }
            #[cfg(not(feature = "rdma"))]
            Ok(never) => match *never {},
            #[cfg(feature = "rdma")]
            Ok(device) => {
                match client_setup(device, tcp, timeout.min(self.config.setup_timeout))? {
                    Outcome::Rdma(conn) => {
                        tracing::debug!(peer = %self.peer, device = device.name(), "RDMA stream connected");
                        Ok(Box::new(conn))
                    }
                    Outcome::Tcp(tcp, reason) => self.fallback(tcp, &reason),
                }
            }
        }
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }
}

#[cfg(feature = "rdma")]
fn client_setup(
    device: &Arc<Device>,
    mut tcp: TcpStream,
    timeout: Duration,
) -> Result<Outcome, RdmaError> {
    tcp.set_read_timeout(Some(timeout)).ok();
    tcp.set_write_timeout(Some(timeout)).ok();
    let prepared = match device.prepare() {
        Ok(p) => p,
        // Nothing was sent yet: the connection is still a plain TCP stream.
        Err(e) => {
            return Ok(Outcome::Tcp(
                tcp,
                format!("preparing a queue pair on {}: {e}", device.name()),
            ));
        }
    };
    wire::send_hello(&mut tcp, prepared.endpoint())?;
    let peer_endpoint = match wire::read_reply(&mut tcp)? {
        Reply::Refused(reason) => {
            clear_timeouts(&tcp);
            return Ok(Outcome::Tcp(
                tcp,
                format!("the peer refused RDMA: {reason}"),
            ));
        }
        Reply::Accepted(ep) => ep,
    };
    let side = tcp
        .try_clone()
        .map_err(io_err("cloning the side channel"))?;
    match prepared.connect(&peer_endpoint, side) {
        Ok(conn) => {
            if let Err(e) = wire::send_ready(&mut tcp, Ok(())) {
                conn.abandon();
                return Err(e);
            }
            Ok(Outcome::Rdma(conn))
        }
        Err(e) => {
            let reason = format!("connecting the queue pair: {e}");
            wire::send_ready(&mut tcp, Err(&reason))?;
            clear_timeouts(&tcp);
            Ok(Outcome::Tcp(tcp, reason))
        }
    }
}

/// Waits until `n` bytes can be peeked (or the peer closed, or `timeout`); returns what was seen.
fn peek_prefix(tcp: &TcpStream, n: usize, timeout: Duration) -> Result<Vec<u8>, RdmaError> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; n];
    loop {
        tcp.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .ok();
        let got = tcp
            .peek(&mut buf)
            .map_err(io_err("waiting for the first bytes"))?;
        if got >= n || got == 0 {
            buf.truncate(got);
            return Ok(buf);
        }
        if Instant::now() >= deadline {
            return Err(RdmaError::Io {
                context: "waiting for the first bytes".into(),
                source: io::ErrorKind::TimedOut.into(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sets up one accepted connection: RDMA if the client asks and we can, TCP otherwise.
fn server_setup(
    device: &LocalDevice,
    config: &RdmaConfig,
    mut tcp: TcpStream,
) -> Result<Outcome, RdmaError> {
    let timeout = config.setup_timeout;
    tcp.set_write_timeout(Some(timeout)).ok();
    let first = peek_prefix(&tcp, wire::MAGIC.len(), timeout)?;
    if first.is_empty() {
        return Err(RdmaError::Setup(
            "the peer closed before sending anything".into(),
        ));
    }
    if !wire::is_hello(&first) {
        clear_timeouts(&tcp);
        return Ok(Outcome::Tcp(tcp, "the peer did not offer RDMA".into()));
    }
    tcp.set_read_timeout(Some(timeout)).ok();
    let hello = wire::read_hello(&mut tcp)?;
    let refuse = |mut tcp: TcpStream, reason: String| -> Result<Outcome, RdmaError> {
        wire::send_reply(&mut tcp, &Reply::Refused(reason.clone()))?;
        clear_timeouts(&tcp);
        Ok(Outcome::Tcp(tcp, reason))
    };
    let peer_endpoint = match hello {
        wire::Hello::UnsupportedVersion(v) => {
            return refuse(
                tcp,
                format!(
                    "RDMA setup version {v} is not supported (this side speaks {})",
                    wire::VERSION
                ),
            );
        }
        wire::Hello::Endpoint(ep) => ep,
    };
    match device {
        Err(reason) => refuse(tcp, format!("no RDMA on the accepting side: {reason}")),
        #[cfg(not(feature = "rdma"))]
        Ok(never) => {
            let _ = peer_endpoint;
            match *never {}
        }
        #[cfg(feature = "rdma")]
        Ok(device) => {
            let prepared = match device.prepare() {
                Ok(p) => p,
                Err(e) => return refuse(tcp, format!("preparing a queue pair: {e}")),
            };
            let ours = prepared.endpoint().clone();
            let side = tcp
                .try_clone()
                .map_err(io_err("cloning the side channel"))?;
            let conn = match prepared.connect(&peer_endpoint, side) {
                Ok(c) => c,
                Err(e) => return refuse(tcp, format!("connecting the queue pair: {e}")),
            };
            // `connect` cleared the socket's timeouts; the client still owes its verdict.
            tcp.set_read_timeout(Some(timeout)).ok();
            tcp.set_write_timeout(Some(timeout)).ok();
            let verdict = wire::send_reply(&mut tcp, &Reply::Accepted(ours))
                .and_then(|()| wire::read_ready(&mut tcp));
            clear_timeouts(&tcp);
            match verdict {
                Ok(Ok(())) => Ok(Outcome::Rdma(conn)),
                Ok(Err(reason)) => {
                    conn.abandon();
                    Ok(Outcome::Tcp(
                        tcp,
                        format!("the peer could not connect its queue pair: {reason}"),
                    ))
                }
                Err(e) => {
                    conn.abandon();
                    Err(e)
                }
            }
        }
    }
}

/// Accepts datacenter-mode connections: RDMA from peers that offer it and when this side has a
/// device, TCP otherwise. Use it with `dwcp::Listener::over`.
///
/// A background thread accepts TCP connections and sets each up on its own short-lived thread, so a
/// silent or hostile client cannot hold up the others; set-up connections queue (up to 16) for
/// [`Acceptor::accept_timeout`].
pub struct DatacenterAcceptor {
    local: SocketAddr,
    rdma: Result<String, String>,
    incoming: Mutex<Receiver<Box<dyn Conn>>>,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for DatacenterAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatacenterAcceptor")
            .field("local", &self.local)
            .field("rdma", &self.rdma)
            .finish_non_exhaustive()
    }
}

impl DatacenterAcceptor {
    /// Listens on `addr` (port 0: any free port). Opens the local device now; without one every
    /// connection is TCP (logged once, here), or, with `fallback_to_tcp` off, an error.
    pub fn bind(addr: SocketAddr, config: RdmaConfig) -> Result<Self, Error> {
        config.validate()?;
        let device = open_device(&config);
        let rdma = match &device {
            #[cfg(feature = "rdma")]
            Ok(d) => Ok(d.name().to_string()),
            #[cfg(not(feature = "rdma"))]
            Ok(never) => match *never {},
            Err(reason) => {
                if !config.fallback_to_tcp {
                    return Err(RdmaError::NoDevice(reason.clone()).into());
                }
                tracing::warn!(%addr, "datacenter mode: RDMA unavailable here, accepting TCP: {reason}");
                Err(reason.clone())
            }
        };
        let listener =
            TcpListener::bind(addr).map_err(|e| Error::io(format!("binding {addr}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("reading the bound address", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("making the listener non-blocking", e))?;
        let (tx, rx) = sync_channel(ACCEPT_QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let device = Arc::new(device);
        let accept_thread = std::thread::Builder::new()
            .name("rdma-accept".into())
            .spawn(move || accept_loop(listener, device, config, tx, stop2))
            .map_err(|e| Error::io("spawning the accept thread", e))?;
        Ok(Self {
            local,
            rdma,
            incoming: Mutex::new(rx),
            stop,
            accept_thread: Some(accept_thread),
        })
    }

    /// `Ok(device name)` when RDMA is offered to peers, `Err(reason)` when every stream is TCP.
    pub fn rdma_status(&self) -> Result<&str, &str> {
        match &self.rdma {
            Ok(d) => Ok(d),
            Err(r) => Err(r),
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    device: Arc<LocalDevice>,
    config: RdmaConfig,
    tx: SyncSender<Box<dyn Conn>>,
    stop: Arc<AtomicBool>,
) {
    let pending = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the listener we own; at most 100 ms, so `stop` is seen soon.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        let (tcp, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!("datacenter mode: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if pending.load(Ordering::Relaxed) >= MAX_PENDING_SETUPS {
            tracing::warn!(%peer, "datacenter mode: too many connections being set up; dropping one");
            continue;
        }
        tcp.set_nonblocking(false).ok();
        tcp.set_nodelay(true).ok();
        pending.fetch_add(1, Ordering::Relaxed);
        let (device, config, tx, pending2) = (
            Arc::clone(&device),
            config.clone(),
            tx.clone(),
            Arc::clone(&pending),
        );
        let spawned = std::thread::Builder::new()
            .name("rdma-setup".into())
            .spawn(move || {
                let outcome = server_setup(&device, &config, tcp);
                pending2.fetch_sub(1, Ordering::Relaxed);
                let conn: Box<dyn Conn> = match outcome {
                    #[cfg(feature = "rdma")]
                    Ok(Outcome::Rdma(c)) => Box::new(c),
                    Ok(Outcome::Tcp(tcp, reason)) => {
                        if !config.fallback_to_tcp {
                            tracing::warn!(%peer, "datacenter mode: refusing a TCP stream ({reason}); fallback is off");
                            return;
                        }
                        tracing::info!(%peer, "datacenter mode: this stream uses TCP: {reason}");
                        Box::new(tcp)
                    }
                    Err(e) => {
                        tracing::warn!(%peer, "datacenter mode: dropping a connection: {e}");
                        return;
                    }
                };
                // Fails only when the acceptor is gone; the connection is then dropped.
                let _ = tx.send(conn);
            });
        if let Err(e) = spawned {
            pending.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!("datacenter mode: cannot spawn a setup thread: {e}");
        }
    }
}

impl Acceptor for DatacenterAcceptor {
    fn accept_timeout(&self, timeout: Duration) -> Result<Option<Box<dyn Conn>>, Error> {
        let rx = self
            .incoming
            .lock()
            .map_err(|_| Error::Protocol("the acceptor's queue lock was poisoned".into()))?;
        match rx.recv_timeout(timeout) {
            Ok(conn) => Ok(Some(conn)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(Error::io(
                "accepting datacenter connections",
                io::Error::other("the accept thread has ended"),
            )),
        }
    }

    fn local_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.local)
    }
}

impl Drop for DatacenterAcceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}
