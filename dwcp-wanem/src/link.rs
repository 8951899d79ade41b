//! Bringing an emulated link up and down: two namespaces, a TUN device in each, addresses, TCP tuning
//! inside the namespaces, and the [`Forwarder`] between the two devices.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tun_rs::{DeviceBuilder, SyncDevice};

use crate::config::{DEFAULT_MTU, LinkParams};
use crate::forward::{Forwarder, LinkStats, Subnet};
use crate::netns;

/// Default source namespace.
pub const DEFAULT_SRC_NS: &str = "dwcp-src";
/// Default destination namespace.
pub const DEFAULT_DST_NS: &str = "dwcp-dst";
/// Name of the link's interface inside both namespaces.
pub const INTERFACE: &str = "wan0";

/// TCP buffer limits set inside both namespaces (min, default, max): autotuning may grow a socket's
/// buffers to 32 MiB, enough for the BDP of every profile (6.25 MB at 1 Gbit/s × 50 ms).
pub const TCP_RMEM: &str = "4096 131072 33554432";
/// See [`TCP_RMEM`].
pub const TCP_WMEM: &str = "4096 16384 33554432";

/// What to build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkSpec {
    /// The source namespace (holds `src_addr`).
    pub src_ns: String,
    /// The destination namespace (holds `dst_addr`).
    pub dst_ns: String,
    /// The source host's address.
    pub src_addr: Ipv4Addr,
    /// The destination host's address.
    pub dst_addr: Ipv4Addr,
    /// Prefix length of the link's subnet.
    pub prefix: u8,
    /// MTU of both TUN devices.
    pub mtu: u32,
    /// The emulated path.
    pub params: LinkParams,
}

impl LinkSpec {
    /// The default addresses (10.77.0.1 and 10.77.0.2 in 10.77.0.0/24) and MTU, with these namespaces.
    pub fn new(src_ns: &str, dst_ns: &str, params: LinkParams) -> Self {
        Self {
            src_ns: src_ns.to_string(),
            dst_ns: dst_ns.to_string(),
            src_addr: Ipv4Addr::new(10, 77, 0, 1),
            dst_addr: Ipv4Addr::new(10, 77, 0, 2),
            prefix: 24,
            mtu: DEFAULT_MTU,
            params,
        }
    }

    /// The subnet both addresses are in.
    pub fn subnet(&self) -> Subnet {
        Subnet {
            addr: self.src_addr,
            prefix: self.prefix,
        }
    }

    fn validate(&self) -> Result<()> {
        netns::check_name(&self.src_ns)?;
        netns::check_name(&self.dst_ns)?;
        if self.src_ns == self.dst_ns {
            bail!("the two namespaces must differ");
        }
        if !self.subnet().contains(self.dst_addr) || self.src_addr == self.dst_addr {
            bail!(
                "the two addresses must differ and share the /{} subnet",
                self.prefix
            );
        }
        if !(1280..=65_535).contains(&self.mtu) {
            bail!("MTU {} out of range 1280..=65535", self.mtu);
        }
        self.params.validate().map_err(anyhow::Error::msg)
    }
}

/// A link that is up. Dropping it stops the forwarder and deletes both namespaces.
#[derive(Debug)]
pub struct ActiveLink {
    spec: LinkSpec,
    forwarder: Option<Forwarder>,
    created: Vec<String>,
}

static SERIAL: AtomicU32 = AtomicU32::new(0);

fn create_tun(name: &str, mtu: u32) -> Result<SyncDevice> {
    let mtu = u16::try_from(mtu).context("MTU above 65535")?;
    DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .tx_queue_len(1000)
        .build_sync()
        .with_context(|| format!("creating TUN device {name} (needs root and /dev/net/tun)"))
}

fn configure_side(ns: &str, tun: &str, addr: Ipv4Addr, prefix: u8, mtu: u32) -> Result<()> {
    ip_ok(&["link", "set", "dev", tun, "netns", ns])?;
    ip_ok(&["-n", ns, "link", "set", "dev", tun, "name", INTERFACE])?;
    ip_ok(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
    ip_ok(&[
        "-n",
        ns,
        "link",
        "set",
        "dev",
        INTERFACE,
        "mtu",
        &mtu.to_string(),
    ])?;
    ip_ok(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{addr}/{prefix}"),
        "dev",
        INTERFACE,
    ])?;
    netns::sysctls(
        ns,
        &[
            ("net/ipv6/conf/all/disable_ipv6", "1"),
            ("net/ipv6/conf/default/disable_ipv6", "1"),
            ("net/ipv4/tcp_rmem", TCP_RMEM),
            ("net/ipv4/tcp_wmem", TCP_WMEM),
            // Every measurement starts from a fresh path: no cached ssthresh or RTT from the last one.
            ("net/ipv4/tcp_no_metrics_save", "1"),
        ],
    )?;
    ip_ok(&["-n", ns, "link", "set", "dev", INTERFACE, "up"])?;
    Ok(())
}

fn ip_ok(args: &[&str]) -> Result<()> {
    netns::ip(args).map(|_| ())
}

impl ActiveLink {
    /// Builds the link and starts forwarding. On failure everything created so far is removed.
    pub fn bring_up(spec: LinkSpec) -> Result<Self> {
        spec.validate()?;
        netns::require_privileges()?;
        let mut me = Self {
            spec,
            forwarder: None,
            created: Vec::new(),
        };
        for ns in [me.spec.src_ns.clone(), me.spec.dst_ns.clone()] {
            netns::add(&ns)?;
            me.created.push(ns);
        }
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let base = format!("dw{}x{serial}", std::process::id());
        let (name_a, name_b) = (format!("{base}a"), format!("{base}b"));
        let a = create_tun(&name_a, me.spec.mtu)?;
        let b = create_tun(&name_b, me.spec.mtu)?;
        let s = &me.spec;
        configure_side(&s.src_ns, &name_a, s.src_addr, s.prefix, s.mtu)?;
        configure_side(&s.dst_ns, &name_b, s.dst_addr, s.prefix, s.mtu)?;
        me.forwarder = Some(Forwarder::start(
            a,
            b,
            s.params.direction(0),
            s.params.direction(1),
            s.subnet(),
        )?);
        Ok(me)
    }

    /// What was built.
    pub fn spec(&self) -> &LinkSpec {
        &self.spec
    }

    /// The forwarder's counters.
    pub fn stats(&self) -> LinkStats {
        self.forwarder
            .as_ref()
            .map(Forwarder::stats)
            .unwrap_or_default()
    }

    /// Changes the rate of both directions from now on (bits per second, 0: unlimited).
    pub fn set_rate(&self, rate_bps: u64) {
        if let Some(f) = &self.forwarder {
            f.set_rate(rate_bps);
        }
    }

    /// Why the forwarder stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        self.forwarder.as_ref().and_then(Forwarder::failure)
    }

    /// Stops forwarding, closes the TUN devices (which removes them) and deletes both namespaces.
    pub fn tear_down(&mut self) -> Result<()> {
        if let Some(mut f) = self.forwarder.take() {
            f.stop();
        }
        let mut first_error = None;
        for ns in self.created.drain(..) {
            if let Err(e) = netns::delete(&ns)
                && first_error.is_none()
            {
                first_error = Some(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for ActiveLink {
    fn drop(&mut self) {
        if let Err(e) = self.tear_down() {
            eprintln!("dwcp-wanem: tearing the link down: {e:#}");
        }
    }
}
