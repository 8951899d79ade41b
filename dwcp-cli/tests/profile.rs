//! `--profile-out`: CPU profiles of a real `dwcp` run, one pair (flamegraph SVG, pprof protobuf)
//! per `--profile-every` period and one for the rest of the run.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_dwcp");

#[test]
fn a_profiled_demo_writes_rotating_flamegraphs_and_pprof_profiles() {
    let dir = tempfile::tempdir().unwrap();
    // 64 MiB at 32 MiB/s: about two seconds, several 0.5-s periods.
    let out = Command::new(BIN)
        .args([
            "demo",
            "--size",
            "64M",
            "--max-bandwidth",
            "32M",
            "--no-progress",
            "--profile-out",
            dir.path().to_str().unwrap(),
            "--profile-every",
            "0.5",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut svgs = 0;
    let mut pbs = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        match path.extension().and_then(|e| e.to_str()) {
            Some("svg") => {
                svgs += 1;
                assert!(
                    String::from_utf8_lossy(&bytes).contains("<svg"),
                    "{} is no SVG",
                    path.display()
                );
            }
            Some("pb") => {
                pbs += 1;
                assert!(!bytes.is_empty(), "{} is empty", path.display());
            }
            _ => panic!("unexpected file {}", path.display()),
        }
    }
    assert!(svgs >= 3 && pbs == svgs, "{svgs} SVGs, {pbs} profiles");
}

#[test]
fn profiling_options_are_checked() {
    let out = Command::new(BIN)
        .args(["keygen", "--profile-every", "1", "--out", "/nonexistent/k"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--profile-out"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
