//! The agents' RPC: length-prefixed postcard frames over TLS 1.3 on TCP, opened by a mutual
//! HMAC-SHA256 challenge-response inside the TLS session, then multiplexed (each request carries
//! an id its answer echoes, so one connection per peer carries many calls at once).
//!
//! ```text
//! client                                           server
//! ══ TLS 1.3 handshake (rustls) ══════════════════════  both within HANDSHAKE_TIMEOUT
//! ┌─ inside the TLS session ───────────────────────────────────────────────────┐
//! │ Hello { magic, version, from, to, Nc }    ─►  from must be a configured peer, to = us
//! │                                           ◄─  Challenge { Ns, MACs }
//! │ Proof { MACc }                            ─►
//! │                                           ◄─  Welcome
//! │ request/answer frames …                   ◄─►
//! └────────────────────────────────────────────────────────────────────────────┘
//! exporter   = TLS-Exporter(Security::exporter_label(), no context, 32 bytes)
//! key        = security.handshake_key(exporter)   (PSK mode: Psk::bound_to_channel(exporter))
//! transcript = magic ‖ version ‖ from ‖ to ‖ Nc ‖ Ns
//! MACs = HMAC-SHA256(key, "dwcp-acp server" ‖ transcript)
//! MACc = HMAC-SHA256(key, "dwcp-acp client" ‖ transcript)
//! ```
//! The key is bound to the TLS session: a man in the middle who terminates TLS towards each side
//! holds two sessions with two exporter values, so neither side's proof verifies on the other
//! and relaying the exchange fails. In certificate mode the peers are authenticated by their
//! certificates (one CA) and the key is the exporter value alone; in the explicit
//! `insecure-plaintext` mode there is no TLS and the key is the cluster key itself.
//! Both nonces are fresh per connection, so a recorded exchange cannot be replayed; the distinct
//! labels stop one side's proof being reflected as the other's; the claimed ids are inside the
//! transcript, so a peer cannot authenticate as one node and then be taken for another. Until the
//! proofs are checked frames are at most [`MAX_HANDSHAKE_FRAME`] bytes; after, [`MAX_FRAME`].
//! A length over the limit is refused (and logged) before anything is allocated for it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dwcp_core::handshake::Psk;
use dwcp_tls::Security;
use hmac::{Hmac, Mac};
use parking_lot::{Mutex, RwLock};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::rustls::ConnectionCommon;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, warn};

use super::wire::{Envelope, Request, Response};
use crate::NodeId;

/// Largest frame after authentication. AppendEntries stay under it because entries are capped
/// in bytes (the batcher) and in count per message (`max_payload_entries`); a larger message is
/// reported to openraft as too large so that it sends fewer entries.
pub(crate) const MAX_FRAME: usize = 16 << 20;
/// Largest frame before the peer has proven the key: nothing big is read from a stranger.
pub(crate) const MAX_HANDSHAKE_FRAME: usize = 256;
/// How long a connection may take to authenticate, its TLS handshake included.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections allowed to be authenticating (TLS handshake or HMAC exchange) at once: strangers
/// cannot hold more than this many sockets and tasks (each for at most [`HANDSHAKE_TIMEOUT`]).
const MAX_HANDSHAKES: usize = 64;
/// How long sent data may stay unacknowledged before the kernel gives up on a connection
/// (`TCP_USER_TIMEOUT`). Without it a connection across a partition stays open with its
/// retransmission backoff growing, and after the heal nothing gets through until the next
/// retransmission fires: recovery took about as long as the partition had lasted.
const USER_TIMEOUT: Duration = Duration::from_secs(3);
/// Frames queued for one connection's writer.
const MAX_IN_FLIGHT: usize = 512;
/// Bytes of requests one connection may have in progress on the server, in KiB (each request
/// costs 1 + its size in KiB): 64 MiB. The reader stops reading beyond that, so a peer that
/// floods requests is slowed down by TCP rather than growing this node's memory.
const IN_FLIGHT_KIB: usize = 64 << 10;

const MAGIC: [u8; 4] = *b"DACP";
const VERSION: u16 = 1;
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
const SERVER_LABEL: &[u8] = b"dwcp-acp server";
const CLIENT_LABEL: &[u8] = b"dwcp-acp client";

/// Why a connection or a frame was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RpcError {
    #[error("connection closed")]
    Closed,
    #[error("truncated frame: {got} of {expected} bytes before the stream ended")]
    Truncated { expected: usize, got: usize },
    #[error("frame of {len} bytes is over the limit of {max}")]
    Oversize { len: usize, max: usize },
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("node {0} is not in the configuration")]
    UnknownPeer(NodeId),
    #[error("refused by the peer: {0}")]
    Refused(String),
    /// The TLS handshake failed, or the session gave no key (a plain-text peer, a certificate
    /// of another CA, an alert).
    #[error("TLS ({mode}): {why}")]
    Tls { mode: &'static str, why: String },
}

/// Reads one frame of at most `max` bytes.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Vec<u8>, RpcError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        let n = reader.read(&mut header[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                RpcError::Closed
            } else {
                RpcError::Truncated { expected: 4, got }
            });
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(RpcError::Oversize { len, max });
    }
    let mut payload = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = reader.read(&mut payload[got..]).await?;
        if n == 0 {
            return Err(RpcError::Truncated { expected: len, got });
        }
        got += n;
    }
    Ok(payload)
}

/// Writes one frame (not flushed).
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    payload: &[u8],
    max: usize,
) -> Result<(), RpcError> {
    if payload.len() > max {
        return Err(RpcError::Oversize {
            len: payload.len(),
            max,
        });
    }
    writer
        .write_all(&(payload.len() as u32).to_be_bytes())
        .await?;
    writer.write_all(payload).await?;
    Ok(())
}

