#![no_main]
//! Fuzz target `messages`: the property checks live in `dwcp_fuzz::messages` and are replayed on the committed
//! corpus by the regression tests in `dwcp-core/tests/fuzz_corpus.rs` / `dwcp-hde/tests/fuzz_corpus.rs`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dwcp_fuzz::messages::check(data));
