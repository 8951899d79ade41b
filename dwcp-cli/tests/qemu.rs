//! `dwcp qemu send` / `dwcp qemu recv` as processes, with plain TCP peers standing in for the two
//! QEMUs (the real-QEMU tests live in `dwcp-qemu/tests`).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dwcp");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_proxies_carry_a_connection_and_report_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let status = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(status.success());
    let qemu = TcpListener::bind("127.0.0.1:0").unwrap();
    let qemu_addr = qemu.local_addr().unwrap();
    let (tunnel, listen) = (free_port(), free_port());
    let mut recv = Command::new(BIN)
        .args(["qemu", "recv", "--json", "--wait-secs", "30", "--listen"])
        .arg(format!("127.0.0.1:{tunnel}"))
        .arg("--qemu")
        .arg(qemu_addr.to_string())
        .arg("--psk-file")
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut send = Command::new(BIN)
        .args([
            "qemu",
            "send",
            "--json",
            "--wait-secs",
            "30",
            "--codec",
            "zstd",
            "--listen",
        ])
        .arg(format!("127.0.0.1:{listen}"))
        .arg("--to")
        .arg(format!("127.0.0.1:{tunnel}"))
        .arg("--psk-file")
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The source proxy listens for QEMU once it started; retry the connection for a while.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        match TcpStream::connect(("127.0.0.1", listen)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("the source proxy never listened: {e}"),
        }
    };
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
        .collect();
    let sink = std::thread::spawn(move || {
        let (mut s, _) = qemu.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    client.write_all(&data).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(sink.join().unwrap(), data);
    drop(client);
    for (name, child) in [("send", &mut send), ("recv", &mut recv)] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("dwcp qemu {name} did not exit");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "dwcp qemu {name}: {status}\n{err}");
        let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(report["channels"], 1, "{report}");
        assert_eq!(report["resets"], 0, "{report}");
        if name == "send" {
            assert_eq!(report["raw_bytes_sent"], data.len() as u64);
            assert!(report["wire_bytes_sent"].as_u64().unwrap() < data.len() as u64 / 2);
        } else {
            assert_eq!(report["raw_bytes_received"], data.len() as u64);
        }
    }
}

#[test]
fn a_missing_key_file_is_explained() {
    let out = Command::new(BIN)
        .args([
            "qemu",
            "send",
            "--listen",
            "127.0.0.1:0",
            "--to",
            "127.0.0.1:9",
            "--psk-file",
        ])
        .arg("/nonexistent/key")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dwcp keygen"), "{err}");
}
