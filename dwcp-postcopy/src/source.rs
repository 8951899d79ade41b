//! The source's side: serve requests first, push the rest, reconnect after a loss.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dwcp_core::digest::page_hash;
use dwcp_core::error::Error;
use dwcp_core::frame::FrameType;
use dwcp_core::memory::{MemorySource, PAGE_SIZE};
use dwcp_proto::postcopy::wire::{self, Complete, MAX_PAGES_PER_FRAME, PagesFrame};
use dwcp_proto::postcopy::{PageSet, PostcopySource, SetDigest};
use dwcp_tls::Security;
use parking_lot::Mutex;
use serde::Serialize;

use crate::PostcopyConfig;
use crate::conn::{self, PUSH, Stream, URGENT, Writer};

/// What the source's post-copy did.
#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    /// Pages in the post-copy set.
    pub pages: u64,
    /// Pages sent because the destination's guest faulted on them.
    pub served: u64,
    /// Pages sent by the background push (some again after a reconnect).
    pub pushed: u64,
    /// Faults the destination reported.
    pub faults: u64,
    /// Connections used: 1, plus one per recovery.
    pub connections: u32,
    /// From the call until the destination confirmed every page.
    pub duration: Duration,
    /// The digest both sides computed over the set's pages (they are equal, or `send` fails), hex.
    pub digest: String,
}

