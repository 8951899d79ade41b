//! A real etcd cluster on loopback for tests and benchmarks: `etcd` processes on free
//! `127.0.0.1` ports, each with its data directory in one temporary directory, that a test can
//! kill, restart, pause and resume. Every process is killed when the [`EtcdCluster`] is dropped,
//! also when a test panics.
//!
//! Needs the `etcd` binary on `PATH` (Debian's `etcd-server`, installed by `scripts/setup.sh`),
//! or its path in `DWCP_ETCD`. Without it [`EtcdCluster::start`] fails: tests that use the
//! cluster must fail rather than skip, since CI installs it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use dwcp_acp::etcd::{EtcdRegistry, testing::EtcdCluster};
//! let cluster = EtcdCluster::start(3)?;
//! let timeout = std::time::Duration::from_secs(2);
//! let registry = EtcdRegistry::connect(&cluster.endpoints(), "/test", timeout).await?;
//! cluster.pause(cluster.leader().unwrap_or(0))?; // the leader stops answering
//! # drop(registry);
//! # Ok(()) }
//! ```

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::{debug, info};

/// Why the test cluster could not be started or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The `etcd` binary is not installed.
    #[error(
        "cannot run {binary:?} ({source}): install etcd with scripts/setup.sh (Debian package etcd-server) or set DWCP_ETCD to its path"
    )]
    EtcdMissing {
        /// What was run.
        binary: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A process, file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The failure.
        source: std::io::Error,
    },
    /// A member exited or did not become healthy in time.
    #[error("etcd member {member} {problem}; the end of its log:\n{log_tail}")]
    Unhealthy {
        /// The member's index.
        member: usize,
        /// What went wrong.
        problem: String,
        /// The last lines it logged.
        log_tail: String,
    },
    /// No member with this index.
    #[error("no etcd member {0} in this cluster")]
    NoSuchMember(usize),
}

/// How the members run.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Raft heartbeat interval (etcd's `--heartbeat-interval`).
    pub heartbeat_interval: Duration,
    /// Raft election timeout (etcd's `--election-timeout`): how long a paused leader lasts.
    pub election_timeout: Duration,
    /// How long [`EtcdCluster::start`] waits for every member to be healthy.
    pub start_timeout: Duration,
    /// The etcd binary: by default `$DWCP_ETCD`, else `etcd` on `PATH`.
    pub binary: Option<PathBuf>,
}

impl Default for ClusterConfig {
    /// etcd's own timing (100 ms heartbeats, 1 s elections), so that benchmarks measure what a
    /// deployment sees; fault tests shorten it.
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_millis(1000),
            start_timeout: Duration::from_secs(30),
            binary: None,
        }
    }
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    process: Option<Child>,
    paused: bool,
}

/// A running etcd cluster on loopback; see the [module](self) documentation.
#[derive(Debug)]
pub struct EtcdCluster {
    binary: String,
    config: ClusterConfig,
    initial_cluster: String,
    token: String,
    members: Mutex<Vec<Member>>,
    /// Holds every member's data directory and log; removed after the processes are killed.
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `members` etcd processes (1 or more; 3 for a fault-tolerant cluster) with etcd's
    /// default timing, and waits until each is healthy.
    pub fn start(members: usize) -> Result<Self, ClusterError> {
        Self::start_with(members, ClusterConfig::default())
    }

