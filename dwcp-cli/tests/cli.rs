//! End-to-end tests of the `dwcp` binary: real processes talking over loopback. Every wait is bounded,
//! and a child still running when a test ends (or fails) is killed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_dwcp");

/// Upper bound of a migration in these tests (debug builds are slow, the machine may be busy).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// Upper bound of anything that should be quick.
const SHORT_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `dwcp` whose output is collected in the background; killed on drop if still running.
struct Proc {
    name: String,
    child: Option<Child>,
    stdout: Option<JoinHandle<String>>,
    stderr: Arc<Mutex<String>>,
    stderr_lines: Receiver<String>,
}

/// How a process ended.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn json(&self) -> Value {
        // Exactly one JSON object: parsing the whole (trimmed) stdout as one value rejects anything else.
        let v: Value = serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON object ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        });
        assert!(v.is_object(), "not an object: {v}");
        v
    }

    fn assert_success(&self, what: &str) {
        assert!(
            self.status.success(),
            "{what} failed with {}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

impl Proc {
    fn spawn(name: &str, args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(args)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {BIN}: {e}"));
        let mut out = child.stdout.take().unwrap();
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, stderr_lines) = mpsc::channel();
        let acc = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut a = acc.lock().unwrap();
                a.push_str(&line);
                a.push('\n');
                let _ = tx.send(line);
            }
        });
        Self {
            name: name.to_string(),
            child: Some(child),
            stdout: Some(stdout),
            stderr,
            stderr_lines,
        }
    }

    /// Waits until a line of stderr contains `needle`.
    fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .stderr_lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let f = self.wait(SHORT_TIMEOUT);
                    panic!(
                        "{} exited ({}) before printing {needle:?}\nstderr:\n{}",
                        self.name, f.status, f.stderr
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "{} did not print {needle:?} within {timeout:?}\nstderr:\n{}",
                    self.name,
                    self.stderr_text()
                );
            }
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Whether the process is still running.
    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("polling a child").is_none())
    }

    /// Sends `signal` (a name `kill` knows: INT, TERM) to the process.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill")
            .args([format!("-{signal}"), pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {}", self.name);
    }

    /// Waits for the process to exit; kills it and fails the test after `timeout`.
    fn wait(&mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let mut child = self.child.take().expect("waited twice");
        let status = loop {
            if let Some(status) = child.try_wait().expect("polling a child") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within {timeout:?}\nstderr:\n{}",
                    self.name,
                    self.stderr_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stdout = self.stdout.take().unwrap().join().unwrap();
        // The stderr reader ends at EOF, right after the exit; give it a moment to collect the last lines.
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            match self.stderr_lines.recv_timeout(Duration::from_millis(50)) {
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                _ => continue,
            }
        }
        Finished {
            status,
            stdout,
            stderr: self.stderr_text(),
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `dwcp args` to completion.
fn run(name: &str, args: &[&str], timeout: Duration) -> Finished {
    Proc::spawn(name, args).wait(timeout)
}

/// Distinct loopback ports that were free a moment ago.
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    run("keygen", &["keygen", "--out", s(&path)], SHORT_TIMEOUT).assert_success("keygen");
    path
}

fn mkimage(dir: &Path, name: &str, size: &str, mix: &str) -> PathBuf {
    let path = dir.join(name);
    run(
        "mkimage",
        &[
            "mkimage",
            "--size",
            size,
            "--mix",
            mix,
            "--seed",
            "7",
            "--out",
            s(&path),
        ],
        SHORT_TIMEOUT,
    )
    .assert_success("mkimage");
    path
}

/// Starts `dwcp recv` and waits until it listens.
fn start_recv(dir: &Path, port: u16, key: &Path, out: &str, extra: &[&str]) -> (Proc, PathBuf) {
    let out = dir.join(out);
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "recv",
        "--listen",
        &listen,
        "--out",
        s(&out),
        "--psk-file",
        s(key),
        "--json",
    ];
    args.extend_from_slice(extra);
    let mut recv = Proc::spawn("recv", &args);
    recv.wait_for_stderr("listening on", SHORT_TIMEOUT);
    (recv, out)
}

/// `dwcp send` of `image` to a `dwcp recv` on `port`, reporting in JSON, with `extra` options.
fn send_args(port: u16, image: &Path, key: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "send",
        "--to",
        &format!("127.0.0.1:{port}"),
        "--image",
        s(image),
        "--psk-file",
        s(key),
        "--json",
        "--no-progress",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn send(port: u16, image: &Path, key: &Path) -> Finished {
    let args = send_args(port, image, key, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("send", &args, MIGRATION_TIMEOUT)
}

fn assert_migration_keys(v: &Value) {
    for key in [
        "total_ms",
        "downtime_ms",
        "iterations",
        "logical_bytes",
        "wire_bytes",
        "digest_match",
        "peak_rss_anon_bytes",
    ] {
        assert!(v.get(key).is_some(), "key {key} missing in {v}");
    }
    assert_eq!(v["digest_match"], Value::Bool(true), "{v}");
    assert!(v["peak_rss_anon_bytes"].as_u64().is_some(), "{v}");
}

#[test]
fn demo_with_postcopy_moves_a_guest_that_cannot_converge_and_verifies_it_byte_for_byte() {
    // 32 MiB of random memory dirtied at 2 GiB/s over a 32 MiB/s cap, no throttle, a 20 ms
    // ceiling over a 10 ms limit: pre-copy cannot pause in time, so it ends in post-copy.
    let f = run(
        "demo",
        &[
            "demo",
            "--size",
            "32M",
            "--mix",
            "random",
            "--dirty-rate",
            "2048",
            "--max-bandwidth",
            "32M",
            "--downtime-ms",
            "10",
            "--downtime-ceiling-ms",
            "20",
            "--no-throttle",
            "--postcopy",
            "--json",
            "--no-progress",
        ],
        MIGRATION_TIMEOUT,
    );
    f.assert_success("demo --postcopy");
    let v = f.json();
    assert_eq!(v["stop_reason"], "postcopy", "{v}");
    assert_eq!(v["byte_identical"], Value::Bool(true), "{v}");
    assert_eq!(v["receiver"]["postcopy"], Value::Bool(true), "{v}");
    let pages = v["postcopy_source"]["pages"].as_u64().unwrap();
    assert!(pages > 0, "{v}");
    assert_eq!(
        v["postcopy_destination"]["pages"].as_u64(),
        Some(pages),
        "{v}"
    );
    assert_eq!(v["postcopy"]["count"].as_u64(), Some(pages), "{v}");
}

#[test]
fn demo_json_report() {
    let f = run(
        "demo",
        &[
            "demo",
            "--size",
            "32M",
            "--dirty-rate",
            "20",
            "--json",
            "--no-progress",
        ],
        MIGRATION_TIMEOUT,
    );
    f.assert_success("demo");
    let v = f.json();
    assert_migration_keys(&v);
    assert!(v["iterations"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["logical_bytes"].as_u64().unwrap() >= 32 << 20, "{v}");
    assert!(v["wire_bytes"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["mix"], "idle");
    assert_eq!(v["dirty_rate_mib_s"], 20);
    assert_eq!(v["memory_bytes"], 32 << 20);
    assert!(v["peak_rss_anon_bytes"].as_u64().unwrap() > 0, "{v}");
    let receiver = &v["receiver"];
    assert_eq!(receiver["digest_match"], Value::Bool(true), "{v}");
    assert_eq!(receiver["digest"], v["digest"]);
    assert_eq!(
        v["passes"].as_array().unwrap().len() as u64,
        v["iterations"].as_u64().unwrap()
    );
}

/// The fleet demo, with its destination in this process and in a second one: every migration
/// completes, under the shared uplink cap, with each side's memory reported.
#[test]
fn fleet_demo_in_one_and_in_two_processes() {
    for (separate, one_at_a_time) in [(false, false), (true, false), (false, true)] {
        let mut args = vec![
            "demo",
            "--vms",
            "4",
            "--size",
            "4M",
            "--mix",
            "random",
            "--dirty-rate",
            "1",
            "--uplink",
            "64M",
            "--json",
            "--no-progress",
        ];
        if separate {
            args.push("--destination-process");
        }
        if one_at_a_time {
            args.extend(["--max-running", "1"]);
        }
        let f = run("fleet demo", &args, MIGRATION_TIMEOUT);
        f.assert_success("fleet demo");
        let v = f.json();
        let migrations = v["migrations"].as_array().unwrap();
        assert_eq!(migrations.len(), 4, "{v}");
        let digests: std::collections::HashSet<_> = migrations
            .iter()
            .map(|m| m["digest"].as_str().unwrap())
            .collect();
        assert_eq!(digests.len(), 4, "four different guests: {v}");
        let jain = v["jain_index"].as_f64().unwrap();
        assert!(jain > 0.0 && jain <= 1.0, "{v}");
        // 16 MiB under 64 MiB/s cannot take less than a quarter of a second.
        assert!(v["wall_ms"].as_f64().unwrap() >= 250.0, "{v}");
        let max_wait = v["max_wait_s"].as_f64().unwrap();
        if one_at_a_time {
            // One at a time, the last waits for three others, each at least 4 MiB at 64 MiB/s.
            assert_eq!(v["max_running"], 1, "{v}");
            assert!(max_wait >= 0.18, "{v}");
        } else {
            assert!(v["max_running"].is_null(), "{v}");
            assert!(max_wait < 0.05, "nobody waits without a limit: {v}");
        }
        let destination = &v["destination_process"];
        if separate {
            assert_eq!(destination["guest_memory_bytes"], 16 << 20, "{v}");
            assert!(
                destination["peak_rss_anon_bytes"].as_u64().unwrap() >= 16 << 20,
                "{v}"
            );
            assert_eq!(v["guest_memory_bytes"], 16 << 20, "{v}");
        } else {
            assert!(destination.is_null(), "{v}");
            assert_eq!(v["guest_memory_bytes"], 32 << 20, "{v}");
        }
    }
}

#[test]
fn demo_human_report() {
    let f = run(
        "demo",
        &["demo", "--size", "4M", "--dirty-rate", "0", "--no-progress"],
        MIGRATION_TIMEOUT,
    );
    f.assert_success("demo");
    for needle in [
        "migrated 4.00 MiB",
        "downtime",
        "iterations",
        "ratio",
        "GB/s",
        "digest            match",
        "pass",
    ] {
        assert!(
            f.stdout.contains(needle),
            "{needle:?} missing in\n{}",
            f.stdout
        );
    }
}

#[test]
fn send_recv_image_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "key");
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(
        text.ends_with('\n')
            && text.trim().len() == 64
            && text.trim().bytes().all(|b| b.is_ascii_hexdigit()),
        "{text:?}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let image = mkimage(dir.path(), "image", "8M", "idle");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 8 << 20);

    let [port] = free_ports::<1>();
    let (mut recv, out) = start_recv(dir.path(), port, &key, "received", &[]);
    let sent = send(port, &image, &key);
    let received = recv.wait(SHORT_TIMEOUT);
    sent.assert_success("send");
    received.assert_success("recv");

    let (sv, rv) = (sent.json(), received.json());
    assert_migration_keys(&sv);
    assert_migration_keys(&rv);
    assert_eq!(sv["digest"], rv["digest"]);
    assert!(sv["logical_bytes"].as_u64().unwrap() >= 8 << 20, "{sv}");
    assert_eq!(rv["memory_bytes"], 8 << 20);
    assert_eq!(rv["downtime_ms"], 0.0);
    assert_eq!(
        rv["iterations"].as_u64().unwrap(),
        rv["final_iteration"].as_u64().unwrap() + 1
    );
    assert!(
        std::fs::read(&image).unwrap() == std::fs::read(&out).unwrap(),
        "the received image differs from the sent one"
    );
}

#[test]
fn wrong_key_is_refused_and_recv_keeps_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "key");
    let other = keygen(dir.path(), "other-key");
    let image = mkimage(dir.path(), "image", "2M", "random");

    let [port] = free_ports::<1>();
    let (mut recv, out) = start_recv(dir.path(), port, &key, "received", &[]);
    let refused = send(port, &image, &other);
    assert!(
        !refused.status.success(),
        "send with the wrong key succeeded:\n{}",
        refused.stdout
    );
    assert!(
        refused.stderr.to_lowercase().contains("authentication"),
        "the error does not mention authentication:\n{}",
        refused.stderr
    );
    assert!(
        refused.stdout.trim().is_empty(),
        "a failed send printed a report: {}",
        refused.stdout
    );

    // The receiver logged the failed handshake and is still waiting for a legitimate source.
    recv.wait_for_stderr("refused a connection", SHORT_TIMEOUT);
    thread::sleep(Duration::from_millis(200));
    assert!(
        recv.running(),
        "recv exited after a failed handshake:\n{}",
        recv.stderr_text()
    );

    let sent = send(port, &image, &key);
    sent.assert_success("send with the right key");
    let received = recv.wait(SHORT_TIMEOUT);
    received.assert_success("recv");
    assert_eq!(received.json()["digest_match"], Value::Bool(true));
    assert!(std::fs::read(&image).unwrap() == std::fs::read(&out).unwrap());
}

#[test]
fn strangers_do_not_end_a_waiting_recv() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "key");
    let image = mkimage(dir.path(), "image", "2M", "random");
    let [port] = free_ports::<1>();
    let (mut recv, out) = start_recv(dir.path(), port, &key, "received", &[]);
    // A port scanner's worth of bad connections (the old recv gave up after 16): garbage that hangs
    // up, and silent ones held open while the real source arrives.
    let mut silent = Vec::new();
    for i in 0..24 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connecting to recv");
        if i % 6 == 0 {
            silent.push(c);
        } else {
            let _ = c.write_all(b"hello?\n");
        }
    }
    recv.wait_for_stderr("refused a connection", SHORT_TIMEOUT);
    assert!(recv.running(), "recv exited:\n{}", recv.stderr_text());
    let started = Instant::now();
    let sent = send(port, &image, &key);
    sent.assert_success("send behind strangers");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the source waited {:?} behind silent strangers",
        started.elapsed()
    );
    let received = recv.wait(SHORT_TIMEOUT);
    received.assert_success("recv");
    assert!(std::fs::read(&image).unwrap() == std::fs::read(&out).unwrap());
    drop(silent);
}

