//! Link parameters, the named profiles, and parsing of the human forms used on command lines
//! (`1gbit`, `50ms`, `0.1%`, `ge:p=0.001,r=0.25`, `6MB`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{DirectionConfig, LossModel};

/// The MTU of the emulated link's TUN devices (see the crate docs for why it is large).
pub const DEFAULT_MTU: u32 = 65_000;

/// Largest IP packet the forwarder handles.
pub const MAX_PACKET: usize = 65_535;

/// Named link profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// No shaping at all: the forwarder's own ceiling (datacenter-like).
    Lan,
    /// 1 Gbit/s, 5 ms RTT, no loss.
    Metro,
    /// 1 Gbit/s, 50 ms RTT, 0.1% loss.
    Internet,
    /// 100 Mbit/s, 150 ms RTT, 1% loss.
    Poor,
    /// `internet` whose rate changes mid-run ([`SHIFTING_SCHEDULE`]: 1 Gbit/s, 300 Mbit/s from 5 s,
    /// 1 Gbit/s again from 12 s).
    Shifting,
}

impl Profile {
    /// Every profile, in order.
    pub const ALL: [Profile; 5] = [
        Profile::Lan,
        Profile::Metro,
        Profile::Internet,
        Profile::Poor,
        Profile::Shifting,
    ];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Lan => "lan",
            Profile::Metro => "metro",
            Profile::Internet => "internet",
            Profile::Poor => "poor",
            Profile::Shifting => "shifting",
        }
    }

    /// Its parameters.
    pub fn params(self) -> LinkParams {
        let base = LinkParams {
            rate_bps: 0,
            rtt: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: LossModel::None,
            queue: QueueLimit::Auto,
            reorder: false,
            seed: 1,
        };
        match self {
            Profile::Lan => base,
            Profile::Metro => LinkParams {
                rate_bps: 1_000_000_000,
                rtt: Duration::from_millis(5),
                ..base
            },
            Profile::Internet | Profile::Shifting => LinkParams {
                rate_bps: 1_000_000_000,
                rtt: Duration::from_millis(50),
                loss: LossModel::Bernoulli { p: 0.001 },
                ..base
            },
            Profile::Poor => LinkParams {
                rate_bps: 100_000_000,
                rtt: Duration::from_millis(150),
                loss: LossModel::Bernoulli { p: 0.01 },
                ..base
            },
        }
    }
}

impl Profile {
    /// The rate changes this profile makes after the link comes up (empty for a steady profile).
    pub fn schedule(self) -> &'static [RateStep] {
        match self {
            Profile::Shifting => &SHIFTING_SCHEDULE,
            _ => &[],
        }
    }
}

impl FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Profile::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown profile {s:?} (lan, metro, internet, poor, shifting)"))
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How large each direction's drop-tail queue is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueLimit {
    /// rate × max(RTT, 10 ms), at least 4 maximum-size packets (about one bandwidth-delay product).
    Auto,
    /// A number of bytes.
    Bytes(u64),
    /// The bytes the rate drains in this time.
    Time(Duration),
}

/// The parameters of a symmetric emulated link: both directions get the same rate, half the RTT as
/// one-way delay, the same jitter, queue and loss model (with different random streams).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkParams {
    /// Rate limit in bits per second of IP packets, per direction (0: unlimited).
    pub rate_bps: u64,
    /// Round-trip time (each direction delays by half of it).
    pub rtt: Duration,
    /// Jitter of each direction's delay (uniform in ±jitter).
    pub jitter: Duration,
    /// Random loss per direction.
    pub loss: LossModel,
    /// Queue limit per direction.
    pub queue: QueueLimit,
    /// Whether jitter may reorder packets.
    pub reorder: bool,
    /// Seed of the random streams.
    pub seed: u64,
}

impl LinkParams {
    /// The queue limit in bytes.
    pub fn queue_bytes(&self) -> u64 {
        let rate = self.rate_bps / 8;
        let min = 4 * MAX_PACKET as u64;
        if rate == 0 {
            // No rate limit: the queue never builds; keep a generous bound anyway.
            return match self.queue {
                QueueLimit::Bytes(b) => b,
                _ => 64 << 20,
            };
        }
        let of_time = |d: Duration| (u128::from(rate) * d.as_nanos() / 1_000_000_000) as u64;
        match self.queue {
            QueueLimit::Auto => of_time(self.rtt.max(Duration::from_millis(10))).max(min),
            QueueLimit::Bytes(b) => b,
            QueueLimit::Time(d) => of_time(d).max(MAX_PACKET as u64),
        }
    }

