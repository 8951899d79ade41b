//! The WAN test bed of DWCP: a user-space link emulator between two network namespaces.
//!
//! The kernel of the development machines has no netem, so delay, jitter and loss cannot be set with
//! `tc`. Instead, two namespaces (by default `dwcp-src` with 10.77.0.1 and `dwcp-dst` with 10.77.0.2,
//! in 10.77.0.0/24) each get a TUN device named `wan0`, and a forwarder process moves IP packets between
//! the two devices through a model of the path. Real kernel TCP (BBR, CUBIC) runs across it.
//!
//! # How data flows
//!
//! ```text
//!  dwcp-src (10.77.0.1)                 forwarder process (root namespace)              dwcp-dst (10.77.0.2)
//!  app ─▶ TCP/IP ─▶ wan0 (TUN) ══fd══▶ reader ─▶ Direction[fwd] ─▶ writer ══fd══▶ wan0 (TUN) ─▶ TCP/IP ─▶ app
//!                   wan0 (TUN) ◀══fd══ writer ◀─ Direction[rev] ◀─ reader ◀══fd══ wan0 (TUN)
//! ```
//!
//! 1. The forwarder creates both TUN devices in the root namespace, then moves each into its namespace
//!    (`ip link set … netns …`); its file descriptors stay valid. Addresses, routes and sysctls are set
//!    inside the namespaces ([`link`]).
//! 2. A packet an application sends to the peer leaves through `wan0`; the kernel hands it to the
//!    forwarder's reader thread for that direction ([`forward`]). Packets whose source or destination is
//!    outside the link's subnet (and all IPv6) are dropped, so nothing else ever crosses.
//! 3. The reader offers the packet to that direction's [`model::Direction`], a sans-I/O pipeline in
//!    virtual time: a drop-tail queue bounded in bytes, a token bucket (rate), random loss (Bernoulli or
//!    Gilbert-Elliott) applied as the packet leaves the queue, and a delay line (one-way delay ± jitter,
//!    FIFO unless reordering is asked for).
//! 4. The writer thread sleeps until the model's next event and writes every due packet into the other
//!    TUN device, where the peer's kernel receives it.
//!
//! Both devices use a 65,000-byte MTU, so 1 Gbit/s is about 1,900 packets per second instead of 83,000
//! with 1,500 bytes: the per-packet costs of a user-space forwarder (two system calls, a wake-up, a copy)
//! stay far below what two cores can pay.
//!
//! The `dwcp-wanem` binary runs `up` (namespaces, link, forwarding until a signal; everything is removed
//! on exit), `down`, and a UDP RTT/loss probe ([`probe`]). [`testbed::Testbed`] runs it as a child
//! process for tests, with teardown on drop. `cargo xtask wan up|down|check` and `cargo xtask bench wan`
//! drive it; `docs/wan-testbed.md` has the measured figures.

#![deny(missing_docs)]

pub mod config;
pub mod forward;
pub mod link;
pub mod model;
pub mod netns;
pub mod probe;
pub mod testbed;