    /// Starts `members` etcd processes timed by `config`, and waits until each is healthy.
    pub fn start_with(members: usize, config: ClusterConfig) -> Result<Self, ClusterError> {
        assert!(members > 0, "an etcd cluster needs a member");
        let binary = match &config.binary {
            Some(path) => path.to_string_lossy().into_owned(),
            None => std::env::var("DWCP_ETCD").unwrap_or_else(|_| "etcd".into()),
        };
        Command::new(&binary)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|source| ClusterError::EtcdMissing {
                binary: binary.clone(),
                source,
            })?;
        // Free ports can be taken by someone else between our probe and etcd's bind: start over
        // on fresh ports a few times rather than fail.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start(&binary, members, &config) {
                Ok(cluster) => return Ok(cluster),
                Err(e) if attempt < 3 && matches!(e, ClusterError::Unhealthy { .. }) => {
                    info!(error = %e, "etcd test cluster did not start; retrying on new ports");
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_start(
        binary: &str,
        members: usize,
        config: &ClusterConfig,
    ) -> Result<Self, ClusterError> {
        let dir = tempfile::Builder::new()
            .prefix("dwcp-etcd-")
            .tempdir()
            .map_err(|source| io("create a temporary directory", source))?;
        let ports = free_ports(2 * members)?;
        let members: Vec<Member> = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                process: None,
                paused: false,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dwcp-test".into());
        let cluster = Self {
            binary: binary.to_owned(),
            config: config.clone(),
            initial_cluster,
            token,
            members: Mutex::new(members),
            dir,
        };
        for i in 0..cluster.len() {
            cluster.spawn(i)?;
        }
        cluster.wait_healthy(cluster.config.start_timeout)?;
        info!(endpoints = ?cluster.endpoints(), "etcd test cluster running");
        Ok(cluster)
    }

    /// How many members the cluster has.
    pub fn len(&self) -> usize {
        self.members.lock().len()
    }

    /// Whether the cluster has no member (never: [`start`](Self::start) needs one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every member's client URL, `http://127.0.0.1:port`, by index.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .lock()
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> Result<String, ClusterError> {
        self.endpoints()
            .get(i)
            .cloned()
            .ok_or(ClusterError::NoSuchMember(i))
    }

    /// The temporary directory holding the members' data directories and logs (`m{i}.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills member `i` (SIGKILL, no clean shutdown); a no-op if it is not running.
    pub fn kill(&self, i: usize) -> Result<(), ClusterError> {
        let mut members = self.members.lock();
        let member = members.get_mut(i).ok_or(ClusterError::NoSuchMember(i))?;
        if let Some(mut process) = member.process.take() {
            // SIGKILL ends a stopped process too.
            process
                .kill()
                .map_err(|source| io("kill an etcd member", source))?;
            process
                .wait()
                .map_err(|source| io("reap an etcd member", source))?;
            debug!(member = i, "etcd member killed");
        }
        member.paused = false;
        Ok(())
    }

    /// Starts member `i` again on its data directory and ports (killing it first if it runs).
    /// Does not wait for it to rejoin: see [`wait_healthy`](Self::wait_healthy).
    pub fn restart(&self, i: usize) -> Result<(), ClusterError> {
        self.kill(i)?;
        self.spawn(i)
    }

    /// Stops member `i` with SIGSTOP: it keeps its sockets but answers nothing, as if
    /// partitioned away, until [`resume`](Self::resume). A no-op if it is not running.
    pub fn pause(&self, i: usize) -> Result<(), ClusterError> {
        self.signal(i, "-STOP", true)
    }

    /// Lets a paused member `i` run again (SIGCONT).
    pub fn resume(&self, i: usize) -> Result<(), ClusterError> {
        self.signal(i, "-CONT", false)
    }

    /// Whether member `i` is running and not paused.
    pub fn is_up(&self, i: usize) -> bool {
        self.members
            .lock()
            .get(i)
            .is_some_and(|m| m.process.is_some() && !m.paused)
    }

    /// Resumes every paused member and restarts every killed one.
    pub fn heal(&self) -> Result<(), ClusterError> {
        for i in 0..self.len() {
            let (running, paused) = {
                let members = self.members.lock();
                (members[i].process.is_some(), members[i].paused)
            };
            if !running {
                self.spawn(i)?;
            } else if paused {
                self.resume(i)?;
            }
        }
        Ok(())
    }

    /// Waits until every running, unpaused member reports itself healthy (it has a leader and
    /// serves reads), at most `timeout`.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        for i in 0..self.len() {
            loop {
                let (port, log) = {
                    let mut members = self.members.lock();
                    let member = &mut members[i];
                    if member.paused {
                        break;
                    }
                    let Some(process) = member.process.as_mut() else {
                        break;
                    };
                    if let Ok(Some(status)) = process.try_wait() {
                        member.process = None;
                        return Err(ClusterError::Unhealthy {
                            member: i,
                            problem: format!("exited ({status})"),
                            log_tail: tail(&member.log),
                        });
                    }
                    (member.client_port, member.log.clone())
                };
                if http_get(port, "/health", Duration::from_millis(500))
                    .is_some_and(|body| body.contains(r#""health":"true""#))
                {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(ClusterError::Unhealthy {
                        member: i,
                        problem: format!("not healthy within {timeout:?}"),
                        log_tail: tail(&log),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The member that considers itself leader, if one answers within a short time (from its
    /// `etcd_server_is_leader` metric).
    pub fn leader(&self) -> Option<usize> {
        let ports: Vec<(u16, bool)> = self
            .members
            .lock()
            .iter()
            .map(|m| (m.client_port, m.process.is_some() && !m.paused))
            .collect();
        ports.into_iter().position(|(port, up)| {
            up && http_get(port, "/metrics", Duration::from_millis(300))
                .is_some_and(|body| body.lines().any(|l| l == "etcd_server_is_leader 1"))
        })
    }

    fn spawn(&self, i: usize) -> Result<(), ClusterError> {
        let mut members = self.members.lock();
        let member = members.get_mut(i).ok_or(ClusterError::NoSuchMember(i))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log)
            .map_err(|source| io("open an etcd log", source))?;
        let stderr = log
            .try_clone()
            .map_err(|source| io("open an etcd log", source))?;
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let mut command = Command::new(&self.binary);
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&member.data_dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &self.initial_cluster])
            .args([
                "--initial-cluster-token",
                &self.token,
                "--initial-cluster-state",
                "new",
            ])
            .arg(format!(
                "--heartbeat-interval={}",
                self.config.heartbeat_interval.as_millis()
            ))
            .arg(format!(
                "--election-timeout={}",
                self.config.election_timeout.as_millis()
            ))
            .args(["--logger=zap", "--log-outputs=stderr", "--log-level=warn"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        // etcd reads ETCD_* variables as flags: one set in the caller's environment must not
        // change the test cluster.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(name);
            }
        }
        let process = command
            .spawn()
            .map_err(|source| ClusterError::EtcdMissing {
                binary: self.binary.clone(),
                source,
            })?;
        debug!(member = i, pid = process.id(), %client, "etcd member started");
        member.process = Some(process);
        member.paused = false;
        Ok(())
    }

    fn signal(&self, i: usize, signal: &str, pause: bool) -> Result<(), ClusterError> {
        let mut members = self.members.lock();
        let member = members.get_mut(i).ok_or(ClusterError::NoSuchMember(i))?;
        let Some(process) = member.process.as_ref() else {
            return Ok(());
        };
        if member.paused == pause {
            return Ok(());
        }
        // kill(1) rather than libc::kill: the crate forbids unsafe code.
        let status = Command::new("kill")
            .arg(signal)
            .arg(process.id().to_string())
            .status()
            .map_err(|source| io("run kill(1)", source))?;
        if !status.success() {
            return Err(io(
                "signal an etcd member",
                std::io::Error::other(format!("kill {signal} exited with {status}")),
            ));
        }
        member.paused = pause;
        debug!(member = i, signal, "etcd member signalled");
        Ok(())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for (i, member) in self.members.get_mut().iter_mut().enumerate() {
            if let Some(mut process) = member.process.take() {
                let _ = process.kill();
                let _ = process.wait();
            }
            // A failing test is easier to read with what etcd said.
            if panicking {
                eprintln!("--- etcd member {i} log (end) ---\n{}", tail(&member.log));
            }
        }
    }
}

fn io(what: &str, source: std::io::Error) -> ClusterError {
    ClusterError::Io {
        what: what.to_owned(),
        source,
    }
}

/// `n` distinct ports that were free on 127.0.0.1 a moment ago (all probes held at once so
/// that they differ).
fn free_ports(n: usize) -> Result<Vec<u16>, ClusterError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| io("find a free port", source))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|source| io("find a free port", source))
}

/// The body of `GET path` on 127.0.0.1:`port`, if it answers 200 within `timeout`.
fn http_get(port: u16, path: &str, timeout: Duration) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then_some(())?;
    head.split_whitespace()
        .nth(1)
        .filter(|code| *code == "200")?;
    Some(body.to_owned())
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_etcd_says_how_to_install_it() {
        let config = ClusterConfig {
            binary: Some("/nonexistent/etcd".into()),
            ..ClusterConfig::default()
        };
        let error = EtcdCluster::start_with(1, config).unwrap_err();
        assert!(
            matches!(error, ClusterError::EtcdMissing { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("scripts/setup.sh"), "{error}");
    }
}
