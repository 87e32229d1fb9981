#![no_main]
//! `scripts/fuzz serve_newstyle SECONDS`: see flexnbd::fuzzing.

// The over-allocation check (fuzz/src/lib.rs).
use flexnbd_fuzz as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| flexnbd::fuzzing::run("serve_newstyle", data));
