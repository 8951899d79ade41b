//! Command-line syntax.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use dwcp::MigrationConfig;
use dwcp_core::messages::VmUuid;
use dwcp_core::sim::ContentMix;
use dwcp_hde::Codec;
use dwcp_tcp::{Mode, ModeSetting};

use crate::size::parse_size;

/// Live migration of VM memory over multi-stream TCP.
#[derive(Debug, Parser)]
#[command(name = "dwcp", version, propagate_version = true)]
pub struct Cli {
    /// More logging on stderr (-v: info, -vv: debug). RUST_LOG sets the filter; the default is `warn`.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
    /// CPU profiling of the command.
    #[command(flatten)]
    pub profile: crate::profile::ProfileOpts,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Migrate a simulated, running guest to a destination in this process, over loopback.
    Demo(DemoArgs),
    /// Migrate a memory image file to a `dwcp recv`.
    Send(SendArgs),
    /// Wait for one migration and write the received memory to an image file.
    Recv(RecvArgs),
    /// Write a fresh random pre-shared key (hex) to a file readable only by its owner.
    Keygen(KeygenArgs),
    /// Create a CA and node certificates for `--tls-dir` (TLS with mutual certificates).
    Certs(CertsArgs),
    /// Write a memory image filled like a simulated guest's memory.
    Mkimage(MkimageArgs),
    /// Carry QEMU's own live migration through DWCP (proxy mode).
    Qemu(crate::qemu::QemuArgs),
    /// Run one host's cluster agent: registry member, gossip, migration endpoint.
    Node(crate::cluster::NodeArgs),
    /// Start a local cluster and operate it: status, create-vm, migrate, evacuate.
    Cluster(crate::cluster::ClusterArgs),
    /// Send a command to a running `dwcp send --control PATH`: `max-bandwidth RATE|none`, `cancel`,
    /// `status`.
    Control(ControlArgs),
    /// The destination process of `dwcp demo --vms N --destination-process`.
    #[command(hide = true)]
    FleetReceive(FleetReceiveArgs),
}

/// Content of a simulated guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mix {
    /// Like an idle Linux guest: mostly zero pages, some text, a little random data.
    Idle,
    /// Incompressible: every page random.
    Random,
    /// Every page zero.
    Zero,
}

impl Mix {
    /// The simulator's content fractions.
    pub fn content(self) -> ContentMix {
        match self {
            Mix::Idle => ContentMix::IDLE_GUEST,
            Mix::Random => ContentMix::RANDOM,
            Mix::Zero => ContentMix::ZERO,
        }
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mix::Idle => "idle",
            Mix::Random => "random",
            Mix::Zero => "zero",
        }
    }
}

/// Parameters of the source side shared by `demo` and `send`.
#[derive(Debug, Args)]
pub struct MigrateOpts {
    /// A fixed number of parallel streams (default: start small and add streams while they raise the
    /// goodput, up to --max-streams).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub streams: Option<u16>,
    /// Most streams the adaptive stream count may open (default: decided by the transport mode).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64), conflicts_with = "streams")]
    pub max_streams: Option<u16>,
    /// Transport mode: auto (from the handshake round trip and a bandwidth probe), datacenter,
    /// internet or hybrid.
    #[arg(long, default_value = "auto", value_parser = parse_mode)]
    pub mode: ModeSetting,
    /// Compressor of literal pages: none, lz4, zstd or zstd:LEVEL (1..19).
    #[arg(long, default_value = "lz4", value_parser = parse_codec)]
    pub codec: Codec,
    /// Largest acceptable guest pause, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub downtime_ms: u64,
    /// Pre-copy passes before stop-and-copy is forced.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_iterations: u32,
    /// Most bytes per second on the wire, like QEMU's max-bandwidth (K/M/G: powers of 1024,
    /// e.g. 100M); default: no cap.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// The largest pause accepted, milliseconds: when pre-copy stalls (after throttling the
    /// guest), the downtime limit steps up to it, and a migration that cannot pause within it
    /// fails with the figures, the guest running on (default: pause whatever it costs).
    #[arg(long, value_name = "MS")]
    pub downtime_ceiling_ms: Option<u64>,
    /// Pre-copy seconds after which a migration that has not converged fails (guest running).
    #[arg(long, value_name = "SECS")]
    pub precopy_deadline: Option<f64>,
    /// Never throttle the guest's vCPUs when pre-copy stalls (default: QEMU's steps, 20 % then
    /// +10 % up to 99 %, where the hypervisor can).
    #[arg(long)]
    pub no_throttle: bool,
}

