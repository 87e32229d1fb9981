//! flexnbd as an NBD client: the one-shot `read` and `write` commands.
//!
//! Speaks both handshakes (it tells them apart by the greeting), uses simple
//! replies only, and checks every reply: magic, error and handle.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::fault_apply::{self, How, Incoming, Outgoing, SendError};
use crate::probe::Action;
use crate::proto::{
    self, cmd, opt, rep, GreetingKind, HandshakeError, OptionHeader, OptionReplyHeader,
};
use crate::proto::{Request, SimpleReply, SIMPLE_REPLY_LEN};
use crate::tls::{ClientTls, Conn};
use crate::transport::Transport;

/// Outgoing connections give up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The whole greeting (and negotiation) must arrive within this.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// A reply must start within this, and data must keep flowing at least this often.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest option reply payload we accept from a server.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Data is moved in pieces of this size.
const PIECE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("bad greeting from the server: {0}")]
    Greeting(#[from] HandshakeError),
    #[error("the server closed the connection during the handshake: {0}")]
    HandshakeIo(io::Error),
    #[error(
        "the server closed the connection after {got} bytes of the {} byte greeting",
        proto::OLDSTYLE_GREETING_LEN
    )]
    ShortGreeting { got: usize },
    #[error("no complete greeting from the server within {} s", GREETING_TIMEOUT.as_secs())]
    GreetingTimeout,
    #[error("the server refused export negotiation: option {option} answered with error 0x{kind:08x}{message}")]
    OptionRefused {
        option: u32,
        kind: u32,
        message: String,
    },
    #[error("the server requires TLS (it answered option {option} with NBD_REP_ERR_TLS_REQD{message}): give --tls-ca")]
    TlsRequired { option: u32, message: String },
    #[error("TLS was asked for, but the server {0}; refusing to go on in plaintext")]
    NoTls(String),
    #[error("TLS handshake with the server failed (it must present a certificate for {name:?} signed by the --tls-ca): {source}")]
    TlsHandshake { name: String, source: io::Error },
    #[error("the server ended the TLS session before answering (a server that verifies its clients does so when we present no certificate, or one its CA did not sign or that expired: see --tls-cert/--tls-key): {0}")]
    TlsRefused(io::Error),
    #[error("the server sent a {length}-byte option reply; the limit is {MAX_OPTION_REPLY}")]
    OptionReplyTooLong { length: u32 },
    #[error("the server finished GO without telling the export size")]
    NoExportInfo,
    #[error(
        "request of {length} bytes at offset {offset} is out of range: the export is {size} bytes"
    )]
    OutOfRange { offset: u64, length: u64, size: u64 },
    #[error("timed out after {} s waiting for the reply", REPLY_TIMEOUT.as_secs())]
    ReplyTimeout,
    #[error("bad reply magic: expected 0x{expected:08x}, got 0x{0:08x}", expected = proto::SIMPLE_REPLY_MAGIC)]
    BadReplyMagic(u32),
    #[error("reply handle mismatch: expected 0x{expected:016x}, got 0x{got:016x}")]
    HandleMismatch { expected: u64, got: u64 },
    #[error("the server answered with error {0} ({name})", name = errno_name(*.0))]
    ErrorReply(u32),
    #[error("failed while {what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("only {got} of {expected} bytes arrived while {what}")]
    Short {
        what: &'static str,
        expected: u64,
        got: u64,
    },
}

fn errno_name(e: u32) -> &'static str {
    match e {
        proto::errno::EPERM => "EPERM",
        proto::errno::EIO => "EIO",
        proto::errno::ENOMEM => "ENOMEM",
        proto::errno::EINVAL => "EINVAL",
        proto::errno::ENOSPC => "ENOSPC",
        proto::errno::EBADMSG => "EBADMSG",
        proto::errno::EOVERFLOW => "EOVERFLOW",
        proto::errno::ENOTSUP => "ENOTSUP",
        proto::errno::ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// What the server told us about its export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
    pub handshake: GreetingKind,
    /// The flexnbd extensions the server offered ([`proto::ext`]).
    pub extensions: u32,
}

/// A random 64-bit handle (the C client uses a random one too).
pub fn random_handle() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn hs_io(e: io::Error) -> ClientError {
    ClientError::HandshakeIo(e)
}

