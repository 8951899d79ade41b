//! Properties of the QEMU tunnel's decoders: `dwcp_qemu::wire::Message::decode` (every tunnel frame
//! payload), `dwcp_qemu::segment::decode` (a ChannelData body) and the `dwcp_qemu::state::Tunnel`
//! state machine fed with what they accept.
//!
//! Input: byte 0 is a control byte (bit 0: the tunnel is the source, else the destination; bits 1-2:
//! live channels allowed, 1, 2, 4 or 32), the rest is records `type (u8) ‖ len (u16 LE) ‖ payload`,
//! each one frame of type `32 + t % 10` (types 32..=39, then Close and Error).
//!
//! Checked: no panic; an accepted message other than Close re-encodes to exactly its payload; an
//! accepted segment body decodes to exactly `raw_len` (≤ 256 KiB) bytes or is refused; the tunnel
//! never buffers more than its window per channel, delivers bytes in order and only what arrived.

use dwcp_core::frame::FrameType;
use dwcp_qemu::segment;
use dwcp_qemu::state::{Event, Role, Tunnel};
use dwcp_qemu::wire::{MAX_SEGMENT, Message};

/// The window of the fuzzed tunnel (the smallest allowed).
pub const WINDOW: u64 = MAX_SEGMENT as u64;

fn frame_type(t: u8) -> FrameType {
    match t % 10 {
        8 => FrameType::Close,
        9 => FrameType::Error,
        n => FrameType::from_wire(32 + n).expect("32..=39 are tunnel frame types"),
    }
}

/// Runs every property on one fuzz input.
pub fn check(data: &[u8]) {
    let Some((&ctl, mut records)) = data.split_first() else {
        return;
    };
    let role = if ctl & 1 == 1 {
        Role::Source
    } else {
        Role::Destination
    };
    let max_channels = [1, 2, 4, 32][usize::from((ctl >> 1) & 3)];
    let mut tunnel = Tunnel::new(role, WINDOW, max_channels);
    let mut raw = Vec::new();
    let mut delivered = 0u64;
    while let Some((t, payload, tail)) = crate::records::next_record(records) {
        records = tail;
        let ty = frame_type(t);
        let Ok(msg) = Message::decode(ty, payload) else {
            continue;
        };
        if ty != FrameType::Close {
            assert_eq!(msg.encode(), payload, "{msg:?} re-encodes to its payload");
        }
        let events = match msg {
            Message::Data {
                channel,
                seq,
                encoding,
                raw_len,
                body,
            } => {
                if segment::decode(encoding, raw_len, body, &mut raw).is_err() {
                    continue;
                }
                assert_eq!(raw.len(), raw_len as usize, "a segment decodes to its size");
                assert!(raw.len() <= MAX_SEGMENT);
                tunnel.on_data(channel, seq, raw.clone())
            }
            ref m => tunnel.on_message(m),
        };
        let Ok(events) = events else {
            // The I/O layer tears the tunnel down on any protocol error.
            return;
        };
        for event in events {
            if let Event::Deliver(channel, bytes) = event {
                delivered += bytes.len() as u64;
                // The writer writes it at once: acknowledge it as the I/O layer does.
                let _ = tunnel.on_written(channel, bytes.len() as u64, true);
            }
        }
        let counters = tunnel.counters();
        assert!(
            delivered <= counters.raw_received,
            "delivered more than arrived"
        );
        assert!(tunnel.live_channels() <= max_channels);
    }
}
