//! `dwcp node` (one host's agent) and `dwcp cluster` (start a local cluster, inspect it, create,
//! migrate and evacuate VMs).
//!
//! A cluster is described by one file, `cluster.json` (members, their addresses and data dirs,
//! the registry backend) next to the cluster key; `dwcp cluster up --dir DIR` writes both on first
//! use and starts one `dwcp node` process per member in the background, logs in `DIR/node-N.log`.
//! Every other command finds an agent through the same directory (or `--agent` and `--psk-file`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use dwcp_acp::{NodeId, VmId};
use dwcp_core::handshake::Psk;
use dwcp_node::{BackendChoice, ClusterFile, NodeEntry, NodeOptions, Request, RunningNode, Target};
use serde_json::Value;

use crate::size::parse_size;

/// `dwcp node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The cluster file (see `dwcp cluster up`).
    #[arg(long, value_name = "FILE")]
    pub cluster: PathBuf,
    /// This node's id in it.
    #[arg(long)]
    pub id: NodeId,
    /// First start of a new cluster: accept an empty data dir and initialize the registry.
    /// Never on a later start (a node that lost its disk must rejoin as a new member).
    #[arg(long)]
    pub bootstrap: bool,
}

/// `dwcp cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// The cluster's directory (`cluster.json`, the key, data dirs, logs).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "dwcp-cluster",
        global = true
    )]
    pub dir: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: ClusterCommand,
}

/// The `dwcp cluster` subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Create the cluster in --dir on first use, then start every member as a background
    /// `dwcp node` process and wait until all answer.
    Up(UpArgs),
    /// Stop the members started by `up`.
    Down,
    /// Members, leader and every VM's owner.
    Status {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Start a simulated guest on a node and register it.
    CreateVm {
        /// The VM's name.
        vm: String,
        /// The node.
        #[arg(long, default_value_t = 1)]
        node: NodeId,
        /// Memory size.
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        size: u64,
        /// Bytes per second the guest writes.
        #[arg(long, default_value = "1M", value_parser = parse_size)]
        dirty_rate: u64,
    },
    /// Live-migrate a VM from its owner to NODE, or where placement scores best (`auto`).
    Migrate {
        /// The VM.
        vm: String,
        /// A node id or `auto`.
        #[arg(long, default_value = "auto")]
        to: String,
    },
    /// Move every VM off a node (placement picks each destination) and drain it.
    Evacuate {
        /// The node.
        node: NodeId,
    },
}

/// `dwcp cluster up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Members of a new cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// First port: node N uses BASE+10N (registry), +1 (agent), +2 (gossip).
    #[arg(long, default_value_t = 7400)]
    pub base_port: u16,
    /// Guest memory each node offers.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub capacity: u64,
    /// Use this etcd cluster (comma-separated client URLs) instead of the embedded registry.
    #[arg(long, value_name = "URLS")]
    pub etcd: Option<String>,
    /// A new cluster authenticates with certificates: a CA and one certificate per member (and
    /// one for these commands) in DIR/tls, instead of TLS keyed by the cluster key.
    #[arg(long)]
    pub tls: bool,
}

/// Runs `dwcp node` until SIGINT or SIGTERM.
pub fn node(args: NodeArgs) -> anyhow::Result<()> {
    let file = ClusterFile::load(&args.cluster)?;
    let running = RunningNode::start(
        &file,
        args.id,
        NodeOptions {
            bootstrap: args.bootstrap,
            ..NodeOptions::default()
        },
    )
    .with_context(|| format!("starting node {}", args.id))?;
    eprintln!(
        "dwcp node {}: agent at {}",
        args.id,
        running.agent().control_addr()
    );
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing a signal handler")?;
    }
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("dwcp node {}: stopping", args.id);
    running.shutdown();
    Ok(())
}

/// Runs a `dwcp cluster` subcommand.
pub fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let dir = args.dir;
    match args.command {
        ClusterCommand::Up(up) => self::up(&dir, &up),
        ClusterCommand::Down => down(&dir),
        ClusterCommand::Status { json } => status(&dir, json),
        ClusterCommand::CreateVm {
            vm,
            node,
            size,
            dirty_rate,
        } => {
            let file = load(&dir)?;
            let answer = call_node(
                &file,
                node,
                &Request::CreateVm {
                    vm: VmId::new(vm)?,
                    size,
                    dirty_rate,
                },
            )?;
            println!("{}", serde_json::to_string(&answer)?);
            Ok(())
        }
        ClusterCommand::Migrate { vm, to } => {
            let file = load(&dir)?;
            let vm = VmId::new(vm)?;
            let to = match to.as_str() {
                "auto" => Target::Auto,
                n => Target::Node(
                    n.parse()
                        .with_context(|| format!("--to {n}: a node id or auto"))?,
                ),
            };
            let owner = owner_of(&file, &vm)?;
            let answer = call_node(&file, owner, &Request::Migrate { vm, to })?;
            println!("{}", serde_json::to_string(&answer)?);
            Ok(())
        }
        ClusterCommand::Evacuate { node } => {
            let file = load(&dir)?;
            let answer =
                call_node_with(&file, node, &Request::Evacuate, Duration::from_secs(3600))?;
            println!("{}", serde_json::to_string(&answer)?);
            let failed = answer["migrations"]
                .as_array()
                .map_or(0, |m| m.iter().filter(|m| m["ok"] != true).count());
            if failed > 0 {
                bail!("{failed} migration(s) off node {node} failed");
            }
            Ok(())
        }
    }
}

