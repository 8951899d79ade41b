//! `cargo xtask compat [--against REV] [--size SIZE]`: this tree's `dwcp` against the one of an
//! earlier commit, over loopback, in both directions: the test that session version N really talks
//! to N−1 (docs/wire-protocol.md §6.4), with two real builds instead of one build playing both.
//!
//! REV defaults to the build before the last version bump: the parent of the oldest commit that
//! added this tree's `pub const MAX_VERSION: u8 = N;` line to `dwcp-core/src/handshake.rs`, or HEAD
//! while that bump is not committed yet. REV is checked out (detached) into a git worktree under
//! `target/xtask/compat/`, kept for the next run, and built in release with its own target
//! directory beside it; this tree's `dwcp` is built in release as usual. Then, with a memory image
//! and a key made by this tree's `dwcp`:
//!
//! 1. old `send` → new `recv`, and new `send` → old `recv`: both succeed, the received image is
//!    byte for byte the sent one, and the new side's JSON report says no identity travelled;
//! 2. new → new with `--vm-uuid` and `--expect-vm-uuid`: the identity is verified (the control);
//! 3. old `send` → new `recv --expect-vm-uuid`: refused, since an old source cannot announce its
//!    VM, and the output file is never created.
//!
//! Not part of `cargo test`: building a second tree in release takes many minutes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::Workspace;
use crate::headline::{TempDir, parse_json, remove_stale, run_plain};
use crate::process::{Io, Proc, describe, free_port, run, tail, wait_listening};

/// Where this tree declares its newest session version.
const HANDSHAKE_RS: &str = "dwcp-core/src/handshake.rs";
const MAX_VERSION_LINE: &str = "pub const MAX_VERSION: u8 = ";
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);
const VM_UUID: &str = "67e55044-10b1-426f-9247-bb680e5fe0c8";

/// `cargo xtask compat` options.
#[derive(Debug, clap::Args)]
pub struct CompatOpts {
    /// The earlier build: any revision git knows (default: the commit before the version bump).
    #[arg(long, value_name = "REV")]
    against: Option<String>,
    /// Size of the memory image sent each way.
    #[arg(long, default_value = "64M")]
    size: String,
}

