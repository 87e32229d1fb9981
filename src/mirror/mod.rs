//! The migration source: copies the served image to a `flexnbd listen`
//! while clients keep writing, then hands off (docs/handoff.md).
//!
//! [`supervise`] runs attempts: the first attempt's connection outcome is
//! reported to the `mirror` caller and never retried; after `Mirror started`
//! every failure is retried forever (at once after an attempt that ran a
//! while, else backing off to one second apart), each attempt with a fresh
//! connection and fresh state but for what the destination durably holds
//! (docs/handoff.md, "Resuming"), until success, `break` or a signal. An
//! attempt is one copy: a sweep of the whole image
//! (allocated ranges as data, holes as WRITE_ZEROES where the destination
//! offers it), passes over the ranges clients dirtied meanwhile, the client
//! cut-off once the remainder is small, entrust, and the hand-off. How
//! small is small, and how fast clients may dirty the image meanwhile, is
//! decided in [`policy`] from the destination's costs as its replies show
//! them, so a destination that syncs every write (the C flexnbd) still
//! converges with a short lock-out.
//!
//! What happens next and in which order is decided by the sans-IO machine
//! [`crate::core::source::Source`]; this module is its driver: it connects
//! (the handshake and its fault points are I/O), then carries out each
//! effect the machine returns with the real pipe, image and host, and
//! feeds the outcome back as the next event.

pub(crate) mod pipe;
pub use crate::core::policy;
pub use crate::core::source::{
    FirstOutcome, Outcome, Phase, CHUNK, CUTOFF_GRACE, RETRY_DELAY, ZERO_CHUNK,
};

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::client;
use crate::control::protocol::{MirrorAction, Response};
use crate::core::destination::entrust_offset;
use crate::core::source::{Effect, Event, Level, Milestone, Source, SourceConfig};
use crate::fault_apply::{self, How, Incoming};
use crate::log::monotonic_ms;
use crate::probe::{Probe, Step};
use crate::proto::cmd;
use crate::status::MigrationStatus;
use crate::store::Image;
use crate::transport::Transport;
use crate::{info, warn};
use pipe::{Pipe, PipeError};
use policy::{Bottleneck, Capacity, Estimate};

/// Outgoing connections give up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The whole greeting must arrive within this.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The no-progress timeout: 60 s, or `FLEXNBD_MS_REQUEST_LIMIT_SECS`
/// (seconds, a float).
/// The no-progress limit unless `FLEXNBD_MS_REQUEST_LIMIT_SECS` says
/// otherwise.
pub const REQUEST_LIMIT_DEFAULT: Duration = Duration::from_secs(60);

