#![no_main]
//! `scripts/fuzz serve_newstyle SECONDS`: see flexnbd::fuzzing.

libfuzzer_sys::fuzz_target!(|data: &[u8]| flexnbd::fuzzing::run("serve_newstyle", data));
