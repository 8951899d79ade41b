//! The tunnel's state machine, without sockets (sans-IO): channel ids, per-direction sequencing and
//! reassembly, flow-control windows, half-close and reset. The I/O layer ([`crate::endpoint`]) feeds
//! it what arrived and what its local sockets did, and carries out the [`Event`]s and messages it
//! returns. Everything here is deterministic and tested without a network.
//!
//! Over 600 lines because of its unit tests (from `mod tests` on); the state machine itself is
//! under 450.

use std::collections::{BTreeMap, HashSet};

use dwcp_core::error::Error;

use crate::segment::RawSegment;
use crate::wire::{MAX_SEGMENT, Message};

/// A receiver acknowledges at least every this many written bytes.
pub const ACK_EVERY: u64 = 1 << 20;

/// Which end of the tunnel this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts QEMU's outgoing connections and opens channels.
    Source,
    /// Connects to the destination QEMU for every channel the source opens.
    Destination,
}

/// What the I/O layer must do after a message arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new channel exists (destination: connect to QEMU, in id order).
    Opened(u32),
    /// Bytes to write to the channel's local QEMU connection, in order.
    Deliver(u32, RawSegment),
    /// Every byte of the peer's direction was delivered above: shut down the local write side.
    Ended(u32),
    /// The peer reset the channel: tear down the local connection.
    Reset(u32, String),
    /// The peer acknowledged bytes: the channel's sender may have credit again.
    Credit(u32),
}

/// Receiving half of one channel: puts segments back in order and checks the peer's window.
#[derive(Debug, Default)]
struct Inbound {
    next_seq: u64,
    pending: BTreeMap<u64, RawSegment>,
    /// Raw bytes received, in order or not.
    received: u64,
    /// Raw bytes released in order to the local writer.
    released: u64,
    /// Raw bytes the local writer has written.
    written: u64,
    /// The delivered count last acknowledged to the peer.
    acked: u64,
    /// The peer's End: (segments, bytes).
    end: Option<(u64, u64)>,
    /// Ended was emitted.
    complete: bool,
}

/// Sending half of one channel.
#[derive(Debug, Default)]
struct Outbound {
    next_seq: u64,
    sent: u64,
    acked: u64,
    ended: bool,
}

#[derive(Debug, Default)]
struct Channel {
    inbound: Inbound,
    outbound: Outbound,
    open_seen: bool,
}

/// Counters of a tunnel, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TunnelCounters {
    /// Channels opened in this session.
    pub channels: u64,
    /// Channels that were reset (by either side).
    pub resets: u64,
    /// Raw bytes sent.
    pub raw_sent: u64,
    /// Raw bytes received.
    pub raw_received: u64,
    /// Frames for channels already retired, ignored (late acknowledgements, data after a reset).
    pub stale_frames: u64,
}

/// The tunnel's session state.
#[derive(Debug)]
pub struct Tunnel {
    role: Role,
    window: u64,
    /// Raw bytes one channel may have in flight by the sender's own choice (at most `window`).
    send_window: u64,
    max_channels: usize,
    channels: BTreeMap<u32, Channel>,
    retired: HashSet<u32>,
    next_local_id: u32,
    counters: TunnelCounters,
}

fn protocol(msg: String) -> Error {
    Error::Protocol(msg)
}

impl Tunnel {
    /// A tunnel with `window` raw bytes of credit per channel and direction (at least
    /// [`MAX_SEGMENT`]) and at most `max_channels` live channels.
    pub fn new(role: Role, window: u64, max_channels: usize) -> Self {
        Self {
            role,
            window: window.max(MAX_SEGMENT as u64),
            send_window: window.max(MAX_SEGMENT as u64),
            max_channels,
            channels: BTreeMap::new(),
            retired: HashSet::new(),
            next_local_id: 0,
            counters: TunnelCounters::default(),
        }
    }