/// Runs the compatibility test.
pub fn compat(ws: &Workspace, opts: &CompatOpts) -> Result<()> {
    let started = Instant::now();
    let rev = match &opts.against {
        Some(r) => r.clone(),
        None => previous_build(&ws.root)?,
    };
    let commit = git(
        &ws.root,
        &["rev-parse", "--verify", &format!("{rev}^{{commit}}")],
    )?;
    let short = &commit[..12.min(commit.len())];
    eprintln!("==> compat: this tree against {rev} ({short})");

    let base = ws.target.join("xtask").join("compat");
    let tree = checkout(&ws.root, &base.join(format!("src-{short}")), &commit)?;
    let old_target = base.join("target-old");
    let t = Instant::now();
    let mut build = crate::cargo(&tree);
    build.args(["build", "--release", "-p", "dwcp-cli", "--target-dir"]);
    build.arg(&old_target);
    eprintln!("\n==> {} (in {})", describe(&build), tree.display());
    run(&mut build, Io::Inherit, crate::CARGO_TIMEOUT)?;
    let old_build = t.elapsed();
    let old = binary(&old_target.join("release").join("dwcp"))?;

    let t = Instant::now();
    let mut build = ws.cargo();
    build.args(["build", "--release", "-p", "dwcp-cli"]);
    eprintln!("\n==> {}", describe(&build));
    run(&mut build, Io::Inherit, crate::CARGO_TIMEOUT)?;
    let new_build = t.elapsed();
    let new = binary(&ws.target.join("release").join("dwcp"))?;

    remove_stale(&base, "run");
    let tmp = TempDir::new(&base, "run")?;
    let (img, key) = (tmp.0.join("image"), tmp.0.join("key"));
    run_plain(&new, &["keygen", "--out", &s(&key)])?;
    let size = &opts.size;
    run_plain(
        &new,
        &[
            "mkimage",
            "--size",
            size,
            "--mix",
            "idle",
            "--out",
            &s(&img),
        ],
    )?;

    let peers = Peers {
        dir: &tmp.0,
        image: &img,
        key: &key,
    };
    let t = Instant::now();
    eprintln!("\n==> {short} send -> this tree's recv");
    let (_, received) = peers.transfer((&old, &[]), (&new, &[]))?;
    expect(&received, "identity", "not_announced", "the new recv")?;
    let old_to_new = t.elapsed();

    let t = Instant::now();
    eprintln!("\n==> this tree's send -> {short} recv");
    let (sent, _) = peers.transfer((&new, &["--vm-uuid", VM_UUID]), (&old, &[]))?;
    expect(&sent, "identity_announced", false, "the new send")?;
    let new_to_old = t.elapsed();

    eprintln!("\n==> this tree both ways, the identity required and announced (the control)");
    let (sent, received) = peers.transfer(
        (&new, &["--vm-uuid", VM_UUID]),
        (&new, &["--expect-vm-uuid", VM_UUID]),
    )?;
    expect(&sent, "identity_announced", true, "the new send")?;
    expect(&received, "identity", "verified", "the new recv")?;

    eprintln!("\n==> {short} send -> this tree's recv --expect-vm-uuid: must be refused");
    peers.refused(&old, &new)?;

    println!(
        "\ncompat: passed against {rev} ({short}), {size} image\n\
         \x20 {short} send -> new recv   ok, identical image ({:.1} s)\n\
         \x20 new send -> {short} recv   ok, identical image ({:.1} s)\n\
         \x20 new -> new, identity      verified\n\
         \x20 {short} send -> new recv --expect-vm-uuid   refused, output untouched\n\
         \x20 builds: {short} {:.0} s, this tree {:.0} s; total {:.0} s",
        old_to_new.as_secs_f64(),
        new_to_old.as_secs_f64(),
        old_build.as_secs_f64(),
        new_build.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "(the checkout stays in {} for the next run; `git worktree remove --force {}` drops it)",
        tree.display(),
        tree.display()
    );
    Ok(())
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn binary(path: &Path) -> Result<PathBuf> {
    if !path.is_file() {
        bail!("{} was not built", path.display());
    }
    Ok(path.to_path_buf())
}

/// `git ARGS` in `root`, its trimmed standard output.
fn git(root: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("git");
    cmd.current_dir(root).args(args);
    Ok(run(&mut cmd, Io::Capture, Duration::from_secs(120))?
        .stdout
        .trim()
        .to_string())
}

/// The last commit before the bump to this tree's newest session version.
fn previous_build(root: &Path) -> Result<String> {
    let path = root.join(HANDSHAKE_RS);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let Some(line) = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(MAX_VERSION_LINE))
    else {
        bail!("no `{MAX_VERSION_LINE}N;` line in {HANDSHAKE_RS}: give --against REV");
    };
    let bumped = git(
        root,
        &[
            "log",
            "--reverse",
            "--format=%H",
            "-S",
            line,
            "--",
            HANDSHAKE_RS,
        ],
    )?;
    match bumped.lines().next() {
        Some(commit) => {
            eprintln!("  `{line}` came with {commit}: testing against its parent");
            Ok(format!("{commit}^"))
        }
        None => {
            let head = git(root, &["show", &format!("HEAD:{HANDSHAKE_RS}")])?;
            if head.contains(line) {
                bail!("HEAD has `{line}` but no commit added it: give --against REV");
            }
            eprintln!("  `{line}` is not committed yet: testing against HEAD");
            Ok("HEAD".into())
        }
    }
}

/// A detached checkout of `commit` at `path`, reused when it is already there.
fn checkout(root: &Path, path: &Path, commit: &str) -> Result<PathBuf> {
    if path.join(".git").exists() {
        if git(path, &["rev-parse", "HEAD"])? == commit {
            eprintln!("  reusing the checkout in {}", path.display());
            return Ok(path.to_path_buf());
        }
        git(root, &["worktree", "remove", "--force", &s(path)])?;
    }
    // A checkout whose directory was deleted by hand still blocks its path until pruned.
    git(root, &["worktree", "prune"])?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    git(root, &["worktree", "add", "--detach", &s(path), commit])?;
    Ok(path.to_path_buf())
}

/// One `dwcp` binary and the options it gets.
type Side<'a> = (&'a Path, &'a [&'a str]);

struct Peers<'a> {
    dir: &'a Path,
    image: &'a Path,
    key: &'a Path,
}

