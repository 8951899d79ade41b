//! The link model, sans I/O: what happens to one direction's packets between the moment the forwarder
//! reads them and the moment it writes them out. Time is virtual (nanoseconds since an arbitrary start,
//! passed in by the caller), so every behaviour here is deterministic and tested without sleeping.
//!
//! One direction is a pipeline of four parts:
//!
//! ```text
//! offer(now, pkt) ──▶ [drop-tail queue] ──token bucket──▶ [loss model] ──▶ [delay line] ──▶ poll(now)
//!                     bounded in bytes    rate + burst     Bernoulli or     delay + jitter,
//!                     (full: dropped)                      Gilbert-Elliott  FIFO unless reordering
//! ```
//!
//! A packet waits in the queue until the token bucket holds enough tokens for it; it then "leaves the
//! interface" at that instant. Random loss is applied there, on the wire, so a lost packet has still
//! used its share of the rate (as on a real lossy link). A surviving packet is released at departure +
//! one-way delay + jitter, never before a previously released packet unless reordering is asked for.
//!
//! Over 600 lines because of its unit tests (from `mod tests` on); the model itself is under 600.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};

/// Nanoseconds of virtual time.
pub type Nanos = u64;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A token bucket: tokens (bytes) accumulate at `rate` bytes per second up to `burst` bytes; a packet of
/// `n` bytes may leave once `n` tokens are there, and takes them. A rate of 0 means unlimited.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Tokens in byte-nanoseconds-per-second units: bytes × 10⁹ (exact integer arithmetic).
    tokens: u128,
    last: Nanos,
}

impl TokenBucket {
    /// A full bucket at time 0. `burst` is raised to at least one byte.
    pub fn new(rate_bytes_per_sec: u64, burst_bytes: u64) -> Self {
        let burst = burst_bytes.max(1);
        Self {
            rate: rate_bytes_per_sec,
            burst,
            tokens: u128::from(burst) * NANOS_PER_SEC,
            last: 0,
        }
    }

    /// The rate in bytes per second (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The bucket depth in bytes.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    fn refill(&mut self, now: Nanos) {
        if now > self.last {
            let add = u128::from(now - self.last) * u128::from(self.rate);
            self.tokens = (self.tokens + add).min(u128::from(self.burst) * NANOS_PER_SEC);
            self.last = now;
        }
    }

    /// The earliest time, not before `now`, at which `len` bytes may leave. Packets larger than the burst
    /// are let through once the bucket is full (they would otherwise never leave).
    pub fn ready_at(&self, now: Nanos, len: u64) -> Nanos {
        if self.rate == 0 {
            return now.max(self.last);
        }
        let at = now.max(self.last);
        let mut tokens = self.tokens;
        if at > self.last {
            let add = u128::from(at - self.last) * u128::from(self.rate);
            tokens = (tokens + add).min(u128::from(self.burst) * NANOS_PER_SEC);
        }
        let need = u128::from(len.min(self.burst)) * NANOS_PER_SEC;
        if tokens >= need {
            return at;
        }
        let wait = (need - tokens).div_ceil(u128::from(self.rate));
        at + u64::try_from(wait).unwrap_or(u64::MAX / 2)
    }

    /// From `now` on, tokens accrue at `rate_bytes_per_sec` (0: unlimited) up to `burst_bytes`.
    /// Tokens earned at the old rate until `now` are kept (up to the new depth), and a debt stays a
    /// debt: a rate change never lets a burst through that neither rate would.
    pub fn set_rate(&mut self, now: Nanos, rate_bytes_per_sec: u64, burst_bytes: u64) {
        if self.rate != 0 {
            self.refill(now);
        }
        let burst = burst_bytes.max(1);
        if self.rate == 0 || rate_bytes_per_sec == 0 {
            // From or to unlimited: start from a full bucket at `now`, as a fresh link would.
            self.tokens = u128::from(burst) * NANOS_PER_SEC;
            self.last = self.last.max(now);
        } else if self.last > now {
            // Still in debt: what is owed, in bytes, is now paid back at the new rate.
            let owed = u128::from(self.last - now) * u128::from(self.rate);
            let wait = owed.div_ceil(u128::from(rate_bytes_per_sec));
            self.last = now + u64::try_from(wait).unwrap_or(u64::MAX / 2);
        }
        self.rate = rate_bytes_per_sec;
        self.burst = burst;
        self.tokens = self.tokens.min(u128::from(burst) * NANOS_PER_SEC);
    }

    /// Takes `len` bytes' worth of tokens at time `at` (which must be `ready_at` or later). The bucket
    /// may go into debt for a packet larger than the burst; later packets then wait for it.
    pub fn take(&mut self, at: Nanos, len: u64) {
        if self.rate == 0 {
            self.last = self.last.max(at);
            return;
        }
        self.refill(at);
        let need = u128::from(len) * NANOS_PER_SEC;
        if self.tokens >= need {
            self.tokens -= need;
        } else {
            // Debt: advance `last` so that the deficit is paid back before tokens count again.
            let deficit = need - self.tokens;
            self.tokens = 0;
            let wait = deficit.div_ceil(u128::from(self.rate));
            self.last = at + u64::try_from(wait).unwrap_or(u64::MAX / 2);
        }
    }
}

