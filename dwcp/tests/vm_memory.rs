//! The `vm_memory` example, run for real as the target asks: a 1 GiB rust-vmm guest,
//! written to through vm-memory while it is live-migrated to a second process, with both memory
//! digests checked.
//!
//! The test includes the example's source, so it always runs the example as it is now (a separate
//! example binary may be stale: `cargo test --test vm_memory` does not rebuild examples). The
//! destination process is this test binary re-executed with the example's `--role dest` command
//! line, so this target has its own `main` (`harness = false`) that understands both.

use std::process::ExitCode;
use std::time::Instant;

#[path = "../examples/vm_memory.rs"]
#[allow(dead_code)] // the example's own `main`
mod example;

const TEST: &str = "vm_memory_example_migrates_a_1_gib_guest_between_two_processes";

/// The test: the example's source side, in this process.
fn migrates_a_1_gib_guest_between_two_processes() -> Result<(), String> {
    let argv: Vec<String> = ["--size", "1G", "--dirty-rate", "32", "--timeout-s", "150"]
        .map(String::from)
        .to_vec();
    let args = example::parse_args(&argv)?;
    let started = Instant::now();
    let out = example::run_source(&args)?;
    let r = &out.report;
    let check = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{what}: source digest {}, destination digest {:?} (process ok: {}), report digest {} (match {}), {} writes, passes {:?}",
                out.source_digest,
                out.dest_digest,
                out.dest_ok,
                r.digest,
                r.digest_match,
                out.writes,
                r.passes.iter().map(|p| p.pages).collect::<Vec<_>>()
            ))
        }
    };
    check(out.source_digest.len() == 32, "a 128-bit digest in hex")?;
    check(out.dest_ok, "the destination process succeeded")?;
    check(
        out.dest_digest.as_deref() == Some(out.source_digest.as_str()),
        "both processes hold the same memory",
    )?;
    check(
        r.digest_match && r.digest == out.source_digest,
        "the migration's digests agree",
    )?;
    check(out.matches(), "the example's own verdict")?;
    check(r.memory_bytes == 1 << 30, "1 GiB migrated")?;
    check(out.writes > 0, "the workload wrote through vm-memory")?;
    // Those writes reached the dirty log: a pass after the first sent pages again.
    let resent: u64 = r.passes.iter().skip(1).map(|p| p.pages).sum();
    check(resent > 0, "no page was sent again after the first pass")?;
    println!(
        "two-process 1 GiB migration: {:.1} s in all, {:.1} ms migrating, {} pages re-sent",
        started.elapsed().as_secs_f64(),
        r.total_ms,
        resent
    );
    Ok(())
}

/// Flags of libtest's command line that take a value (cargo and IDEs may pass them).
const VALUE_FLAGS: &[&str] = &["--test-threads", "--color", "--format", "--logfile", "-Z"];

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().is_some_and(|a| a == "--role") {
        // Re-executed by the example's source side as its destination.
        return example::run(&argv);
    }
    // Enough of libtest's command line: name filters, `--exact`, `--skip NAME`, `--list`,
    // `--ignored` (this test is not ignored, so it then does not run).
    let (mut filters, mut skips) = (Vec::new(), Vec::new());
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--skip" => skips.extend(it.next()),
            f if VALUE_FLAGS.contains(&f) => {
                it.next();
            }
            f if f.starts_with('-') => {}
            name => filters.push(name),
        }
    }
    let has = |flag: &str| argv.iter().any(|a| a == flag);
    let exact = has("--exact");
    let matches = |f: &str| if exact { TEST == f } else { TEST.contains(f) };
    let selected = (filters.is_empty() || filters.iter().any(|f| matches(f)))
        && !skips.iter().any(|s| TEST.contains(s.as_str()))
        && !has("--ignored");
    if has("--list") {
        println!("{TEST}: test");
        return ExitCode::SUCCESS;
    }
    if !selected {
        println!(
            "\nrunning 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out\n"
        );
        return ExitCode::SUCCESS;
    }
    println!("\nrunning 1 test");
    let started = Instant::now();
    let result = migrates_a_1_gib_guest_between_two_processes();
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            println!(
                "test {TEST} ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {secs:.2}s\n"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!(
                "test {TEST} ... FAILED\n\n{e}\n\ntest result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in {secs:.2}s\n"
            );
            ExitCode::FAILURE
        }
    }
}