    /// The token bucket depth: 1 ms at the rate, at least one maximum-size packet.
    pub fn burst_bytes(&self) -> u64 {
        burst_bytes_of(self.rate_bps)
    }

    /// The configuration of one direction (`index` 0: source → destination, 1: the reverse).
    pub fn direction(&self, index: u64) -> DirectionConfig {
        DirectionConfig {
            rate_bytes_per_sec: self.rate_bps / 8,
            burst_bytes: self.burst_bytes(),
            queue_bytes: self.queue_bytes(),
            delay_ns: u64::try_from(self.rtt.as_nanos() / 2).unwrap_or(u64::MAX / 4),
            jitter_ns: u64::try_from(self.jitter.as_nanos()).unwrap_or(u64::MAX / 4),
            reorder: self.reorder,
            loss: self.loss,
            seed: self
                .seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(index),
        }
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), String> {
        self.loss.validate()?;
        if self.rtt > Duration::from_secs(10) || self.jitter > Duration::from_secs(5) {
            return Err("RTT above 10 s or jitter above 5 s is not supported".into());
        }
        Ok(())
    }

    /// A one-line human summary.
    pub fn summary(&self) -> String {
        let rate = if self.rate_bps == 0 {
            "unlimited".to_string()
        } else {
            format_rate(self.rate_bps)
        };
        let loss = match self.loss {
            LossModel::None => "no loss".to_string(),
            LossModel::Bernoulli { p } => format!("{}% loss (Bernoulli)", trim(p * 100.0)),
            m @ LossModel::GilbertElliott { r, .. } => format!(
                "{}% loss (Gilbert-Elliott, mean burst {} packets)",
                trim(m.mean_loss() * 100.0),
                trim(1.0 / r.max(1e-9))
            ),
        };
        let mut s = format!(
            "{rate}, RTT {} ms, {loss}, queue {} KB",
            trim(self.rtt.as_secs_f64() * 1e3),
            self.queue_bytes() / 1000
        );
        if !self.jitter.is_zero() {
            s.push_str(&format!(
                ", jitter ±{} ms{}",
                trim(self.jitter.as_secs_f64() * 1e3),
                if self.reorder { " (reordering)" } else { "" }
            ));
        }
        s
    }
}

/// The token bucket depth for a rate in bits per second: 1 ms at the rate, at least one maximum-size
/// packet.
pub fn burst_bytes_of(rate_bps: u64) -> u64 {
    (rate_bps / 8 / 1000).max(MAX_PACKET as u64 + 1)
}

/// One step of a rate schedule: from `at` after the link comes up, the rate is `rate_bps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateStep {
    /// When, counted from the moment the link forwards.
    pub at: Duration,
    /// The new rate per direction, bits per second (0: unlimited).
    pub rate_bps: u64,
}

/// The schedule of the `shifting` profile: 1 Gbit/s, down to 300 Mbit/s at 5 s, back up at 12 s,
/// the kind of change a shared internet path shows when a competing flow comes and goes.
pub const SHIFTING_SCHEDULE: [RateStep; 2] = [
    RateStep {
        at: Duration::from_secs(5),
        rate_bps: 300_000_000,
    },
    RateStep {
        at: Duration::from_secs(12),
        rate_bps: 1_000_000_000,
    },
];

/// Parses `5s:300mbit,12s:1gbit` into steps sorted by time (at most 1000 steps, each within a day);
/// `none` is the empty schedule (a steady rate, even on the `shifting` profile).
pub fn parse_schedule(s: &str) -> Result<Vec<RateStep>, String> {
    let mut steps = Vec::new();
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(steps);
    }
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (at, rate) = part
            .split_once(':')
            .ok_or_else(|| format!("schedule step {part:?} is not TIME:RATE (e.g. 5s:300mbit)"))?;
        let at = parse_duration(at)?;
        if at > Duration::from_secs(86_400) {
            return Err(format!("schedule step {part:?} is more than a day away"));
        }
        steps.push(RateStep {
            at,
            rate_bps: parse_rate(rate)?,
        });
        if steps.len() > 1000 {
            return Err("a rate schedule has at most 1000 steps".into());
        }
    }
    if steps.is_empty() {
        return Err("an empty rate schedule".into());
    }
    steps.sort_by_key(|s| s.at);
    Ok(steps)
}

