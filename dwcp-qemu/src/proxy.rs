//! The two proxies: [`SourceProxy`] (next to the source QEMU) and [`DestinationProxy`] (next to the
//! destination QEMU). Each serves one migration: the source proxy sets the tunnel up first, then
//! accepts QEMU's connections until every channel has finished; the destination proxy accepts one
//! tunnel and connects to the destination QEMU once per channel, in the order the source accepted them
//! (QEMU 7.2 takes its first incoming connection as the main channel).
//!
//! Kept whole (about 760 lines): the two proxies share their set-up, the QEMU-side acceptor and the
//! shutdown order, which is easier to keep symmetric in one file.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, bounded, select};

use dwcp_core::error::{Error, HandshakeError, SecurityError};
use dwcp_core::frame::FrameType;
use dwcp_core::handshake::{new_session_id, send_error};
use dwcp_core::transport::Conn;
use dwcp_hde::Codec;
use dwcp_tls::Security;

use crate::endpoint::{Endpoint, EndpointSettings, Notice, StreamReader};
use crate::secure::{self, Handshakes, Joined, Stream};
use crate::state::Role;
use crate::wire::{MAX_SEGMENT, Message, TUNNEL_VERSION, TunnelInit, TunnelReady};
use crate::{TunnelConfig, TunnelReport};

/// Receive buffer of the source proxy's QEMU connections.
const QEMU_RECV_BUFFER: usize = 1 << 20;
/// Largest number of streams a tunnel may announce.
const MAX_STREAMS: u16 = 64;
/// Most handshakes the destination runs at once while it waits for a tunnel; it stops accepting
/// while that many are in progress, so a flood of strangers costs threads only up to this.
const MAX_HANDSHAKES: usize = 32;
/// How long the destination's acceptor waits for a connection before it looks at the handshakes in
/// progress again.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

fn read_message(reader: &mut StreamReader, buf: &mut Vec<u8>) -> Result<Message<'static>, Error> {
    let h = reader.read_frame(buf)?;
    match Message::decode(h.frame_type, buf)? {
        Message::Init(i) => Ok(Message::Init(i)),
        Message::Ready(r) => Ok(Message::Ready(r)),
        other => Err(Error::Protocol(format!(
            "unexpected {} while setting the tunnel up",
            other.frame_type().name()
        ))),
    }
}

fn settings(role: Role, config: &TunnelConfig, codec: Codec, window: u64) -> EndpointSettings {
    EndpointSettings {
        role,
        codec,
        window,
        max_channels: config.max_channels,
        io_timeout: config.io_timeout,
        keepalive: config.keepalive,
    }
}

/// What a report says besides the endpoint's counters.
struct ReportContext<'a> {
    role: Role,
    streams: usize,
    started: Instant,
    codec: Codec,
    security: &'a Security,
    tls: Option<String>,
}

fn report(endpoint: &Endpoint, cx: ReportContext<'_>) -> TunnelReport {
    let counters = endpoint.shared.state.lock().counters();
    TunnelReport {
        role: match cx.role {
            Role::Source => "source",
            Role::Destination => "destination",
        },
        streams: cx.streams,
        codec: format!("{:?}", cx.codec),
        security: cx.security.mode(),
        tls_session: cx.tls,
        channels: counters.channels,
        resets: counters.resets,
        raw_bytes_sent: counters.raw_sent,
        raw_bytes_received: counters.raw_received,
        wire_bytes_sent: endpoint
            .shared
            .wire
            .sent
            .load(std::sync::atomic::Ordering::Relaxed),
        wire_bytes_received: endpoint
            .shared
            .wire
            .received
            .load(std::sync::atomic::Ordering::Relaxed),
        duration_ms: cx.started.elapsed().as_secs_f64() * 1e3,
    }
}

/// The source side: accepts the connections of `migrate tcp:ADDR` and carries them to the peer.
#[derive(Debug)]
pub struct SourceProxy {
    listener: TcpListener,
    peer: SocketAddr,
    security: Security,
    config: TunnelConfig,
}

impl SourceProxy {
    /// Binds the address QEMU will migrate to. Nothing is connected yet. `security` protects the
    /// tunnel's streams: a [`Psk`](dwcp_core::handshake::Psk) alone means TLS 1.3 keyed by it, and
    /// plain text takes an explicit [`Security::insecure_plaintext`]; the destination proxy must use
    /// the same mode.
    pub fn bind(
        listen: SocketAddr,
        peer: SocketAddr,
        security: impl Into<Security>,
        config: TunnelConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        let listener = TcpListener::bind(listen)
            .map_err(|e| Error::io(format!("listening for QEMU on {listen}"), e))?;
        Ok(Self {
            listener,
            peer,
            security: security.into(),
            config,
        })
    }