#[test]
fn a_wrong_vm_uuid_is_refused_and_the_output_is_untouched() {
    const VM_A: &str = "67e55044-10b1-426f-9247-bb680e5fe0c8";
    const VM_B: &str = "f81d4fae-7dec-11d0-a765-00a0c91e6bf6";
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "key");
    let image = mkimage(dir.path(), "image", "2M", "random");
    // A file already there: a refused source must leave it as it was (recv truncates the output
    // only once it accepted a migration).
    let before = b"the memory of another VM".to_vec();
    std::fs::write(dir.path().join("received"), &before).unwrap();
    let [port] = free_ports::<1>();
    let (mut recv, out) = start_recv(
        dir.path(),
        port,
        &key,
        "received",
        &["--expect-vm-uuid", VM_A],
    );

    let args = send_args(port, &image, &key, &["--vm-uuid", VM_B]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let refused = run("send", &args, MIGRATION_TIMEOUT);
    assert!(
        !refused.status.success(),
        "send of another VM succeeded:\n{}",
        refused.stdout
    );
    assert!(
        refused.stderr.contains("VM identity refused")
            && refused.stderr.contains(VM_A)
            && refused.stderr.contains(VM_B),
        "the error does not say which VM was expected and which one came:\n{}",
        refused.stderr
    );
    recv.wait_for_stderr("VM identity refused", SHORT_TIMEOUT);
    thread::sleep(Duration::from_millis(200));
    assert!(
        recv.running(),
        "recv exited after refusing a VM:\n{}",
        recv.stderr_text()
    );
    assert_eq!(
        std::fs::read(&out).unwrap(),
        before,
        "the output changed although the VM was refused"
    );

    // The expected VM still gets through to the waiting recv, and both reports say it was checked.
    let args = send_args(port, &image, &key, &["--vm-uuid", VM_A]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sent = run("send", &args, MIGRATION_TIMEOUT);
    sent.assert_success("send of the expected VM");
    let received = recv.wait(SHORT_TIMEOUT);
    received.assert_success("recv");
    assert_eq!(received.json()["identity"], "verified");
    assert_eq!(sent.json()["identity_announced"], Value::Bool(true));
    assert!(std::fs::read(&image).unwrap() == std::fs::read(&out).unwrap());
}

#[test]
fn recv_writes_to_a_device() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "key");
    let image = mkimage(dir.path(), "image", "4M", "random");
    let [port] = free_ports::<1>();
    // `dir.join` of an absolute path is that path.
    let (mut recv, out) = start_recv(dir.path(), port, &key, "/dev/null", &[]);
    assert_eq!(out, Path::new("/dev/null"));
    let sent = send(port, &image, &key);
    sent.assert_success("send");
    let received = recv.wait(SHORT_TIMEOUT);
    received.assert_success("recv --out /dev/null");
    assert_eq!(received.json()["digest_match"], Value::Bool(true));
    assert_eq!(received.json()["memory_bytes"], 4 << 20);
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device(),
        "/dev/null is no longer a device"
    );
}

