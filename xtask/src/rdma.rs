//! `cargo xtask rdma-guest` and `cargo xtask bench rdma`: the RDMA test and benchmark binaries, run
//! inside a QEMU guest with Soft-RoCE.

use anyhow::{Result, bail};

use crate::Workspace;

/// Options of `cargo xtask rdma-guest`.
#[derive(Debug, clap::Args)]
pub struct RdmaGuestOpts {}

/// Runs the RDMA tests in a Soft-RoCE guest.
pub fn guest(_ws: &Workspace, _opts: &RdmaGuestOpts) -> Result<()> {
    bail!("rdma-guest: not implemented yet")
}

/// Runs the RDMA benchmark in a Soft-RoCE guest.
pub fn bench(_ws: &Workspace, _quick: bool) -> Result<()> {
    bail!("bench rdma: not implemented yet")
}