pub(crate) fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, RpcError> {
    postcard::from_bytes(bytes).map_err(|e| RpcError::Malformed {
        what,
        why: e.to_string(),
    })
}

pub(crate) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, RpcError> {
    postcard::to_allocvec(value).map_err(|e| RpcError::Malformed {
        what,
        why: e.to_string(),
    })
}

async fn send<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    what: &'static str,
    value: &T,
) -> Result<(), RpcError> {
    write_frame(w, &encode(what, value)?, MAX_HANDSHAKE_FRAME).await?;
    w.flush().await?;
    Ok(())
}

async fn recv<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    what: &'static str,
) -> Result<T, RpcError> {
    decode(what, &read_frame(r, MAX_HANDSHAKE_FRAME).await?)
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    magic: [u8; 4],
    version: u16,
    from: NodeId,
    to: NodeId,
    nonce: [u8; NONCE_LEN],
}

#[derive(Debug, Serialize, Deserialize)]
enum ServerHello {
    Challenge {
        nonce: [u8; NONCE_LEN],
        mac: [u8; MAC_LEN],
    },
    Refused(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct Proof {
    mac: [u8; MAC_LEN],
}

#[derive(Debug, Serialize, Deserialize)]
enum Verdict {
    Welcome,
    Refused(String),
}

/// The cluster key, as HMAC key material.
#[derive(Clone)]
pub(crate) struct Auth {
    key: Arc<[u8]>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Auth({} byte key)", self.key.len())
    }
}

impl Auth {
    /// `Psk` keeps its bytes private and exposes them only as hex (for key files), so the key
    /// is recovered from that: the HMAC key is exactly the configured key material.
    pub(crate) fn new(psk: &Psk) -> Self {
        let hex = psk.to_hex();
        let key: Vec<u8> = (0..hex.len() / 2)
            .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
            .collect();
        Self { key: key.into() }
    }

    fn mac(&self, label: &[u8], transcript: &[u8]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .expect("HMAC-SHA256 takes a key of any length");
        m.update(label);
        m.update(transcript);
        m
    }

    fn prove(&self, label: &[u8], transcript: &[u8]) -> [u8; MAC_LEN] {
        self.mac(label, transcript).finalize().into_bytes().into()
    }

    /// Constant-time comparison (hmac's `verify_slice`).
    fn check(&self, label: &[u8], transcript: &[u8], mac: &[u8]) -> bool {
        self.mac(label, transcript).verify_slice(mac).is_ok()
    }
}

fn transcript(hello: &Hello, server_nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut t = Vec::with_capacity(4 + 2 + 16 + 2 * NONCE_LEN);
    t.extend_from_slice(&hello.magic);
    t.extend_from_slice(&hello.version.to_le_bytes());
    t.extend_from_slice(&hello.from.to_le_bytes());
    t.extend_from_slice(&hello.to.to_le_bytes());
    t.extend_from_slice(&hello.nonce);
    t.extend_from_slice(server_nonce);
    t
}

fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).expect("the OS random source is available");
    n
}

/// A connection after its security layer: a TLS session in the TLS modes, the socket itself in
/// plain text. Boxed so that both, and the in-memory streams of the tests, take one code path.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

fn tls_error(security: &Security, why: impl std::fmt::Display) -> RpcError {
    RpcError::Tls {
        mode: security.mode().name(),
        why: why.to_string(),
    }
}

/// The HMAC key of one TLS session, from its exporter value (the cluster key bound to it; in
/// certificate mode the value alone), so the proofs made with it verify only inside this very
/// session.
fn session_auth<D>(security: &Security, session: &ConnectionCommon<D>) -> Result<Auth, RpcError> {
    let exporter = session
        .export_keying_material([0u8; 32], Security::exporter_label(), None)
        .map_err(|e| tls_error(security, e))?;
    let key = security
        .handshake_key(&exporter)
        .map_err(|e| tls_error(security, e))?;
    Ok(Auth::new(&key))
}

/// The plain-text mode's key: the cluster key itself (there is no session to bind to).
fn plaintext_auth(security: &Security) -> Result<Auth, RpcError> {
    let key = security
        .handshake_key(&[])
        .map_err(|e| tls_error(security, e))?;
    Ok(Auth::new(&key))
}

/// Secures a connection this node opened to `addr`: the TLS handshake as the client (unless
/// plain text was chosen), then the key [`client_handshake`] proves inside the session.
pub(crate) async fn secure_client<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
    security: &Security,
    addr: SocketAddr,
) -> Result<(Box<dyn Stream>, Auth), RpcError> {
    let Some(config) = security.client_config() else {
        return Ok((Box::new(io), plaintext_auth(security)?));
    };
    let tls = TlsConnector::from(config)
        .connect(security.server_name_for(addr), io)
        .await
        .map_err(|e| tls_error(security, e))?;
    let auth = session_auth(security, tls.get_ref().1)?;
    Ok((Box::new(tls), auth))
}

/// Secures a connection a peer opened: the TLS handshake as the server (unless plain text was
/// chosen), then the key [`server_handshake`] checks inside the session. A peer that speaks
/// plain text to a TLS node fails here, before any of its bytes is parsed as a frame.
pub(crate) async fn secure_server<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
    security: &Security,
) -> Result<(Box<dyn Stream>, Auth), RpcError> {
    let Some(config) = security.server_config() else {
        return Ok((Box::new(io), plaintext_auth(security)?));
    };
    let tls = TlsAcceptor::from(config)
        .accept(io)
        .await
        .map_err(|e| tls_error(security, e))?;
    let auth = session_auth(security, tls.get_ref().1)?;
    Ok((Box::new(tls), auth))
}