/// Connects and completes the handshake, whichever style the server speaks.
pub async fn connect<T: Transport>(
    transport: &T,
    addr: SocketAddr,
    bind: Option<SocketAddr>,
    tls: Option<&ClientTls>,
    faults: Faults<'_>,
) -> Result<(Conn<T::Stream>, Export), ClientError> {
    let injected = |what: &str| ClientError::Connect {
        addr,
        source: io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("{what} (fault injection)"),
        ),
    };
    // Hung: no connection until the connect timeout would have given up.
    let hang = async { tokio::time::sleep(CONNECT_TIMEOUT).await };
    if let Err(ended) = fault_apply::event(fault(faults, "connect"), || key("connect"), hang).await
    {
        return Err(injected(match ended.how {
            How::Hung => "connection timed out",
            _ => "connection refused",
        }));
    }
    let mut stream = Conn::Plain(
        transport
            .connect(addr, bind, CONNECT_TIMEOUT)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?,
    );
    let export = match tokio::time::timeout(GREETING_TIMEOUT, handshake(&mut stream, tls)).await {
        Ok(result) => result?,
        Err(_) => return Err(ClientError::GreetingTimeout),
    };
    // Hung: the greeting stalls until the greeting timeout gives up on it.
    let hang = async { tokio::time::sleep(GREETING_TIMEOUT).await };
    let verdict = fault_apply::incoming(
        fault(faults, "greeting_received"),
        || key("greeting_received"),
        hang,
    )
    .await;
    match verdict {
        Ok(Incoming::Proceed) => {}
        Ok(Incoming::Ignore) => {
            // As if the greeting never came: read on for one. The server
            // sends nothing more before we speak, so this ends at the
            // greeting timeout (or when it closes).
            let mut byte = [0u8; 1];
            return Err(
                match tokio::time::timeout(GREETING_TIMEOUT, stream.read(&mut byte)).await {
                    Err(_) => ClientError::GreetingTimeout,
                    Ok(_) => ClientError::HandshakeIo(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "no greeting after an ignored one (fault injection)",
                    )),
                },
            );
        }
        Err(ended) => {
            return Err(match ended.how {
                How::Hung => ClientError::GreetingTimeout,
                How::Damaged => ClientError::Greeting(HandshakeError::BadMagic(0)),
                _ => ClientError::HandshakeIo(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    ended.to_string(),
                )),
            })
        }
    }
    Ok((stream, export))
}

/// The fault plan of the one-shot commands (`client.*` keys), passed by the
/// `read`/`write` commands to each call; `None` everywhere else (the mirror
/// and the proxy have steps of their own).
pub type Faults<'a> = Option<&'a crate::probe::PlanProbe>;

fn fault(faults: Faults<'_>, step: &str) -> Action {
    match faults {
        None => Action::Pass,
        Some(probe) => probe.named("client", step),
    }
}

/// A `client.*` step's whole key, for fault messages.
fn key(step: &str) -> String {
    format!("client.{step}")
}

/// Sends one message of a request, applying the plan's verdict for `step`.
async fn send_part<S: AsyncWrite + Unpin>(
    stream: &mut S,
    faults: Faults<'_>,
    step: &str,
    bytes: &[u8],
) -> Result<(), ClientError> {
    let io_err = |source| ClientError::Io {
        what: "sending the request",
        source,
    };
    // Hung: the request stalls until the reply timeout gives up on it.
    let hang = async { tokio::time::sleep(REPLY_TIMEOUT).await };
    match fault_apply::send(fault(faults, step), || key(step), stream, bytes, hang).await {
        Ok(_sent_or_dropped) => Ok(()),
        Err(SendError::Io(source)) => Err(io_err(source)),
        Err(SendError::Fault(ended)) if ended.how == How::Hung => Err(ClientError::ReplyTimeout),
        Err(SendError::Fault(ended)) => Err(io_err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            ended.to_string(),
        ))),
    }
}

/// How a server's greeting began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GreetingStart {
    /// A whole oldstyle greeting: the size, all 32 flag bits, and the
    /// flexnbd extensions its reserved bytes offer.
    Oldstyle {
        size: u64,
        flags: u32,
        extensions: u32,
    },
    /// `NBDMAGIC` and `IHAVEOPT`: the newstyle negotiation follows.
    Newstyle,
}

