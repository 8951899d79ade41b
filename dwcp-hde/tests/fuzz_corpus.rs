//! Replays the committed fuzz corpora of the `chunk`, `session_chunk` and `dictionary` targets
//! (`fuzz/corpus/<target>/`) under plain
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

#[test]
fn session_chunk_corpus() {
    replay::replay(
        env!("CARGO_MANIFEST_DIR"),
        "session_chunk",
        chunk::check_session,
    );
}

#[test]
fn dictionary_corpus() {
    replay::replay(
        env!("CARGO_MANIFEST_DIR"),
        "dictionary",
        chunk::check_dictionary,
    );
}