    /// The window in use.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Limits what each channel of this side has in flight to `window` raw bytes (at most the
    /// negotiated window, at least [`MAX_SEGMENT`]). A sender may always use less than the peer allows:
    /// beyond the path's bandwidth-delay product more bytes in flight only add backlog, which QEMU
    /// pays for after it stopped the guest. The limit is per channel, never shared: QEMU's destination
    /// waits on one connection for data of another (multifd sync), so a shared limit filled by a
    /// connection it is not reading could stall the one it waits for.
    pub fn set_send_window(&mut self, window: u64) {
        self.send_window = window.clamp(MAX_SEGMENT as u64, self.window);
    }

    /// Counters so far.
    pub fn counters(&self) -> TunnelCounters {
        self.counters
    }

    /// Channels not yet retired.
    pub fn live_channels(&self) -> usize {
        self.channels.len()
    }

    /// Source: a new channel for a QEMU connection just accepted; returns its id and the ChannelOpen
    /// to send.
    pub fn open_local(&mut self) -> Result<(u32, Message<'static>), Error> {
        if self.role != Role::Source {
            return Err(Error::Config("only the source opens channels".into()));
        }
        if self.channels.len() >= self.max_channels {
            return Err(Error::Config(format!(
                "more than {} QEMU connections at once",
                self.max_channels
            )));
        }
        let id = self.next_local_id;
        if id >= crate::wire::MAX_CHANNEL_ID {
            return Err(Error::Config("channel ids exhausted".into()));
        }
        self.next_local_id += 1;
        self.channels.insert(
            id,
            Channel {
                open_seen: true,
                ..Channel::default()
            },
        );
        self.counters.channels += 1;
        Ok((id, Message::Open { channel: id }))
    }

    /// The channel `id` for a frame from the peer: `None` when it is retired (the frame is ignored),
    /// created on first sight on the destination (data may overtake ChannelOpen on another stream).
    fn peer_channel(
        &mut self,
        id: u32,
        events: &mut Vec<Event>,
    ) -> Result<Option<&mut Channel>, Error> {
        if self.retired.contains(&id) {
            self.counters.stale_frames += 1;
            return Ok(None);
        }
        if !self.channels.contains_key(&id) {
            if self.role == Role::Source {
                return Err(protocol(format!(
                    "the destination sent a frame for channel {id}, which the source never opened"
                )));
            }
            if self.channels.len() >= self.max_channels {
                return Err(protocol(format!(
                    "the source opened more than {} channels at once",
                    self.max_channels
                )));
            }
            self.channels.insert(id, Channel::default());
            self.counters.channels += 1;
            events.push(Event::Opened(id));
        }
        Ok(self.channels.get_mut(&id))
    }

    /// Handles a message other than ChannelData (see [`Tunnel::on_data`]).
    pub fn on_message(&mut self, msg: &Message<'_>) -> Result<Vec<Event>, Error> {
        let mut events = Vec::new();
        match msg {
            Message::Open { channel } => {
                if self.role == Role::Source {
                    return Err(protocol("the destination sent ChannelOpen".into()));
                }
                if let Some(ch) = self.peer_channel(*channel, &mut events)? {
                    if ch.open_seen {
                        return Err(protocol(format!("channel {channel} opened twice")));
                    }
                    ch.open_seen = true;
                }
            }
            Message::Ack { channel, delivered } => {
                if let Some(ch) = self.peer_channel(*channel, &mut events)? {
                    let out = &mut ch.outbound;
                    if *delivered > out.sent {
                        return Err(protocol(format!(
                            "channel {channel}: acknowledgement of {delivered} bytes, only {} sent",
                            out.sent
                        )));
                    }
                    // Acks are cumulative and may overtake each other on different streams.
                    if *delivered > out.acked {
                        out.acked = *delivered;
                        events.push(Event::Credit(*channel));
                    }
                }
            }
            Message::End {
                channel,
                segments,
                bytes,
            } => {
                if let Some(ch) = self.peer_channel(*channel, &mut events)? {
                    let inb = &mut ch.inbound;
                    if inb.end.is_some() {
                        return Err(protocol(format!("channel {channel} ended twice")));
                    }
                    if *segments < inb.next_seq
                        || inb
                            .pending
                            .last_key_value()
                            .is_some_and(|(s, _)| s >= segments)
                    {
                        return Err(protocol(format!(
                            "channel {channel}: end after {segments} segments, but more arrived"
                        )));
                    }
                    inb.end = Some((*segments, *bytes));
                    Self::check_complete(*channel, inb, &mut events)?;
                }
            }
            Message::Reset { channel, reason } => {
                if let Some(_ch) = self.peer_channel(*channel, &mut events)? {
                    self.retire(*channel);
                    self.counters.resets += 1;
                    events.push(Event::Reset(*channel, reason.clone()));
                }
            }
            Message::Keepalive | Message::Close => {}
            Message::Data { .. } => {
                return Err(Error::Config(
                    "ChannelData goes through Tunnel::on_data".into(),
                ));
            }
            Message::Init(_) | Message::Ready(_) => {
                return Err(protocol(format!(
                    "unexpected {} after the tunnel was set up",
                    msg.frame_type().name()
                )));
            }
        }
        Ok(events)
    }

