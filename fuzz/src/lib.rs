//! Property checks of the DWCP network decoders, shared by the fuzz targets in `fuzz_targets/` and by
//! the corpus regression tests of `dwcp-core`, `dwcp-hde`, `dwcp-qemu`, `dwcp-acp`, `dwcp-node` and `dwcp-proto` (which include these files with
//! `#[path]`, so the same checks run under plain `cargo test`). Each module has one entry point,
//! `check(data)`, which panics when a property does not hold.

pub mod chunk;
pub mod frame;
pub mod handshake;
pub mod messages;
pub mod node_control;
pub mod postcopy_wire;
pub mod qemu_wire;
pub mod raft_rpc;
pub mod records;
