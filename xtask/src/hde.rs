//! `cargo xtask bench hde`: the Criterion encoder suite, then the three corpora against the zstd and
//! lz4 command-line tools on the same bytes.

use anyhow::Result;

use crate::Workspace;

/// Runs the HDE benchmarks.
pub fn bench(ws: &Workspace, quick: bool) -> Result<()> {
    crate::criterion(ws, "hde", quick)
}
