//! The RDMA setup messages exchanged over the TCP side channel, before a queue pair carries anything.
//!
//! ```text
//! client → server  Hello   "RDMA" version(1) 0 0 0  Endpoint
//! server → client  Reply   0 Endpoint               (accepted: the server's QP is ready to receive)
//!                          1 len(u16) reason        (refused: both sides go on over this TCP stream)
//! client → server  Ready   0                        (the client's QP is connected: RDMA from now on)
//!                          1 len(u16) reason        (the client failed: both go on over TCP)
//! Endpoint = lid u16, qpn u32, psn u32, gid [16], mtu u8, link_layer u8, queue_depth u32,
//!            slot_len u32, slots u16, slots × (addr u64, rkey u32)            (all little-endian)
//! ```
//!
//! A plain TCP client (a DWCP peer without RDMA) starts with a DWCP frame, whose magic is `DWCP`, so
//! the server tells the two apart from the first four bytes. Everything read here comes from an
//! unauthenticated peer: counts and lengths are bounded before anything is allocated.

use std::io::{Read, Write};

use crate::RdmaError;

/// First bytes of a Hello.
pub(crate) const MAGIC: [u8; 4] = *b"RDMA";
/// Version of these messages.
pub(crate) const VERSION: u8 = 1;
/// Most receive-ring slots a peer may announce.
pub(crate) const MAX_RING_SLOTS: usize = 256;
/// Smallest and largest slot a peer may announce.
pub(crate) const SLOT_LEN_RANGE: std::ops::RangeInclusive<u32> = 256..=(64 << 20);
/// Longest refusal reason read (longer ones are cut when sent).
pub(crate) const MAX_REASON: usize = 1024;

/// One slot of a receive ring: where the peer may RDMA-write, and with which key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RemoteSlot {
    pub(crate) addr: u64,
    pub(crate) rkey: u32,
}

/// Everything a peer needs to connect its queue pair to ours and write into our ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) lid: u16,
    pub(crate) qpn: u32,
    pub(crate) psn: u32,
    pub(crate) gid: [u8; 16],
    pub(crate) mtu: u8,
    pub(crate) link_layer: u8,
    pub(crate) queue_depth: u32,
    pub(crate) slot_len: u32,
    pub(crate) slots: Vec<RemoteSlot>,
}

/// The server's answer to a Hello (and the client's Ready has the same shape without an endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Accepted(Endpoint),
    Refused(String),
}

fn malformed(what: &str, why: impl Into<String>) -> RdmaError {
    RdmaError::Protocol(format!("{what}: {}", why.into()))
}

fn read_array<const N: usize>(r: &mut impl Read, what: &str) -> Result<[u8; N], RdmaError> {
    let mut b = [0u8; N];
    r.read_exact(&mut b).map_err(|e| RdmaError::Io {
        context: format!("reading {what}"),
        source: e,
    })?;
    Ok(b)
}

fn write_all(w: &mut impl Write, bytes: &[u8], what: &str) -> Result<(), RdmaError> {
    w.write_all(bytes)
        .and_then(|()| w.flush())
        .map_err(|e| RdmaError::Io {
            context: format!("sending {what}"),
            source: e,
        })
}

impl Endpoint {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.lid.to_le_bytes());
        out.extend_from_slice(&self.qpn.to_le_bytes());
        out.extend_from_slice(&self.psn.to_le_bytes());
        out.extend_from_slice(&self.gid);
        out.push(self.mtu);
        out.push(self.link_layer);
        out.extend_from_slice(&self.queue_depth.to_le_bytes());
        out.extend_from_slice(&self.slot_len.to_le_bytes());
        out.extend_from_slice(&(self.slots.len() as u16).to_le_bytes());
        for s in &self.slots {
            out.extend_from_slice(&s.addr.to_le_bytes());
            out.extend_from_slice(&s.rkey.to_le_bytes());
        }
    }

    fn decode(r: &mut impl Read) -> Result<Self, RdmaError> {
        let h: [u8; 38] = read_array(r, "RDMA endpoint")?;
        let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&h[10..26]);
        let (mtu, link_layer) = (h[26], h[27]);
        let (queue_depth, slot_len, count) = (u32_at(28), u32_at(32), u16_at(36) as usize);
        if !(1..=5).contains(&mtu) {
            return Err(malformed(
                "RDMA endpoint",
                format!("MTU code {mtu} (1..=5)"),
            ));
        }
        if queue_depth == 0 {
            return Err(malformed("RDMA endpoint", "queue depth 0"));
        }
        if !SLOT_LEN_RANGE.contains(&slot_len) {
            return Err(malformed(
                "RDMA endpoint",
                format!("slot length {slot_len} outside {SLOT_LEN_RANGE:?}"),
            ));
        }
        if !(1..=MAX_RING_SLOTS).contains(&count) {
            return Err(malformed(
                "RDMA endpoint",
                format!("{count} ring slots (1..={MAX_RING_SLOTS})"),
            ));
        }
        let mut slots = Vec::with_capacity(count);
        for _ in 0..count {
            let s: [u8; 12] = read_array(r, "RDMA ring slot")?;
            let mut addr = [0u8; 8];
            addr.copy_from_slice(&s[..8]);
            slots.push(RemoteSlot {
                addr: u64::from_le_bytes(addr),
                rkey: u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
            });
        }
        Ok(Self {
            lid: u16_at(0),
            qpn: u32_at(2),
            psn: u32_at(6),
            gid,
            mtu,
            link_layer,
            queue_depth,
            slot_len,
            slots,
        })
    }
}

