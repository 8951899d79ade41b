//! `cargo xtask bench amst`: loopback goodput of dwcp with 1, 2, 4, 8 and 16 streams next to
//! `iperf3 -P` with the same counts, in one run.

use anyhow::{Result, bail};

use crate::Workspace;

/// Runs the AMST benchmark.
pub fn bench(_ws: &Workspace, _quick: bool) -> Result<()> {
    bail!("bench amst: not implemented yet")
}
