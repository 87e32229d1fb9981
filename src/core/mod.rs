//! Pure decision code: no I/O, no clock reads, no globals, no async
//! runtime. Callers feed events (and the time, as a value) and carry out the
//! effects they get back.

pub mod destination;
pub mod exit;
pub mod pace;
pub mod policy;
pub mod request;
pub mod source;
pub mod window;
