//! Entry points for the `raft_rpc` fuzz target (`fuzz/fuzz_targets/raft_rpc.rs`) and its corpus
//! replay test (`tests/fuzz_corpus.rs`): thin synchronous wrappers around the decoders of the
//! cluster RPC (`raft/rpc.rs`), which are not public. Not part of the crate's API.
//!
//! Every wrapper runs the real code over an in-memory stream: reads come from the fuzz bytes (then
//! end of stream), writes go to a `Vec`. Such a stream is never pending, so the futures are polled
//! without a runtime; one that still returns `Pending` would wait forever on a socket, and panics.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use dwcp_core::handshake::Psk;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::NodeId;
use crate::raft::rpc::{self, Auth, RpcError};
use crate::raft::wire::{Envelope, Request, Response};

/// Largest frame after authentication.
pub const MAX_FRAME: usize = rpc::MAX_FRAME;
/// Largest frame before the peer has proven the key.
pub const MAX_HANDSHAKE_FRAME: usize = rpc::MAX_HANDSHAKE_FRAME;

/// The key both fuzzed handshakes use.
pub const FUZZ_KEY: [u8; 32] = [0x42; 32];

/// An in-memory stream: reads `input` then end of stream; keeps what is written.
#[derive(Debug)]
pub struct MemoryStream<'a> {
    input: &'a [u8],
    /// Bytes written to the stream so far.
    pub output: Vec<u8>,
}

impl<'a> MemoryStream<'a> {
    /// A stream whose peer sent `input`.
    pub fn new(input: &'a [u8]) -> Self {
        Self {
            input,
            output: Vec::new(),
        }
    }

    /// Bytes of the input not read yet.
    pub fn unread(&self) -> usize {
        self.input.len()
    }
}

impl AsyncRead for MemoryStream<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = buf.remaining().min(self.input.len());
        let (head, tail) = self.input.split_at(n);
        buf.put_slice(head);
        self.input = tail;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MemoryStream<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.output.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Runs a future that only touches in-memory streams to completion.
fn complete<T>(future: impl Future<Output = T>) -> T {
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("an RPC future waited on an in-memory stream (a hang on a socket)"),
    }
}

/// Why a wrapped call failed: the error's text and whether it is an oversize refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// `RpcError`'s message.
    pub message: String,
    /// The limit, if the error was a frame over it.
    pub oversize: Option<(usize, usize)>,
}

impl From<RpcError> for Failure {
    fn from(e: RpcError) -> Self {
        let oversize = match e {
            RpcError::Oversize { len, max } => Some((len, max)),
            _ => None,
        };
        Self {
            message: e.to_string(),
            oversize,
        }
    }
}

/// `read_frame(stream, max)` on `input`: the frame, and the bytes of `input` left unread.
pub fn read_frame(input: &[u8], max: usize) -> (Result<Vec<u8>, Failure>, usize) {
    let mut stream = MemoryStream::new(input);
    let frame = complete(rpc::read_frame(&mut stream, max)).map_err(Failure::from);
    (frame, stream.unread())
}

/// `write_frame(payload, max)` into a `Vec`.
pub fn write_frame(payload: &[u8], max: usize) -> Result<Vec<u8>, Failure> {
    let mut out = Vec::new();
    complete(rpc::write_frame(&mut out, payload, max))?;
    Ok(out)
}

/// Decodes a request frame as the server does; on success returns its id and its re-encoding.
pub fn decode_request(frame: &[u8]) -> Result<(u64, Vec<u8>), Failure> {
    let request: Envelope<Request> = rpc::decode("request", frame)?;
    Ok((request.id, rpc::encode("request", &request)?))
}

/// Decodes a response frame as the client does; on success returns its id and its re-encoding.
pub fn decode_response(frame: &[u8]) -> Result<(u64, Vec<u8>), Failure> {
    let response: Envelope<Response> = rpc::decode("response", frame)?;
    Ok((response.id, rpc::encode("response", &response)?))
}

fn auth() -> Auth {
    Auth::new(&Psk::new(FUZZ_KEY.to_vec()).expect("a valid key"))
}

/// The server handshake of node `me`, admitting `admitted`, against a peer that sent `input`:
/// the authenticated peer (never, without the key's proof) and what the server wrote.
pub fn server_handshake(
    input: &[u8],
    me: NodeId,
    admitted: &[NodeId],
) -> (Result<NodeId, Failure>, Vec<u8>) {
    let mut stream = MemoryStream::new(input);
    let result = complete(rpc::server_handshake(&mut stream, &auth(), me, |peer| {
        if admitted.contains(&peer) {
            Ok(())
        } else {
            Err(RpcError::UnknownPeer(peer))
        }
    }));
    (result.map_err(Failure::from), stream.output)
}

/// The client handshake of node `me` calling `to`, against a server that sent `input`.
pub fn client_handshake(input: &[u8], me: NodeId, to: NodeId) -> (Result<(), Failure>, Vec<u8>) {
    let mut stream = MemoryStream::new(input);
    let result = complete(rpc::client_handshake(&mut stream, &auth(), me, to));
    (result.map_err(Failure::from), stream.output)
}
