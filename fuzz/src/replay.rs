//! Replays a committed fuzz corpus under plain `cargo test` (included with `#[path]` by the corpus
//! regression tests of `dwcp-core` and `dwcp-hde`; not part of the fuzz crate's library).

use std::path::PathBuf;

/// Runs `check` on every file of `fuzz/corpus/<target>/`, naming the file that fails; an empty or
/// missing corpus directory fails too. `manifest_dir` is the including crate's `CARGO_MANIFEST_DIR`.
pub fn replay(manifest_dir: &str, target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(manifest_dir)
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
