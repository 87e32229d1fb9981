//! The source's connection to the destination: requests are pipelined (many
//! in flight) and a reply task matches replies to them by handle.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::policy::{Capacity, CostModel};
use crate::fault_apply::{self, How, Incoming, Outgoing};
use crate::probe::{Probe, Step};
use crate::proto::{self, cmd, Request, SimpleReply};
use crate::transport::Stream;

/// The in-flight window (`core::window`): its room in units.
use crate::core::window::{self, Window};

#[derive(Clone, Debug, thiserror::Error)]
pub enum PipeError {
    #[error("the destination closed the connection")]
    Closed,
    #[error("no progress for {0:.1} s (request timeout)")]
    Timeout(f64),
    #[error("bad reply magic: expected 0x{expected:08x}, got 0x{0:08x}", expected = proto::SIMPLE_REPLY_MAGIC)]
    BadMagic(u32),
    #[error("reply to handle 0x{0:016x}, which no request in flight has")]
    UnknownHandle(u64),
    #[error("the destination answered {kind} at {offset} with error {error}")]
    ErrorReply {
        kind: &'static str,
        offset: u64,
        error: u32,
    },
    #[error("connection to the destination failed: {0}")]
    Io(String),
    #[error("fault injection closed the connection at {0}")]
    Fault(String),
}

enum Pending {
    /// A write or write-zeroes; holds its window slot until answered.
    Data {
        kind: u16,
        offset: u64,
        len: u64,
        /// When it started going out.
        sent: Instant,
        /// Whether its service time goes into the cost model: only writes
        /// of image data, not zeros for holes (which a destination may skip).
        measure: bool,
        slot: OwnedSemaphorePermit,
    },
    /// A request whose error code the caller wants (FLUSH, ENTRUST,
    /// CHECKPOINT), and the `payload` bytes that follow a reply of 0
    /// (RESUME's checkpoint).
    Call {
        kind: u16,
        sent: Instant,
        payload: usize,
        tx: oneshot::Sender<(u32, Vec<u8>)>,
        /// An error answer fails the pipe, as a write's does (a
        /// checkpoint sent without waiting: nobody waits for its answer
        /// to act on the error).
        fails: bool,
        /// Its offset field, for the error.
        offset: u64,
    },
}

struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    /// Signalled whenever the last request in flight is answered.
    idle: Notify,
    failure: Mutex<Option<PipeError>>,
    failed: CancellationToken,
    /// The destination's speed, as its replies show it.
    costs: Mutex<CostModel>,
    /// How many bytes of requests may be in flight, and its room (in
    /// `window::UNIT`s): the reply task grows it as replies show.
    window: Mutex<Window>,
    room: Arc<Semaphore>,
    /// The quickest reply so far, in microseconds from its request's
    /// sending (`u64::MAX`: none yet): the connection's round trip, as
    /// near as its replies show it.
    round_trip_us: AtomicU64,
    /// The failure came with every request answered without error (the
    /// destination closed after its last reply, say): nothing sent was
    /// lost to it.
    failed_idle: AtomicBool,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn timed(&self, sent: Instant, now: Instant) {
        let us = now.saturating_duration_since(sent).as_micros() as u64;
        self.round_trip_us.fetch_min(us, Ordering::AcqRel);
    }

    /// Records a request awaiting its reply, unless the pipe has failed:
    /// the reader may have met the end of the connection before this
    /// request was sent, and would then never drop its answer's sender
    /// (the caller would wait out the whole no-progress limit). Checked
    /// under the map's lock, after `fail` set the failure and before it
    /// clears the map, so one of the two always sees the other.
    fn track(&self, handle: u64, pending: Pending) -> Result<(), PipeError> {
        let mut map = self.pending();
        if let Some(e) = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(e);
        }
        map.insert(handle, pending);
        Ok(())
    }

    fn fail(&self, e: PipeError) {
        // The map's lock first, as `track` takes them.
        let mut pending = self.pending();
        let mut slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let idle = pending.is_empty() && !matches!(e, PipeError::ErrorReply { .. });
            self.failed_idle.store(idle, Ordering::Release);
            *slot = Some(e);
        }
        drop(slot);
        pending.clear();
        drop(pending);
        self.failed.cancel();
        self.idle.notify_waiters();
    }

    fn error(&self) -> PipeError {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or(PipeError::Closed)
    }
}

/// A request's answer to come ([`Pipe::request`]).
pub struct Answer(oneshot::Receiver<(u32, Vec<u8>)>);

/// What [`Pipe::poll_checkpoint`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum CheckpointAnswer {
    /// Not answered yet.
    Waiting,
    /// Answered 0 with every request sent before it answered without
    /// error (`held`), or with some of them still in flight (not `held`:
    /// what it covers cannot be counted on). `sync`: its time past the
    /// connection's round trip: the destination's sync, and the link's
    /// time for what went ahead of it. (Not timed from the answers to the
    /// requests before it: a destination may send those in one batch with
    /// its own.)
    Answered { held: bool, sync: Duration },
    /// The pipe failed first (an error answer to the checkpoint fails it).
    Failed,
}

