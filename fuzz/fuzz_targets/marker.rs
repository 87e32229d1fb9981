#![no_main]
//! `scripts/fuzz marker SECONDS`: see flexnbd::fuzzing.

libfuzzer_sys::fuzz_target!(|data: &[u8]| flexnbd::fuzzing::run("marker", data));
