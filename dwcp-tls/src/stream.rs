//! A TLS session over any [`Conn`], usable by one reading and one writing thread at once.
//!
//! rustls keeps one state object per session; the engine reads a stream on one thread while another
//! writes it. Both go through the same [`rustls::Connection`] behind a mutex, but no thread holds it
//! while it waits for the network: the reader fills its own buffer from the transport first and only
//! then decrypts under the lock, and the writer encrypts under the lock into its own buffer and writes
//! that to the transport afterwards. A second lock orders whole writes, so records leave in the order
//! they were sealed (TLS sequence numbers are implicit).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dwcp_core::error::SecurityError;
use dwcp_core::transport::Conn;
use parking_lot::Mutex;

/// Raw bytes read from the transport per system call.
const READ_CHUNK: usize = 64 << 10;
/// Plaintext rustls may hold sealed but not yet written; a larger write is sealed in parts.
const SEAL_LIMIT: usize = 4 << 20;

#[derive(Debug)]
struct Shared {
    tls: Mutex<rustls::Connection>,
    /// Held for the whole of one write: sealing and sending happen in the same order.
    send: Mutex<Vec<u8>>,
    /// The reader's raw bytes not yet given to rustls.
    recv: Mutex<RecvBuffer>,
    peer: String,
    suite: String,
}

#[derive(Debug)]
struct RecvBuffer {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// One handle to a TLS session; [`Conn::try_clone_conn`] gives more handles to the same session.
#[derive(Debug)]
pub struct TlsConn {
    shared: Arc<Shared>,
    raw: Box<dyn Conn>,
}

impl TlsConn {
    /// Wraps a session whose handshake has completed over `raw`.
    pub(crate) fn new(mut tls: rustls::Connection, raw: Box<dyn Conn>, peer: String) -> Self {
        tls.set_buffer_limit(Some(SEAL_LIMIT));
        let suite = describe_session(&tls);
        Self {
            shared: Arc::new(Shared {
                tls: Mutex::new(tls),
                send: Mutex::new(Vec::new()),
                recv: Mutex::new(RecvBuffer {
                    buf: vec![0; READ_CHUNK].into_boxed_slice(),
                    start: 0,
                    end: 0,
                }),
                peer,
                suite,
            }),
            raw,
        }
    }

    /// The negotiated protocol, cipher suite and key exchange, e.g.
    /// `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519MLKEM768`.
    pub fn session_description(&self) -> &str {
        &self.shared.suite
    }
}

/// Sends whatever rustls has queued (an alert, a key update) if no write is in progress; a write in
/// progress sends it itself when it drains the queue.
fn flush_queued(shared: &Shared, raw: &mut dyn Conn, tls: &mut rustls::Connection) {
    if !tls.wants_write() {
        return;
    }
    if let Some(mut out) = shared.send.try_lock() {
        out.clear();
        while tls.wants_write() {
            if tls.write_tls(&mut *out).is_err() {
                break;
            }
        }
        let _ = raw.write_all(&out);
    }
}

impl TlsConn {
    fn seal_and_send(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut out = self.shared.send.lock();
        out.clear();
        let accepted = {
            let mut tls = self.shared.tls.lock();
            let n = tls.writer().write_vectored(bufs)?;
            // What the kernel takes without waiting goes straight from rustls' records to the
            // socket (one copy fewer); only the rest is copied out to be sent without the lock.
            if let Some(tcp) = self.raw.as_tcp() {
                let mut direct = NonBlockingSend(tcp);
                while tls.wants_write() {
                    match tls.write_tls(&mut direct) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            while tls.wants_write() {
                tls.write_tls(&mut *out)?;
            }
            n
        };
        if !out.is_empty() {
            self.raw.write_all(&out)?;
        }
        Ok(accepted)
    }
}

/// Writes to a TCP socket without waiting: a full send buffer is `WouldBlock`, not a block.
struct NonBlockingSend<'a>(&'a std::net::TcpStream);

impl Write for NonBlockingSend<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        socket2::SockRef::from(self.0).send_with_flags(buf, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        socket2::SockRef::from(self.0)
            .send_vectored_with_flags(bufs, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A failed record as the `io::Error` a reader sees; [`dwcp_core::error::Error::security`] finds the
/// [`SecurityError`] inside it.
fn record_error(peer: &str, e: rustls::Error) -> io::Error {
    let error = match e {
        rustls::Error::AlertReceived(alert) => SecurityError::Handshake {
            peer: peer.to_string(),
            reason: format!("the peer ended the session with the alert {alert:?}"),
        },
        other => SecurityError::Integrity {
            peer: peer.to_string(),
            reason: other.to_string(),
        },
    };
    io::Error::new(io::ErrorKind::InvalidData, error)
}

pub(crate) fn describe_session(tls: &rustls::Connection) -> String {
    let version = tls
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_else(|| "TLS".into());
    let suite = tls
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    let group = tls
        .negotiated_key_exchange_group()
        .map(|g| format!("{:?}", g.name()))
        .unwrap_or_default();
    format!("{version} {suite} {group}").trim().to_string()
}

impl Read for TlsConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut recv = self.shared.recv.lock();
        loop {
            {
                let mut tls = self.shared.tls.lock();
                match tls.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if recv.start < recv.end {
                    let RecvBuffer {
                        buf: raw,
                        start,
                        end,
                    } = &mut *recv;
                    let mut pending = &raw[*start..*end];
                    let fed = tls.read_tls(&mut pending)?;
                    *start += fed;
                    if let Err(e) = tls.process_new_packets() {
                        flush_queued(&self.shared, &mut *self.raw, &mut tls);
                        return Err(record_error(&self.shared.peer, e));
                    }
                    flush_queued(&self.shared, &mut *self.raw, &mut tls);
                    continue;
                }
            }
            // Nothing decrypted and nothing buffered: wait for the network without the session lock.
            let RecvBuffer {
                buf: raw,
                start,
                end,
            } = &mut *recv;
            let n = self.raw.read(raw)?;
            *start = 0;
            *end = n;
            if n == 0 {
                let mut tls = self.shared.tls.lock();
                let _ = tls.read_tls(&mut &[][..]);
                if let Err(e) = tls.process_new_packets() {
                    return Err(record_error(&self.shared.peer, e));
                }
                return match tls.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    }
                    Err(e) => Err(e),
                };
            }
        }
    }
}

impl Write for TlsConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.seal_and_send(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.seal_and_send(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.raw.flush()
    }
}

impl Conn for TlsConn {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(TlsConn {
            shared: Arc::clone(&self.shared),
            raw: self.raw.try_clone_conn()?,
        }))
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            if let (Some(mut tls), Ok(mut raw)) =
                (self.shared.tls.try_lock(), self.raw.try_clone_conn())
            {
                tls.send_close_notify();
                flush_queued(&self.shared, &mut *raw, &mut tls);
            }
        }
        self.raw.shutdown(how)
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.raw.set_read_timeout(timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.raw.set_write_timeout(timeout)
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.raw.peer_addr()
    }

    fn transport(&self) -> &'static str {
        self.raw.transport()
    }

    fn as_tcp(&self) -> Option<&std::net::TcpStream> {
        self.raw.as_tcp()
    }
}
