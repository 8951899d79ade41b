#![no_main]
//! Fuzz target `postcopy_wire`: the property checks live in `dwcp_fuzz::postcopy_wire` and are replayed on the committed
//! corpus by the corpus test of the crate they exercise (see `docs/fuzzing.md`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dwcp_fuzz::postcopy_wire::check(data));