/// The least time between the sweep's checkpoints:
/// `FLEXNBD_CHECKPOINT_GAP_MS` (milliseconds; the tests set 0 to checkpoint
/// a small copy), else [`crate::core::source::CHECKPOINT_GAP`].
pub fn checkpoint_gap() -> Duration {
    std::env::var("FLEXNBD_CHECKPOINT_GAP_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(crate::core::source::CHECKPOINT_GAP, Duration::from_millis)
}

pub fn request_limit() -> Duration {
    std::env::var("FLEXNBD_MS_REQUEST_LIMIT_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(REQUEST_LIMIT_DEFAULT)
}

impl FirstOutcome {
    pub fn response(self) -> Response {
        match self {
            FirstOutcome::Go => Response::ok("Mirror started"),
            FirstOutcome::FailConnect => Response::fail("Mirror failed to connect"),
            FirstOutcome::Rejected => Response::fail("Mirror was rejected"),
            FirstOutcome::NoHello => Response::fail("Remote server failed to respond"),
            FirstOutcome::SizeMismatch => Response::fail("Remote size does not match local size"),
        }
    }
}

/// What a mirror was asked to do.
#[derive(Clone, Debug)]
pub struct MirrorConfig {
    pub target: SocketAddr,
    pub bind: Option<IpAddr>,
    pub action: MirrorAction,
    pub request_limit: Duration,
    /// With `mirror --tls-ca`: STARTTLS, verifying the destination.
    pub tls: Option<Arc<crate::tls::ClientTls>>,
    /// `mirror --verify`: compare by digest instead of copying.
    pub verify: bool,
}

/// A mirror's live figures, read by status and written by the attempt.
pub struct MirrorState {
    pub attempt: AtomicU64,
    phase: AtomicU8,
    attempt_started_ms: AtomicU64,
    /// Bytes sent in this attempt, as the C `all_dirty` (speed figure).
    sent: AtomicU64,
    /// How far the sweep has got.
    sweep_offset: AtomicU64,
    /// Bytes per second; `u64::MAX` is unlimited.
    max_bps: AtomicU64,
    /// Set once the hand-off is past the point of no return: `break` then
    /// answers `mirror completed`, and a signal waits for the end.
    pub completing: AtomicBool,
    /// The longest time clients were shut out at a cut-off, in microseconds.
    pub lockout_us: AtomicU64,
    /// The last cut-off decision while converging ([`Estimate`]): the
    /// remainder's time (`u64::MAX`: not measured yet) and the allowance,
    /// in microseconds, and the [`Bottleneck`].
    remainder_us: AtomicU64,
    /// When the cut-off is expected, in microseconds from the last
    /// decision (`u64::MAX`: unknown).
    eta_us: AtomicU64,
    allowance_us: AtomicU64,
    bottleneck: AtomicU8,
    /// The last checkpoint the destination answered (0: none yet).
    pub checkpoint: AtomicU64,
    /// What the destination held when this attempt resumed (bytes not
    /// sent again; 0 when it copies everything).
    held_at_start: AtomicU64,
    /// Of that, what the sweep has passed so far.
    skipped: AtomicU64,
    /// The in-flight window (`core::window`), in bytes: 0 before the
    /// first attempt's copy starts.
    window: AtomicU64,
}

impl MirrorState {
    pub fn new(max_bps: Option<u64>) -> MirrorState {
        MirrorState {
            attempt: AtomicU64::new(0),
            phase: AtomicU8::new(Phase::Connecting as u8),
            attempt_started_ms: AtomicU64::new(monotonic_ms()),
            sent: AtomicU64::new(0),
            sweep_offset: AtomicU64::new(0),
            max_bps: AtomicU64::new(max_bps.unwrap_or(u64::MAX)),
            completing: AtomicBool::new(false),
            lockout_us: AtomicU64::new(0),
            remainder_us: AtomicU64::new(u64::MAX),
            eta_us: AtomicU64::new(u64::MAX),
            allowance_us: AtomicU64::new(0),
            bottleneck: AtomicU8::new(Bottleneck::Unknown as u8),
            checkpoint: AtomicU64::new(0),
            held_at_start: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            window: AtomicU64::new(0),
        }
    }

    fn begin_held(&self, held: u64) {
        self.held_at_start.store(held, Ordering::Release);
        self.skipped.store(0, Ordering::Release);
    }

    /// The in-flight window, as a status key (once the copy started).
    pub fn window_keys(&self) -> Vec<(String, String)> {
        match self.window.load(Ordering::Acquire) {
            0 => Vec::new(),
            w => vec![("migration_window".into(), w.to_string())],
        }
    }

    /// How the current attempt stands on resuming, as status keys: the
    /// last checkpoint the destination answered, and what it held when the
    /// attempt began (not sent again). Empty until there is either.
    pub fn resume_keys(&self) -> Vec<(String, String)> {
        let checkpoint = self.checkpoint.load(Ordering::Acquire);
        let held = self.held_at_start.load(Ordering::Acquire);
        if checkpoint == 0 && held == 0 {
            return Vec::new();
        }
        vec![
            ("migration_checkpoint".into(), checkpoint.to_string()),
            ("migration_resumed_bytes".into(), held.to_string()),
        ]
    }

    fn set_estimate(&self, e: &Estimate) {
        let us = e
            .remainder
            .map_or(u64::MAX, |r| r.as_micros().min(u64::MAX as u128 - 1) as u64);
        self.remainder_us.store(us, Ordering::Release);
        self.allowance_us
            .store(e.allowance.as_micros() as u64, Ordering::Release);
        self.bottleneck.store(e.bottleneck as u8, Ordering::Release);
        let eta = e
            .eta
            .map_or(u64::MAX, |d| d.as_micros().min(u64::MAX as u128 - 1) as u64);
        self.eta_us.store(eta, Ordering::Release);
    }

    /// Why a converging migration has not cut off yet, as status keys:
    /// how long the remainder would shut clients out at the current
    /// capacity, what the cut-off allows, and what limits the copy. Empty
    /// in other phases.
    pub fn convergence_keys(&self) -> Vec<(String, String)> {
        if self.phase() != Phase::Converging {
            return Vec::new();
        }
        let remainder = match self.remainder_us.load(Ordering::Acquire) {
            u64::MAX => "unknown".to_string(),
            us => us.div_ceil(1000).to_string(),
        };
        let bottleneck = Bottleneck::from_u8(self.bottleneck.load(Ordering::Acquire))
            .unwrap_or(Bottleneck::Unknown);
        vec![
            ("migration_remainder_ms".into(), remainder),
            (
                "migration_cutoff_ms".into(),
                self.allowance_us
                    .load(Ordering::Acquire)
                    .div_ceil(1000)
                    .to_string(),
            ),
            ("migration_bottleneck".into(), bottleneck.name().into()),
            (
                "migration_cutoff_eta_ms".into(),
                match self.eta_us.load(Ordering::Acquire) {
                    u64::MAX => "unknown".to_string(),
                    us => us.div_ceil(1000).to_string(),
                },
            ),
        ]
    }

    pub fn phase(&self) -> Phase {
        let v = self.phase.load(Ordering::Acquire);
        // Only set_phase writes the byte, always from a Phase: anything else
        // is a bug (a variant left out of Phase::ALL), never a phase to guess.
        Phase::from_u8(v).unwrap_or_else(|| panic!("mirror phase byte {v} is no Phase"))
    }

    fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
    }

    pub fn set_max_bps(&self, bps: u64) {
        self.max_bps.store(bps, Ordering::Release);
    }

    pub fn max_bps(&self) -> Option<u64> {
        match self.max_bps.load(Ordering::Acquire) {
            u64::MAX => None,
            v => Some(v),
        }
    }

    fn begin_attempt(&self) {
        self.attempt.fetch_add(1, Ordering::AcqRel);
        self.attempt_started_ms
            .store(monotonic_ms(), Ordering::Release);
        self.sent.store(0, Ordering::Release);
        self.sweep_offset.store(0, Ordering::Release);
        self.set_phase(Phase::Connecting);
    }

    /// The C status figures (speed, duration, seconds and bytes left).
    pub fn status(&self, image: &Image) -> MigrationStatus {
        let elapsed_ms =
            monotonic_ms().saturating_sub(self.attempt_started_ms.load(Ordering::Acquire));
        let sent = self.sent.load(Ordering::Acquire);
        let speed = sent / (elapsed_ms / 1000 + 1);
        let swept = self.sweep_offset.load(Ordering::Acquire).min(image.size());
        // What the destination holds ahead of the sweep is not sent again.
        let held_ahead = self
            .held_at_start
            .load(Ordering::Acquire)
            .saturating_sub(self.skipped.load(Ordering::Acquire));
        let bytes_left = image.dirty_bytes() + (image.size() - swept).saturating_sub(held_ahead);
        MigrationStatus {
            speed,
            duration: elapsed_ms / 1000,
            seconds_left: bytes_left / (speed + 1),
            bytes_left,
            speed_limit: self.max_bps(),
        }
    }
}

/// What the mirror needs from the server it runs in.
pub trait Host: Send + Sync + 'static {
    fn image(&self) -> &Arc<Image>;
    /// Stops new clients, stops the connected ones after their current
    /// request and waits for them (tearing down any still busy after
    /// `grace`). No write is acknowledged to a client after this returns.
    fn cut_off_clients(&self, grace: Duration) -> impl Future<Output = ()> + Send;
    /// Lets clients in again (after a failed attempt or action `nothing`).
    fn allow_clients(&self);
    /// Closes the control socket and the NBD listening socket, for good.
    fn close_server(&self) -> impl Future<Output = ()> + Send;
}