/// The client side of the handshake: proves the key to `to` as `me` and checks `to`'s proof.
pub(crate) async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    auth: &Auth,
    me: NodeId,
    to: NodeId,
) -> Result<(), RpcError> {
    let hello = Hello {
        magic: MAGIC,
        version: VERSION,
        from: me,
        to,
        nonce: nonce(),
    };
    send(stream, "Hello", &hello).await?;
    let (server_nonce, server_mac) = match recv(stream, "Challenge").await? {
        ServerHello::Challenge { nonce, mac } => (nonce, mac),
        ServerHello::Refused(why) => return Err(RpcError::Refused(why)),
    };
    let t = transcript(&hello, &server_nonce);
    if !auth.check(SERVER_LABEL, &t, &server_mac) {
        return Err(RpcError::Auth(format!(
            "node {to} did not prove the cluster key"
        )));
    }
    send(
        stream,
        "Proof",
        &Proof {
            mac: auth.prove(CLIENT_LABEL, &t),
        },
    )
    .await?;
    match recv(stream, "Verdict").await? {
        Verdict::Welcome => Ok(()),
        Verdict::Refused(why) => Err(RpcError::Refused(why)),
    }
}

/// The server side: returns the authenticated peer's id. `admit` says whether a claimed id may
/// connect (a configured peer, not partitioned away). A refusal is told to the peer before the
/// error is returned, and the caller logs it.
pub(crate) async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    auth: &Auth,
    me: NodeId,
    admit: impl FnOnce(NodeId) -> Result<(), RpcError>,
) -> Result<NodeId, RpcError> {
    let hello: Hello = recv(stream, "Hello").await?;
    let refuse = |why: String| ServerHello::Refused(why);
    if hello.magic != MAGIC || hello.version != VERSION {
        let e = RpcError::Malformed {
            what: "Hello",
            why: format!(
                "protocol {:?} v{} (we speak DACP v{VERSION})",
                hello.magic, hello.version
            ),
        };
        let _ = send(stream, "Refused", &refuse(e.to_string())).await;
        return Err(e);
    }
    if hello.to != me {
        let e = RpcError::Refused(format!("this is node {me}, not node {}", hello.to));
        let _ = send(stream, "Refused", &refuse(e.to_string())).await;
        return Err(e);
    }
    if let Err(e) = admit(hello.from) {
        let _ = send(stream, "Refused", &refuse(e.to_string())).await;
        return Err(e);
    }
    let server_nonce = nonce();
    let t = transcript(&hello, &server_nonce);
    let mac = auth.prove(SERVER_LABEL, &t);
    send(
        stream,
        "Challenge",
        &ServerHello::Challenge {
            nonce: server_nonce,
            mac,
        },
    )
    .await?;
    let proof: Proof = recv(stream, "Proof").await?;
    if !auth.check(CLIENT_LABEL, &t, &proof.mac) {
        let e = RpcError::Auth(format!("node {} did not prove the cluster key", hello.from));
        let _ = send(
            stream,
            "Verdict",
            &Verdict::Refused("authentication failed".into()),
        )
        .await;
        return Err(e);
    }
    send(stream, "Verdict", &Verdict::Welcome).await?;
    Ok(hello.from)
}

/// What the client and the server share: who we are, how connections are secured, the peers'
/// addresses, the partition set (the fault-injection hook) and the stop signal.
#[derive(Debug)]
pub(crate) struct Net {
    pub me: NodeId,
    pub security: Security,
    pub peers: RwLock<BTreeMap<NodeId, SocketAddr>>,
    pub isolation: watch::Sender<BTreeSet<NodeId>>,
    pub stop: watch::Sender<bool>,
}

impl Net {
    pub(crate) fn is_isolated_from(&self, peer: NodeId) -> bool {
        self.isolation.borrow().contains(&peer)
    }

    fn admit(&self, peer: NodeId) -> Result<(), RpcError> {
        if peer == self.me || !self.peers.read().contains_key(&peer) {
            return Err(RpcError::UnknownPeer(peer));
        }
        if self.is_isolated_from(peer) {
            return Err(RpcError::Refused(format!(
                "node {} is partitioned from node {peer}",
                self.me
            )));
        }
        Ok(())
    }
}

/// Resolves when the node stops (the guard `wait_for` returns is not `Send`: dropped here).
pub(crate) async fn until_stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Resolves when the node stops or `peer` is partitioned away: the end of a connection's life.
async fn cut_off(net: &Net, peer: NodeId) {
    let mut stop = net.stop.subscribe();
    let mut isolation = net.isolation.subscribe();
    loop {
        if *stop.borrow_and_update() || isolation.borrow_and_update().contains(&peer) {
            return;
        }
        tokio::select! {
            r = stop.changed() => if r.is_err() { return },
            r = isolation.changed() => if r.is_err() { return },
        }
    }
}

/// Serves requests: implemented by the node.
#[async_trait::async_trait]
pub(crate) trait Service: Send + Sync + 'static {
    async fn handle(&self, from: NodeId, request: Request) -> Response;
}

