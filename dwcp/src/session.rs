//! Plumbing shared by both sides: stream setup, timeouts, and error reporting to the peer.

use std::io::BufReader;
use std::time::Duration;

use dwcp_core::error::{Error, ErrorCode};
use dwcp_core::frame::{FrameReader, FrameType, FrameWriter};
use dwcp_core::messages::ErrorMessage;
use dwcp_core::transport::Conn;

/// Read side of a stream: buffered so that small frames cost no syscall each.
pub(crate) type StreamReader = FrameReader<BufReader<Box<dyn Conn>>>;
/// Write side of a stream.
pub(crate) type StreamWriter = FrameWriter<Box<dyn Conn>>;

/// Bytes buffered ahead on each read side: enough for frame headers and small frames. A larger
/// payload is read straight into its buffer, except what the read buffer already holds, which is
/// copied; so a buffer much larger than this makes each data frame cost a second copy.
const READ_BUFFER: usize = 16 << 10;

/// Splits a connected stream into its frame reader and writer, with `io_timeout` on both directions.
pub(crate) fn split(
    conn: Box<dyn Conn>,
    io_timeout: Duration,
) -> Result<(StreamReader, StreamWriter), Error> {
    let ctx = |e| Error::io("configuring a stream", e);
    conn.set_read_timeout(Some(io_timeout)).map_err(ctx)?;
    conn.set_write_timeout(Some(io_timeout)).map_err(ctx)?;
    let read_half = conn.try_clone_conn().map_err(ctx)?;
    Ok((
        FrameReader::new(BufReader::with_capacity(READ_BUFFER, read_half)),
        FrameWriter::new(conn),
    ))
}

/// Turns socket time-outs into [`Error::Timeout`] so callers can tell a silent peer from a broken one.
pub(crate) fn classify(e: Error, what: &str) -> Error {
    match e {
        Error::Io { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Error::Timeout(format!(
                "the peer sent nothing for too long while we waited for {what}"
            ))
        }
        other => other,
    }
}

/// Decodes an Error frame's payload into [`Error::Peer`].
pub(crate) fn peer_error(payload: &[u8]) -> Error {
    match ErrorMessage::decode(payload) {
        Ok(m) => Error::Peer {
            code: m.code,
            message: m.message,
        },
        Err(e) => e.into(),
    }
}

/// The payload of an Error frame reporting `error`.
pub(crate) fn error_payload(error: &Error) -> Vec<u8> {
    let code = match error {
        Error::Peer { .. } => ErrorCode::Internal,
        e => e.wire_code(),
    };
    ErrorMessage {
        code,
        message: error.to_string(),
    }
    .encode()
}

/// Best-effort: tells the peer why the session ends.
pub(crate) fn report_error(writer: &mut StreamWriter, error: &Error) {
    if matches!(error, Error::Peer { .. }) {
        return;
    }
    let _ = writer.write_frame(FrameType::Error, &error_payload(error));
}

/// Reads the next frame into `payload`; it must be `expected` (an Error frame is the peer's error).
/// `what` names it in errors.
pub(crate) fn read_expected(
    reader: &mut StreamReader,
    payload: &mut Vec<u8>,
    expected: FrameType,
    what: &str,
) -> Result<(), Error> {
    let h = reader.read_frame(payload).map_err(|e| classify(e, what))?;
    match h.frame_type {
        t if t == expected => Ok(()),
        FrameType::Error => Err(peer_error(payload)),
        other => Err(unexpected(
            other,
            &format!("instead of {}", expected.name()),
        )),
    }
}

pub(crate) fn unexpected(ft: FrameType, when: &str) -> Error {
    Error::Protocol(format!("unexpected {} frame {when}", ft.name()))
}

pub(crate) fn hex(d: u128) -> String {
    format!("{d:032x}")
}
