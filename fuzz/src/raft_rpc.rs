//! Properties of the cluster RPC of `dwcp-acp` (`raft/rpc.rs`), through the entry points of
//! `dwcp_acp::fuzzing`: length-prefixed frames, the Hello/Challenge/Proof/Verdict handshake of
//! both sides, and the postcard decoding of request and response envelopes.
//!
//! Input: byte 0 picks the decoder (`% 4`): 0 the server handshake (node 1 admitting nodes 2 and 3)
//! on the rest as the client's bytes, 1 the client handshake (node 2 calling node 1) on the rest as
//! the server's bytes, 2 frames of requests, 3 frames of responses (each frame of at most
//! `MAX_FRAME` bytes, read until one fails).
//!
//! Checked: no panic and no wait; a handshake never succeeds without the key's proof (the fuzzer
//! cannot forge it: the nonces are random) and writes only frames of at most `MAX_HANDSHAKE_FRAME`
//! bytes; a frame over its limit is refused without reading its payload; an accepted frame
//! re-frames to its bytes; an accepted envelope re-encodes to bytes that decode to the same id and
//! re-encode to the same bytes.

use dwcp_acp::fuzzing::{
    MAX_FRAME, MAX_HANDSHAKE_FRAME, client_handshake, decode_request, decode_response, read_frame,
    server_handshake, write_frame,
};

fn assert_frames(mut written: &[u8]) {
    while !written.is_empty() {
        let (frame, left) = read_frame(written, MAX_HANDSHAKE_FRAME);
        frame.expect("the handshake writes whole frames under the handshake limit");
        written = &written[written.len() - left..];
    }
}

/// Runs every property on one fuzz input.
pub fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let (result, written) = server_handshake(rest, 1, &[2, 3]);
            assert!(result.is_err(), "authenticated without the key: {result:?}");
            assert_frames(&written);
        }
        1 => {
            let (result, written) = client_handshake(rest, 2, 1);
            assert!(result.is_err(), "authenticated without the key: {result:?}");
            assert_frames(&written);
        }
        m => {
            let mut stream = rest;
            loop {
                let (frame, left) = read_frame(stream, MAX_FRAME);
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(e) => {
                        if let Some((len, max)) = e.oversize {
                            assert!(len > max);
                            assert_eq!(left, stream.len() - 4, "payload read after the header");
                        }
                        return;
                    }
                };
                let used = stream.len() - left;
                assert_eq!(write_frame(&frame, MAX_FRAME).unwrap(), stream[..used]);
                stream = &stream[used..];
                let decode = if m == 2 {
                    decode_request
                } else {
                    decode_response
                };
                if let Ok((id, again)) = decode(&frame) {
                    let (id2, again2) = decode(&again).expect("a re-encoded envelope decodes");
                    assert_eq!(id, id2);
                    assert_eq!(again, again2, "re-encoding is stable");
                }
            }
        }
    }
}
