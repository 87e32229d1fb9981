//! `flexnbd-proxy`: a single-client NBD proxy that keeps its downstream
//! client connected while the upstream server goes away and comes back (for
//! example across a migration), with an optional read-ahead cache: the C
//! flexnbd-proxy's command line and behaviour.
//!
//! One downstream client at a time, one request in flight. Downstream the
//! proxy speaks oldstyle, with a greeting built from the latest upstream
//! greeting; with downstream TLS (`--tls-cert`) it speaks fixed newstyle
//! instead, through the server's own negotiation, offering the upstream's
//! size and flags less CAN_MULTI_CONN (one client at a time: a second
//! connection would wait for the first to leave) and only simple replies.
//! Upstream TLS (`--upstream-tls-ca`) starts TLS on every connection to the
//! upstream, reconnections included, and never falls back to plaintext. Each request is saved whole (header and payload) and sent
//! upstream; after any upstream failure (EOF, I/O error, bad reply magic, or
//! longer than the upstream timeout in one state) the proxy reconnects and
//! sends the same bytes again. Differences from the C proxy, each fixing one
//! of its bugs: a failed initial connect exits 1 (the C proxy exits 0); an
//! error reply to a READ is forwarded at once, without waiting for data
//! (the C proxy waits for data that never comes, times out and replays the
//! request forever); a READ is only doubled for the cache when the doubled
//! length fits in 32 MiB (the C proxy could overflow its reply buffer with
//! a cache over 16 MiB). Also (not in the C
//! proxy): a request with a bad magic ends the session (forwarding it would
//! make the upstream close, and the proxy would replay it forever), and a
//! reply whose handle is not the request's counts as an upstream failure;
//! the first reconnection and resend after a failure are immediate, and
//! each further failure makes the pause before the next attempt half as
//! long again, from 5 ms up to 3 s (the C proxy waits a fixed 3 s after every failed connect,
//! which across a migration turns a server restart of milliseconds into a
//! 3 s stall for the client's write); the TCP listening socket comes from
//! the shared [`Tcp`](crate::transport::Tcp) transport, whose backlog is 10
//! (the C proxy used 1): either way a waiting client gets no greeting until
//! the current session ends.
//!
//! Fault plans (`proxy.*` keys) are announced at each step. Downstream:
//! `accept`, `greeting_send`, with newstyle `option_received.<n>` and
//! `option_reply_send.<n>`, `request_received.<cmd>`,
//! `payload_received.<cmd>`, `reply_send.<cmd>`; upstream: `connect`,
//! `greeting_received`, `request_send.<cmd>`, `reply_received.<cmd>`. What
//! each action does:
//! * `pass` carries on; `delay(MS)` waits, then carries on; `crash` kills the
//!   process at once.
//! * Downstream `close` ends the session (the downstream socket is closed);
//!   `truncate(N)` on a send step sends N bytes first, on a receive step it
//!   acts as `close`; `hang` stops serving the client until it disconnects;
//!   `drop` skips the message (a dropped greeting or reply is never sent, a
//!   dropped request is read and ignored: it gets no reply); `corrupt` sends
//!   a message with its magic damaged, and on a receive step acts as a bad
//!   request magic (the session ends). During a newstyle negotiation the
//!   server's rules apply: `hang` lasts until the handshake timeout.
//! * Upstream `close`, `truncate(N)` (N bytes sent first) and `corrupt` on a
//!   received message count as an upstream failure: reconnect and resend.
//!   `corrupt` on `request_send` sends the request with a damaged magic.
//!   `drop` on `request_send` does not send it (the upstream timeout then
//!   expires); `drop` and `hang` on `reply_received`, and `hang` elsewhere,
//!   wait out the upstream timeout and then count as a failure. On
//!   `connect` and `greeting_received` every action but pass/delay/crash is
//!   a failed connection attempt (then another, after the growing pause).