/// Why an attempt ended without completing.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    First(FirstOutcomeError),
    #[error("{0}")]
    Pipe(#[from] PipeError),
    #[error("reading the source image failed: {0}")]
    Image(std::io::Error),
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct FirstOutcomeError {
    outcome: FirstOutcome,
    message: String,
}

fn first_error(outcome: FirstOutcome, message: String) -> AttemptError {
    AttemptError::First(FirstOutcomeError { outcome, message })
}

/// Runs the mirror to its end. `first` receives the first attempt's
/// connection outcome as soon as it is known.
pub async fn supervise<T: Transport, H: Host, P: Probe>(
    transport: T,
    host: Arc<H>,
    probe: Arc<P>,
    config: MirrorConfig,
    state: Arc<MirrorState>,
    cancel: CancellationToken,
    first: oneshot::Sender<FirstOutcome>,
) -> Outcome {
    let image = host.image().clone();
    // The migration continues across `mirror`s of this process (after a
    // `break`): its id and last checkpoint live with the image.
    let held = image.held();
    let machine = Source::new(SourceConfig {
        migration: held.migration(client::random_handle),
        checkpoint: held.checkpoint(),
        checkpoint_gap: checkpoint_gap(),
        verify: config.verify,
        ..SourceConfig::new(
            config.target.to_string(),
            image.path().display().to_string(),
            image.size(),
            config.action,
            crate::store::BLOCK_SIZE,
        )
    });
    let mut driver = Driver {
        transport: &transport,
        host: &*host,
        probe: &probe,
        config: &config,
        state: &state,
        cancel: &cancel,
        image: &image,
        first: Some(first),
        copier: None,
        machine,
    };
    driver.run().await
}

/// Races `fut` against cancellation.
async fn or_cancel<F: Future>(
    cancel: &CancellationToken,
    fut: F,
) -> Result<F::Output, AttemptError> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(AttemptError::Cancelled),
        out = fut => Ok(out),
    }
}

/// Carries out the machine's effects with the real connection, image and
/// host, and feeds their outcomes back to it.
struct Driver<'a, T: Transport, H: Host, P: Probe> {
    transport: &'a T,
    host: &'a H,
    probe: &'a Arc<P>,
    config: &'a MirrorConfig,
    state: &'a MirrorState,
    cancel: &'a CancellationToken,
    image: &'a Arc<Image>,
    first: Option<oneshot::Sender<FirstOutcome>>,
    /// The current attempt's connection.
    copier: Option<Copier<'a, crate::tls::Conn<T::Stream>, P>>,
    machine: Source,
}

