//! Image I/O off the async workers.
//!
//! A read, write, punch or sync can block for as long as the disk likes
//! (a failing disk, a saturated array, a `slow` store fault). Run inline on a
//! tokio worker it would stall every task queued on that worker: other
//! clients, the control socket, signal handling, a running migration. Every
//! image operation therefore runs on tokio's blocking pool, through
//! [`run`], and the task that asked waits for it without holding a worker.
//!
//! The number of operations in flight at once is capped per image
//! ([`MAX_IN_FLIGHT`], held by the image's [`Offload`]),
//! so a burst of slow requests cannot grow the blocking pool without bound.
//! Each connection executes its requests in order (plus at most a bounded
//! number of deferred syncs), so the cap only bites when many connections
//! are waiting on the disk together. Payloads still move in pieces of at
//! most [`super::PIECE`] bytes: the buffer travels to the blocking thread
//! and back, it is never copied or duplicated.

use std::future::Future;
use std::io;
use std::sync::Arc;

use tokio::sync::Semaphore;

/// Image operations running on the blocking pool at once, per image. Past
/// this a new operation waits (asynchronously) for a slot.
pub const MAX_IN_FLIGHT: usize = 64;

/// The slots of one image's operations on the blocking pool.
#[derive(Clone, Debug)]
pub struct Offload {
    slots: Arc<Semaphore>,
}

impl Default for Offload {
    fn default() -> Offload {
        Offload::new(MAX_IN_FLIGHT)
    }
}

impl Offload {
    /// At most `limit` operations in flight at once.
    pub fn new(limit: usize) -> Offload {
        Offload {
            slots: Arc::new(Semaphore::new(limit)),
        }
    }

    /// Runs `f` (blocking image I/O) on the blocking pool and waits for it.
    /// The future holds a slot of its own, not a borrow of `self`.
    ///
    /// Fails only if the operation could not run to completion: the runtime
    /// is shutting down, or `f` panicked. Whatever `f` owned (a buffer) is
    /// then gone, which callers treat as fatal for the request's connection.
    pub fn run<T, F>(&self, f: F) -> impl Future<Output = io::Result<T>> + Send + 'static
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let slots = self.slots.clone();
        async move {
            let permit = slots
                .acquire_owned()
                .await
                .map_err(|_| io::Error::other("the image I/O pool is closed"))?;
            let result = tokio::task::spawn_blocking(f).await;
            drop(permit);
            result.map_err(|e| io::Error::other(format!("the image I/O thread failed: {e}")))
        }
    }
}

/// Runs `f` (blocking I/O of `image`) on the blocking pool, in one of the
/// image's slots ([`Offload::run`]).
pub fn run<T, F>(image: &super::Image, f: F) -> impl Future<Output = io::Result<T>> + Send + 'static
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    image.offload().run(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_blocked_operation_leaves_the_worker_free() {
        // On a single worker, a timer must still fire while an operation
        // blocks: the operation is not on the worker.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // Bounded: run inline, the operation would time out (false) rather
        // than hang the test.
        let blocked = tokio::spawn(
            Offload::default()
                .run(move || rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok()),
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        let _ = tx.send(());
        assert!(blocked.await.unwrap().unwrap());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn each_offload_has_its_own_slots() {
        // One image's operations filling its only slot leave another
        // image's free.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let busy = Offload::new(1);
        let held = tokio::spawn(
            busy.run(move || rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok()),
        );
        tokio::task::yield_now().await;
        let other = Offload::new(1);
        let done = tokio::time::timeout(std::time::Duration::from_secs(5), other.run(|| 7))
            .await
            .expect("the other image's slot was free");
        assert_eq!(done.unwrap(), 7);
        // The busy one is still full.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), busy.run(|| ()))
                .await
                .is_err(),
            "its only slot is held"
        );
        let _ = tx.send(());
        assert!(held.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn results_come_back() {
        let buf = Offload::default()
            .run(|| {
                let mut v = vec![0u8; 4];
                v[1] = 7;
                v
            })
            .await
            .unwrap();
        assert_eq!(buf, [0, 7, 0, 0]);
    }
}
