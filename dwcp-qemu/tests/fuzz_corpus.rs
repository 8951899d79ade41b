//! Replays the committed fuzz corpus of the `qemu_wire` target (`fuzz/corpus/qemu_wire/`) under plain `cargo test`,
//! with the very property checks the fuzz target runs (the file is shared with the fuzz crate through
//! `#[path]`). An empty or missing corpus directory fails the test.

#[path = "../../fuzz/src/qemu_wire.rs"]
mod qemu_wire;
#[path = "../../fuzz/src/records.rs"]
mod records;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn qemu_wire_corpus() {
    replay::replay(env!("CARGO_MANIFEST_DIR"), "qemu_wire", qemu_wire::check);
}