impl<'a, T: Transport, H: Host, P: Probe> Driver<'a, T, H, P> {
    async fn run(&mut self) -> Outcome {
        let mut batch = self.machine.start(Instant::now());
        loop {
            let mut answer = None;
            let count = batch.len();
            for (i, effect) in batch.into_iter().enumerate() {
                if effect.awaits() {
                    debug_assert_eq!(i + 1, count, "an effect that awaits ends its batch");
                    answer = Some(self.answer(effect).await);
                    break;
                }
                if let Some(outcome) = self.apply(effect).await {
                    return outcome;
                }
            }
            let event = answer.expect("every batch ends awaiting an answer or finishing");
            // A checkpoint answered meanwhile is handed over first, so the
            // machine sees it before Idle and before the answer that may
            // end the attempt. What it returns awaits nothing.
            if let Some(answered) = self.checkpoint_answered() {
                for effect in self.machine.handle(Instant::now(), answered) {
                    debug_assert!(!effect.awaits(), "{effect:?} after a checkpoint's answer");
                    if let Some(outcome) = self.apply(effect).await {
                        return outcome;
                    }
                }
            }
            if matches!(
                event,
                Event::Failed { .. } | Event::ConnectFailed { .. } | Event::Cancel
            ) {
                // The attempt is over: close its connection at once.
                self.copier = None;
            }
            batch = self.machine.handle(Instant::now(), event);
        }
    }

    /// The answer to the checkpoint sent without waiting, once it came
    /// without error. An error answer failed the pipe: the effect awaited
    /// now or the next one fails, and the attempt is retried.
    fn checkpoint_answered(&mut self) -> Option<Event> {
        let copier = self.copier.as_mut()?;
        let (checkpoint, answer) = copier.checkpoint.as_mut()?;
        let checkpoint = *checkpoint;
        let (held, sync) = match copier.pipe.poll_checkpoint(answer) {
            pipe::CheckpointAnswer::Waiting => return None,
            pipe::CheckpointAnswer::Failed => {
                copier.checkpoint = None;
                return None;
            }
            pipe::CheckpointAnswer::Answered { held, sync } => (held, sync),
        };
        copier.checkpoint = None;
        Some(Event::CheckpointAnswered {
            checkpoint,
            held,
            sync,
        })
    }

    /// Carries out an effect that answers nothing; `Some` ends the mirror.
    async fn apply(&mut self, effect: Effect) -> Option<Outcome> {
        let (image, state) = (self.image, self.state);
        match effect {
            Effect::BeginAttempt { .. } => state.begin_attempt(),
            Effect::ReportFirst(outcome) => {
                if let Some(tx) = self.first.take() {
                    let _ = tx.send(outcome);
                }
            }
            Effect::StartTracking => image.start_tracking(),
            Effect::StopTracking => image.stop_tracking(),
            Effect::SetPhase(phase) => state.set_phase(phase),
            Effect::ClearDirty { offset, len } => image.clear_dirty(offset, len),
            Effect::SetPace { capacity, below } => {
                image.set_pace(capacity.map(|c| c.pace_rates()), below)
            }
            Effect::SweepProgress(offset) => state.sweep_offset.store(offset, Ordering::Release),
            Effect::SweepSkipped(len) => {
                state.skipped.fetch_add(len, Ordering::AcqRel);
            }
            Effect::SetEstimate(estimate) => state.set_estimate(&estimate),
            Effect::AllowClients => self.host.allow_clients(),
            Effect::Completing => state.completing.store(true, Ordering::Release),
            Effect::RecordLockout(lockout) => {
                state
                    .lockout_us
                    .fetch_max(lockout.as_micros() as u64, Ordering::AcqRel);
            }
            Effect::Milestone(Milestone::DisconnectSent) => {
                crate::fault_apply::milestone(&**self.probe, Step::MirrorDisconnectSent).await;
            }
            Effect::BeginHeld { resume } => {
                image.held().begin(resume);
                state.begin_held(if resume { image.held().held_bytes() } else { 0 });
            }
            Effect::Held { checkpoint } => {
                image.held().commit(checkpoint);
                state.checkpoint.store(checkpoint, Ordering::Release);
            }
            Effect::SendCheckpoint {
                migration,
                checkpoint,
            } => {
                // What it covers: everything sent so far, every write of it
                // already on the connection ahead of it (effects run one
                // at a time). A send that fails has failed the pipe, and
                // the next effect that uses it says so.
                // `break` interrupts it (a send stuck on a full socket, a
                // fault's delay): the attempt is being abandoned, and its
                // connection with it.
                image.held().ask();
                let cancel = self.cancel;
                let copier = self.copier();
                let k = u32::try_from(checkpoint).unwrap_or(u32::MAX);
                if let Ok(Ok(answer)) =
                    or_cancel(cancel, copier.pipe.checkpoint(migration, k)).await
                {
                    copier.checkpoint = Some((checkpoint, answer));
                }
            }
            Effect::Log(Level::Info, line) => info!("{line}"),
            Effect::Log(Level::Warn, line) => warn!("{line}"),
            Effect::Finish(outcome) => {
                self.copier = None;
                return Some(outcome);
            }
            other => unreachable!("{other:?} awaits an answer"),
        }
        None
    }

