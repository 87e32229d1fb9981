//! Pure decision code: no I/O, no clock reads, no globals, no runtime.
//! Everything here takes the world as values and returns what to do.

pub mod exit;
pub mod policy;
pub mod source;