impl Peers<'_> {
    fn start_recv(&self, bin: &Path, extra: &[&str], out: &Path) -> Result<(Proc, String)> {
        let _ = std::fs::remove_file(out);
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        cmd.args(["recv", "--listen", &listen, "--out", &s(out), "--psk-file"])
            .arg(self.key)
            .arg("--json")
            .args(extra);
        eprintln!("  $ {} &", describe(&cmd));
        let mut recv = Proc::spawn(&mut cmd, Io::Capture)?;
        wait_listening(&mut recv, port, LISTEN_TIMEOUT)?;
        Ok((recv, listen))
    }

    fn send(&self, bin: &Path, extra: &[&str], to: &str) -> Result<Proc> {
        let mut cmd = Command::new(bin);
        cmd.args(["send", "--to", to, "--image", &s(self.image), "--psk-file"])
            .arg(self.key)
            .args(["--json", "--no-progress"])
            .args(extra);
        eprintln!("  $ {}", describe(&cmd));
        Proc::spawn(&mut cmd, Io::Capture)
    }

    /// One migration of the image from `source` to `dest`; both must succeed, agree on the
    /// digest, and leave a byte-identical copy. Their JSON reports.
    fn transfer(&self, source: Side<'_>, dest: Side<'_>) -> Result<(Value, Value)> {
        let out = self.dir.join("received");
        let (mut recv, listen) = self.start_recv(dest.0, dest.1, &out)?;
        let sent = self
            .send(source.0, source.1, &listen)?
            .wait(TRANSFER_TIMEOUT)?;
        if !sent.status.success() {
            bail!(
                "the send failed ({}){}{}",
                sent.status,
                tail("send stderr", &sent.stderr),
                recv.stop_and_tail()
            );
        }
        let received = recv.wait_success(TRANSFER_TIMEOUT)?;
        let (sent, received) = (
            parse_json("dwcp send", &sent.stdout)?,
            parse_json("dwcp recv", &received.stdout)?,
        );
        for (what, r) in [("send", &sent), ("recv", &received)] {
            if r.get("digest_match") != Some(&Value::Bool(true)) {
                bail!("the {what} report has no digest_match: true: {r}");
            }
        }
        if sent.get("digest") != received.get("digest") {
            bail!("the digests differ: send {sent}, recv {received}");
        }
        if !same_file(self.image, &out)? {
            bail!(
                "{} differs from the sent image {}",
                out.display(),
                self.image.display()
            );
        }
        eprintln!(
            "  ok: {} ms, digest {}",
            sent.get("total_ms").and_then(Value::as_f64).unwrap_or(0.0) as u64,
            sent.get("digest").and_then(Value::as_str).unwrap_or("?")
        );
        Ok((sent, received))
    }

    /// An old source to a new destination that requires a VM UUID: the send fails, saying why,
    /// the destination keeps waiting, and no output was created.
    fn refused(&self, old: &Path, new: &Path) -> Result<()> {
        let out = self.dir.join("refused");
        let (mut recv, listen) = self.start_recv(new, &["--expect-vm-uuid", VM_UUID], &out)?;
        let sent = self.send(old, &[], &listen)?.wait(TRANSFER_TIMEOUT)?;
        if sent.status.success() {
            bail!(
                "an old source was not refused by a destination requiring a VM UUID{}",
                recv.stop_and_tail()
            );
        }
        // The old build does not know code 9 (Identity) and shows it as Internal; the message
        // says what happened.
        if !sent.stderr.contains("VM identity refused") || !sent.stderr.contains(VM_UUID) {
            bail!(
                "the old source's error does not say why it was refused{}",
                tail("send stderr", &sent.stderr)
            );
        }
        if recv.has_exited()? {
            bail!("the new recv exited after refusing the old source");
        }
        if out.exists() {
            bail!("{} was created for a refused source", out.display());
        }
        recv.kill();
        eprintln!("  ok: refused, and the recv kept waiting with no output written");
        Ok(())
    }
}

/// `key` of a JSON report must be `want`.
fn expect(report: &Value, key: &str, want: impl Into<Value>, what: &str) -> Result<()> {
    let want = want.into();
    match report.get(key) {
        Some(v) if *v == want => Ok(()),
        other => bail!("{what} reported {key} = {other:?}, expected {want}"),
    }
}

/// Whether two files hold the same bytes, read in 1 MiB pieces (images may be large).
fn same_file(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let open =
        |p: &Path| std::fs::File::open(p).with_context(|| format!("opening {}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut x)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut y[..n])?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
    }
}
