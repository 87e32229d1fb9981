//! The NBD server: accept loop, client slots, ACL, and per-connection tasks.

mod batch;
mod dest_hook;
mod digest;
mod exec;
mod framing;
mod negotiate;
#[cfg(test)]
mod testkit;
mod transmission;
pub(crate) mod writer;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::acl::Acl;
use crate::fault_apply::{self, How};
use crate::probe::{Probe, Step};
use crate::proto::flags;
use crate::store::Image;
use crate::transport::{Listener, Transport};
use crate::{debug, error, info, warn};

pub use negotiate::Negotiated;
pub(crate) use negotiate::{negotiate, NegotiateError, Offer};
pub use transmission::serve_client;

/// Which greeting the server sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeMode {
    /// The 152-byte greeting of the C flexnbd: no negotiation.
    Oldstyle,
    /// Fixed newstyle with options (GO, INFO, structured replies, ...).
    Newstyle,
}

/// Settings for one server.
#[derive(Clone, Debug)]
pub struct Config {
    pub handshake: HandshakeMode,
    /// Connections beyond this many are closed at once, with no greeting.
    pub max_clients: usize,
    /// A newstyle client that has not finished negotiating by then is dropped.
    pub handshake_timeout: Duration,
    /// With `--killswitch`: a request cycle longer than this drops the client.
    pub killswitch: Option<Duration>,
    /// With `--oldstyle-extra-flags`: the oldstyle greeting also advertises
    /// what we implement beyond the C flexnbd (see [`oldstyle_flags`]).
    pub oldstyle_extra_flags: bool,
    /// With `--tls-cert`: STARTTLS is offered (and, by default, required).
    /// Newstyle only: the oldstyle greeting has no way to start TLS.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    /// The flexnbd extensions offered in the handshake ([`crate::proto::ext`]):
    /// `listen` offers resuming; `serve` offers nothing, so its greeting is
    /// the C flexnbd's byte for byte.
    pub extensions: u32,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            handshake: HandshakeMode::Oldstyle,
            max_clients: 16,
            handshake_timeout: Duration::from_secs(10),
            killswitch: None,
            oldstyle_extra_flags: false,
            tls: None,
            extensions: 0,
        }
    }
}

/// The flags of the C flexnbd's greeting: HAS_FLAGS, SEND_FLUSH, SEND_FUA.
/// Tools written against it compare the greeting's flags with exactly this.
pub const C_OLDSTYLE_FLAGS: u16 = flags::HAS_FLAGS | flags::SEND_FLUSH | flags::SEND_FUA;

/// The transmission flags of the oldstyle greeting: the C flexnbd's by
/// default, so the greeting is byte-identical to it; with `extra`, also
/// TRIM, WRITE_ZEROES, MULTI_CONN and CACHE. Requests of those kinds are
/// served either way: the flags only tell clients they may send them.
pub fn oldstyle_flags(extra: bool) -> u16 {
    if extra {
        transmission_flags()
    } else {
        C_OLDSTYLE_FLAGS
    }
}

/// The transmission flags we really support with simple replies (the
/// negotiation adds SEND_DF once structured replies are chosen).
pub fn transmission_flags() -> u16 {
    flags::HAS_FLAGS
        | flags::SEND_FLUSH
        | flags::SEND_FUA
        | flags::SEND_TRIM
        | flags::SEND_WRITE_ZEROES
        | flags::CAN_MULTI_CONN
        | flags::SEND_CACHE
}

/// One connected client, as the registry sees it.
struct ClientEntry {
    peer: SocketAddr,
    stop: CancellationToken,
    /// Tears the connection down at once (a client still busy when the
    /// migration cut-off's grace period ends).
    abort: Option<tokio::task::AbortHandle>,
}

/// State shared by the accept loop, every connection and the control socket.
pub struct Shared<P: Probe> {
    pub image: Arc<Image>,
    pub config: Config,
    pub probe: Arc<P>,
    acl: RwLock<Arc<Acl>>,
    /// Live connections, so an ACL change or a shutdown can stop them.
    clients: Mutex<HashMap<u64, ClientEntry>>,
    next_client: AtomicU64,
    /// Signalled whenever a client leaves.
    client_left: Notify,
    /// Cleared during a migration's endgame: new connections are closed at
    /// once, with no greeting.
    clients_allowed: AtomicBool,
    /// Set in `listen`: the migration destination's marker and hand-off.
    pub destination: Option<Arc<crate::handoff::Destination>>,
    /// Slots for reads waiting for the disk on their own, over every
    /// connection of this server.
    pub deferred_reads: Arc<tokio::sync::Semaphore>,
}

impl<P: Probe> Shared<P> {
    pub fn new(image: Arc<Image>, config: Config, acl: Acl, probe: Arc<P>) -> Arc<Shared<P>> {
        Shared::with_destination(image, config, acl, probe, None)
    }

