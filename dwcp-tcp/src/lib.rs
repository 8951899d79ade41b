//! AMST over TCP: the adaptive multi-stream transport of DWCP.
//!
//! A session runs over several TCP streams to the same peer. [`transport`] opens them
//! ([`TcpConnector`]) and accepts them ([`TcpAcceptor`]), each tuned by a [`profile`] chosen per
//! [`mode`] (datacenter, internet, hybrid). [`lanes::Lanes`] gives each stream a writer thread fed by a
//! bounded queue, sends every chunk to the live stream with the fewest unsent bytes, keeps each chunk
//! until the peer acknowledges it and hands the chunks of a failed stream back for re-sending.
//! [`adapt`] decides how many streams pay off, from goodput measured per window, and [`telemetry`]
//! reads the kernel's view of each stream (`TCP_INFO`). Frames and the handshake come from
//! `dwcp-core`; the engine in `dwcp` reads acknowledgements and drives all of this.
#![deny(missing_docs)]

pub mod adapt;
pub mod lanes;
pub mod mode;
pub mod profile;
pub mod telemetry;
pub mod transport;

pub use adapt::StreamCountController;
pub use lanes::{
    DataChunk, LaneHandle, LaneStats, Lanes, LostLane, Outgoing, Payload, StreamWriter,
};
pub use mode::{Mode, ModeSetting};
pub use profile::{AppliedProfile, SocketProfile, apply, connect, listen};
pub use telemetry::TcpSample;
pub use transport::{TcpAcceptor, TcpConnector};
