//! A test bed run by the `dwcp-wanem` binary as a child process, for tests and tools: started with
//! `dwcp-wanem up … --exit-on-stdin-eof`, it tears its link down when asked, when this value is
//! dropped (also while unwinding from a panic), and when this process dies (its stdin pipe closes).

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::LinkParams;
use crate::forward::LinkStats;
use crate::netns;

/// The line `dwcp-wanem up` prints on stdout once the link forwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    /// Always "ready".
    pub event: String,
    /// Source namespace.
    pub src_ns: String,
    /// Destination namespace.
    pub dst_ns: String,
    /// Source address.
    pub src_addr: Ipv4Addr,
    /// Destination address.
    pub dst_addr: Ipv4Addr,
    /// Interface name in both namespaces.
    pub interface: String,
    /// MTU.
    pub mtu: u32,
    /// The emulated path.
    pub params: LinkParams,
    /// Configured rate, bits/s (0: unlimited).
    pub rate_bps: u64,
    /// Configured RTT, ms.
    pub rtt_ms: f64,
    /// Configured mean loss per direction, 0..=1.
    pub loss: f64,
    /// Queue limit per direction, bytes.
    pub queue_bytes: u64,
    /// Human summary.
    pub summary: String,
    /// The forwarder's process id.
    pub pid: u32,
}

/// The line `dwcp-wanem up` prints on stdout when it stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stopped {
    /// Always "stopped".
    pub event: String,
    /// Why.
    pub reason: String,
    /// Final counters.
    pub stats: LinkStats,
}

/// A running link in a child process.
#[derive(Debug)]
pub struct Testbed {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    ready: Ready,
}

impl Testbed {
    /// Starts `binary up --src-ns SRC --dst-ns DST EXTRA…` and waits (at most 30 s) until it forwards.
    pub fn start(binary: &Path, src_ns: &str, dst_ns: &str, extra: &[String]) -> Result<Self> {
        netns::require_privileges()?;
        let mut child = Command::new(binary)
            .args([
                "up",
                "--src-ns",
                src_ns,
                "--dst-ns",
                dst_ns,
                "--exit-on-stdin-eof",
            ])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut bed = Self {
            child,
            stdin,
            lines,
            ready: Ready {
                event: String::new(),
                src_ns: src_ns.into(),
                dst_ns: dst_ns.into(),
                src_addr: Ipv4Addr::UNSPECIFIED,
                dst_addr: Ipv4Addr::UNSPECIFIED,
                interface: String::new(),
                mtu: 0,
                params: crate::config::Profile::Lan.params(),
                rate_bps: 0,
                rtt_ms: 0.0,
                loss: 0.0,
                queue_bytes: 0,
                summary: String::new(),
                pid: 0,
            },
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match bed.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(line) => {
                    if let Ok(r) = serde_json::from_str::<Ready>(&line)
                        && r.event == "ready"
                    {
                        bed.ready = r;
                        return Ok(bed);
                    }
                }
                Err(_) => {
                    let status = bed.child.try_wait().ok().flatten();
                    bail!(
                        "the link did not come up within 30 s{}",
                        status
                            .map(|s| format!(" (dwcp-wanem exited: {s})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }

    /// What the link is.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// Tears the link down and returns the forwarder's final counters.
    pub fn stop(mut self) -> Result<Stopped> {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stopped = None;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Ok(s) = serde_json::from_str::<Stopped>(&line)
                        && s.event == "stopped"
                    {
                        stopped = Some(s);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        self.finish();
        stopped.context("dwcp-wanem did not report its final counters")
    }

    fn finish(&mut self) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for ns in [&self.ready.src_ns, &self.ready.dst_ns] {
            let _ = netns::delete(ns);
        }
    }

    /// Whether the forwarder process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.finish();
    }
}
