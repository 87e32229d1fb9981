//! A long-running server process (`serve`): start-up order, the control
//! socket's view of the server, signals and the shutdown order.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::acl::Acl;
use crate::control::protocol::{parse_bps, parse_mirror, Response};
use crate::control::{self, Controlled};
use crate::probe::Probe;
use crate::server::{self, Config, Shared};
use crate::status::Status;
use crate::store::Image;
use crate::transport::Transport;
use crate::{error, info, warn};

/// At shutdown, clients get this long to finish their current request.
pub const CLIENT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything `serve` needs, parsed and checked.
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub image: Arc<Image>,
    pub sock: Option<PathBuf>,
    pub acl: Acl,
    pub config: Config,
}

/// The server as the control socket sees it.
pub struct Daemon<P: Probe> {
    pub shared: Arc<Shared<P>>,
    /// Set once shutdown has begun: no mirror may start after it.
    shutting_down: AtomicBool,
    /// True in `serve` (the source of truth); `listen` gains it on hand-off.
    has_control: AtomicBool,
}

impl<P: Probe> Daemon<P> {
    pub fn new(shared: Arc<Shared<P>>, has_control: bool) -> Daemon<P> {
        Daemon {
            shared,
            shutting_down: AtomicBool::new(false),
            has_control: AtomicBool::new(has_control),
        }
    }

    pub fn status(&self) -> Status {
        Status {
            pid: std::process::id(),
            size: self.shared.image.size(),
            is_mirroring: false,
            clients_allowed: self.shared.clients_allowed(),
            num_clients: self.shared.num_clients(),
            has_control: self.has_control.load(Ordering::Acquire),
            migration: None,
            extra: Vec::new(),
        }
    }
}

impl<P: Probe> Controlled for Daemon<P> {
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
        if let Err(message) = parse_mirror(&args) {
            return Response::fail(message);
        }
        if self.shutting_down.load(Ordering::Acquire) {
            return Response::fail("shutting down");
        }
        Response::fail("Mirror failed to connect: migration is not available in this build")
    }

    async fn mirror_max_bps(&self, args: Vec<String>) -> Response {
        if args.len() != 1 {
            return Response::fail("Bad format");
        }
        if let Err(message) = parse_bps(&args[0]) {
            return Response::fail(message);
        }
        Response::fail("Not currently mirroring")
    }

    async fn break_mirror(&self) -> Response {
        Response::fail("not mirroring")
    }
}

/// The signals that stop a server.
struct Signals {
    term: Signal,
    int: Signal,
    quit: Signal,
}

impl Signals {
    /// Installed before anything listens, so a signal that arrives as soon
    /// as the port is ready is handled, never fatal.
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.quit.recv() => "SIGQUIT",
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

/// Runs `serve` until a signal; returns the exit code.
pub async fn run_serve<T: Transport, P: Probe>(
    transport: T,
    options: ServeOptions,
    probe: Arc<P>,
) -> Result<u8, String> {
    let mut signals =
        Signals::install().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let (listener, local) = server::bind(&transport, options.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", options.listen))?;
    info!("listening on {local}");
    let shared = Shared::new(options.image.clone(), options.config, options.acl, probe);
    let daemon = Arc::new(Daemon::new(shared.clone(), true));

    // The control socket appears only once the port listens: its existence
    // means "ready".
    let control_stop = CancellationToken::new();
    let control_task = match &options.sock {
        Some(path) => {
            let listener = control::bind(path).map_err(|e| e.to_string())?;
            info!("control socket at {}", path.display());
            Some(tokio::spawn(control::serve(
                listener,
                path.clone(),
                daemon.clone(),
                control_stop.clone(),
            )))
        }
        None => None,
    };

    let scan_image = options.image.clone();
    tokio::task::spawn_blocking(move || match scan_image.scan_allocation() {
        Ok(()) => info!("allocation map built"),
        Err(e) => warn!("allocation map not built, serving without hole detection: {e}"),
    });
    let accept = tokio::spawn(server::accept_loop::<T, P>(listener, shared.clone()));

    let signal = signals.next().await;
    info!("received {signal}, shutting down");
    daemon.shutting_down.store(true, Ordering::Release);
    // 1. Ask every client to stop after its current request.
    shared.stop_clients();
    // 2. Close the control socket first and wait for its connections, so a
    //    status request arriving during teardown can never block it.
    control_stop.cancel();
    if let Some(task) = control_task {
        let _ = task.await;
    }
    // 3. Close the listening socket.
    accept.abort();
    let _ = accept.await;
    // 4. Stop the allocation map scan.
    options.image.stop_scan();
    // 5. Wait for the clients.
    if !shared.wait_for_no_clients(CLIENT_DRAIN_TIMEOUT).await {
        error!(
            "{} clients still busy after {} s; exiting without them",
            shared.num_clients(),
            CLIENT_DRAIN_TIMEOUT.as_secs()
        );
    }
    info!("shut down");
    Ok(0)
}