    /// The address QEMU must migrate to (`migrate tcp:HOST:PORT`).
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io("reading the QEMU listener's address", e))
    }

    /// Connects, secures and authenticates one stream; also returns how long the DWCP handshake took
    /// (two round trips).
    fn connect_stream(&self, session_id: u64, index: u16) -> Result<(Joined, Duration), Error> {
        // The destination proxy may start a moment after this one: retry while it refuses.
        let deadline = Instant::now() + self.config.connect_timeout;
        let socket = loop {
            match dwcp_tcp::connect(self.peer, &self.config.socket, self.config.connect_timeout) {
                Ok((s, _)) => break s,
                Err(Error::Io { source, .. })
                    if source.kind() == ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        // The TLS handshake within the same deadline as connecting.
        secure::connect(
            socket,
            self.peer,
            &self.security,
            deadline,
            self.config.connect_timeout,
            session_id,
            index,
        )
    }

    /// Sets the tunnel up (every stream connected and authenticated), then carries one migration:
    /// it returns once QEMU's connections have all closed and the tunnel was closed in order, or on
    /// the first failure (after tearing every connection down).
    pub fn run(self) -> Result<TunnelReport, Error> {
        let started = Instant::now();
        let cfg = &self.config;
        let (first, handshake) = self.connect_stream(0, 0)?;
        let Joined {
            stream: mut first,
            negotiated,
            tls,
        } = first;
        let stream_count = streams_for(
            path_rtt(first.2.as_ref(), handshake / 2),
            cfg.streams,
            cfg.local_streams,
        );
        let init = Message::Init(TunnelInit {
            version: TUNNEL_VERSION,
            streams: stream_count,
            window: cfg.window,
        });
        let asked = Instant::now();
        first.1.write_frame(FrameType::TunnelInit, &init.encode())?;
        let mut buf = Vec::new();
        let window = match read_message(&mut first.0, &mut buf)? {
            Message::Ready(TunnelReady { window })
                if (MAX_SEGMENT as u32..=cfg.window).contains(&window) =>
            {
                window
            }
            other => {
                let e = Error::Protocol(format!("bad answer to TunnelInit: {other:?}"));
                send_error(&mut first.1, &e);
                return Err(e);
            }
        };
        // One round trip, with next to no work on the other side.
        let rtt = path_rtt(first.2.as_ref(), asked.elapsed());
        let send_window = send_window_for(rtt);
        let session = negotiated.session_id;
        let mut streams = vec![first];
        // The other streams join in parallel: on a long path each costs four round trips (TCP, TLS,
        // two for the DWCP handshake).
        let this = &self;
        let joined: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (1..stream_count)
                .map(|i| scope.spawn(move || this.connect_stream(session, i)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Protocol("join thread panicked".into())))
                })
                .collect()
        });
        for j in joined {
            streams.push(j?.0.stream);
        }
        tracing::info!(peer = %self.peer, streams = streams.len(), window, send_window, rtt_us = rtt.as_micros() as u64, security = %self.security.mode(), tls = tls.as_deref().unwrap_or("none"), "QEMU tunnel up");
        // On a local path the link is not what limits QEMU, the CPU is, and the compressor takes it
        // from the QEMUs (measured: QEMU's plain migration through the tunnel on loopback, 3 rounds,
        // 485 ms raw against 626 ms with LZ4).
        let codec = if rtt < LOCAL_RTT {
            cfg.local_codec
        } else {
            cfg.codec
        };
        let endpoint = Endpoint::start(settings(Role::Source, cfg, codec, window.into()), streams);
        endpoint.shared.state.lock().set_send_window(send_window);
        let outcome = self.serve(&endpoint);
        let report = report(
            &endpoint,
            ReportContext {
                role: Role::Source,
                streams: stream_count.into(),
                started,
                codec,
                security: &self.security,
                tls,
            },
        );
        match outcome {
            Ok(()) => {
                endpoint.close(cfg.io_timeout)?;
                Ok(report)
            }
            Err(e) => Err(endpoint.abort(e)),
        }
    }

    fn serve(&self, endpoint: &Endpoint) -> Result<(), Error> {
        // QEMU's connections are accepted on a thread of their own, so that this one sleeps until a
        // connection or a notice arrives: polling both every millisecond took about a quarter of the
        // source proxy's CPU, and woke it a thousand times a second on cores the QEMUs need.
        let listener = self
            .listener
            .try_clone()
            .map_err(|e| Error::io("cloning the QEMU listener", e))?;
        let (tx, accepted) = bounded(1);
        let acceptor = std::thread::Builder::new()
            .name("qemu-accept".into())
            .spawn(move || {
                loop {
                    match listener.accept() {
                        Ok(pair) => {
                            if tx.send(Ok(pair)).is_err() {
                                return;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        // Also how it ends: shutting the listener down below fails a blocked
                        // accept(), and the receiver is gone by then.
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
            })
            .map_err(|e| Error::io("spawning the QEMU acceptor", e))?;
        let result = self.serve_channels(endpoint, &accepted);
        drop(accepted);
        // Linux wakes an accept() blocked on a listener that is shut down (it fails with EINVAL).
        // The proxy serves one migration, so the listener is not needed afterwards.
        let _ = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Both);
        let _ = acceptor.join();
        result
    }

    fn serve_channels(
        &self,
        endpoint: &Endpoint,
        accepted: &Receiver<std::io::Result<(TcpStream, SocketAddr)>>,
    ) -> Result<(), Error> {
        let cfg = &self.config;
        let first_deadline = Instant::now() + cfg.accept_timeout;
        let mut opened = 0u64;
        let mut live = 0u64;
        loop {
            if endpoint.shared.is_failed() {
                return Err(Error::Protocol("the tunnel failed".into()));
            }
            if opened > 0 && live == 0 {
                return Ok(());
            }
            if opened == 0 && Instant::now() >= first_deadline {
                return Err(Error::Timeout(format!(
                    "QEMU did not connect within {} s",
                    cfg.accept_timeout.as_secs()
                )));
            }
            select! {
                recv(endpoint.notices) -> notice => match notice {
                    Ok(Notice::ChannelDone(id)) => {
                        tracing::info!(channel = id, "QEMU channel finished");
                        live -= 1;
                    }
                    Ok(Notice::Failed) | Err(_) => {
                        return Err(Error::Protocol("the tunnel failed".into()));
                    }
                    Ok(Notice::StreamClosed(i)) => {
                        return Err(Error::Protocol(format!(
                            "the destination closed stream {i} while QEMU was migrating"
                        )));
                    }
                    Ok(Notice::Opened(_)) => {}
                },
                recv(accepted) -> connection => match connection {
                    Ok(Ok((socket, from))) => {
                        // A small receive buffer keeps QEMU's backlog in QEMU, where its own
                        // bandwidth estimate sees it, instead of in a socket buffer it cannot see.
                        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(QEMU_RECV_BUFFER);
                        let id = endpoint.shared.open_channel(socket)?;
                        tracing::info!(channel = id, %from, "QEMU connection accepted");
                        opened += 1;
                        live += 1;
                    }
                    Ok(Err(e)) => return Err(Error::io("accepting a QEMU connection", e)),
                    Err(_) => return Err(Error::Protocol("the QEMU acceptor ended".into())),
                },
                default(SERVE_TICK) => {}
            }
        }
    }
}

/// How long the source's main thread waits for a connection or a notice before it looks at the
/// session's state and its deadline again.
const SERVE_TICK: Duration = Duration::from_millis(100);

/// The destination side: accepts one tunnel and connects to the destination QEMU for every channel.
#[derive(Debug)]
pub struct DestinationProxy {
    listener: TcpListener,
    qemu: SocketAddr,
    security: Security,
    config: TunnelConfig,
}

impl DestinationProxy {
    /// Binds the address the source proxy connects to. `security` protects the tunnel's streams, as
    /// in [`SourceProxy::bind`]; a source in another mode is refused.
    pub fn bind(
        listen: SocketAddr,
        qemu: SocketAddr,
        security: impl Into<Security>,
        config: TunnelConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        let listener = dwcp_tcp::listen(listen, &config.socket)?;
        Ok(Self {
            listener,
            qemu,
            security: security.into(),
            config,
        })
    }

    /// The address the source proxy must connect to.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io("reading the tunnel listener's address", e))
    }

    fn accept_until(&self, deadline: Instant) -> Result<TcpStream, Error> {
        self.listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("polling the tunnel listener", e))?;
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)
                        .map_err(|e| Error::io("accepting a tunnel stream", e))?;
                    let _ = dwcp_tcp::apply(&s, &self.config.socket);
                    secure::set_timeouts(&s, self.config.connect_timeout);
                    return Ok(s);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(Error::Timeout("no tunnel stream arrived in time".into()));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(Error::io("accepting a tunnel stream", e)),
            }
        }
    }

    /// Accepts one tunnel (waiting at most `accept_timeout` for it), then carries its channels to the
    /// destination QEMU until the source closes the tunnel.
    pub fn run(self) -> Result<TunnelReport, Error> {
        let cfg = &self.config;
        let (first, (streams, window)) = self.accept_tunnel(Instant::now() + cfg.accept_timeout)?;
        let started = Instant::now();
        let session = first.negotiated.session_id;
        let tls = first.tls;
        let count = usize::from(streams);
        let mut slots: Vec<Option<Stream>> = (0..count).map(|_| None).collect();
        slots[0] = Some(first.stream);
        self.join_streams(session, &mut slots, Instant::now() + cfg.connect_timeout)?;
        let streams: Vec<Stream> = slots.into_iter().flatten().collect();
        if streams.len() != count {
            return Err(Error::Protocol("a tunnel stream is missing".into()));
        }
        tracing::info!(streams = count, window, security = %self.security.mode(), tls = tls.as_deref().unwrap_or("none"), "QEMU tunnel accepted");
        let endpoint = Endpoint::start(
            settings(Role::Destination, cfg, cfg.codec, window.into()),
            streams,
        );
        let outcome = self.serve(&endpoint, count);
        let report = report(
            &endpoint,
            ReportContext {
                role: Role::Destination,
                streams: count,
                started,
                codec: cfg.codec,
                security: &self.security,
                tls,
            },
        );
        match outcome {
            Ok(()) => {
                endpoint.close(cfg.io_timeout)?;
                Ok(report)
            }
            Err(e) => Err(endpoint.abort(e)),
        }
    }

    /// Accepts connections until one authenticates as stream 0 of a new tunnel and announces it;
    /// returns that stream and the tunnel's stream count and window. Strangers (failed handshakes)
    /// are dropped and the wait goes on until `deadline`; handshakes run on their own threads, so a
    /// stranger that never finishes one does not hold the source's stream up.
    fn accept_tunnel(&self, deadline: Instant) -> Result<(Joined, (u16, u32)), Error> {
        let cfg = &self.config;
        let mut handshakes = Handshakes::new(self.security.clone(), cfg.connect_timeout);
        let mut refused: Option<Error> = None;
        loop {
            let accepting = Instant::now() < deadline && handshakes.pending() < MAX_HANDSHAKES;
            // While accepting, the listener's poll is the wait.
            let wait = if accepting {
                Duration::ZERO
            } else {
                ACCEPT_POLL
            };
            if let Some(result) = handshakes.next(wait) {
                match result {
                    Ok(mut first) if first.negotiated.stream_index == 0 => {
                        let announced = self.announce(&mut first)?;
                        return Ok((first, announced));
                    }
                    Ok(mut other) => {
                        let e = Error::Protocol(format!(
                            "first stream has index {}",
                            other.negotiated.stream_index
                        ));
                        send_error(&mut other.stream.1, &e);
                        tracing::warn!(error = %e, "refused a tunnel connection");
                        refused = Some(e);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "refused a tunnel connection");
                        refused = Some(e);
                    }
                }
                continue;
            }
            if Instant::now() >= deadline {
                // A handshake under way when the wait ended may still finish (each is cut off at
                // its own deadline, within the connect timeout).
                if handshakes.pending() == 0 {
                    return Err(no_tunnel(refused));
                }
                continue;
            }
            if !accepting {
                continue;
            }
            match self.accept_until((Instant::now() + ACCEPT_POLL).min(deadline)) {
                Ok(socket) => {
                    let session = new_session_id();
                    handshakes.start(socket, move |req| {
                        if req == 0 {
                            Ok(session)
                        } else {
                            Err(HandshakeError::UnknownSession(req).into())
                        }
                    })?;
                }
                Err(Error::Timeout(_)) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads the tunnel's announcement on its authenticated first stream and answers it; returns the
    /// stream count and the window.
    fn announce(&self, first: &mut Joined) -> Result<(u16, u32), Error> {
        let (r, w, _) = &mut first.stream;
        let mut buf = Vec::new();
        let init = match read_message(r, &mut buf) {
            Ok(Message::Init(i)) => i,
            Ok(other) => {
                let e = Error::Protocol(format!("expected TunnelInit, got {other:?}"));
                send_error(w, &e);
                return Err(e);
            }
            Err(e) => {
                send_error(w, &e);
                return Err(e);
            }
        };
        if init.version != TUNNEL_VERSION || !(1..=MAX_STREAMS).contains(&init.streams) {
            let e = Error::Protocol(format!(
                "tunnel version {} with {} streams (this build: version {TUNNEL_VERSION}, 1..={MAX_STREAMS} streams)",
                init.version, init.streams
            ));
            send_error(w, &e);
            return Err(e);
        }
        let window = init.window.clamp(MAX_SEGMENT as u32, self.config.window);
        w.write_frame(
            FrameType::TunnelReady,
            &Message::Ready(TunnelReady { window }).encode(),
        )?;
        Ok((init.streams, window))
    }

    /// Accepts streams 1..N; each handshake runs on its own thread so a silent stranger cannot hold
    /// the real streams up.
    fn join_streams(
        &self,
        session: u64,
        slots: &mut [Option<Stream>],
        deadline: Instant,
    ) -> Result<(), Error> {
        let mut handshakes = Handshakes::new(self.security.clone(), self.config.connect_timeout);
        let mut missing = slots.len() - 1;
        let mut attempts = 0;
        let max_attempts = 4 * slots.len() + 16;
        while missing > 0 {
            while let Some(joined) = handshakes.next(Duration::ZERO) {
                match joined {
                    Ok(j) => {
                        let idx = usize::from(j.negotiated.stream_index);
                        if idx == 0 || idx >= slots.len() || slots[idx].is_some() {
                            return Err(Error::Protocol(format!(
                                "stream index {idx} is invalid or taken"
                            )));
                        }
                        slots[idx] = Some(j.stream);
                        missing -= 1;
                    }
                    Err(e) => tracing::warn!(error = %e, "refused a tunnel connection"),
                }
            }
            if missing == 0 {
                break;
            }
            match self.accept_until((Instant::now() + ACCEPT_POLL).min(deadline)) {
                Ok(socket) => {
                    attempts += 1;
                    if attempts > max_attempts {
                        return Err(Error::Protocol(
                            "too many failed attempts to join the tunnel".into(),
                        ));
                    }
                    handshakes.start(socket, move |req| {
                        if req == session {
                            Ok(session)
                        } else {
                            Err(HandshakeError::UnknownSession(req).into())
                        }
                    })?;
                }
                Err(Error::Timeout(_)) if Instant::now() < deadline => {}
                Err(Error::Timeout(_)) => {
                    return Err(Error::Timeout(format!(
                        "{missing} tunnel streams did not join in time"
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn serve(&self, endpoint: &Endpoint, streams: usize) -> Result<(), Error> {
        let cfg = &self.config;
        let mut pending = BTreeSet::new();
        let mut next = 0u32;
        let mut waiting_since: Option<Instant> = None;
        let mut live = 0usize;
        let mut closed = 0usize;
        loop {
            let notice = match endpoint.notices.recv_timeout(Duration::from_millis(200)) {
                Ok(n) => Some(n),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Protocol("tunnel gone".into()));
                }
            };
            match notice {
                Some(Notice::Opened(id)) => {
                    pending.insert(id);
                    live += 1;
                }
                Some(Notice::ChannelDone(id)) => {
                    tracing::info!(channel = id, "QEMU channel finished");
                    live -= 1;
                }
                Some(Notice::StreamClosed(_)) => closed += 1,
                Some(Notice::Failed) => return Err(Error::Protocol("the tunnel failed".into())),
                None => {}
            }
            if endpoint.shared.is_failed() {
                return Err(Error::Protocol("the tunnel failed".into()));
            }
            // Connect in channel order: QEMU takes its first connection as the main channel.
            while pending.remove(&next) {
                let id = next;
                next += 1;
                waiting_since = None;
                match connect_qemu(self.qemu, cfg.connect_timeout) {
                    Ok(socket) => {
                        tracing::info!(channel = id, qemu = %self.qemu, "connected to the destination QEMU");
                        endpoint.shared.start_pumps(id, socket)?;
                    }
                    Err(e) => endpoint.shared.refuse_channel(id, &e.to_string()),
                }
            }
            if !pending.is_empty() {
                let since = *waiting_since.get_or_insert_with(Instant::now);
                if since.elapsed() > cfg.io_timeout {
                    return Err(Error::Protocol(format!(
                        "channel {next} never opened, though later channels did"
                    )));
                }
            }
            if closed == streams && live == 0 {
                return Ok(());
            }
        }
    }
}

/// Why no tunnel arrived in time. A source in the other security mode is named as such: a peer that
/// speaks DWCP, or TLS, to the wrong mode is almost certainly the misconfigured source proxy. Other
/// refusals (a scanner, a wrong key) only add their reason to the time-out.
fn no_tunnel(refused: Option<Error>) -> Error {
    match refused {
        Some(e) if matches!(e.security(), Some(SecurityError::ModeMismatch { .. })) => e,
        Some(e) => Error::Timeout(format!(
            "no tunnel arrived in time (the last attempt was refused: {e})"
        )),
        None => Error::Timeout("no tunnel stream arrived in time".into()),
    }
}

/// The path's round trip: the kernel's minimum RTT of the stream's TCP connection where it has one,
/// else `measured` (a round trip timed in user space). A user-space timing also counts the time both
/// proxies' threads waited for a CPU: with two TCG QEMUs busy on two cores, a loopback round trip
/// was timed at 4.4 ms, which made the tunnel take loopback for a remote path and compress.
fn path_rtt(conn: &dyn Conn, measured: Duration) -> Duration {
    conn.as_tcp()
        .and_then(|tcp| dwcp_tcp::telemetry::sample(tcp).ok())
        .filter(|s| s.min_rtt_s > 0.0)
        .map_or(measured, |s| {
            Duration::from_secs_f64(s.min_rtt_s).min(measured)
        })
}

/// Round trips below this are a local path (loopback, one switch), which one stream fills.
const LOCAL_RTT: Duration = Duration::from_millis(1);

/// Streams for a path of round trip `rtt`: the configured count, but at most `local` (default one) on
/// a local path, where more streams only add threads competing with QEMU for the CPU (the tunnel fails
/// with any of its streams, so more streams buy throughput, never resilience). Measured with QEMU
/// multifd 2 on loopback, medians of 3 rounds: 389 ms to the destination's RESUME with one stream
/// against 429 ms with two.
fn streams_for(rtt: Duration, configured: u16, local: u16) -> u16 {
    if rtt < LOCAL_RTT {
        configured.min(local.max(1))
    } else {
        configured
    }
}

/// Raw bytes per second one channel's send window is sized for: 2 Gbit/s of QEMU data, twice a
/// 1 Gbit/s link at the 2x compression QEMU's memory typically gets.
const WINDOW_RATE: f64 = 256e6;
/// Smallest send window: plenty for loopback and LAN round trips (the receiver acknowledges at least
/// every MiB). Every byte in flight when QEMU's source finishes is still to be carried before the
/// destination can resume: with 4 MiB per channel, QEMU multifd 2 on loopback took 460 ms to the
/// destination's RESUME (medians of 3 rounds), with 2 MiB 429 ms.
const MIN_SEND_WINDOW: u64 = 2 << 20;

/// The source's send window (raw bytes in flight per channel) for a path of round trip `rtt`: its
/// bandwidth-delay product at [`WINDOW_RATE`], at least [`MIN_SEND_WINDOW`].
fn send_window_for(rtt: Duration) -> u64 {
    ((rtt.as_secs_f64() * WINDOW_RATE) as u64).max(MIN_SEND_WINDOW)
}

/// Connects to the destination QEMU, retrying while it does not listen yet (`migrate-incoming` may
/// come a moment later), for at most `timeout`.
fn connect_qemu(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(Error::io(
                    format!("connecting to the destination QEMU at {addr}"),
                    e,
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_get_one_stream() {
        assert_eq!(streams_for(Duration::from_micros(80), 4, 1), 1);
        assert_eq!(streams_for(Duration::from_micros(80), 4, 3), 3);
        assert_eq!(streams_for(Duration::from_micros(80), 1, 4), 1);
        assert_eq!(streams_for(Duration::from_millis(50), 8, 1), 8);
    }

    #[test]
    fn the_send_window_follows_the_round_trip() {
        assert_eq!(send_window_for(Duration::from_micros(100)), MIN_SEND_WINDOW);
        assert_eq!(send_window_for(Duration::from_millis(50)), 12_800_000);
        assert_eq!(send_window_for(Duration::from_millis(150)), 38_400_000);
    }
}