pub struct Pipe<S: Stream, P: Probe> {
    probe: Arc<P>,
    writer: S::Write,
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    next_handle: u64,
    limit: Duration,
    zeros: Vec<u8>,
    /// Changes (WRITE, WRITE_ZEROES) sent so far, answered or not: what
    /// ENTRUST tells the destination.
    changes_sent: u64,
}

impl<S: Stream, P: Probe> Drop for Pipe<S, P> {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl<S: Stream, P: Probe> Pipe<S, P> {
    pub fn new(stream: S, limit: Duration, probe: Arc<P>) -> Pipe<S, P> {
        let (read, writer) = stream.into_split();
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            idle: Notify::new(),
            failure: Mutex::new(None),
            failed: CancellationToken::new(),
            costs: Mutex::new(CostModel::default()),
            window: Mutex::new(Window::new()),
            room: Arc::new(Semaphore::new((window::START / window::UNIT) as usize)),
            round_trip_us: AtomicU64::new(u64::MAX),
            failed_idle: AtomicBool::new(false),
        });
        let reader = tokio::spawn(read_replies::<S, P>(
            read,
            shared.clone(),
            limit,
            probe.clone(),
        ));
        Pipe {
            probe,
            writer,
            shared,
            reader,
            next_handle: 1,
            limit,
            zeros: Vec::new(),
            changes_sent: 0,
        }
    }

    /// A buffer of `n` bytes to read data into.
    pub fn buffer(&self, n: usize) -> Vec<u8> {
        vec![0u8; n]
    }

    /// Data requests in flight: how many, and their bytes.
    pub fn in_flight(&self) -> (u64, u64) {
        self.shared
            .pending()
            .values()
            .fold((0, 0), |(n, bytes), p| match p {
                Pending::Data { len, .. } => (n + 1, bytes + len),
                Pending::Call { .. } => (n, bytes),
            })
    }

    /// Of the data in flight, the bytes still queued `now` for the
    /// slower of the link and the destination (`capacity`: each request
    /// takes `capacity.time(1, len)`), served in the order they were sent:
    /// the last request is through when the latest of (a request's sending
    /// plus the time of it and those after it) comes. A request sent a round
    /// trip ago at a rate the link keeps up with is past it; a pass's burst
    /// sent just now is all still queued; so are 4 KiB writes to a
    /// destination that takes a millisecond each. All of it without a
    /// capacity, or with one that sees no cost per write: such a model has
    /// seen only writes of one size and cannot tell a destination that
    /// takes its writes one by one (counting all of it is what kept the
    /// lock-out short there before).
    pub fn queued(&self, capacity: Option<Capacity>, now: Instant) -> u64 {
        let mut sent: Vec<(Instant, u64)> = self
            .shared
            .pending()
            .values()
            .filter_map(|p| match p {
                Pending::Data { sent, len, .. } => Some((*sent, *len)),
                Pending::Call { .. } => None,
            })
            .collect();
        let total: u64 = sent.iter().map(|(_, len)| len).sum();
        match capacity {
            Some(c) if c.destination.per_request > 0.0 && c.rate > 0.0 => {
                queued_at(&mut sent, |len| c.time(1, len), now)
            }
            _ => total,
        }
    }

    /// What the destination's replies have shown of its speed so far.
    pub fn costs(&self) -> CostModel {
        self.shared
            .costs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn check(&self) -> Result<(), PipeError> {
        if self.shared.failed.is_cancelled() {
            Err(self.shared.error())
        } else {
            Ok(())
        }
    }

    /// Room in the window for a request of `len` bytes (`payload`: they
    /// travel with it); waits while the window is full, and says so to it.
    async fn slot(&self, len: u64, payload: bool) -> Result<OwnedSemaphorePermit, PipeError> {
        let units = window::units(len, payload);
        let room = self.shared.room.clone();
        if let Ok(permit) = room.clone().try_acquire_many_owned(units) {
            return Ok(permit);
        }
        self.shared.window().full();
        tokio::select! {
            biased;
            _ = self.shared.failed.cancelled() => Err(self.shared.error()),
            permit = room.acquire_many_owned(units) => Ok(permit.expect("the room is never closed")),
        }
    }

    /// The connection's round trip: the quickest reply so far (zero
    /// before the first).
    pub fn round_trip(&self) -> Duration {
        match self.shared.round_trip_us.load(Ordering::Acquire) {
            u64::MAX => Duration::ZERO,
            us => Duration::from_micros(us),
        }
    }

    /// The window now, in bytes.
    pub fn window(&self) -> u64 {
        self.shared.window().bytes()
    }

    /// Applies a probe verdict to one message about to be sent: the bytes
    /// to send (borrowed unless corrupted), or none for a dropped message.
    /// A message cut short goes out after `before` (a payload's header, so
    /// the peer sees a cut-off write rather than stray bytes).
    async fn verdict<'m>(
        &mut self,
        step: Step,
        before: &[u8],
        message: &'m [u8],
    ) -> Result<Option<Cow<'m, [u8]>>, PipeError> {
        let limit = self.limit;
        // Stalled: the no-progress limit is what ends it.
        let hang = async { tokio::time::sleep(limit).await };
        let e = match fault_apply::outgoing(self.probe.step(step), || step.key(), hang).await {
            Ok(Outgoing::Cut { keep, ended }) => {
                let _ = self.writer.write_all(before).await;
                let _ = self
                    .writer
                    .write_all(&message[..keep.min(message.len())])
                    .await;
                let _ = self.writer.shutdown().await;
                PipeError::Fault(ended.key)
            }
            Ok(verdict) => return Ok(verdict.bytes(message)),
            Err(_hung) => PipeError::Timeout(limit.as_secs_f64()),
        };
        self.shared.fail(e.clone());
        Err(e)
    }

    async fn send(&mut self, kind: u16, header: &[u8], payload: &[u8]) -> Result<(), PipeError> {
        let Some(header) = self
            .verdict(Step::MirrorRequestSend { kind }, &[], header)
            .await?
        else {
            return Ok(()); // dropped: the reply never comes, the timeout notices
        };
        let payload = if payload.is_empty() {
            Some(Cow::Borrowed(payload))
        } else {
            // Dropped: the header alone goes out; the destination waits for
            // the payload and the timeout notices.
            self.verdict(Step::MirrorPayloadSend { kind }, &header, payload)
                .await?
        };
        self.put(&header, payload.as_deref().unwrap_or_default())
            .await
    }

    /// Writes `header` then `payload`, within one no-progress limit.
    async fn put(&mut self, header: &[u8], payload: &[u8]) -> Result<(), PipeError> {
        let io = async {
            // Header and payload in one system call where the stream takes
            // vectored writes (TCP does): a sweep through a hole that
            // clients scattered blocks into sends a request per 4 KiB, and
            // a call per part was a third of the source's CPU there.
            let mut parts = [IoSlice::new(header), IoSlice::new(payload)];
            let mut parts = &mut parts[..];
            IoSlice::advance_slices(&mut parts, 0);
            while !parts.is_empty() {
                let n = self.writer.write_vectored(parts).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                IoSlice::advance_slices(&mut parts, n);
            }
            // Over TLS the last records may still be queued in the session
            // after write_all (the socket was full): flush them, or the
            // destination could wait for them while we wait for its reply.
            // A plain socket's flush does nothing.
            self.writer.flush().await?;
            Ok::<(), std::io::Error>(())
        };
        match tokio::time::timeout(self.limit, io).await {
            Err(_) => {
                let e = PipeError::Timeout(self.limit.as_secs_f64());
                self.shared.fail(e.clone());
                Err(e)
            }
            Ok(Err(e)) => {
                let e = PipeError::Io(e.to_string());
                self.shared.fail(e.clone());
                Err(e)
            }
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Changes sent so far on this connection (a dropped one counts: it
    /// was meant to arrive).
    pub fn changes_sent(&self) -> u64 {
        self.changes_sent
    }

    fn handle(&mut self) -> u64 {
        let h = self.next_handle;
        self.next_handle += 1;
        h
    }

    /// Sends a WRITE; returns once it is on its way (the reply comes later).
    /// `measure`: its service time goes into the cost model.
    pub async fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        measure: bool,
    ) -> Result<(), PipeError> {
        let len = data.len() as u64;
        let slot = self.slot(len, true).await?;
        let handle = self.handle();
        self.shared.track(
            handle,
            Pending::Data {
                kind: cmd::WRITE,
                offset,
                len,
                sent: Instant::now(),
                measure,
                slot,
            },
        )?;
        let header = Request::new(cmd::WRITE, 0, handle, offset, data.len() as u32).encode();
        self.changes_sent += 1;
        self.send(cmd::WRITE, &header, data).await?;
        self.check()
    }

    /// Sends a WRITE of `n` zero bytes (not measured: zeros for a hole,
    /// which a destination may skip), from zeros kept between calls rather
    /// than allocated and filled for each.
    pub async fn write_zeros(&mut self, offset: u64, n: usize) -> Result<(), PipeError> {
        // Out of the pipe while `write` borrows it; a call cancelled part-way
        // drops them, and the next call makes them again.
        let mut zeros = std::mem::take(&mut self.zeros);
        if zeros.len() < n {
            zeros = vec![0u8; n];
        }
        let sent = self.write(offset, &zeros[..n], false).await;
        self.zeros = zeros;
        sent
    }

    /// Sends a WRITE_ZEROES (which may punch a hole).
    pub async fn zeroes(&mut self, offset: u64, len: u32) -> Result<(), PipeError> {
        let slot = self.slot(u64::from(len), false).await?;
        let handle = self.handle();
        self.shared.track(
            handle,
            Pending::Data {
                kind: cmd::WRITE_ZEROES,
                offset,
                len: u64::from(len),
                sent: Instant::now(),
                measure: false,
                slot,
            },
        )?;
        let header = Request::new(cmd::WRITE_ZEROES, 0, handle, offset, len).encode();
        self.changes_sent += 1;
        self.send(cmd::WRITE_ZEROES, &header, &[]).await?;
        self.check()
    }

    /// Waits until every request sent so far is answered without error.
    /// A connection that ended after the last of them was answered lost
    /// nothing: that is success too (ENTRUST is waited out this way, and a
    /// destination may close right after answering it).
    pub async fn wait_idle(&mut self) -> Result<(), PipeError> {
        loop {
            let notified = self.shared.idle.notified();
            if self.shared.failed.is_cancelled() {
                if self.shared.failed_idle.load(Ordering::Acquire) {
                    return Ok(());
                }
                return Err(self.shared.error());
            }
            if self.shared.pending().is_empty() {
                return Ok(());
            }
            notified.await;
        }
    }

    /// Sends a request without payload, with `offset` and `length`, and
    /// waits for its error code and, when that is 0, the `payload` bytes
    /// that follow the reply.
    pub async fn call_with(
        &mut self,
        kind: u16,
        offset: u64,
        length: u32,
        payload: usize,
    ) -> Result<(u32, Vec<u8>), PipeError> {
        let answer = self.request(kind, offset, length, payload).await?;
        self.answer(answer).await
    }

    /// Sends a request as [`Pipe::call_with`] does, without waiting for
    /// its answer: [`Pipe::answer`] waits for it, so several can be in
    /// flight.
    pub async fn request(
        &mut self,
        kind: u16,
        offset: u64,
        length: u32,
        payload: usize,
    ) -> Result<Answer, PipeError> {
        self.request_failing(kind, offset, length, payload, false)
            .await
    }

    /// Sends a CHECKPOINT without waiting for its answer: the copy goes on
    /// while the destination syncs. An error answer fails the pipe;
    /// [`Pipe::poll_checkpoint`] tells whether it has been answered.
    pub async fn checkpoint(
        &mut self,
        migration: u64,
        checkpoint: u32,
    ) -> Result<Answer, PipeError> {
        self.request_failing(cmd::CHECKPOINT, migration, checkpoint, 0, true)
            .await
    }

    async fn request_failing(
        &mut self,
        kind: u16,
        offset: u64,
        length: u32,
        payload: usize,
        fails: bool,
    ) -> Result<Answer, PipeError> {
        let (tx, rx) = oneshot::channel();
        let handle = self.handle();
        self.shared.track(
            handle,
            Pending::Call {
                kind,
                sent: Instant::now(),
                payload,
                tx,
                fails,
                offset,
            },
        )?;
        let header = Request::new(kind, 0, handle, offset, length).encode();
        self.send(kind, &header, &[]).await?;
        Ok(Answer(rx))
    }

    /// Whether a checkpoint sent with [`Pipe::checkpoint`] has been
    /// answered, without waiting. It holds what it covers only if every
    /// request sent before it was answered without error too: a write
    /// the destination never saw (or failed and whose error answer is
    /// still to come) must not count as held. A failure is sticky and an
    /// error answer fails the pipe, so "not failed and none earlier in
    /// flight", as the reply task found when the answer came, is exactly
    /// that. The pipe may fail after it: that takes nothing back.
    pub fn poll_checkpoint(&self, answer: &mut Answer) -> CheckpointAnswer {
        match answer.0.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => CheckpointAnswer::Waiting,
            Err(oneshot::error::TryRecvError::Closed) => CheckpointAnswer::Failed,
            Ok((error, _)) if error != 0 => CheckpointAnswer::Failed,
            Ok((_, answer)) => {
                // The reply task's verdict and timing, as it packed them.
                let us = answer
                    .get(1..9)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u64::from_le_bytes);
                CheckpointAnswer::Answered {
                    held: answer.first() == Some(&1),
                    sync: Duration::from_micros(us),
                }
            }
        }
    }

    /// The error code of a request sent with [`Pipe::request`], and its
    /// payload when that is 0; the no-progress limit bounds the wait.
    pub async fn answer(&self, Answer(rx): Answer) -> Result<(u32, Vec<u8>), PipeError> {
        match tokio::time::timeout(self.limit, rx).await {
            Err(_) => {
                let e = PipeError::Timeout(self.limit.as_secs_f64());
                self.shared.fail(e.clone());
                Err(e)
            }
            Ok(Err(_)) => Err(self.shared.error()),
            Ok(Ok(error)) => Ok(error),
        }
    }

    /// Sends DISCONNECT (no reply is expected) and closes the connection.
    pub async fn disconnect(mut self) -> Result<(), PipeError> {
        let header = Request::new(cmd::DISC, 0, crate::client::random_handle(), 0, 0).encode();
        self.send(cmd::DISC, &header, &[]).await?;
        let limit = self.limit;
        match tokio::time::timeout(limit, self.writer.shutdown()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(PipeError::Io(e.to_string())),
            Err(_) => Err(PipeError::Timeout(limit.as_secs_f64())),
        }
    }
}