/// A random-loss model, applied per packet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case")]
pub enum LossModel {
    /// No random loss.
    None,
    /// Each packet is lost independently with probability `p`.
    Bernoulli {
        /// Loss probability, 0..=1.
        p: f64,
    },
    /// The Gilbert-Elliott two-state model: in the Good state a packet is lost with probability
    /// `loss_good`, in the Bad state with `loss_bad`; after each packet the state moves Good→Bad with
    /// probability `p` and Bad→Good with probability `r`. Bursty loss with `loss_good = 0`,
    /// `loss_bad = 1` (the Gilbert model): mean burst length `1/r`, mean loss `p / (p + r)`.
    GilbertElliott {
        /// P(Good → Bad) per packet.
        p: f64,
        /// P(Bad → Good) per packet.
        r: f64,
        /// Loss probability in the Good state (1 − k in the usual notation).
        loss_good: f64,
        /// Loss probability in the Bad state (1 − h).
        loss_bad: f64,
    },
}

impl LossModel {
    /// A Gilbert model (no loss in Good, all lost in Bad) with mean loss `rate` and mean burst length
    /// `burst` packets (≥ 1).
    pub fn bursty(rate: f64, burst: f64) -> Self {
        let r = 1.0 / burst.max(1.0);
        let rate = rate.clamp(0.0, 0.999);
        let p = rate * r / (1.0 - rate);
        Self::GilbertElliott {
            p,
            r,
            loss_good: 0.0,
            loss_bad: 1.0,
        }
    }

    /// The long-run fraction of packets lost.
    pub fn mean_loss(&self) -> f64 {
        match *self {
            LossModel::None => 0.0,
            LossModel::Bernoulli { p } => p,
            LossModel::GilbertElliott {
                p,
                r,
                loss_good,
                loss_bad,
            } => {
                if p + r <= 0.0 {
                    loss_good
                } else {
                    (r * loss_good + p * loss_bad) / (p + r)
                }
            }
        }
    }

    /// Checks that every probability is within 0..=1.
    pub fn validate(&self) -> Result<(), String> {
        let ok = |x: f64| (0.0..=1.0).contains(&x);
        let fine = match *self {
            LossModel::None => true,
            LossModel::Bernoulli { p } => ok(p),
            LossModel::GilbertElliott {
                p,
                r,
                loss_good,
                loss_bad,
            } => ok(p) && ok(r) && ok(loss_good) && ok(loss_bad),
        };
        if fine {
            Ok(())
        } else {
            Err(format!(
                "loss model {self:?}: probabilities must be within 0..=1"
            ))
        }
    }
}

