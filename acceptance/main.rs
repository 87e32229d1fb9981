//! The acceptance suite: every test here runs the real `flexnbd` binary,
//! except `hygiene`'s checks of the repository's own text.

mod harness;
mod hygiene;

mod fault_effects;
mod faults;

mod bad_input;
mod batching;
mod c_interop;
mod certs;
mod codec_props;
mod complete;

mod cli;
mod control;
mod convergence;
mod durability;
mod fakes;
mod fuzz_seeds;
mod hostile;
mod interop;
mod logging;
mod matrix;
mod migrate;
mod netns;
mod newstyle;
mod peers;
mod proxy;
mod proxy_tls;
mod resolve;
mod resume;
mod serve_wire;
mod slow_disk;
mod stall;
mod tls;
mod tls_migrate;
mod wan;