async fn read_replies<S: Stream, P: Probe>(
    mut read: S::Read,
    shared: Arc<Shared>,
    limit: Duration,
    probe: Arc<P>,
) {
    let mut header = [0u8; proto::SIMPLE_REPLY_LEN];
    // When the previous reply came: a destination that handles requests one
    // at a time starts on the next one then, or when it arrives if later.
    let mut last_reply: Option<Instant> = None;
    loop {
        // Bytes already read survive an idle timeout: the loop keeps `got`.
        let mut got = 0;
        while got < header.len() {
            match tokio::time::timeout(limit, read.read(&mut header[got..])).await {
                Err(_) => {
                    if got == 0 && shared.pending().is_empty() {
                        continue; // idle, not stalled
                    }
                    return shared.fail(PipeError::Timeout(limit.as_secs_f64()));
                }
                Ok(Ok(0)) => return shared.fail(PipeError::Closed),
                Ok(Ok(n)) => got += n,
                Ok(Err(e)) => return shared.fail(PipeError::Io(e.to_string())),
            }
        }
        let reply = SimpleReply::decode(&header);
        if reply.magic != proto::SIMPLE_REPLY_MAGIC {
            return shared.fail(PipeError::BadMagic(reply.magic));
        }
        // The lock is released at the end of this statement: `fail` takes it
        // again (a guard held by a `match` scrutinee deadlocked here).
        let kind = shared.pending().get(&reply.handle).map(|p| match p {
            Pending::Data { kind, .. } | Pending::Call { kind, .. } => *kind,
        });
        let Some(kind) = kind else {
            return shared.fail(PipeError::UnknownHandle(reply.handle));
        };
        let step = Step::MirrorReplyReceived { kind };
        // Stalled: the no-progress limit is what ends it.
        let hang = async { tokio::time::sleep(limit).await };
        match fault_apply::incoming(probe.step(step), || step.key(), hang).await {
            Ok(Incoming::Proceed) => {}
            // Ignored: the request stays in flight until the timeout.
            Ok(Incoming::Ignore) => continue,
            Err(ended) => {
                return shared.fail(match ended.how {
                    How::Hung => PipeError::Timeout(limit.as_secs_f64()),
                    How::Damaged => PipeError::BadMagic(!reply.magic),
                    _ => PipeError::Fault(ended.key),
                })
            }
        }
        let pending = shared.pending().remove(&reply.handle);
        match pending {
            None => return shared.fail(PipeError::UnknownHandle(reply.handle)),
            Some(Pending::Data { kind, offset, .. }) if reply.error != 0 => {
                return shared.fail(PipeError::ErrorReply {
                    kind: cmd::name(kind),
                    offset,
                    error: reply.error,
                })
            }
            Some(Pending::Data {
                len,
                sent,
                measure,
                slot,
                ..
            }) => {
                let now = Instant::now();
                shared.timed(sent, now);
                // The room this reply frees goes back with `slot`; what
                // the window grows by is added on top.
                let freed = slot.num_permits() as u64 * window::UNIT;
                drop(slot);
                let grew = shared.window().acked(freed, now);
                if grew > 0 {
                    shared.room.add_permits((grew / window::UNIT) as usize);
                    let now_bytes = shared.window().bytes();
                    crate::info!(
                        "in-flight window grown to {} MiB: a full window brought more throughput",
                        now_bytes >> 20
                    );
                }
                if measure {
                    let began = last_reply.map_or(sent, |r| r.max(sent));
                    shared
                        .costs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .record(len, now.saturating_duration_since(began), now);
                }
                last_reply = Some(now);
            }
            Some(Pending::Call {
                kind,
                offset,
                fails: true,
                ..
            }) if reply.error != 0 => {
                return shared.fail(PipeError::ErrorReply {
                    kind: cmd::name(kind),
                    offset,
                    error: reply.error,
                });
            }
            Some(Pending::Call {
                tx,
                payload,
                sent,
                fails,
                ..
            }) => {
                // A checkpoint holds only if nothing sent before it is still
                // unanswered and the pipe has not failed, as of its answer:
                // a failure after it takes nothing back.
                let held = fails && {
                    let pending = shared.pending();
                    let failed = shared
                        .failure
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_some();
                    !failed && pending.keys().all(|&h| h > reply.handle)
                };
                let answered_at = Instant::now();
                let sync = {
                    let rtt = match shared.round_trip_us.load(Ordering::Acquire) {
                        u64::MAX => Duration::ZERO,
                        us => Duration::from_micros(us),
                    };
                    answered_at
                        .saturating_duration_since(sent)
                        .saturating_sub(rtt)
                };
                shared.timed(sent, answered_at);
                let mut bytes = vec![0u8; if reply.error == 0 { payload } else { 0 }];
                let mut got = 0;
                while got < bytes.len() {
                    match tokio::time::timeout(limit, read.read(&mut bytes[got..])).await {
                        Err(_) => return shared.fail(PipeError::Timeout(limit.as_secs_f64())),
                        Ok(Ok(0)) => return shared.fail(PipeError::Closed),
                        Ok(Ok(n)) => got += n,
                        Ok(Err(e)) => return shared.fail(PipeError::Io(e.to_string())),
                    }
                }
                last_reply = Some(Instant::now());
                if fails {
                    // Read back by `Pipe::poll_checkpoint`: the verdict,
                    // then the sync in microseconds.
                    bytes = vec![u8::from(held)];
                    bytes.extend((sync.as_micros() as u64).to_le_bytes());
                }
                let _ = tx.send((reply.error, bytes));
            }
        }
        if shared.pending().is_empty() {
            shared.idle.notify_waiters();
        }
    }
}

