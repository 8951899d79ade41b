//! Opening and accepting the tunnel's streams: TCP, then the security layer (TLS 1.3 unless the
//! proxies were explicitly told otherwise), then the DWCP stream handshake inside it, keyed by the
//! key the security layer derived ([`dwcp_tls::Secured::handshake_key`]).
//!
//! The destination runs every accepted connection's handshakes on a thread of its own
//! ([`Handshakes`]) and cuts each off at its deadline, so a stranger that stays silent, trickles
//! bytes, or never finishes TLS holds one thread for a bounded time and never the acceptor.

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};

use dwcp_core::error::{Error, FrameError, SecurityError};
use dwcp_core::frame::{FrameReader, FrameWriter};
use dwcp_core::handshake::{Negotiated, Offer, client_handshake, send_error, server_handshake};
use dwcp_core::transport::Conn;
use dwcp_tls::Security;

use crate::endpoint::StreamReader;

/// Read buffer of each tunnel stream: it serves the frame headers and small frames. A payload
/// larger than it is read straight into the payload's buffer; a large read buffer would instead hold
/// most of each segment, which then took one more copy out of it (measured: 15 % of the destination
/// proxy's CPU with 256 KiB).
const READ_BUFFER: usize = 16 * 1024;

/// One tunnel stream: its reader, its writer, and a handle to shut it down with.
pub(crate) type Stream = (StreamReader, FrameWriter<Box<dyn Conn>>, Box<dyn Conn>);

/// A stream that passed both handshakes.
pub(crate) struct Joined {
    pub stream: Stream,
    pub negotiated: Negotiated,
    /// The negotiated TLS parameters; `None` in plain text.
    pub tls: Option<String>,
}

fn split(conn: Box<dyn Conn>) -> Result<Stream, Error> {
    let clone = || {
        conn.try_clone_conn()
            .map_err(|e| Error::io("cloning a tunnel stream", e))
    };
    let (r, w) = (clone()?, clone()?);
    Ok((
        FrameReader::new(BufReader::with_capacity(READ_BUFFER, r)),
        FrameWriter::new(w),
        conn,
    ))
}

pub(crate) fn set_timeouts(conn: &dyn Conn, t: Duration) {
    let _ = conn.set_read_timeout(Some(t));
    let _ = conn.set_write_timeout(Some(t));
}

/// Shuts a tunnel stream down through the TCP socket underneath. The tunnel's Close frame, inside
/// TLS, is the authenticated end of a stream; a TLS close_notify after it would be left unread by the
/// peer (whose close then resets the connection), and, sent by a thread other than the stream's
/// writer, could block on a full send buffer instead of waking the stream's threads at once.
pub(crate) fn cut(conn: &dyn Conn, how: Shutdown) {
    let _ = match conn.as_tcp() {
        Some(tcp) => tcp.shutdown(how),
        None => conn.shutdown(how),
    };
}

/// A plain-text endpoint sees a TLS peer only as a frame with a bad magic number: name the mismatch.
fn name_mismatch(e: Error, peer: &str, security: &Security) -> Error {
    match e {
        Error::Frame(FrameError::BadMagic(m))
            if !security.mode().is_encrypted() && dwcp_tls::looks_like_tls(&m.to_be_bytes()) =>
        {
            SecurityError::ModeMismatch {
                peer: peer.to_string(),
                theirs: "TLS",
                ours: "plain-text DWCP (--insecure-plaintext)",
            }
            .into()
        }
        e => e,
    }
}

/// Secures `socket` (connected to `peer`) by `deadline`, then runs the client handshake for stream
/// `index` of `session_id` with per-read limits of `timeout`. Also returns how long the DWCP
/// handshake alone took: two round trips.
pub(crate) fn connect(
    socket: TcpStream,
    peer: SocketAddr,
    security: &Security,
    deadline: Instant,
    timeout: Duration,
    session_id: u64,
    index: u16,
) -> Result<(Joined, Duration), Error> {
    let secured = security.connect(Box::new(socket), peer, deadline)?;
    set_timeouts(&*secured.conn, timeout);
    let (mut r, mut w, conn) = split(secured.conn)?;
    let started = Instant::now();
    let negotiated = client_handshake(
        &mut r,
        &mut w,
        &secured.handshake_key,
        Offer::default(),
        session_id,
        index,
    )
    .map_err(|e| name_mismatch(e, &peer.to_string(), security))?;
    Ok((
        Joined {
            stream: (r, w, conn),
            negotiated,
            tls: secured.session,
        },
        started.elapsed(),
    ))
}