/// A loss model with its state and its own seeded random stream.
#[derive(Debug, Clone)]
pub struct LossState {
    model: LossModel,
    bad: bool,
    rng: Xoshiro256PlusPlus,
}

impl LossState {
    /// Starts `model` in the Good state with a random stream seeded by `seed`.
    pub fn new(model: LossModel, seed: u64) -> Self {
        Self {
            model,
            bad: false,
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
        }
    }

    /// Whether the next packet is lost.
    pub fn lose(&mut self) -> bool {
        match self.model {
            LossModel::None => false,
            LossModel::Bernoulli { p } => p > 0.0 && self.rng.random::<f64>() < p,
            LossModel::GilbertElliott {
                p,
                r,
                loss_good,
                loss_bad,
            } => {
                let loss = if self.bad { loss_bad } else { loss_good };
                let lost = loss > 0.0 && self.rng.random::<f64>() < loss;
                let flip = if self.bad { r } else { p };
                if flip > 0.0 && self.rng.random::<f64>() < flip {
                    self.bad = !self.bad;
                }
                lost
            }
        }
    }
}

/// A drop-tail FIFO bounded in bytes. Entries carry their arrival time.
#[derive(Debug)]
pub struct DropTailQueue<T> {
    items: VecDeque<(Nanos, u64, T)>,
    bytes: u64,
    limit: u64,
}

impl<T> DropTailQueue<T> {
    /// An empty queue holding at most `limit_bytes` bytes.
    pub fn new(limit_bytes: u64) -> Self {
        Self {
            items: VecDeque::new(),
            bytes: 0,
            limit: limit_bytes,
        }
    }

    /// Appends a packet, or gives it back when it does not fit.
    pub fn push(&mut self, arrival: Nanos, len: u64, item: T) -> Result<(), T> {
        if self.bytes + len > self.limit {
            return Err(item);
        }
        self.bytes += len;
        self.items.push_back((arrival, len, item));
        Ok(())
    }

    /// The oldest packet's arrival time and length.
    pub fn front(&self) -> Option<(Nanos, u64)> {
        self.items.front().map(|&(a, l, _)| (a, l))
    }

    /// Removes the oldest packet.
    pub fn pop(&mut self) -> Option<(Nanos, u64, T)> {
        let e = self.items.pop_front()?;
        self.bytes -= e.1;
        Some(e)
    }

    /// Bytes queued.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Packets queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Packets in flight, each with its release time. Without reordering it is a FIFO whose release times
/// never decrease (a later packet is held back behind an earlier one, as on a real path); with
/// reordering, packets leave strictly by release time.
#[derive(Debug)]
pub struct DelayLine<T> {
    fifo: VecDeque<(Nanos, T)>,
    heap: BinaryHeap<Reverse<(Nanos, u64, Slot<T>)>>,
    reorder: bool,
    last_release: Nanos,
    seq: u64,
}

/// A heap entry that compares equal whatever it holds (ordering comes from the time and sequence).
#[derive(Debug)]
struct Slot<T>(T);

impl<T> PartialEq for Slot<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl<T> Eq for Slot<T> {}
impl<T> PartialOrd for Slot<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Slot<T> {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl<T> DelayLine<T> {
    /// An empty delay line; `reorder` lets packets overtake each other when their jitter says so.
    pub fn new(reorder: bool) -> Self {
        Self {
            fifo: VecDeque::new(),
            heap: BinaryHeap::new(),
            reorder,
            last_release: 0,
            seq: 0,
        }
    }

    /// Inserts a packet due at `release` (raised to the previous release time unless reordering).
    /// Returns the release time used.
    pub fn insert(&mut self, release: Nanos, item: T) -> Nanos {
        if self.reorder {
            self.seq += 1;
            self.heap.push(Reverse((release, self.seq, Slot(item))));
            release
        } else {
            let at = release.max(self.last_release);
            self.last_release = at;
            self.fifo.push_back((at, item));
            at
        }
    }

