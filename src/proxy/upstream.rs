//! The proxy's upstream connection: connect, greeting, and one request at a
//! time, replayed from its first byte on a new connection after any failure
//! or after longer than the upstream timeout in one state, as the C
//! flexnbd-proxy does.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::key;
use crate::fault_apply::{self, How, Incoming, Outgoing};
use crate::proto::{self, cmd, SimpleReply};
use crate::tls::{ClientTls, Conn};
use crate::transport::Transport;
use crate::{info, warn};

use super::{Backoff, Faults, CONNECT_TIMEOUT};

/// The upstream server as the proxy knows it.
pub(crate) struct Upstream<T: Transport> {
    transport: T,
    addr: SocketAddr,
    bind: Option<SocketAddr>,
    /// Longest time in one upstream state (connect, greeting, write, read).
    timeout: Duration,
    stream: Option<Conn<T::Stream>>,
    /// With `--upstream-tls-ca`: STARTTLS on every upstream connection.
    tls: Option<Arc<ClientTls>>,
    /// Size and flags of the most recent greeting.
    pub size: u64,
    pub flags: u32,
    /// Set by every successful (re)connection after the first; the session
    /// takes it to invalidate the cache.
    reconnected: bool,
    faults: Faults,
}

/// A reply from upstream: the header, and the data of a successful READ.
pub(crate) struct Reply {
    pub header: SimpleReply,
    pub data: Vec<u8>,
}

impl<T: Transport> Upstream<T> {
    pub fn new(
        transport: T,
        addr: SocketAddr,
        bind: Option<SocketAddr>,
        timeout: Duration,
        faults: Faults,
        tls: Option<Arc<ClientTls>>,
    ) -> Upstream<T> {
        Upstream {
            transport,
            addr,
            bind,
            timeout,
            stream: None,
            tls,
            size: 0,
            flags: 0,
            reconnected: false,
            faults,
        }
    }

    /// True once after each reconnection.
    pub fn take_reconnected(&mut self) -> bool {
        std::mem::take(&mut self.reconnected)
    }

    /// The first connection, before the proxy listens: one attempt, with
    /// `--bind` failures fatal.
    pub async fn connect_initial(&mut self) -> Result<(), String> {
        self.connect_once(true).await
    }

    /// One connection attempt and greeting.
    async fn connect_once(&mut self, initial: bool) -> Result<(), String> {
        let connect_timeout = CONNECT_TIMEOUT.min(self.timeout);
        // Hung: no connection until the connect timeout would have given up.
        let hang = async { tokio::time::sleep(connect_timeout).await };
        let connect = || "connect".to_string();
        let verdict = self.faults.at(connect);
        if let Err(ended) = fault_apply::event(verdict, || key(connect), hang).await {
            return Err(match ended.how {
                How::Hung => format!("connect timed out ({ended})"),
                _ => format!("connection refused ({ended})"),
            });
        }
        let stream = match self
            .transport
            .connect(self.addr, self.bind, connect_timeout)
            .await
        {
            Ok(s) => s,
            // On reconnects a bind failure is only logged (as the C proxy).
            Err(e)
                if !initial
                    && self.bind.is_some()
                    && matches!(
                        e.kind(),
                        io::ErrorKind::AddrNotAvailable | io::ErrorKind::AddrInUse
                    ) =>
            {
                warn!(
                    "cannot bind to {} for the upstream connection ({e}); connecting without it",
                    self.bind.expect("checked")
                );
                self.transport
                    .connect(self.addr, None, connect_timeout)
                    .await
                    .map_err(|e| format!("cannot connect to {}: {e}", self.addr))?
            }
            Err(e) => return Err(format!("cannot connect to {}: {e}", self.addr)),
        };
        let mut stream = Conn::Plain(stream);
        let tls = self.tls.as_deref();
        let (size, flags) =
            match tokio::time::timeout(self.timeout, greeting(&mut stream, tls)).await {
                Err(_) => {
                    return Err(format!(
                        "no greeting from {} within {} s",
                        self.addr,
                        self.timeout.as_secs()
                    ))
                }
                Ok(Err(e)) => return Err(format!("bad greeting from {}: {e}", self.addr)),
                Ok(Ok(export)) => export,
            };
        // Hung: the greeting stalls until the upstream timeout gives up on it.
        let timeout = self.timeout;
        let hang = async { tokio::time::sleep(timeout).await };
        let step = || "greeting_received".to_string();
        let verdict = self.faults.at(step);
        match fault_apply::incoming(verdict, || key(step), hang).await {
            Ok(Incoming::Proceed) => {}
            Ok(Incoming::Ignore) => {
                // As if the greeting never came: read on for one. The server
                // sends nothing more before we speak, so this ends at the
                // timeout (or when it closes).
                let what = format!("greeting from {}", self.addr);
                return Err(read_on_after_ignored(&mut stream, timeout, &what).await);
            }
            Err(ended) => {
                return Err(match ended.how {
                    How::Hung => format!("greeting timed out ({ended})"),
                    _ => format!("greeting rejected ({ended})"),
                })
            }
        }
        if !initial && (size, flags) != (self.size, self.flags) {
            // Oldstyle cannot renegotiate: the next session gets the new values.
            warn!(
                "upstream export changed from size {} flags {} to size {size} flags {flags}",
                self.size, self.flags
            );
        }
        self.size = size;
        self.flags = flags;
        self.stream = Some(stream);
        if !initial {
            self.reconnected = true;
        }
        info!(
            "connected to upstream {} (size {size}, flags {flags})",
            self.addr
        );
        Ok(())
    }

