#![no_main]
//! cargo-fuzz target; the check is `confab_fuzz_checks::client_frame` (see docs/fuzzing.md).

libfuzzer_sys::fuzz_target!(|data: &[u8]| confab_fuzz_checks::client_frame(data));
