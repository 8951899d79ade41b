//! `dwcp cluster` end to end: three `dwcp node` processes on loopback with the embedded registry,
//! a VM created, migrated and evacuated, a member killed (the other two keep a quorum and go on),
//! then restarted from its disk.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_dwcp");

fn dwcp(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .arg("cluster")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("running dwcp");
    eprintln!(
        "dwcp cluster {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok_json(dir: &Path, args: &[&str]) -> Value {
    let out = dwcp(dir, args);
    assert!(out.status.success(), "dwcp cluster {args:?} failed");
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn owner(dir: &Path, vm: &str) -> Option<u64> {
    let status = ok_json(dir, &["status", "--json"]);
    status["vms"]
        .as_array()?
        .iter()
        .find(|r| r["vm"] == vm)
        .and_then(|r| r["owner"].as_u64())
}

/// Stops the nodes even when the test fails.
struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = dwcp(self.0, &["down"]);
    }
}

#[test]
fn a_three_node_cluster_migrates_survives_a_lost_member_and_restarts_it_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join("cluster");
    // Ports from the process id, so that parallel runs on one machine do not collide, and below
    // the kernel's ephemeral range (32768-60999), where any outgoing connection may hold one (a
    // CI run failed so: every node exited at start, its port taken).
    let base = base_port(0).to_string();
    let up = dwcp(
        &dir,
        &[
            "up",
            "--nodes",
            "3",
            "--base-port",
            &base,
            "--capacity",
            "512M",
        ],
    );
    let _down = Down(&dir);
    assert!(up.status.success());

    let created = ok_json(&dir, &["create-vm", "vm-1", "--node", "1", "--size", "16M"]);
    assert_eq!(created["owner"], 1);
    let moved = ok_json(&dir, &["migrate", "vm-1", "--to", "3"]);
    assert_eq!(
        (moved["from"].as_u64(), moved["to"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(owner(&dir, "vm-1"), Some(3));

    // A VM the registry does not know, a bad target: clear errors, nothing changes.
    assert!(
        !dwcp(&dir, &["migrate", "no-such-vm", "--to", "2"])
            .status
            .success()
    );
    assert!(
        !dwcp(&dir, &["migrate", "vm-1", "--to", "nine"])
            .status
            .success()
    );
    assert_eq!(owner(&dir, "vm-1"), Some(3));

    // Kill node 2 hard. Nodes 1 and 3 are a quorum: migrations and the registry go on.
    let pid = std::fs::read_to_string(dir.join("node-2.pid")).unwrap();
    assert!(
        Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap()
            .success()
    );
    let evacuated = ok_json(&dir, &["evacuate", "3"]);
    assert_eq!(evacuated["migrations"][0]["ok"], true, "{evacuated}");
    assert_eq!(
        owner(&dir, "vm-1"),
        Some(1),
        "node 2 is down, node 3 draining: only node 1 fits"
    );
    let status = ok_json(&dir, &["status", "--json"]);
    assert!(
        status["members"][1]["error"].is_string(),
        "node 2 reported down: {status}"
    );

    // `up` restarts the missing member from its data dir; it catches up with the log.
    assert!(dwcp(&dir, &["up"]).status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = ok_json(&dir, &["status", "--json"]);
        let node2 = &status["members"][1];
        if node2["vms"]
            .as_array()
            .is_some_and(|v| v.iter().any(|r| r["vm"] == "vm-1" && r["owner"] == 1))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 2 did not catch up: {node2}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let moved = ok_json(&dir, &["migrate", "vm-1", "--to", "2"]);
    assert_eq!(moved["to"], 2);
    assert_eq!(owner(&dir, "vm-1"), Some(2));
}

#[test]
fn a_cluster_with_certificates_migrates_and_refuses_a_client_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join("cluster");
    let base = base_port(1).to_string();
    let up = dwcp(
        &dir,
        &[
            "up",
            "--nodes",
            "2",
            "--tls",
            "--base-port",
            &base,
            "--capacity",
            "256M",
        ],
    );
    let _down = Down(&dir);
    assert!(up.status.success());
    assert!(dir.join("tls/node1/node.key").is_file());
    assert!(dir.join("tls/client/node.pem").is_file());
    let status = ok_json(&dir, &["status", "--json"]);
    let text = status.to_string();
    assert!(
        text.contains("tls-certificates") && !text.contains("tls-psk"),
        "the members do not say they use certificates: {status}"
    );
    ok_json(&dir, &["create-vm", "vm-t", "--node", "1", "--size", "8M"]);
    let moved = ok_json(&dir, &["migrate", "vm-t", "--to", "2"]);
    assert_eq!(moved["to"], 2);

    // The same cluster file without the certificates: these commands fall back to the cluster
    // key, which the members no longer take.
    let file = dir.join("cluster.json");
    let mut json: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let tls_dir = json
        .as_object_mut()
        .unwrap()
        .remove("tls_dir")
        .expect("the cluster file names its certificates");
    std::fs::write(&file, json.to_string()).unwrap();
    assert!(
        !dwcp(&dir, &["migrate", "vm-t", "--to", "1"])
            .status
            .success(),
        "a client with the key but no certificate was served"
    );
    json["tls_dir"] = tls_dir;
    std::fs::write(&file, json.to_string()).unwrap();
    assert_eq!(owner(&dir, "vm-t"), Some(2));
}

/// The first of 100 ports for the `test`-th cluster of this process (each node takes ten), in
/// 20000..32000: below the ephemeral range.
fn base_port(test: u32) -> u32 {
    20_000 + ((std::process::id() + test * 29) % 118) * 100
}
