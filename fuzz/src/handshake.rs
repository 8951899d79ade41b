//! Properties of the stream handshake: `dwcp_core::handshake::server_handshake` and
//! `client_handshake`, run over an in-memory reader holding the peer's frames and a `Vec` writer.
//!
//! Input: byte 0 is a control byte, the rest is what the peer sent.
//!
//! | control bits | meaning |
//! |---|---|
//! | 0 | 0: run the server side, 1: the client side |
//! | 1 | build the stream: the rest is records `type (u8) ‖ len (u16 LE) ‖ payload`, encoded as valid frames numbered from 0 (type byte `t` gives type `t % 14 + 1`), the first of session 0, the later ones of [`SESSION`] |
//! | 2 | the server refuses the requested session (`assign_session` fails) |
//!
//! Checked: the handshake returns (`Ok` or `Err`, without panicking or waiting); without the key's
//! proof (which the fuzzer cannot forge: both nonces are random) it never succeeds; it reads at
//! most what it was given and writes only a few small frames, each valid, the server's last one an
//! Error frame when it fails.

use dwcp_core::error::Error;
use dwcp_core::frame::{
    FrameReader, FrameType, FrameWriter, HEADER_LEN, MAX_PAYLOAD, decode_frame, encode_frame,
};
use dwcp_core::handshake::{Offer, Psk, client_handshake, server_handshake};

/// Session id the fuzzed server assigns to a new session, and of built frames after the first.
pub const SESSION: u64 = 0x5eed;
/// The pre-shared key of both fuzzed sides.
pub const KEY: [u8; 32] = [0x42; 32];

/// Encodes records as frames (see the control bit 1).
pub fn build(mut records: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    let mut seq = 0;
    while let Some((t, payload, tail)) = crate::records::next_record(records) {
        let ty = FrameType::from_wire(t % 14 + 1).expect("1..=14 are frame types");
        let session = if seq == 0 { 0 } else { SESSION };
        encode_frame(ty, session, seq, payload, &mut wire);
        seq += 1;
        records = tail;
    }
    wire
}

/// Runs every handshake property on one fuzz input.
pub fn check(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let wire = if ctl & 2 != 0 {
        build(rest)
    } else {
        rest.to_vec()
    };
    let psk = Psk::new(KEY.to_vec()).expect("a valid key");
    let mut reader = FrameReader::new(&wire[..]);
    let mut writer = FrameWriter::new(Vec::new());
    let result = if ctl & 1 == 0 {
        let refuse = ctl & 4 != 0;
        server_handshake(&mut reader, &mut writer, &psk, Offer::default(), |sid| {
            if refuse {
                Err(Error::Protocol("refused".into()))
            } else if sid == 0 {
                Ok(SESSION)
            } else {
                Ok(sid)
            }
        })
        .map(|_| ())
    } else {
        client_handshake(&mut reader, &mut writer, &psk, Offer::default(), 0, 0).map(|_| ())
    };
    let result = match result {
        Ok(()) => panic!("a handshake succeeded without the key's proof"),
        Err(e) => e,
    };
    let written = writer.get_ref();
    assert!(
        written.len() <= 4 * (HEADER_LEN + 4096),
        "{} bytes written",
        written.len()
    );
    let mut at = 0;
    let mut last = None;
    while at < written.len() {
        let (h, _payload, used) =
            decode_frame(&written[at..], MAX_PAYLOAD).expect("the handshake writes valid frames");
        last = Some(h.frame_type);
        at += used;
    }
    if ctl & 1 == 0 && !matches!(result, Error::Peer { .. }) {
        assert_eq!(
            last,
            Some(FrameType::Error),
            "a failed server reports it: {result}"
        );
    }
}
