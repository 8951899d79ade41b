//! `dwcp send` and `dwcp recv`: an image file migrated between two processes.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, anyhow};
use dwcp::{Listener, Migration, MigrationEvent, ReceiverConfig};
use dwcp_core::handshake::Psk;
use dwcp_core::memory::{GuestRam, NoDirtyLog, NoVmControl};

use crate::args::{RecvArgs, SendArgs};
use crate::events::{EventLog, observe};
use crate::output::{self, JsonReport};
use crate::progress::ProgressView;
use crate::rss::RssSampler;

/// Reads a pre-shared key file, saying which file and how to make one if that fails.
pub(crate) fn load_psk(path: &Path) -> anyhow::Result<Psk> {
    Psk::from_file(path).with_context(|| {
        format!(
            "cannot use {} as the pre-shared key file (both sides, or both proxies, need the same key; \
             create one with `dwcp keygen --out {}`)",
            path.display(),
            path.display()
        )
    })
}

/// The security the options ask for; says out loud when it is plain text.
pub(crate) fn load_security(opts: &crate::args::SecurityOpts) -> anyhow::Result<dwcp::Security> {
    if let Some(dir) = &opts.tls_dir {
        let security = dwcp::Security::from_cert_dir(dir).with_context(|| {
            format!(
                "cannot use the certificates in {} (create them with `dwcp certs init`)",
                dir.display()
            )
        })?;
        return Ok(match &opts.server_name {
            Some(name) => security.with_server_name(name)?,
            None => security,
        });
    }
    let path = opts
        .psk_file
        .as_deref()
        .ok_or_else(|| anyhow!("give --psk-file or --tls-dir"))?;
    let psk = load_psk(path)?;
    Ok(if opts.insecure_plaintext {
        eprintln!(
            "dwcp: WARNING: --insecure-plaintext: memory pages cross the network unencrypted"
        );
        dwcp::Security::insecure_plaintext(psk)
    } else {
        dwcp::Security::psk(psk)
    })
}

/// The first address `addr` (HOST:PORT) resolves to.
pub(crate) fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("invalid address {addr:?} (expected HOST:PORT)"))?
        .next()
        .ok_or_else(|| anyhow!("address {addr:?} resolves to nothing"))
}

/// `dwcp send`: migrates an image file to a `dwcp recv`.
pub fn send(args: SendArgs) -> anyhow::Result<()> {
    let rss = RssSampler::start();
    let security = load_security(&args.security)?;
    let addr = resolve(&args.to)?;
    let metrics = crate::metrics::serve_if_asked(args.output.metrics.as_deref())?;
    let image = GuestRam::open_image(&args.image)?;
    tracing::info!(%addr, image = %args.image.display(), bytes = image.layout().total_bytes(), "sending");

    let progress = ProgressView::new(!args.output.json && !args.no_progress);
    let events = EventLog::open_if_asked(args.events.as_deref(), args.output.json)?;
    let on_event = |e: &MigrationEvent| observe(e, &progress, events.as_ref());
    let mut migration = Migration::new(addr, security)
        .config(args.migrate.config())
        .on_event(&on_event);
    if let Some(uuid) = args.vm_uuid {
        migration = migration.vm_uuid(uuid);
    }
    if let Some(m) = metrics {
        migration = migration.metrics(m);
    }
    crate::events::cancel_on_signals(&migration.cancel_handle())?;
    let _control = args
        .control
        .as_deref()
        .map(|path| {
            crate::control::ControlServer::start(
                path,
                crate::control::Controls {
                    bandwidth: migration.bandwidth_handle(),
                    cancel: migration.cancel_handle(),
                },
            )
        })
        .transpose()?;
    // An image does not change while it is sent: nothing is ever dirty, and there is no guest to pause.
    let result = match &args.trace {
        None => migration.run(&image, &mut NoDirtyLog, &mut NoVmControl),
        Some(path) => {
            let feed = migration.telemetry_feed();
            let done = AtomicBool::new(false);
            let start = Instant::now();
            std::thread::scope(|scope| {
                let recorder = scope.spawn(|| crate::trace::record(&feed, path, start, &done));
                let result = migration.run(&image, &mut NoDirtyLog, &mut NoVmControl);
                done.store(true, Ordering::Release);
                let samplings = recorder
                    .join()
                    .map_err(|_| anyhow!("the trace recorder panicked"))??;
                tracing::info!(samplings, trace = %path.display(), "trace written");
                anyhow::Ok(result)
            })?
        }
    };
    progress.finish();
    let peak_rss = rss.finish();
    let report = result.with_context(|| format!("migrating {} to {addr}", args.image.display()))?;

    if args.output.json {
        let mut j = JsonReport::migration(&report)?;
        j.set("peak_rss_anon_bytes", peak_rss);
        j.set("image", args.image.display().to_string());
        j.set("destination", addr.to_string());
        j.print()
    } else {
        output::emit(&output::migration_text(&report))
    }
}

