#![no_main]
//! `scripts/fuzz fault_plan SECONDS`: see flexnbd::fuzzing.

libfuzzer_sys::fuzz_target!(|data: &[u8]| flexnbd::fuzzing::run("fault_plan", data));
