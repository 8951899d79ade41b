//! The data path of a destination session: one thread per stream reads frames, decodes chunks and
//! applies their pages (newest pass wins), acknowledging as `dwcp_proto::dest::AckPolicy` says; the
//! handover's frames go to the session's driver.

use dwcp_core::latency::{LatencyOp, LatencyRecorder};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::Mutex;

use dwcp_core::apply::{Applied, PageVersions};
use dwcp_core::digest::{PageHashes, ZERO_PAGE_HASH};
use dwcp_core::error::{Error, FrameError};
use dwcp_core::frame::{FrameType, HEADER_LEN};
use dwcp_core::ledger::{ChunkLedger, Claim};
use dwcp_core::memory::MemorySink;
use dwcp_core::messages::{Ack, DigestMessage, Finish};
use dwcp_hde::{ChunkDecoder, DecodeScratch, PageData};
use dwcp_proto::dest::AckPolicy;

use crate::session::{StreamReader, StreamWriter, classify, peer_error, unexpected};

pub(super) type SharedWriter = Arc<Mutex<StreamWriter>>;

/// What the session's threads tell its driver.
pub(super) enum Event {
    /// An authenticated stream joined the session (`true`: a parked stream, which is owed
    /// SessionReady).
    Joined(u16, StreamReader, StreamWriter, bool),
    /// The source sent Finish on a stream (answer on the same stream).
    Finish(u16, Finish, SharedWriter),
    /// The source ends pre-copy in post-copy (PostcopySwitch, Finish's payload; answer on the
    /// same stream).
    PostcopySwitch(u16, Finish, SharedWriter),
    /// The source committed the handover.
    Commit(u16, u128, SharedWriter),
    /// A stream ended.
    Ended(u16, StreamEnd),
}

/// How a stream's thread ended.
pub(super) enum StreamEnd {
    Closed,
    /// The source parked the stream after the handover (connection pool).
    Parked(StreamReader),
    /// Broken, silent or corrupted in transit: the source re-sends what this stream carried.
    Lost(Error),
    Fatal(Error),
}

/// What every stream's thread of one session shares.
pub(super) struct Shared<'s> {
    pub(super) sink: &'s dyn MemorySink,
    /// The sink was all zeros when this migration started (asked once: writes change the answer).
    pub(super) sink_started_zeroed: bool,
    /// The source sent Finish: any further data frame is a protocol violation.
    pub(super) finished: AtomicBool,
    pub(super) versions: PageVersions,
    pub(super) hashes: PageHashes,
    pub(super) ledger: ChunkLedger,
    pub(super) decoder: ChunkDecoder,
    pub(super) total_pages: u64,
    pub(super) pages_applied: AtomicU64,
    pub(super) stale: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) wire_bytes: AtomicU64,
    pub(super) latency: LatencyRecorder,
}

/// Marks a claimed chunk complete when dropped, so an error while applying cannot leave the ledger
/// waiting for it.
struct Claimed<'a>(&'a ChunkLedger, u64);

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        self.0.complete(self.1);
    }
}

