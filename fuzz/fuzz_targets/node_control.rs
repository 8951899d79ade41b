#![no_main]
//! Fuzz target `node_control`: the property checks live in `dwcp_fuzz::node_control` and are replayed on the committed
//! corpus by the corpus test of the crate they exercise (see `docs/fuzzing.md`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dwcp_fuzz::node_control::check(data));