#[test]
fn recv_serves_prometheus_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "key");
    let [port, metrics_port] = free_ports::<2>();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let (mut recv, _) = start_recv(dir.path(), port, &key, "received", &["--metrics", &metrics]);

    let mut stream = TcpStream::connect(&metrics).expect("connecting to the metrics server");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("reading the metrics response");
    let status = response.lines().next().unwrap_or_default();
    assert!(
        status.starts_with("HTTP/1.") && status.contains(" 200"),
        "status line {status:?}\n{response}"
    );
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    assert!(body.contains("dwcp_wire_bytes_total"), "body:\n{body}");
    assert!(
        body.contains("# TYPE dwcp_iterations_total counter"),
        "body:\n{body}"
    );

    assert!(recv.running(), "scraping metrics ended recv");
    recv.kill();
}

#[test]
fn key_file_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let image = mkimage(dir.path(), "image", "64K", "zero");
    let missing = dir.path().join("no-such-key");
    let f = run(
        "send",
        &[
            "send",
            "--to",
            "127.0.0.1:9",
            "--image",
            s(&image),
            "--psk-file",
            s(&missing),
        ],
        SHORT_TIMEOUT,
    );
    assert!(!f.status.success());
    assert!(
        f.stderr.contains(s(&missing)) && f.stderr.contains("dwcp keygen"),
        "{}",
        f.stderr
    );

    let short = dir.path().join("short-key");
    std::fs::write(&short, "tooshort\n").unwrap();
    let f = run(
        "recv",
        &[
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--out",
            s(&dir.path().join("o")),
            "--psk-file",
            s(&short),
        ],
        SHORT_TIMEOUT,
    );
    assert!(!f.status.success());
    assert!(f.stderr.contains("too short"), "{}", f.stderr);

    // keygen does not overwrite an existing key unless told to.
    let key = keygen(dir.path(), "key");
    let f = run("keygen", &["keygen", "--out", s(&key)], SHORT_TIMEOUT);
    assert!(
        !f.status.success() && f.stderr.contains("--force"),
        "{}",
        f.stderr
    );
    run(
        "keygen",
        &["keygen", "--out", s(&key), "--force"],
        SHORT_TIMEOUT,
    )
    .assert_success("keygen --force");
}

