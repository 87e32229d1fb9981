//! A long-running server process (`serve` or `listen`): start-up order, the
//! control socket's view of the server, the mirror it may run, signals, the
//! shutdown order and the exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::acl::Acl;
use crate::control::protocol::{parse_bps, parse_mirror, Response};
use crate::control::{self, Controlled};
use crate::handoff::Destination;
use crate::mirror::{self, FirstOutcome, Host, MirrorConfig, MirrorState, Outcome};
use crate::probe::Probe;
use crate::server::{self, Config, Shared};
use crate::signals::{Hangup, Signals};
use crate::status::Status;
use crate::store::Image;
use crate::transport::Transport;
use crate::{error, info, warn};

/// At shutdown, clients get this long to finish their current request.
pub const CLIENT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// `break` and shutdown wait this long for a mirror to stop.
pub const MIRROR_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Which server this process is (decided on with the exit table).
pub use crate::core::exit::Role;
use crate::core::exit::{exit_code, End, MirrorAtSignal};

/// Everything a server needs, parsed and checked.
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub image: Arc<Image>,
    pub sock: Option<PathBuf>,
    pub acl: Acl,
    pub config: Config,
    /// `listen --overwrite-complete`: receive even over an image whose
    /// completion record says it holds a completed migration.
    pub overwrite_complete: bool,
}

/// A running mirror, as the daemon holds it.
struct MirrorHandle {
    id: u64,
    state: Arc<MirrorState>,
    cancel: CancellationToken,
    /// Cancelled when the supervisor has ended.
    done: CancellationToken,
}

/// The server as the control socket and the mirror see it.
pub struct Daemon<T: Transport, P: Probe> {
    pub shared: Arc<Shared<P>>,
    transport: T,
    role: Role,
    /// Set once shutdown has begun: no mirror may start after it.
    shutting_down: AtomicBool,
    /// True in `serve`; `listen` gains it when a migration completes.
    has_control: AtomicBool,
    mirror: Mutex<Option<MirrorHandle>>,
    next_mirror: AtomicU64,
    outcomes: mpsc::UnboundedSender<(u64, Outcome)>,
    control_stop: CancellationToken,
    control_task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    accept_task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl<T: Transport, P: Probe> Daemon<T, P> {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<MirrorHandle>> {
        self.mirror.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> Status {
        let image = &self.shared.image;
        let mut status = Status {
            pid: std::process::id(),
            size: image.size(),
            is_mirroring: false,
            clients_allowed: self.shared.clients_allowed(),
            num_clients: self.shared.num_clients(),
            has_control: self.has_control.load(Ordering::Acquire),
            migration: None,
            extra: Vec::new(),
        };
        if let Some(m) = self.slot().as_ref() {
            status.is_mirroring = true;
            status.migration = Some(m.state.status(image));
            status.extra.push((
                "migration_attempt".into(),
                m.state.attempt.load(Ordering::Acquire).to_string(),
            ));
            status
                .extra
                .push(("migration_state".into(), m.state.phase().name().into()));
            status.extra.extend(m.state.convergence_keys());
            status.extra.extend(m.state.resume_keys());
            status.extra.extend(m.state.window_keys());
        }
        status
    }

    /// Stops the running mirror (if it is not already handing off) and
    /// waits for it. Returns the response `break` gives.
    async fn stop_mirror(&self) -> Response {
        let (cancel, done, state) = match self.slot().as_ref() {
            None => return Response::fail("not mirroring"),
            Some(m) => (m.cancel.clone(), m.done.clone(), m.state.clone()),
        };
        if state.completing.load(Ordering::Acquire) {
            return Response::fail("mirror completed");
        }
        cancel.cancel();
        if tokio::time::timeout(MIRROR_STOP_TIMEOUT, done.cancelled())
            .await
            .is_err()
        {
            warn!(
                "mirror did not stop within {} s",
                MIRROR_STOP_TIMEOUT.as_secs()
            );
        }
        if state.completing.load(Ordering::Acquire) {
            return Response::fail("mirror completed");
        }
        self.slot().take();
        self.shared.image.stop_tracking();
        self.shared.set_clients_allowed(true);
        Response::ok("mirror stopped")
    }
}

impl<T: Transport, P: Probe> Host for Daemon<T, P> {
    fn image(&self) -> &Arc<Image> {
        &self.shared.image
    }

    async fn cut_off_clients(&self, grace: Duration) {
        info!("closing clients to allow mirroring to converge");
        self.shared.close_to_clients();
        if !self.shared.wait_for_no_clients(grace).await {
            warn!(
                "{} clients still busy after {} ms; disconnecting them",
                self.shared.num_clients(),
                grace.as_millis()
            );
            self.shared.abort_clients();
            self.shared
                .wait_for_no_clients(Duration::from_secs(1))
                .await;
        }
    }

    fn allow_clients(&self) {
        self.shared.set_clients_allowed(true);
    }

    async fn close_server(&self) {
        // The control socket first, so a status request can never block the
        // hand-off (C issue #40); then the listening socket.
        self.control_stop.cancel();
        if let Some(task) = self.control_task.lock().await.take() {
            let _ = task.await;
        }
        if let Some(accept) = self
            .accept_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            accept.abort();
        }
    }
}

impl<T: Transport, P: Probe> Controlled for Arc<Daemon<T, P>> {
    fn status_line(&self) -> String {
        self.status().render()
    }