/// A rate in bytes per second: a size, and not zero.
pub(crate) fn parse_rate(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err(format!(
            "invalid rate {s:?}: a cap must be above 0 (omit the option for no cap)"
        )),
        r => Ok(r),
    }
}

impl MigrateOpts {
    /// The engine's configuration.
    pub fn config(&self) -> MigrationConfig {
        MigrationConfig {
            streams: self.streams.map_or(0, usize::from),
            // A fixed count: the controller may not go beyond it.
            max_streams: self.streams.or(self.max_streams).map_or(0, usize::from),
            mode: self.mode,
            downtime_limit: Duration::from_millis(self.downtime_ms),
            max_iterations: self.max_iterations,
            codec: self.codec,
            max_bandwidth: self.max_bandwidth,
            downtime_ceiling: self.downtime_ceiling_ms.map(Duration::from_millis),
            precopy_deadline: self
                .precopy_deadline
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(Duration::from_secs_f64),
            throttle: if self.no_throttle {
                None
            } else {
                MigrationConfig::default().throttle
            },
            ..MigrationConfig::default()
        }
    }
}

/// Output options shared by the migrating commands.
#[derive(Debug, Args)]
pub struct OutputOpts {
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics while the command runs.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

/// `dwcp demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Guest memory size (4096, 64K, 512M, 1G, 1GiB: powers of 1024).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Rate at which the guest writes its memory during the migration, in MiB/s (0: it does not).
    #[arg(long, default_value_t = 100)]
    pub dirty_rate: u64,
    /// Initial memory content.
    #[arg(long, value_enum, default_value_t = Mix::Idle)]
    pub mix: Mix,
    /// Seed of the memory content and of the workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Migration parameters.
    #[command(flatten)]
    pub migrate: MigrateOpts,
    /// Output.
    #[command(flatten)]
    pub output: OutputOpts,
    /// Do not show a progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Write every migration event (phase, progress after each batch, pass, completed or failed
    /// with its reason) to FILE as one JSON object per line; `-` for standard output.
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Do NOT encrypt the loopback streams (for comparing with the default, TLS 1.3).
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Leave the destination's RAM unallocated until pages arrive, so first-touch page faults happen
    /// during the migration (by default it is preallocated before, as a VMM preallocates guest RAM).
    #[arg(long)]
    pub lazy_destination: bool,
    /// When pre-copy cannot converge within --downtime-ceiling-ms, end it in post-copy: the
    /// destination runs the guest (a thread reading its memory) and faults the missing pages in
    /// while the source pushes them (docs/postcopy.md). Needs a ceiling.
    #[arg(long, requires = "downtime_ceiling_ms", conflicts_with = "vms")]
    pub postcopy: bool,
    /// Migrate this many guests (each of --size) at once, through one connection pool and one
    /// buffer pool, as a host being evacuated does; the report gives each one's time and Jain's
    /// fairness index of their throughputs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub vms: u32,
    /// With --vms: the host's uplink cap shared by all the migrations (max-min fair, re-split when
    /// one ends; K/M/G: powers of 1024).
    #[arg(long, value_name = "RATE", value_parser = parse_rate, requires = "vms")]
    pub uplink: Option<u64>,
    /// With --vms: at most this many migrations run at once; the others wait their turn
    /// (`dwcp::Admission`). Times are then counted from each migration's admission.
    #[arg(long, value_name = "N", requires = "vms", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_running: Option<u32>,
    /// With --vms: receive in a second process (this program, started again), so that each side's
    /// memory is measured on its own; the destinations are then checked by digest only.
    #[arg(long, requires = "vms")]
    pub destination_process: bool,
}

/// The destination process of `dwcp demo --vms N --destination-process` (internal).
#[derive(Debug, Args)]
pub struct FleetReceiveArgs {
    /// Migrations to receive, all at once.
    #[arg(long)]
    pub sessions: u32,
    /// File holding the pre-shared key (hex).
    #[arg(long)]
    pub psk_file: std::path::PathBuf,
}

