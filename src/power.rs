//! Power loss: what a power cut takes away, applied to the real files before
//! the process dies (the `powercut` fault action).
//!
//! A SIGKILL keeps the page cache, so a crash alone can never show whether an
//! fdatasync or fsync happened. With a plan that can cut power, the storage
//! seam records what is not yet durable; [`cut`] reverts exactly that, then
//! kills the process like `crash`.

pub use faults::PowerLoss;

/// Loses what a power cut may lose, then dies like SIGKILL.
pub fn cut(loss: PowerLoss) -> ! {
    let _ = loss;
    faults::crash_now()
}
