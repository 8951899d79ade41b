//! Socket options per transport mode.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use dwcp_core::error::Error;

/// Socket options applied to every stream of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketProfile {
    /// Disable Nagle's algorithm (frames are already large or latency-critical).
    pub nodelay: bool,
    /// Send and receive buffer size to request, if any.
    pub buffer_bytes: Option<usize>,
    /// Congestion control to request (for example `bbr`); the kernel default is kept, with a warning,
    /// when it is not available.
    pub congestion: Option<String>,
    /// `TCP_NOTSENT_LOWAT`: bytes written but not yet sent that the kernel holds before it blocks the
    /// writer. Short send queues keep scheduling decisions fresh (a chunk goes to the stream that can
    /// send it now) and bound what a lost stream strands.
    pub notsent_lowat: Option<u32>,
    /// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged before the kernel declares the
    /// connection dead (a peer that vanished without a reset).
    pub user_timeout: Option<Duration>,
}

/// Largest socket buffer any profile requests.
pub const MAX_BUFFER_BYTES: usize = 64 << 20;

impl SocketProfile {
    /// Datacenter mode: no Nagle, 4 MiB buffers, BBR where available, no send-queue limit (round trips
    /// are short, so the kernel's queue drains quickly).
    pub fn datacenter() -> Self {
        Self {
            nodelay: true,
            buffer_bytes: Some(4 << 20),
            congestion: Some("bbr".into()),
            notsent_lowat: None,
            user_timeout: None,
        }
    }

    /// Internet mode for a path of `bandwidth_bps` bytes/s and `rtt` round trip: BBR (it keeps its rate
    /// through random loss where CUBIC halves it), buffers of twice the bandwidth-delay product (at least
    /// 4 MiB, at most [`MAX_BUFFER_BYTES`]) so one stream can fill the pipe, a short unsent queue, and a
    /// user timeout so a vanished peer is detected.
    pub fn internet(bandwidth_bps: f64, rtt: Duration, user_timeout: Duration) -> Self {
        let bdp = (bandwidth_bps * rtt.as_secs_f64()).max(0.0) as usize;
        Self {
            nodelay: true,
            buffer_bytes: Some((2 * bdp).clamp(4 << 20, MAX_BUFFER_BYTES)),
            congestion: Some("bbr".into()),
            notsent_lowat: Some(256 << 10),
            user_timeout: Some(user_timeout),
        }
    }
}

impl Default for SocketProfile {
    fn default() -> Self {
        Self::datacenter()
    }
}

/// What a socket actually got after [`apply`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AppliedProfile {
    /// Congestion control in use.
    pub congestion: String,
    /// Send buffer size the kernel granted.
    pub send_buffer: usize,
}

/// Applies `profile` to a connected stream. Failing to get the requested congestion control is not an
/// error: the kernel default stays, and a warning names it.
pub fn apply(stream: &TcpStream, profile: &SocketProfile) -> Result<AppliedProfile, Error> {
    let s = SockRef::from(stream);
    let io = |what: &str, e| Error::io(format!("setting {what} on a stream socket"), e);
    s.set_tcp_nodelay(profile.nodelay)
        .map_err(|e| io("TCP_NODELAY", e))?;
    if let Some(b) = profile.buffer_bytes {
        s.set_send_buffer_size(b).map_err(|e| io("SO_SNDBUF", e))?;
        s.set_recv_buffer_size(b).map_err(|e| io("SO_RCVBUF", e))?;
    }
    if let Some(lowat) = profile.notsent_lowat {
        s.set_tcp_notsent_lowat(lowat)
            .map_err(|e| io("TCP_NOTSENT_LOWAT", e))?;
    }
    if let Some(t) = profile.user_timeout {
        s.set_tcp_user_timeout(Some(t))
            .map_err(|e| io("TCP_USER_TIMEOUT", e))?;
    }
    if let Some(cc) = &profile.congestion {
        if let Err(e) = s.set_tcp_congestion(cc.as_bytes()) {
            tracing::warn!(requested = %cc, error = %e, "congestion control not available; keeping the kernel default");
        }
    }
    let congestion = s
        .tcp_congestion()
        .map(|v| {
            String::from_utf8_lossy(&v)
                .trim_end_matches('\0')
                .to_string()
        })
        .unwrap_or_else(|_| "unknown".into());
    let send_buffer = s.send_buffer_size().unwrap_or(0);
    Ok(AppliedProfile {
        congestion,
        send_buffer,
    })
}

/// Connects to `addr` within `timeout` and applies `profile`.
pub fn connect(
    addr: SocketAddr,
    profile: &SocketProfile,
    timeout: Duration,
) -> Result<(TcpStream, AppliedProfile), Error> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| Error::io("creating a socket", e))?;
    // Buffers must be sized before the handshake for the window scale to allow them.
    if let Some(b) = profile.buffer_bytes {
        let _ = socket.set_send_buffer_size(b);
        let _ = socket.set_recv_buffer_size(b);
    }
    socket
        .connect_timeout(&addr.into(), timeout)
        .map_err(|e| Error::io(format!("connecting to {addr}"), e))?;
    let stream: TcpStream = socket.into();
    let applied = apply(&stream, profile)?;
    Ok((stream, applied))
}

/// Binds a listening socket on `addr` with address reuse, sized for `profile`'s buffers.
pub fn listen(addr: SocketAddr, profile: &SocketProfile) -> Result<TcpListener, Error> {
    let ctx = || format!("listening on {addr}");
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| Error::io(ctx(), e))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| Error::io(ctx(), e))?;
    if let Some(b) = profile.buffer_bytes {
        let _ = socket.set_recv_buffer_size(b);
        let _ = socket.set_send_buffer_size(b);
    }
    socket.bind(&addr.into()).map_err(|e| Error::io(ctx(), e))?;
    socket
        .listen(LISTEN_BACKLOG)
        .map_err(|e| Error::io(ctx(), e))?;
    Ok(socket.into())
}

/// Connections the kernel queues before the listener accepts them (capped by `net.core.somaxconn`).
/// A destination receiving many migrations at once sees every source open all its streams together
/// (100 sessions of 4 streams: 400 at once); when the queue is full the kernel drops the handshake's
/// last ACK, the source believes it is connected and waits for an answer until it times out.
pub const LISTEN_BACKLOG: i32 = 1024;