/// `dwcp send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Address of the `dwcp recv` (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    pub to: String,
    /// Memory image to send (a whole number of 4 KiB pages).
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// How the streams are secured.
    #[command(flatten)]
    pub security: SecurityOpts,
    /// Migration parameters.
    #[command(flatten)]
    pub migrate: MigrateOpts,
    /// Output.
    #[command(flatten)]
    pub output: OutputOpts,
    /// Do not show a progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Write every migration event (phase, progress after each batch, pass, completed or failed
    /// with its reason) to FILE as one JSON object per line; `-` for standard output.
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Record every stream's kernel telemetry (acknowledged bytes, RTT, delivery rate, app-limited
    /// flag; about every 250 ms) as CSV in FILE: a link trace for PBA (docs/pba.md).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Serve a control socket at PATH while the migration runs (owner only), for `dwcp control
    /// --socket PATH max-bandwidth RATE|none`, `cancel` or `status`.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// The VM's UUID, announced with the fingerprint of the image's memory layout: a `dwcp recv
    /// --expect-vm-uuid` of another VM refuses the migration before any page is written. A
    /// destination speaking protocol version 1 cannot check it (the send goes on, with a warning).
    #[arg(long, value_name = "UUID")]
    pub vm_uuid: Option<VmUuid>,
}

/// `dwcp control`.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The control socket of a running `dwcp send --control PATH`.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The command: `max-bandwidth RATE` (K/M/G: powers of 1024 bytes per second), `max-bandwidth
    /// none`, `cancel` or `status`.
    #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `dwcp recv`.
#[derive(Debug, Args)]
pub struct RecvArgs {
    /// Address to listen on (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Where to write the received memory: an image file (created or truncated, filled as pages
    /// arrive, removed if the migration fails), or a device or pipe such as /dev/null (written in
    /// one pass after the source committed, from memory).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// How the streams are secured.
    #[command(flatten)]
    pub security: SecurityOpts,
    /// Largest guest memory accepted.
    #[arg(long, default_value = "1T", value_parser = parse_size)]
    pub max_memory: u64,
    /// Accept only the VM with this UUID: a source announcing another one, or none (a source of
    /// protocol version 1 cannot announce one), is refused before the output is touched, and recv
    /// keeps waiting for the right one.
    #[arg(long, value_name = "UUID")]
    pub expect_vm_uuid: Option<VmUuid>,
    /// Output.
    #[command(flatten)]
    pub output: OutputOpts,
}

/// How a command's migration streams are secured. TLS 1.3 by default: with certificates
/// (`--tls-dir`) or keyed by the pre-shared key (`--psk-file`); plain text only with
/// `--insecure-plaintext`.
#[derive(Debug, Args)]
pub struct SecurityOpts {
    /// File holding the pre-shared key (see `dwcp keygen`): TLS 1.3 keyed by it.
    #[arg(long, value_name = "PATH", required_unless_present = "tls_dir")]
    pub psk_file: Option<PathBuf>,
    /// Directory with this node's `ca.pem`, `node.pem` and `node.key` (see `dwcp certs init`):
    /// TLS 1.3 with mutual certificate authentication.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["psk_file", "insecure_plaintext"])]
    pub tls_dir: Option<PathBuf>,
    /// With `--tls-dir`: the name the destination's certificate must carry (default: the address
    /// dialled).
    #[arg(long, value_name = "NAME", requires = "tls_dir")]
    pub server_name: Option<String>,
    /// Do NOT encrypt: memory pages cross the network in clear text (the pre-shared key still
    /// authenticates each stream). Both sides must say so; reports and metrics show it.
    #[arg(long)]
    pub insecure_plaintext: bool,
}

/// `dwcp certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: CertsCommand,
}

/// `dwcp certs` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a CA in DIR (`ca.pem`, `ca.key`) and a certificate for each node in `DIR/<node>/`.
    Init {
        /// Directory to create the CA and node directories in.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A node: `NAME[=SAN,SAN...]`, e.g. `dest=10.0.0.2,dest.example`; its certificate names
        /// NAME and the SANs (addresses or host names clients dial). Repeat per node.
        #[arg(long = "node", value_name = "NAME[=SANS]", required = true)]
        nodes: Vec<String>,
    },
    /// Issue one more node certificate with the CA in DIR.
    Issue {
        /// Directory holding `ca.pem` and `ca.key`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node, as for `init`.
        #[arg(long = "node", value_name = "NAME[=SANS]")]
        node: String,
    },
}

/// `dwcp keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Key file to create (mode 0600).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Replace the file if it exists.
    #[arg(long)]
    pub force: bool,
}

