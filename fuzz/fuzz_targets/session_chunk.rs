#![no_main]
//! Fuzz target `session_chunk`: `dwcp_hde::ChunkDecoder::decode` (both chunk formats, DUP/DELTA pages
//! resolved against a patterned receiver memory, optional dictionary). The property checks live in
//! `dwcp_fuzz::chunk::check_session` and are replayed on the committed corpus by
//! `dwcp-hde/tests/fuzz_corpus.rs`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dwcp_fuzz::chunk::check_session(data));
