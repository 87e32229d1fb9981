//! Fixed newstyle negotiation, server side.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::transmission_flags;
use crate::fault_apply::{self, Ended, Incoming, SendError};
use crate::probe::{Probe, Step};
use crate::proto::{self, opt, rep, HandshakeError, InfoRequest, MetaContextRequest, OptionHeader};
use crate::tls::{Conn, Policy, ServerTls};
use crate::{debug, info, warn};

/// At most this many options before transmission; a client that keeps
/// sending options forever is dropped.
pub const MAX_OPTIONS: u32 = 256;

/// What the negotiation offers: the export, and whether the transmission
/// phase can speak more than simple replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    pub size: u64,
    /// Transmission flags; SEND_DF is added when structured replies are
    /// negotiated.
    pub flags: u16,
    /// Structured replies and `base:allocation` can be negotiated. A proxy
    /// that forwards simple replies only answers them as unsupported.
    pub structured: bool,
    /// The flexnbd extensions offered to a client that asks for them.
    pub extensions: u32,
}

impl Offer {
    /// An image served by this server: every flag and option we implement.
    pub fn image(size: u64) -> Offer {
        Offer {
            size,
            flags: transmission_flags(),
            structured: true,
            extensions: 0,
        }
    }
}

/// What a client negotiated for its transmission phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    pub structured: bool,
    /// `base:allocation` was selected, so BLOCK_STATUS may be used.
    pub base_allocation: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NegotiateError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Protocol(#[from] HandshakeError),
    #[error("client vanished {what}: expected {expected} bytes, got {got}")]
    Vanished {
        what: String,
        expected: usize,
        got: usize,
    },
    #[error("client flags 0x{0:08x} include bits we do not know (known: 0x00000003)")]
    UnknownClientFlags(u32),
    #[error("option {option} has a {length}-byte payload; the limit is {limit}")]
    OptionTooLong {
        option: u32,
        length: u32,
        limit: u32,
    },
    #[error("client sent more than {0} options")]
    TooManyOptions(u32),
    #[error("client aborted the negotiation")]
    Aborted,
    #[error("non-fixed newstyle client sent option {0}, which only fixed newstyle allows")]
    NotFixed(u32),
    #[error("{0}")]
    Fault(#[from] Ended),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("client chose the export with EXPORT_NAME without starting TLS, which this server requires; closing (a client must send NBD_OPT_STARTTLS first)")]
    PlaintextExportName,
}

impl From<SendError> for NegotiateError {
    fn from(e: SendError) -> NegotiateError {
        match e {
            SendError::Io(e) => NegotiateError::Io(e),
            SendError::Fault(e) => NegotiateError::Fault(e),
        }
    }
}

struct Negotiation<'a, S, P> {
    stream: &'a mut Conn<S>,
    offer: Offer,
    probe: &'a P,
    fixed: bool,
    no_zeroes: bool,
    done: Negotiated,
    out: Vec<u8>,
    tls: Option<&'a ServerTls>,
    /// A plaintext option was refused with TLS_REQD (warned about once).
    warned_plaintext: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin, P: Probe> Negotiation<'_, S, P> {
    /// Sends the queued option reply bytes, after asking the probe.
    async fn send(&mut self, option: u32) -> Result<(), NegotiateError> {
        let out = std::mem::take(&mut self.out);
        let step = Step::OptionReplySend { option };
        // Sent or dropped (the client is left waiting), the negotiation goes
        // on. A hung handshake is ended by the handshake timeout around it.
        let _sent_or_dropped = fault_apply::send(
            self.probe.step(step),
            || self.probe.key(step),
            self.stream,
            &out,
            std::future::pending(),
        )
        .await?;
        Ok(())
    }

    async fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> Result<(), NegotiateError> {
        proto::put_option_reply(&mut self.out, option, kind, data);
        self.send(option).await
    }

    async fn error(&mut self, option: u32, kind: u32, why: &str) -> Result<(), NegotiateError> {
        debug!("option {option} refused: {why}");
        // The message is for people reading a client's log; spec allows it.
        self.reply(option, kind, why.as_bytes()).await
    }

    /// TLS is required and not started yet.
    fn tls_missing(&self) -> bool {
        matches!(self.tls, Some(t) if t.policy == Policy::Required) && !self.stream.is_tls()
    }

    /// NBD_OPT_STARTTLS: acknowledge, then run the TLS handshake; every
    /// option after it travels inside TLS.
    async fn starttls(&mut self, data: &[u8]) -> Result<(), NegotiateError> {
        let option = opt::STARTTLS;
        let Some(tls) = self.tls else {
            return self
                .error(
                    option,
                    rep::ERR_UNSUP,
                    "TLS is not configured on this server",
                )
                .await;
        };
        if !data.is_empty() {
            return self
                .error(option, rep::ERR_INVALID, "STARTTLS takes no data")
                .await;
        }
        if self.stream.is_tls() {
            return self
                .error(option, rep::ERR_INVALID, "TLS is already running")
                .await;
        }
        self.reply(option, rep::ACK, &[]).await?;
        // Hung: the client waits in its handshake until the handshake
        // timeout around the negotiation ends it; closed: it sees the end.
        fault_apply::event(
            self.probe.step(Step::TlsHandshake),
            || self.probe.key(Step::TlsHandshake),
            std::future::pending(),
        )
        .await?;
        self.stream
            .accept_tls(tls)
            .await
            .map_err(NegotiateError::Tls)?;
        // The specification: nothing negotiated before STARTTLS survives it.
        self.done = Negotiated::default();
        info!(
            "TLS started{}",
            if tls.verify_peer {
                " (client certificate verified)"
            } else {
                ""
            }
        );
        Ok(())
    }

    fn export_flags(&self) -> u16 {
        if self.done.structured {
            self.offer.flags | proto::flags::SEND_DF
        } else {
            self.offer.flags
        }
    }
}

