//! The acceptance suite: every test here runs the real `flexnbd` binary.

mod harness;

mod serve_wire;