/// `dwcp send --control SOCK` under a cap that would take a minute, then `dwcp control`.
fn start_controlled_send(port: u16, image: &Path, key: &Path, sock: &Path) -> Proc {
    let args = send_args(
        port,
        image,
        key,
        &["--max-bandwidth", "256K", "--control", s(sock)],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut send = Proc::spawn("send", &args);
    let deadline = Instant::now() + SHORT_TIMEOUT;
    while !sock.exists() {
        assert!(
            send.running(),
            "send ended before its control socket was up"
        );
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    send
}

#[test]
fn a_running_send_takes_a_new_cap_and_a_cancel_from_its_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "key");
    // 16 MiB of random pages at 256 KiB/s would take about a minute.
    let image = mkimage(dir.path(), "image", "16M", "random");
    let sock = dir.path().join("ctl.sock");

    let [port] = free_ports::<1>();
    let (mut recv, out) = start_recv(dir.path(), port, &key, "received", &[]);
    let mut controlled = start_controlled_send(port, &image, &key, &sock);
    let status = run(
        "control",
        &["control", "--socket", s(&sock), "status"],
        SHORT_TIMEOUT,
    );
    status.assert_success("control status");
    assert_eq!(status.json()["max_bandwidth"], 256 << 10);
    let bad = run(
        "control",
        &["control", "--socket", s(&sock), "max-bandwidth", "0"],
        SHORT_TIMEOUT,
    );
    assert!(!bad.status.success(), "a cap of 0 is refused");
    assert!(bad.stderr.contains("invalid"), "{}", bad.stderr);
    std::thread::sleep(Duration::from_millis(300));
    let lifted = run(
        "control",
        &["control", "--socket", s(&sock), "max-bandwidth", "none"],
        SHORT_TIMEOUT,
    );
    lifted.assert_success("control max-bandwidth none");
    let started = Instant::now();
    let sent = controlled.wait(MIGRATION_TIMEOUT);
    sent.assert_success("send with its cap lifted");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the lifted cap still held: {:?}",
        started.elapsed()
    );
    recv.wait(SHORT_TIMEOUT).assert_success("recv");
    assert!(std::fs::read(&image).unwrap() == std::fs::read(&out).unwrap());
    assert!(!sock.exists(), "the socket is removed when send ends");

    // Cancel: send fails saying so, and a later send of the same image succeeds.
    let [port] = free_ports::<1>();
    let (mut recv, _) = start_recv(dir.path(), port, &key, "received-2", &[]);
    let mut controlled = start_controlled_send(port, &image, &key, &sock);
    std::thread::sleep(Duration::from_millis(300));
    run(
        "control",
        &["control", "--socket", s(&sock), "cancel"],
        SHORT_TIMEOUT,
    )
    .assert_success("control cancel");
    let cancelled = controlled.wait(SHORT_TIMEOUT);
    assert!(!cancelled.status.success());
    assert!(
        cancelled.stderr.to_lowercase().contains("cancel"),
        "{}",
        cancelled.stderr
    );
    let _ = recv.wait(SHORT_TIMEOUT);
    // A fresh destination then receives the same image whole.
    let [port] = free_ports::<1>();
    let (mut recv, out) = start_recv(dir.path(), port, &key, "received-3", &[]);
    send(port, &image, &key).assert_success("send after a cancelled one");
    recv.wait(SHORT_TIMEOUT)
        .assert_success("recv after a cancelled send");
    assert!(std::fs::read(&image).unwrap() == std::fs::read(&out).unwrap());
    let missing = run(
        "control",
        &["control", "--socket", s(&sock), "status"],
        SHORT_TIMEOUT,
    );
    assert!(!missing.status.success());
    assert!(
        missing.stderr.contains("dwcp send --control"),
        "{}",
        missing.stderr
    );
}

