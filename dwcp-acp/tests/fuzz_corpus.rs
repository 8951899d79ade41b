//! Replays the committed fuzz corpus of the `raft_rpc` target (`fuzz/corpus/raft_rpc/`) under plain `cargo test`,
//! with the very property checks the fuzz target runs (the file is shared with the fuzz crate through
//! `#[path]`). An empty or missing corpus directory fails the test.

#[path = "../../fuzz/src/raft_rpc.rs"]
mod raft_rpc;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn raft_rpc_corpus() {
    replay::replay(env!("CARGO_MANIFEST_DIR"), "raft_rpc", raft_rpc::check);
}
