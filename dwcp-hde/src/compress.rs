//! Section compression and decompression with reused per-thread zstd contexts (creating a context per
//! chunk costs an allocation of several hundred KiB and its page faults).

use std::cell::RefCell;

use dwcp_core::error::ChunkError;
use dwcp_core::memory::PAGE_SIZE;
use zstd::zstd_safe::{CCtx, DCtx};

use crate::codec::Codec;
use crate::dictionary::Dictionary;
use crate::format::StoredCodec;

struct Contexts {
    compress: Option<CCtx<'static>>,
    decompress: Option<DCtx<'static>>,
}

thread_local! {
    static CONTEXTS: RefCell<Contexts> = const {
        RefCell::new(Contexts { compress: None, decompress: None })
    };
}

/// Compresses `src` with `codec` (zstd with `dictionary` when one is given) into `dst`, which is
/// overwritten. Returns the stored codec and the compressed length, or `None` when the codec is
/// `None` or the compressor failed.
pub(crate) fn compress(
    codec: Codec,
    dictionary: Option<&Dictionary>,
    src: &[u8],
    dst: &mut Vec<u8>,
) -> Option<(StoredCodec, usize)> {
    match codec {
        Codec::None => None,
        Codec::Lz4 => {
            // Grown (and zero-filled) only when too short: filling a megabyte per chunk costs more
            // than LZ4 needs for a compressible one.
            ensure_len(dst, lz4_flex::block::get_maximum_output_size(src.len()));
            let n = lz4_flex::block::compress_into(src, dst).ok()?;
            Some((StoredCodec::Lz4, n))
        }
        Codec::Zstd(level) => {
            // zstd writes into the capacity from the start and sets the length itself.
            dst.clear();
            dst.reserve(zstd::zstd_safe::compress_bound(src.len()));
            CONTEXTS.with_borrow_mut(|ctx| {
                let cctx = ctx.compress.get_or_insert_with(CCtx::create);
                match dictionary {
                    Some(d) => cctx
                        .compress_using_cdict(dst, src, d.for_level(level)?)
                        .ok()
                        .map(|n| (StoredCodec::ZstdDictionary, n)),
                    None => cctx
                        .compress(dst, src, level)
                        .ok()
                        .map(|n| (StoredCodec::Zstd, n)),
                }
            })
        }
    }
}

/// Decompresses a stored section into exactly `dst.len()` bytes. Never writes beyond `dst`: a stream
/// that would decompress to more fails, and so does one that gives fewer bytes.
pub(crate) fn decompress(
    codec: StoredCodec,
    dictionary: Option<&Dictionary>,
    src: &[u8],
    dst: &mut [u8],
) -> Result<(), ChunkError> {
    let expected = dst.len();
    let n = match codec {
        StoredCodec::Raw => {
            if src.len() != expected {
                return Err(ChunkError::Invalid("raw section length".into()));
            }
            dst.copy_from_slice(src);
            expected
        }
        StoredCodec::Lz4 => lz4_flex::block::decompress_into(src, dst)
            .map_err(|e| ChunkError::Decompress(format!("lz4: {e}")))?,
        StoredCodec::Zstd | StoredCodec::ZstdDictionary => CONTEXTS.with_borrow_mut(|ctx| {
            let dctx = ctx.decompress.get_or_insert_with(DCtx::create);
            let result = match (codec, dictionary) {
                (StoredCodec::ZstdDictionary, Some(d)) => {
                    dctx.decompress_using_ddict(dst, src, d.for_decompression())
                }
                (StoredCodec::ZstdDictionary, None) => {
                    return Err(ChunkError::Invalid(
                        "chunk compressed with a dictionary the receiver does not have".into(),
                    ));
                }
                _ => dctx.decompress(dst, src),
            };
            result.map_err(|code| {
                ChunkError::Decompress(format!("zstd: {}", zstd::zstd_safe::get_error_name(code)))
            })
        })?,
    };
    if n != expected {
        return Err(ChunkError::Decompress(format!(
            "{codec:?} gave {n} bytes, expected {expected}"
        )));
    }
    Ok(())
}

/// Windows the probe samples at most.
const PROBE_WINDOWS: usize = 8;

/// Rough compressibility of `section`: LZ4's output/input ratio on up to eight 4 KiB windows spread
/// evenly over it. Costs a few microseconds; an incompressible section is recognised without paying
/// for a full compression pass.
pub(crate) fn probe_ratio(section: &[u8], scratch: &mut Vec<u8>) -> f64 {
    if section.is_empty() {
        return 1.0;
    }
    let window = PAGE_SIZE.min(section.len());
    let windows = (section.len() / window).clamp(1, PROBE_WINDOWS);
    let last = section.len() - window;
    ensure_len(scratch, lz4_flex::block::get_maximum_output_size(window));
    let mut compressed = 0usize;
    for k in 0..windows {
        let at = if windows == 1 {
            0
        } else {
            k * last / (windows - 1)
        };
        let part = &section[at..at + window];
        compressed += lz4_flex::block::compress_into(part, scratch).unwrap_or(window);
    }
    (compressed as f64 / (windows * window) as f64).min(1.0)
}

/// Makes `buf` at least `len` bytes long, zero-filling only what it grows by.
pub(crate) fn ensure_len(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    }
}

/// Makes `buf` exactly `len` bytes long without growing its capacity beyond `len` (`resize` alone
/// grows by doubling), zero-filling only what it grows by. Its content is then overwritten.
pub(crate) fn set_len_exact(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.reserve_exact(len - buf.len());
        buf.resize(len, 0);
    } else {
        buf.truncate(len);
    }
}
