//! Heartbeat and election timeouts, derived from the RTT measured to the peers at start.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Raft's timing. [`Timeouts::from_rtt`] gives the default; [`super::RaftConfig::timeouts`]
/// overrides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// How often the leader contacts each follower.
    pub heartbeat: Duration,
    /// A follower that heard nothing for a random time in `election_min..election_max` starts
    /// an election.
    pub election_min: Duration,
    /// See `election_min`.
    pub election_max: Duration,
}

impl Timeouts {
    /// Lowest heartbeat interval used. openraft also uses the heartbeat interval as the
    /// deadline of each AppendEntries, which must cover a follower's fsync on a loaded host:
    /// at 50 ms a busy 2-core machine timed out and resent entries several times a second.
    pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
    /// Lowest election timeout used: a scheduling hiccup or an fsync stall shorter than this
    /// must not depose a healthy leader.
    pub const MIN_ELECTION: Duration = Duration::from_millis(300);

    /// The rule: heartbeat = max(100 ms, 2 × RTT); election_min = max(300 ms, 10 × RTT,
    /// 3 × heartbeat); election_max = 2 × election_min. `rtt` is the largest of the median
    /// round trips to the peers that answered (`None` if none did: the floors apply).
    ///
    /// Why: a follower should miss several heartbeats (3) and an election needs a round trip to
    /// each voter plus an fsync before it can win, so ten RTTs is the least that keeps
    /// elections from colliding with slow but live leaders; the 2× spread of the random
    /// timeout keeps two candidates from splitting the vote again and again.
    pub fn from_rtt(rtt: Option<Duration>) -> Self {
        let rtt = rtt.unwrap_or_default();
        let heartbeat = Self::MIN_HEARTBEAT.max(rtt * 2);
        let election_min = Self::MIN_ELECTION.max(rtt * 10).max(heartbeat * 3);
        Self {
            heartbeat,
            election_min,
            election_max: election_min * 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_apply_on_loopback_and_rtt_scales_on_a_wan() {
        let lan = Timeouts::from_rtt(Some(Duration::from_micros(80)));
        assert_eq!(lan.heartbeat, Duration::from_millis(100));
        assert_eq!(lan.election_min, Duration::from_millis(300));
        assert_eq!(lan.election_max, Duration::from_millis(600));
        assert_eq!(Timeouts::from_rtt(None), lan);
        let wan = Timeouts::from_rtt(Some(Duration::from_millis(80)));
        assert_eq!(wan.heartbeat, Duration::from_millis(160));
        assert_eq!(wan.election_min, Duration::from_millis(800));
        assert_eq!(wan.election_max, Duration::from_millis(1600));
    }
}