    /// Carries out an effect that awaits an answer, and returns it.
    async fn answer(&mut self, effect: Effect) -> Event {
        let image = self.image;
        let cancel = self.cancel;
        let result: Result<Event, AttemptError> = match effect {
            Effect::Connect => match self.connect().await {
                Ok((flags, link, resumable)) => Ok(Event::Connected {
                    flags,
                    link,
                    resumable,
                }),
                Err(AttemptError::First(e)) => Ok(Event::ConnectFailed {
                    outcome: e.outcome,
                    message: e.message,
                }),
                Err(e) => Err(e),
            },
            Effect::MeasureCapacity => Ok(Event::Capacity {
                capacity: {
                    let window = self.copier().pipe.window();
                    self.state.window.store(window, Ordering::Release);
                    let rtt = self.copier().pipe.round_trip();
                    self.copier().capacity().map(|c| c.with_round_trip(rtt))
                },
                speed_limit: self.state.max_bps(),
            }),
            Effect::AskExtents { offset, len, held } => {
                Ok(Event::Extents(image.sweep_extents(offset, len, held)))
            }
            Effect::QueryResume { migration } => {
                // A destination that offered it also says whether its image
                // holds any data: 8 more bytes.
                let len = if self.copier().tells_empty { 16 } else { 8 };
                let pipe = &mut self.copier().pipe;
                match or_cancel(
                    cancel,
                    pipe.call_with(cmd::RESUME, migration, len, len as usize),
                )
                .await
                {
                    Ok(Ok((0, bytes))) => {
                        let word = |i: usize| {
                            bytes
                                .get(i * 8..i * 8 + 8)
                                .and_then(|b| b.try_into().ok())
                                .map_or(0, u64::from_be_bytes)
                        };
                        Ok(Event::ResumeAnswer {
                            checkpoint: Some(word(0)),
                            empty: len == 16 && word(1) & 1 != 0,
                        })
                    }
                    // An old destination: EINVAL (an older flexnbd) or
                    // ENOSPC (the C flexnbd checks the offset first).
                    Ok(Ok(_)) => Ok(Event::ResumeAnswer {
                        checkpoint: None,
                        empty: false,
                    }),
                    Ok(Err(e)) => Err(e.into()),
                    Err(e) => Err(e),
                }
            }
            Effect::SendData { offset, len } => self
                .copier()
                .send_data(offset, len)
                .await
                .map(|()| Event::Sent),
            Effect::CompareData { offset, len } => self
                .copier()
                .compare_data(offset, len)
                .await
                .map(|differed| Event::Compared {
                    same: len - differed,
                    differed,
                }),
            Effect::SendHole {
                offset,
                len,
                zeroes,
            } => self
                .copier()
                .send_hole(offset, len, zeroes)
                .await
                .map(|()| Event::Sent),
            Effect::TakeDirty {
                max_bytes,
                max_run,
                gap,
            } => Ok(Event::DirtyTaken(image.take_dirty(max_bytes, max_run, gap))),
            Effect::Measure => {
                let (in_flight, in_flight_bytes) = self.copier().pipe.in_flight();
                let capacity = self.copier().capacity();
                let queued_bytes = self.copier().pipe.queued(capacity, Instant::now());
                Ok(Event::Measured {
                    dirty_bytes: image.dirty_bytes(),
                    in_flight,
                    in_flight_bytes,
                    queued_bytes,
                })
            }
            Effect::CountRuns { gap, limit } => Ok(Event::Runs(image.dirty_runs(gap, limit))),
            Effect::WaitQueue { max } => self.wait_queue(max).await,
            Effect::WaitIdle => {
                let pipe = &mut self.copier().pipe;
                match or_cancel(cancel, pipe.wait_idle()).await {
                    Ok(done) => done.map(|()| Event::Idle).map_err(AttemptError::from),
                    Err(e) => Err(e),
                }
            }
            Effect::Flush | Effect::Entrust => {
                let pipe = &mut self.copier().pipe;
                // ENTRUST follows the last changes without waiting for their
                // replies: it tells how many went before it, so that the
                // destination can refuse it if one went missing.
                let (kind, offset) = if effect == Effect::Flush {
                    (cmd::FLUSH, 0)
                } else {
                    let told = entrust_offset(pipe.changes_sent(), image.size());
                    (cmd::ENTRUST, told)
                };
                match or_cancel(cancel, pipe.call_with(kind, offset, 0, 0)).await {
                    Ok(reply) => reply
                        .map(|(error, _)| Event::Reply { error })
                        .map_err(AttemptError::from),
                    Err(e) => Err(e),
                }
            }
            Effect::CutOffClients { grace } => or_cancel(cancel, self.host.cut_off_clients(grace))
                .await
                .map(|()| Event::ClientsCutOff),
            Effect::CloseServer => {
                self.host.close_server().await;
                Ok(Event::ServerClosed)
            }
            Effect::Unlink => Ok(Event::Unlinked(
                crate::handoff::unlink_durably(&**image.files(), image.path())
                    .map_err(|e| e.to_string()),
            )),
            Effect::Disconnect => {
                let copier = self.copier.take().expect("connected before DISCONNECT");
                Ok(Event::DisconnectSent(
                    copier.pipe.disconnect().await.map_err(|e| e.to_string()),
                ))
            }
            Effect::ArmRetry { delay } => {
                tokio::select! {
                    _ = cancel.cancelled() => Err(AttemptError::Cancelled),
                    _ = tokio::time::sleep(delay) => Ok(Event::RetryTimerFired),
                }
            }
            other => unreachable!("{other:?} answers nothing"),
        };
        match result {
            Ok(event) => event,
            Err(AttemptError::Cancelled) => Event::Cancel,
            Err(e) => Event::Failed {
                reason: e.to_string(),
            },
        }
    }

