#![no_main]
//! `scripts/fuzz listen SECONDS`: see flexnbd::fuzzing.

libfuzzer_sys::fuzz_target!(|data: &[u8]| flexnbd::fuzzing::run("listen", data));
