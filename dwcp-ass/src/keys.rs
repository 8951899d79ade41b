//! The chitchat keys a node publishes under, and their size bounds: ASS's wire format on top of
//! chitchat's.
//!
//! Each value is JSON. Unknown fields are accepted (a newer publisher may add one); a change that
//! an old reader would misread gets a new key version (`ass.v2.*`). A peer's value that is over
//! its bound, is not valid JSON of the right shape, or breaks a bound inside (non-finite number,
//! too many forecasts, over-long address) is ignored with a `warn` log naming the node, the key
//! and the reason; the last good value of that key, if any, stays in the view.

/// Resource figures plus `seq` and the publisher's clock: changes on every publish.
pub const RES: &str = "ass.v1.res";
/// Migration and agent addresses: changes almost never.
pub const ADDR: &str = "ass.v1.addr";
/// PBA's per-peer rate forecasts: a JSON object from peer node id to bytes per second.
pub const LINKS: &str = "ass.v1.links";

/// Bound on the encoded [`RES`] value, in bytes (a real one is about 150).
pub const MAX_RES_VALUE_BYTES: usize = 512;
/// Bound on each address string, in bytes (the longest DNS name is 253, plus `:port`).
pub const MAX_ADDR_BYTES: usize = 300;
/// Bound on the encoded [`ADDR`] value, in bytes.
pub const MAX_ADDR_VALUE_BYTES: usize = 2 * MAX_ADDR_BYTES + 64;
/// Bound on the number of link forecasts one node publishes.
pub const MAX_LINK_FORECASTS: usize = 256;
/// Bound on the encoded [`LINKS`] value, in bytes: room for [`MAX_LINK_FORECASTS`] entries of a
/// 20-digit id and a 24-character float each. Small next to chitchat's 64 KiB datagram, so one
/// node's whole state always fits in one delta.
pub const MAX_LINKS_VALUE_BYTES: usize = 16 * 1024;
