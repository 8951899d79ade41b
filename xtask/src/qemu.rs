//! `cargo xtask bench qemu`: QEMU's own migration (plain, multifd, multifd + zstd) against QEMU
//! carried through dwcp, on loopback and across the emulated WAN.

use anyhow::{Result, bail};

use crate::Workspace;

/// Runs the QEMU benchmark.
pub fn bench(_ws: &Workspace, _wan: &crate::wan::BenchWanOpts, _quick: bool) -> Result<()> {
    bail!("bench qemu: not implemented yet")
}
