//! The agent's control protocol: one authenticated JSON request per TCP connection, inside TLS 1.3.
//!
//! ```text
//! client <══ TLS 1.3 handshake (within HANDSHAKE_TIMEOUT) ══> agent
//! ┌─ inside the TLS session ────────────────────────────────────────────────────────┐
//! │ agent  -> client   {"nonce": "<32 random bytes, hex>"}\n
//! │ client -> agent    {"mac": "<hex>", "request": {...}}\n
//! │ agent  -> client   {"ok": true, "result": ...}\n   or   {"ok": false, "error": "..."}\n
//! └─────────────────────────────────────────────────────────────────────────────────┘
//! exporter = TLS-Exporter(Security::exporter_label(), no context, 32 bytes)
//! key      = security.handshake_key(exporter)     (PSK mode: Psk::bound_to_channel(exporter))
//! mac      = HMAC-SHA256(key, "dwcp agent request" ‖ nonce ‖ request as sent)
//! ```
//! The key is the cluster's pre-shared key bound to the TLS session, so a MAC verifies only in
//! the session it was made in: a man in the middle holding one session with each side cannot
//! relay it. In certificate mode both ends are authenticated by their certificates and the key is
//! the exporter value alone; only the explicit insecure plain-text mode uses the cluster key
//! itself, without TLS. The nonce is fresh per connection, so a recorded request cannot be
//! replayed. Lines are bounded ([`MAX_LINE`]) and read with a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use dwcp_acp::{Fence, NodeId, VmId};
use dwcp_core::handshake::Psk;
use dwcp_core::transport::Conn;
use dwcp_tls::{Secured, Security};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::NodeError;

/// Longest request or answer line, in bytes.
pub const MAX_LINE: usize = 1 << 20;
/// Longest a control connection may take for its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the agent waits for a request line, and for writing its answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a migration should go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// This node.
    Node(NodeId),
    /// Wherever placement scores best.
    Auto,
}

/// What a client can ask an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The agent's view of the cluster.
    Status,
    /// Starts a simulated guest on this node and registers it.
    CreateVm {
        /// Its name.
        vm: VmId,
        /// Memory size in bytes.
        size: u64,
        /// Bytes per second its workload writes.
        dirty_rate: u64,
    },
    /// Migrates a VM this node owns.
    Migrate {
        /// The VM.
        vm: VmId,
        /// Where to.
        to: Target,
    },
    /// Migrates every VM this node owns elsewhere and refuses new ones.
    Evacuate,
    /// From a source agent: get ready to receive `vm`, being handed to this node at `fence`.
    Prepare {
        /// The VM.
        vm: VmId,
        /// The source node.
        from: NodeId,
        /// The fence of the handoff's beginning.
        fence: Fence,
        /// Memory size in bytes.
        size: u64,
        /// Bytes per second the guest's workload writes (the destination carries it on).
        dirty_rate: u64,
    },
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Challenge {
    pub(crate) nonce: String,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub(crate) mac: String,
    pub(crate) request: Box<serde_json::value::RawValue>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Answer {
    pub(crate) ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

pub(crate) fn mac(psk: &Psk, nonce: &str, request: &str) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(psk.to_hex().as_bytes())
        .expect("HMAC takes any key length");
    m.update(b"dwcp agent request");
    m.update(nonce.as_bytes());
    m.update(request.as_bytes());
    m
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Reads one line of at most [`MAX_LINE`] bytes.
pub(crate) fn read_line(reader: &mut impl BufRead) -> Result<String, NodeError> {
    let mut line = Vec::new();
    let read = reader
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| NodeError::Control(format!("reading: {e}")))?;
    if read == 0 {
        return Err(NodeError::Control("the peer closed the connection".into()));
    }
    if line.len() > MAX_LINE {
        return Err(NodeError::Control(format!(
            "a line longer than {MAX_LINE} bytes"
        )));
    }
    String::from_utf8(line).map_err(|_| NodeError::Control("a line that is not UTF-8".into()))
}

fn write_json(stream: &mut impl Write, value: &impl Serialize) -> Result<(), NodeError> {
    let mut line = serde_json::to_vec(value).map_err(|e| NodeError::Control(e.to_string()))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| NodeError::Control(format!("writing: {e}")))
}

/// Server side: the TLS handshake of an accepted control connection (none in plain text), then
/// the read and write limits of the exchange. A peer that does not finish TLS within
/// [`HANDSHAKE_TIMEOUT`], or speaks plain text to a TLS agent, is refused here.
pub(crate) fn secure_accepted(
    stream: TcpStream,
    security: &Security,
) -> Result<Secured, NodeError> {
    let secured = security
        .accept(Box::new(stream), Instant::now() + HANDSHAKE_TIMEOUT)
        .map_err(NodeError::Security)?;
    // The TLS handshake left its own (shrinking) limits on the socket.
    secured
        .conn
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| secured.conn.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| NodeError::Control(e.to_string()))?;
    Ok(secured)
}