    /// Connects until it works, pausing as `backoff` says between attempts.
    async fn ensure_connected(&mut self, backoff: &mut Backoff) {
        while self.stream.is_none() {
            tokio::time::sleep(backoff.next_pause()).await;
            if let Err(e) = self.connect_once(false).await {
                backoff.failed();
                warn!("{e}; retrying in {} ms", backoff.next_pause().as_millis());
            }
        }
    }

    /// Sends `request` (header and payload, exactly these bytes) and returns
    /// the reply, reconnecting and sending it again from its first byte
    /// after any upstream failure, for as long as it takes.
    /// `data_len` is the data a successful reply carries (a READ's length).
    pub async fn exchange(
        &mut self,
        request: &[u8],
        kind: u16,
        handle: u64,
        data_len: u32,
    ) -> Reply {
        // One backoff for failed connects and failed exchanges alike: a
        // server that keeps dropping this request is paced as one that
        // refuses connections.
        let mut backoff = Backoff::default();
        loop {
            self.ensure_connected(&mut backoff).await;
            match self.try_exchange(request, kind, handle, data_len).await {
                Ok(reply) => return reply,
                Err(e) => {
                    backoff.failed();
                    warn!("upstream failed: {e}; reconnecting to resend the request");
                    // Closing: dropping the stream closes the socket.
                    self.stream = None;
                }
            }
        }
    }

