//! Replays the committed fuzz corpora of the `frame` and `messages` targets (`fuzz/corpus/`) under plain
//! `cargo test`, with the very property checks the fuzz targets run (the files are shared with the
//! fuzz crate through `#[path]`). An empty or missing corpus directory fails the test.

#[path = "../../fuzz/src/frame.rs"]
mod frame;
#[path = "../../fuzz/src/messages.rs"]
mod messages;

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
    let mut files = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("?");
            panic!("{target} corpus file {} fails: {why}", path.display());
        }
        files += 1;
    }
    assert!(files > 0, "corpus {} is empty", dir.display());
}

#[test]
fn frame_corpus() {
    replay("frame", frame::check);
}

#[test]
fn messages_corpus() {
    replay("messages", messages::check);
}