/// Reads a greeting far enough to know which handshake follows. Anything
/// but a newstyle start is read as a whole 152-byte oldstyle greeting
/// before its magics are judged, as the C flexnbd does: closing a socket
/// with unread bytes sends a reset, and a peer whose greeting we refuse
/// must see a clean close instead.
pub async fn read_greeting_start<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<GreetingStart, ClientError> {
    let mut greeting = [0u8; proto::OLDSTYLE_GREETING_LEN];
    stream
        .read_exact(&mut greeting[..16])
        .await
        .map_err(hs_io)?;
    let start: [u8; 16] = greeting[..16].try_into().expect("16 bytes");
    let kind = proto::greeting_kind(&start);
    if kind == Ok(GreetingKind::Newstyle) {
        return Ok(GreetingStart::Newstyle);
    }
    let mut got = 16;
    while got < greeting.len() {
        let n = stream.read(&mut greeting[got..]).await.map_err(hs_io)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    // A bad magic is the verdict even when the greeting was cut short.
    kind?;
    if got < greeting.len() {
        return Err(ClientError::ShortGreeting { got });
    }
    let rest = greeting[16..].try_into().expect("136 bytes");
    let (size, flags) = proto::oldstyle_rest(&rest);
    Ok(GreetingStart::Oldstyle {
        size,
        flags,
        extensions: proto::oldstyle_extensions(&rest),
    })
}

/// The client side of either handshake; with `tls`, only a newstyle
/// server that starts TLS is accepted.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut Conn<S>,
    tls: Option<&ClientTls>,
) -> Result<Export, ClientError> {
    match read_greeting_start(stream).await? {
        GreetingStart::Oldstyle { .. } if tls.is_some() => Err(ClientError::NoTls(
            "sent the oldstyle greeting, which cannot start TLS".into(),
        )),
        GreetingStart::Oldstyle {
            size,
            flags,
            extensions,
        } => Ok(Export {
            size,
            flags: flags as u16,
            handshake: GreetingKind::Oldstyle,
            extensions,
        }),
        GreetingStart::Newstyle => newstyle(stream, tls).await,
    }
}

/// Reads one option reply header and its payload.
async fn option_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(OptionReplyHeader, Vec<u8>), ClientError> {
    let mut h = [0u8; 20];
    stream.read_exact(&mut h).await.map_err(hs_io)?;
    let reply = OptionReplyHeader::decode(&h)?;
    if reply.length > MAX_OPTION_REPLY {
        return Err(ClientError::OptionReplyTooLong {
            length: reply.length,
        });
    }
    let mut payload = vec![0u8; reply.length as usize];
    stream.read_exact(&mut payload).await.map_err(hs_io)?;
    Ok((reply, payload))
}

/// `: text` for a non-empty error message from the server.
fn server_message(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(payload);
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// NBD_OPT_STARTTLS and the TLS handshake. Anything but an ACK ends the
/// session: a client that asked for TLS never falls back to plaintext.
async fn start_tls<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut Conn<S>,
    tls: &ClientTls,
) -> Result<(), ClientError> {
    let header = OptionHeader {
        option: opt::STARTTLS,
        length: 0,
    };
    stream.write_all(&header.encode()).await.map_err(hs_io)?;
    stream.flush().await.map_err(hs_io)?;
    let (reply, payload) = option_reply(stream).await?;
    if reply.kind != rep::ACK {
        return Err(ClientError::NoTls(format!(
            "refused NBD_OPT_STARTTLS with reply 0x{:08x}{}",
            reply.kind,
            server_message(&payload)
        )));
    }
    stream
        .connect_tls(tls)
        .await
        .map_err(|source| ClientError::TlsHandshake {
            name: tls.name(),
            source,
        })
}

/// The newstyle negotiation, after the first 16 bytes of the greeting.
pub(crate) async fn newstyle<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut Conn<S>,
    tls: Option<&ClientTls>,
) -> Result<Export, ClientError> {
    let server_flags = stream.read_u16().await.map_err(hs_io)?;
    let fixed = server_flags & proto::FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
    if tls.is_some() && !fixed {
        return Err(ClientError::NoTls(
            "does not speak fixed newstyle, so it cannot start TLS".into(),
        ));
    }
    let mut client_flags = 0;
    if fixed {
        client_flags |= proto::CLIENT_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        client_flags |= proto::CLIENT_NO_ZEROES;
    }
    stream.write_u32(client_flags).await.map_err(hs_io)?;
    let Some(tls) = tls else {
        return choose_export(stream, fixed, no_zeroes).await;
    };
    start_tls(stream, tls).await?;
    match choose_export(stream, fixed, no_zeroes).await {
        Err(ClientError::HandshakeIo(e)) => Err(refused_after_tls(stream, e).await),
        other => other,
    }
}

