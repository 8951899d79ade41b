//! A real QEMU guest for the end-to-end tests: a busybox initramfs whose workload fills memory and
//! keeps dirtying it, booted under TCG, driven over QMP. Every wait is bounded; QEMU is killed on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The guest's init: about 24 MiB of random data, 24 copies of the busybox binary (about 48 MiB that
/// compress about 2x), 2 MiB of text, then a loop that rewrites 4 MiB of its page cache forever.
pub const GUEST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t tmpfs -o size=200m tmpfs /tmp
dd if=/dev/urandom of=/tmp/rand bs=1M count=24 2>/dev/null
i=0; while [ $i -lt 24 ]; do cp /bin/busybox /tmp/bb$i; i=$((i+1)); done
seq 1 300000 > /tmp/text
echo GUEST-READY
while true; do dd if=/tmp/rand of=/tmp/hot bs=4k count=1024 conv=notrunc 2>/dev/null; done
"#;

/// Sends the proxies' logs to the test output (`RUST_LOG`, default `dwcp_qemu=info`).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("dwcp_qemu=info")),
        )
        .with_test_writer()
        .try_init();
}

/// Guest RAM in MiB.
pub const GUEST_MIB: u32 = 256;

pub fn kernel() -> PathBuf {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .expect("reading /boot (install linux-image-amd64)")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    kernels
        .pop()
        .expect("no kernel in /boot: install linux-image-amd64 (scripts/setup.sh)")
}

/// Builds the initramfs once per test process.
pub fn initrd() -> &'static Path {
    static INITRD: OnceLock<PathBuf> = OnceLock::new();
    INITRD.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("dwcp-qemu-test-{}", std::process::id()));
        let root = dir.join("root");
        for sub in ["bin", "proc", "tmp"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))
            .expect("copying /bin/busybox (install busybox-static)");
        std::fs::write(root.join("init"), GUEST_INIT).unwrap();
        let status = Command::new("sh")
            .arg("-c")
            .arg("chmod 755 init && find . | cpio -o -H newc 2>/dev/null | gzip -1 > ../initrd.gz")
            .current_dir(&root)
            .status()
            .expect("running cpio (install cpio)");
        assert!(status.success(), "building the initramfs failed");
        dir.join("initrd.gz")
    })
}

/// A QMP connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, deadline: Instant) -> Qmp {
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("QMP socket {} never came up: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        q.read_line(); // greeting
        q.cmd("qmp_capabilities", json!({}));
        q
    }

    fn read_line(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("reading QMP");
        assert!(n > 0, "QMP closed");
        serde_json::from_str(&line).expect("QMP sent JSON")
    }

    /// Runs a command; returns its `return` value, or panics with QEMU's error.
    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        self.try_cmd(name, args)
            .unwrap_or_else(|e| panic!("QMP {name} failed: {e}"))
    }

    /// Runs a command; returns QEMU's error as text.
    pub fn try_cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        let msg = json!({"execute": name, "arguments": args});
        writeln!(self.writer, "{msg}").expect("writing QMP");
        for _ in 0..10_000 {
            let v = self.read_line();
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e.to_string());
            }
        }
        Err("no answer among 10000 QMP lines".into())
    }
}

/// One QEMU process.
pub struct Qemu {
    child: Child,
    pub qmp: Qmp,
    pub serial: PathBuf,
    dir: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Qemu {
    /// Boots the guest; with `incoming`, QEMU waits for a migration (`-incoming defer`). `prefix` runs
    /// QEMU under another command (e.g. `ip netns exec NS`).
    pub fn start(name: &str, incoming: bool, prefix: &[&str]) -> Qemu {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dwcp-qemu-{}-{name}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (qmp_path, serial) = (dir.join("qmp.sock"), dir.join("serial.log"));
        let mut args: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        args.push("qemu-system-x86_64".into());
        for a in [
            "-accel",
            "tcg",
            "-m",
            &GUEST_MIB.to_string(),
            "-nographic",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-append",
            "console=ttyS0 quiet",
        ] {
            args.push(a.into());
        }
        args.extend(["-kernel".into(), kernel().display().to_string()]);
        args.extend(["-initrd".into(), initrd().display().to_string()]);
        args.extend([
            "-qmp".into(),
            format!("unix:{},server,nowait", qmp_path.display()),
        ]);
        args.extend(["-serial".into(), format!("file:{}", serial.display())]);
        if incoming {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        // QEMU's own trace events on stderr, for hunting a failure (e.g. `DWCP_QEMU_TRACE='multifd_*'`).
        if let Ok(events) = std::env::var("DWCP_QEMU_TRACE") {
            args.extend(["-trace".into(), format!("enable={events}")]);
        }
        let child = Command::new(&args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting qemu-system-x86_64 (install qemu-system-x86)");
        if std::env::var_os("DWCP_QEMU_TRACE").is_some() {
            eprintln!("QEMU {name}: pid {}", child.id());
        }
        let qmp = Qmp::connect(&qmp_path, Instant::now() + Duration::from_secs(30));
        Qemu {
            child,
            qmp,
            serial,
            dir,
        }
    }

    /// Waits until the guest's workload runs.
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if std::fs::read(&self.serial).is_ok_and(|b| b.windows(11).any(|w| w == b"GUEST-READY"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the guest did not boot within {} s", timeout.as_secs());
    }

    /// Sets the migration capabilities and parameters (`multifd` channels, 0 for a plain migration).
    pub fn configure(&mut self, multifd: u32, zstd: bool) {
        self.qmp.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": multifd > 0}]}),
        );
        if multifd > 0 {
            let mut p = json!({"multifd-channels": multifd});
            if zstd {
                p["multifd-compression"] = json!("zstd");
            }
            self.qmp.cmd("migrate-set-parameters", p);
        }
        self.qmp.cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": 1u64 << 40}),
        );
    }

    /// Polls `query-migrate` until a final status; returns the last answer.
    pub fn wait_migration(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.qmp.cmd("query-migrate", json!({}));
            let status = info["status"].as_str().unwrap_or("").to_string();
            if ["completed", "failed", "cancelled"].contains(&status.as_str()) {
                return info;
            }
            if Instant::now() >= deadline {
                let _ = self.qmp.try_cmd("migrate_cancel", json!({}));
                panic!(
                    "migration still {status} after {} s: {info}",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `query-status` until the VM runs or `timeout` passes; returns the last status.
    pub fn wait_running(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.qmp.cmd("query-status", json!({}))["status"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if status == "running" || Instant::now() >= deadline {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
