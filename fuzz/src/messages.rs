//! Properties of the control-message decoders in `dwcp_core::messages`.
//!
//! Input: one frame payload, handed to every decoder (ClientHello, ServerHello, SessionInit, Finish,
//! DigestMessage, Ack, ErrorMessage). Checked: no panic; each fixed-size message is accepted exactly
//! when the length is right and re-encodes to the same bytes; an accepted SessionInit, decoded as
//! protocol version 1 and as version 2, obeys every rule of wire-protocol §8.1 (and §2: 1..=64
//! streams; version 2: the identity's 25 bytes, its flags and a non-nil UUID) and re-encodes to
//! the same bytes; an accepted
//! ErrorMessage is 2..=1026 bytes, maps its code as `ErrorCode::from_wire`, carries the lossy UTF-8
//! text, and re-encodes to the same bytes when code and text were canonical.

use dwcp_core::error::{ErrorCode, FrameError};
use dwcp_core::memory::{MAX_TOTAL_PAGES, PAGE_SIZE};
use dwcp_core::messages::{
    Ack, ClientHello, DigestMessage, ErrorMessage, Finish, MAX_ERROR_MESSAGE, MAX_REGIONS,
    MAX_STREAMS, ServerHello, SessionInit,
};

/// Bytes a version 2 SessionInit carries after the regions: fingerprint (8), flags (1), UUID (16).
const IDENTITY_BYTES: usize = 25;

/// Runs every message property on one fuzz input.
pub fn check(data: &[u8]) {
    fixed(data, 48, ClientHello::decode, |m| m.encode());
    fixed(data, 77, ServerHello::decode, |m| m.encode());
    fixed(data, 12, Finish::decode, |m| m.encode());
    fixed(data, 16, DigestMessage::decode, |m| m.encode().to_vec());
    fixed(data, 8, Ack::decode, |m| m.encode().to_vec());
    session_init(data, 1);
    session_init(data, 2);
    error_message(data);
}

fn fixed<T: std::fmt::Debug>(
    data: &[u8],
    len: usize,
    decode: fn(&[u8]) -> Result<T, FrameError>,
    encode: fn(&T) -> Vec<u8>,
) {
    match decode(data) {
        Ok(m) => {
            assert_eq!(data.len(), len, "accepted {m:?} from {} bytes", data.len());
            assert_eq!(encode(&m), data, "{m:?} re-encodes to its bytes");
        }
        Err(e) => {
            assert_ne!(data.len(), len, "refused a {len}-byte payload: {e}");
            assert!(matches!(e, FrameError::Malformed { .. }), "{e:?}");
        }
    }
}

fn session_init(data: &[u8], version: u8) {
    let m = match SessionInit::decode_version(data, version) {
        Ok(m) => m,
        Err(e) => {
            assert!(matches!(e, FrameError::Malformed { .. }), "{e:?}");
            return;
        }
    };
    let regions = m.layout.regions();
    assert!((1..=MAX_REGIONS).contains(&regions.len()));
    let identity_bytes = match (&m.identity, version) {
        (None, 1) => 0,
        (Some(id), 2) => {
            let uuid = &data[data.len() - 16..];
            match id.vm_uuid {
                None => assert!(uuid.iter().all(|&b| b == 0), "no UUID: its field is zero"),
                Some(u) => {
                    assert_eq!(u.as_bytes(), uuid, "the UUID is the one on the wire");
                    assert!(uuid.iter().any(|&b| b != 0), "the nil UUID is refused");
                }
            }
            IDENTITY_BYTES
        }
        (identity, _) => panic!("version {version} SessionInit decoded with identity {identity:?}"),
    };
    assert_eq!(data.len(), 10 + 16 * regions.len() + identity_bytes);
    assert!(
        (1..=MAX_STREAMS).contains(&m.stream_count),
        "SessionInit accepted with {} streams (1..={MAX_STREAMS})",
        m.stream_count
    );
    assert_eq!(m.layout.page_size() as usize, PAGE_SIZE);
    let mut end_of_previous = 0u64;
    let mut total = 0u64;
    for (i, r) in regions.iter().enumerate() {
        assert!(r.pages >= 1);
        assert_eq!(r.guest_addr % PAGE_SIZE as u64, 0);
        let end = r
            .pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|l| r.guest_addr.checked_add(l))
            .expect("region end fits u64");
        assert!(
            i == 0 || r.guest_addr >= end_of_previous,
            "regions ascending"
        );
        end_of_previous = end;
        total = total.checked_add(r.pages).expect("total pages fit u64");
    }
    assert!(total <= MAX_TOTAL_PAGES);
    assert_eq!(m.layout.total_pages(), total);
    assert_eq!(m.encode(), data, "SessionInit re-encodes to its bytes");
}

fn error_message(data: &[u8]) {
    let m = match ErrorMessage::decode(data) {
        Ok(m) => m,
        Err(e) => {
            assert!(matches!(e, FrameError::Malformed { .. }), "{e:?}");
            assert!(data.len() < 2 || data.len() > 2 + MAX_ERROR_MESSAGE);
            return;
        }
    };
    assert!((2..=2 + MAX_ERROR_MESSAGE).contains(&data.len()));
    let code = u16::from_le_bytes([data[0], data[1]]);
    assert_eq!(m.code, ErrorCode::from_wire(code));
    let text = &data[2..];
    assert_eq!(m.message, String::from_utf8_lossy(text));
    let again = m.encode();
    let back = ErrorMessage::decode(&again).expect("an encoded ErrorMessage decodes");
    assert_eq!(back.code, m.code);
    assert!(m.message.starts_with(&back.message));
    if m.code as u16 == code && std::str::from_utf8(text).is_ok() {
        assert_eq!(
            again, data,
            "a canonical ErrorMessage re-encodes to its bytes"
        );
    }
}