    pub(super) async fn try_exchange(
        &mut self,
        request: &[u8],
        kind: u16,
        handle: u64,
        data_len: u32,
    ) -> Result<Reply, String> {
        let timeout = self.timeout;
        let faults = self.faults.clone();
        let stream = self.stream.as_mut().expect("connected");
        // Hung: the request stalls until the upstream timeout gives up on it.
        let hang = async { tokio::time::sleep(timeout).await };
        let step = || format!("request_send.{}", cmd::name(kind));
        let verdict = faults.at(step);
        let message = match fault_apply::outgoing(verdict, || key(step), hang).await {
            Err(ended) => return Err(format!("sending timed out ({ended})")),
            Ok(Outgoing::Cut { keep, ended }) => {
                // The caller drops the stream, which closes it.
                let prefix = &request[..keep.min(request.len())];
                let send = async {
                    stream.write_all(prefix).await?;
                    stream.flush().await
                };
                let _ = tokio::time::timeout(timeout, send).await;
                return Err(ended.to_string());
            }
            // Dropped: the reply never comes and the timeout notices.
            Ok(verdict) => verdict.bytes(request),
        };
        if let Some(message) = message {
            // TLS keeps what the socket did not take yet until a flush.
            let send = async {
                stream.write_all(&message).await?;
                stream.flush().await
            };
            match tokio::time::timeout(timeout, send).await {
                Err(_) => {
                    return Err(format!(
                        "sending the request took longer than {} s",
                        timeout.as_secs()
                    ))
                }
                Ok(Err(e)) => return Err(format!("sending the request: {e}")),
                Ok(Ok(())) => {}
            }
        }
        let read = async {
            let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
            stream.read_exact(&mut h).await?;
            let header = SimpleReply::decode(&h);
            let mut data = Vec::new();
            // An error reply carries no data: forward it at once (the C proxy
            // waited for data that never came).
            if header.magic == proto::SIMPLE_REPLY_MAGIC && header.error == 0 && kind == cmd::READ {
                data = vec![0u8; data_len as usize];
                stream.read_exact(&mut data).await?;
            }
            Ok::<Reply, io::Error>(Reply { header, data })
        };
        let reply = match tokio::time::timeout(timeout, read).await {
            Err(_) => return Err(format!("no reply within {} s", timeout.as_secs())),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err("the upstream server closed the connection".into())
            }
            Ok(Err(e)) => return Err(format!("reading the reply: {e}")),
            Ok(Ok(reply)) => reply,
        };
        if reply.header.magic != proto::SIMPLE_REPLY_MAGIC {
            return Err(format!("bad reply magic 0x{:08x}", reply.header.magic));
        }
        if reply.header.handle != handle {
            // One request in flight: any other handle is a broken upstream.
            return Err(format!(
                "reply handle 0x{:016x} does not match the request's 0x{handle:016x}",
                reply.header.handle
            ));
        }
        // Stalled: the upstream timeout gives up on it.
        let hang = async { tokio::time::sleep(timeout).await };
        let step = || format!("reply_received.{}", cmd::name(kind));
        let verdict = faults.at(step);
        match fault_apply::incoming(verdict, || key(step), hang).await {
            Ok(Incoming::Proceed) => {}
            Ok(Incoming::Ignore) => {
                // Read on for the reply: with one request in flight nothing
                // more comes, so this ends at the timeout (or a close).
                return Err(read_on_after_ignored(stream, timeout, "reply").await);
            }
            Err(ended) => {
                return Err(match ended.how {
                    How::Hung => format!("no reply within {} s ({ended})", timeout.as_secs()),
                    How::Damaged => format!("bad reply magic ({ended})"),
                    _ => format!("connection closed ({ended})"),
                })
            }
        }
        Ok(reply)
    }
}

/// Reads a greeting; returns the size and the flags. An oldstyle greeting
/// keeps all 32 flag bits (passed through unchanged); a newstyle server is
/// negotiated with as [`crate::client::handshake`] does.
async fn greeting<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut Conn<S>,
    tls: Option<&ClientTls>,
) -> Result<(u64, u32), String> {
    use crate::client::{self, ClientError, GreetingStart};
    match client::read_greeting_start(stream)
        .await
        .map_err(|e| e.to_string())?
    {
        GreetingStart::Oldstyle { .. } if tls.is_some() => Err(
            "the upstream sent the oldstyle greeting, which cannot start TLS; refusing to go on in plaintext".into(),
        ),
        GreetingStart::Oldstyle { size, flags, .. } => Ok((size, flags)),
        GreetingStart::Newstyle => {
            let export = client::newstyle(stream, tls).await.map_err(|e| match e {
                // The client's own wording names `flexnbd read`'s flags.
                ClientError::TlsRequired { option, message } => format!(
                    "the upstream requires TLS (it answered option {option} with NBD_REP_ERR_TLS_REQD{message}): give --upstream-tls-ca"
                ),
                ClientError::TlsHandshake { name, source } => format!(
                    "TLS handshake with the upstream failed (it must present a certificate for {name:?} signed by the --upstream-tls-ca): {source}"
                ),
                other => other.to_string(),
            })?;
            Ok((export.size, u32::from(export.flags)))
        }
    }
}

/// After a fault ignored a message that did arrive: reads on for another
/// until `timeout`, and says why none came. Nothing more is due (the peer
/// waits for us), so this ends at the timeout or when the peer closes.
async fn read_on_after_ignored<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
    what: &str,
) -> String {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(timeout, stream.read(&mut byte)).await {
        Err(_) => format!(
            "no {what} within {} s (fault injection ignored the one that came)",
            timeout.as_secs()
        ),
        Ok(_) => format!("no {what} after an ignored one (fault injection)"),
    }
}
