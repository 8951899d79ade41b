//! Post-copy's streams: TLS (or the plain-text mode's key proof) and the DWCP stream handshake,
//! then frames. Stream 0 of a session is urgent (requests and the pages that answer them), stream 1
//! carries the background push.

use std::io::BufReader;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dwcp_core::error::Error;
use dwcp_core::frame::{FrameReader, FrameType, FrameWriter};
use dwcp_core::handshake::{Negotiated, Offer, client_handshake, server_handshake};
use dwcp_core::transport::{Acceptor, Conn};
use dwcp_proto::postcopy::PageSet;
use dwcp_proto::postcopy::wire::{self, MAX_RANGES_PER_FRAME, SetEnd};
use dwcp_tcp::{SocketProfile, TcpAcceptor};
use dwcp_tls::Security;

/// Index of the urgent stream in a post-copy session.
pub(crate) const URGENT: u16 = 0;
/// Index of the background stream.
pub(crate) const PUSH: u16 = 1;

/// Read-side buffering of a stream (a few whole pages frames).
const READ_BUFFER: usize = 1 << 20;

pub(crate) type Reader = FrameReader<BufReader<Box<dyn Conn>>>;
pub(crate) type Writer = FrameWriter<Box<dyn Conn>>;

/// One authenticated stream of a post-copy session.
pub(crate) struct Stream {
    pub(crate) reader: Reader,
    pub(crate) writer: Writer,
    pub(crate) index: u16,
}

fn split(conn: Box<dyn Conn>, io_timeout: Duration) -> Result<(Reader, Writer), Error> {
    let ctx = |e| Error::io("configuring a post-copy stream", e);
    conn.set_read_timeout(Some(io_timeout)).map_err(ctx)?;
    conn.set_write_timeout(Some(io_timeout)).map_err(ctx)?;
    let read_half = conn.try_clone_conn().map_err(ctx)?;
    Ok((
        FrameReader::new(BufReader::with_capacity(READ_BUFFER, read_half)),
        FrameWriter::new(conn),
    ))
}

/// Opens stream `index` of session `session_id` (0: a new session) to `addr`.
pub(crate) fn dial(
    addr: SocketAddr,
    security: &Security,
    session_id: u64,
    index: u16,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<(Stream, Negotiated), Error> {
    let started = Instant::now();
    let (tcp, _) = dwcp_tcp::connect(addr, &SocketProfile::datacenter(), connect_timeout)?;
    let _ = tcp.set_nodelay(true);
    let secured = security.connect(Box::new(tcp), addr, started + connect_timeout)?;
    let (mut reader, mut writer) = split(secured.conn, connect_timeout)?;
    let neg = client_handshake(
        &mut reader,
        &mut writer,
        &secured.handshake_key,
        Offer::default(),
        session_id,
        index,
    )?;
    set_timeouts(&writer, io_timeout)?;
    Ok((
        Stream {
            reader,
            writer,
            index: neg.stream_index,
        },
        neg,
    ))
}

/// Accepts one stream; `assign` maps the session the client asks for to the one it joins.
pub(crate) fn accept(
    acceptor: &TcpAcceptor,
    security: &Security,
    wait: Duration,
    handshake_timeout: Duration,
    io_timeout: Duration,
    assign: impl FnOnce(u64) -> Result<u64, Error>,
) -> Result<Option<(Stream, Negotiated)>, Error> {
    let Some(conn) = acceptor.accept_timeout(wait)? else {
        return Ok(None);
    };
    if let Some(tcp) = conn.as_tcp() {
        let _ = tcp.set_nodelay(true);
    }
    let secured = security.accept(conn, Instant::now() + handshake_timeout)?;
    let (mut reader, mut writer) = split(secured.conn, handshake_timeout)?;
    let neg = server_handshake(
        &mut reader,
        &mut writer,
        &secured.handshake_key,
        Offer::default(),
        assign,
    )?;
    set_timeouts(&writer, io_timeout)?;
    Ok(Some((
        Stream {
            reader,
            writer,
            index: neg.stream_index,
        },
        neg,
    )))
}

fn set_timeouts(writer: &Writer, io_timeout: Duration) -> Result<(), Error> {
    let conn = writer.get_ref();
    let ctx = |e| Error::io("configuring a post-copy stream", e);
    conn.set_read_timeout(Some(io_timeout)).map_err(ctx)?;
    conn.set_write_timeout(Some(io_timeout)).map_err(ctx)
}

/// Sends a set as PostcopyMissing frames ended by `end` (PostcopyStart or PostcopyResume).
pub(crate) fn send_set(writer: &mut Writer, set: &PageSet, end: FrameType) -> Result<(), Error> {
    let ranges = set.ranges();
    let mut payload = Vec::new();
    for part in ranges.chunks(MAX_RANGES_PER_FRAME) {
        wire::encode_missing(part, &mut payload);
        writer.write_frame(FrameType::PostcopyMissing, &payload)?;
    }
    let end_frame = SetEnd {
        total_pages: set.bound(),
        pages: set.len(),
        ranges: ranges.len() as u64,
    };
    writer.write_frame(end, &end_frame.encode())?;
    writer.flush()?;
    Ok(())
}

/// Reads a set sent by [`send_set`]; `end` names the frame that ends it. The set is checked
/// against the count its end frame announces.
pub(crate) fn read_set(
    reader: &mut Reader,
    total_pages: Option<u64>,
    end: FrameType,
    max_ranges: u64,
) -> Result<PageSet, Error> {
    let mut payload = Vec::new();
    let mut ranges = Vec::new();
    loop {
        let h = reader.read_frame(&mut payload)?;
        match h.frame_type {
            FrameType::PostcopyMissing => {
                // The bound is checked again at the end frame, once it is known.
                let bound = total_pages.unwrap_or(dwcp_core::memory::MAX_TOTAL_PAGES);
                ranges.extend(wire::decode_missing(&payload, bound)?);
                if ranges.len() as u64 > max_ranges {
                    return Err(Error::Protocol(format!(
                        "a post-copy set of more than {max_ranges} ranges"
                    )));
                }
            }
            t if t == end => {
                let e = SetEnd::decode(end.name(), &payload)?;
                if total_pages.is_some_and(|t| t != e.total_pages) {
                    return Err(Error::Layout(format!(
                        "post-copy of a memory of {} pages into one of {} pages",
                        e.total_pages,
                        total_pages.unwrap_or_default()
                    )));
                }
                let mut set = PageSet::new(e.total_pages);
                for r in &ranges {
                    if r.end > e.total_pages {
                        return Err(Error::Protocol(format!(
                            "post-copy range {r:?} past {} pages",
                            e.total_pages
                        )));
                    }
                    set.insert_range(r.clone());
                }
                if set.len() != e.pages || ranges.len() as u64 != e.ranges {
                    return Err(Error::Protocol(format!(
                        "a post-copy set of {} pages in {} ranges announced as {} in {}",
                        set.len(),
                        ranges.len(),
                        e.pages,
                        e.ranges
                    )));
                }
                return Ok(set);
            }
            FrameType::Error => {
                return Err(peer_error(&payload));
            }
            other => {
                return Err(Error::Protocol(format!(
                    "{} while a post-copy set was expected",
                    other.name()
                )));
            }
        }
    }
}

/// An Error frame's payload as [`Error::Peer`].
pub(crate) fn peer_error(payload: &[u8]) -> Error {
    match dwcp_core::messages::ErrorMessage::decode(payload) {
        Ok(m) => Error::Peer {
            code: m.code,
            message: m.message,
        },
        Err(e) => e.into(),
    }
}
