//! `dwcp`: live migration of VM memory over several authenticated TCP streams, from the command line.
//!
//! * `dwcp demo` migrates a simulated guest to a destination in the same process, over loopback.
//! * `dwcp recv` waits for one migration and writes the received memory to an image file.
//! * `dwcp send` migrates a memory image file to a `dwcp recv`.
//! * `dwcp keygen` writes a fresh pre-shared key; `dwcp mkimage` writes a memory image for `send`.
//! * `dwcp node` runs one host's cluster agent; `dwcp cluster` starts a local cluster and
//!   creates, migrates and evacuates VMs in it.
//! * `dwcp qemu send` / `dwcp qemu recv` carry QEMU's own migration through DWCP (proxy mode).
//!
//! Reports go to stdout (one JSON object with `--json`), logs and the progress bar to stderr.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod args;
mod cluster;
mod control;
mod demo;
mod events;
mod fleet;
mod metrics;
mod output;
mod profile;
mod progress;
mod qemu;
mod rss;
mod size;
mod tools;
mod trace;
mod transfer;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use crate::args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    let profiler = match profile::Profiler::start(&cli.profile) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("dwcp: error: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Send(a) => transfer::send(a),
        Command::Control(a) => control::run(a),
        Command::Node(a) => cluster::node(a),
        Command::Cluster(a) => cluster::run(a),
        Command::Recv(a) => transfer::recv(a),
        Command::Keygen(a) => tools::keygen(a),
        Command::Certs(a) => tools::certs(a),
        Command::Mkimage(a) => tools::mkimage(a),
        Command::Qemu(a) => qemu::run(a),
        Command::FleetReceive(a) => fleet::receive_process(a),
    };
    // The profile is written whatever the command's result: a failing run is worth profiling too.
    let result = match profiler.map(profile::Profiler::finish) {
        Some(Err(e)) => result.and(Err(e)),
        _ => result,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dwcp: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr. The filter comes from `RUST_LOG` (default `warn`); `-v` raises the level to
/// info, `-vv` to debug, on top of whatever `RUST_LOG` says.
fn init_tracing(verbose: u8) {
    let mut filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::WARN.into())
        .from_env_lossy();
    match verbose {
        0 => {}
        1 => filter = filter.add_directive(LevelFilter::INFO.into()),
        _ => filter = filter.add_directive(LevelFilter::DEBUG.into()),
    }
    let color = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(color)
        .init();
}

/// The error and its causes, one per line. A cause whose text its parent already includes (DWCP's I/O
/// errors print their source) is not repeated.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut previous = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if !previous.is_empty() && previous.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str("\n  caused by: ");
        }
        out.push_str(&msg);
        previous = msg;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_skips_repeated_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e =
            anyhow::Error::new(dwcp_core::Error::io("reading key", io)).context("loading the key");
        assert_eq!(
            error_chain(&e),
            "loading the key\n  caused by: reading key: no such file"
        );
    }
}