    fn set_acl(&self, entries: &[String]) -> Result<(), String> {
        let default_deny = self.shared.acl().default_deny;
        // The first bad entry is reported as it was given.
        if let Some(bad) = entries
            .iter()
            .find(|e| crate::acl::Entry::parse(e).is_err())
        {
            return Err(bad.clone());
        }
        let acl = Acl::parse(entries, default_deny).map_err(|e| e.to_string())?;
        let stopped = self.shared.set_acl(acl);
        info!(
            "access control list replaced ({} entries); {stopped} clients disconnected",
            entries.len()
        );
        Ok(())
    }

    async fn mirror(&self, args: Vec<String>) -> Response {
        start_mirror(self, args).await.0
    }

    async fn mirror_follow(
        &self,
        args: Vec<String>,
        stop: CancellationToken,
        first: oneshot::Sender<Response>,
    ) -> Option<Response> {
        let (response, watch) = start_mirror(self, args).await;
        let _ = first.send(response);
        let (state, done) = watch?;
        Some(watch_outcome(&state, &done, &stop).await)
    }

    async fn mirror_max_bps(&self, args: Vec<String>) -> Response {
        let state = match self.slot().as_ref() {
            None => return Response::fail("Not currently mirroring"),
            Some(m) => m.state.clone(),
        };
        if args.len() != 1 {
            return Response::fail("Bad format");
        }
        match parse_bps(&args[0]) {
            Ok(bps) => {
                state.set_max_bps(bps);
                info!("migration speed limit set to {bps} bytes/s");
                Response::ok("updated")
            }
            Err(message) => Response::fail(message),
        }
    }

    async fn wait_mirror(&self, stop: CancellationToken) -> Response {
        let (state, done) = match self.slot().as_ref() {
            None => return Response::fail("not mirroring"),
            Some(m) => (m.state.clone(), m.done.clone()),
        };
        watch_outcome(&state, &done, &stop).await
    }

    fn control_step(&self, command: &'static str) -> crate::probe::Action {
        self.shared
            .probe
            .step(crate::probe::Step::Control { command })
    }

    async fn reload_tls(&self) -> Response {
        match &self.shared.config.tls {
            None => Response::fail("no TLS is set up (no --tls-cert): nothing to read again"),
            Some(tls) => match tls.reload_logged().await {
                Ok(line) => Response::ok(line),
                Err(line) => Response::fail(line),
            },
        }
    }

