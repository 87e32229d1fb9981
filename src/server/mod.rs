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
    /// Where newstyle negotiation (and so the TLS handshake) runs: on this
    /// gate's thread, below the async workers ([`crate::gate`]); `None`,
    /// on the connection's own task. Both daemons set one; tests and the
    /// fuzz targets, which measure nothing, negotiate in place.
    pub gate: Option<Arc<crate::gate::Gate>>,
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
            gate: None,
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
    /// when their quiet second is over. That line starts a quiet second of
    /// its own: under a steady flood there is one line a second.
    pub(crate) fn catch_up(&mut self, now: tokio::time::Instant) -> Option<u64> {
        match self.due() {
            Some(at) if now >= at => {
                self.quiet_until = Some(now + REFUSAL_LOG_EVERY);
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

/// How fast connections are refused: at most `REFUSALS_PER_WINDOW` in
/// each `REFUSAL_WINDOW` (1000 a second). A refusal costs the server an
/// accept, a few socket options and a close, about 20 µs of CPU; a flood
/// refused as fast as it comes took 73 % of a CPU and made established
/// clients' reads wait behind it. Past the pace, connections wait in the
/// kernel's accept queue and are refused in the next window; a refused
/// client learns it a little later, and nobody already served pays.
#[derive(Debug, Default)]
pub(crate) struct RefusalPace {
    window_end: Option<tokio::time::Instant>,
    in_window: u32,
}

const REFUSAL_WINDOW: Duration = Duration::from_millis(20);
const REFUSALS_PER_WINDOW: u32 = 20;

impl RefusalPace {
    /// A refusal at `now`: `Some(t)` when the window's refusals are spent
    /// and nothing more is accepted until `t`.
    pub(crate) fn refused(&mut self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        match self.window_end {
            Some(end) if now < end => {
                self.in_window += 1;
                (self.in_window >= REFUSALS_PER_WINDOW).then_some(end)
            }
            _ => {
                self.window_end = Some(now + REFUSAL_WINDOW);
                self.in_window = 1;
                None
            }
        }
    }
}

/// Why the accept loop closed a connection before its greeting.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// Every slot is in use.
    Full,
    /// The access control list does not allow the peer.
    Acl,
    /// A migration's endgame: no new clients now.
    Endgame,
}

/// The accept loop's refusals: a log for each reason and one pace.
#[derive(Debug, Default)]
struct Refusals {
    logs: [RefusalLog; 3],
    pace: RefusalPace,
}

impl Refusals {
    /// Refuses `stream` from `peer`: logs it (or counts it), closes it at
    /// once, then waits out the window when its refusals are spent.
    async fn refuse<S>(&mut self, why: Refusal, stream: S, peer: SocketAddr, slots: usize) {
        let now = tokio::time::Instant::now();
        if let Some(more) = self.logs[why as usize].refuse(now) {
            let more = RefusalLog::more(more);
            match why {
                Refusal::Full => warn!(
                    "too many clients: rejecting {peer}, all {slots} slots are in use{more}"
                ),
                Refusal::Acl => {
                    warn!("rejecting client {peer}: not allowed by the access control list{more}")
                }
                Refusal::Endgame => info!(
                    "closing connection from {peer}: clients are not allowed now (migration endgame){more}"
                ),
            }
        }
        // Closed before the pause: the refused client hears at once.
        drop(stream);
        if let Some(until) = self.pace.refused(now) {
            tokio::time::sleep_until(until).await;
        }
    }

    /// When the refusals not yet told of are due to be told, if any are.
    fn due(&self) -> Option<tokio::time::Instant> {
        self.logs.iter().filter_map(RefusalLog::due).min()
    }

    /// Tells, at `now`, of the refusals whose quiet second is over.
    fn catch_up(&mut self, now: tokio::time::Instant, slots: usize) {
        for (why, log) in [Refusal::Full, Refusal::Acl, Refusal::Endgame]
            .into_iter()
            .zip(&mut self.logs)
        {
            let Some(n) = log.catch_up(now) else { continue };
            match why {
                Refusal::Full => warn!(
                    "too many clients: {n} more connections refused in the last second, all {slots} slots in use"
                ),
                Refusal::Acl => warn!(
                    "{n} more connections refused in the last second: not allowed by the access control list"
                ),
                Refusal::Endgame => info!(
                    "{n} more connections closed in the last second: clients are not allowed now (migration endgame)"
                ),
            }
        }
    }
}

pub async fn accept_loop<T: Transport, P: Probe>(
    mut listener: T::Listener,
    shared: Arc<Shared<P>>,
) {
    let slots = shared.config.max_clients;
    let mut refusals = Refusals::default();
    loop {
        // The refusals a line has not told of yet are told when their
        // quiet second ends, though no connection comes after them.
        let accepted = match refusals.due() {
            None => listener.accept().await,
            Some(at) => tokio::select! {
                accepted = listener.accept() => accepted,
                () = tokio::time::sleep_until(at) => {
                    refusals.catch_up(tokio::time::Instant::now(), slots);
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
            refusals.refuse(Refusal::Endgame, stream, peer, slots).await;
            continue;
        }
        if !shared.acl().allows(peer.ip()) {
            refusals.refuse(Refusal::Acl, stream, peer, slots).await;
            continue;
        }
        let stop = CancellationToken::new();
        let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
        let refused = {
            let mut registry = shared.registry();
            if !shared.clients_allowed() {
                // The endgame began since the check above.
                Some(Refusal::Endgame)
            } else if registry.len() >= slots {
                Some(Refusal::Full)
            } else {
                registry.insert(
                    id,
                    ClientEntry {
                        peer,
                        stop: stop.clone(),
                        abort: None,
                    },
                );
                None
            }
        };
        if let Some(why) = refused {
            refusals.refuse(why, stream, peer, slots).await;
            continue;
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
        assert_eq!(log.catch_up(ms(1500)), None, "nothing twice");
        // The catch-up line starts a quiet second: the flood goes on
        // and is counted, not logged, until it ends.
        assert_eq!(log.refuse(ms(1001)), None);
        assert_eq!(log.refuse(ms(1500)), None);
        assert_eq!(log.due(), Some(ms(2000)));
        // A refusal after the quiet second carries the count with it.
        assert_eq!(log.refuse(ms(2001)), Some(2));
        assert_eq!(log.due(), None);
        // After a quiet second with no refusal, the next is logged at once.
        assert_eq!(log.refuse(ms(3002)), Some(0));
    }

    /// Refusals are paced: the window's 20th refusal pauses accepting
    /// until the window ends; a new window starts with the next one.
    #[test]
    fn refusals_pause_accepting_once_a_window_has_had_its_share() {
        let t0 = Instant::now();
        let mut pace = RefusalPace::default();
        for n in 1..REFUSALS_PER_WINDOW {
            assert_eq!(pace.refused(t0), None, "refusal {n} of the window");
        }
        assert_eq!(pace.refused(t0), Some(t0 + REFUSAL_WINDOW));
        let next = t0 + REFUSAL_WINDOW;
        assert_eq!(pace.refused(next), None, "a new window");
        assert_eq!(pace.in_window, 1);
    }

    mod gate {
        use std::pin::Pin;
        use std::task::{Context, Poll};

        use tokio::io::{
            AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf, ReadHalf,
            WriteHalf,
        };

        use super::super::*;
        use crate::probe::Quiet;
        use crate::proto::{self, cmd};

        /// A stream that notes, in order, the name of the thread of every
        /// poll.
        struct Noting {
            inner: DuplexStream,
            seen: Arc<Mutex<Vec<String>>>,
        }

        impl Noting {
            fn note(&self) {
                let name = std::thread::current()
                    .name()
                    .unwrap_or("unnamed")
                    .to_string();
                self.seen.lock().unwrap().push(name);
            }
        }

        impl AsyncRead for Noting {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                self.note();
                Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
            }
        }

        impl AsyncWrite for Noting {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<std::io::Result<usize>> {
                self.note();
                Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                self.note();
                Pin::new(&mut self.get_mut().inner).poll_flush(cx)
            }
            fn poll_shutdown(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<std::io::Result<()>> {
                self.note();
                Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
            }
        }

        impl crate::transport::Stream for Noting {
            type Read = ReadHalf<Noting>;
            type Write = WriteHalf<Noting>;
            fn into_split(self) -> (Self::Read, Self::Write) {
                tokio::io::split(self)
            }
        }

        /// A newstyle server of a 1 MiB image with a gate, negotiating
        /// for at most `handshake` (kept for the image's directory).
        fn server(handshake: Duration) -> (Arc<Shared<Quiet>>, tempfile::TempDir) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("image");
            std::fs::write(&path, vec![0x5a; 1 << 20]).unwrap();
            let image = Arc::new(Image::open(&path).unwrap());
            let config = Config {
                handshake: HandshakeMode::Newstyle,
                handshake_timeout: handshake,
                gate: Some(Arc::new(crate::gate::Gate::start().unwrap())),
                ..Config::default()
            };
            let shared = Shared::new(image, config, Acl::default(), Arc::new(Quiet));
            (shared, dir)
        }

        /// With a gate, the newstyle negotiation is polled only on the
        /// gate's thread, and the transmission after it only off it.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn negotiation_runs_on_the_gate_and_transmission_on_the_workers() {
            let (shared, _dir) = server(Duration::from_secs(60));
            let (mut client, near) = tokio::io::duplex(1 << 20);
            let seen = Arc::new(Mutex::new(Vec::new()));
            let stream = Noting {
                inner: near,
                seen: seen.clone(),
            };
            let peer = "127.0.0.1:4000".parse().unwrap();
            let served = tokio::spawn(serve_client(stream, peer, shared, CancellationToken::new()));
            let mut greeting = [0u8; 18];
            client.read_exact(&mut greeting).await.unwrap();
            assert_eq!(&greeting[8..16], b"IHAVEOPT");
            let fixed_no_zeroes = proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES;
            client
                .write_all(&fixed_no_zeroes.to_be_bytes())
                .await
                .unwrap();
            let mut export_name = b"IHAVEOPT".to_vec();
            export_name.extend_from_slice(&proto::opt::EXPORT_NAME.to_be_bytes());
            export_name.extend_from_slice(&0u32.to_be_bytes());
            client.write_all(&export_name).await.unwrap();
            let mut export = [0u8; 10];
            client.read_exact(&mut export).await.unwrap();
            assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), 1 << 20);
            let read = proto::Request::new(cmd::READ, 0, 7, 4096, 4096);
            client.write_all(&read.encode()).await.unwrap();
            let mut reply = [0u8; proto::SIMPLE_REPLY_LEN];
            client.read_exact(&mut reply).await.unwrap();
            let mut data = vec![0u8; 4096];
            client.read_exact(&mut data).await.unwrap();
            assert!(data.iter().all(|&b| b == 0x5a), "the image's bytes");
            drop(client);
            served.await.unwrap().ok();
            // Every poll on the gate comes first (the negotiation), then
            // every other one (transmission), none of them on the gate.
            let seen = seen.lock().unwrap();
            let gate = crate::gate::THREAD_NAME;
            let negotiated = seen.iter().take_while(|t| t.as_str() == gate).count();
            assert!(negotiated > 0, "the negotiation's polls: {seen:?}");
            assert!(
                seen.len() > negotiated && !seen[negotiated..].iter().any(|t| t == gate),
                "the transmission's polls: {seen:?}"
            );
        }

        /// The handshake time is kept on the client's own runtime too: a
        /// gate held up (here, a thread put to sleep in a poll) does not
        /// stretch it for a silent client waiting there.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_gate_held_up_does_not_stretch_the_handshake_time() {
            let (shared, _dir) = server(Duration::from_millis(300));
            let gate = shared.config.gate.clone().unwrap();
            let (asleep, wake) = tokio::sync::oneshot::channel();
            let hold = tokio::spawn(async move {
                gate.run(async move {
                    let _ = asleep.send(());
                    std::thread::sleep(Duration::from_secs(3));
                })
                .await
            });
            wake.await.unwrap();
            let (mut client, near) = tokio::io::duplex(1 << 20);
            let peer = "127.0.0.1:4000".parse().unwrap();
            let began = std::time::Instant::now();
            let served = tokio::spawn(serve_client(near, peer, shared, CancellationToken::new()));
            let outcome = served.await.unwrap();
            assert!(
                matches!(outcome, Err(transmission::ConnError::HandshakeTimeout(_))),
                "{outcome:?}"
            );
            let took = began.elapsed();
            assert!(took < Duration::from_millis(1500), "dropped after {took:?}");
            let mut rest = Vec::new();
            let _ = client.read_to_end(&mut rest).await;
            hold.await.unwrap().unwrap();
        }

        /// A client's task stopped during its negotiation (by a shutdown,
        /// or its handshake time running out) ends the negotiation on the
        /// gate too: the socket is closed, not held there for ever.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_client_task_stopped_mid_negotiation_closes_its_socket() {
            let (shared, _dir) = server(Duration::from_secs(600));
            let (mut client, near) = tokio::io::duplex(1 << 20);
            let peer = "127.0.0.1:4000".parse().unwrap();
            let served = tokio::spawn(serve_client(near, peer, shared, CancellationToken::new()));
            let mut greeting = [0u8; 18];
            client.read_exact(&mut greeting).await.unwrap();
            served.abort();
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
                .await
                .expect("the server's end is closed once its task is stopped")
                .unwrap();
            assert!(rest.is_empty(), "the server sent {rest:?}");
        }
    }
}