    /// Handles segment `seq` of `channel`, already decoded to `raw` (at most [`MAX_SEGMENT`] bytes).
    pub fn on_data(
        &mut self,
        channel: u32,
        seq: u64,
        raw: impl Into<RawSegment>,
    ) -> Result<Vec<Event>, Error> {
        let raw = raw.into();
        let mut events = Vec::new();
        let window = self.window;
        let Some(ch) = self.peer_channel(channel, &mut events)? else {
            return Ok(events);
        };
        let inb = &mut ch.inbound;
        if raw.is_empty() || raw.len() > MAX_SEGMENT {
            return Err(protocol(format!(
                "channel {channel}: segment of {} bytes",
                raw.len()
            )));
        }
        if seq < inb.next_seq || inb.pending.contains_key(&seq) {
            return Err(protocol(format!(
                "channel {channel}: segment {seq} received twice"
            )));
        }
        if let Some((segments, _)) = inb.end
            && seq >= segments
        {
            return Err(protocol(format!(
                "channel {channel}: segment {seq} after the end ({segments} segments)"
            )));
        }
        inb.received += raw.len() as u64;
        if inb.received - inb.acked > window {
            return Err(protocol(format!(
                "channel {channel}: the peer sent {} bytes beyond what was acknowledged, over the \
                 window of {window}",
                inb.received - inb.acked
            )));
        }
        let len = raw.len() as u64;
        inb.pending.insert(seq, raw);
        while let Some(raw) = inb.pending.remove(&inb.next_seq) {
            inb.next_seq += 1;
            inb.released += raw.len() as u64;
            events.push(Event::Deliver(channel, raw));
        }
        Self::check_complete(channel, inb, &mut events)?;
        self.counters.raw_received += len;
        Ok(events)
    }

    fn check_complete(
        channel: u32,
        inb: &mut Inbound,
        events: &mut Vec<Event>,
    ) -> Result<(), Error> {
        if let Some((segments, bytes)) = inb.end
            && !inb.complete
            && inb.next_seq == segments
        {
            if inb.released != bytes {
                return Err(protocol(format!(
                    "channel {channel}: end announces {bytes} bytes, {} arrived",
                    inb.released
                )));
            }
            inb.complete = true;
            events.push(Event::Ended(channel));
        }
        Ok(())
    }