/// Server side: challenges, authenticates (with the session's handshake key) and parses one
/// request.
pub(crate) fn accept_request(stream: &mut Box<dyn Conn>, key: &Psk) -> Result<Request, NodeError> {
    let nonce = hex(&random_nonce());
    write_json(
        stream,
        &Challenge {
            nonce: nonce.clone(),
        },
    )?;
    let mut reader = BufReader::new(
        stream
            .try_clone_conn()
            .map_err(|e| NodeError::Control(e.to_string()))?,
    );
    let line = read_line(&mut reader)?;
    let envelope: Envelope = serde_json::from_str(&line)
        .map_err(|e| NodeError::Control(format!("a malformed request: {e}")))?;
    let tag = unhex(&envelope.mac).ok_or(NodeError::Unauthenticated)?;
    mac(key, &nonce, envelope.request.get())
        .verify_slice(&tag)
        .map_err(|_| NodeError::Unauthenticated)?;
    serde_json::from_str(envelope.request.get())
        .map_err(|e| NodeError::Control(format!("an unknown request: {e}")))
}

/// Server side: writes the answer, then ends the session (a TLS close_notify: the client sees a
/// clean end rather than a truncated stream).
pub(crate) fn answer(
    stream: &mut Box<dyn Conn>,
    result: Result<serde_json::Value, NodeError>,
) -> Result<(), NodeError> {
    let answer = match result {
        Ok(value) => Answer {
            ok: true,
            result: Some(value),
            error: None,
        },
        Err(e) => Answer {
            ok: false,
            result: None,
            error: Some(e.to_string()),
        },
    };
    let written = write_json(stream, &answer);
    let _ = stream.shutdown(Shutdown::Write);
    written
}

fn random_nonce() -> [u8; 32] {
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce).expect("the OS random number generator failed");
    nonce
}

/// Sends `request` to the agent at `addr` and waits up to `timeout` for its answer, over TLS 1.3
/// keyed by the cluster key `psk` (the agents' default, [`Security::psk`]). For agents secured
/// otherwise (certificates, explicit plain text), [`call_with`].
pub fn call(
    addr: SocketAddr,
    psk: &Psk,
    request: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, NodeError> {
    call_with(addr, &Security::psk(psk.clone()), request, timeout)
}

/// [`call`] over a connection secured by `security`, which must match the agent's mode.
pub fn call_with(
    addr: SocketAddr,
    security: &Security,
    request: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, NodeError> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5).min(timeout))
        .map_err(|e| NodeError::Control(format!("connecting to the agent at {addr}: {e}")))?;
    let Secured {
        conn: mut stream,
        handshake_key: key,
        ..
    } = security
        .connect(
            Box::new(stream),
            addr,
            Instant::now() + HANDSHAKE_TIMEOUT.min(timeout),
        )
        .map_err(NodeError::Security)?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| NodeError::Control(e.to_string()))?;
    let mut reader = BufReader::new(
        stream
            .try_clone_conn()
            .map_err(|e| NodeError::Control(e.to_string()))?,
    );
    let challenge: Challenge = serde_json::from_str(&read_line(&mut reader)?)
        .map_err(|e| NodeError::Control(format!("the agent at {addr} sent no challenge: {e}")))?;
    let body = serde_json::to_string(request).map_err(|e| NodeError::Control(e.to_string()))?;
    let tag = mac(&key, &challenge.nonce, &body).finalize().into_bytes();
    // The MAC covers the request's exact bytes: send them as they were signed.
    let line = format!("{{\"mac\":\"{}\",\"request\":{}}}", hex(&tag), body);
    stream
        .write_all(line.as_bytes())
        .and_then(|()| stream.write_all(b"\n"))
        .map_err(|e| NodeError::Control(format!("writing to the agent at {addr}: {e}")))?;
    let answer: Answer = serde_json::from_str(&read_line(&mut reader)?)
        .map_err(|e| NodeError::Control(format!("a malformed answer from {addr}: {e}")))?;
    if answer.ok {
        Ok(answer.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(NodeError::Remote(answer.error.unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        assert_eq!(
            unhex(&hex(&[0, 1, 254, 255])).unwrap(),
            vec![0, 1, 254, 255]
        );
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }

    #[test]
    fn requests_serialize_as_tagged_objects() {
        let r = Request::Migrate {
            vm: VmId::new("vm-1").unwrap(),
            to: Target::Auto,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"op":"migrate","vm":"vm-1","to":"auto"}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
    }
}
