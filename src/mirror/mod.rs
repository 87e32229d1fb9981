//! The migration source: copies the served image to a `flexnbd listen`
//! while clients keep writing, then hands off (docs/handoff.md).
//!
//! [`supervise`] runs attempts: the first attempt's connection outcome is
//! reported to the `mirror` caller and never retried; after `Mirror started`
//! every failure is retried from scratch, forever, one second apart, each
//! attempt with a fresh connection and fresh state, until success, `break`
//! or a signal. [`attempt`] is one copy: a sweep of the whole image
//! (allocated ranges as data, holes as WRITE_ZEROES where the destination
//! offers it), passes over the ranges clients dirtied meanwhile, the client
//! cut-off once the remainder is small, entrust, and the hand-off. How
//! small is small, and how fast clients may dirty the image meanwhile, is
//! decided in [`policy`] from the destination's costs as its replies show
//! them, so a destination that syncs every write (the C flexnbd) still
//! converges with a short lock-out.

mod pipe;
pub mod policy;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::client;
use crate::control::protocol::{MirrorAction, Response};
use crate::fault_apply::{self, How, Incoming};
use crate::log::monotonic_ms;
use crate::probe::{Probe, Step};
use crate::proto::{self, cmd, errno};
use crate::status::MigrationStatus;
use crate::store::Image;
use crate::transport::Transport;
use crate::{info, warn};
use pipe::{Pipe, PipeError};
use policy::{Bottleneck, Capacity, Convergence, Estimate};

/// Outgoing connections give up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The whole greeting must arrive within this.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Between a failed attempt and the next.
pub const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Largest data write the sweep sends.
pub const CHUNK: u64 = 1024 * 1024;
/// Largest WRITE_ZEROES the sweep sends for a hole.
pub const ZERO_CHUNK: u64 = 1024 * 1024 * 1024;
/// The sweep clears dirty bits and reads extents a window at a time.
const WINDOW: u64 = 64 * 1024 * 1024;
/// A flush this quick means the destination has little left to sync.
const QUICK_FLUSH: Duration = Duration::from_millis(10);
/// Flushes before the cut-off, at most (clients keep dirtying meanwhile).
const MAX_FLUSHES: u32 = 4;
/// At the cut-off, clients get this long to finish their current request
/// before their connections are torn down.
pub const CUTOFF_GRACE: Duration = Duration::from_secs(2);

/// The no-progress timeout: 60 s, or `FLEXNBD_MS_REQUEST_LIMIT_SECS`
/// (seconds, a float).
pub fn request_limit() -> Duration {
    std::env::var("FLEXNBD_MS_REQUEST_LIMIT_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(60))
}

/// How the first attempt ended, as the `mirror` caller is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstOutcome {
    Go,
    FailConnect,
    Rejected,
    NoHello,
    SizeMismatch,
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
}

/// The phase an attempt is in (for status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Connecting = 0,
    Copying = 1,
    Converging = 2,
    Entrusting = 3,
    HandingOff = 4,
    Retrying = 5,
    Done = 6,
}

impl Phase {
    /// Every phase, each at the index of its discriminant: the one table
    /// [`Phase::from_u8`] decodes with (checked below when compiling).
    const ALL: [Phase; 7] = [
        Phase::Connecting,
        Phase::Copying,
        Phase::Converging,
        Phase::Entrusting,
        Phase::HandingOff,
        Phase::Retrying,
        Phase::Done,
    ];

    /// The phase stored as `v` by [`MirrorState::set_phase`]; `None` for a
    /// byte no phase is stored as (a variant missing from [`Phase::ALL`]).
    fn from_u8(v: u8) -> Option<Phase> {
        Phase::ALL.get(usize::from(v)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Copying => "copying",
            Phase::Converging => "converging",
            Phase::Entrusting => "entrusting",
            Phase::HandingOff => "handing_off",
            Phase::Retrying => "retrying",
            Phase::Done => "done",
        }
    }
}