pub mod cache;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::fault_apply::{self, How, Incoming, SendError};
use crate::probe::{Action, PlanProbe, Probe, Step};
use crate::proto::{self, cmd, flags, Request, SimpleReply};
use crate::server::{negotiate, NegotiateError, Offer};
use crate::signals::{Hangup, Signals};
use crate::tls::{ClientTls, Conn, ServerTls};
use crate::transport::{Listener, Transport};
use crate::{error, info, warn};

use cache::{Cache, Decision};
use upstream::Upstream;

/// Largest READ or WRITE a client may send (NBD_MAX_SIZE, the most qemu
/// sends); a longer one ends the session.
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;
/// Default time in one upstream state before reconnecting.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for an upstream connect (capped at the upstream timeout).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest pause between upstream attempts while the upstream stays
/// away ([`Backoff`]).
pub const COOL_DOWN: Duration = Duration::from_secs(3);
/// The pause after the first failed reconnection; it grows by
/// [`BACKOFF_GROWTH`] with every further failure up to [`COOL_DOWN`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(5);
pub const BACKOFF_GROWTH: f64 = 1.5;

/// Pauses between upstream attempts while the upstream is away. The first
/// attempt after a failure is immediate: across a migration the new server
/// is usually up within milliseconds, and a client's write must not wait
/// out a fixed cool-down for it. Each further failure makes the pause half
/// as long again, from [`FIRST_BACKOFF`] up to [`COOL_DOWN`], so an upstream that stays
/// away (or keeps dropping the same request) is not hammered. Each
/// request starts with a fresh one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The pause before the next attempt: none after the first failure,
    /// then [`FIRST_BACKOFF`] growing up to [`COOL_DOWN`].
    pub fn next_pause(&self) -> Duration {
        match self.failures {
            0 | 1 => Duration::ZERO,
            // Growing by half, not doubling: the pause after the server is
            // back is at most about half of the time it was away.
            n => FIRST_BACKOFF
                .mul_f64(BACKOFF_GROWTH.powi((n - 2).min(64) as i32))
                .min(COOL_DOWN),
        }
    }

    /// An attempt failed.
    pub fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
    }
}
/// A downstream client that has not chosen the export by then is dropped
/// (newstyle only; the server's default).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a TLS client to take our close_notify.
const TLS_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// The environment variable that overrides the upstream timeout.
pub const UPSTREAM_TIMEOUT_ENV: &str = "FLEXNBD_UPSTREAM_TIMEOUT";

/// Where the proxy listens for its downstream client.
#[derive(Clone, Debug)]
pub enum Listen {
    Tcp(SocketAddr),
    /// A UNIX socket path, created at start and removed at exit.
    Unix(PathBuf),
}

pub struct Options {
    pub listen: Listen,
    pub upstream: SocketAddr,
    /// Source address for upstream connections.
    pub bind: Option<SocketAddr>,
    /// Read-ahead cache size in bytes; 0 means no cache.
    pub cache: u32,
    pub upstream_timeout: Duration,
    /// A fault plan; `None` spends nothing on faults.
    pub faults: Option<PlanProbe>,
    /// TLS towards the upstream server.
    pub upstream_tls: Option<Arc<ClientTls>>,
    /// TLS for the downstream client; the downstream greeting is then
    /// fixed newstyle.
    pub downstream_tls: Option<Arc<ServerTls>>,
}

/// The upstream timeout from `FLEXNBD_UPSTREAM_TIMEOUT` (a positive integer
/// of seconds), or the default. A bad value is an error.
pub fn upstream_timeout_from_env() -> Result<Duration, String> {
    match std::env::var(UPSTREAM_TIMEOUT_ENV) {
        Err(_) => Ok(DEFAULT_UPSTREAM_TIMEOUT),
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
            _ => Err(format!(
                "bad {UPSTREAM_TIMEOUT_ENV} '{text}': expected a positive whole number of seconds"
            )),
        },
    }
}

/// The fault plan's decisions for `proxy.*` steps; free without a plan.
#[derive(Clone, Default)]
pub(crate) struct Faults(Option<Arc<PlanProbe>>);

