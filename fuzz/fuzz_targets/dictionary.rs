#![no_main]
//! Fuzz target `dictionary`: `dwcp_hde::Dictionary::from_bytes`, then a compression round trip with an
//! accepted dictionary. The property checks live in `dwcp_fuzz::chunk::check_dictionary` and are
//! replayed on the committed corpus by `dwcp-hde/tests/fuzz_corpus.rs`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dwcp_fuzz::chunk::check_dictionary(data));
