//! Network namespaces and interfaces, through iproute2's `ip` (namespaces, links, addresses) and
//! `setns(2)` (moving one thread into a namespace, e.g. to write its sysctls or open sockets there).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Where iproute2 keeps named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// Checks that `name` is a safe namespace name (letters, digits, `-`, `_`, `.`; 1 to 32 characters).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("bad namespace name {name:?}: use 1-32 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `ip {}` (is iproute2 installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a named namespace exists.
pub fn exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// Creates a named namespace; fails if it exists.
pub fn add(name: &str) -> Result<()> {
    check_name(name)?;
    if exists(name) {
        bail!(
            "network namespace {name} already exists (a link is up: tear it down first, e.g. `cargo xtask wan down`)"
        );
    }
    ip(&["netns", "add", name]).map(|_| ())
}

/// Deletes a named namespace if it exists (its interfaces go with it). Returns whether it existed.
pub fn delete(name: &str) -> Result<bool> {
    check_name(name)?;
    if !exists(name) {
        return Ok(false);
    }
    ip(&["netns", "delete", name])?;
    Ok(true)
}

/// Moves the calling thread (only it) into the named namespace. Sockets it creates afterwards live
/// there; files under `/proc/sys/net` it opens afterwards are that namespace's sysctls.
pub fn enter(name: &str) -> Result<()> {
    check_name(name)?;
    let path = Path::new(NETNS_DIR).join(name);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns(2) only reads its two integer arguments; `file` is open for the whole call, so the
    // descriptor is valid, and CLONE_NEWNET asks for a network namespace, which is what it refers to.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("entering network namespace {name} (setns)"));
    }
    Ok(())
}

/// Runs `f` on a new thread inside the named namespace and returns its result.
pub fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let name = name.to_string();
    std::thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || {
            enter(&name)?;
            f()
        })
        .context("spawning a thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
}

/// Writes sysctls (`("net/ipv4/tcp_wmem", "4096 16384 33554432")`) inside the named namespace.
pub fn sysctls(name: &str, settings: &[(&str, &str)]) -> Result<()> {
    let owned: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let ns = name.to_string();
    run_in(name, move || {
        for (k, v) in owned {
            let path = Path::new("/proc/sys").join(&k);
            std::fs::write(&path, &v)
                .with_context(|| format!("setting {k} = {v} in namespace {ns}"))?;
        }
        Ok(())
    })
}

/// Reads a sysctl inside the named namespace.
pub fn sysctl(name: &str, key: &str) -> Result<String> {
    let path = Path::new("/proc/sys").join(key);
    run_in(name, move || {
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_string())
    })
}

/// Fails with a clear message unless this process can build a test bed: root, `/dev/net/tun`, `ip`.
pub fn require_privileges() -> Result<()> {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "the WAN test bed needs root (network namespaces and TUN devices); this runs as uid {euid}"
        );
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        bail!("/dev/net/tun cannot be opened ({e}): TUN devices are unavailable here");
    }
    ip(&["-V"]).context("iproute2 (`ip`) is needed")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("dwcp-src").is_ok());
        assert!(check_name("dwcp_t123.s").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("../etc").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name(&"x".repeat(33)).is_err());
    }
}
