//! Replays the committed fuzz corpus of the `handshake` target (`fuzz/corpus/handshake/`) under plain `cargo test`,
//! with the very property checks the fuzz target runs (the file is shared with the fuzz crate through
//! `#[path]`). An empty or missing corpus directory fails the test.

#[path = "../../fuzz/src/handshake.rs"]
mod handshake;
#[path = "../../fuzz/src/records.rs"]
mod records;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn handshake_corpus() {
    replay::replay(env!("CARGO_MANIFEST_DIR"), "handshake", handshake::check);
}
