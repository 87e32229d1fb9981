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
pub async fn accept_loop<T: Transport, P: Probe>(
    mut listener: T::Listener,
    shared: Arc<Shared<P>>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
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
            info!(
                "closing connection from {peer}: clients are not allowed now (migration endgame)"
            );
            continue;
        }
        if !shared.acl().allows(peer.ip()) {
            warn!("rejecting client {peer}: not allowed by the access control list");
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
                warn!(
                    "too many clients: rejecting {peer}, all {} slots are in use",
                    shared.config.max_clients
                );
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