/// Reads stream `index` until the source closes it, applying data frames.
pub(super) fn apply_stream(
    index: u16,
    mut reader: StreamReader,
    writer: &SharedWriter,
    shared: &Shared<'_>,
    events: &Sender<Event>,
) -> StreamEnd {
    let mut payload = Vec::new();
    let mut scratch = DecodeScratch::default();
    let mut acks = AckPolicy::default();
    loop {
        let h = match reader.read_frame(&mut payload) {
            Ok(h) => h,
            // A record that failed TLS authentication is an attack on the path, not a lost
            // stream: the session ends rather than re-sending over the same path.
            Err(e) if e.security().is_some() => return StreamEnd::Fatal(e),
            Err(e) => return StreamEnd::Lost(classify(e, "data from the source")),
        };
        shared
            .wire_bytes
            .fetch_add((HEADER_LEN + payload.len()) as u64, Ordering::Relaxed);
        let fatal = |e: Error| StreamEnd::Fatal(e);
        match h.frame_type {
            FrameType::Data => {
                if shared.finished.load(Ordering::Acquire) {
                    return fatal(Error::Protocol("data frame after Finish".into()));
                }
                let Some((id, chunk_bytes)) = payload.split_first_chunk::<8>() else {
                    return fatal(
                        FrameError::Malformed {
                            what: "Data",
                            why: "shorter than its chunk id".into(),
                        }
                        .into(),
                    );
                };
                let id = u64::from_le_bytes(*id);
                match shared.ledger.claim(id) {
                    Err(e) => return fatal(e.into()),
                    Ok(Claim::Duplicate) => {
                        shared.duplicates.fetch_add(1, Ordering::Relaxed);
                        // The first copy may still be being applied on a stream that broke; the Ack
                        // below lets the source start the next pass, whose deltas need it applied.
                        let deadline = Instant::now() + Duration::from_secs(5);
                        while shared.ledger.is_applying(id) && Instant::now() < deadline {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                    Ok(Claim::New) => {
                        let _claimed = Claimed(&shared.ledger, id);
                        if let Err(e) = apply_chunk(chunk_bytes, shared, &mut scratch) {
                            return fatal(e);
                        }
                    }
                }
                let more_buffered = !reader.get_ref().buffer().is_empty();
                if acks.on_applied(payload.len(), more_buffered) {
                    if let Err(e) = writer
                        .lock()
                        .write_frame(FrameType::Ack, &Ack { through_seq: h.seq }.encode())
                    {
                        return StreamEnd::Lost(e);
                    }
                }
            }
            FrameType::Finish => match Finish::decode(&payload) {
                Ok(f) => {
                    let _ = events.send(Event::Finish(index, f, Arc::clone(writer)));
                }
                Err(e) => return fatal(e.into()),
            },
            FrameType::PostcopySwitch => match Finish::decode(&payload) {
                Ok(f) => {
                    let _ = events.send(Event::PostcopySwitch(index, f, Arc::clone(writer)));
                }
                Err(e) => return fatal(e.into()),
            },
            FrameType::Commit => match DigestMessage::decode(&payload) {
                Ok(d) => {
                    let _ = events.send(Event::Commit(index, d.digest, Arc::clone(writer)));
                }
                Err(e) => return fatal(e.into()),
            },
            FrameType::Close => return StreamEnd::Closed,
            FrameType::Park => return StreamEnd::Parked(reader),
            FrameType::Error => return fatal(peer_error(&payload)),
            other => return fatal(unexpected(other, "from the source")),
        }
    }
}

/// Decodes one chunk and applies its pages (newest iteration wins).
fn apply_chunk(
    bytes: &[u8],
    shared: &Shared<'_>,
    scratch: &mut DecodeScratch,
) -> Result<(), Error> {
    // DUP and DELTA pages are rebuilt from the sink's current pages, after their hashes are checked.
    let decoding = Instant::now();
    let chunk = shared
        .decoder
        .decode(bytes, shared.total_pages, shared.sink, scratch)?;
    let applying = Instant::now();
    shared
        .latency
        .record(LatencyOp::Decode, applying.duration_since(decoding));
    let (mut applied, mut stale) = (0, 0);
    for (page, data) in &chunk.pages {
        let outcome = shared.versions.apply(*page, chunk.iteration, |previous| {
            match data {
                // Fresh memory is already zero where nothing was written: leave it untouched.
                PageData::Zero if previous.is_none() && shared.sink_started_zeroed => {
                    shared.hashes.set(*page, *ZERO_PAGE_HASH);
                    return;
                }
                PageData::Zero => shared.sink.write_zero_page(*page),
                PageData::Literal(bytes) => shared.sink.write_page(*page, bytes),
            }
            // Hash what the sink holds now, while it is in cache: the digest then proves the
            // stored bytes, not just the received ones.
            shared.hashes.set(*page, shared.sink.page_digest(*page));
        });
        match outcome {
            Applied::Written => applied += 1,
            Applied::Stale => stale += 1,
        }
    }
    shared.latency.record(LatencyOp::Apply, applying.elapsed());
    shared.pages_applied.fetch_add(applied, Ordering::Relaxed);
    shared.stale.fetch_add(stale, Ordering::Relaxed);
    Ok(())
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