impl Faults {
    /// The verdict for a step; the name is only built when there is a plan.
    fn at(&self, step: impl FnOnce() -> String) -> Action {
        match &self.0 {
            None => Action::Pass,
            Some(probe) => probe.named("proxy", &step()),
        }
    }
}

/// The server's negotiation announces its steps through this: they are
/// the proxy's (`proxy.greeting_send`, `proxy.option_received.<n>`, ...).
impl Probe for Faults {
    fn step(&self, step: Step) -> Action {
        self.at(|| step.name())
    }

    fn key(&self, step: Step) -> String {
        key(|| step.name())
    }
}

/// The transmission flags of a newstyle downstream: the upstream's, less
/// what this proxy cannot honour. One client at a time means no
/// multi-connection (a client opening a second connection would wait for
/// a greeting forever), and simple replies only mean no DF.
pub fn newstyle_flags(upstream: u32) -> u16 {
    // Oldstyle upstream flags are 32 bits; the transmission flags are the
    // low 16.
    (upstream as u16 | flags::HAS_FLAGS) & !(flags::CAN_MULTI_CONN | flags::SEND_DF)
}

/// A `proxy.*` step's whole key, for fault messages (only built once a
/// fault fired).
pub(crate) fn key(step: impl FnOnce() -> String) -> String {
    format!("proxy.{}", step())
}

/// Runs the proxy until a signal; returns the exit code (0 on a signal, 1
/// when the first upstream connection or the listening socket fails).
pub async fn run<T: Transport>(transport: T, options: Options) -> u8 {
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return 1;
        }
    };
    // SIGHUP reads the TLS credentials again, both sides' (certificate
    // rotation); the connection being served keeps its session.
    match Hangup::install() {
        Ok(hangup) => {
            tokio::spawn(reload_on_hangup(
                hangup,
                options.downstream_tls.clone(),
                options.upstream_tls.clone(),
            ));
        }
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return 1;
        }
    }
    let faults = Faults(options.faults.map(Arc::new));
    let mut upstream = Upstream::new(
        transport.clone(),
        options.upstream,
        options.bind,
        options.upstream_timeout,
        faults.clone(),
        options.upstream_tls.clone(),
    );
    tokio::select! {
        result = upstream.connect_initial() => {
            if let Err(e) = result {
                error!("{e}");
                error!("Couldn't connect to upstream server during initialization, exiting");
                return 1;
            }
        }
        signal = signals.next() => {
            info!("received {signal} before listening, exiting");
            return 0;
        }
    }
    let listener = match bind(&transport, &options.listen).await {
        Ok(l) => l,
        Err(e) => {
            error!("{e}");
            return 1;
        }
    };
    let mut proxy = Proxy {
        upstream,
        cache: Cache::new(options.cache),
        faults,
        tls: options.downstream_tls,
    };
    let signal = match listener {
        DownListener::Tcp(mut l) => {
            match l.local_addr() {
                Ok(local) => info!("listening on {local}"),
                Err(e) => info!("listening (address unknown: {e})"),
            }
            tokio::select! {
                signal = signals.next() => signal,
                _ = async { loop {
                    match l.accept().await {
                        Ok((stream, peer)) => proxy.serve_client(stream, &peer.to_string()).await,
                        Err(e) => accept_failed(e).await,
                    }
                }} => unreachable!("the accept loop never ends"),
            }
        }
        DownListener::Unix(l, ref path) => {
            info!("listening on {}", path.display());
            let signal = tokio::select! {
                signal = signals.next() => signal,
                _ = async { loop {
                    match l.accept().await {
                        Ok((stream, _)) => proxy.serve_client(stream, "a UNIX socket client").await,
                        Err(e) => accept_failed(e).await,
                    }
                }} => unreachable!("the accept loop never ends"),
            };
            if let Err(e) = std::fs::remove_file(path) {
                warn!("cannot remove {}: {e}", path.display());
            }
            signal
        }
    };
    info!("received {signal}, exiting");
    0
}