/// In TLS 1.3 our side of the handshake is done before a server that
/// verifies clients has judged our certificate, so its refusal arrives as
/// the answer to our first option: a TLS alert, or a failed write when it
/// closed before we wrote. After a failed write the alert may still be
/// waiting to be read, and it says more than "broken pipe".
async fn refused_after_tls<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut Conn<S>,
    error: io::Error,
) -> ClientError {
    // rustls reports a received alert as InvalidData.
    if error.kind() == io::ErrorKind::InvalidData {
        return ClientError::TlsRefused(error);
    }
    let mut byte = [0u8; 1];
    match stream.read(&mut byte).await {
        Err(alert) if alert.kind() == io::ErrorKind::InvalidData => ClientError::TlsRefused(alert),
        _ => ClientError::TlsRefused(error),
    }
}

/// GO (or EXPORT_NAME on a server without it), once any TLS is up.
async fn choose_export<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut Conn<S>,
    fixed: bool,
    no_zeroes: bool,
) -> Result<Export, ClientError> {
    if fixed {
        let data = proto::InfoRequest {
            name: Vec::new(),
            // A server that does not know FLEXNBD ignores the request.
            requests: vec![proto::info::BLOCK_SIZE, proto::info::FLEXNBD],
        }
        .encode();
        let header = OptionHeader {
            option: opt::GO,
            length: data.len() as u32,
        };
        stream.write_all(&header.encode()).await.map_err(hs_io)?;
        stream.write_all(&data).await.map_err(hs_io)?;
        // Over TLS the option may sit in the session's buffer until flushed.
        stream.flush().await.map_err(hs_io)?;
        let mut export: Option<(u64, u16)> = None;
        let mut extensions = 0;
        loop {
            let (reply, payload) = option_reply(stream).await?;
            match reply.kind {
                rep::INFO => {
                    if let Some(info) = proto::decode_info_export(&payload) {
                        export = Some(info);
                    }
                    if let Some(offered) = proto::decode_info_flexnbd(&payload) {
                        extensions = offered;
                    }
                }
                rep::ACK => {
                    let (size, flags) = export.ok_or(ClientError::NoExportInfo)?;
                    return Ok(Export {
                        size,
                        flags,
                        handshake: GreetingKind::Newstyle,
                        extensions,
                    });
                }
                rep::ERR_UNSUP => break, // an old server: fall back to EXPORT_NAME
                rep::ERR_TLS_REQD => {
                    return Err(ClientError::TlsRequired {
                        option: opt::GO,
                        message: server_message(&payload),
                    })
                }
                kind if rep::is_error(kind) => {
                    return Err(ClientError::OptionRefused {
                        option: opt::GO,
                        kind,
                        message: server_message(&payload),
                    });
                }
                _ => {} // replies we did not ask for are ignored
            }
        }
    }
    let header = OptionHeader {
        option: opt::EXPORT_NAME,
        length: 0,
    };
    stream.write_all(&header.encode()).await.map_err(hs_io)?;
    stream.flush().await.map_err(hs_io)?;
    let size = stream.read_u64().await.map_err(hs_io)?;
    let flags = stream.read_u16().await.map_err(hs_io)?;
    if !no_zeroes {
        let mut zeros = [0u8; 124];
        stream.read_exact(&mut zeros).await.map_err(hs_io)?;
    }
    Ok(Export {
        size,
        flags,
        handshake: GreetingKind::Newstyle,
        extensions: 0,
    })
}

fn check_range(export: &Export, offset: u64, length: u64) -> Result<(), ClientError> {
    match offset.checked_add(length) {
        Some(end) if end <= export.size && length <= u64::from(u32::MAX) => Ok(()),
        _ => Err(ClientError::OutOfRange {
            offset,
            length,
            size: export.size,
        }),
    }
}