    /// The next release time.
    pub fn next_release(&self) -> Option<Nanos> {
        if self.reorder {
            self.heap.peek().map(|Reverse((t, _, _))| *t)
        } else {
            self.fifo.front().map(|(t, _)| *t)
        }
    }

    /// Takes the next packet if it is due at `now`.
    pub fn pop_due(&mut self, now: Nanos) -> Option<T> {
        if self.next_release()? > now {
            return None;
        }
        if self.reorder {
            self.heap.pop().map(|Reverse((_, _, Slot(t)))| t)
        } else {
            self.fifo.pop_front().map(|(_, t)| t)
        }
    }

    /// Packets in flight.
    pub fn len(&self) -> usize {
        self.fifo.len() + self.heap.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything that shapes one direction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DirectionConfig {
    /// Rate limit in bytes per second of IP packets (0: unlimited).
    pub rate_bytes_per_sec: u64,
    /// Token bucket depth in bytes.
    pub burst_bytes: u64,
    /// Drop-tail queue limit in bytes.
    pub queue_bytes: u64,
    /// Fixed one-way delay.
    pub delay_ns: Nanos,
    /// Jitter: each packet's delay is `delay ± jitter`, uniformly distributed (never below 0).
    pub jitter_ns: Nanos,
    /// Whether packets may overtake each other when jitter says so.
    pub reorder: bool,
    /// Random loss.
    pub loss: LossModel,
    /// Seed of the loss and jitter random streams.
    pub seed: u64,
}

/// Counters of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionStats {
    /// Packets offered.
    pub packets_in: u64,
    /// Bytes offered.
    pub bytes_in: u64,
    /// Packets dropped because the queue was full.
    pub queue_drops: u64,
    /// Packets lost by the loss model.
    pub lost: u64,
    /// Packets released.
    pub packets_out: u64,
    /// Bytes released.
    pub bytes_out: u64,
    /// Largest queue occupancy seen, in bytes.
    pub max_queue_bytes: u64,
}

/// What [`Direction::offer`] did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued (it may still be lost on the wire later).
    Queued,
    /// Dropped: the queue was full.
    QueueFull,
}

/// One direction of the emulated link: queue, token bucket, loss and delay line.
#[derive(Debug)]
pub struct Direction<T> {
    config: DirectionConfig,
    queue: DropTailQueue<T>,
    bucket: TokenBucket,
    loss: LossState,
    jitter_rng: Xoshiro256PlusPlus,
    line: DelayLine<T>,
    stats: DirectionStats,
}

impl<T> Direction<T> {
    /// A direction in its initial state (empty, full bucket) at time 0.
    pub fn new(config: DirectionConfig) -> Self {
        Self {
            config,
            queue: DropTailQueue::new(config.queue_bytes),
            bucket: TokenBucket::new(config.rate_bytes_per_sec, config.burst_bytes),
            loss: LossState::new(config.loss, config.seed),
            jitter_rng: Xoshiro256PlusPlus::seed_from_u64(config.seed ^ 0x6a09_e667_f3bc_c908),
            line: DelayLine::new(config.reorder),
            stats: DirectionStats::default(),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &DirectionConfig {
        &self.config
    }

    /// Its counters so far.
    pub fn stats(&self) -> DirectionStats {
        self.stats
    }

    /// Bytes waiting in the queue.
    pub fn queued_bytes(&self) -> u64 {
        self.queue.bytes()
    }

    /// Packets queued or in flight.
    pub fn in_transit(&self) -> usize {
        self.queue.len() + self.line.len()
    }

    /// Changes the rate from `now` on (bytes per second of IP packets, 0: unlimited) and the bucket
    /// depth with it. Packets already on the wire keep their release times; queued ones leave at
    /// the new rate.
    pub fn set_rate(&mut self, now: Nanos, rate_bytes_per_sec: u64, burst_bytes: u64) {
        self.advance(now);
        self.bucket.set_rate(now, rate_bytes_per_sec, burst_bytes);
        self.config.rate_bytes_per_sec = rate_bytes_per_sec;
        self.config.burst_bytes = burst_bytes;
    }

    /// A packet of `len` bytes arrives at `now`.
    pub fn offer(&mut self, now: Nanos, len: u64, packet: T) -> Offer {
        self.advance(now);
        self.stats.packets_in += 1;
        self.stats.bytes_in += len;
        match self.queue.push(now, len, packet) {
            Ok(()) => {
                self.stats.max_queue_bytes = self.stats.max_queue_bytes.max(self.queue.bytes());
                // It may leave at once.
                self.advance(now);
                Offer::Queued
            }
            Err(_) => {
                self.stats.queue_drops += 1;
                Offer::QueueFull
            }
        }
    }

    fn jitter(&mut self) -> i128 {
        let j = self.config.jitter_ns;
        if j == 0 {
            return 0;
        }
        i128::from(self.jitter_rng.random_range(0..=2 * j)) - i128::from(j)
    }

    /// Moves every packet whose tokens are available by `now` from the queue onto the wire.
    fn advance(&mut self, now: Nanos) {
        while let Some((arrival, len)) = self.queue.front() {
            let at = self.bucket.ready_at(arrival, len);
            if at > now {
                break;
            }
            self.bucket.take(at, len);
            let (_, _, packet) = self.queue.pop().expect("front exists");
            if self.loss.lose() {
                self.stats.lost += 1;
                continue;
            }
            let delay = (i128::from(self.config.delay_ns) + self.jitter()).max(0);
            let release = u64::try_from(i128::from(at) + delay).unwrap_or(u64::MAX / 2);
            self.line.insert(release, packet);
        }
    }

    /// The next instant at which something happens (a packet leaves the queue or is released), if any.
    pub fn next_event(&self) -> Option<Nanos> {
        let release = self.line.next_release();
        let depart = self
            .queue
            .front()
            .map(|(arrival, len)| self.bucket.ready_at(arrival, len));
        match (release, depart) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next packet due at `now`, if any.
    pub fn poll(&mut self, now: Nanos) -> Option<(T, u64)>
    where
        T: PacketLen,
    {
        self.advance(now);
        let p = self.line.pop_due(now)?;
        let len = p.packet_len();
        self.stats.packets_out += 1;
        self.stats.bytes_out += len;
        Some((p, len))
    }
}

/// Anything the model carries must tell its length when it leaves (for the counters).
pub trait PacketLen {
    /// Length in bytes.
    fn packet_len(&self) -> u64;
}

impl PacketLen for Vec<u8> {
    fn packet_len(&self) -> u64 {
        self.len() as u64
    }
}

/// A stand-in packet for tests and simulations: an id and a length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimPacket {
    /// Identifier (e.g. a sequence number).
    pub id: u64,
    /// Length in bytes.
    pub len: u64,
}

impl PacketLen for SimPacket {
    fn packet_len(&self) -> u64 {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MS: Nanos = 1_000_000;

    fn cfg() -> DirectionConfig {
        DirectionConfig {
            rate_bytes_per_sec: 0,
            burst_bytes: 65_536,
            queue_bytes: u64::MAX / 4,
            delay_ns: 0,
            jitter_ns: 0,
            reorder: false,
            loss: LossModel::None,
            seed: 1,
        }
    }

    /// Drives a direction through virtual time: `arrivals` are (time, len); returns (id, release time).
    fn simulate(dir: &mut Direction<SimPacket>, arrivals: &[(Nanos, u64)]) -> Vec<(u64, Nanos)> {
        let mut out = Vec::new();
        let mut i = 0;
        let mut now = 0;
        loop {
            let next_arrival = arrivals.get(i).map(|a| a.0);
            let next = match (next_arrival, dir.next_event()) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => break,
                },
            };
            assert!(next >= now, "time went backwards: {next} < {now}");
            now = next;
            while let Some(&(t, len)) = arrivals.get(i) {
                if t > now {
                    break;
                }
                dir.offer(now, len, SimPacket { id: i as u64, len });
                i += 1;
            }
            while let Some((p, _)) = dir.poll(now) {
                out.push((p.id, now));
            }
        }
        out
    }

    #[test]
    fn fixed_delay_only() {
        let mut d = Direction::new(DirectionConfig {
            delay_ns: 25 * MS,
            ..cfg()
        });
        let out = simulate(&mut d, &[(0, 100), (MS, 100), (2 * MS, 1500)]);
        assert_eq!(out, vec![(0, 25 * MS), (1, 26 * MS), (2, 27 * MS)]);
    }

    #[test]
    fn rate_spaces_packets_by_their_serialisation_time() {
        // 1,000,000 B/s, 1,000-byte burst: a 1,000-byte packet every ms.
        let mut d = Direction::new(DirectionConfig {
            rate_bytes_per_sec: 1_000_000,
            burst_bytes: 1_000,
            ..cfg()
        });
        let arrivals: Vec<_> = (0..10).map(|_| (0, 1_000)).collect();
        let out = simulate(&mut d, &arrivals);
        let times: Vec<_> = out.iter().map(|o| o.1).collect();
        assert_eq!(times, (0..10).map(|k| k * MS).collect::<Vec<_>>());
    }

    #[test]
    fn a_rate_change_applies_from_its_instant_on() {
        // 1,000,000 B/s with 1,000-byte packets (one per ms), halved at 5 ms, lifted at 15 ms.
        let mut d = Direction::new(DirectionConfig {
            rate_bytes_per_sec: 1_000_000,
            burst_bytes: 1_000,
            ..cfg()
        });
        for i in 0..20 {
            d.offer(0, 1_000, SimPacket { id: i, len: 1_000 });
        }
        let mut times = Vec::new();
        let mut now = 0;
        let mut changed = [false; 2];
        while times.len() < 20 {
            if !changed[0] && now >= 5 * MS {
                d.set_rate(5 * MS, 500_000, 1_000);
                changed[0] = true;
            }
            if !changed[1] && now >= 15 * MS {
                d.set_rate(15 * MS, 0, 1_000);
                changed[1] = true;
            }
            while let Some((p, _)) = d.poll(now) {
                times.push((p.id, now));
            }
            now = d
                .next_event()
                .unwrap_or(now + MS)
                .min(if changed[0] { 15 * MS } else { 5 * MS }.max(now + 1));
        }
        let t: Vec<_> = times.iter().map(|x| x.1).collect();
        // 0..=5 ms at the old rate, then one every 2 ms until 15 ms, then the rest at once.
        assert_eq!(&t[..6], &[0, MS, 2 * MS, 3 * MS, 4 * MS, 5 * MS]);
        assert_eq!(&t[6..11], &[7 * MS, 9 * MS, 11 * MS, 13 * MS, 15 * MS]);
        assert!(t[11..].iter().all(|&x| x == 15 * MS), "{t:?}");
        assert_eq!(d.config().rate_bytes_per_sec, 0);
    }

    #[test]
    fn a_rate_change_keeps_a_debt() {
        let mut b = TokenBucket::new(1_000_000, 1_000);
        b.take(0, 3_000); // 2 ms of debt at 1 MB/s: 2,000 bytes owed.
        b.set_rate(0, 2_000_000, 1_000);
        // Owed 2,000 bytes at 2 MB/s: 1 ms, then 1,000 bytes of tokens take 0.5 ms more.
        assert_eq!(b.ready_at(0, 1_000), 1_500_000);
    }

    #[test]
    fn burst_lets_a_full_bucket_through_at_once() {
        let mut d = Direction::new(DirectionConfig {
            rate_bytes_per_sec: 1_000_000,
            burst_bytes: 3_000,
            ..cfg()
        });
        let arrivals: Vec<_> = (0..5).map(|_| (0, 1_000)).collect();
        let out = simulate(&mut d, &arrivals);
        let times: Vec<_> = out.iter().map(|o| o.1).collect();
        assert_eq!(times, vec![0, 0, 0, MS, 2 * MS]);
    }

    #[test]
    fn queue_full_drops_the_tail() {
        let mut d = Direction::new(DirectionConfig {
            rate_bytes_per_sec: 1_000,
            burst_bytes: 1_000,
            queue_bytes: 2_500,
            ..cfg()
        });
        let mut verdicts = Vec::new();
        for i in 0..5 {
            verdicts.push(d.offer(0, 1_000, SimPacket { id: i, len: 1_000 }));
        }
        // The first leaves at once (full bucket); two more fit the 2,500-byte queue.
        assert_eq!(
            verdicts,
            vec![
                Offer::Queued,
                Offer::Queued,
                Offer::Queued,
                Offer::QueueFull,
                Offer::QueueFull
            ]
        );
        assert_eq!(d.stats().queue_drops, 2);
        assert_eq!(d.queued_bytes(), 2_000);
    }

    #[test]
    fn oversized_packet_still_leaves_and_the_debt_is_paid() {
        let mut d = Direction::new(DirectionConfig {
            rate_bytes_per_sec: 1_000_000,
            burst_bytes: 1_000,
            ..cfg()
        });
        let out = simulate(&mut d, &[(0, 3_000), (0, 1_000)]);
        // 3,000 bytes at 1 MB/s: the next 1,000-byte packet waits 2 ms (debt) + 1 ms (its own tokens).
        assert_eq!(out, vec![(0, 0), (1, 3 * MS)]);
    }

    #[test]
    fn jitter_without_reordering_keeps_fifo_and_bounds() {
        let mut d = Direction::new(DirectionConfig {
            delay_ns: 20 * MS,
            jitter_ns: 5 * MS,
            ..cfg()
        });
        let arrivals: Vec<_> = (0..2_000).map(|k| (k * MS / 10, 100)).collect();
        let out = simulate(&mut d, &arrivals);
        assert_eq!(out.len(), 2_000);
        for w in out.windows(2) {
            assert!(w[0].0 < w[1].0, "reordered");
            assert!(w[0].1 <= w[1].1);
        }
        let mut sum = 0.0;
        for &(id, t) in &out {
            let delay = t - arrivals[id as usize].0;
            assert!(delay >= 15 * MS, "{delay}");
            // Held back at most behind an earlier packet, itself at most 25 ms late.
            assert!(delay <= 25 * MS, "{delay}");
            sum += delay as f64;
        }
        // Packets 0.1 ms apart with ±5 ms jitter: holding each behind the previous one raises the mean
        // towards the upper bound (the price of no reordering; sparse packets see 20 ms on average).
        let mean = sum / out.len() as f64 / MS as f64;
        assert!((20.0..25.0).contains(&mean), "mean {mean} ms");
    }

    #[test]
    fn reordering_when_asked() {
        let mut d = Direction::new(DirectionConfig {
            delay_ns: 20 * MS,
            jitter_ns: 10 * MS,
            reorder: true,
            ..cfg()
        });
        let arrivals: Vec<_> = (0..1_000).map(|k| (k * MS / 10, 100)).collect();
        let out = simulate(&mut d, &arrivals);
        assert_eq!(out.len(), 1_000);
        let inversions = out.windows(2).filter(|w| w[0].0 > w[1].0).count();
        assert!(inversions > 100, "{inversions}");
        for &(id, t) in &out {
            let delay = t - arrivals[id as usize].0;
            assert!((10 * MS..=30 * MS).contains(&delay));
        }
    }

    #[test]
    fn bernoulli_rate() {
        let mut s = LossState::new(LossModel::Bernoulli { p: 0.01 }, 7);
        let n = 200_000;
        let lost = (0..n).filter(|_| s.lose()).count();
        let rate = lost as f64 / n as f64;
        assert!((0.009..0.011).contains(&rate), "{rate}");
    }

    #[test]
    fn gilbert_elliott_rate_and_bursts() {
        let model = LossModel::bursty(0.01, 4.0);
        assert!((model.mean_loss() - 0.01).abs() < 1e-12);
        let mut s = LossState::new(model, 11);
        let n = 400_000;
        let seq: Vec<bool> = (0..n).map(|_| s.lose()).collect();
        let lost = seq.iter().filter(|&&l| l).count();
        let rate = lost as f64 / n as f64;
        assert!((0.008..0.012).contains(&rate), "{rate}");
        let bursts = seq.windows(2).filter(|w| !w[0] && w[1]).count();
        let mean_burst = lost as f64 / bursts as f64;
        assert!((3.4..4.6).contains(&mean_burst), "{mean_burst}");
    }

    #[test]
    fn loss_is_reproducible_from_the_seed() {
        let run = |seed| {
            let mut s = LossState::new(LossModel::Bernoulli { p: 0.1 }, seed);
            (0..1_000).map(|_| s.lose()).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn lost_packets_still_use_the_rate() {
        let mut d = Direction::new(DirectionConfig {
            rate_bytes_per_sec: 1_000_000,
            burst_bytes: 1_000,
            loss: LossModel::Bernoulli { p: 0.5 },
            ..cfg()
        });
        let arrivals: Vec<_> = (0..100).map(|_| (0, 1_000)).collect();
        let out = simulate(&mut d, &arrivals);
        let s = d.stats();
        assert_eq!(s.lost + s.packets_out, 100);
        // Survivors leave on the 1 ms grid of all 100 departures.
        for &(id, t) in &out {
            assert_eq!(t, id * MS);
        }
    }

    proptest! {
        /// Over any arrival pattern: nothing is lost without being counted, FIFO order holds, no packet
        /// leaves before arrival + delay − jitter, and the long-run rate never exceeds the limit (plus
        /// one burst).
        #[test]
        fn conservation_order_and_rate(
            gaps in proptest::collection::vec(0u64..2 * MS, 1..300),
            lens in proptest::collection::vec(40u64..9_000, 300),
            rate in 100_000u64..50_000_000,
            queue in 10_000u64..200_000,
            delay in 0u64..30 * MS,
            jitter in 0u64..5 * MS,
            p in 0.0f64..0.2,
            seed in any::<u64>(),
        ) {
            let burst = 9_000;
            let mut d = Direction::new(DirectionConfig {
                rate_bytes_per_sec: rate,
                burst_bytes: burst,
                queue_bytes: queue,
                delay_ns: delay,
                jitter_ns: jitter,
                reorder: false,
                loss: LossModel::Bernoulli { p },
                seed,
            });
            let mut t = 0;
            let arrivals: Vec<_> = gaps.iter().zip(&lens).map(|(g, &l)| { t += g; (t, l) }).collect();
            let out = simulate(&mut d, &arrivals);
            let s = d.stats();
            prop_assert_eq!(s.packets_in, arrivals.len() as u64);
            prop_assert_eq!(s.queue_drops + s.lost + s.packets_out, s.packets_in);
            prop_assert_eq!(out.len() as u64, s.packets_out);
            prop_assert_eq!(d.in_transit(), 0);
            prop_assert!(s.max_queue_bytes <= queue);
            for w in out.windows(2) {
                prop_assert!(w[0].0 < w[1].0);
            }
            for &(id, at) in &out {
                prop_assert!(at + jitter >= arrivals[id as usize].0 + delay);
            }
            if let (Some(first), Some(last)) = (arrivals.first(), out.last()) {
                let bytes: u64 = out.iter().map(|&(id, _)| arrivals[id as usize].1).sum();
                let span = (last.1 + jitter).saturating_sub(first.0 + delay) as u128;
                let allowed = u128::from(burst) + span * u128::from(rate) / 1_000_000_000 + 9_000;
                prop_assert!(u128::from(bytes) <= allowed, "{} > {}", bytes, allowed);
            }
        }
    }
}