/// Reads the credentials again at each SIGHUP, logging each outcome; runs
/// until the process ends.
async fn reload_on_hangup(
    mut hangup: Hangup,
    downstream: Option<Arc<ServerTls>>,
    upstream: Option<Arc<ClientTls>>,
) {
    loop {
        hangup.recv().await;
        if downstream.is_none() && upstream.is_none() {
            info!("received SIGHUP: no TLS is set up, nothing to read again");
        }
        if let Some(tls) = &downstream {
            let _ = tls.reload_logged().await;
        }
        if let Some(tls) = &upstream {
            let _ = tls.reload_logged().await;
        }
    }
}

async fn accept_failed(e: std::io::Error) {
    warn!("accept failed: {e}");
    // Out of descriptors and the like: do not spin.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

enum DownListener<L> {
    Tcp(L),
    /// tokio's listener directly: the shared [`Transport`] only makes TCP
    /// sockets, and a UNIX path needs no transport-level fault injection
    /// (the proxy's own `proxy.*` steps still apply).
    Unix(tokio::net::UnixListener, PathBuf),
}

async fn bind<T: Transport>(
    transport: &T,
    listen: &Listen,
) -> Result<DownListener<T::Listener>, String> {
    match listen {
        Listen::Tcp(addr) => transport
            .bind(*addr)
            .await
            .map(DownListener::Tcp)
            .map_err(|e| format!("cannot listen on {addr}: {e}")),
        Listen::Unix(path) => tokio::net::UnixListener::bind(path)
            .map(|l| DownListener::Unix(l, path.clone()))
            .map_err(|e| format!("cannot listen on {}: {e}", path.display())),
    }
}

/// Why a session ended.
enum End {
    /// Logged at info: the client's own doing.
    Normal(String),
    /// Logged as a warning.
    Abnormal(String),
}

struct Proxy<T: Transport> {
    upstream: Upstream<T>,
    cache: Cache,
    faults: Faults,
    tls: Option<Arc<ServerTls>>,
}

impl<T: Transport> Proxy<T> {
    async fn serve_client<S: AsyncRead + AsyncWrite + Unpin>(&mut self, down: S, peer: &str) {
        info!("client {peer} connected");
        let mut down = Conn::Plain(down);
        match self.session(&mut down).await {
            End::Normal(why) => info!("session with {peer} ended: {why}"),
            End::Abnormal(why) => warn!("session with {peer} ended: {why}"),
        }
        if down.is_tls() {
            // TLS peers expect close_notify before the socket closes; one
            // that does not read does not get to hold the proxy.
            let _ = tokio::time::timeout(TLS_CLOSE_TIMEOUT, down.shutdown()).await;
        }
        // Dropping `down` closes the downstream socket; upstream stays.
    }

    /// The greeting, or with TLS the whole newstyle negotiation; `Some`
    /// when the session must end before transmission.
    async fn greet<S: AsyncRead + AsyncWrite + Unpin>(&self, down: &mut Conn<S>) -> Option<End> {
        let Some(tls) = &self.tls else {
            let greeting = proto::oldstyle_greeting(self.upstream.size, self.upstream.flags);
            return send_message(down, &self.faults, || "greeting_send".into(), &greeting).await;
        };
        let offer = Offer {
            size: self.upstream.size,
            flags: newstyle_flags(self.upstream.flags),
            structured: false,
            // What the upstream offers is not passed on: the proxy would
            // have to forward the extensions' requests and answers.
            extensions: 0,
        };
        let negotiation = negotiate(down, offer, &self.faults, Some(tls));
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiation).await {
            Ok(Ok(_simple_replies_only)) => None,
            Ok(Err(NegotiateError::Aborted)) => {
                Some(End::Normal("the client aborted the negotiation".into()))
            }
            Ok(Err(e)) => Some(End::Abnormal(format!("negotiation failed: {e}"))),
            Err(_) => Some(End::Abnormal(format!(
                "the client chose no export within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            ))),
        }
    }

    /// The plan's verdict on a message just received from the client:
    /// act on it (`true`), ignore it (`false`), or end the session.
    async fn received<S: AsyncRead + Unpin>(
        &self,
        step: impl Fn() -> String,
        what: &str,
        down: &mut S,
    ) -> Result<bool, End> {
        // Hung: reading and discarding needs `down`, so it is done here.
        let verdict = self.faults.at(&step);
        match fault_apply::incoming(verdict, || key(&step), std::future::ready(())).await {
            Ok(verdict) => Ok(verdict == Incoming::Proceed),
            Err(ended) => Err(match ended.how {
                How::Hung => hang(down).await,
                How::Damaged => End::Abnormal(format!("bad request magic ({ended})")),
                _ => End::Abnormal(format!("closed on a {what} ({ended})")),
            }),
        }
    }

    async fn session<S: AsyncRead + AsyncWrite + Unpin>(&mut self, down: &mut Conn<S>) -> End {
        let accept = || "accept".to_string();
        let verdict = self.faults.at(accept);
        // Hung: reading and discarding needs `down`, so it is done here.
        if let Err(ended) =
            fault_apply::event(verdict, || key(accept), std::future::ready(())).await
        {
            return match ended.how {
                How::Hung => hang(down).await,
                _ => End::Abnormal(format!("closed at accept ({ended})")),
            };
        }
        if let Some(end) = self.greet(down).await {
            return end;
        }
        loop {
            let mut h = [0u8; proto::REQUEST_LEN];
            match read_exact_or_eof(down, &mut h).await {
                Ok(true) => {}
                Ok(false) => return End::Normal("the client closed the connection".into()),
                Err(e) => return End::Abnormal(format!("reading a request: {e}")),
            }
            let request = Request::decode(&h);
            let name = cmd::name(request.kind);
            let mut ignore = match self
                .received(|| format!("request_received.{name}"), "request", down)
                .await
            {
                Ok(act) => !act,
                Err(end) => return end,
            };
            if !request.magic_ok() {
                return End::Abnormal(format!("bad request magic 0x{:08x}", request.magic));
            }
            if request.kind == cmd::DISC && !ignore {
                // Not forwarded: the upstream connection serves the next client.
                return End::Normal("the client sent DISCONNECT".into());
            }
            if matches!(request.kind, cmd::READ | cmd::WRITE) && request.length > MAX_REQUEST {
                return End::Abnormal(format!(
                    "a {name} of {} bytes is longer than the limit of {MAX_REQUEST}",
                    request.length
                ));
            }
            let mut message = h.to_vec();
            if request.kind == cmd::WRITE {
                let start = message.len();
                message.resize(start + request.length as usize, 0);
                if let Err(e) = down.read_exact(&mut message[start..]).await {
                    return End::Abnormal(format!("reading a write's payload: {e}"));
                }
                match self
                    .received(|| format!("payload_received.{name}"), "payload", down)
                    .await
                {
                    Ok(act) => ignore |= !act,
                    Err(end) => return end,
                }
            }
            if ignore {
                continue;
            }
            let reply = self.forward(&request, message).await;
            if let Some(end) =
                send_message(down, &self.faults, || format!("reply_send.{name}"), &reply).await
            {
                return end;
            }
        }
    }

    /// The reply (header and data) to one request: from the cache, or from
    /// upstream.
    async fn forward(&mut self, request: &Request, mut message: Vec<u8>) -> Vec<u8> {
        let decision = self.cache.decide(request, self.upstream.size);
        let (upstream_length, prefetch) = match decision {
            Decision::Hit { skip, len } => {
                let mut reply = SimpleReply::new(0, request.handle).encode().to_vec();
                reply.extend_from_slice(self.cache.hit(skip, len));
                return reply;
            }
            Decision::Forward {
                upstream_length,
                prefetch,
            } => (upstream_length, prefetch),
        };
        if prefetch {
            message[24..28].copy_from_slice(&upstream_length.to_be_bytes());
        }
        let data_len = if request.kind == cmd::READ {
            upstream_length
        } else {
            0
        };
        let answer = self
            .upstream
            .exchange(&message, request.kind, request.handle, data_len)
            .await;
        if self.upstream.take_reconnected() {
            self.cache.invalidate();
        }
        let mut reply = answer.header.encode().to_vec();
        if request.kind == cmd::READ && answer.header.error == 0 {
            reply.extend_from_slice(&self.cache.complete(request, decision, answer.data));
        }
        reply
    }
}

/// Reads exactly `buf`; `Ok(false)` at EOF before the first byte.
async fn read_exact_or_eof<S: AsyncRead + Unpin>(
    down: &mut S,
    buf: &mut [u8],
) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match down.read(&mut buf[got..]).await? {
            0 if got == 0 => return Ok(false),
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the client closed after {got} of {} bytes", buf.len()),
                ))
            }
            n => got += n,
        }
    }
    Ok(true)
}