    pub fn with_destination(
        image: Arc<Image>,
        config: Config,
        acl: Acl,
        probe: Arc<P>,
        destination: Option<Arc<crate::handoff::Destination>>,
    ) -> Arc<Shared<P>> {
        Arc::new(Shared {
            image,
            config,
            probe,
            acl: RwLock::new(Arc::new(acl)),
            clients: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(0),
            client_left: Notify::new(),
            clients_allowed: AtomicBool::new(true),
            destination,
            deferred_reads: Arc::new(tokio::sync::Semaphore::new(batch::ALL_DEFERRED_READS)),
        })
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ClientEntry>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn num_clients(&self) -> usize {
        self.registry().len()
    }

    pub fn acl(&self) -> Arc<Acl> {
        self.acl.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the ACL atomically and stops every client it no longer
    /// allows (after its current request). Returns how many were stopped.
    pub fn set_acl(&self, acl: Acl) -> usize {
        let acl = Arc::new(acl);
        *self.acl.write().unwrap_or_else(|p| p.into_inner()) = acl.clone();
        let mut stopped = 0;
        for entry in self.registry().values() {
            if !acl.allows(entry.peer.ip()) {
                warn!(
                    "client {} is no longer allowed by the access control list; disconnecting it",
                    entry.peer
                );
                entry.stop.cancel();
                stopped += 1;
            }
        }
        stopped
    }

    pub fn clients_allowed(&self) -> bool {
        self.clients_allowed.load(Ordering::Acquire)
    }

    pub fn set_clients_allowed(&self, allowed: bool) {
        self.clients_allowed.store(allowed, Ordering::Release);
    }

    /// Tears down every client connection at once.
    pub fn abort_clients(&self) {
        for entry in self.registry().values() {
            if let Some(abort) = &entry.abort {
                abort.abort();
            }
        }
    }

    /// Asks every client to stop after its current request.
    pub fn stop_clients(&self) {
        for entry in self.registry().values() {
            entry.stop.cancel();
        }
    }

    /// Refuses new clients and stops every connected one, in one step under
    /// the registry lock: a connection accepted at the same moment is either
    /// stopped here or refused when it registers, never missed.
    pub fn close_to_clients(&self) {
        let registry = self.registry();
        self.clients_allowed.store(false, Ordering::Release);
        for entry in registry.values() {
            entry.stop.cancel();
        }
    }

    /// Waits until no client is connected, for at most `limit`. Returns
    /// whether they all left.
    pub async fn wait_for_no_clients(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = self.client_left.notified();
            if self.num_clients() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, left).await.is_err() {
                return self.num_clients() == 0;
            }
        }
    }
}

/// Removes a client from the registry when its task ends, however it ends.
struct Registration<P: Probe> {
    shared: Arc<Shared<P>>,
    id: u64,
}

impl<P: Probe> Drop for Registration<P> {
    fn drop(&mut self) {
        self.shared.registry().remove(&self.id);
        self.shared.client_left.notify_waiters();
    }
}

/// Accepts connections forever, giving each permitted client a task.
/// Log lines for connections refused for one reason, at most one a
/// second: a flood of connects must not become a flood of log lines (a
/// write on the accept loop for each, and a log that fills the disk). The
/// first refusal is logged at once; the refusals in the second after a
/// line are counted, and the next line says how many there were.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    /// No line before this.
    quiet_until: Option<tokio::time::Instant>,
    /// Refusals not logged since the last line.
    unlogged: u64,
}

/// How long after one line about refused connections the next may come.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

