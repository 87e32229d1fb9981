//! The acceptance suite: every test here runs the real `flexnbd` binary.

mod harness;

mod faults;

mod bad_input;
mod codec_props;

mod cli;
mod control;
mod newstyle;
mod peers;
mod serve_wire;