fn trim(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// `1000000000` → `1 Gbit/s`.
pub fn format_rate(bps: u64) -> String {
    let b = bps as f64;
    if b >= 1e9 {
        format!("{} Gbit/s", trim(b / 1e9))
    } else if b >= 1e6 {
        format!("{} Mbit/s", trim(b / 1e6))
    } else {
        format!("{} kbit/s", trim(b / 1e3))
    }
}

fn split_unit(s: &str) -> (&str, String) {
    let s = s.trim();
    let at = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    (&s[..at], s[at..].trim().to_ascii_lowercase())
}

/// Parses a rate in bits per second: `1gbit`, `100mbit`, `500M`, `1G`, `2.5gbps`, `0`/`unlimited`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    let (num, unit) = split_unit(s);
    let n: f64 = num.parse().map_err(|_| format!("bad rate {s:?}"))?;
    let mult = match unit.trim_end_matches("/s").trim_end_matches("ps") {
        "" | "bit" | "b" => 1.0,
        "k" | "kbit" | "kb" => 1e3,
        "m" | "mbit" | "mb" => 1e6,
        "g" | "gbit" | "gb" => 1e9,
        _ => return Err(format!("bad rate unit in {s:?} (use kbit, mbit or gbit)")),
    };
    Ok((n * mult).round() as u64)
}

/// Parses a duration: `50ms`, `1.5s`, `200us`, or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = split_unit(s);
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit.as_str() {
        "" | "ms" => n / 1e3,
        "s" => n,
        "us" | "µs" => n / 1e6,
        _ => return Err(format!("bad duration unit in {s:?} (use s, ms or us)")),
    };
    if !(0.0..1e6).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a probability: `0.1%` or `0.001`.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let v = if let Some(pct) = s.strip_suffix('%') {
        pct.trim()
            .parse::<f64>()
            .map_err(|_| format!("bad percentage {s:?}"))?
            / 100.0
    } else {
        s.parse::<f64>()
            .map_err(|_| format!("bad probability {s:?}"))?
    };
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("probability {s:?} is not within 0..=1"))
    }
}

/// Parses a loss model: `0` / `none`, `0.1%` (Bernoulli), `0.1%/burst=4` (Gilbert with a mean burst of
/// 4 packets), or `ge:p=0.001,r=0.25[,good=0][,bad=1]` (Gilbert-Elliott with its four parameters).
pub fn parse_loss(s: &str) -> Result<LossModel, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("none") {
        return Ok(LossModel::None);
    }
    if let Some(rest) = s.strip_prefix("ge:") {
        let (mut p, mut r, mut good, mut bad) = (None, None, 0.0, 1.0);
        for kv in rest.split(',') {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("bad Gilbert-Elliott parameter {kv:?} (key=value)"))?;
            let v = parse_fraction(v)?;
            match k.trim() {
                "p" => p = Some(v),
                "r" => r = Some(v),
                "good" | "loss_good" => good = v,
                "bad" | "loss_bad" => bad = v,
                other => return Err(format!("unknown Gilbert-Elliott parameter {other:?}")),
            }
        }
        let m = LossModel::GilbertElliott {
            p: p.ok_or("Gilbert-Elliott needs p=")?,
            r: r.ok_or("Gilbert-Elliott needs r=")?,
            loss_good: good,
            loss_bad: bad,
        };
        m.validate()?;
        return Ok(m);
    }
    if let Some((rate, burst)) = s.split_once("/burst=") {
        let rate = parse_fraction(rate)?;
        let burst: f64 = burst
            .trim()
            .parse()
            .map_err(|_| format!("bad burst length in {s:?}"))?;
        if rate == 0.0 {
            return Ok(LossModel::None);
        }
        return Ok(LossModel::bursty(rate, burst));
    }
    let p = parse_fraction(s)?;
    Ok(if p == 0.0 {
        LossModel::None
    } else {
        LossModel::Bernoulli { p }
    })
}

