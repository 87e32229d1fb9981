//! Applies a probe's verdict at a protocol step: the one place that turns an
//! [`Action`] into what happens on the connection.
//!
//! A fault logged as `fault fired` must have happened, so no connection code
//! interprets an `Action` itself: it hands the verdict to one of the
//! functions here, which do the part every step shares (sleep for `delay`,
//! end the process for `crash` and `powercut`, wait out `hang`, damage or cut
//! the message) and return an outcome the caller cannot mistake for "carry
//! on" ([`Ended`] is an error the caller wraps in its own error type).
//!
//! - send steps (announced just before a message goes out): [`send`] writes
//!   the message to a writer, [`reply`] acts on a reply already queued (in
//!   the server's reply writer, a [`Queued`]), and [`outgoing`] says what to
//!   write for callers that
//!   write the message themselves (under their own timeout, or streamed);
//! - receive steps (announced just after a message arrived): [`incoming`];
//! - steps without a message (accept, connect): [`event`].
//!
//! What each action means at each kind of step:
//!
//! | action | send step | receive step | step without a message |
//! |---|---|---|---|
//! | `drop` | not sent, connection stays open | ignored, the caller reads on | connection closed |
//! | `close` | closed instead of sending | closed | closed |
//! | `truncate(n)` | first n bytes sent, then closed | closed (its sender was cut off) | closed |
//! | `corrupt` | sent with its first byte flipped | rejected as damaged, closed | closed |
//! | `hang` | `hang` awaited, then [`How::Hung`] | same | same |
//! | `delay(d)` | sleep d, then sent | sleep d, then acted on | sleep d, then carry on |
//! | `crash` / `powercut` | the process dies | same | same |
//!
//! `hang` is a future given by the caller: whatever tears the connection
//! down at that site (the peer leaving, the site's own no-progress limit, an
//! enclosing timeout). A caller that must read from the very stream it was
//! writing to passes `std::future::ready(())` and holds the connection itself
//! on [`How::Hung`].
//!
//! Every function starts with `if action.is_pass()`: with the production
//! probe (`Quiet`, a constant `Pass`) the rest folds away, and a `Pass`
//! costs a branch and no allocation. The step's key is a closure so that
//! it is only formatted when a fault fired.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::io;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::probe::{Action, Probe, Step};

/// Replies queued for sending, which a send step's verdict acts on in
/// place (the server's reply writer).
pub trait Queued {
    /// Takes back everything queued from `mark` on.
    fn rollback(&mut self, mark: usize);
    /// Flips the byte at `at`.
    fn corrupt_byte(&mut self, at: usize);
    /// Sends the first `n` queued bytes and nothing more.
    fn send_truncated(&mut self, n: usize) -> impl Future<Output = io::Result<()>>;
}

/// Announces a step after a connection's last message (`disconnect_done`,
/// `disconnect_sent`). The plan language admits only `delay`, `crash` and
/// `powercut` there (`faults::plan::MILESTONE_STEPS`), and [`event`]
/// applies them like at any step without a message; its error (which those
/// actions never cause) has nothing left to close.
pub async fn milestone<P: Probe + ?Sized>(probe: &P, step: Step) {
    let _ = event(probe.step(step), || step.key(), std::future::ready(())).await;
}

/// How a fault ended a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// Closed instead of sending; closed after a receive-side `close` or
    /// `truncate`; or any of `drop`, `close`, `truncate`, `corrupt` at a
    /// step without a message.
    Closed,
    /// The first N bytes of the message were sent, then it was closed.
    Truncated(usize),
    /// No progress until the caller's `hang` future finished (or, with
    /// `ready`, the caller is to hold the connection now).
    Hung,
    /// A received message was taken as damaged (`corrupt` at a receive
    /// step): rejected as a bad magic would be, and the connection closed.
    Damaged,
}

/// A fault ended the connection at `key` (`side.step`, with no `#N`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("fault injection {how} at {key}")]
pub struct Ended {
    pub key: String,
    pub how: How,
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            How::Closed => f.write_str("closed the connection"),
            How::Truncated(n) => write!(f, "sent {n} bytes of the message, then closed"),
            How::Hung => f.write_str("hung the connection"),
            How::Damaged => f.write_str("rejected the message as damaged"),
        }
    }
}

/// A send step that did not complete: the write failed, or a fault ended it.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Fault(#[from] Ended),
}

/// What became of a message at a send step that did not end the connection.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    Sent,
    /// Not sent (`drop`); the connection stays open.
    Dropped,
}

