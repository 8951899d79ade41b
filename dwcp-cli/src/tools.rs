//! `dwcp keygen` and `dwcp mkimage`.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};

use anyhow::Context;
use dwcp_core::handshake::Psk;
use dwcp_core::memory::{MemorySource, PAGE_SIZE, is_zero_page};
use dwcp_core::sim::{SimulatedGuest, SimulatedGuestConfig};

use crate::args::{CertsArgs, CertsCommand, KeygenArgs, MkimageArgs};
use crate::output;

/// Pages written per block by `mkimage` (1 MiB).
const BLOCK_PAGES: u64 = 256;

/// `dwcp keygen`: a fresh key as hex plus a newline, in a new file of mode 0600.
pub fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    let path = &args.out;
    if args.force {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("replacing {}", path.display())),
        }
    }
    write_key_file(path, &Psk::generate())?;
    eprintln!("dwcp: wrote a new pre-shared key to {}", path.display());
    Ok(())
}

/// `NAME[=SAN,SAN...]` as the node's directory name and its certificate names (NAME first).
fn node_spec(spec: &str) -> anyhow::Result<(String, Vec<String>)> {
    let (name, sans) = spec.split_once('=').unwrap_or((spec, ""));
    anyhow::ensure!(
        !name.is_empty() && !name.contains('/') && name != "." && name != "..",
        "invalid node name {name:?} in {spec:?} (expected NAME[=SAN,SAN...])"
    );
    let mut names = vec![name.to_string()];
    names.extend(
        sans.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string),
    );
    Ok((name.to_string(), names))
}

/// `dwcp certs init|issue`: a CA and node certificates for `--tls-dir`.
pub fn certs(args: CertsArgs) -> anyhow::Result<()> {
    use dwcp_tls::certs::{self, CertificateAuthority};
    match args.command {
        CertsCommand::Init { dir, nodes } => {
            let nodes = nodes
                .iter()
                .map(|n| node_spec(n))
                .collect::<anyhow::Result<Vec<_>>>()?;
            for node_dir in certs::init_dir(&dir, &nodes)? {
                eprintln!("dwcp: wrote {} (use it as --tls-dir)", node_dir.display());
            }
            eprintln!(
                "dwcp: the CA key is {}: keep it off the nodes",
                dir.join(certs::CA_KEY_FILE).display()
            );
        }
        CertsCommand::Issue { dir, node } => {
            let (name, names) = node_spec(&node)?;
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f))
                    .with_context(|| format!("reading {}", dir.join(f).display()))
            };
            let ca =
                CertificateAuthority::from_pem(&read(certs::CA_FILE)?, &read(certs::CA_KEY_FILE)?)?;
            let node_dir = certs::issue_into(&ca, &dir.join(&name), &names)?;
            eprintln!("dwcp: wrote {} (use it as --tls-dir)", node_dir.display());
        }
    }
    Ok(())
}

/// Creates `path` (mode 0600; it must not exist) holding `key` in hex.
pub fn write_key_file(path: &std::path::Path, key: &Psk) -> anyhow::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| {
        if path.exists() {
            format!(
                "creating the key file {} (it exists; --force replaces it)",
                path.display()
            )
        } else {
            format!("creating the key file {}", path.display())
        }
    })?;
    (|| {
        file.write_all(format!("{}\n", key.to_hex()).as_bytes())?;
        file.sync_all()
    })()
    .with_context(|| format!("writing the key file {}", path.display()))?;
    Ok(())
}

/// `dwcp mkimage`: the memory of a freshly created simulated guest, written to a file in 1 MiB blocks.
/// Zero pages become holes, so mostly-zero images are sparse.
pub fn mkimage(args: MkimageArgs) -> anyhow::Result<()> {
    let guest = SimulatedGuest::new(SimulatedGuestConfig {
        size_bytes: args.size,
        mix: args.mix.content(),
        seed: args.seed,
    })
    .with_context(|| {
        format!(
            "generating {} of {} memory",
            output::bytes(args.size),
            args.mix.name()
        )
    })?;
    let total = guest.layout().total_pages();
    let ctx = || format!("writing the image {}", args.out.display());
    let mut file = File::create(&args.out).with_context(ctx)?;
    let mut block = vec![0u8; BLOCK_PAGES as usize * PAGE_SIZE];
    let mut first = 0;
    while first < total {
        let n = BLOCK_PAGES.min(total - first);
        let data = &mut block[..n as usize * PAGE_SIZE];
        for (i, page) in data.chunks_exact_mut(PAGE_SIZE).enumerate() {
            guest.read_page(first + i as u64, page);
        }
        // Runs of zero pages become holes; everything else is written as it is.
        let mut run_start = 0;
        while run_start < data.len() {
            let zero = is_zero_page(&data[run_start..run_start + PAGE_SIZE]);
            let mut run_end = run_start + PAGE_SIZE;
            while run_end < data.len() && is_zero_page(&data[run_end..run_end + PAGE_SIZE]) == zero
            {
                run_end += PAGE_SIZE;
            }
            if zero {
                file.seek(SeekFrom::Current((run_end - run_start) as i64))
                    .with_context(ctx)?;
            } else {
                file.write_all(&data[run_start..run_end])
                    .with_context(ctx)?;
            }
            run_start = run_end;
        }
        first += n;
    }
    let len = total * PAGE_SIZE as u64;
    file.set_len(len).with_context(ctx)?;
    file.sync_all().with_context(ctx)?;
    eprintln!(
        "dwcp: wrote a {} image ({} content, seed {}) to {}",
        output::bytes(len),
        args.mix.name(),
        args.seed,
        args.out.display()
    );
    Ok(())
}
