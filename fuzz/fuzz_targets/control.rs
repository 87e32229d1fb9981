#![no_main]
//! `scripts/fuzz control SECONDS`: see flexnbd::fuzzing.

libfuzzer_sys::fuzz_target!(|data: &[u8]| flexnbd::fuzzing::run("control", data));