/// What to write for a send step, for callers that write it themselves.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum Outgoing {
    /// The message as it is.
    Whole,
    /// The message with its first byte flipped ([`faults::corrupt`]).
    Corrupted,
    /// Nothing; the connection stays open.
    Dropped,
    /// The first `keep` bytes of the message (none for `close`), then shut
    /// the connection and end with the error.
    Cut { keep: usize, ended: Ended },
}

impl Outgoing {
    /// The bytes to send for `message`, or `None` for a dropped one. A
    /// `Cut` must be handled first (it ends the connection).
    pub fn bytes(self, message: &[u8]) -> Option<Cow<'_, [u8]>> {
        match self {
            Outgoing::Whole => Some(Cow::Borrowed(message)),
            Outgoing::Corrupted => {
                let mut owned = message.to_vec();
                faults::corrupt(&mut owned);
                Some(Cow::Owned(owned))
            }
            Outgoing::Dropped => None,
            Outgoing::Cut { keep, .. } => Some(Cow::Borrowed(&message[..keep.min(message.len())])),
        }
    }
}

/// What to do with a message at a receive step that did not end the
/// connection.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// Act on it.
    Proceed,
    /// Act as if it never arrived (`drop`): ignore it and read on.
    Ignore,
}

/// The parts every step shares: `delay`, `crash`, `powercut` and `hang`
/// (`Err` once `hang` finished). Returns the action when it is one of the
/// others, and `Pass` after a delay.
async fn common(action: Action, hang: impl Future<Output = ()>) -> Result<Action, How> {
    match action {
        Action::Delay(d) => {
            tokio::time::sleep(d).await;
            Ok(Action::Pass)
        }
        Action::Crash => faults::crash_now(),
        // A probe with a power-loss model cut at the step already
        // (`PlanProbe`); without one there is nothing to lose.
        Action::PowerCut(_) => crate::power::cut_without_model(),
        Action::Hang => {
            hang.await;
            Err(How::Hung)
        }
        other => Ok(other),
    }
}

/// The verdict at a send step, for a message the caller writes itself.
pub async fn outgoing(
    action: Action,
    key: impl FnOnce() -> String,
    hang: impl Future<Output = ()>,
) -> Result<Outgoing, Ended> {
    if action.is_pass() {
        return Ok(Outgoing::Whole);
    }
    outgoing_fault(action, key, hang).await
}

async fn outgoing_fault(
    action: Action,
    key: impl FnOnce() -> String,
    hang: impl Future<Output = ()>,
) -> Result<Outgoing, Ended> {
    let (keep, how) = match common(action, hang).await {
        Err(how) => return Err(Ended { key: key(), how }),
        Ok(Action::Drop) => return Ok(Outgoing::Dropped),
        Ok(Action::Corrupt) => return Ok(Outgoing::Corrupted),
        Ok(Action::Close) => (0, How::Closed),
        Ok(Action::Truncate(n)) => (n, How::Truncated(n)),
        // `common` handled the others; what is left is a pass.
        Ok(_) => return Ok(Outgoing::Whole),
    };
    Ok(Outgoing::Cut {
        keep,
        ended: Ended { key: key(), how },
    })
}

/// Writes all of `message` and flushes: over TLS, `write_all` may leave the
/// last records queued in the session when the socket is full, and the peer
/// would wait for them forever. A plain socket's flush does nothing.
async fn write_flushed<W: AsyncWrite + Unpin>(out: &mut W, message: &[u8]) -> io::Result<()> {
    out.write_all(message).await?;
    out.flush().await
}

/// Sends `message` on `out` under a send step's verdict. A cut message
/// (`close`, `truncate`) shuts `out` down after its prefix.
pub async fn send<W: AsyncWrite + Unpin>(
    action: Action,
    key: impl FnOnce() -> String,
    out: &mut W,
    message: &[u8],
    hang: impl Future<Output = ()>,
) -> Result<Sent, SendError> {
    if action.is_pass() {
        write_flushed(out, message).await?;
        return Ok(Sent::Sent);
    }
    let verdict = outgoing_fault(action, key, hang).await?;
    if let Outgoing::Cut { keep, ended } = verdict {
        // The prefix is best effort: the fault is what ends the connection,
        // whether or not the peer was still there to take the bytes.
        let _ = out.write_all(&message[..keep.min(message.len())]).await;
        let _ = out.shutdown().await;
        return Err(ended.into());
    }
    match verdict.bytes(message) {
        Some(bytes) => {
            write_flushed(out, &bytes).await?;
            Ok(Sent::Sent)
        }
        None => Ok(Sent::Dropped),
    }
}