    /// Until the link has carried what is queued for it at the measured
    /// rate, `max` at most: sleeps of the queue's own time, looked at again
    /// after each (replies and the rate move meanwhile).
    async fn wait_queue(&mut self, max: Duration) -> Result<Event, AttemptError> {
        let deadline = Instant::now() + max;
        loop {
            let capacity = self.copier().capacity();
            let now = Instant::now();
            let queued = self.copier().pipe.queued(capacity, now);
            let Some(c) = capacity.filter(|_| queued > 0 && now < deadline) else {
                return Ok(Event::QueueDrained);
            };
            // At least a millisecond: the queue is looked at again after.
            let wait = c
                .time(0, queued)
                .max(Duration::from_millis(1))
                .min(deadline - now);
            or_cancel(self.cancel, tokio::time::sleep(wait)).await?;
        }
    }

    fn copier(&mut self) -> &mut Copier<'a, crate::tls::Conn<T::Stream>, P> {
        self.copier
            .as_mut()
            .expect("the machine asks for the connection only while connected")
    }

    /// Connects, reads the greeting and checks the size: on success the
    /// export's flags and how the link was made (for the log).
    async fn connect(&mut self) -> Result<(u16, String, bool), AttemptError> {
        let (config, probe, cancel, image) = (self.config, self.probe, self.cancel, self.image);
        // 1. Connect and check the greeting.
        let bind = config.bind.map(|ip| SocketAddr::new(ip, 0));
        let refused = |why: &str| {
            first_error(
                FirstOutcome::FailConnect,
                format!("cannot connect to {}: {why}", config.target),
            )
        };
        // Hung: no connection until the connect timeout would have given up.
        let verdict = fault_apply::event(
            probe.step(Step::MirrorConnect),
            || Step::MirrorConnect.key(),
            async { tokio::time::sleep(CONNECT_TIMEOUT).await },
        );
        if let Err(ended) = or_cancel(cancel, verdict).await? {
            return Err(refused(match ended.how {
                How::Hung => "connection timed out (fault injection)",
                _ => "connection refused (fault injection)",
            }));
        }
        let mut stream = crate::tls::Conn::Plain(
            or_cancel(
                cancel,
                self.transport.connect(config.target, bind, CONNECT_TIMEOUT),
            )
            .await?
            .map_err(|e| {
                first_error(
                    FirstOutcome::FailConnect,
                    format!("cannot connect to {}: {e}", config.target),
                )
            })?,
        );
        let export = match or_cancel(
            cancel,
            tokio::time::timeout(
                HELLO_TIMEOUT,
                client::handshake(&mut stream, config.tls.as_deref()),
            ),
        )
        .await?
        {
            Err(_) => {
                return Err(first_error(
                    FirstOutcome::NoHello,
                    format!(
                        "no complete greeting from {} within {} s",
                        config.target,
                        HELLO_TIMEOUT.as_secs()
                    ),
                ))
            }
            Ok(Err(e)) => {
                return Err(first_error(
                    FirstOutcome::Rejected,
                    format!("{} rejected us: {e}", config.target),
                ))
            }
            Ok(Ok(export)) => export,
        };
        let rejected = |why: &str| {
            first_error(
                FirstOutcome::Rejected,
                format!("{} rejected us: {why}", config.target),
            )
        };
        // Hung: the greeting stalls until the hello timeout gives up on it.
        let verdict = fault_apply::incoming(
            probe.step(Step::MirrorGreetingReceived),
            || Step::MirrorGreetingReceived.key(),
            async { tokio::time::sleep(HELLO_TIMEOUT).await },
        );
        match or_cancel(cancel, verdict).await? {
            Ok(Incoming::Proceed) => {}
            Ok(Incoming::Ignore) => {
                // As if the greeting never came: read on for one. The
                // destination sends nothing more before we speak, so this ends
                // at the hello timeout (or when it closes).
                use tokio::io::AsyncReadExt;
                let mut byte = [0u8; 1];
                let more = tokio::time::timeout(HELLO_TIMEOUT, stream.read(&mut byte));
                return Err(match or_cancel(cancel, more).await? {
                    Err(_) => first_error(
                        FirstOutcome::NoHello,
                        format!(
                            "no greeting from {} within {} s (fault injection ignored the one that came)",
                            config.target,
                            HELLO_TIMEOUT.as_secs()
                        ),
                    ),
                    Ok(_) => rejected("no greeting in what followed an ignored one (fault injection)"),
                });
            }
            Err(ended) => {
                return Err(match ended.how {
                    How::Hung => first_error(
                        FirstOutcome::NoHello,
                        "greeting stalled (fault injection)".into(),
                    ),
                    How::Damaged => rejected("bad greeting magic (fault injection)"),
                    _ => rejected("connection closed (fault injection)"),
                })
            }
        }
        if export.size != image.size() {
            // Dropping the stream closes it, so the destination's slot is free.
            return Err(first_error(
                FirstOutcome::SizeMismatch,
                format!(
                    "remote size {} does not match local size {}",
                    export.size,
                    image.size()
                ),
            ));
        }
        let link = format!(
            "{:?} handshake{}",
            export.handshake,
            if stream.is_tls() { ", TLS" } else { "" }
        );
        self.copier = Some(Copier {
            pipe: Pipe::new(stream, config.request_limit, probe.clone()),
            image,
            state: self.state,
            cancel,
            link_free: None,
            checkpoint: None,
            tells_empty: export.extensions & crate::proto::ext::EMPTY != 0,
        });
        // Only a destination that offered resuming is asked anything new.
        let resumable = export.extensions & crate::proto::ext::RESUME != 0;
        Ok((export.flags, link, resumable))
    }
}