/// Post-copy of `set` from `memory` to the [`crate::PostcopyListener`] at `addr`.
///
/// The guest must be paused, and stay paused: from the moment this is called the destination
/// owns the VM, and `memory` only serves its pages. Returns once the destination has placed every
/// page and its digest equals the source's. Reconnects after a lost connection for up to
/// [`PostcopyConfig::recovery_timeout`].
pub fn send(
    addr: SocketAddr,
    security: &Security,
    memory: &dyn MemorySource,
    set: PageSet,
    config: &PostcopyConfig,
) -> Result<SourceReport, Error> {
    let started = Instant::now();
    let total = memory.layout().total_pages();
    if set.bound() != total {
        return Err(Error::Config(format!(
            "a post-copy set over {} pages for a memory of {total} pages",
            set.bound()
        )));
    }
    let machine = Mutex::new(PostcopySource::new(set.clone()));
    std::thread::scope(|scope| {
        let own = scope.spawn(|| set_digest(memory, &set));
        let mut session_id = 0u64;
        let mut lost_since: Option<Instant> = None;
        let complete = loop {
            let mut established = false;
            match run_connection(
                addr,
                security,
                memory,
                &machine,
                &mut session_id,
                &mut established,
                config,
            ) {
                Ok(c) => break Ok(c),
                // Once the destination runs the VM, a refused or broken handshake while
                // reconnecting (a peer closing mid-handshake looks the same as one refusing us) is
                // retried until the recovery deadline too: giving up early loses the VM.
                Err(e) if !retried(&e, session_id) => break Err(e),
                Err(e) => {
                    machine.lock().on_disconnect();
                    if established {
                        lost_since = None;
                    }
                    let since = *lost_since.get_or_insert_with(Instant::now);
                    if session_id == 0 || since.elapsed() >= config.recovery_timeout {
                        break Err(Error::Timeout(format!(
                            "post-copy to {addr} lost its connection and did not get it back within {:?}: {e}",
                            config.recovery_timeout
                        )));
                    }
                    tracing::warn!(error = %e, "post-copy connection lost; reconnecting");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        let own = own.join().expect("the digest thread does not panic");
        let complete = complete?;
        if own.value() != complete.digest {
            return Err(Error::DigestMismatch {
                source_digest: own.value(),
                destination_digest: complete.digest,
            });
        }
        let m = machine.lock();
        Ok(SourceReport {
            pages: m.set().len(),
            served: m.served(),
            pushed: m.pushed(),
            faults: complete.faults,
            connections: m.connections(),
            duration: started.elapsed(),
            digest: format!("{:032x}", own.value()),
        })
    })
}

/// Whether `e` is worth another connection: a lost or silent stream always; once a session runs
/// (`session_id` != 0), also a failed handshake or an error frame from the destination.
fn retried(e: &Error, session_id: u64) -> bool {
    let refusal = matches!(
        e,
        Error::Security(_) | Error::Handshake(_) | Error::Peer { .. }
    );
    crate::is_recoverable(e) || (session_id != 0 && refusal)
}

fn set_digest(memory: &dyn MemorySource, set: &PageSet) -> SetDigest {
    let mut digest = SetDigest::default();
    let mut buf = vec![0u8; PAGE_SIZE];
    for page in set.iter() {
        memory.read_page(page, &mut buf);
        digest.add(page, page_hash(&buf));
    }
    digest
}

/// Sends `pages` in frames of up to [`MAX_PAGES_PER_FRAME`].
fn send_pages(
    memory: &dyn MemorySource,
    writer: &mut Writer,
    pages: &[u64],
    frame: &mut PagesFrame,
    buf: &mut [u8],
    payload: &mut Vec<u8>,
) -> Result<(), Error> {
    for part in pages.chunks(MAX_PAGES_PER_FRAME) {
        for &p in part {
            memory.read_page(p, buf);
            frame.push(p, buf);
        }
        frame.finish(payload);
        writer.write_frame(FrameType::PostcopyPages, payload)?;
    }
    writer.flush()?;
    Ok(())
}

fn run_connection(
    addr: SocketAddr,
    security: &Security,
    memory: &dyn MemorySource,
    machine: &Mutex<PostcopySource>,
    session_id: &mut u64,
    established: &mut bool,
    config: &PostcopyConfig,
) -> Result<Complete, Error> {
    let total = memory.layout().total_pages();
    let dial = |session, index| {
        conn::dial(
            addr,
            security,
            session,
            index,
            config.connect_timeout,
            config.io_timeout,
        )
    };
    let (mut urgent, neg) = dial(*session_id, URGENT)?;
    let first = *session_id == 0;
    if !first && neg.session_id != *session_id {
        return Err(Error::Protocol(
            "the destination moved post-copy to another session".into(),
        ));
    }
    *session_id = neg.session_id;
    let (push, _) = dial(*session_id, PUSH)?;
    if urgent.index != URGENT || push.index != PUSH {
        return Err(Error::Protocol("post-copy streams out of order".into()));
    }
    if first {
        let set = machine.lock().set().clone();
        conn::send_set(&mut urgent.writer, &set, FrameType::PostcopyStart)?;
    } else {
        let missing = conn::read_set(
            &mut urgent.reader,
            Some(total),
            FrameType::PostcopyResume,
            total,
        )?;
        tracing::info!(missing = missing.len(), "post-copy resumed");
        machine.lock().on_resume(missing)?;
    }
    *established = true;

    let stop = AtomicBool::new(false);
    let push_conn = push
        .writer
        .get_ref()
        .try_clone_conn()
        .map_err(|e| Error::io("cloning a post-copy stream", e))?;
    let urgent_conn = urgent
        .writer
        .get_ref()
        .try_clone_conn()
        .map_err(|e| Error::io("cloning a post-copy stream", e))?;
    let (result, pushed) = std::thread::scope(|scope| {
        let pusher = scope.spawn(|| push_loop(memory, machine, push, &*urgent_conn, &stop));
        let result = urgent_loop(memory, machine, &mut urgent, total);
        stop.store(true, Ordering::Relaxed);
        let _ = push_conn.shutdown(std::net::Shutdown::Both);
        let _ = urgent_conn.shutdown(std::net::Shutdown::Both);
        (
            result,
            pusher.join().expect("the push thread does not panic"),
        )
    });
    match (result, pushed) {
        (Ok(c), _) => Ok(c),
        // The push stream failing first is what shut the urgent one: report the push's error.
        (Err(_), Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
    }
}

fn push_loop(
    memory: &dyn MemorySource,
    machine: &Mutex<PostcopySource>,
    mut push: Stream,
    urgent: &dyn dwcp_core::transport::Conn,
    stop: &AtomicBool,
) -> Result<(), Error> {
    let mut frame = PagesFrame::new();
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut payload = Vec::new();
    let mut batch = Vec::with_capacity(MAX_PAGES_PER_FRAME);
    while !stop.load(Ordering::Relaxed) {
        batch.clear();
        machine.lock().next_push(MAX_PAGES_PER_FRAME, &mut batch);
        if batch.is_empty() {
            // Everything is pushed; a reconnect may bring more. Wait for the end.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let r = send_pages(
            memory,
            &mut push.writer,
            &batch,
            &mut frame,
            &mut buf,
            &mut payload,
        );
        if let Err(e) = r {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            // Unblock the urgent reader: this connection is gone.
            let _ = urgent.shutdown(std::net::Shutdown::Both);
            return Err(e);
        }
    }
    Ok(())
}

fn urgent_loop(
    memory: &dyn MemorySource,
    machine: &Mutex<PostcopySource>,
    urgent: &mut Stream,
    total: u64,
) -> Result<Complete, Error> {
    let mut frame = PagesFrame::new();
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut payload = Vec::new();
    let mut out = Vec::new();
    let mut pages = Vec::new();
    loop {
        let h = urgent.reader.read_frame(&mut payload)?;
        match h.frame_type {
            FrameType::PageRequest => {
                let requested = wire::decode_request(&payload, total)?;
                let mut m = machine.lock();
                m.on_request(&requested)?;
                pages.clear();
                pages.extend(std::iter::from_fn(|| m.next_urgent()));
                drop(m);
                send_pages(
                    memory,
                    &mut urgent.writer,
                    &pages,
                    &mut frame,
                    &mut buf,
                    &mut out,
                )?;
            }
            FrameType::PostcopyComplete => {
                let complete = Complete::decode(&payload)?;
                machine.lock().on_complete(complete)?;
                return Ok(complete);
            }
            FrameType::Keepalive => {}
            FrameType::Error => return Err(conn::peer_error(&payload)),
            other => {
                return Err(Error::Protocol(format!(
                    "{} on the post-copy urgent stream",
                    other.name()
                )));
            }
        }
    }
}