/// `dwcp mkimage`.
#[derive(Debug, Args)]
pub struct MkimageArgs {
    /// Image size (4096, 64K, 512M, 1G, 1GiB: powers of 1024; rounded up to whole pages).
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Memory content.
    #[arg(long, value_enum)]
    pub mix: Mix,
    /// Seed of the content.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Image file to write (created or truncated).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

fn parse_mode(s: &str) -> Result<ModeSetting, String> {
    Ok(match s {
        "auto" => ModeSetting::Auto,
        "datacenter" => ModeSetting::Fixed(Mode::Datacenter),
        "internet" => ModeSetting::Fixed(Mode::Internet),
        "hybrid" => ModeSetting::Fixed(Mode::Hybrid),
        other => {
            return Err(format!(
                "unknown mode {other:?} (auto, datacenter, internet, hybrid)"
            ));
        }
    })
}

fn parse_codec(s: &str) -> Result<Codec, String> {
    Codec::parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn vm_uuid_options() {
        const U: &str = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        let base = [
            "dwcp",
            "send",
            "--to",
            "h:1",
            "--image",
            "i",
            "--psk-file",
            "k",
        ];
        let cli = Cli::try_parse_from(base.iter().copied().chain(["--vm-uuid", U])).unwrap();
        let Command::Send(a) = cli.command else {
            panic!("not send")
        };
        assert_eq!(a.vm_uuid.map(|u| u.to_string()).as_deref(), Some(U));
        let Command::Send(a) = Cli::try_parse_from(base).unwrap().command else {
            panic!("not send")
        };
        assert_eq!(a.vm_uuid, None);
        let err = Cli::try_parse_from(base.iter().copied().chain(["--vm-uuid", "nope"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid VM UUID"), "{err}");

        let recv = [
            "dwcp",
            "recv",
            "--listen",
            "h:1",
            "--out",
            "o",
            "--psk-file",
            "k",
        ];
        let cli = Cli::try_parse_from(
            recv.iter()
                .copied()
                .chain(["--expect-vm-uuid", &U.to_uppercase()]),
        )
        .unwrap();
        let Command::Recv(a) = cli.command else {
            panic!("not recv")
        };
        assert_eq!(a.expect_vm_uuid.map(|u| u.to_string()).as_deref(), Some(U));
    }

    #[test]
    fn demo_defaults() {
        let cli = Cli::try_parse_from(["dwcp", "demo"]).unwrap();
        let Command::Demo(a) = cli.command else {
            panic!("not demo")
        };
        assert_eq!(a.size, 1 << 30);
        assert_eq!(a.dirty_rate, 100);
        assert_eq!(a.mix, Mix::Idle);
        let cfg = a.migrate.config();
        assert_eq!(
            (cfg.streams, cfg.max_streams),
            (0, 0),
            "adaptive by default"
        );
        assert_eq!(cfg.mode, ModeSetting::Auto);
        let cli =
            Cli::try_parse_from(["dwcp", "demo", "--streams", "3", "--mode", "internet"]).unwrap();
        let Command::Demo(a) = cli.command else {
            panic!("not demo")
        };
        let cfg = a.migrate.config();
        assert_eq!(
            (cfg.streams, cfg.max_streams),
            (3, 3),
            "--streams fixes the count"
        );
        assert_eq!(cfg.mode, ModeSetting::Fixed(dwcp_tcp::Mode::Internet));
        assert_eq!(cfg.codec, Codec::Lz4);
        assert_eq!(cfg.downtime_limit, Duration::from_millis(50));
        assert_eq!(cfg.max_iterations, 30);
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["dwcp", "demo", "--streams", "0"][..],
            &["dwcp", "demo", "--streams", "65"],
            &["dwcp", "demo", "--max-streams", "0"],
            &["dwcp", "demo", "--streams", "2", "--max-streams", "8"],
            &["dwcp", "demo", "--mode", "lan"],
            &["dwcp", "demo", "--codec", "gzip"],
            &["dwcp", "demo", "--size", "12Q"],
            &["dwcp", "demo", "--max-iterations", "0"],
            &["dwcp", "demo", "--mix", "busy"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?} accepted");
        }
        let cli =
            Cli::try_parse_from(["dwcp", "demo", "--codec", "zstd:3", "--size", "64K"]).unwrap();
        let Command::Demo(a) = cli.command else {
            panic!("not demo")
        };
        assert_eq!(a.migrate.codec, Codec::Zstd(3));
        assert_eq!(a.size, 64 << 10);
    }
}
