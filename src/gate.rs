//! The gate: a thread of its own, below the async workers, for the work a
//! server does for a stranger before it is a client: newstyle option
//! negotiation and the TLS handshake inside it.
//!
//! A TLS handshake is a burst of public-key work (a signature with the
//! server's key and the key exchange: about a millisecond for RSA-2048)
//! inside one poll. Done on the async workers, a burst of newcomers'
//! negotiations queues in front of every established client's next
//! request: rounds of 64 TLS handshakes cost a plaintext client beside
//! them 30 times its quiet p99 (`bench/hostile.py`, tls-burst). On the
//! gate they take their turns on one thread of their own, and the same
//! burst costs it nothing measurable (0.5 to 1.0 times).
//!
//! The thread also runs at nice 19, so that when the CPU is short the
//! clients already served come first. Its weight is then 15 against a
//! worker's 1024: a negotiation slows down under load but still moves, at
//! about 1.5 % of a busy CPU, well inside the handshake timeout. SCHED_IDLE
//! (weight 3) measured no better and would slow negotiations five times
//! more. A socket's readiness still comes from the runtime that owns it;
//! only the polling, and so the work, moves.

use std::future::Future;
use std::io;

/// A server's gate: its thread and the runtime on it, started with the
/// server (a thread that cannot start stops the server from starting,
/// rather than every connection later) and ended when dropped.
pub struct Gate {
    handle: tokio::runtime::Handle,
    /// Dropped with the gate: the thread's runtime ends, and with it any
    /// negotiation still on it.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

/// The name of the gate's thread, as `ps -L` and /proc show it.
pub const THREAD_NAME: &str = "flexnbd-gate";

/// Why work sent to the gate did not come back.
#[derive(Debug, thiserror::Error)]
#[error("the negotiation thread stopped before the negotiation ended")]
pub struct Stopped;

impl Gate {
    /// Starts the gate's thread and its runtime. Blocking (a thread
    /// start): call it before the server runs, off the async workers.
    pub fn start() -> io::Result<Gate> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (give, take) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                lower_priority();
                // Timers (the handshake timeout) and I/O of its own, for a
                // wrapped transport that sleeps or registers inside a poll.
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        let _ = give.send(Ok(rt.handle().clone()));
                        rt.block_on(async {
                            let _ = stopped.await;
                        });
                    }
                    Err(e) => {
                        let _ = give.send(Err(e));
                    }
                }
            })?;
        let handle = take
            .recv()
            .map_err(|_| io::Error::other("the gate thread ended before it started"))??;
        Ok(Gate {
            handle,
            _stop: stop,
        })
    }

    /// Runs `work` on the gate's thread and waits for it. Dropping the
    /// returned future (a timeout, the client's task aborted) ends `work`
    /// there too, dropping what it holds: a socket is closed. A panic in
    /// `work` goes on in the caller, as if it had run there.
    pub async fn run<F>(&self, work: F) -> Result<F::Output, Stopped>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let task = tokio_util::task::AbortOnDropHandle::new(self.handle.spawn(work));
        match task.await {
            Ok(output) => Ok(output),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(Stopped),
        }
    }
}

/// How much lower than the workers the gate runs.
pub const NICE: libc::c_int = 19;

/// Lowers the calling thread to [`NICE`]. If the kernel refuses, the
/// thread stays as it was: still correct, only less polite.
fn lower_priority() {
    // SAFETY: setpriority with this thread's own id changes only this
    // thread's nice value (Linux keeps one per thread).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, NICE);
    }
}
