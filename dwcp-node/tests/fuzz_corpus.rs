//! Replays the committed fuzz corpus of the `node_control` target (`fuzz/corpus/node_control/`) under plain `cargo test`,
//! with the very property checks the fuzz target runs (the file is shared with the fuzz crate through
//! `#[path]`). An empty or missing corpus directory fails the test.

#[path = "../../fuzz/src/node_control.rs"]
mod node_control;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn node_control_corpus() {
    replay::replay(
        env!("CARGO_MANIFEST_DIR"),
        "node_control",
        node_control::check,
    );
}
