//! [`NodeState`], its bounds, and its encoding under chitchat keys.
//!
//! The state is split over three keys ([`crate::keys`]) because chitchat ships deltas key by key:
//! the resource figures change on every publish, the addresses almost never and the link
//! forecasts now and then, so a publish that only moves `cpu_load` sends one small value, not the
//! whole state. chitchat skips a `set` whose value is unchanged, so an unchanged key costs nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::AssError;
use crate::keys::{
    ADDR, LINKS, MAX_ADDR_BYTES, MAX_ADDR_VALUE_BYTES, MAX_LINK_FORECASTS, MAX_LINKS_VALUE_BYTES,
    MAX_RES_VALUE_BYTES, RES,
};

/// One node's state as its agent publishes it and every peer eventually sees it.
///
/// `seq` and `updated_at_ms` are stamped by [`crate::Gossip::publish`]; whatever the caller put
/// there is overwritten, so a peer can trust `seq` to grow by one per publish of one incarnation
/// (it restarts at 1 with a new [`crate::NodeView::generation`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NodeState {
    /// Memory not yet promised to guests, in bytes.
    pub free_memory: u64,
    /// Memory of the host, in bytes.
    pub memory_total: u64,
    /// Load average (or any finite, non-negative load figure the agent chooses).
    pub cpu_load: f64,
    /// vCPUs that can still be given to guests.
    pub vcpus_free: u32,
    /// Guests running on the host.
    pub running_vms: u32,
    /// Where a migration source should connect to send a VM here (`host:port`).
    pub migration_addr: String,
    /// Where the node's agent answers control requests (`host:port`).
    pub agent_addr: String,
    /// PBA's forecast of the rate from this node to each peer node id, in bytes per second.
    pub link_forecasts: BTreeMap<u64, f64>,
    /// The publisher's wall clock at publish, in milliseconds since the Unix epoch. Only for
    /// display and coarse checks: peers' clocks are not assumed to agree; staleness is measured
    /// with the observer's own monotonic clock ([`crate::NodeView::staleness`]).
    pub updated_at_ms: u64,
    /// Publish counter of this incarnation, from 1.
    pub seq: u64,
}

/// The frequently changing part, under [`RES`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Res {
    pub(crate) seq: u64,
    pub(crate) at_ms: u64,
    pub(crate) free_memory: u64,
    pub(crate) memory_total: u64,
    pub(crate) cpu_load: f64,
    pub(crate) vcpus_free: u32,
    pub(crate) running_vms: u32,
}

/// The addresses, under [`ADDR`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Addr {
    pub(crate) migration: String,
    pub(crate) agent: String,
}

/// The link forecasts, under [`LINKS`].
pub(crate) type Links = BTreeMap<u64, f64>;

fn check_load(cpu_load: f64) -> Result<(), String> {
    if cpu_load.is_finite() && cpu_load >= 0.0 {
        Ok(())
    } else {
        Err(format!(
            "cpu_load {cpu_load} is not a finite, non-negative number"
        ))
    }
}

fn check_addr(what: &str, addr: &str) -> Result<(), String> {
    if addr.len() > MAX_ADDR_BYTES {
        Err(format!(
            "{what} is {} bytes, over {MAX_ADDR_BYTES}",
            addr.len()
        ))
    } else {
        Ok(())
    }
}

fn check_links(links: &Links) -> Result<(), String> {
    if links.len() > MAX_LINK_FORECASTS {
        return Err(format!(
            "{} link forecasts, over {MAX_LINK_FORECASTS}",
            links.len()
        ));
    }
    for (peer, rate) in links {
        if !rate.is_finite() || *rate < 0.0 {
            return Err(format!(
                "forecast {rate} for peer {peer} is not a finite, non-negative rate"
            ));
        }
    }
    Ok(())
}