#[test]
fn certs_init_then_send_and_recv_with_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    run(
        "certs",
        &[
            "certs",
            "init",
            "--dir",
            s(&pki),
            "--node",
            "src",
            "--node",
            "dest=127.0.0.1",
        ],
        SHORT_TIMEOUT,
    )
    .assert_success("certs init");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in [pki.join("ca.key"), pki.join("dest/node.key")] {
            assert_eq!(
                std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }
    let image = mkimage(dir.path(), "image", "4M", "random");
    let out = dir.path().join("received");
    let [port] = free_ports::<1>();
    let listen = format!("127.0.0.1:{port}");
    let dest_dir = pki.join("dest");
    let mut recv = Proc::spawn(
        "recv",
        &[
            "recv",
            "--listen",
            &listen,
            "--out",
            s(&out),
            "--tls-dir",
            s(&dest_dir),
            "--json",
        ],
    );
    recv.wait_for_stderr("listening on", SHORT_TIMEOUT);
    let src_dir = pki.join("src");
    let sent = run(
        "send",
        &[
            "send",
            "--to",
            &listen,
            "--image",
            s(&image),
            "--tls-dir",
            s(&src_dir),
            "--json",
            "--no-progress",
        ],
        MIGRATION_TIMEOUT,
    );
    let received = recv.wait(SHORT_TIMEOUT);
    sent.assert_success("send");
    received.assert_success("recv");
    assert_eq!(sent.json()["security"], "tls-certificates");
    assert_eq!(received.json()["security"], "tls-certificates");
    assert!(std::fs::read(&image).unwrap() == std::fs::read(&out).unwrap());
}

