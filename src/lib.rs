//! flexnbd: an NBD server that live-migrates the image it serves.

pub mod log;

pub mod fault_apply;

pub mod acl;
pub mod client;
pub mod control;
pub mod core;
pub mod daemon;
pub mod fuzzing;
pub mod gate;
pub mod handoff;
pub mod mirror;
pub mod power;
pub mod probe;
pub mod proto;
pub mod proxy;
pub mod server;
pub mod signals;
pub mod sim;
pub mod status;
pub mod store;
pub mod tls;
pub mod transport;