/// Applies a send step's verdict to the reply queued in `w` from `mark` on:
/// dropped replies are taken back, corrupted ones damaged in place,
/// truncated ones sent cut short. Replies queued before `mark` are sent
/// before a `close`. The caller shuts the connection down on an error.
pub(crate) async fn reply<Q: Queued>(
    action: Action,
    key: impl FnOnce() -> String,
    w: &mut Q,
    mark: usize,
    hang: impl Future<Output = ()>,
) -> Result<(), SendError> {
    if action.is_pass() {
        return Ok(());
    }
    let verdict = match outgoing_fault(action, key, hang).await {
        Ok(v) => v,
        Err(ended) => {
            w.rollback(mark);
            return Err(ended.into());
        }
    };
    match verdict {
        Outgoing::Whole => {}
        Outgoing::Corrupted => w.corrupt_byte(mark),
        Outgoing::Dropped => w.rollback(mark),
        Outgoing::Cut { keep, ended } => {
            w.send_truncated(mark + keep).await?;
            return Err(ended.into());
        }
    }
    Ok(())
}

/// The verdict at a receive step.
pub async fn incoming(
    action: Action,
    key: impl FnOnce() -> String,
    hang: impl Future<Output = ()>,
) -> Result<Incoming, Ended> {
    if action.is_pass() {
        return Ok(Incoming::Proceed);
    }
    let how = match common(action, hang).await {
        Err(how) => how,
        Ok(Action::Drop) => return Ok(Incoming::Ignore),
        Ok(Action::Corrupt) => How::Damaged,
        Ok(Action::Close | Action::Truncate(_)) => How::Closed,
        Ok(_) => return Ok(Incoming::Proceed),
    };
    Err(Ended { key: key(), how })
}

/// The verdict at a step without a message (accept, connect): there is
/// nothing to drop, cut or damage, so those close the connection.
pub async fn event(
    action: Action,
    key: impl FnOnce() -> String,
    hang: impl Future<Output = ()>,
) -> Result<(), Ended> {
    if action.is_pass() {
        return Ok(());
    }
    let how = match common(action, hang).await {
        Err(how) => how,
        Ok(Action::Drop | Action::Close | Action::Truncate(_) | Action::Corrupt) => How::Closed,
        Ok(_) => return Ok(()),
    };
    Err(Ended { key: key(), how })
}

/// The store's faults come from the plan: `store.<step>` keys.
impl crate::store::FaultHook for crate::probe::PlanProbe {
    fn before(&self, op: crate::store::StoreOp, at: Option<(u64, u64)>) -> io::Result<()> {
        let fault = self.store_at(store_step(op), at);
        crate::probe::apply_store_fault(fault, self.power().map(|p| p.as_ref()))
    }

    fn covers(&self, op: crate::store::StoreOp) -> bool {
        let name = store_step(op).name();
        self.plan()
            .entries()
            .iter()
            .any(|e| e.key.side == faults::plan::Side::Store && e.key.step == name)
    }
}

fn store_step(op: crate::store::StoreOp) -> crate::probe::StoreStep {
    use crate::probe::StoreStep;
    use crate::store::StoreOp;
    match op {
        StoreOp::Read => StoreStep::Read,
        StoreOp::Write => StoreStep::Write,
        StoreOp::Sync => StoreStep::Sync,
        StoreOp::MapScan => StoreStep::MapScan,
        StoreOp::Marker => StoreStep::Marker,
        StoreOp::Checkpoint => StoreStep::Checkpoint,
        StoreOp::Record => StoreStep::Record,
        StoreOp::Unlink => StoreStep::Unlink,
    }
}