fn cluster_path(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

fn load(dir: &Path) -> anyhow::Result<ClusterFile> {
    ClusterFile::load(&cluster_path(dir)).with_context(|| {
        format!(
            "no cluster in {} (run `dwcp cluster up --dir {0}`)",
            dir.display()
        )
    })
}

fn up(dir: &Path, args: &UpArgs) -> anyhow::Result<()> {
    let path = cluster_path(dir);
    let new = !path.exists();
    if new {
        if args.nodes == 0 || args.nodes > 9 {
            bail!("--nodes {}: 1 to 9 on one machine", args.nodes);
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = std::fs::canonicalize(dir)?;
        let psk_file = dir.join("cluster.psk");
        crate::tools::write_key_file(&psk_file, &Psk::generate())?;
        let port = |id: u64, k: u16| -> anyhow::Result<SocketAddr> {
            let p = u64::from(args.base_port) + 10 * id + u64::from(k);
            let p = u16::try_from(p).context("--base-port too high")?;
            Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
        };
        let backend = match &args.etcd {
            None => BackendChoice::Raft,
            Some(urls) => BackendChoice::Etcd {
                endpoints: urls.split(',').map(str::to_owned).collect(),
                prefix: format!("/dwcp/{}", std::process::id()),
            },
        };
        let nodes = (1..=args.nodes)
            .map(|id| {
                Ok(NodeEntry {
                    id,
                    name: format!("node{id}"),
                    raft_addr: port(id, 0)?,
                    agent_addr: port(id, 1)?,
                    gossip_addr: port(id, 2)?,
                    migration_ip: Ipv4Addr::LOCALHOST.into(),
                    data_dir: dir.join(format!("node{id}")),
                    memory_capacity: args.capacity,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let tls_dir = if args.tls {
            let tls = dir.join("tls");
            let mut names: Vec<(String, Vec<String>)> = nodes
                .iter()
                .map(|n| {
                    (
                        n.name.clone(),
                        vec![n.name.clone(), n.migration_ip.to_string()],
                    )
                })
                .collect();
            names.push(("client".into(), vec!["client".into()]));
            dwcp_tls::certs::init_dir(&tls, &names)
                .with_context(|| format!("creating certificates in {}", tls.display()))?;
            Some(tls)
        } else {
            None
        };
        ClusterFile {
            backend,
            psk_file,
            tls_dir,
            nodes,
        }
        .save(&path)?;
    }
    let file = load(dir)?;
    let exe = std::env::current_exe().context("finding the dwcp binary")?;
    for n in &file.nodes {
        if agent_answers(&file, n) {
            eprintln!("node {} is already running", n.id);
            continue;
        }
        let log = std::fs::File::create(dir.join(format!("node-{}.log", n.id)))?;
        let mut command = std::process::Command::new(&exe);
        command
            .arg("node")
            .arg("--cluster")
            .arg(&path)
            .arg("--id")
            .arg(n.id.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if new {
            command.arg("--bootstrap");
        }
        // Its own process group: the node outlives this command and the terminal's ^C.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().context("starting dwcp node")?;
        std::fs::write(
            dir.join(format!("node-{}.pid", n.id)),
            child.id().to_string(),
        )?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in &file.nodes {
        while !agent_answers(&file, n) {
            if Instant::now() > deadline {
                bail!(
                    "node {} did not answer within 60 s; see {}",
                    n.id,
                    dir.join(format!("node-{}.log", n.id)).display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Placement needs the gossiped view: wait until every member sees every other alive.
    let members = file.nodes.len();
    let security = file.security()?;
    while Instant::now() < deadline {
        let converged = file.nodes.iter().all(|n| {
            dwcp_node::call_with(
                n.agent_addr,
                &security,
                &Request::Status,
                Duration::from_secs(2),
            )
            .is_ok_and(|s| {
                s["gossip"]
                    .as_array()
                    .is_some_and(|g| g.iter().filter(|p| p["alive"] == true).count() == members)
            })
        });
        if converged {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "cluster of {} nodes up in {dir} (stop it with `dwcp cluster --dir {dir} down`)",
        file.nodes.len(),
        dir = dir.display()
    );
    status(dir, false)
}

fn agent_answers(file: &ClusterFile, node: &NodeEntry) -> bool {
    let Ok(security) = file.security() else {
        return false;
    };
    dwcp_node::call_with(
        node.agent_addr,
        &security,
        &Request::Status,
        Duration::from_secs(2),
    )
    .is_ok()
}

fn down(dir: &Path) -> anyhow::Result<()> {
    let file = load(dir)?;
    for n in &file.nodes {
        let pid_file = dir.join(format!("node-{}.pid", n.id));
        let Ok(pid) = std::fs::read_to_string(&pid_file) else {
            continue;
        };
        let pid = pid.trim().to_owned();
        let _ = std::process::Command::new("kill").arg(&pid).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_file(&pid_file);
        eprintln!("node {} stopped", n.id);
    }
    Ok(())
}

fn call_node(file: &ClusterFile, id: NodeId, request: &Request) -> anyhow::Result<Value> {
    call_node_with(file, id, request, Duration::from_secs(600))
}

fn call_node_with(
    file: &ClusterFile,
    id: NodeId,
    request: &Request,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let node = file.node(id)?;
    let security = file.security()?;
    dwcp_node::call_with(node.agent_addr, &security, request, timeout)
        .with_context(|| format!("node {id} ({})", node.agent_addr))
}

/// The first agent that answers a status request.
fn any_status(file: &ClusterFile) -> anyhow::Result<Value> {
    let security = file.security()?;
    let mut last = None;
    for n in &file.nodes {
        match dwcp_node::call_with(
            n.agent_addr,
            &security,
            &Request::Status,
            Duration::from_secs(15),
        ) {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(format!("node {}: {e}", n.id)),
        }
    }
    bail!("no agent answered: {}", last.unwrap_or_default())
}

fn owner_of(file: &ClusterFile, vm: &VmId) -> anyhow::Result<NodeId> {
    let status = any_status(file)?;
    status["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["vm"] == vm.as_str())
        .and_then(|r| r["owner"].as_u64())
        .with_context(|| format!("{vm} is not in the registry"))
}

fn status(dir: &Path, json: bool) -> anyhow::Result<()> {
    let file = load(dir)?;
    let security = file.security()?;
    let mut nodes = Vec::new();
    for n in &file.nodes {
        let answer = dwcp_node::call_with(
            n.agent_addr,
            &security,
            &Request::Status,
            Duration::from_secs(5),
        );
        nodes.push((n, answer));
    }
    let registry = nodes
        .iter()
        .find_map(|(_, a)| a.as_ref().ok())
        .cloned()
        .unwrap_or(Value::Null);
    if json {
        let members: Vec<Value> = nodes
            .iter()
            .map(|(n, a)| match a {
                Ok(v) => v.clone(),
                Err(e) => serde_json::json!({"node": n.id, "error": e.to_string()}),
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "members": members, "vms": registry["vms"] })
        );
        return Ok(());
    }
    println!(
        "{:<6} {:<22} {:<8} {:>12} {:>6}  registry",
        "node", "agent", "state", "free memory", "vms"
    );
    for (n, answer) in &nodes {
        match answer {
            Ok(v) => println!(
                "{:<6} {:<22} {:<8} {:>12} {:>6}  {}",
                n.id,
                n.agent_addr,
                if v["draining"] == true {
                    "draining"
                } else {
                    "up"
                },
                crate::output::bytes(v["memory_free"].as_u64().unwrap_or(0)),
                v["hosted"].as_array().map_or(0, Vec::len),
                raft_summary(&v["registry"]),
            ),
            Err(e) => println!("{:<6} {:<22} down     {e}", n.id, n.agent_addr),
        }
    }
    let vms = registry["vms"].as_array().cloned().unwrap_or_default();
    println!("{} VM(s)", vms.len());
    for r in vms {
        println!(
            "  {:<24} owner {:<3} {} fence {}",
            r["vm"].as_str().unwrap_or("?"),
            r["owner"],
            match &r["holding"] {
                Value::String(s) => s.clone(),
                other => format!("handing over to {}", other["HandingOver"]["to"]),
            },
            r["fence"]
        );
    }
    Ok(())
}

fn raft_summary(v: &Value) -> String {
    if v.is_null() {
        return String::new();
    }
    format!(
        "{} term {} leader {}",
        v["role"].as_str().unwrap_or("?"),
        v["term"],
        v["leader"]
    )
}
