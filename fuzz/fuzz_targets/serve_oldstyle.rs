#![no_main]
//! `scripts/fuzz serve_oldstyle SECONDS`: see flexnbd::fuzzing.

libfuzzer_sys::fuzz_target!(|data: &[u8]| flexnbd::fuzzing::run("serve_oldstyle", data));
