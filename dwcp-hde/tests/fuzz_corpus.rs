//! Replays the committed fuzz corpus of the `chunk` target (`fuzz/corpus/chunk/`) under plain
//! `cargo test`, with the very property checks the fuzz target runs (the file is shared with the fuzz
//! crate through `#[path]`). An empty or missing corpus directory fails the test.

#[path = "../../fuzz/src/chunk.rs"]
mod chunk;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn chunk_corpus() {
    replay::replay(env!("CARGO_MANIFEST_DIR"), "chunk", chunk::check);
}
