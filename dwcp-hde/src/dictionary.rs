//! Session dictionaries for zstd: trained once from sampled pages at session start, sent once to the
//! receiver, then named by id in every chunk compressed with them (codec 3).
//!
//! Serialised form (docs/hde.md §5):
//!
//! ```text
//! offset size  field
//!  0     4     magic "HDEd"
//!  4     4     id: a non-zero u32 derived from the content (see `Dictionary::id`)
//!  8     4     content length d (1..=MAX_DICTIONARY_LEN)
//! 12     d     content (a zstd dictionary, or raw content)
//! ```

use std::sync::OnceLock;

use dwcp_core::digest::page_hash;
use dwcp_core::error::{ChunkError, Error};
use dwcp_core::memory::{MemorySource, PAGE_SIZE, is_zero_page};

/// Most bytes of dictionary content a receiver accepts.
pub const MAX_DICTIONARY_LEN: usize = 128 * 1024;
/// Fewest bytes of dictionary content: zstd ignores shorter raw-content dictionaries.
pub const MIN_DICTIONARY_LEN: usize = 8;
/// Length of the serialised header before the content.
pub const DICTIONARY_HEADER_LEN: usize = 12;
/// Most bytes of a serialised dictionary.
pub const MAX_SERIALIZED_DICTIONARY_LEN: usize = DICTIONARY_HEADER_LEN + MAX_DICTIONARY_LEN;
const MAGIC: [u8; 4] = *b"HDEd";
/// zstd levels a dictionary can be prepared for.
const LEVELS: usize = 19;

/// A zstd dictionary shared by both ends of a session, with its prepared compression and decompression
/// forms (built lazily, once per level).
pub struct Dictionary {
    id: u32,
    content: Vec<u8>,
    compress: [OnceLock<Option<zstd::zstd_safe::CDict<'static>>>; LEVELS],
    decompress: zstd::zstd_safe::DDict<'static>,
}

impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dictionary")
            .field("id", &self.id)
            .field("len", &self.content.len())
            .finish()
    }
}

fn content_id(content: &[u8]) -> u32 {
    // Zero means "no dictionary" on the wire.
    (page_hash(content) as u32).max(1)
}

impl Dictionary {
    /// A dictionary with this content (a trained zstd dictionary, or any raw bytes).
    pub fn from_content(content: Vec<u8>) -> Result<Self, Error> {
        if content.len() < MIN_DICTIONARY_LEN || content.len() > MAX_DICTIONARY_LEN {
            return Err(Error::Config(format!(
                "dictionary of {} bytes ({MIN_DICTIONARY_LEN}..={MAX_DICTIONARY_LEN})",
                content.len()
            )));
        }
        let decompress = zstd::zstd_safe::DDict::try_create(&content)
            .ok_or_else(|| Error::Config("zstd refuses the dictionary".into()))?;
        Ok(Self {
            id: content_id(&content),
            content,
            compress: Default::default(),
            decompress,
        })
    }

    /// Trains a dictionary of at most `max_len` bytes from `samples` (typically 256 to 4,096 non-zero
    /// pages spread over guest memory). Fails when zstd cannot train from them (too few or too
    /// uniform samples); the session then simply runs without a dictionary.
    pub fn train<S: AsRef<[u8]>>(samples: &[S], max_len: usize) -> Result<Self, Error> {
        let max_len = max_len.clamp(1024, MAX_DICTIONARY_LEN);
        let content = zstd::dict::from_samples(samples, max_len)
            .map_err(|e| Error::Config(format!("training a zstd dictionary: {e}")))?;
        Self::from_content(content)
    }

    /// Trains a dictionary from up to `max_samples` non-zero pages of `source`, spread evenly over
    /// its memory.
    pub fn train_from_memory(
        source: &dyn MemorySource,
        max_samples: usize,
        max_len: usize,
    ) -> Result<Self, Error> {
        let total = source.layout().total_pages();
        let step = (total / (4 * max_samples.max(1) as u64)).max(1);
        let mut samples = Vec::with_capacity(max_samples);
        let mut page = vec![0u8; PAGE_SIZE];
        let mut at = 0u64;
        // Four candidate pages per sample: idle guests are mostly zero pages, which teach nothing.
        while at < total && samples.len() < max_samples {
            source.read_page(at, &mut page);
            if !is_zero_page(&page) {
                samples.push(page.clone());
            }
            at += step;
        }
        Self::train(&samples, max_len)
    }

    /// The id chunks name this dictionary by: a non-zero 32-bit hash of the content.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The dictionary content.
    pub fn content(&self) -> &[u8] {
        &self.content
    }

    /// The serialised form, to be sent once to the receiver before any chunk that uses it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DICTIONARY_HEADER_LEN + self.content.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&(self.content.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.content);
        out
    }

    /// Parses a serialised dictionary from the network: checks the magic, the length bound, that the
    /// id matches the content and that zstd accepts it. Allocates at most the content length.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ChunkError> {
        let invalid = |s: &str| ChunkError::Invalid(format!("dictionary: {s}"));
        let header = bytes
            .get(..DICTIONARY_HEADER_LEN)
            .ok_or(ChunkError::Truncated("dictionary header"))?;
        if header[..4] != MAGIC {
            return Err(invalid("bad magic"));
        }
        let id = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
        if !(MIN_DICTIONARY_LEN..=MAX_DICTIONARY_LEN).contains(&len) {
            return Err(invalid("length outside 8..=131072"));
        }
        let content = &bytes[DICTIONARY_HEADER_LEN..];
        if content.len() < len {
            return Err(ChunkError::Truncated("dictionary content"));
        }
        if content.len() > len {
            return Err(invalid("trailing bytes"));
        }
        if content_id(content) != id {
            return Err(invalid("id does not match the content"));
        }
        Self::from_content(content.to_vec()).map_err(|e| invalid(&e.to_string()))
    }

    /// The prepared compression dictionary for `level` (1..=19), built on first use; `None` if zstd
    /// cannot load the content for compression (the chunk then goes without compression).
    pub(crate) fn for_level(&self, level: i32) -> Option<&zstd::zstd_safe::CDict<'static>> {
        let level = level.clamp(1, LEVELS as i32);
        self.compress[level as usize - 1]
            .get_or_init(|| zstd::zstd_safe::CDict::try_create(&self.content, level))
            .as_ref()
    }

    /// The prepared decompression dictionary.
    pub(crate) fn for_decompression(&self) -> &zstd::zstd_safe::DDict<'static> {
        &self.decompress
    }
}