impl RefusalLog {
    /// A refusal at `now`: `Some(n)` to log it, saying that `n` more were
    /// refused since the last line; `None` to count it silently.
    pub(crate) fn refuse(&mut self, now: tokio::time::Instant) -> Option<u64> {
        match self.quiet_until {
            Some(until) if now < until => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.quiet_until = Some(now + REFUSAL_LOG_EVERY);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }

    /// When the refusals not yet told of are due to be, if there are any.
    fn due(&self) -> Option<tokio::time::Instant> {
        self.quiet_until.filter(|_| self.unlogged > 0)
    }

    /// At `now`: `Some(n)` to write a line that `n` more were refused,
    /// when their quiet second is over; the next refusal is then logged
    /// at once.
    pub(crate) fn catch_up(&mut self, now: tokio::time::Instant) -> Option<u64> {
        match self.due() {
            Some(at) if now >= at => {
                self.quiet_until = None;
                Some(std::mem::take(&mut self.unlogged))
            }
            _ => None,
        }
    }

    /// The end of a refusal line: how many were not logged before it.
    fn more(unlogged: u64) -> String {
        match unlogged {
            0 => String::new(),
            n => format!(" ({n} more refused, not logged, since the last such line)"),
        }
    }
}

pub async fn accept_loop<T: Transport, P: Probe>(
    mut listener: T::Listener,
    shared: Arc<Shared<P>>,
) {
    let mut refused_full = RefusalLog::default();
    let mut refused_acl = RefusalLog::default();
    let mut refused_endgame = RefusalLog::default();
    loop {
        // The refusals a line has not told of yet are told when their
        // quiet second ends, though no connection comes after them.
        let due = [&refused_full, &refused_acl, &refused_endgame]
            .into_iter()
            .filter_map(RefusalLog::due)
            .min();
        let accepted = match due {
            None => listener.accept().await,
            Some(at) => tokio::select! {
                accepted = listener.accept() => accepted,
                () = tokio::time::sleep_until(at) => {
                    let now = tokio::time::Instant::now();
                    if let Some(n) = refused_full.catch_up(now) {
                        warn!(
                            "too many clients: {n} more connections refused in the last second, all {} slots in use",
                            shared.config.max_clients
                        );
                    }
                    if let Some(n) = refused_acl.catch_up(now) {
                        warn!("{n} more connections refused in the last second: not allowed by the access control list");
                    }
                    if let Some(n) = refused_endgame.catch_up(now) {
                        info!("{n} more connections closed in the last second: clients are not allowed now (migration endgame)");
                    }
                    continue;
                }
            },
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                error!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Hung: the connection is held by a task of its own (below), so
        // the accept loop goes on.
        let verdict = fault_apply::event(
            shared.probe.step(Step::Accept),
            || Step::Accept.key(),
            std::future::ready(()),
        )
        .await;
        if let Err(ended) = verdict {
            if ended.how == How::Hung {
                // Accepted but never answered: the peer's own timeout ends it.
                info!("{ended}: holding the connection from {peer} without a greeting");
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut stream = stream;
                    let mut sink = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
            } else {
                info!("{ended}: closing the connection from {peer} at once");
            }
            continue;
        }
        if !shared.clients_allowed() {
            if let Some(more) = refused_endgame.refuse(tokio::time::Instant::now()) {
                info!(
                    "closing connection from {peer}: clients are not allowed now (migration endgame){}",
                    RefusalLog::more(more)
                );
            }
            continue;
        }
        if !shared.acl().allows(peer.ip()) {
            if let Some(more) = refused_acl.refuse(tokio::time::Instant::now()) {
                warn!(
                    "rejecting client {peer}: not allowed by the access control list{}",
                    RefusalLog::more(more)
                );
            }
            continue;
        }
        let stop = CancellationToken::new();
        let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
        {
            let mut registry = shared.registry();
            if !shared.clients_allowed() {
                info!("closing connection from {peer}: clients are not allowed now");
                continue;
            }
            if registry.len() >= shared.config.max_clients {
                if let Some(more) = refused_full.refuse(tokio::time::Instant::now()) {
                    warn!(
                        "too many clients: rejecting {peer}, all {} slots are in use{}",
                        shared.config.max_clients,
                        RefusalLog::more(more)
                    );
                }
                continue;
            }
            registry.insert(
                id,
                ClientEntry {
                    peer,
                    stop: stop.clone(),
                    abort: None,
                },
            );
        }
        let registration = Registration {
            shared: shared.clone(),
            id,
        };
        debug!("accepted client {peer}");
        let shared = shared.clone();
        let registry_shared = shared.clone();
        let task = tokio::spawn(async move {
            let outcome = transmission::serve_client(stream, peer, shared, stop).await;
            // The slot is free before the line says so: a client that
            // reconnects on reading it is never refused for its own
            // connection (`listen` has one slot).
            drop(registration);
            match outcome {
                Ok(()) => info!("client {peer} finished"),
                Err(e) => info!("client {peer} dropped: {e}"),
            }
        });
        let mut registry = registry_shared.registry();
        if let Some(entry) = registry.get_mut(&id) {
            entry.abort = Some(task.abort_handle());
        }
    }
}

/// Binds the listening socket, reporting the address really bound.
pub async fn bind<T: Transport>(
    transport: &T,
    addr: SocketAddr,
) -> std::io::Result<(T::Listener, SocketAddr)> {
    let listener = transport.bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    /// A flood of refusals makes one line at once and one a second after,
    /// and every refusal is counted in some line.
    #[test]
    fn refusals_are_logged_at_most_once_a_second_and_all_counted() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut log = RefusalLog::default();
        assert_eq!(log.refuse(t0), Some(0), "the first is logged at once");
        assert_eq!(log.due(), None, "nothing untold");
        for n in 1..=999 {
            assert_eq!(log.refuse(ms(n)), None, "refusal at {n} ms");
        }
        assert_eq!(log.due(), Some(ms(1000)));
        assert_eq!(log.catch_up(ms(999)), None, "not before the second is over");
        assert_eq!(log.catch_up(ms(1000)), Some(999));
        assert_eq!(log.due(), None);
        assert_eq!(log.catch_up(ms(5000)), None, "nothing twice");
        // After the catch-up line the next refusal is logged at once.
        assert_eq!(log.refuse(ms(1001)), Some(0));
        assert_eq!(log.refuse(ms(1500)), None);
        // A refusal after the quiet second carries the count with it.
        assert_eq!(log.refuse(ms(2001)), Some(1));
    }
}
