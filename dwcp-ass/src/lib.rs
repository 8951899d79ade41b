//! ASS, DWCP's state sync: every node's resource figures, addresses and link forecasts, shared
//! with every other node by gossip and eventually consistent.
//!
//! The migration engine needs to know, on any host, which peers are up, how much room each has and
//! how fast the link to each is forecast to be; no single registry should be on that path. ASS
//! puts it in [chitchat] (Quickwit's scuttlebutt gossip with a phi-accrual failure detector).
//!
//! Data flows like this:
//!
//! 1. The node's agent calls [`Gossip::publish`] with its [`NodeState`]. The state is checked
//!    against the bounds in [`keys`], stamped with the next `seq` and the wall clock, and written
//!    as three small JSON values under three chitchat keys of this node; a key whose value did
//!    not change keeps its version and costs nothing to gossip.
//! 2. Every `gossip_interval`, chitchat exchanges digests with up to three random live peers;
//!    each side sends the other the key versions it is missing (a delta bounded by one UDP
//!    datagram). Heartbeats ride on the digests and feed each observer's failure detector.
//! 3. On every node, a sampler task (every half round) and every [`Gossip::view`] read chitchat's
//!    state: a peer's values are decoded once per new version, a malformed or oversize value is
//!    logged and ignored (the last good one stays), and the time the peer's heartbeat or state
//!    last moved is recorded for [`NodeView::staleness`].
//! 4. [`Gossip::view`] returns a [`ClusterView`]: per node id, the newest incarnation's state,
//!    liveness per the failure detector, and staleness. [`Gossip::subscribe_liveness`] watches
//!    liveness alone.
//!
//! An update reaches all N nodes in O(log N) rounds (measured: docs/ass.md, and
//! `cargo run --release -p dwcp-ass --example convergence`). [`SimNetwork`] runs many nodes in
//! one process over chitchat's in-memory transport for such measurements.
//!
//! ```
//! use std::time::Duration;
//! use dwcp_ass::{Gossip, GossipConfig, NodeState, SimNetwork};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), dwcp_ass::AssError> {
//! // Two nodes on the in-memory network; on real hosts use `Gossip::start` (UDP).
//! let net = SimNetwork::new();
//! let any = "127.0.0.1:0".parse().unwrap();
//! let a = Gossip::start_simulated(GossipConfig::new(1, any, "dc1"), &net).await?;
//! let b_config = GossipConfig::new(2, any, "dc1").with_seeds([a.listen_addr()]);
//! let b = Gossip::start_simulated(b_config, &net).await?;
//!
//! let seq = a.publish(&NodeState { free_memory: 64 << 30, ..NodeState::default() }).await?;
//! let seen = tokio::time::timeout(Duration::from_secs(10), async {
//!     loop {
//!         match b.node(1).await.and_then(|n| n.state) {
//!             Some(s) if s.seq == seq => break s,
//!             _ => tokio::time::sleep(Duration::from_millis(20)).await,
//!         }
//!     }
//! })
//! .await
//! .expect("gossiped within 10 s");
//! assert_eq!(seen.free_memory, 64 << 30);
//! # a.shutdown().await?; b.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! [chitchat]: https://docs.rs/chitchat
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod config;
mod error;
mod gossip;
pub mod keys;
mod state;
mod view;

pub use config::GossipConfig;
pub use error::AssError;
pub use gossip::{Gossip, SimNetwork, SimTraffic};
pub use state::NodeState;
pub use view::{ClusterView, Liveness, NodeView};
