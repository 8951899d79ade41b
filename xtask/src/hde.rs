//! `cargo xtask bench hde`: the HDE benchmark (`benches/benches/hde.rs`). It measures the session
//! encoder and decoder on the three corpora of issue 3 (idle guest, busy mix, second-iteration pages)
//! against the `zstd -1 -T2`, `zstd -3 -T2` and `lz4 -1` command-line tools on the same bytes,
//! prints the table and the targets, then runs the Criterion measurements. The table is also written
//! to `target/criterion/hde-table.md`.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::Workspace;
use crate::process::{Io, run};

/// The whole suite takes a few minutes; a hung tool must not hold the xtask for ever.
const BENCH_TIMEOUT: Duration = Duration::from_secs(3 * 3600);

/// Runs the HDE benchmarks.
pub fn bench(ws: &Workspace, quick: bool) -> Result<()> {
    for tool in ["zstd", "lz4"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            bail!(
                "`{tool}` is not installed; the HDE benchmark compares against it on the same bytes. \
                 Install it with\n    apt-get install -y zstd lz4\nand run again"
            );
        }
    }
    let table = ws.target.join("criterion").join("hde-table.md");
    let mut cmd = ws.cargo();
    cmd.args(["bench", "-p", "dwcp-benches", "--bench", "hde"])
        .env("DWCP_HDE_TABLE", &table);
    if quick {
        cmd.args(["--", "--quick"]);
    }
    eprintln!("\n==> cargo bench -p dwcp-benches --bench hde");
    run(&mut cmd, Io::Inherit, BENCH_TIMEOUT)?;
    let text = std::fs::read_to_string(&table)
        .with_context(|| format!("reading the table {}", table.display()))?;
    println!("{text}\n(written to {})", table.display());
    Ok(())
}