/// Parses a queue limit: `auto`, `6MB`, `512KB`, `100000` (bytes), `60ms`.
pub fn parse_queue(s: &str) -> Result<QueueLimit, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(QueueLimit::Auto);
    }
    let (num, unit) = split_unit(s);
    let n: f64 = num.parse().map_err(|_| format!("bad queue limit {s:?}"))?;
    let bytes = |m: f64| Ok(QueueLimit::Bytes((n * m).round() as u64));
    match unit.as_str() {
        "" | "b" => bytes(1.0),
        "kb" | "k" => bytes(1e3),
        "mb" | "m" => bytes(1e6),
        "kib" => bytes(1024.0),
        "mib" => bytes(1024.0 * 1024.0),
        "ms" | "s" | "us" => parse_duration(s).map(QueueLimit::Time),
        _ => Err(format!(
            "bad queue limit unit in {s:?} (bytes, KB, MB or ms)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles() {
        let p = Profile::Internet.params();
        assert_eq!(p.rate_bps, 1_000_000_000);
        assert_eq!(p.rtt, Duration::from_millis(50));
        assert_eq!(p.loss.mean_loss(), 0.001);
        assert_eq!(p.queue_bytes(), 6_250_000);
        let d = p.direction(0);
        assert_eq!(d.delay_ns, 25_000_000);
        assert_eq!(d.rate_bytes_per_sec, 125_000_000);
        assert_ne!(p.direction(0).seed, p.direction(1).seed);
        assert_eq!(Profile::Metro.params().queue_bytes(), 1_250_000);
        assert_eq!("Poor".parse::<Profile>().unwrap(), Profile::Poor);
        assert!("mars".parse::<Profile>().is_err());
        assert!(Profile::Poor.params().summary().contains("100 Mbit/s"));
        assert_eq!("shifting".parse::<Profile>().unwrap(), Profile::Shifting);
        assert_eq!(Profile::Shifting.schedule()[0].rate_bps, 300_000_000);
        assert!(Profile::Internet.schedule().is_empty());
    }

    #[test]
    fn schedules() {
        let s = parse_schedule("12s:1gbit, 5s:300mbit").unwrap();
        assert_eq!(s, SHIFTING_SCHEDULE.to_vec());
        assert_eq!(parse_schedule("0s:unlimited").unwrap()[0].rate_bps, 0);
        assert!(parse_schedule("none").unwrap().is_empty());
        for bad in ["", "5s", "5s:fast", "x:1gbit", "100000s:1gbit"] {
            assert!(parse_schedule(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parsing() {
        assert_eq!(parse_rate("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("100Mbit/s").unwrap(), 100_000_000);
        assert_eq!(parse_rate("2.5G").unwrap(), 2_500_000_000);
        assert_eq!(parse_rate("500mbps").unwrap(), 500_000_000);
        assert!(parse_rate("5 parsecs").is_err());
        assert_eq!(parse_duration("50ms").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_millis(7));
        assert_eq!(parse_fraction("0.1%").unwrap(), 0.001);
        assert!(parse_fraction("120%").is_err());
        assert_eq!(parse_loss("0").unwrap(), LossModel::None);
        assert_eq!(parse_loss("1%").unwrap(), LossModel::Bernoulli { p: 0.01 });
        let ge = parse_loss("1%/burst=4").unwrap();
        assert!((ge.mean_loss() - 0.01).abs() < 1e-12);
        let ge = parse_loss("ge:p=0.01,r=0.5,good=0,bad=0.5").unwrap();
        assert!((ge.mean_loss() - 0.01 * 0.5 / 0.51).abs() < 1e-12);
        assert!(parse_loss("ge:p=0.01").is_err());
        assert_eq!(parse_queue("6MB").unwrap(), QueueLimit::Bytes(6_000_000));
        assert_eq!(
            parse_queue("60ms").unwrap(),
            QueueLimit::Time(Duration::from_millis(60))
        );
    }
}