/// Reads the reply to the request `handle`. `data_len` is the data a
/// successful reply carries (a READ's length), skipped when the reply is
/// ignored by a fault.
async fn read_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    faults: Faults<'_>,
    handle: u64,
    kind: u16,
    data_len: u64,
) -> Result<(), ClientError> {
    let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
    let step = format!("reply_received.{}", cmd::name(kind));
    let reply = loop {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        by_reply_deadline(deadline, stream.read_exact(&mut h)).await?;
        let reply = SimpleReply::decode(&h);
        // Hung: the reply stalls until the reply timeout gives up on it.
        let hang = async { tokio::time::sleep(REPLY_TIMEOUT).await };
        match fault_apply::incoming(fault(faults, &step), || key(&step), hang).await {
            Ok(Incoming::Proceed) => break reply,
            Ok(Incoming::Ignore) => {
                // As if it never came: skip its data and wait on for the
                // reply, within the same timeout.
                if reply.error == 0 && data_len > 0 {
                    let mut data = (&mut *stream).take(data_len);
                    let mut sink = tokio::io::sink();
                    let skip = tokio::io::copy(&mut data, &mut sink);
                    by_reply_deadline(deadline, skip).await?;
                }
            }
            Err(ended) => {
                return Err(match ended.how {
                    How::Hung => ClientError::ReplyTimeout,
                    How::Damaged => ClientError::BadReplyMagic(!reply.magic),
                    _ => ClientError::Io {
                        what: "waiting for the reply",
                        source: io::Error::new(io::ErrorKind::ConnectionAborted, ended.to_string()),
                    },
                })
            }
        }
    };
    if reply.magic != proto::SIMPLE_REPLY_MAGIC {
        return Err(ClientError::BadReplyMagic(reply.magic));
    }
    if reply.handle != handle {
        return Err(ClientError::HandleMismatch {
            expected: handle,
            got: reply.handle,
        });
    }
    if reply.error != 0 {
        return Err(ClientError::ErrorReply(reply.error));
    }
    Ok(())
}

/// Waits for `io`, part of receiving a reply, until `deadline`.
async fn by_reply_deadline<T>(
    deadline: tokio::time::Instant,
    io: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout_at(deadline, io).await {
        Err(_) => Err(ClientError::ReplyTimeout),
        Ok(Err(source)) => Err(ClientError::Io {
            what: "waiting for the reply",
            source,
        }),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Moves exactly `length` bytes from `from` to `to`, with no more than
/// `REPLY_TIMEOUT` between pieces of progress.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    length: u64,
    what: &'static str,
    corrupt_first: bool,
) -> Result<(), ClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut corrupt_first = corrupt_first;
    let mut buf = vec![0u8; PIECE.min(length as usize)];
    let mut done = 0u64;
    while done < length {
        let want = ((length - done) as usize).min(buf.len());
        let n = match tokio::time::timeout(REPLY_TIMEOUT, from.read(&mut buf[..want])).await {
            Err(_) => return Err(ClientError::ReplyTimeout),
            Ok(Err(source)) => return Err(ClientError::Io { what, source }),
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            return Err(ClientError::Short {
                what,
                expected: length,
                got: done,
            });
        }
        if corrupt_first {
            faults::corrupt(&mut buf[..n]);
            corrupt_first = false;
        }
        to.write_all(&buf[..n])
            .await
            .map_err(|source| ClientError::Io { what, source })?;
        done += n as u64;
    }
    to.flush()
        .await
        .map_err(|source| ClientError::Io { what, source })
}

/// Checks the range and sends one request header; returns its handle.
async fn send_request<S: AsyncWrite + Unpin>(
    stream: &mut S,
    faults: Faults<'_>,
    export: &Export,
    kind: u16,
    offset: u64,
    length: u64,
) -> Result<u64, ClientError> {
    check_range(export, offset, length)?;
    let handle = random_handle();
    let request = Request::new(kind, 0, handle, offset, length as u32);
    send_part(
        stream,
        faults,
        &format!("request_send.{}", cmd::name(kind)),
        &request.encode(),
    )
    .await?;
    Ok(handle)
}

/// Reads `length` bytes at `offset` and writes them to `out`.
pub async fn read<S, W>(
    stream: &mut S,
    export: &Export,
    offset: u64,
    length: u64,
    out: &mut W,
    faults: Faults<'_>,
) -> Result<(), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    let handle = send_request(stream, faults, export, cmd::READ, offset, length).await?;
    read_reply(stream, faults, handle, cmd::READ, length).await?;
    pump(
        stream,
        out,
        length,
        "receiving the data from the server",
        false,
    )
    .await
}

