//! Image I/O off the async workers.
//!
//! A read, write, punch or sync can block for as long as the disk likes
//! (a failing disk, a saturated array, a `slow` store fault). Run inline on a
//! tokio worker it would stall every task queued on that worker: other
//! clients, the control socket, signal handling, a running migration. Every
//! image operation therefore runs on tokio's blocking pool, through
//! [`run`], and the task that asked waits for it without holding a worker.
//!
//! The number of operations in flight at once is capped ([`MAX_IN_FLIGHT`]),
//! so a burst of slow requests cannot grow the blocking pool without bound.
//! Each connection executes its requests in order (plus at most a bounded
//! number of deferred syncs), so the cap only bites when many connections
//! are waiting on the disk together. Payloads still move in pieces of at
//! most [`super::PIECE`] bytes: the buffer travels to the blocking thread
//! and back, it is never copied or duplicated.

use std::io;

use tokio::sync::Semaphore;

/// Image operations running on the blocking pool at once, over the whole
/// process. Past this a new operation waits (asynchronously) for a slot.
pub const MAX_IN_FLIGHT: usize = 64;

static SLOTS: Semaphore = Semaphore::const_new(MAX_IN_FLIGHT);

/// Runs `f` (blocking image I/O) on the blocking pool and waits for it.
///
/// Fails only if the operation could not run to completion: the runtime is
/// shutting down, or `f` panicked. Whatever `f` owned (a buffer) is then
/// gone, which callers treat as fatal for the request's connection.
pub async fn run<T, F>(f: F) -> io::Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let permit = SLOTS
        .acquire()
        .await
        .map_err(|_| io::Error::other("the image I/O pool is closed"))?;
    let result = tokio::task::spawn_blocking(f).await;
    drop(permit);
    result.map_err(|e| io::Error::other(format!("the image I/O thread failed: {e}")))
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
        let blocked = tokio::spawn(run(move || {
            rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok()
        }));
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        let _ = tx.send(());
        assert!(blocked.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn results_come_back() {
        let buf = run(|| {
            let mut v = vec![0u8; 4];
            v[1] = 7;
            v
        })
        .await
        .unwrap();
        assert_eq!(buf, [0, 7, 0, 0]);
    }
}