/// Sends one message downstream under the plan's verdict for `step`; `Some`
/// when the session must end.
async fn send_message<S: AsyncWrite + AsyncRead + Unpin>(
    down: &mut S,
    faults: &Faults,
    step: impl Fn() -> String,
    message: &[u8],
) -> Option<End> {
    let verdict = faults.at(&step);
    // Hung: reading and discarding needs `down`, so it is done here.
    match fault_apply::send(
        verdict,
        || key(&step),
        down,
        message,
        std::future::ready(()),
    )
    .await
    {
        // (`send` flushes, so nothing stays inside a TLS session.)
        Ok(_sent_or_dropped) => None,
        Err(SendError::Io(e)) => Some(End::Abnormal(format!("writing to the client: {e}"))),
        Err(SendError::Fault(ended)) if ended.how == How::Hung => Some(hang(down).await),
        Err(SendError::Fault(ended)) => Some(End::Abnormal(ended.to_string())),
    }
}

/// Serves nothing more: reads and discards until the client goes away.
async fn hang<S: AsyncRead + Unpin>(down: &mut S) -> End {
    let mut sink = vec![0u8; 64 * 1024];
    loop {
        match down.read(&mut sink).await {
            Ok(0) | Err(_) => {
                return End::Abnormal("hung until the client left (fault injection)".into())
            }
            Ok(_) => {}
        }
    }
}