// A phase is stored as its discriminant and decoded by indexing ALL, so each
// must sit at its own index. A variant left out of ALL decodes as None, which
// `MirrorState::phase` reports as a bug rather than reading as another phase.
const _: () = {
    let mut i = 0;
    while i < Phase::ALL.len() {
        assert!(
            Phase::ALL[i] as usize == i,
            "Phase::ALL out of discriminant order"
        );
        i += 1;
    }
};

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
    allowance_us: AtomicU64,
    bottleneck: AtomicU8,
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
            allowance_us: AtomicU64::new(0),
            bottleneck: AtomicU8::new(Bottleneck::Unknown as u8),
        }
    }

    fn set_estimate(&self, e: &Estimate) {
        let us = e
            .remainder
            .map_or(u64::MAX, |r| r.as_micros().min(u64::MAX as u128 - 1) as u64);
        self.remainder_us.store(us, Ordering::Release);
        self.allowance_us
            .store(e.allowance.as_micros() as u64, Ordering::Release);
        self.bottleneck.store(e.bottleneck as u8, Ordering::Release);
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
        let bytes_left = image.dirty_bytes() + (image.size() - swept);
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

/// How a mirror ended.
#[derive(Debug)]
pub enum Outcome {
    /// The first attempt failed; the caller was told and nothing is retried.
    FirstAttemptFailed(FirstOutcome),
    /// `break` or shutdown.
    Abandoned,
    /// Everything was copied and action `nothing` was asked: keep serving.
    CopiedAndKept,
    /// The destination was handed the image: the source must exit 0.
    HandedOff,
    /// Everything was durable at the destination but the DISCONNECT could
    /// not be sent: exit non-zero so nobody takes this for a completed
    /// migration.
    DisconnectFailed(String),
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
    #[error("the destination answered entrust with error {0}")]
    EntrustRefused(u32),
    #[error("the destination answered the final flush with error {0}")]
    FlushRefused(u32),
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
    let mut first = Some(first);
    loop {
        state.begin_attempt();
        let n = state.attempt.load(Ordering::Acquire);
        let result = attempt(
            &transport, &*host, &probe, &config, &state, &cancel, &mut first,
        )
        .await;
        match result {
            Ok(outcome) => {
                host.image().stop_tracking();
                state.set_phase(Phase::Done);
                return outcome;
            }
            Err(AttemptError::First(e)) if first.is_some() => {
                warn!("migration to {} failed: {}", config.target, e.message);
                host.image().stop_tracking();
                if let Some(tx) = first.take() {
                    let _ = tx.send(e.outcome);
                }
                return Outcome::FirstAttemptFailed(e.outcome);
            }
            Err(AttemptError::Cancelled) => {
                host.image().stop_tracking();
                host.allow_clients();
                return Outcome::Abandoned;
            }
            Err(e) => {
                warn!(
                    "migration attempt {n} to {} failed: {e}; retrying in {} s",
                    config.target,
                    RETRY_DELAY.as_secs()
                );
                host.image().set_pace(None, u64::MAX);
                host.allow_clients();
                state.set_phase(Phase::Retrying);
                tokio::select! {
                    _ = cancel.cancelled() => {
                        host.image().stop_tracking();
                        return Outcome::Abandoned;
                    }
                    _ = tokio::time::sleep(RETRY_DELAY) => {}
                }
            }
        }
    }
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

async fn attempt<T: Transport, H: Host, P: Probe>(
    transport: &T,
    host: &H,
    probe: &Arc<P>,
    config: &MirrorConfig,
    state: &MirrorState,
    cancel: &CancellationToken,
    first: &mut Option<oneshot::Sender<FirstOutcome>>,
) -> Result<Outcome, AttemptError> {
    let image = host.image().clone();
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
            transport.connect(config.target, bind, CONNECT_TIMEOUT),
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
    if let Some(tx) = first.take() {
        let _ = tx.send(FirstOutcome::Go);
    }
    info!(
        "migration attempt {} connected to {} ({:?} handshake{}, flags 0x{:04x})",
        state.attempt.load(Ordering::Acquire),
        config.target,
        export.handshake,
        if stream.is_tls() { ", TLS" } else { "" },
        export.flags
    );

    // 2. Track changes from here on. The sweep need not wait for the
    //    allocation map: until it is built, extents come from the file.
    image.start_tracking();
    state.set_phase(Phase::Copying);
    let can_zero = export.flags & proto::flags::SEND_WRITE_ZEROES != 0;
    let can_flush = export.flags & proto::flags::SEND_FLUSH != 0;
    let mut pipe = Pipe::new(stream, config.request_limit, probe.clone());
    let started = Instant::now();
    let mut copier = Copier {
        pipe: &mut pipe,
        image: &image,
        state,
        cancel,
        link_free: None,
    };

    // 3. The sweep: every byte once.
    let size = image.size();
    let mut window_start = 0u64;
    while window_start < size {
        let window_len = WINDOW.min(size - window_start);
        // Clear first, then look: a write that lands after the clear is
        // either seen by the reads below or marked dirty again.
        image.clear_dirty(window_start, window_len);
        // Clients' changes behind the end of this window will have to be
        // sent again: pace them to what the destination can take, as
        // measured so far (policy.rs), so that the dirty passes after the
        // sweep start with little to do. Changes ahead of it cost nothing.
        image.set_pace(
            copier.capacity().map(|c| c.pace_rates()),
            window_start + window_len,
        );
        let mut pos = window_start;
        for (len, hole) in image.extents(window_start, window_len, usize::MAX) {
            if hole {
                copier.send_hole(pos, len, can_zero).await?;
            } else {
                // A chunk at a time, so status shows progress inside a long
                // extent (a throttled 8 MiB extent would otherwise show none).
                let end = pos + len;
                let mut at = pos;
                while at < end {
                    let n = (end - at).min(CHUNK);
                    copier.send_data(at, n).await?;
                    at += n;
                    state.sweep_offset.store(at, Ordering::Release);
                    image.set_pace(
                        copier.capacity().map(|c| c.pace_rates()),
                        window_start + window_len,
                    );
                }
            }
            pos += len;
            state.sweep_offset.store(pos, Ordering::Release);
        }
        window_start += window_len;
    }
    state.sweep_offset.store(size, Ordering::Release);

    // 4. Dirty passes until the remainder is small enough to cut off. The
    //    first time it is, FLUSH: the bulk becomes durable while clients
    //    still run, so the entrust after the cut-off syncs only a little.
    state.set_phase(Phase::Converging);
    let converging_since = Instant::now();
    let sweep_time = started.elapsed();
    let convergence = Convergence::new(converging_since);
    // Flushing repeats until one is quick: then little is left for the
    // destination to make durable at entrust, while clients are shut out.
    let mut flushed = !can_flush;
    let mut flushes = 0;
    let mut gap;
    // When the next "not converging" warning is due (then every minute).
    let mut warn_at = converging_since + policy::PATIENCE * 2;
    loop {
        // The migration's speed as measured so far (the destination's
        // costs, the speed limit, the connection's throughput) decides how
        // far apart dirty ranges may be and still go as one write, and how
        // fast clients may dirty more (policy.rs).
        let capacity = copier.capacity();
        gap = capacity.map_or(0, |c| c.gap(crate::store::BLOCK_SIZE));
        image.set_pace(capacity.map(|c| c.pace_rates()), u64::MAX);
        let ranges = image.take_dirty(WINDOW, CHUNK, gap);
        for (offset, len) in &ranges {
            copier.send_data(*offset, *len).await?;
        }
        let (in_flight, in_flight_bytes) = copier.pipe.in_flight();
        let remaining = image.dirty_bytes() + in_flight_bytes;
        let requests =
            |most: u64| in_flight + image.dirty_runs(gap, most.saturating_sub(in_flight));
        let now = Instant::now();
        let estimate = convergence.estimate(remaining, requests, capacity, now);
        state.set_estimate(&estimate);
        if !estimate.ready() && now >= warn_at {
            warn_at = now + Duration::from_secs(60);
            warn!(
                "migration to {} not converging after {:.0} s: {}",
                config.target,
                converging_since.elapsed().as_secs_f64(),
                not_converging_reason(&estimate, remaining, state.max_bps())
            );
        }
        if estimate.ready() {
            if flushed {
                let per = capacity.map_or(String::new(), |c| {
                    format!(
                        "; the destination takes {:.3} ms a write plus {:.0} MB/s{}",
                        c.destination.per_request * 1e3,
                        1e-6 / c.destination.per_byte.max(1e-15),
                        if c.rate.is_finite() {
                            format!(
                                ", the {} {:.1} MB/s",
                                if estimate.bottleneck == Bottleneck::Link {
                                    "connection carries"
                                } else {
                                    "copy is held to"
                                },
                                c.rate * 1e-6
                            )
                        } else {
                            String::new()
                        }
                    )
                });
                info!(
                    "converged after {:.3} s of dirty passes (the sweep took {:.3} s): \
                     {remaining} bytes left at the cut-off{per}",
                    converging_since.elapsed().as_secs_f64(),
                    sweep_time.as_secs_f64(),
                );
                break;
            }
            or_cancel(cancel, copier.pipe.wait_idle()).await??;
            let flush_started = Instant::now();
            let error = or_cancel(cancel, copier.pipe.call(cmd::FLUSH)).await??;
            if error != 0 {
                return Err(AttemptError::FlushRefused(error));
            }
            flushes += 1;
            flushed = flush_started.elapsed() <= QUICK_FLUSH || flushes >= MAX_FLUSHES;
            continue;
        }
        if ranges.is_empty() {
            // Nothing dirty right now: wait for the writes in flight, then look again.
            or_cancel(cancel, copier.pipe.wait_idle()).await??;
        }
    }

    // 5. Cut clients off and send the last changes.
    let cut_at = Instant::now();
    image.set_pace(None, u64::MAX);
    or_cancel(cancel, host.cut_off_clients(CUTOFF_GRACE)).await?;
    loop {
        let ranges = image.take_dirty(u64::MAX, CHUNK, gap);
        if ranges.is_empty() {
            break;
        }
        for (offset, len) in ranges {
            copier.send_data(offset, len).await?;
        }
    }
    or_cancel(cancel, copier.pipe.wait_idle()).await??;

    // 6. Entrust: answered only once the destination has everything durable.
    state.set_phase(Phase::Entrusting);
    let error = or_cancel(cancel, copier.pipe.call(cmd::ENTRUST)).await??;
    match error {
        0 => {}
        errno::EINVAL => {
            // An old (C) destination: it syncs every write, and FLUSH covers
            // anything else.
            info!("destination does not know entrust; sending FLUSH instead");
            let error = or_cancel(cancel, copier.pipe.call(cmd::FLUSH)).await??;
            if error != 0 {
                return Err(AttemptError::FlushRefused(error));
            }
        }
        other => return Err(AttemptError::EntrustRefused(other)),
    }

    if config.action == MirrorAction::Nothing {
        info!("migration copied everything; action 'nothing': serving on");
        image.stop_tracking();
        host.allow_clients();
        let lockout = cut_at.elapsed();
        state
            .lockout_us
            .fetch_max(lockout.as_micros() as u64, Ordering::AcqRel);
        return Ok(Outcome::CopiedAndKept);
    }

    // 7. The hand-off. Past this point nothing is abandoned.
    state.completing.store(true, Ordering::Release);
    state.set_phase(Phase::HandingOff);
    host.close_server().await;
    if config.action == MirrorAction::Unlink {
        let path = image.path().to_owned();
        if let Err(e) = crate::handoff::unlink_durably(&**image.files(), &path) {
            // The source stays canonical (table row 1): do not hand off.
            return Ok(Outcome::DisconnectFailed(format!(
                "cannot unlink {}: {e}",
                path.display()
            )));
        }
        info!("unlinked {}", path.display());
    }
    let lockout = cut_at.elapsed();
    state
        .lockout_us
        .fetch_max(lockout.as_micros() as u64, Ordering::AcqRel);
    match pipe.disconnect().await {
        Ok(()) => {
            info!(
                "migration complete: DISCONNECT sent to {}; clients were shut out for {:?}",
                config.target, lockout
            );
            crate::fault_apply::milestone(&**probe, Step::MirrorDisconnectSent).await;
            Ok(Outcome::HandedOff)
        }
        Err(e) => Ok(Outcome::DisconnectFailed(format!(
            "sending DISCONNECT to {} failed: {e}",
            config.target
        ))),
    }
}

/// Why a converging migration has not cut off, in words for the log.
fn not_converging_reason(e: &Estimate, remaining: u64, limit: Option<u64>) -> String {
    let Some(remainder) = e.remainder else {
        return "the destination's speed is not measured yet".into();
    };
    let limit = limit.map_or(String::new(), |l| format!(" ({l} B/s)"));
    let what = match e.bottleneck {
        Bottleneck::SpeedLimit => format!("the speed limit{limit}"),
        Bottleneck::Link => "the connection's throughput".into(),
        Bottleneck::Destination | Bottleneck::Unknown => "the destination's speed".into(),
    };
    format!(
        "{remaining} bytes still dirty would shut clients out for {} ms at {what}, \
         over the {} ms the cut-off allows; clients write faster than that lets the copy \
         catch up even paced, so clients stay paced and the migration keeps trying \
         (raise the limit with mirror-speed, or stop it with break)",
        remainder.as_millis(),
        e.allowance.as_millis()
    )
}

/// How far behind the speed limit's schedule the copy may fall and still
/// catch up at once: the most it ever sends above the limit in a burst.
const THROTTLE_SLACK: Duration = Duration::from_millis(10);

/// Sends image ranges through the pipe, honouring the speed limit.
struct Copier<'a, S: crate::transport::Stream, P: Probe> {
    pipe: &'a mut Pipe<S, P>,
    image: &'a Arc<Image>,
    state: &'a MirrorState,
    cancel: &'a CancellationToken,
    /// When the speed limit lets the next piece go: each piece moves it on
    /// by its own time at the limit then in force. Never earlier than the
    /// last send, so idle time earns no burst, and a limit lowered in the
    /// middle costs at most one piece at the old rate, not the whole
    /// migration's average.
    link_free: Option<Instant>,
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

    async fn send_hole(
        &mut self,
        mut offset: u64,
        len: u64,
        can_zero: bool,
    ) -> Result<(), AttemptError> {
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

    #[test]
    fn phase_names_are_unique() {
        let mut names: Vec<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Phase::ALL.len(), "{names:?}");
    }
}