/// How far behind the speed limit's schedule the copy may fall and still
/// catch up at once: the most it ever sends above the limit in a burst.
const THROTTLE_SLACK: Duration = Duration::from_millis(10);

/// Sends image ranges through the pipe, honouring the speed limit.
struct Copier<'a, S: crate::transport::Stream, P: Probe> {
    pipe: Pipe<S, P>,
    image: &'a Arc<Image>,
    state: &'a MirrorState,
    cancel: &'a CancellationToken,
    /// When the speed limit lets the next piece go: each piece moves it on
    /// by its own time at the limit then in force. Never earlier than the
    /// last send, so idle time earns no burst, and a limit lowered in the
    /// middle costs at most one piece at the old rate, not the whole
    /// migration's average.
    link_free: Option<Instant>,
    /// The checkpoint sent without waiting (`Effect::SendCheckpoint`) and
    /// its answer to come.
    checkpoint: Option<(u64, pipe::Answer)>,
    /// The destination offered to say whether its image is empty
    /// (`proto::ext::EMPTY`).
    tells_empty: bool,
}

impl<S: crate::transport::Stream, P: Probe> Copier<'_, S, P> {
    /// What the migration can move now: the destination's costs, the
    /// speed limit and the connection's measured throughput.
    fn capacity(&self) -> Option<Capacity> {
        let model = self.pipe.costs();
        model
            .costs()
            .map(|c| Capacity::new(c, self.state.max_bps(), model.throughput()))
    }

    /// Waits until sending `n` more bytes keeps within the speed limit.
    async fn throttle(&mut self, n: u64) -> Result<(), AttemptError> {
        loop {
            let Some(limit) = self.state.max_bps() else {
                self.link_free = None;
                return Ok(());
            };
            if limit == 0 {
                // A limit of 0 pauses the copy until it is raised.
                or_cancel(self.cancel, tokio::time::sleep(Duration::from_millis(100))).await?;
                continue;
            }
            let now = Instant::now();
            // Credit of up to THROTTLE_SLACK is kept: timers wake up to a
            // millisecond late, and a piece of 4 KiB at 10 MB/s is due every
            // 0.4 ms, so without it every oversleep would be lost and the
            // copy would run at a fraction of its limit.
            let earliest = now.checked_sub(THROTTLE_SLACK).unwrap_or(now);
            let free = self.link_free.map_or(earliest, |f| f.max(earliest));
            if free > now {
                // Sleep in short steps so a changed limit takes effect at once.
                let wait = (free - now).min(Duration::from_millis(100));
                or_cancel(self.cancel, tokio::time::sleep(wait)).await?;
                continue;
            }
            self.link_free = Some(free + Duration::from_secs_f64(n as f64 / limit as f64));
            return Ok(());
        }
    }

    /// Piece size: whole chunks normally, smaller under a low speed limit so
    /// the rate stays smooth.
    fn piece(&self) -> u64 {
        match self.state.max_bps() {
            Some(limit) => (limit / 10).clamp(4096, CHUNK),
            None => CHUNK,
        }
    }

    fn count(&mut self, n: u64) {
        self.state.sent.fetch_add(n, Ordering::AcqRel);
    }

    async fn send_data(&mut self, mut offset: u64, len: u64) -> Result<(), AttemptError> {
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(self.piece());
            self.throttle(n).await?;
            // Before the read (store/held.rs): a client change landing
            // after this unmarks it, one landing before is what is read.
            self.image.held().mark_sent(offset, n);
            let mut data = self.pipe.buffer(n as usize);
            // Data in memory is copied here; the rest is read off the async
            // workers: a slow disk must not stall the clients' requests or
            // the control socket while the copy runs.
            let (data, read) = if self.image.read_cached(&mut data, offset) {
                (data, Ok(()))
            } else {
                let image = self.image.clone();
                or_cancel(
                    self.cancel,
                    crate::store::offload::run(self.image, move || {
                        let read = image.read_at(&mut data, offset);
                        (data, read)
                    }),
                )
                .await?
                .map_err(AttemptError::Image)?
            };
            read.map_err(AttemptError::Image)?;
            or_cancel(self.cancel, self.pipe.write(offset, &data, true)).await??;
            // A socket with room never makes this loop wait, so it would
            // keep its worker thread for many pieces and stall the clients'
            // requests queued there: let them run between pieces.
            tokio::task::yield_now().await;
            self.count(n);
            offset += n;
        }
        Ok(())
    }

    /// Sends the pieces of the range whose digest differs at the
    /// destination (or that it cannot digest), a few digests in flight at
    /// once so the round trips overlap with the hashing on both sides.
    /// Returns how many bytes differed (and were sent).
    async fn compare_data(&mut self, offset: u64, len: u64) -> Result<u64, AttemptError> {
        use std::collections::VecDeque;
        const PIECE: u64 = 1024 * 1024;
        const AHEAD: usize = 8;
        let end = offset + len;
        let mut pos = offset;
        let mut differed = 0;
        let mut asked: VecDeque<(u64, u64, pipe::Answer)> = VecDeque::new();
        loop {
            while asked.len() < AHEAD && pos < end {
                let n = (end - pos).min(PIECE);
                // Before our own read, as for sending (store/held.rs).
                self.image.held().mark_sent(pos, n);
                let answer = or_cancel(
                    self.cancel,
                    self.pipe.request(cmd::DIGEST, pos, n as u32, 32),
                )
                .await??;
                asked.push_back((pos, n, answer));
                pos += n;
            }
            let Some((at, n, answer)) = asked.pop_front() else {
                return Ok(differed);
            };
            let image = self.image.clone();
            let ours = or_cancel(
                self.cancel,
                crate::store::offload::run(self.image, move || image.digest(at, n)),
            )
            .await?
            .map_err(AttemptError::Image)?
            .map_err(AttemptError::Image)?;
            let (error, theirs) = or_cancel(self.cancel, self.pipe.answer(answer)).await??;
            if error != 0 || theirs[..] != ours[..] {
                self.send_data(at, n).await?;
                differed += n;
            }
        }
    }

    async fn send_hole(
        &mut self,
        mut offset: u64,
        len: u64,
        can_zero: bool,
    ) -> Result<(), AttemptError> {
        // The extents that called this a hole were read before it could
        // be marked sent: mark it, then look again. A client write that
        // lands after the look unmarks it; one before it shows as data
        // here, and the range goes as what it now holds.
        self.image.held().mark_sent(offset, len);
        let still_hole = matches!(
            self.image.extents(offset, len, 1).first(),
            Some(&(n, true)) if n >= len
        );
        if !still_hole {
            return self.send_data(offset, len).await;
        }
        if !can_zero {
            // Zeros the destination recognises and keeps as holes.
            let end = offset + len;
            while offset < end {
                let n = (end - offset).min(self.piece());
                self.throttle(n).await?;
                or_cancel(self.cancel, self.pipe.write_zeros(offset, n as usize)).await??;
                // A socket with room never makes this loop wait, so it would
                // keep its worker thread for many pieces and stall the clients'
                // requests queued there: let them run between pieces.
                tokio::task::yield_now().await;
                self.count(n);
                offset += n;
            }
            return Ok(());
        }
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZERO_CHUNK);
            or_cancel(self.cancel, self.pipe.zeroes(offset, n as u32)).await??;
            offset += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_round_trips_through_its_byte() {
        for p in Phase::ALL {
            assert_eq!(Phase::from_u8(p as u8), Some(p));
            let state = MirrorState::new(None);
            state.set_phase(p);
            assert_eq!(state.phase(), p);
        }
        // No other byte decodes: nothing unknown maps to a phase silently.
        let decoded = (0..=u8::MAX).filter_map(Phase::from_u8).count();
        assert_eq!(decoded, Phase::ALL.len());
    }
}
