//! Replays the committed fuzz corpus of the `chunk` target (`fuzz/corpus/chunk/`) under plain
//! `cargo test`, with the very property checks the fuzz target runs (the file is shared with the fuzz
//! crate through `#[path]`). An empty or missing corpus directory fails the test.

#[path = "../../fuzz/src/chunk.rs"]
mod chunk;

use std::path::PathBuf;

#[test]
fn chunk_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/chunk");
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
    let mut files = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        if let Err(panic) = std::panic::catch_unwind(|| chunk::check(&data)) {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("?");
            panic!("chunk corpus file {} fails: {why}", path.display());
        }
        files += 1;
    }
    assert!(files > 0, "corpus {} is empty", dir.display());
}
