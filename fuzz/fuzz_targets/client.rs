#![no_main]
//! `scripts/fuzz client SECONDS`: see flexnbd::fuzzing.

libfuzzer_sys::fuzz_target!(|data: &[u8]| flexnbd::fuzzing::run("client", data));
