//! Replays the committed fuzz corpora of the `frame` and `messages` targets (`fuzz/corpus/`) under plain
//! `cargo test`, with the very property checks the fuzz targets run (the files are shared with the
//! fuzz crate through `#[path]`). An empty or missing corpus directory fails the test.

#[path = "../../fuzz/src/frame.rs"]
mod frame;
#[path = "../../fuzz/src/messages.rs"]
mod messages;

#[path = "../../fuzz/src/records.rs"]
mod records;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

use replay::replay;

#[test]
fn frame_corpus() {
    replay(env!("CARGO_MANIFEST_DIR"), "frame", frame::check);
}

#[test]
fn messages_corpus() {
    replay(env!("CARGO_MANIFEST_DIR"), "messages", messages::check);
}