/// `dwcp recv`: waits for one migration and writes it to an image file.
pub fn recv(args: RecvArgs) -> anyhow::Result<()> {
    let rss = RssSampler::start();
    let security = load_security(&args.security)?;
    let addr = resolve(&args.listen)?;
    let metrics = crate::metrics::serve_if_asked(args.output.metrics.as_deref())?;
    let config = ReceiverConfig {
        max_memory_bytes: args.max_memory,
        // Checked before the output is created: a refused VM leaves the file as it was.
        expected_identity: dwcp_core::messages::ExpectedIdentity {
            vm_uuid: args.expect_vm_uuid,
            layout_fingerprint: None,
        },
        ..ReceiverConfig::default()
    };
    let listener =
        Listener::bind(addr, security, config).with_context(|| format!("listening on {addr}"))?;
    let local = listener.local_addr()?;
    // Tells people (and scripts) that the port is open, without polluting stdout.
    eprintln!("dwcp: listening on {local}");

    // A port scanner, a health check or a peer with another key is logged and dropped; only our
    // authenticated source ends the wait.
    let incoming = listener
        .accept_source()
        .with_context(|| format!("waiting for a source on {local}"))?;
    let peer = incoming.peer();
    let layout = incoming.layout().clone();
    let vm_uuid = incoming
        .identity()
        .and_then(|id| id.vm_uuid)
        .map(|u| u.to_string());
    tracing::info!(%peer, bytes = layout.total_bytes(), vm_uuid, version = incoming.protocol_version(), out = %args.out.display(), "receiving");
    let output = Output::for_path(&args.out);
    let out = match output.memory(&args.out, layout) {
        Ok(out) => out,
        Err(e) => {
            incoming.refuse(
                dwcp_core::ErrorCode::Internal,
                &format!("the destination cannot create its output file: {e}"),
            );
            return Err(e).context("preparing the output image");
        }
    };
    let mut result = incoming.receive_into(&out);
    if result.is_ok() {
        if let Err(e) = output.finish(&args.out, &out) {
            result = Err(e);
        }
    }
    drop(out);
    if let Some(m) = &metrics {
        m.migrations
            .with_label_values(&[if result.is_ok() { "ok" } else { "failed" }])
            .inc();
    }
    let peak_rss = rss.finish();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            // The file holds an unverified mix of pages: nobody should mistake it for the guest's memory.
            // A device or a pipe got nothing (it is written only after the commit) and is left alone.
            let what = match output {
                Output::Stream => "nothing was written to the output",
                Output::File if std::fs::remove_file(&args.out).is_ok() => {
                    "removed the incomplete output"
                }
                Output::File => "the output is incomplete",
            };
            return Err(e).context(format!(
                "receiving from {peer} into {} failed ({what})",
                args.out.display()
            ));
        }
    };

    if args.output.json {
        let mut j = JsonReport::receive(&report)?;
        j.set("peak_rss_anon_bytes", peak_rss);
        j.set("out", args.out.display().to_string());
        j.set("peer", peer.to_string());
        j.print()
    } else {
        let mut text = output::receive_text(&report, &peer.to_string());
        text.push_str(&format!("  written to        {}\n", args.out.display()));
        output::emit(&text)
    }
}

/// Where `recv` puts the received memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    /// A regular file (created or truncated), mapped: pages land in it as they arrive.
    File,
    /// A device or a pipe (`/dev/null`, a FIFO, `/dev/stdout`): it cannot be sized or mapped, so the
    /// memory is received into anonymous memory and written out in order once the source committed.
    Stream,
}

impl Output {
    fn for_path(path: &Path) -> Self {
        match std::fs::metadata(path) {
            Ok(m) if !m.file_type().is_file() && !m.is_dir() => Output::Stream,
            _ => Output::File,
        }
    }

    fn memory(self, path: &Path, layout: dwcp_core::MemoryLayout) -> dwcp_core::Result<GuestRam> {
        match self {
            Output::File => GuestRam::create_file(path, layout),
            Output::Stream => GuestRam::anonymous(layout),
        }
    }

    /// Writes what was received to a device or pipe; a file already holds it.
    fn finish(self, path: &Path, ram: &GuestRam) -> dwcp_core::Result<()> {
        use std::io::Write;
        if self == Output::File {
            return Ok(());
        }
        let ctx = |e| {
            dwcp_core::Error::io(
                format!("writing the received memory to {}", path.display()),
                e,
            )
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(ctx)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        let mut page = vec![0u8; dwcp_core::PAGE_SIZE];
        for p in 0..ram.layout().total_pages() {
            ram.copy_out(p, &mut page);
            w.write_all(&page).map_err(ctx)?;
        }
        w.flush().map_err(ctx)
    }
}