#[test]
fn plain_text_is_only_by_flag_and_said_out_loud() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "key");
    let image = mkimage(dir.path(), "image", "4M", "idle");
    let [port] = free_ports::<1>();
    let (mut recv, _out) = start_recv(
        dir.path(),
        port,
        &key,
        "received",
        &["--insecure-plaintext"],
    );
    let args = send_args(port, &image, &key, &["--insecure-plaintext"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sent = run("send", &args, MIGRATION_TIMEOUT);
    let received = recv.wait(SHORT_TIMEOUT);
    sent.assert_success("send");
    received.assert_success("recv");
    assert_eq!(sent.json()["security"], "insecure-plaintext");
    assert_eq!(received.json()["security"], "insecure-plaintext");
    assert!(sent.stderr.contains("unencrypted"), "{}", sent.stderr);
}

/// The lines of an `--events` file, each one JSON object.
fn read_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn demo_writes_its_events_as_ndjson() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.ndjson");
    let f = run(
        "demo",
        &[
            "demo",
            "--size",
            "32M",
            "--dirty-rate",
            "50",
            "--no-progress",
            "--events",
            s(&events),
        ],
        MIGRATION_TIMEOUT,
    );
    f.assert_success("demo");
    let events = read_events(&events);
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events[0]["phase"], "connecting", "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"completed"), "{kinds:?}");
    assert!(
        kinds.contains(&"progress") && kinds.contains(&"pass"),
        "{kinds:?}"
    );
    let phases: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "phase")
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        ["connecting", "precopy", "stop_and_copy", "handover"]
    );
    let mut last = (0.0, 0.0);
    for e in events.iter().filter(|e| e["event"] == "progress") {
        let now = (e["t_ms"].as_f64().unwrap(), e["percent"].as_f64().unwrap());
        assert!(now.0 >= last.0 && now.1 >= last.1, "{last:?} then {now:?}");
        assert!(e["remaining_bytes"].as_u64().is_some(), "{e}");
        last = now;
    }
    assert_eq!(events.last().unwrap()["percent"], 100.0);
}

#[test]
fn sigint_cancels_a_migration_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.ndjson");
    // 256 MiB at 16 MiB/s: 16 s, far longer than the test waits before the signal.
    let mut demo = Proc::spawn(
        "demo",
        &[
            "demo",
            "--size",
            "256M",
            "--max-bandwidth",
            "16M",
            "--no-progress",
            "--events",
            s(&events),
        ],
    );
    let deadline = Instant::now() + SHORT_TIMEOUT;
    while !std::fs::read_to_string(&events).is_ok_and(|t| t.contains("\"progress\"")) {
        assert!(Instant::now() < deadline, "no progress event");
        thread::sleep(Duration::from_millis(20));
    }
    demo.signal("INT");
    let f = demo.wait(SHORT_TIMEOUT);
    assert!(!f.status.success(), "a cancelled demo succeeded");
    assert!(f.stderr.contains("cancelled"), "{}", f.stderr);
    let events = read_events(&events);
    let end = events.last().unwrap();
    assert_eq!(end["event"], "failed", "{end}");
    assert_eq!(end["reason"], "cancelled", "{end}");
    assert_eq!(end["phase"], "precopy", "{end}");
    assert_eq!(end["source_running"], true, "{end}");
}