    async fn break_mirror(&self) -> Response {
        let response = self.stop_mirror().await;
        if response.code == 0 {
            info!("mirror stopped by break");
        }
        response
    }
}

/// Starts a mirror: the `mirror` command's response, and for a started
/// mirror its state and "ended" token, to follow it.
async fn start_mirror<T: Transport, P: Probe>(
    daemon: &Arc<Daemon<T, P>>,
    args: Vec<String>,
) -> (Response, Option<(Arc<MirrorState>, CancellationToken)>) {
    let args = match parse_mirror(&args) {
        Ok(a) => a,
        Err(message) => return (Response::fail(message), None),
    };
    // Certificates are files: read off the async workers.
    let tls = if args.tls.any() {
        let files = args.tls.clone();
        let ip = args.target.ip();
        match tokio::task::spawn_blocking(move || files.load(ip)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return (Response::fail(format!("cannot use TLS: {e}")), None),
            Err(e) => return (Response::fail(format!("cannot use TLS: {e}")), None),
        }
    } else {
        None
    };
    if daemon.role == Role::Listen {
        return (
            Response::fail("a migration destination cannot mirror"),
            None,
        );
    }
    let (first_tx, first_rx) = oneshot::channel();
    let watch;
    let id = daemon.next_mirror.fetch_add(1, Ordering::Relaxed);
    {
        // Checked and claimed under one lock: two `mirror` requests at
        // once can never both start (the C version started a second
        // supervisor on the same mirror).
        let mut slot = daemon.slot();
        if daemon.shutting_down.load(Ordering::Acquire) {
            return (Response::fail("shutting down"), None);
        }
        if slot.is_some() {
            return (Response::fail("mirror already running"), None);
        }
        let state = Arc::new(MirrorState::new(args.max_bps));
        let cancel = CancellationToken::new();
        let done = CancellationToken::new();
        let config = MirrorConfig {
            target: args.target,
            bind: args.bind,
            action: args.action,
            request_limit: mirror::request_limit(),
            tls,
            verify: args.verify,
        };
        let task = mirror::supervise(
            daemon.transport.clone(),
            daemon.clone(),
            daemon.shared.probe.clone(),
            config,
            state.clone(),
            cancel.clone(),
            first_tx,
        );
        let outcomes = daemon.outcomes.clone();
        let done_signal = done.clone();
        tokio::spawn(async move {
            let outcome = task.await;
            done_signal.cancel();
            let _ = outcomes.send((id, outcome));
        });
        watch = (state.clone(), done.clone());
        *slot = Some(MirrorHandle {
            id,
            state,
            cancel,
            done,
        });
    }
    info!("mirror to {} requested", args.target);
    // No outcome at all: the supervisor ended before its first attempt
    // had one (`break` or shutdown abandoned it), not a failed connect.
    let first = first_rx.await.ok();
    if first != Some(FirstOutcome::Go) {
        // Nothing is left behind: status, a new `mirror` and the exit
        // code on a signal all behave as if none was started.
        let mut slot = daemon.slot();
        if slot.as_ref().map(|m| m.id) == Some(id) {
            slot.take();
        }
    }
    match first {
        Some(FirstOutcome::Go) => (FirstOutcome::Go.response(), Some(watch)),
        Some(first) => (first.response(), None),
        None => (Response::fail("Mirroring abandoned"), None),
    }
}

/// Waits for a mirror's outcome. The hand-off sets `completing` before it
/// closes the control socket, so a waiter always hears about it before the
/// socket goes away.
async fn watch_outcome(
    state: &MirrorState,
    done: &CancellationToken,
    stop: &CancellationToken,
) -> Response {
    loop {
        if state.completing.load(Ordering::Acquire) {
            return Response::ok("migration complete");
        }
        if done.is_cancelled() {
            return match state.phase() {
                mirror::Phase::Done => Response::ok("migration complete"),
                _ => Response::fail("mirror stopped before completing"),
            };
        }
        if stop.is_cancelled() {
            return Response::fail("shutting down");
        }
        tokio::select! {
            _ = done.cancelled() => {}
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// The killswitch limit: 120 s, or `FLEXNBD_KILLSWITCH_SECS` (seconds, a
/// float) so tests need not wait two minutes.
pub fn killswitch_limit() -> Duration {
    std::env::var("FLEXNBD_KILLSWITCH_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(120))
}

/// Runs `serve` or `listen` until it ends; returns the exit code.
pub async fn run<T: Transport, P: Probe>(
    transport: T,
    role: Role,
    options: ServeOptions,
    probe: Arc<P>,
) -> Result<u8, String> {
    let mut signals =
        Signals::install().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let mut hangup =
        Hangup::install().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let destination = match role {
        Role::Serve => {
            // A half-received copy served even once must never be resumed
            // into: its checkpoint goes, durably, before the port opens.
            let path = options.image.path().to_owned();
            let files = options.image.files().clone();
            options
                .image
                .offload()
                .run(move || {
                    crate::handoff::drop_resume(
                        &*files,
                        &path,
                        "must not be resumed into an image that `flexnbd serve` serves",
                    )
                })
                .await
                .map_err(|e| format!("cannot check the marker beside the image: {e}"))??;
            None
        }
        // The completion record is checked, and the marker exists durably,
        // before the port accepts anything. File operations: off the async
        // workers, like every marker change.
        Role::Listen => {
            let path = options.image.path().to_owned();
            let overwrite = options.overwrite_complete;
            let files = options.image.files().clone();
            let prepared = options
                .image
                .offload()
                .run(move || Destination::prepare(files, &path, overwrite))
                .await
                .map_err(|e| format!("cannot prepare the destination: {e}"))??;
            Some(Arc::new(prepared))
        }
    };
    if role == Role::Listen {
        options.image.set_eager_writeback(true);
    }
    let (listener, local) = server::bind(&transport, options.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", options.listen))?;
    info!("listening on {local}");
    let shared = Shared::with_destination(
        options.image.clone(),
        options.config,
        options.acl,
        probe,
        destination.clone(),
    );
    let (outcomes_tx, mut outcomes) = mpsc::unbounded_channel();
    let daemon = Arc::new(Daemon {
        shared: shared.clone(),
        transport: transport.clone(),
        role,
        shutting_down: AtomicBool::new(false),
        has_control: AtomicBool::new(role == Role::Serve),
        mirror: Mutex::new(None),
        next_mirror: AtomicU64::new(1),
        outcomes: outcomes_tx,
        control_stop: CancellationToken::new(),
        control_task: tokio::sync::Mutex::new(None),
        accept_task: Mutex::new(None),
    });

    // The control socket appears only once the port listens: its existence
    // means "ready".
    if let Some(path) = &options.sock {
        let listener = control::bind(path).map_err(|e| e.to_string())?;
        info!("control socket at {}", path.display());
        let task = tokio::spawn(control::serve(
            listener,
            path.clone(),
            Arc::new(daemon.clone()),
            daemon.control_stop.clone(),
        ));
        *daemon.control_task.lock().await = Some(task);
    }

    let scan_image = options.image.clone();
    tokio::task::spawn_blocking(move || {
        match scan_image.scan_allocation() {
        Ok(()) => info!("allocation map built"),
        Err(e) => warn!(
            "allocation map not built ({e}): holes are asked of the file system on each request instead"
        ),
    }
    });
    let accept = tokio::spawn(server::accept_loop::<T, P>(listener, shared.clone()));
    *daemon.accept_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(accept.abort_handle());

    let migrated_in = destination
        .as_ref()
        .map(|d| d.completed.clone())
        .unwrap_or_default();
    let end = loop {
        tokio::select! {
            signal = signals.next() => break End::Signal(signal),
            () = hangup.recv() => match &shared.config.tls {
                // Logged by reload_logged, success or not; the server runs
                // on either way.
                Some(tls) => {
                    let _ = tls.reload_logged().await;
                }
                None => info!("received SIGHUP: no TLS is set up, nothing to read again"),
            },
            _ = migrated_in.cancelled(), if destination.is_some() => break End::MigratedIn,
            Some((id, outcome)) = outcomes.recv() => match outcome {
                Outcome::HandedOff => break End::HandedOff,
                Outcome::DisconnectFailed(why) => break End::HandOffFailed(why),
                Outcome::CopiedAndKept | Outcome::Abandoned | Outcome::FirstAttemptFailed(_) => {
                    let mut slot = daemon.slot();
                    if slot.as_ref().map(|m| m.id) == Some(id) {
                        slot.take();
                    }
                }
            },
        }
    };

    match &end {
        End::Signal(signal) => info!("received {signal}, shutting down"),
        End::HandedOff => info!("server closed, quitting after successful migration"),
        End::HandOffFailed(why) => error!("hand-off failed: {why}"),
        End::MigratedIn => {
            daemon.has_control.store(true, Ordering::Release);
            info!("migration received; quitting");
        }
    }
    {
        // No mirror may start from here on.
        let _slot = daemon.slot();
        daemon.shutting_down.store(true, Ordering::Release);
    }
    let mut mirror_at_signal = MirrorAtSignal::None;
    if let End::Signal(_) = end {
        let running = daemon
            .slot()
            .as_ref()
            .map(|m| (m.state.clone(), m.done.clone()));
        if let Some((state, done)) = running {
            if state.completing.load(Ordering::Acquire) {
                // Inside the hand-off: let it finish; its outcome decides.
                info!("a migration is handing off; waiting for it");
                let _ = tokio::time::timeout(mirror::request_limit() * 2, done.cancelled()).await;
                mirror_at_signal = MirrorAtSignal::HandedOff(matches!(
                    outcomes.try_recv(),
                    Ok((_, Outcome::HandedOff))
                ));
            } else {
                mirror_at_signal = MirrorAtSignal::Stopped;
                daemon.stop_mirror().await;
            }
        }
    }
    let code = exit_code(role, &end, mirror_at_signal);
    // The shutdown order: clients, control socket, listening socket, map scan.
    shared.close_to_clients();
    daemon.control_stop.cancel();
    if let Some(task) = daemon.control_task.lock().await.take() {
        let _ = task.await;
    }
    accept.abort();
    let _ = accept.await;
    options.image.stop_scan();
    if !shared.wait_for_no_clients(CLIENT_DRAIN_TIMEOUT).await {
        error!(
            "{} clients still busy after {} s; exiting without them",
            shared.num_clients(),
            CLIENT_DRAIN_TIMEOUT.as_secs()
        );
    }
    info!("shut down with exit code {code}");
    Ok(code)
}