    /// The local writer wrote `n` more bytes of `channel`; `idle` says its queue is now empty. Returns
    /// the ChannelAck to send, if one is due: after [`ACK_EVERY`] bytes (or a quarter of the window if
    /// that is less), or whenever the writer caught up (so the sender never waits for credit the writer
    /// already freed, and a sender sharing a small budget over several channels keeps moving).
    pub fn on_written(&mut self, channel: u32, n: u64, idle: bool) -> Option<Message<'static>> {
        let window = self.window;
        let inb = &mut self.channels.get_mut(&channel)?.inbound;
        inb.written = (inb.written + n).min(inb.released);
        let unacked = inb.written - inb.acked;
        if unacked > 0 && (idle || unacked >= (window / 4).min(ACK_EVERY)) {
            inb.acked = inb.written;
            Some(Message::Ack {
                channel,
                delivered: inb.written,
            })
        } else {
            None
        }
    }

    /// Credit of `channel`'s sending direction: raw bytes that may be sent before the next
    /// acknowledgement. `None` when the channel is gone (reset or retired).
    pub fn credit(&self, channel: u32) -> Option<u64> {
        let out = &self.channels.get(&channel)?.outbound;
        Some(self.send_window.saturating_sub(out.sent - out.acked))
    }

    /// Takes the next sequence number for a segment of `raw_len` bytes of `channel`, which must fit
    /// the credit the channel was given. `None` when the channel is gone.
    pub fn next_segment(&mut self, channel: u32, raw_len: usize) -> Option<u64> {
        let window = self.send_window;
        let out = &mut self.channels.get_mut(&channel)?.outbound;
        assert!(
            !out.ended && out.sent - out.acked + raw_len as u64 <= window,
            "segment outside the window"
        );
        let seq = out.next_seq;
        out.next_seq += 1;
        out.sent += raw_len as u64;
        self.counters.raw_sent += raw_len as u64;
        Some(seq)
    }

    /// The local QEMU closed its side of `channel`: returns the ChannelEnd to send.
    pub fn end_local(&mut self, channel: u32) -> Option<Message<'static>> {
        let out = &mut self.channels.get_mut(&channel)?.outbound;
        if out.ended {
            return None;
        }
        out.ended = true;
        Some(Message::End {
            channel,
            segments: out.next_seq,
            bytes: out.sent,
        })
    }

    /// Whether both directions of `channel` are finished: the local side ended and sent everything,
    /// and the peer's side ended and every byte of it was written locally.
    pub fn is_finished(&self, channel: u32) -> bool {
        self.channels.get(&channel).is_none_or(|ch| {
            ch.outbound.ended && ch.inbound.complete && ch.inbound.written == ch.inbound.released
        })
    }

    /// A local failure of `channel`: returns the ChannelReset to send (once).
    pub fn reset_local(&mut self, channel: u32, reason: &str) -> Option<Message<'static>> {
        self.channels.get(&channel)?;
        self.retire(channel);
        self.counters.resets += 1;
        Some(Message::Reset {
            channel,
            reason: reason.to_string(),
        })
    }

    /// Forgets a channel; later frames for it are ignored.
    pub fn retire(&mut self, channel: u32) {
        if self.channels.remove(&channel).is_some() {
            self.retired.insert(channel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const W: u64 = MAX_SEGMENT as u64 * 4;

    /// Sends `data` from a source tunnel to a destination tunnel in segments of `seg` bytes, delivering
    /// the frames in the order `order` permutes them into; returns the bytes the destination released.
    fn carry(
        data: &[u8],
        seg: usize,
        order: impl Fn(&mut Vec<(u64, Vec<u8>)>),
    ) -> (Vec<u8>, Vec<Event>) {
        let mut src = Tunnel::new(Role::Source, W * 100, 4);
        let mut dst = Tunnel::new(Role::Destination, W * 100, 4);
        let (id, open) = src.open_local().unwrap();
        let mut frames = Vec::new();
        for piece in data.chunks(seg) {
            let seq = src.next_segment(id, piece.len()).unwrap();
            frames.push((seq, piece.to_vec()));
        }
        order(&mut frames);
        let mut out = Vec::new();
        let mut events = dst.on_message(&open).unwrap();
        for (seq, raw) in frames {
            events.extend(dst.on_data(id, seq, raw).unwrap());
        }
        events.extend(dst.on_message(&src.end_local(id).unwrap()).unwrap());
        for e in &events {
            if let Event::Deliver(_, b) = e {
                out.extend_from_slice(b);
            }
        }
        (out, events)
    }

    #[test]
    fn reordered_segments_come_out_in_order_then_end() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let (out, events) = carry(&data, 1000, |f| f.reverse());
        assert_eq!(out, data);
        assert_eq!(events.first(), Some(&Event::Opened(0)));
        assert_eq!(events.last(), Some(&Event::Ended(0)));
        // Nothing is released before segment 0 arrives, which is last here.
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::Deliver(..)))
                .count(),
            100
        );
    }

    #[test]
    fn refuses_duplicates_overruns_and_lies_about_the_end() {
        let mut dst = Tunnel::new(Role::Destination, W, 4);
        dst.on_data(0, 0, vec![1; 10]).unwrap();
        assert!(
            dst.on_data(0, 0, vec![1; 10]).is_err(),
            "duplicate in order"
        );
        dst.on_data(0, 5, vec![1; 10]).unwrap();
        assert!(dst.on_data(0, 5, vec![1; 10]).is_err(), "duplicate pending");

        let mut dst = Tunnel::new(Role::Destination, W, 4);
        let mut seq = 0;
        let mut total = 0;
        while total + MAX_SEGMENT as u64 <= W {
            dst.on_data(1, seq, vec![1; MAX_SEGMENT]).unwrap();
            seq += 1;
            total += MAX_SEGMENT as u64;
        }
        assert!(dst.on_data(1, seq, vec![1]).is_err(), "window overrun");
        // Writing and acknowledging frees the window again.
        let ack = dst.on_written(1, total, true).unwrap();
        assert_eq!(
            ack,
            Message::Ack {
                channel: 1,
                delivered: total
            }
        );
        dst.on_data(1, seq, vec![1; MAX_SEGMENT]).unwrap();

        let mut dst = Tunnel::new(Role::Destination, W, 4);
        dst.on_data(2, 0, vec![1; 10]).unwrap();
        let end = |segments, bytes| Message::End {
            channel: 2,
            segments,
            bytes,
        };
        assert!(dst.on_message(&end(1, 11)).is_err(), "wrong byte count");
        let mut dst = Tunnel::new(Role::Destination, W, 4);
        dst.on_data(2, 0, vec![1; 10]).unwrap();
        dst.on_data(2, 3, vec![1; 10]).unwrap();
        assert!(
            dst.on_message(&end(2, 20)).is_err(),
            "segment beyond the end"
        );
        let mut dst = Tunnel::new(Role::Destination, W, 4);
        dst.on_message(&end(1, 10)).unwrap();
        assert!(dst.on_data(2, 1, vec![1]).is_err(), "data after the end");
        assert_eq!(
            dst.on_data(2, 0, vec![1; 10]).unwrap(),
            vec![Event::Deliver(2, vec![1; 10].into()), Event::Ended(2)]
        );
        assert!(dst.on_message(&end(1, 10)).is_err(), "second end");
    }

    #[test]
    fn roles_and_channel_limits_are_enforced() {
        let mut src = Tunnel::new(Role::Source, W, 2);
        assert!(src.on_message(&Message::Open { channel: 0 }).is_err());
        assert!(
            src.on_data(7, 0, vec![1]).is_err(),
            "data for a channel never opened"
        );
        src.open_local().unwrap();
        src.open_local().unwrap();
        assert!(src.open_local().is_err(), "over the limit");

        let mut dst = Tunnel::new(Role::Destination, W, 2);
        assert!(dst.open_local().is_err());
        dst.on_message(&Message::Open { channel: 0 }).unwrap();
        assert!(
            dst.on_message(&Message::Open { channel: 0 }).is_err(),
            "opened twice"
        );
        dst.on_data(1, 0, vec![1]).unwrap();
        assert!(dst.on_data(2, 0, vec![1]).is_err(), "a third live channel");
        assert!(
            dst.on_message(&Message::Init(crate::wire::TunnelInit {
                version: 1,
                streams: 1,
                window: 1
            }))
            .is_err()
        );
    }

    #[test]
    fn acks_give_credit_and_stale_frames_are_ignored() {
        let mut src = Tunnel::new(Role::Source, W, 4);
        let (id, _) = src.open_local().unwrap();
        assert_eq!(src.credit(id), Some(W));
        src.next_segment(id, 1000).unwrap();
        src.next_segment(id, 1000).unwrap();
        assert_eq!(src.credit(id), Some(W - 2000));
        assert!(
            src.on_message(&Message::Ack {
                channel: id,
                delivered: 2001
            })
            .is_err()
        );
        assert_eq!(
            src.on_message(&Message::Ack {
                channel: id,
                delivered: 2000
            })
            .unwrap(),
            vec![Event::Credit(id)]
        );
        // An older cumulative ack overtaken by a newer one changes nothing.
        assert!(
            src.on_message(&Message::Ack {
                channel: id,
                delivered: 1000
            })
            .unwrap()
            .is_empty()
        );
        assert_eq!(src.credit(id), Some(W));
        let reset = src.reset_local(id, "QEMU went away").unwrap();
        assert!(matches!(reset, Message::Reset { channel: 0, .. }));
        assert_eq!(src.credit(id), None);
        assert!(
            src.on_message(&Message::Ack {
                channel: id,
                delivered: 5
            })
            .unwrap()
            .is_empty()
        );
        assert_eq!(src.counters().stale_frames, 1);

        let mut dst = Tunnel::new(Role::Destination, W, 4);
        let events = dst
            .on_message(&Message::Reset {
                channel: 3,
                reason: "gone".into(),
            })
            .unwrap();
        assert_eq!(
            events,
            vec![Event::Opened(3), Event::Reset(3, "gone".into())]
        );
        assert!(
            dst.on_data(3, 0, vec![1]).unwrap().is_empty(),
            "data after a reset is dropped"
        );
    }

    #[test]
    fn a_smaller_send_window_limits_only_the_sender_and_each_channel_alone() {
        let seg = MAX_SEGMENT as u64;
        let mut src = Tunnel::new(Role::Source, W, 4);
        src.set_send_window(seg);
        let (a, _) = src.open_local().unwrap();
        let (b, _) = src.open_local().unwrap();
        src.next_segment(a, MAX_SEGMENT).unwrap();
        assert_eq!(src.credit(a), Some(0));
        assert_eq!(
            src.credit(b),
            Some(seg),
            "one channel's bytes never hold another back"
        );
        src.set_send_window(W * 10);
        assert_eq!(
            src.credit(a),
            Some(W - seg),
            "never above the negotiated window"
        );
        // The receiving side still allows the full negotiated window.
        src.on_data(a, 0, vec![1; MAX_SEGMENT]).unwrap();
        src.on_data(a, 1, vec![1; MAX_SEGMENT]).unwrap();
    }

    #[test]
    fn finished_needs_both_directions() {
        let mut src = Tunnel::new(Role::Source, W, 4);
        let (id, _) = src.open_local().unwrap();
        src.next_segment(id, 10).unwrap();
        assert!(!src.is_finished(id));
        src.end_local(id).unwrap();
        assert!(src.end_local(id).is_none(), "one end per direction");
        assert!(!src.is_finished(id));
        src.on_data(id, 0, vec![9; 3]).unwrap();
        src.on_message(&Message::End {
            channel: id,
            segments: 1,
            bytes: 3,
        })
        .unwrap();
        assert!(!src.is_finished(id), "not yet written locally");
        src.on_written(id, 3, true);
        assert!(src.is_finished(id));
    }

    #[test]
    fn acks_are_sent_when_idle_or_after_a_quarter_window() {
        let mut dst = Tunnel::new(Role::Destination, W, 4);
        dst.on_data(0, 0, vec![1; MAX_SEGMENT]).unwrap();
        assert_eq!(dst.on_written(0, 100, false), None);
        assert!(dst.on_written(0, 100, true).is_some());
        assert_eq!(
            dst.on_written(0, 0, true),
            None,
            "nothing new to acknowledge"
        );
    }

    proptest! {
        #[test]
        fn any_permutation_reassembles(len in 1usize..20_000, seg in 1usize..3000, seed: u64) {
            let data: Vec<u8> = (0..len).map(|i| (i as u64 ^ seed) as u8).collect();
            let (out, events) = carry(&data, seg, |f| {
                // A deterministic shuffle from the seed.
                let mut x = seed | 1;
                for i in (1..f.len()).rev() {
                    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                    f.swap(i, (x % (i as u64 + 1)) as usize);
                }
            });
            prop_assert_eq!(out, data);
            prop_assert_eq!(events.last(), Some(&Event::Ended(0)));
        }
    }
}
