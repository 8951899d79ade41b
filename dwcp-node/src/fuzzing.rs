//! Entry points for the `node_control` fuzz target (`fuzz/fuzz_targets/node_control.rs`) and its
//! corpus replay test (`tests/fuzz_corpus.rs`): the parsing and verification steps of the agent's
//! control protocol (`protocol.rs`), which are not public and run inside a TLS session there. Not
//! part of the crate's API.
//!
//! [`verify_request`] is the part of `protocol::accept_request` after the challenge was sent (the
//! same calls in the same order); the client's parsing of a challenge and of an answer is that of
//! `protocol::call`.

use std::io::BufReader;

use dwcp_core::handshake::Psk;
use hmac::Mac;

use crate::NodeError;
use crate::protocol::{self, Answer, Challenge, Envelope, Request};

pub use crate::protocol::MAX_LINE;

/// The cluster key of the fuzzed agent.
pub const FUZZ_KEY: [u8; 32] = [0x42; 32];
/// The nonce the fuzzed agent sent (64 hex digits, as `accept_request` sends).
pub const FUZZ_NONCE: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fn psk() -> Psk {
    Psk::new(FUZZ_KEY.to_vec()).expect("a valid key")
}

/// `read_line` on a connection that sent `input`: the line, and the bytes of `input` consumed.
pub fn read_line(input: &[u8]) -> (Result<String, NodeError>, usize) {
    let mut reader = BufReader::new(input);
    let line = protocol::read_line(&mut reader);
    let consumed = input.len() - reader.get_ref().len() - reader.buffer().len();
    (line, consumed)
}

/// The agent's checks of a request line answering the challenge [`FUZZ_NONCE`] under
/// [`FUZZ_KEY`]: envelope, MAC, then the request itself.
pub fn verify_request(line: &str) -> Result<Request, NodeError> {
    let envelope: Envelope = serde_json::from_str(line)
        .map_err(|e| NodeError::Control(format!("a malformed request: {e}")))?;
    let tag = protocol::unhex(&envelope.mac).ok_or(NodeError::Unauthenticated)?;
    protocol::mac(&psk(), FUZZ_NONCE, envelope.request.get())
        .verify_slice(&tag)
        .map_err(|_| NodeError::Unauthenticated)?;
    serde_json::from_str(envelope.request.get())
        .map_err(|e| NodeError::Control(format!("an unknown request: {e}")))
}

/// The request line a client holding the key sends for `body` (the request's JSON, as sent).
pub fn signed_line(body: &str) -> String {
    let tag = protocol::mac(&psk(), FUZZ_NONCE, body)
        .finalize()
        .into_bytes();
    format!(
        "{{\"mac\":\"{}\",\"request\":{}}}",
        protocol::hex(&tag),
        body
    )
}

/// The client's parsing of the agent's challenge line: the nonce.
pub fn parse_challenge(line: &str) -> Result<String, NodeError> {
    let challenge: Challenge =
        serde_json::from_str(line).map_err(|e| NodeError::Control(format!("no challenge: {e}")))?;
    Ok(challenge.nonce)
}

/// The client's parsing of the agent's answer line (`Err` inside: the agent's error).
pub fn parse_answer(line: &str) -> Result<Result<serde_json::Value, String>, NodeError> {
    let answer: Answer = serde_json::from_str(line)
        .map_err(|e| NodeError::Control(format!("a malformed answer: {e}")))?;
    Ok(if answer.ok {
        Ok(answer.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(answer.error.unwrap_or_default())
    })
}