fn encode_reason(out: &mut Vec<u8>, reason: &str) {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
}

fn decode_reason(r: &mut impl Read) -> Result<String, RdmaError> {
    let len = u16::from_le_bytes(read_array(r, "refusal length")?) as usize;
    if len > MAX_REASON {
        return Err(malformed(
            "refusal",
            format!("{len} bytes (at most {MAX_REASON})"),
        ));
    }
    let mut b = vec![0u8; len];
    r.read_exact(&mut b).map_err(|e| RdmaError::Io {
        context: "reading a refusal reason".into(),
        source: e,
    })?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

/// Sends a Hello carrying our endpoint.
pub(crate) fn send_hello(w: &mut impl Write, ep: &Endpoint) -> Result<(), RdmaError> {
    let mut out = Vec::with_capacity(64 + 12 * ep.slots.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[VERSION, 0, 0, 0]);
    ep.encode(&mut out);
    write_all(w, &out, "the RDMA hello")
}

/// What the first bytes of a Hello said.
#[derive(Debug)]
pub(crate) enum Hello {
    Endpoint(Endpoint),
    /// A version we do not speak: refuse it (the peer falls back to TCP).
    UnsupportedVersion(u8),
}

/// Reads a Hello whose magic the caller has already seen (it is read again here).
pub(crate) fn read_hello(r: &mut impl Read) -> Result<Hello, RdmaError> {
    let h: [u8; 8] = read_array(r, "RDMA hello")?;
    if h[..4] != MAGIC {
        return Err(malformed("RDMA hello", format!("magic {:?}", &h[..4])));
    }
    if h[4] != VERSION {
        return Ok(Hello::UnsupportedVersion(h[4]));
    }
    Ok(Hello::Endpoint(Endpoint::decode(r)?))
}

/// Sends the server's reply.
pub(crate) fn send_reply(w: &mut impl Write, reply: &Reply) -> Result<(), RdmaError> {
    let mut out = Vec::new();
    match reply {
        Reply::Accepted(ep) => {
            out.push(0);
            ep.encode(&mut out);
        }
        Reply::Refused(reason) => {
            out.push(1);
            encode_reason(&mut out, reason);
        }
    }
    write_all(w, &out, "the RDMA reply")
}

/// Reads the server's reply.
pub(crate) fn read_reply(r: &mut impl Read) -> Result<Reply, RdmaError> {
    match read_array::<1>(r, "RDMA reply")?[0] {
        0 => Ok(Reply::Accepted(Endpoint::decode(r)?)),
        1 => Ok(Reply::Refused(decode_reason(r)?)),
        s => Err(malformed("RDMA reply", format!("status {s}"))),
    }
}

/// Sends the client's verdict: `Ok` = its queue pair is connected, `Err(reason)` = use TCP.
pub(crate) fn send_ready(w: &mut impl Write, result: Result<(), &str>) -> Result<(), RdmaError> {
    let mut out = Vec::new();
    match result {
        Ok(()) => out.push(0),
        Err(reason) => {
            out.push(1);
            encode_reason(&mut out, reason);
        }
    }
    write_all(w, &out, "the RDMA ready message")
}

/// Reads the client's verdict.
pub(crate) fn read_ready(r: &mut impl Read) -> Result<Result<(), String>, RdmaError> {
    match read_array::<1>(r, "RDMA ready message")?[0] {
        0 => Ok(Ok(())),
        1 => Ok(Err(decode_reason(r)?)),
        s => Err(malformed("RDMA ready message", format!("status {s}"))),
    }
}

/// Whether `first` (the first bytes of a new connection) start a Hello.
pub(crate) fn is_hello(first: &[u8]) -> bool {
    first.len() >= MAGIC.len() && first[..MAGIC.len()] == MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(slots: usize) -> Endpoint {
        Endpoint {
            lid: 7,
            qpn: 0x11_2233,
            psn: 0xab_cdef,
            gid: [9; 16],
            mtu: 3,
            link_layer: 2,
            queue_depth: 1024,
            slot_len: 1 << 20,
            slots: (0..slots)
                .map(|i| RemoteSlot {
                    addr: 0x1000_0000 + i as u64 * (1 << 20),
                    rkey: 100 + i as u32,
                })
                .collect(),
        }
    }

    #[test]
    fn hello_reply_and_ready_round_trip() {
        let ep = endpoint(8);
        let mut buf = Vec::new();
        send_hello(&mut buf, &ep).unwrap();
        assert!(is_hello(&buf));
        match read_hello(&mut buf.as_slice()).unwrap() {
            Hello::Endpoint(got) => assert_eq!(got, ep),
            other => panic!("{other:?}"),
        }
        for reply in [
            Reply::Accepted(ep.clone()),
            Reply::Refused("no device".into()),
        ] {
            let mut buf = Vec::new();
            send_reply(&mut buf, &reply).unwrap();
            assert_eq!(read_reply(&mut buf.as_slice()).unwrap(), reply);
        }
        let mut buf = Vec::new();
        send_ready(&mut buf, Err("RTR failed")).unwrap();
        assert_eq!(
            read_ready(&mut buf.as_slice()).unwrap(),
            Err("RTR failed".to_string())
        );
    }

    #[test]
    fn a_dwcp_frame_is_not_a_hello() {
        let mut frame = Vec::new();
        dwcp_core::frame::encode_frame(
            dwcp_core::frame::FrameType::ClientHello,
            0,
            0,
            b"x",
            &mut frame,
        );
        assert!(!is_hello(&frame));
        assert!(!is_hello(b"RD"));
    }

    #[test]
    fn hostile_counts_and_lengths_are_refused_before_allocating() {
        let mut good = Vec::new();
        endpoint(1).encode(&mut good);
        // The slot count sits at bytes 36..38 of the endpoint.
        let mut too_many = good.clone();
        too_many[36..38].copy_from_slice(&u16::MAX.to_le_bytes());
        let e = Endpoint::decode(&mut too_many.as_slice()).unwrap_err();
        assert!(e.to_string().contains("65535 ring slots"), "{e}");
        let mut zero = good.clone();
        zero[36..38].copy_from_slice(&0u16.to_le_bytes());
        assert!(Endpoint::decode(&mut zero.as_slice()).is_err());
        let mut huge_slot = good.clone();
        huge_slot[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = Endpoint::decode(&mut huge_slot.as_slice()).unwrap_err();
        assert!(e.to_string().contains("slot length"), "{e}");
        let mut bad_mtu = good.clone();
        bad_mtu[26] = 9;
        assert!(Endpoint::decode(&mut bad_mtu.as_slice()).is_err());
        // A truncated message is an I/O error, not a panic.
        let e = Endpoint::decode(&mut &good[..good.len() - 1]).unwrap_err();
        assert!(matches!(e, RdmaError::Io { .. }), "{e}");
        // An oversized refusal reason.
        let mut refusal = vec![1u8];
        refusal.extend_from_slice(&u16::MAX.to_le_bytes());
        let e = read_reply(&mut refusal.as_slice()).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        // An unknown version is reported, not misparsed.
        let mut hello = Vec::new();
        send_hello(&mut hello, &endpoint(1)).unwrap();
        hello[4] = 2;
        assert!(matches!(
            read_hello(&mut hello.as_slice()).unwrap(),
            Hello::UnsupportedVersion(2)
        ));
    }

    #[test]
    fn long_reasons_are_cut_on_a_character_boundary() {
        let reason = "é".repeat(MAX_REASON);
        let mut buf = Vec::new();
        send_ready(&mut buf, Err(&reason)).unwrap();
        let got = read_ready(&mut buf.as_slice()).unwrap().unwrap_err();
        assert!(got.len() <= MAX_REASON && reason.starts_with(&got));
    }
}