/// The fuzz target's way in (`crate::fuzzing::proxy_upstream`): one
/// upstream connection through `transport` (greeting, negotiation) and one
/// READ of up to `length` bytes on it, with no retry (the proxy itself
/// retries for ever). Says why either failed.
pub(crate) async fn upstream_once<T: Transport>(transport: T, length: u32) -> Result<(), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], 10809));
    let timeout = Duration::from_secs(1);
    let mut up = Upstream::new(transport, addr, None, timeout, Faults(None), None);
    up.connect_initial().await?;
    let length = u64::from(length).min(up.size) as u32;
    const HANDLE: u64 = 0x5eed;
    let request = Request::new(cmd::READ, 0, HANDLE, 0, length).encode();
    up.try_exchange(&request, cmd::READ, HANDLE, length)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_retries_at_once_then_grows_by_half_up_to_the_cool_down() {
        let mut b = Backoff::default();
        let mut pauses = Vec::new();
        for _ in 0..30 {
            pauses.push(b.next_pause().as_micros());
            b.failed();
        }
        assert_eq!(&pauses[..5], [0, 0, 5000, 7500, 11250]);
        for pair in pauses[2..].windows(2) {
            let (a, b) = (pair[0] as f64, pair[1] as f64);
            assert!(b == 3e6 || (b - 1.5 * a).abs() <= 1.0, "{pauses:?}");
        }
        // The cap is reached after 18 failures, some 6.6 s of outage.
        assert_eq!(pauses.iter().position(|p| *p == 3_000_000), Some(18));
        assert!(pauses.iter().take(18).sum::<u128>() < 7_000_000);
        for _ in 0..100 {
            b.failed();
        }
        assert_eq!(b.next_pause(), COOL_DOWN, "the pause never passes the cap");
    }
}
