//! The control socket of a running `dwcp send --control PATH`, and its client `dwcp control`.
//!
//! One command per connection, one line each way: the client writes a command, the server answers
//! with one JSON object (`{"ok": true, ...}` or `{"ok": false, "error": "..."}`). Commands:
//!
//! - `max-bandwidth RATE` (K/M/G: powers of 1024, bytes per second) or `max-bandwidth none`:
//!   changes the migration's cap at its next batch (`Migration::bandwidth_handle`);
//! - `cancel`: cancels the migration (the source keeps the image; the destination discards);
//! - `status`: the cap now.
//!
//! The socket is a Unix socket readable and writable by its owner only (mode 0600), removed when
//! the migration ends. A command line is at most 256 bytes; a client gets 5 s to send it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use dwcp::BandwidthHandle;
use serde_json::{Value, json};

use crate::args::ControlArgs;

/// The longest command line the server reads.
const MAX_COMMAND: u64 = 256;
/// How long a client has to send its command, and the client to get its answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running control socket; dropping it stops serving and removes the socket file.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the control socket acts on.
#[derive(Clone)]
pub struct Controls {
    /// The migration's cap.
    pub bandwidth: BandwidthHandle,
    /// The migration's cancel flag.
    pub cancel: Arc<AtomicBool>,
}

impl ControlServer {
    /// Listens on `path` (a stale socket file there is replaced; any other file is an error).
    pub fn start(path: &Path, controls: Controls) -> anyhow::Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                bail!(
                    "--control {}: the path exists and is not a socket",
                    path.display()
                );
            }
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "--control {}: another process is listening there",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("creating the control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {} to its owner", path.display()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("dwcp-control".into())
                .spawn(move || serve(listener, controls, &stop))?
        };
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: UnixListener, controls: Controls, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                // One client at a time: commands are tiny, and a slow client times out.
                if let Err(e) = answer(stream, &controls) {
                    tracing::warn!(error = %e, "control socket: a client failed");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn answer(stream: UnixStream, controls: &Controls) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_COMMAND)).read_line(&mut line)?;
    let reply = execute(line.trim(), controls);
    tracing::info!(
        command = line.trim(),
        ok = reply["ok"].as_bool(),
        "control command"
    );
    let mut out = &stream;
    writeln!(out, "{reply}")
}

/// Runs one command line and returns the answer.
fn execute(line: &str, controls: &Controls) -> Value {
    let words: Vec<&str> = line.split_whitespace().collect();
    let status = |c: &Controls| json!({ "ok": true, "max_bandwidth": c.bandwidth.get() });
    match words.as_slice() {
        ["max-bandwidth", "none"] => match controls.bandwidth.set(None) {
            Ok(()) => status(controls),
            Err(e) => json!({ "ok": false, "error": e.to_string() }),
        },
        ["max-bandwidth", rate] => {
            let set = crate::args::parse_rate(rate)
                .map_err(|e| e.to_string())
                .and_then(|r| controls.bandwidth.set(Some(r)).map_err(|e| e.to_string()));
            match set {
                Ok(()) => status(controls),
                Err(e) => json!({ "ok": false, "error": e }),
            }
        }
        ["cancel"] => {
            controls.cancel.store(true, Ordering::Release);
            json!({ "ok": true, "cancelled": true })
        }
        ["status"] => status(controls),
        _ => json!({
            "ok": false,
            "error": format!("unknown command {line:?} (expected: max-bandwidth RATE|none, cancel, status)"),
        }),
    }
}

/// `dwcp control --socket PATH COMMAND...`: sends one command and prints the answer.
pub fn run(args: ControlArgs) -> anyhow::Result<()> {
    let command = args.command.join(" ");
    if command.len() as u64 >= MAX_COMMAND {
        bail!("the command is too long ({} bytes)", command.len());
    }
    let mut stream = UnixStream::connect(&args.socket).with_context(|| {
        format!(
            "connecting to {} (is a `dwcp send --control` running?)",
            args.socket.display()
        )
    })?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    writeln!(stream, "{command}")?;
    let mut reply = String::new();
    BufReader::new(stream.take(64 << 10)).read_line(&mut reply)?;
    let v: Value = serde_json::from_str(reply.trim())
        .with_context(|| format!("the answer {reply:?} is not JSON"))?;
    println!("{v}");
    if v["ok"].as_bool() != Some(true) {
        bail!(
            "{}",
            v["error"].as_str().unwrap_or("the command was refused")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controls() -> Controls {
        Controls {
            bandwidth: BandwidthHandle::default(),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    #[test]
    fn commands_change_the_cap_and_cancel_and_bad_ones_are_refused() {
        let c = controls();
        assert_eq!(execute("max-bandwidth 2M", &c)["max_bandwidth"], 2 << 20);
        assert_eq!(c.bandwidth.get(), Some(2 << 20));
        assert_eq!(execute("status", &c)["max_bandwidth"], 2 << 20);
        assert!(execute("max-bandwidth none", &c)["max_bandwidth"].is_null());
        assert_eq!(c.bandwidth.get(), None);
        for bad in [
            "max-bandwidth 0",
            "max-bandwidth -3",
            "max-bandwidth lots",
            "reboot",
            "",
        ] {
            let v = execute(bad, &c);
            assert_eq!(v["ok"], false, "{bad}: {v}");
            assert!(!v["error"].as_str().unwrap().is_empty());
        }
        assert_eq!(c.bandwidth.get(), None, "a refused command changes nothing");
        assert!(!c.cancel.load(Ordering::Acquire));
        assert_eq!(execute("cancel", &c)["ok"], true);
        assert!(c.cancel.load(Ordering::Acquire));
    }

    #[test]
    fn the_socket_is_private_and_removed_when_done() {
        let dir = std::env::temp_dir().join(format!("dwcp-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let c = controls();
        let server = ControlServer::start(&path, c.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            ControlServer::start(&path, c.clone()).is_err(),
            "a live socket is not taken over"
        );
        let mut s = UnixStream::connect(&path).unwrap();
        // An endless line is cut at the limit, and answered as an unknown command.
        s.write_all(&[b'x'; 1000]).unwrap();
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply).unwrap();
        assert!(reply.contains("\"ok\":false"), "{reply}");
        drop(server);
        assert!(!path.exists());
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(ControlServer::start(&path, c).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
