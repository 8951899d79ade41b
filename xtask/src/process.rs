//! Child processes with bounded waits. A [`Proc`] that is dropped while its process still runs (an error,
//! a timeout, a panic) kills the process and every process it started, so nothing outlives the xtask.

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How a child's standard output and error are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// Shared with the xtask (the user sees them).
    Inherit,
    /// Collected, and returned by [`Proc::wait`].
    Capture,
}

/// A running child process, killed with its descendants when dropped before it exits.
#[derive(Debug)]
pub struct Proc {
    label: String,
    child: Child,
    done: bool,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

/// A process that exited.
#[derive(Debug)]
pub struct Finished {
    /// Its exit status.
    pub status: ExitStatus,
    /// Captured standard output (empty with [`Io::Inherit`]).
    pub stdout: String,
    /// Captured standard error (empty with [`Io::Inherit`]).
    pub stderr: String,
}

/// A human-readable form of `cmd`.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<Vec<u8>>> {
    pipe.map(|mut p| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = p.read_to_end(&mut v);
            v
        })
    })
}

impl Proc {
    /// Starts `cmd` with standard input closed.
    pub fn spawn(cmd: &mut Command, io: Io) -> Result<Self> {
        let label = describe(cmd);
        cmd.stdin(Stdio::null());
        if io == Io::Capture {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = cmd.spawn().with_context(|| format!("starting `{label}`"))?;
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        Ok(Self {
            label,
            child,
            done: false,
            stdout,
            stderr,
        })
    }

    /// The command line.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether the process has exited (without collecting its output).
    pub fn has_exited(&mut self) -> Result<bool> {
        Ok(self
            .child
            .try_wait()
            .with_context(|| format!("polling `{}`", self.label))?
            .is_some())
    }

    /// Waits at most `timeout` for the process to exit; past that it is killed (with its descendants) and
    /// an error returned. Does not judge the exit status.
    pub fn wait(&mut self, timeout: Duration) -> Result<Finished> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for `{}`", self.label))?
            {
                break status;
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "`{}` did not finish within {} s and was killed",
                    self.label,
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.done = true;
        let text = |h: Option<JoinHandle<Vec<u8>>>| {
            h.and_then(|h| h.join().ok())
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default()
        };
        Ok(Finished {
            status,
            stdout: text(self.stdout.take()),
            stderr: text(self.stderr.take()),
        })
    }

    /// Kills the process (with its descendants) unless it already exited, and returns the end of
    /// what it wrote to standard error, for a failure report.
    pub fn stop_and_tail(&mut self) -> String {
        self.kill();
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        tail(&self.label, &stderr)
    }

    /// Like [`wait`](Self::wait), and fails unless the process exited successfully.
    pub fn wait_success(&mut self, timeout: Duration) -> Result<Finished> {
        let out = self.wait(timeout)?;
        if !out.status.success() {
            bail!(
                "`{}` failed ({}){}",
                self.label,
                out.status,
                tail("stderr", &out.stderr)
            );
        }
        Ok(out)
    }

    /// Kills the process and all its descendants, and reaps it.
    pub fn kill(&mut self) {
        if self.done {
            return;
        }
        kill_tree(&mut self.child);
        self.done = true;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.done && matches!(self.child.try_wait(), Ok(None)) {
            eprintln!("xtask: stopping `{}`", self.label);
        }
        self.kill();
    }
}

/// Runs `cmd` to completion within `timeout`, failing on a non-zero exit.
pub fn run(cmd: &mut Command, io: Io, timeout: Duration) -> Result<Finished> {
    Proc::spawn(cmd, io)?.wait_success(timeout)
}

/// The last lines of a captured stream, for error messages.
pub fn tail(name: &str, text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let from = lines.len().saturating_sub(25);
    format!(
        "\n--- last lines of {name} ---\n{}",
        lines[from..].join("\n")
    )
}

/// Parent of every process, from /proc.
fn parents() -> HashMap<u32, u32> {
    let mut map = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return map;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
            map.insert(pid, ppid);
        }
    }
    map
}

fn descendants(root: u32) -> Vec<u32> {
    let parents = parents();
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&pid, &ppid) in &parents {
            if ppid == p && !found.contains(&pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    found
}

fn signal(sig: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(sig)
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Kills `child` and everything it started: freeze the tree (so nothing new is spawned and nothing is
/// re-parented out of sight), collect it again, then SIGKILL it all.
fn kill_tree(child: &mut Child) {
    let root = child.id();
    if matches!(child.try_wait(), Ok(None)) {
        signal("-STOP", &[root]);
        let mut pids = descendants(root);
        signal("-STOP", &pids);
        for pid in descendants(root) {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        signal("-KILL", &pids);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Whether some socket listens on TCP `port` (any address), from /proc/net/tcp{,6}; `None` when that
/// cannot be told.
pub(crate) fn is_listening(port: u16) -> Option<bool> {
    let mut readable = false;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        readable = true;
        for line in text.lines().skip(1) {
            let mut f = line.split_whitespace();
            let (Some(local), Some(state)) = (f.nth(1), f.nth(1)) else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && state == "0A" {
                return Some(true);
            }
        }
    }
    readable.then_some(false)
}

/// Waits until `server` listens on `port`, without connecting to it (a probe connection would count as a
/// client for one-shot servers). Fails if the server exits first or `timeout` passes.
pub fn wait_listening(server: &mut Proc, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if server.has_exited()? {
            let out = server.wait(Duration::from_secs(1))?;
            bail!(
                "`{}` exited ({}) before listening on port {port}{}",
                server.label(),
                out.status,
                tail("stderr", &out.stderr)
            );
        }
        match is_listening(port) {
            Some(true) => return Ok(()),
            Some(false) => {}
            None => {
                // No /proc: give the server a moment and hope.
                std::thread::sleep(Duration::from_millis(500));
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "`{}` did not listen on port {port} within {} s",
                server.label(),
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn timeout_kills_the_whole_tree() {
        if !Path::new("/proc/self/stat").exists() {
            return;
        }
        let mut p = Proc::spawn(
            Command::new("sh").args(["-c", "sleep 60 & sleep 60 & wait"]),
            Io::Capture,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let kids = loop {
            let k = descendants(p.child.id());
            if k.len() >= 2 || Instant::now() >= deadline {
                break k;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(kids.len(), 2, "{kids:?}");
        let err = p.wait(Duration::from_millis(100)).unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        std::thread::sleep(Duration::from_millis(100));
        for k in kids {
            assert!(!alive(k), "descendant {k} survived");
        }
    }

    #[test]
    fn captures_output_and_judges_status() {
        let out = run(
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            Io::Capture,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(
            (out.stdout.as_str(), out.stderr.as_str()),
            ("out\n", "err\n")
        );
        let err = run(
            Command::new("sh").args(["-c", "echo boom >&2; exit 3"]),
            Io::Capture,
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
    }

    #[test]
    fn sees_a_listening_port() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if let Some(listening) = is_listening(port) {
            assert!(listening);
            drop(l);
            // A child another test forks in parallel holds a copy of the listener until it execs, so
            // the socket may outlive `drop` by that moment.
            let deadline = Instant::now() + Duration::from_secs(5);
            while is_listening(port) == Some(true) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(is_listening(port), Some(false));
        }
    }
}