/// Secures an accepted connection by `deadline`, then runs the server handshake (per-read limits of
/// `timeout`); `assign` maps the session the peer asks for to the one it joins, or refuses it.
fn accept(
    socket: TcpStream,
    security: &Security,
    deadline: Instant,
    timeout: Duration,
    assign: impl FnOnce(u64) -> Result<u64, Error>,
) -> Result<Joined, Error> {
    let peer = socket
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "a peer".into());
    // A plain-text source reads DWCP frames, not TLS alerts: only a frame can tell it why.
    let raw = if security.mode().is_encrypted() {
        socket.try_clone().ok()
    } else {
        None
    };
    let secured = match security.accept(Box::new(socket), deadline) {
        Ok(s) => s,
        Err(e) => {
            let mismatch = matches!(e.security(), Some(SecurityError::ModeMismatch { .. }));
            if let (true, Some(raw)) = (mismatch, raw) {
                send_error(&mut FrameWriter::new(raw), &e);
            }
            return Err(e);
        }
    };
    drop(raw);
    set_timeouts(&*secured.conn, timeout);
    let (mut r, mut w, conn) = split(secured.conn)?;
    let negotiated = server_handshake(
        &mut r,
        &mut w,
        &secured.handshake_key,
        Offer::default(),
        assign,
    )
    .map_err(|e| name_mismatch(e, &peer, security))?;
    Ok(Joined {
        stream: (r, w, conn),
        negotiated,
        tls: secured.session,
    })
}

/// A handshake in progress: when it must be over, and a handle to cut it off with.
struct Pending {
    deadline: Instant,
    socket: Option<TcpStream>,
}

/// The handshakes of accepted connections, each on its own thread and each cut off (its socket shut
/// down, which fails whatever read or write it is blocked in) once `timeout` has passed since it was
/// accepted. Dropping this cuts off those still running.
pub(crate) struct Handshakes {
    security: Security,
    timeout: Duration,
    tx: Sender<(u64, Result<Joined, Error>)>,
    rx: Receiver<(u64, Result<Joined, Error>)>,
    pending: HashMap<u64, Pending>,
    next_id: u64,
}

impl Handshakes {
    pub fn new(security: Security, timeout: Duration) -> Self {
        let (tx, rx) = unbounded();
        Self {
            security,
            timeout,
            tx,
            rx,
            pending: HashMap::new(),
            next_id: 0,
        }
    }

    /// Handshakes still running.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Starts the handshakes of `socket` on a thread of their own.
    pub fn start(
        &mut self,
        socket: TcpStream,
        assign: impl FnOnce(u64) -> Result<u64, Error> + Send + 'static,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + self.timeout;
        let watch = socket
            .try_clone()
            .map_err(|e| Error::io("cloning a tunnel socket", e))?;
        let id = self.next_id;
        self.next_id += 1;
        let (tx, security, timeout) = (self.tx.clone(), self.security.clone(), self.timeout);
        std::thread::Builder::new()
            .name("tunnel-handshake".into())
            .spawn(move || {
                let _ = tx.send((id, accept(socket, &security, deadline, timeout, assign)));
            })
            .map_err(|e| Error::io("spawning a handshake thread", e))?;
        self.pending.insert(
            id,
            Pending {
                deadline,
                socket: Some(watch),
            },
        );
        Ok(())
    }

    /// The next finished handshake, waiting at most `wait` for one; cuts off the overdue ones first.
    pub fn next(&mut self, wait: Duration) -> Option<Result<Joined, Error>> {
        if let Ok((id, result)) = self.rx.try_recv() {
            self.pending.remove(&id);
            return Some(result);
        }
        let now = Instant::now();
        for p in self.pending.values_mut() {
            if p.deadline <= now
                && let Some(s) = p.socket.take()
            {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        let (id, result) = self.rx.recv_timeout(wait).ok()?;
        self.pending.remove(&id);
        Some(result)
    }
}

impl Drop for Handshakes {
    fn drop(&mut self) {
        for p in self.pending.values_mut() {
            if let Some(s) = p.socket.take() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}