/// Accepts connections until the node stops.
pub(crate) fn spawn_server(
    listener: TcpListener,
    net: Arc<Net>,
    service: Arc<dyn Service>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut stop = net.stop.subscribe();
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            tokio::select! {
                _ = until_stopped(&mut stop) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => match handshakes.clone().try_acquire_owned() {
                        Ok(permit) => {
                            tokio::spawn(serve_connection(stream, addr, net.clone(), service.clone(), permit));
                        }
                        Err(_) => warn!(node = net.me, %addr, "refused an RPC connection: too many handshakes in progress"),
                    },
                    Err(e) => {
                        // Out of file descriptors, say: keep serving the connections we have.
                        warn!(node = net.me, error = %e, "accepting an RPC connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        debug!(node = net.me, "RPC listener stopped");
    })
}

/// Socket options of every RPC connection, both ends.
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(USER_TIMEOUT));
}

async fn serve_connection(
    stream: TcpStream,
    addr: SocketAddr,
    net: Arc<Net>,
    service: Arc<dyn Service>,
    handshake_permit: OwnedSemaphorePermit,
) {
    tune(&stream);
    // TLS first, under the same bound and permit as the HMAC exchange: a stranger that never
    // finishes its TLS handshake holds a slot for at most HANDSHAKE_TIMEOUT.
    let handshake = async {
        let (mut stream, auth) = secure_server(stream, &net.security).await?;
        let peer = server_handshake(&mut stream, &auth, net.me, |peer| net.admit(peer)).await?;
        Ok::<_, RpcError>((stream, peer))
    };
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await;
    drop(handshake_permit);
    let (stream, peer) = match accepted {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => {
            warn!(node = net.me, %addr, error = %e, "refused an RPC connection");
            return;
        }
        Err(_) => {
            warn!(node = net.me, %addr, "refused an RPC connection: handshake timed out");
            return;
        }
    };
    debug!(node = net.me, peer, %addr, security = %net.security.mode(), "RPC connection accepted");
    let (mut reader, writer) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel::<Vec<u8>>(MAX_IN_FLIGHT);
    let writer_task = tokio::spawn(write_loop(writer, rx));
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_KIB));
    let read_loop = async {
        loop {
            let frame = match read_frame(&mut reader, MAX_FRAME).await {
                Ok(frame) => frame,
                Err(RpcError::Closed) => return,
                Err(e) => {
                    warn!(node = net.me, peer, error = %e, "dropping an RPC connection");
                    return;
                }
            };
            let cost = (1 + frame.len() / 1024) as u32;
            let Ok(permit) = in_flight.clone().acquire_many_owned(cost).await else {
                return;
            };
            let request: Envelope<Request> = match decode("request", &frame) {
                Ok(r) => r,
                Err(e) => {
                    warn!(node = net.me, peer, error = %e, "dropping an RPC connection");
                    return;
                }
            };
            let (service, tx) = (service.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let body = service.handle(peer, request.body).await;
                match encode(
                    "response",
                    &Envelope {
                        id: request.id,
                        body,
                    },
                ) {
                    Ok(frame) => {
                        let _ = tx.send(frame).await;
                    }
                    Err(e) => warn!(peer, error = %e, "encoding an RPC answer"),
                }
            });
        }
    };
    tokio::select! {
        _ = read_loop => {}
        _ = cut_off(&net, peer) => debug!(node = net.me, peer, "closing an RPC connection (stop or partition)"),
    }
    writer_task.abort();
}