/// Checks the bounds a peer would also check, so a publish never produces a value peers drop.
pub(crate) fn validate(state: &NodeState) -> Result<(), AssError> {
    check_load(state.cpu_load)
        .and_then(|()| check_addr("migration_addr", &state.migration_addr))
        .and_then(|()| check_addr("agent_addr", &state.agent_addr))
        .and_then(|()| check_links(&state.link_forecasts))
        .map_err(AssError::InvalidState)
}

fn bounded(key: &'static str, value: String, max: usize) -> Result<String, AssError> {
    if value.len() > max {
        Err(AssError::TooLarge {
            key,
            len: value.len(),
            max,
        })
    } else {
        Ok(value)
    }
}

/// Encodes `state` as (key, value) pairs, `seq` and `at_ms` stamped in. Fails on a bound, before
/// anything is published, so the three keys are set together or not at all.
pub(crate) fn encode(
    state: &NodeState,
    seq: u64,
    at_ms: u64,
) -> Result<[(&'static str, String); 3], AssError> {
    validate(state)?;
    let res = Res {
        seq,
        at_ms,
        free_memory: state.free_memory,
        memory_total: state.memory_total,
        cpu_load: state.cpu_load,
        vcpus_free: state.vcpus_free,
        running_vms: state.running_vms,
    };
    let addr = Addr {
        migration: state.migration_addr.clone(),
        agent: state.agent_addr.clone(),
    };
    Ok([
        (RES, bounded(RES, json(&res)?, MAX_RES_VALUE_BYTES)?),
        (ADDR, bounded(ADDR, json(&addr)?, MAX_ADDR_VALUE_BYTES)?),
        (
            LINKS,
            bounded(LINKS, json(&state.link_forecasts)?, MAX_LINKS_VALUE_BYTES)?,
        ),
    ])
}

/// serde_json cannot fail on these types (integer map keys, floats checked finite), but mapping
/// the error keeps a future field from turning into a panic.
fn json<T: Serialize>(value: &T) -> Result<String, AssError> {
    serde_json::to_string(value).map_err(|e| AssError::InvalidState(e.to_string()))
}

/// Decodes a peer's value of [`RES`]; `Err` says why it is ignored.
pub(crate) fn decode_res(value: &str) -> Result<Res, String> {
    if value.len() > MAX_RES_VALUE_BYTES {
        return Err(format!(
            "{} bytes, over the {MAX_RES_VALUE_BYTES}-byte bound",
            value.len()
        ));
    }
    let res: Res =
        serde_json::from_str(value).map_err(|e| format!("not a resource record: {e}"))?;
    check_load(res.cpu_load)?;
    Ok(res)
}

/// Decodes a peer's value of [`ADDR`]; `Err` says why it is ignored.
pub(crate) fn decode_addr(value: &str) -> Result<Addr, String> {
    if value.len() > MAX_ADDR_VALUE_BYTES {
        return Err(format!(
            "{} bytes, over the {MAX_ADDR_VALUE_BYTES}-byte bound",
            value.len()
        ));
    }
    let addr: Addr =
        serde_json::from_str(value).map_err(|e| format!("not an address record: {e}"))?;
    check_addr("migration address", &addr.migration)?;
    check_addr("agent address", &addr.agent)?;
    Ok(addr)
}

/// Decodes a peer's value of [`LINKS`]; `Err` says why it is ignored.
pub(crate) fn decode_links(value: &str) -> Result<Links, String> {
    if value.len() > MAX_LINKS_VALUE_BYTES {
        return Err(format!(
            "{} bytes, over the {MAX_LINKS_VALUE_BYTES}-byte bound",
            value.len()
        ));
    }
    let links: Links =
        serde_json::from_str(value).map_err(|e| format!("not a link-forecast map: {e}"))?;
    check_links(&links)?;
    Ok(links)
}

/// Puts the three decoded parts back together.
pub(crate) fn assemble(res: &Res, addr: &Addr, links: Option<&Links>) -> NodeState {
    NodeState {
        free_memory: res.free_memory,
        memory_total: res.memory_total,
        cpu_load: res.cpu_load,
        vcpus_free: res.vcpus_free,
        running_vms: res.running_vms,
        migration_addr: addr.migration.clone(),
        agent_addr: addr.agent.clone(),
        link_forecasts: links.cloned().unwrap_or_default(),
        updated_at_ms: res.at_ms,
        seq: res.seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodeState {
        NodeState {
            free_memory: 64 << 30,
            memory_total: 128 << 30,
            cpu_load: 1.5,
            vcpus_free: 12,
            running_vms: 3,
            migration_addr: "10.0.0.1:7000".into(),
            agent_addr: "10.0.0.1:7001".into(),
            link_forecasts: [(2, 1.25e9), (3, 3.0e8)].into_iter().collect(),
            updated_at_ms: 0,
            seq: 0,
        }
    }

    #[test]
    fn round_trip_stamps_seq_and_time() {
        let [(k1, res), (k2, addr), (k3, links)] = encode(&sample(), 7, 1234).unwrap();
        assert_eq!((k1, k2, k3), (RES, ADDR, LINKS));
        let back = assemble(
            &decode_res(&res).unwrap(),
            &decode_addr(&addr).unwrap(),
            Some(&decode_links(&links).unwrap()),
        );
        let mut want = sample();
        want.seq = 7;
        want.updated_at_ms = 1234;
        assert_eq!(back, want);
        // Values stay small: the point of splitting the state.
        assert!(res.len() < 200, "{res}");
    }

    #[test]
    fn publisher_bounds_are_enforced() {
        let mut s = sample();
        s.cpu_load = f64::NAN;
        assert!(matches!(encode(&s, 1, 1), Err(AssError::InvalidState(_))));
        let mut s = sample();
        s.agent_addr = "x".repeat(MAX_ADDR_BYTES + 1);
        assert!(matches!(encode(&s, 1, 1), Err(AssError::InvalidState(_))));
        let mut s = sample();
        s.link_forecasts = (0..=MAX_LINK_FORECASTS as u64).map(|p| (p, 1.0)).collect();
        assert!(matches!(encode(&s, 1, 1), Err(AssError::InvalidState(_))));
        let mut s = sample();
        s.link_forecasts.insert(9, -1.0);
        assert!(matches!(encode(&s, 1, 1), Err(AssError::InvalidState(_))));
        // The largest legal link map fits its value bound.
        let mut s = sample();
        s.link_forecasts = (0..MAX_LINK_FORECASTS as u64)
            .map(|p| (u64::MAX - p, f64::MAX / 3.0))
            .collect();
        encode(&s, u64::MAX, u64::MAX).unwrap();
    }

    #[test]
    fn malformed_peer_values_are_rejected_with_a_reason() {
        for bad in ["", "null", "not json", "{\"seq\":1}", "[1,2,3]"] {
            assert!(decode_res(bad).is_err(), "{bad}");
            assert!(decode_addr(bad).is_err(), "{bad}");
        }
        assert!(decode_links("{\"a\":1}").is_err());
        assert!(decode_links("{\"1\":-5}").is_err());
        assert!(decode_links("{\"1\":null}").is_err());
        let huge = format!("\"{}\"", "x".repeat(MAX_LINKS_VALUE_BYTES));
        let err = decode_links(&huge).unwrap_err();
        assert!(err.contains("bound"), "{err}");
        let neg = r#"{"seq":1,"at_ms":1,"free_memory":1,"memory_total":1,"cpu_load":-1,"vcpus_free":1,"running_vms":1}"#;
        assert!(decode_res(neg).is_err());
        let long = format!(
            r#"{{"migration":"{}","agent":"a"}}"#,
            "m".repeat(MAX_ADDR_BYTES + 1)
        );
        assert!(decode_addr(&long).is_err());
        // Unknown fields are accepted: a newer publisher may add some within the same key version.
        let newer = r#"{"seq":1,"at_ms":1,"free_memory":1,"memory_total":1,"cpu_load":0.5,"vcpus_free":1,"running_vms":1,"gpu":3}"#;
        assert!(decode_res(newer).is_ok());
    }
}