/// Fills `buf`, or says how far the client got before it vanished.
async fn read_all<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    what: impl FnOnce() -> String,
) -> Result<(), NegotiateError> {
    let mut got = 0;
    while got < buf.len() {
        let n = stream.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(NegotiateError::Vanished {
                what: what(),
                expected: buf.len(),
                got,
            });
        }
        got += n;
    }
    Ok(())
}

/// Runs the whole newstyle handshake. Returns what was negotiated once the
/// client enters transmission (EXPORT_NAME or a successful GO).
pub async fn negotiate<S, P>(
    stream: &mut Conn<S>,
    offer: Offer,
    probe: &P,
    tls: Option<&ServerTls>,
) -> Result<Negotiated, NegotiateError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    P: Probe,
{
    let greeting = proto::newstyle_greeting(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    // A dropped greeting leaves the client waiting for one, and a hung
    // handshake is ended by the handshake timeout around it.
    let _sent_or_dropped = fault_apply::send(
        probe.step(Step::GreetingSend),
        || probe.key(Step::GreetingSend),
        stream,
        &greeting,
        std::future::pending(),
    )
    .await?;
    let mut flags = [0u8; 4];
    read_all(stream, &mut flags, || {
        "in the middle of the client flags".into()
    })
    .await?;
    let client_flags = u32::from_be_bytes(flags);
    if client_flags & !(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES) != 0 {
        return Err(NegotiateError::UnknownClientFlags(client_flags));
    }
    let mut n = Negotiation {
        stream,
        offer,
        probe,
        fixed: client_flags & proto::CLIENT_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & proto::CLIENT_NO_ZEROES != 0,
        done: Negotiated::default(),
        out: Vec::new(),
        tls,
        warned_plaintext: false,
    };
    for _ in 0..MAX_OPTIONS {
        let mut header = [0u8; 16];
        read_all(n.stream, &mut header, || {
            "in the middle of an option header".into()
        })
        .await?;
        let OptionHeader { option, length } = OptionHeader::decode(&header)?;
        if length > proto::MAX_OPTION_LEN {
            // Too big to be honest; reading it would let a client make us
            // swallow gigabytes, so drop the connection instead.
            return Err(NegotiateError::OptionTooLong {
                option,
                length,
                limit: proto::MAX_OPTION_LEN,
            });
        }
        let mut data = vec![0u8; length as usize];
        read_all(n.stream, &mut data, || {
            format!("in the middle of option {option}'s data")
        })
        .await?;
        let step = Step::OptionReceived { option };
        let verdict =
            fault_apply::incoming(probe.step(step), || probe.key(step), std::future::pending())
                .await?;
        if verdict == Incoming::Ignore {
            debug!("option {option} ignored (fault injection)");
            continue;
        }
        if !n.fixed && option != opt::EXPORT_NAME {
            return Err(NegotiateError::NotFixed(option));
        }
        debug!("option {option} with {length} bytes");
        if option == opt::STARTTLS {
            n.starttls(&data).await?;
            continue;
        }
        if n.tls_missing() && option != opt::ABORT {
            if option == opt::EXPORT_NAME {
                // EXPORT_NAME has no error reply: all we can do is close.
                return Err(NegotiateError::PlaintextExportName);
            }
            if !n.warned_plaintext {
                n.warned_plaintext = true;
                warn!("a client sent option {option} without starting TLS, which this server requires; answering NBD_REP_ERR_TLS_REQD");
            }
            n.error(
                option,
                rep::ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            )
            .await?;
            continue;
        }
        match option {
            opt::EXPORT_NAME => {
                let reply = proto::export_name_reply(n.offer.size, n.export_flags(), n.no_zeroes);
                n.out.extend_from_slice(&reply);
                n.send(option).await?;
                info!(
                    "client chose export {:?} with EXPORT_NAME",
                    String::from_utf8_lossy(&data)
                );
                return Ok(n.done);
            }
            opt::ABORT => {
                let _ = n.reply(option, rep::ACK, &[]).await;
                return Err(NegotiateError::Aborted);
            }
            opt::LIST => {
                if !data.is_empty() {
                    n.error(option, rep::ERR_INVALID, "LIST takes no data")
                        .await?;
                    continue;
                }
                // One export; its name is the empty string (any name is accepted).
                n.reply(option, rep::SERVER, &0u32.to_be_bytes()).await?;
                n.reply(option, rep::ACK, &[]).await?;
            }
            opt::INFO | opt::GO => {
                let request = match InfoRequest::decode(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        n.error(option, rep::ERR_INVALID, &e.to_string()).await?;
                        continue;
                    }
                };
                let export = proto::info_export(n.offer.size, n.export_flags());
                proto::put_option_reply(&mut n.out, option, rep::INFO, &export);
                let sizes = proto::info_block_size(
                    proto::MIN_BLOCK,
                    proto::PREFERRED_BLOCK,
                    proto::MAX_BLOCK,
                );
                proto::put_option_reply(&mut n.out, option, rep::INFO, &sizes);
                if n.offer.extensions != 0 && request.requests.contains(&proto::info::FLEXNBD) {
                    let offered = proto::info_flexnbd(n.offer.extensions);
                    proto::put_option_reply(&mut n.out, option, rep::INFO, &offered);
                }
                if request.requests.contains(&proto::info::NAME) {
                    let mut name = proto::info::NAME.to_be_bytes().to_vec();
                    name.extend_from_slice(&request.name);
                    proto::put_option_reply(&mut n.out, option, rep::INFO, &name);
                }
                n.reply(option, rep::ACK, &[]).await?;
                if option == opt::GO {
                    info!(
                        "client chose export {:?} with GO",
                        String::from_utf8_lossy(&request.name)
                    );
                    return Ok(n.done);
                }
            }
            opt::STRUCTURED_REPLY | opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT
                if !n.offer.structured =>
            {
                n.error(
                    option,
                    rep::ERR_UNSUP,
                    "only simple replies are offered here",
                )
                .await?;
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    n.error(option, rep::ERR_INVALID, "STRUCTURED_REPLY takes no data")
                        .await?;
                    continue;
                }
                n.done.structured = true;
                n.reply(option, rep::ACK, &[]).await?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = option == opt::SET_META_CONTEXT;
                if set {
                    // Replaces the previous selection, even if this one fails.
                    n.done.base_allocation = false;
                }
                if !n.done.structured {
                    n.error(
                        option,
                        rep::ERR_INVALID,
                        "negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let request = match MetaContextRequest::decode(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        n.error(option, rep::ERR_INVALID, &e.to_string()).await?;
                        continue;
                    }
                };
                let wanted = if set {
                    request
                        .queries
                        .iter()
                        .any(|q| q == proto::BASE_ALLOCATION.as_bytes())
                } else {
                    request.queries.is_empty()
                        || request
                            .queries
                            .iter()
                            .any(|q| q == b"base:" || q == proto::BASE_ALLOCATION.as_bytes())
                };
                if wanted {
                    let id = if set { proto::BASE_ALLOCATION_ID } else { 0 };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                    proto::put_option_reply(&mut n.out, option, rep::META_CONTEXT, &d);
                    n.done.base_allocation |= set;
                }
                n.reply(option, rep::ACK, &[]).await?;
            }
            other => {
                warn!("client sent option {other}, which we do not support; answering NBD_REP_ERR_UNSUP");
                n.error(other, rep::ERR_UNSUP, "option not supported")
                    .await?;
            }
        }
    }
    Err(NegotiateError::TooManyOptions(MAX_OPTIONS))
}