/// [`Pipe::queued`] over (sent, bytes) of each request in flight.
/// [`Pipe::queued`] over (sent, bytes) of each request in flight, each
/// taking `time(bytes)` at the bottleneck. The backlog's time is turned
/// into bytes at the requests' own mix: the same share of their bytes as
/// of their time.
fn queued_at(sent: &mut [(Instant, u64)], time: impl Fn(u64) -> Duration, now: Instant) -> u64 {
    sent.sort_unstable_by_key(|(at, _)| *at);
    let total: u64 = sent.iter().map(|(_, len)| len).sum();
    let mut behind = Duration::ZERO;
    let mut last = now;
    for &(at, len) in sent.iter().rev() {
        behind += time(len);
        last = last.max(at + behind);
    }
    if behind.is_zero() {
        return 0;
    }
    let share = (last - now).as_secs_f64() / behind.as_secs_f64();
    ((total as f64 * share).ceil() as u64).min(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_sent_now_is_queued_and_a_stream_kept_up_with_is_not() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        // 12.5 MB/s: 475 kB sent in one burst just now all wait for the
        // link (38 ms of it).
        let link = |len: u64| Duration::from_secs_f64(len as f64 / 12.5e6);
        let mut burst: Vec<(Instant, u64)> = (0..116).map(|_| (now, 4096)).collect();
        assert_eq!(queued_at(&mut burst, link, now), 116 * 4096);
        // The same bytes sent evenly over the last 50 ms, as fast as the
        // link carries them: only the last request's worth is left.
        let mut stream: Vec<(Instant, u64)> = (0..116)
            .map(|i| (now - ms(50) + Duration::from_micros(i * 327), 4096))
            .collect();
        assert!(queued_at(&mut stream, link, now) <= 2 * 4096);
        // Sent 100 ms ago: long past the link, waiting only for replies.
        let mut old: Vec<(Instant, u64)> = (0..116).map(|_| (now - ms(100), 4096)).collect();
        assert_eq!(queued_at(&mut old, link, now), 0);
        assert_eq!(queued_at(&mut [], link, now), 0);
        // A destination that takes 1 ms a write: the same requests sent
        // 100 ms ago are mostly still waiting for it (116 ms of them).
        let slow = |_len: u64| ms(1);
        let left = queued_at(&mut old, slow, now);
        assert!((14 * 4096..=17 * 4096).contains(&left), "{left}");
    }

    #[test]
    fn without_a_cost_per_write_everything_in_flight_counts() {
        use crate::core::policy::{Capacity, Costs};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accept = tokio::spawn(async move { listener.accept().await.unwrap().0 });
            let stream = TcpStream::connect(addr).await.unwrap();
            let _peer = accept.await.unwrap();
            let mut pipe = Pipe::new(stream, Duration::from_secs(5), Arc::new(Quiet));
            pipe.write(0, &[7u8; 4096], true).await.unwrap();
            let then = Instant::now() + Duration::from_secs(10);
            let by_bytes = Capacity::new(
                Costs {
                    per_request: 0.0,
                    per_byte: 1e-9,
                },
                None,
                Some(1e9),
            );
            // Ten seconds later a 4 KiB write at 1 GB/s is long through,
            // but a model without a cost per write cannot say so.
            assert_eq!(pipe.queued(Some(by_bytes), then), 4096);
            assert_eq!(pipe.queued(None, then), 4096);
            let with_writes = Capacity::new(
                Costs {
                    per_request: 1e-4,
                    per_byte: 1e-9,
                },
                None,
                Some(1e9),
            );
            assert_eq!(pipe.queued(Some(with_writes), then), 0);
        });
    }
    use crate::probe::Quiet;
    use tokio::net::{TcpListener, TcpStream};

    /// A pipe whose destination closed the connection before anything was
    /// sent, once its reply task has seen the end.
    /// Both ends of a loopback connection: the source's, the destination's.
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stream, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (stream.unwrap(), accepted.unwrap().0)
    }

    /// Waits (10 s at most) until the reply task has seen the connection end.
    async fn sees_the_end(pipe: Pipe<TcpStream, Quiet>) -> Pipe<TcpStream, Quiet> {
        tokio::time::timeout(Duration::from_secs(10), pipe.shared.failed.cancelled())
            .await
            .expect("the reply task sees the closed connection within 10 s");
        pipe
    }

    async fn closed_pipe(limit: Duration) -> Pipe<TcpStream, Quiet> {
        let (stream, dest) = connected().await;
        drop(dest);
        sees_the_end(Pipe::new(stream, limit, Arc::new(Quiet))).await
    }

    #[tokio::test]
    async fn a_call_after_the_destination_closed_fails_at_once_not_after_the_limit() {
        let limit = Duration::from_secs(20);
        let mut pipe = closed_pipe(limit).await;
        let began = Instant::now();
        let answer = pipe.call_with(cmd::RESUME, 7, 8, 8).await;
        assert!(
            matches!(answer, Err(PipeError::Closed)),
            "expected the closed connection's error, got {answer:?}"
        );
        assert!(
            began.elapsed() < limit / 2,
            "the call waited {:?}, towards the no-progress limit",
            began.elapsed()
        );
        assert!(
            pipe.shared.pending().is_empty(),
            "nothing is left in flight"
        );
    }

    /// A pipe to a destination that reads one write and answers it with
    /// `error`, then closes.
    async fn answered_then_closed(error: u32) -> Pipe<TcpStream, Quiet> {
        let (stream, mut dest) = connected().await;
        let mut pipe = Pipe::new(stream, Duration::from_secs(20), Arc::new(Quiet));
        pipe.write(0, &[7; 512], true).await.unwrap();
        let mut request = [0u8; proto::REQUEST_LEN + 512];
        dest.read_exact(&mut request).await.unwrap();
        let handle = u64::from_be_bytes(request[8..16].try_into().unwrap());
        dest.write_all(&SimpleReply::new(error, handle).encode())
            .await
            .unwrap();
        drop(dest);
        sees_the_end(pipe).await
    }

    #[tokio::test]
    async fn idle_after_every_reply_came_is_success_even_once_the_connection_closed() {
        // ENTRUST is waited out so: a destination may close right after
        // its answer, and nothing sent was lost.
        let mut pipe = answered_then_closed(0).await;
        let idle = pipe.wait_idle().await;
        assert!(idle.is_ok(), "{idle:?}");
        // An error answer is never success, however idle the pipe is.
        let mut pipe = answered_then_closed(crate::proto::errno::EIO).await;
        assert!(
            matches!(pipe.wait_idle().await, Err(PipeError::ErrorReply { .. })),
            "a write answered EIO fails the wait"
        );
    }

    /// Sends two writes and a checkpoint, reads them at the destination's
    /// end, and answers the handles picked by `order` (0, 1: the writes,
    /// 2: the checkpoint) with their error; returns what
    /// `poll_checkpoint` says once it says anything (10 s at most); with
    /// `close`, the destination closes after answering and the pipe has
    /// seen it fail before the poll.
    async fn checkpoint_after(
        order: &[(usize, u32)],
        close: bool,
    ) -> (CheckpointAnswer, Pipe<TcpStream, Quiet>) {
        let (stream, mut dest) = connected().await;
        let mut pipe = Pipe::new(stream, Duration::from_secs(20), Arc::new(Quiet));
        pipe.write(0, &[1; 512], true).await.unwrap();
        pipe.write(4096, &[2; 512], true).await.unwrap();
        let mut answer = pipe.checkpoint(0x5eed, 1).await.unwrap();
        let mut handles = Vec::new();
        for payload in [512, 512, 0] {
            let mut request = vec![0u8; proto::REQUEST_LEN + payload];
            dest.read_exact(&mut request).await.unwrap();
            handles.push(u64::from_be_bytes(request[8..16].try_into().unwrap()));
        }
        for &(which, error) in order {
            dest.write_all(&SimpleReply::new(error, handles[which]).encode())
                .await
                .unwrap();
        }
        if close {
            drop(dest);
            pipe = sees_the_end(pipe).await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match pipe.poll_checkpoint(&mut answer) {
                CheckpointAnswer::Waiting if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await
                }
                found => return (found, pipe),
            }
        }
    }

    #[tokio::test]
    async fn a_checkpoints_answer_shows_its_time_past_the_round_trip() {
        let (stream, mut dest) = connected().await;
        // Each answer goes out when written, as a destination's do.
        dest.set_nodelay(true).unwrap();
        let mut pipe = Pipe::new(stream, Duration::from_secs(20), Arc::new(Quiet));
        let read = async |dest: &mut TcpStream, payload: usize| {
            let mut request = vec![0u8; proto::REQUEST_LEN + payload];
            dest.read_exact(&mut request).await.unwrap();
            u64::from_be_bytes(request[8..16].try_into().unwrap())
        };
        // A write answered after 100 ms: the round trip, as the quickest
        // reply shows it.
        pipe.write(0, &[1; 512], true).await.unwrap();
        let h = read(&mut dest, 512).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        dest.write_all(&SimpleReply::new(0, h).encode())
            .await
            .unwrap();
        pipe.wait_idle().await.unwrap();
        // The checkpoint, answered 250 ms after it went: 150 ms past the
        // round trip.
        let mut answer = pipe.checkpoint(0x5eed, 1).await.unwrap();
        let h = read(&mut dest, 0).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        dest.write_all(&SimpleReply::new(0, h).encode())
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            match pipe.poll_checkpoint(&mut answer) {
                CheckpointAnswer::Waiting if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await
                }
                found => break found,
            }
        };
        let CheckpointAnswer::Answered { held: true, sync } = found else {
            panic!("expected a held checkpoint, found {found:?}");
        };
        assert!(
            sync >= Duration::from_millis(140) && sync < Duration::from_millis(240),
            "sync {sync:?}, expected about 150 ms"
        );
    }

    #[tokio::test]
    async fn a_checkpoint_holds_only_once_every_request_before_it_was_answered_without_error() {
        let (found, _pipe) = checkpoint_after(&[(0, 0), (1, 0), (2, 0)], false).await;
        assert!(
            matches!(found, CheckpointAnswer::Answered { held: true, .. }),
            "{found:?}"
        );
        // Answered while a write before it is not (it never arrived, or its
        // error answer is still to come): nothing it covers counts.
        let (found, _pipe) = checkpoint_after(&[(0, 0), (2, 0)], false).await;
        assert!(
            matches!(found, CheckpointAnswer::Answered { held: false, .. }),
            "{found:?}"
        );
        // The connection ends after it was answered (a cut, a retry): what
        // it held it still holds.
        let (found, _pipe) = checkpoint_after(&[(0, 0), (1, 0), (2, 0)], true).await;
        assert!(
            matches!(found, CheckpointAnswer::Answered { held: true, .. }),
            "{found:?}"
        );
        // A write before it answered with an error fails the pipe first.
        let (found, _pipe) =
            checkpoint_after(&[(0, crate::proto::errno::EIO), (1, 0), (2, 0)], false).await;
        assert_eq!(found, CheckpointAnswer::Failed);
    }

    #[tokio::test]
    async fn a_checkpoint_answered_with_an_error_fails_the_pipe() {
        let (found, mut pipe) =
            checkpoint_after(&[(0, 0), (1, 0), (2, crate::proto::errno::EIO)], false).await;
        assert_eq!(found, CheckpointAnswer::Failed);
        let next = pipe.write(8192, &[3; 512], true).await;
        assert!(
            matches!(
                next,
                Err(PipeError::ErrorReply {
                    kind: "checkpoint",
                    offset: 0x5eed,
                    ..
                })
            ),
            "{next:?}"
        );
    }

    /// Over TLS, a request written while the socket is full is held in the
    /// session's queue, not sent: the pipe must flush it, or the
    /// destination waits for it while the source waits for its answer.
    /// A 1 MiB write through a 4 KiB socket leaves the session with records
    /// queued; the call behind it is answered only if they go out.
    #[tokio::test]
    async fn over_tls_a_call_behind_a_write_that_filled_the_socket_still_goes_out() {
        let (mut dest, source) = crate::tls::test_pair(4096).await;
        let source = crate::tls::Conn::Tls(Box::new(source.into()));
        let mut pipe = Pipe::new(source, Duration::from_secs(20), Arc::new(Quiet));
        // The destination answers every request it reads, as it reads it.
        let destination = tokio::spawn(async move {
            let mut header = [0u8; proto::REQUEST_LEN];
            while dest.read_exact(&mut header).await.is_ok() {
                let request = Request::decode(&header);
                if request.kind == cmd::WRITE {
                    let mut payload = vec![0u8; request.length as usize];
                    dest.read_exact(&mut payload).await.unwrap();
                }
                let reply = SimpleReply::new(0, request.handle).encode();
                dest.write_all(&reply).await.unwrap();
                dest.flush().await.unwrap();
            }
        });
        pipe.write(0, &vec![7u8; 1 << 20], false).await.unwrap();
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            pipe.call_with(cmd::ENTRUST, 1, 0, 0),
        )
        .await;
        assert!(
            matches!(answer, Ok(Ok((0, _)))),
            "the call behind the write was not answered within 5 s: {answer:?}"
        );
        drop(pipe);
        destination.abort();
    }
}
