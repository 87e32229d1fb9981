#![no_main]
//! `scripts/fuzz codec SECONDS`: see flexnbd::fuzzing (and fuzz/src/lib.rs: the
//! over-allocation check every target links).

libfuzzer_sys::fuzz_target!(|data: &[u8]| flexnbd_fuzz::run("codec", data));
