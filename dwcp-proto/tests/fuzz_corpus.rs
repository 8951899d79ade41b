//! Replays the committed fuzz corpus of the `postcopy_wire` target (`fuzz/corpus/`) under plain
//! `cargo test`, with the very property checks the fuzz target runs (the files are shared with the
//! fuzz crate through `#[path]`). An empty or missing corpus directory fails the test.

#[path = "../../fuzz/src/postcopy_wire.rs"]
mod postcopy_wire;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn postcopy_wire_corpus() {
    replay::replay(
        env!("CARGO_MANIFEST_DIR"),
        "postcopy_wire",
        postcopy_wire::check,
    );
}