/// Writes `length` bytes taken from `input` at `offset`.
pub async fn write<S, R>(
    stream: &mut S,
    export: &Export,
    offset: u64,
    length: u64,
    input: &mut R,
    faults: Faults<'_>,
) -> Result<(), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let handle = send_request(stream, faults, export, cmd::WRITE, offset, length).await?;
    let what = "copying the data from standard input to the server";
    let aborted = |why: &str| ClientError::Io {
        what,
        source: io::Error::new(io::ErrorKind::ConnectionAborted, why.to_string()),
    };
    // Hung: the payload stalls until the reply timeout gives up on it.
    let hang = async { tokio::time::sleep(REPLY_TIMEOUT).await };
    let step = "payload_send.write";
    match fault_apply::outgoing(fault(faults, step), || key(step), hang).await {
        Ok(Outgoing::Whole) => pump(input, stream, length, what, false).await?,
        Ok(Outgoing::Corrupted) => pump(input, stream, length, what, true).await?,
        Ok(Outgoing::Dropped) => {}
        Ok(Outgoing::Cut { keep, ended }) => {
            if keep > 0 {
                pump(input, stream, (keep as u64).min(length), what, false).await?;
            }
            let _ = stream.shutdown().await;
            return Err(aborted(&ended.to_string()));
        }
        Err(_hung) => return Err(ClientError::ReplyTimeout),
    }
    read_reply(stream, faults, handle, cmd::WRITE, 0).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` (then EOF) to `read_greeting_start`; returns its
    /// result and how many bytes it left unread.
    async fn start_of(bytes: &[u8]) -> (Result<GreetingStart, ClientError>, usize) {
        let mut input = bytes;
        let result = read_greeting_start(&mut input).await;
        (result, input.len())
    }

    fn greeting_then(tail: &[u8], edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let mut g = proto::oldstyle_greeting(1 << 20, 13).to_vec();
        edit(&mut g);
        g.extend_from_slice(tail);
        g
    }

    #[tokio::test]
    async fn a_bad_magic_is_judged_only_after_all_152_bytes_are_read() {
        for edit in [
            (|g: &mut [u8]| g[8] ^= 0xff) as fn(&mut [u8]),
            |g: &mut [u8]| g[0] ^= 0xff,
        ] {
            let (result, unread) = start_of(&greeting_then(b"next", edit)).await;
            assert!(
                matches!(result, Err(ClientError::Greeting(_))),
                "expected a bad magic error, got {result:?}"
            );
            assert_eq!(unread, 4, "exactly the 152 greeting bytes must be read");
        }
    }

    #[tokio::test]
    async fn a_good_oldstyle_greeting_gives_size_and_all_32_flag_bits() {
        let mut g = proto::oldstyle_greeting(4096, 0x0001_000d).to_vec();
        g.extend_from_slice(b"next");
        let (result, unread) = start_of(&g).await;
        assert_eq!(
            result.unwrap(),
            GreetingStart::Oldstyle {
                size: 4096,
                flags: 0x0001_000d,
                extensions: 0,
            }
        );
        assert_eq!(unread, 4);
    }

    #[tokio::test]
    async fn an_oldstyle_greeting_offering_extensions_gives_them_and_only_a_tagged_one_does() {
        let g = proto::oldstyle_greeting_offering(4096, 13, proto::ext::RESUME);
        assert_eq!(&g[28..36], b"FLEX\0\0\0\x01");
        assert!(g[36..].iter().all(|&b| b == 0), "the rest stays zero");
        let (result, _) = start_of(&g).await;
        assert_eq!(
            result.unwrap(),
            GreetingStart::Oldstyle {
                size: 4096,
                flags: 13,
                extensions: proto::ext::RESUME,
            }
        );
        // The bit set without the tag is reserved bytes, not an offer.
        let mut untagged = g;
        untagged[28..32].copy_from_slice(&[0; 4]);
        let (result, _) = start_of(&untagged).await;
        assert!(matches!(
            result.unwrap(),
            GreetingStart::Oldstyle { extensions: 0, .. }
        ));
        // Offering nothing is the C flexnbd's greeting, byte for byte.
        assert_eq!(
            proto::oldstyle_greeting_offering(4096, 13, 0),
            proto::oldstyle_greeting(4096, 13)
        );
    }

    #[tokio::test]
    async fn a_greeting_cut_short_is_rejected_with_how_much_came() {
        let g = proto::oldstyle_greeting(4096, 13);
        let (result, _) = start_of(&g[..100]).await;
        assert!(
            matches!(result, Err(ClientError::ShortGreeting { got: 100 })),
            "expected a short greeting of 100 bytes, got {result:?}"
        );
    }

    #[tokio::test]
    async fn a_newstyle_start_leaves_the_rest_for_the_negotiation() {
        let g = proto::newstyle_greeting(proto::FLAG_FIXED_NEWSTYLE);
        let (result, unread) = start_of(&g).await;
        assert_eq!(result.unwrap(), GreetingStart::Newstyle);
        assert_eq!(unread, 2, "the handshake flags are the negotiation's");
    }
}