/// An instance's storage stack under a fault plan, wired in this one place:
/// the power-loss recorder on the image and under the file operations when
/// the plan can cut power (its model is the probe's), and the plan's store
/// faults in front of both.
pub fn storage_stack(probe: &std::sync::Arc<crate::probe::PlanProbe>) -> crate::store::Stack {
    use crate::store::{Disk, FaultHook, FileOps, Layer, Stack};
    use std::sync::Arc;
    let hook: Arc<dyn FaultHook> = probe.clone();
    let (layers, files): (Vec<Arc<dyn Layer>>, Arc<dyn FileOps>) = match probe.power() {
        Some(power) => (vec![power.clone()], power.files()),
        None => (Vec::new(), Arc::new(Disk)),
    };
    Stack {
        layers,
        faults: Some(hook.clone()),
        files: Arc::new(crate::store::faults::FaultedFiles::new(files, hook)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key() -> String {
        "server.greeting_send".into()
    }

    async fn sent(action: Action) -> (Result<Sent, SendError>, Vec<u8>) {
        let mut out = Vec::new();
        let r = send(action, key, &mut out, b"NBDMAGIC", std::future::ready(())).await;
        (r, out)
    }

    /// Over TLS a message bigger than the pipe leaves records inside the
    /// session when `write_all` returns; `send` must push them out, or a
    /// peer waiting for the whole message waits for good. Both the plain
    /// path and a fault's changed bytes (`corrupt`) go through it.
    #[tokio::test]
    async fn a_message_sent_over_tls_reaches_the_peer_in_full() {
        use tokio::io::AsyncReadExt;
        for action in [Action::Pass, Action::Corrupt] {
            let (mut ours, mut theirs) = crate::tls::test_pair(4096).await;
            let message: Vec<u8> = (0..1024 * 1024u32).map(|i| i as u8).collect();
            let len = message.len();
            let peer = tokio::spawn(async move {
                let mut got = vec![0; len];
                theirs.read_exact(&mut got).await.map(|_| got)
            });
            let r = send(action, key, &mut ours, &message, std::future::ready(())).await;
            assert_eq!(r.unwrap(), Sent::Sent);
            // `ours` stays open: only what `send` pushed out may arrive.
            let got = tokio::time::timeout(Duration::from_secs(10), peer).await;
            let got = match got {
                Ok(Ok(Ok(bytes))) => bytes,
                other => panic!("{action:?}: the peer did not get the whole message: {other:?}"),
            };
            assert_eq!(got[1..], message[1..], "{action:?}");
            drop(ours);
        }
    }

    #[tokio::test]
    async fn send_does_what_each_action_says() {
        let (r, out) = sent(Action::Pass).await;
        assert_eq!((r.unwrap(), out.as_slice()), (Sent::Sent, &b"NBDMAGIC"[..]));
        let (r, out) = sent(Action::Delay(Duration::from_millis(1))).await;
        assert_eq!((r.unwrap(), out.as_slice()), (Sent::Sent, &b"NBDMAGIC"[..]));
        let (r, out) = sent(Action::Drop).await;
        assert_eq!((r.unwrap(), out.len()), (Sent::Dropped, 0));
        let (r, out) = sent(Action::Corrupt).await;
        assert_eq!(r.unwrap(), Sent::Sent);
        assert_eq!((out[0], &out[1..]), (!b'N', &b"BDMAGIC"[..]));
        let (r, out) = sent(Action::Truncate(3)).await;
        assert_eq!(out, b"NBD");
        match r {
            Err(SendError::Fault(e)) => assert_eq!(e.how, How::Truncated(3)),
            other => panic!("{other:?}"),
        }
        let (r, out) = sent(Action::Truncate(100)).await;
        assert_eq!(
            out, b"NBDMAGIC",
            "a cut longer than the message sends it all"
        );
        assert!(matches!(r, Err(SendError::Fault(_))));
        let (r, out) = sent(Action::Close).await;
        assert!(out.is_empty());
        match r {
            Err(SendError::Fault(e)) => {
                assert_eq!(e.how, How::Closed);
                assert_eq!(
                    e.to_string(),
                    "fault injection closed the connection at server.greeting_send"
                );
            }
            other => panic!("{other:?}"),
        }
        let (r, out) = sent(Action::Hang).await;
        assert!(out.is_empty());
        assert!(matches!(
            r,
            Err(SendError::Fault(Ended { how: How::Hung, .. }))
        ));
    }

    #[tokio::test]
    async fn a_hang_waits_for_the_callers_future() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let hang = async {
            let _ = rx.await;
        };
        let verdict = tokio::spawn(async move { outgoing(Action::Hang, key, hang).await });
        tokio::task::yield_now().await;
        assert!(!verdict.is_finished(), "a hang must not end by itself");
        tx.send(()).unwrap();
        let r = verdict.await.unwrap();
        assert_eq!(r.unwrap_err().how, How::Hung);
    }

    #[tokio::test]
    async fn receive_steps_ignore_drop_and_close_on_cut_or_damage() {
        let ready = std::future::ready;
        let at = |a| incoming(a, key, ready(()));
        assert_eq!(at(Action::Pass).await.unwrap(), Incoming::Proceed);
        let delay = Action::Delay(Duration::from_millis(1));
        assert_eq!(at(delay).await.unwrap(), Incoming::Proceed);
        assert_eq!(at(Action::Drop).await.unwrap(), Incoming::Ignore);
        assert_eq!(at(Action::Close).await.unwrap_err().how, How::Closed);
        assert_eq!(at(Action::Truncate(4)).await.unwrap_err().how, How::Closed);
        assert_eq!(at(Action::Corrupt).await.unwrap_err().how, How::Damaged);
        assert_eq!(at(Action::Hang).await.unwrap_err().how, How::Hung);
    }

    #[tokio::test]
    async fn steps_without_a_message_close_for_anything_that_needs_one() {
        let at = |a| event(a, key, std::future::ready(()));
        assert!(at(Action::Pass).await.is_ok());
        assert!(at(Action::Delay(Duration::from_millis(1))).await.is_ok());
        for a in [
            Action::Drop,
            Action::Close,
            Action::Truncate(1),
            Action::Corrupt,
        ] {
            assert_eq!(at(a).await.unwrap_err().how, How::Closed, "{a:?}");
        }
        assert_eq!(at(Action::Hang).await.unwrap_err().how, How::Hung);
    }

    #[tokio::test]
    async fn a_reply_is_dropped_corrupted_or_cut_in_the_writer() {
        /// Queued bytes and what went out.
        #[derive(Default)]
        struct Queue {
            queued: Vec<u8>,
            sent: Vec<u8>,
        }
        impl Queued for Queue {
            fn rollback(&mut self, mark: usize) {
                self.queued.truncate(mark);
            }
            fn corrupt_byte(&mut self, at: usize) {
                self.queued[at] = !self.queued[at];
            }
            async fn send_truncated(&mut self, n: usize) -> io::Result<()> {
                self.sent.extend(self.queued.drain(..).take(n));
                Ok(())
            }
        }
        async fn with(action: Action) -> (Result<(), SendError>, Vec<u8>) {
            let mut w = Queue::default();
            w.queued.extend_from_slice(b"earlier");
            let mark = w.queued.len();
            w.queued.extend_from_slice(b"REPLY");
            let r = reply(action, key, &mut w, mark, std::future::ready(())).await;
            if r.is_ok() {
                let all = w.queued.len();
                w.send_truncated(all).await.unwrap();
            }
            (r, w.sent)
        }
        let (r, out) = with(Action::Pass).await;
        assert_eq!((r.is_ok(), out.as_slice()), (true, &b"earlierREPLY"[..]));
        let (r, out) = with(Action::Drop).await;
        assert_eq!((r.is_ok(), out.as_slice()), (true, &b"earlier"[..]));
        let (r, out) = with(Action::Corrupt).await;
        assert!(r.is_ok());
        assert_eq!(out[7], !b'R');
        let (r, out) = with(Action::Truncate(2)).await;
        assert!(r.is_err());
        assert_eq!(out, b"earlierRE");
        let (r, out) = with(Action::Close).await;
        assert!(r.is_err());
        assert_eq!(out, b"earlier", "replies before a closed one still go out");
    }

    /// No connection code interprets an `Action` by hand: only this module
    /// turns one into what happens (the probe decides, the store has its
    /// own faults, `power` is the power cut itself). A new step that
    /// matched on `Action` could log a fault it never applied.
    #[test]
    fn actions_are_applied_only_here() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let allowed = ["fault_apply.rs", "probe.rs", "power.rs"];
        let mut stack = vec![root.clone()];
        let mut offenders = Vec::new();
        let mut seen = 0;
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if !name.ends_with(".rs") || allowed.contains(&name.as_str()) && dir == root {
                    continue;
                }
                seen += 1;
                let text = std::fs::read_to_string(&path).unwrap();
                for (n, line) in text.lines().enumerate() {
                    let hand_made = line.split("Action::").skip(1).any(|rest| {
                        // `Action::Pass` as a default verdict is a
                        // decision, not an application.
                        !rest.starts_with("Pass")
                    }) || line.contains("crash_now(")
                        || line.contains("power::cut(");
                    // `MirrorAction::` is a different type.
                    let other_type = line.contains("MirrorAction::")
                        && !line.replace("MirrorAction::", "").contains("Action::");
                    if hand_made && !other_type {
                        offenders.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                    }
                }
            }
        }
        assert!(
            seen > 20,
            "only {seen} files scanned under {}",
            root.display()
        );
        assert!(
            offenders.is_empty(),
            "apply actions through crate::fault_apply instead:\n{}",
            offenders.join("\n")
        );
    }
}