/// Writes queued frames, flushing when the queue runs dry (so bursts share a syscall).
async fn write_loop<W: AsyncWrite + Unpin>(writer: W, mut rx: mpsc::Receiver<Vec<u8>>) {
    let mut writer = BufWriter::new(writer);
    while let Some(frame) = rx.recv().await {
        if write_frame(&mut writer, &frame, MAX_FRAME).await.is_err() {
            return;
        }
        while let Ok(frame) = rx.try_recv() {
            if write_frame(&mut writer, &frame, MAX_FRAME).await.is_err() {
                return;
            }
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
}

/// Why a call failed, and whether the peer may have seen the request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// The request did not leave this node (no connection, partitioned, unknown peer).
    #[error("not sent: {0}")]
    NotSent(String),
    /// The request may have been delivered; its answer was lost.
    #[error("answer lost: {0}")]
    Lost(String),
    /// No answer in time; the request may have been delivered.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The encoded request is over [`MAX_FRAME`].
    #[error("request of {0} bytes is over the frame limit")]
    TooLarge(usize),
}

/// One authenticated, multiplexed connection to a peer.
#[derive(Debug)]
struct Conn {
    tx: mpsc::Sender<Vec<u8>>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>,
    next_id: AtomicU64,
    dead: Arc<AtomicBool>,
    /// When the last frame arrived, in ms since `opened`.
    last_frame_ms: Arc<AtomicU64>,
    opened: Instant,
    /// Closes the connection (both tasks) at once.
    kill: Arc<tokio::sync::Notify>,
}

impl Conn {
    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_frame_ms.load(Ordering::Acquire));
        self.opened.elapsed().saturating_sub(last)
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Arc<Conn>>>>;

/// Calls peers, one connection each, reconnecting on demand.
#[derive(Debug)]
pub(crate) struct RpcClient {
    net: Arc<Net>,
    conns: Mutex<HashMap<NodeId, Slot>>,
}

impl RpcClient {
    pub(crate) fn new(net: Arc<Net>) -> Self {
        Self {
            net,
            conns: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn net(&self) -> &Arc<Net> {
        &self.net
    }

    async fn connection(&self, peer: NodeId, deadline: Instant) -> Result<Arc<Conn>, CallError> {
        if self.net.is_isolated_from(peer) {
            return Err(CallError::NotSent(format!("partitioned from node {peer}")));
        }
        if *self.net.stop.borrow() {
            return Err(CallError::NotSent("this node is shutting down".into()));
        }
        let slot = self.conns.lock().entry(peer).or_default().clone();
        let mut slot = tokio::time::timeout_at(deadline, slot.lock())
            .await
            .map_err(|_| CallError::NotSent(format!("waiting to connect to node {peer}")))?;
        if let Some(conn) = slot.as_ref() {
            if !conn.dead.load(Ordering::Acquire) {
                return Ok(conn.clone());
            }
        }
        *slot = None;
        let addr = self.net.peers.read().get(&peer).copied().ok_or_else(|| {
            CallError::NotSent(format!("node {peer} is not in the configuration"))
        })?;
        let connect = async {
            let stream = TcpStream::connect(addr).await?;
            tune(&stream);
            let (mut stream, auth) = secure_client(stream, &self.net.security, addr).await?;
            client_handshake(&mut stream, &auth, self.net.me, peer).await?;
            Ok::<_, RpcError>(stream)
        };
        let deadline = deadline.min(Instant::now() + HANDSHAKE_TIMEOUT);
        let stream = match tokio::time::timeout_at(deadline, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                if matches!(
                    e,
                    RpcError::Auth(_)
                        | RpcError::Refused(_)
                        | RpcError::Malformed { .. }
                        | RpcError::Tls { .. }
                ) {
                    warn!(node = self.net.me, peer, %addr, error = %e, "RPC connection refused");
                }
                return Err(CallError::NotSent(format!(
                    "connecting to node {peer} at {addr}: {e}"
                )));
            }
            Err(_) => {
                return Err(CallError::NotSent(format!(
                    "connecting to node {peer} at {addr} timed out"
                )));
            }
        };
        let conn = Arc::new(self.spawn_connection(peer, stream));
        *slot = Some(conn.clone());
        Ok(conn)
    }

    fn spawn_connection(&self, peer: NodeId, stream: Box<dyn Stream>) -> Conn {
        let (mut reader, writer) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel::<Vec<u8>>(MAX_IN_FLIGHT);
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>> = Default::default();
        let dead = Arc::new(AtomicBool::new(false));
        let opened = Instant::now();
        let last_frame_ms = Arc::new(AtomicU64::new(0));
        let kill = Arc::new(tokio::sync::Notify::new());
        let writer_task = {
            let dead = dead.clone();
            tokio::spawn(async move {
                write_loop(writer, rx).await;
                dead.store(true, Ordering::Release);
            })
        };
        let (net, pending_r, dead_r) = (self.net.clone(), pending.clone(), dead.clone());
        let (last_r, kill_r) = (last_frame_ms.clone(), kill.clone());
        tokio::spawn(async move {
            let read_loop = async {
                loop {
                    let frame = match read_frame(&mut reader, MAX_FRAME).await {
                        Ok(frame) => frame,
                        Err(RpcError::Closed) => return,
                        Err(e) => {
                            warn!(node = net.me, peer, error = %e, "dropping an RPC connection");
                            return;
                        }
                    };
                    let answer: Envelope<Response> = match decode("response", &frame) {
                        Ok(a) => a,
                        Err(e) => {
                            warn!(node = net.me, peer, error = %e, "dropping an RPC connection");
                            return;
                        }
                    };
                    let since_open =
                        u64::try_from(opened.elapsed().as_millis()).unwrap_or(u64::MAX);
                    last_r.store(since_open, Ordering::Release);
                    if let Some(waiter) = pending_r.lock().remove(&answer.id) {
                        let _ = waiter.send(answer.body);
                    }
                }
            };
            tokio::select! {
                _ = read_loop => {}
                _ = cut_off(&net, peer) => {}
                _ = kill_r.notified() => {}
            }
            dead_r.store(true, Ordering::Release);
            writer_task.abort();
            // Dropping the waiters tells every caller its answer is lost.
            pending_r.lock().clear();
        });
        Conn {
            tx,
            pending,
            next_id: AtomicU64::new(1),
            dead,
            last_frame_ms,
            opened,
            kill,
        }
    }

    /// Sends `request` to `peer` and waits at most `timeout` for the answer.
    pub(crate) async fn call(
        &self,
        peer: NodeId,
        request: Request,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        let deadline = Instant::now() + timeout;
        let conn = self.connection(peer, deadline).await?;
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = postcard::to_allocvec(&Envelope { id, body: request })
            .map_err(|e| CallError::NotSent(format!("encoding: {e}")))?;
        if frame.len() > MAX_FRAME {
            return Err(CallError::TooLarge(frame.len()));
        }
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().insert(id, tx);
        if conn.dead.load(Ordering::Acquire) || conn.tx.send(frame).await.is_err() {
            conn.pending.lock().remove(&id);
            return Err(CallError::NotSent(format!(
                "connection to node {peer} closed"
            )));
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(CallError::Lost(format!("connection to node {peer} closed"))),
            Err(_) => {
                conn.pending.lock().remove(&id);
                // Nothing at all came back while we waited: the peer or the path is gone (a
                // partition). A fresh connection after the heal beats this one's backoff.
                if conn.silent_for() >= timeout {
                    debug!(node = self.net.me, peer, "dropping a silent RPC connection");
                    conn.dead.store(true, Ordering::Release);
                    conn.kill.notify_one();
                }
                Err(CallError::Timeout(timeout))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use dwcp_tls::certs::CertificateAuthority;
    use tokio::io::DuplexStream;

    use crate::VmId;
    use crate::raft::wire::ReadRequest;

    fn key(b: u8) -> Psk {
        Psk::new(vec![b; 32]).unwrap()
    }

    fn auth(b: u8) -> Auth {
        Auth::new(&key(b))
    }

    #[tokio::test]
    async fn a_truncated_frame_is_an_error_not_a_hang() {
        let mut bytes = 100u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[7; 10]);
        let err = read_frame(&mut bytes.as_slice(), MAX_FRAME)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                RpcError::Truncated {
                    expected: 100,
                    got: 10
                }
            ),
            "{err}"
        );
        let err = read_frame(&mut [0u8, 0].as_slice(), MAX_FRAME)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                RpcError::Truncated {
                    expected: 4,
                    got: 2
                }
            ),
            "{err}"
        );
        assert!(matches!(
            read_frame(&mut [].as_slice(), MAX_FRAME).await,
            Err(RpcError::Closed)
        ));
    }

    #[tokio::test]
    async fn an_oversize_length_is_refused_before_allocating() {
        // 4 GiB - 1 announced, nothing behind it: refused from the header alone.
        let bytes = u32::MAX.to_be_bytes();
        let err = read_frame(&mut bytes.as_slice(), MAX_FRAME)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RpcError::Oversize { len, max: MAX_FRAME } if len == u32::MAX as usize)
        );
        let mut out = Vec::new();
        assert!(matches!(
            write_frame(
                &mut out,
                &vec![0; MAX_HANDSHAKE_FRAME + 1],
                MAX_HANDSHAKE_FRAME
            )
            .await,
            Err(RpcError::Oversize { .. })
        ));
    }

    #[tokio::test]
    async fn garbage_is_a_malformed_message() {
        let mut bytes = 3u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        let err = recv::<_, Hello>(&mut bytes.as_slice(), "Hello")
            .await
            .unwrap_err();
        assert!(
            matches!(err, RpcError::Malformed { what: "Hello", .. }),
            "{err}"
        );
    }

    async fn handshake(
        client_key: u8,
        server_key: u8,
        claimed: NodeId,
    ) -> (Result<(), RpcError>, Result<NodeId, RpcError>) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let (ca, sa) = (auth(client_key), auth(server_key));
        let client = async move { client_handshake(&mut a, &ca, claimed, 1).await };
        let server = async move {
            server_handshake(&mut b, &sa, 1, |peer| {
                if [2, 3].contains(&peer) {
                    Ok(())
                } else {
                    Err(RpcError::UnknownPeer(peer))
                }
            })
            .await
        };
        tokio::join!(client, server)
    }

    #[tokio::test]
    async fn equal_keys_authenticate_both_ways() {
        let (c, s) = handshake(5, 5, 2).await;
        c.unwrap();
        assert_eq!(s.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_bad_mac_is_refused_by_both_sides() {
        let (c, s) = handshake(5, 6, 2).await;
        // The client checks the server's proof first and gives up; the server never sees a
        // valid proof.
        assert!(matches!(c, Err(RpcError::Auth(_))), "{c:?}");
        assert!(s.is_err(), "{s:?}");
    }

    #[tokio::test]
    async fn a_client_without_the_key_is_refused_by_the_server() {
        // A client that skips the check of the server's proof (a forger) still cannot answer
        // the server's challenge.
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = async move { server_handshake(&mut b, &auth(1), 1, |_| Ok(())).await };
        let forger = async move {
            let hello = Hello {
                magic: MAGIC,
                version: VERSION,
                from: 2,
                to: 1,
                nonce: nonce(),
            };
            send(&mut a, "Hello", &hello).await.unwrap();
            let _: ServerHello = recv(&mut a, "Challenge").await.unwrap();
            // Replaying the server's own proof (reflection) or a guess.
            send(&mut a, "Proof", &Proof { mac: [0; MAC_LEN] })
                .await
                .unwrap();
            recv::<_, Verdict>(&mut a, "Verdict").await.unwrap()
        };
        let (s, verdict) = tokio::join!(server, forger);
        assert!(matches!(s, Err(RpcError::Auth(_))), "{s:?}");
        assert!(matches!(verdict, Verdict::Refused(_)));
    }

    #[tokio::test]
    async fn an_unknown_node_id_is_refused() {
        let (c, s) = handshake(5, 5, 9).await;
        assert!(matches!(s, Err(RpcError::UnknownPeer(9))), "{s:?}");
        assert!(matches!(c, Err(RpcError::Refused(m)) if m.contains("node 9")));
    }

    #[tokio::test]
    async fn an_oversize_hello_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
        let s = server_handshake(&mut b, &auth(1), 1, |_| Ok(())).await;
        assert!(
            matches!(
                s,
                Err(RpcError::Oversize {
                    max: MAX_HANDSHAKE_FRAME,
                    ..
                })
            ),
            "{s:?}"
        );
    }

    /// Answers pings, and anything else with the request itself (so a request's content also
    /// travels back on the wire).
    struct Echo;

    #[async_trait::async_trait]
    impl Service for Echo {
        async fn handle(&self, _from: NodeId, request: Request) -> Response {
            match request {
                Request::Ping => Response::Pong,
                other => Response::NotReady(format!("{other:?}")),
            }
        }
    }

    fn net(me: NodeId, security: Security, peers: BTreeMap<NodeId, SocketAddr>) -> Arc<Net> {
        Arc::new(Net {
            me,
            security,
            peers: RwLock::new(peers),
            isolation: watch::channel(BTreeSet::new()).0,
            stop: watch::channel(false).0,
        })
    }

    /// Node 1 serving on a loopback port. Stops with the value.
    struct Server {
        net: Arc<Net>,
        addr: SocketAddr,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.net.stop.send_replace(true);
        }
    }

    async fn server(security: Security) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let net = net(1, security, BTreeMap::from([(1, addr), (2, unused)]));
        spawn_server(listener, net.clone(), Arc::new(Echo));
        Server { net, addr }
    }

    /// Node 2's client, reaching node 1 at `addr`.
    fn client(security: Security, addr: SocketAddr) -> RpcClient {
        let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
        RpcClient::new(net(2, security, BTreeMap::from([(1, addr), (2, unused)])))
    }

    async fn ping(client: &RpcClient) -> Result<Response, CallError> {
        client.call(1, Request::Ping, Duration::from_secs(5)).await
    }

    /// A TCP relay on loopback to `target`; keeps a copy of the bytes each way (client to
    /// server, server to client).
    type Captured = Arc<Mutex<Vec<u8>>>;

    async fn relay(target: SocketAddr) -> (SocketAddr, Captured, Captured) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, down) = (Captured::default(), Captured::default());
        let (up_r, down_r) = (up.clone(), down.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    return;
                };
                let (ci, co) = inbound.into_split();
                let (si, so) = outbound.into_split();
                tokio::spawn(pipe(ci, so, up_r.clone()));
                tokio::spawn(pipe(si, co, down_r.clone()));
            }
        });
        (addr, up, down)
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        seen: Captured,
    ) {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    seen.lock().extend_from_slice(&buf[..n]);
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown().await;
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[tokio::test]
    async fn tls_psk_rpc_keeps_requests_off_the_wire_and_plain_text_does_not() {
        const MARKER: &str = "wire-marker-vm-4f1c9e";
        for (security, clear) in [
            (Security::psk(key(5)), false),
            (Security::insecure_plaintext(key(5)), true),
        ] {
            let mode = security.mode();
            let node1 = server(security.clone()).await;
            let (via, up, down) = relay(node1.addr).await;
            let node2 = client(security, via);
            let request = Request::Read {
                read: ReadRequest::Ownership(VmId::new(MARKER).unwrap()),
                timeout_ms: 1000,
            };
            let answer = node2.call(1, request, Duration::from_secs(5)).await;
            // The request really crossed the relay: its content came back in the answer.
            match answer {
                Ok(Response::NotReady(echo)) => assert!(echo.contains(MARKER), "{echo}"),
                other => panic!("{mode}: {other:?}"),
            }
            let (up, down) = (up.lock().clone(), down.lock().clone());
            assert!(
                !up.is_empty() && !down.is_empty(),
                "{mode}: nothing relayed"
            );
            for (what, bytes) in [("client to server", &up), ("server to client", &down)] {
                assert_eq!(
                    contains(bytes, MARKER.as_bytes()),
                    clear,
                    "{mode}: the marker on the wire {what}"
                );
            }
            // Even the handshake's magic is hidden inside TLS.
            assert_eq!(
                contains(&up, &MAGIC),
                clear,
                "{mode}: the Hello on the wire"
            );
        }
    }

    #[tokio::test]
    async fn a_peer_with_another_key_is_refused_over_tls_and_real_peers_still_get_in() {
        let node1 = server(Security::psk(key(5))).await;
        let impostor = client(Security::psk(key(6)), node1.addr);
        match ping(&impostor).await {
            Err(CallError::NotSent(why)) => {
                assert!(why.contains("did not prove the cluster key"), "{why}")
            }
            other => panic!("an impostor got through: {other:?}"),
        }
        let member = client(Security::psk(key(5)), node1.addr);
        assert!(matches!(ping(&member).await, Ok(Response::Pong)));
    }

    #[tokio::test]
    async fn a_plain_text_peer_is_refused_by_a_tls_node_and_the_listener_keeps_serving() {
        let node1 = server(Security::psk(key(5))).await;
        // Same key, but no TLS: its Hello is not a TLS ClientHello.
        let plain = client(Security::insecure_plaintext(key(5)), node1.addr);
        for _ in 0..3 {
            let refused = ping(&plain).await;
            assert!(matches!(refused, Err(CallError::NotSent(_))), "{refused:?}");
        }
        // A raw stranger writing a well-formed plain-text Hello gets neither a challenge nor a
        // refusal it could read: the node hangs up.
        let mut raw = TcpStream::connect(node1.addr).await.unwrap();
        let hello = Hello {
            magic: MAGIC,
            version: VERSION,
            from: 2,
            to: 1,
            nonce: nonce(),
        };
        send(&mut raw, "Hello", &hello).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(HANDSHAKE_TIMEOUT * 2, raw.read_to_end(&mut answer))
            .await
            .expect("the node hangs up")
            .ok();
        assert!(
            recv::<_, ServerHello>(&mut answer.as_slice(), "Challenge")
                .await
                .is_err(),
            "a plain-text answer: {answer:?}"
        );
        let member = client(Security::psk(key(5)), node1.addr);
        assert!(matches!(ping(&member).await, Ok(Response::Pong)));
    }

    fn certified(ca: &CertificateAuthority, names: &[&str]) -> Security {
        ca.security_for(names).unwrap()
    }

    #[tokio::test]
    async fn certificates_authenticate_rpc_and_strangers_to_the_ca_are_refused() {
        let ca = CertificateAuthority::generate().unwrap();
        let node1 = server(certified(&ca, &["127.0.0.1"])).await;
        let member = client(certified(&ca, &["127.0.0.1"]), node1.addr);
        assert!(matches!(ping(&member).await, Ok(Response::Pong)));

        let other_ca = CertificateAuthority::generate().unwrap();
        let refused = [
            (
                "a certificate of another CA",
                certified(&other_ca, &["127.0.0.1"]),
            ),
            ("no certificate (PSK mode)", Security::psk(key(5))),
            ("plain text", Security::insecure_plaintext(key(5))),
        ];
        for (who, security) in refused {
            let stranger = client(security, node1.addr);
            let r = ping(&stranger).await;
            assert!(matches!(r, Err(CallError::NotSent(_))), "{who}: {r:?}");
        }
        // The client checks the server's name too: a certificate of the right CA for another
        // address is refused.
        let elsewhere = server(certified(&ca, &["10.11.12.13"])).await;
        let member = client(certified(&ca, &["127.0.0.1"]), elsewhere.addr);
        match ping(&member).await {
            Err(CallError::NotSent(why)) => assert!(why.contains("TLS"), "{why}"),
            other => panic!("a server with another name was trusted: {other:?}"),
        }
        let member = client(certified(&ca, &["127.0.0.1"]), node1.addr);
        assert!(matches!(ping(&member).await, Ok(Response::Pong)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn strangers_stalling_in_tls_hold_a_handshake_slot_only_until_the_timeout() {
        let node1 = server(Security::psk(key(5))).await;
        let mut strangers = Vec::new();
        for _ in 0..MAX_HANDSHAKES {
            strangers.push(TcpStream::connect(node1.addr).await.unwrap());
        }
        // Let the listener take them all (each takes a slot and waits for a ClientHello).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let member = client(Security::psk(key(5)), node1.addr);
        let turned_away = ping(&member).await;
        assert!(
            matches!(turned_away, Err(CallError::NotSent(_))),
            "every slot is held: {turned_away:?}"
        );
        let started = Instant::now();
        for mut s in strangers {
            let mut byte = [0u8; 1];
            let closed = tokio::time::timeout(HANDSHAKE_TIMEOUT * 2, s.read(&mut byte)).await;
            assert!(
                matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
                "a stalled stranger is still connected"
            );
        }
        assert!(started.elapsed() <= HANDSHAKE_TIMEOUT + Duration::from_secs(1));
        assert!(matches!(ping(&member).await, Ok(Response::Pong)));
    }

    /// A man in the middle between node 2 and node 1 who terminates TLS towards each (any client
    /// is accepted in PSK mode, and the client does not check the server's certificate) and
    /// relays the bytes inside. `bind` says whether the ends key their HMAC by the session
    /// (what the RPC does) or by the bare cluster key.
    async fn through_a_man_in_the_middle(bind: bool) -> Result<(), RpcError> {
        let security = Security::psk(key(5));
        let mitm = Security::psk(key(9));
        let (client_io, mitm_front): (DuplexStream, DuplexStream) = tokio::io::duplex(64 << 10);
        let (mitm_back, server_io) = tokio::io::duplex(64 << 10);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let bare = auth(5);
        let (c_sec, s_sec, c_bare, s_bare) =
            (security.clone(), security, bare.clone(), bare.clone());
        let client = async move {
            let (mut stream, session) = secure_client(client_io, &c_sec, addr).await?;
            let key = if bind { session } else { c_bare };
            client_handshake(&mut stream, &key, 2, 1).await
        };
        let server = async move {
            let (mut stream, session) = secure_server(server_io, &s_sec).await?;
            let key = if bind { session } else { s_bare };
            server_handshake(&mut stream, &key, 1, |_| Ok(())).await
        };
        let relay = async move {
            let acceptor = TlsAcceptor::from(mitm.server_config().unwrap());
            let connector = TlsConnector::from(mitm.client_config().unwrap());
            let (front, back) = tokio::join!(
                acceptor.accept(mitm_front),
                connector.connect(mitm.server_name_for(addr), mitm_back)
            );
            let (mut front, mut back) = (front.unwrap(), back.unwrap());
            let _ = tokio::io::copy_bidirectional(&mut front, &mut back).await;
        };
        let relay = tokio::spawn(relay);
        let (c, s) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(client, server)
        })
        .await
        .expect("the exchange ends");
        relay.abort();
        c.and(s.map(|_| ()))
    }

    #[tokio::test]
    async fn a_relayed_handshake_fails_because_the_key_is_bound_to_the_tls_session() {
        // Keyed by the bare cluster key, the relay is invisible: the exchange succeeds.
        through_a_man_in_the_middle(false).await.unwrap();
        // Keyed by each session's exporter, the two sessions have two keys.
        let err = through_a_man_in_the_middle(true).await.unwrap_err();
        assert!(matches!(err, RpcError::Auth(_)), "{err}");
    }

    #[tokio::test]
    async fn every_mode_authenticates_over_an_in_memory_stream() {
        let ca = CertificateAuthority::generate().unwrap();
        for (server_sec, client_sec) in [
            (Security::psk(key(5)), Security::psk(key(5))),
            (
                certified(&ca, &["127.0.0.1"]),
                certified(&ca, &["127.0.0.1"]),
            ),
            (
                Security::insecure_plaintext(key(5)),
                Security::insecure_plaintext(key(5)),
            ),
        ] {
            let mode = server_sec.mode();
            let (a, b) = tokio::io::duplex(64 << 10);
            let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
            let client = async move {
                let (mut s, auth) = secure_client(a, &client_sec, addr).await?;
                client_handshake(&mut s, &auth, 2, 1).await
            };
            let server = async move {
                let (mut s, auth) = secure_server(b, &server_sec).await?;
                server_handshake(&mut s, &auth, 1, |_| Ok(())).await
            };
            let (c, s) = tokio::join!(client, server);
            c.unwrap_or_else(|e| panic!("{mode}: {e}"));
            assert_eq!(s.unwrap_or_else(|e| panic!("{mode}: {e}")), 2);
        }
    }
}
