//! The transmission phase of one client connection.
//!
//! One task reads requests and executes them in arrival order; replies are
//! batched into a shared writer and sent when no further request is already
//! waiting (so a pipelined burst costs one send). Requests that must wait for
//! the disk (FLUSH, and writes with FUA) finish on their own tasks and may be
//! answered out of order. Every payload is handled in pieces of at most
//! [`PIECE`](crate::store::PIECE) bytes, so memory stays bounded whatever
//! length a client sends.
//!
//! This file holds the request loop; its parts live beside it: reading
//! requests and the fault probe's verdicts (`framing`), carrying them out
//! (`exec`), grouping writes, syncs and reads (`batch`), and in `listen`
//! the hand-off (`dest_hook`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use super::batch::{Batch, MAX_DEFERRED, MAX_DEFERRED_READS};
use super::dest_hook::Session;
use super::framing::{finish, hang_until_closed};
use super::negotiate::{negotiate, NegotiateError, Negotiated, Offer};
use super::writer::ReplyWriter;
use super::{oldstyle_flags, HandshakeMode, Shared};
use crate::core::destination::CloseReason;
use crate::core::request;
use crate::fault_apply::{self, Ended, How, SendError};
use crate::probe::{Probe, Step};
use crate::proto::{self, cmd, errno, Request, SimpleReply};
use crate::store::Image;
use crate::tls::Conn;
use crate::transport::Stream;
use crate::{debug, info, warn};

/// Size of the read buffer: large enough to take a pipelined burst of small
/// requests (and their payloads) in one system call.
const READ_BUFFER: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("handshake failed: {0}")]
    Handshake(#[from] NegotiateError),
    #[error("handshake not finished within {0} s")]
    HandshakeTimeout(f64),
    #[error("bad request magic: expected 0x{expected:08x}, got 0x{0:08x}", expected = proto::REQUEST_MAGIC)]
    BadMagic(u32),
    #[error("client vanished {what}: expected {expected} bytes, got {got}")]
    Vanished {
        what: &'static str,
        expected: u64,
        got: u64,
    },
    #[error("sending a reply failed: {0}")]
    Send(io::Error),
    #[error("reading from the client failed: {0}")]
    Receive(io::Error),
    #[error("reading the image failed after part of the reply was sent: {0}")]
    ReadAfterSend(io::Error),
    #[error("{0}")]
    FaultClosed(String),
    #[error("killswitch: a request took longer than {0} s")]
    Killswitch(f64),
    #[error("cannot record the migration marker: {0}")]
    Marker(String),
    #[error("fault injection hung the connection at {0}")]
    Hang(String),
    #[error("{0}")]
    Offload(io::Error),
    #[error("{0}")]
    Gate(#[from] crate::gate::Stopped),
}

impl From<Ended> for ConnError {
    fn from(e: Ended) -> ConnError {
        match e.how {
            How::Hung => ConnError::Hang(e.key),
            _ => ConnError::FaultClosed(e.to_string()),
        }
    }
}

pub(super) type Writer<W> = Arc<Mutex<ReplyWriter<W>>>;

/// Runs one client from greeting to close.
pub async fn serve_client<S: Stream, P: Probe>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared<P>>,
    stop: CancellationToken,
) -> Result<(), ConnError> {
    let image = shared.image.clone();
    // Plaintext until a newstyle client asks for STARTTLS.
    let mut stream = Conn::Plain(stream);
    let negotiated = match (&shared.config.gate, shared.config.handshake) {
        // The negotiation runs on the gate, holding the stream, and gives
        // it back for transmission here.
        (Some(gate), HandshakeMode::Newstyle) => {
            let limit = shared.config.handshake_timeout;
            let (there, on_gate, stop) = (stream, shared.clone(), stop.clone());
            let work = gate.run(async move {
                let mut stream = there;
                let negotiated = greet(&mut stream, &on_gate, &stop).await;
                (stream, negotiated)
            });
            // The handshake time is also kept here, on this runtime's
            // clock: the gate's own clock starts only when the gate gets
            // to the work, and a gate held up (a queue of handshakes, a
            // busy CPU) must not stretch it. Timing out drops the work
            // there, and the socket with it.
            let (back, negotiated) = match tokio::time::timeout(limit, work).await {
                Ok(Ok(done)) => done,
                Ok(Err(stopped)) => return Err(ConnError::Gate(stopped)),
                Err(_) => return Err(ConnError::HandshakeTimeout(limit.as_secs_f64())),
            };
            stream = back;
            negotiated?
        }
        _ => greet(&mut stream, &shared, &stop).await?,
    };
    debug!("client {peer} in transmission: {negotiated:?}");
    let (read, write) = stream.into_split();
    let mut conn = Connection {
        reader: BufReader::with_capacity(READ_BUFFER, read),
        writer: Arc::new(Mutex::new(ReplyWriter::new(write))),
        image,
        negotiated,
        probe: shared.probe.clone(),
        deferred: Arc::new(Semaphore::new(MAX_DEFERRED as usize)),
        reads: Arc::new(Semaphore::new(MAX_DEFERRED_READS)),
        all_reads: shared.deferred_reads.clone(),
        payload: Vec::new(),
        batch: Batch::default(),
        peer,
        stop,
        killswitch: shared.config.killswitch,
        session: shared
            .destination
            .clone()
            .map(|d| Session::open(d, peer.to_string())),
    };
    let mut result = conn.run().await;
    if let Err(ConnError::Hang(_)) = &result {
        // A hung connection answers nothing more but still notices when
        // its peer gives up, so a single-slot listener frees its slot.
        hang_until_closed(&mut conn.reader, &conn.stop).await;
    }
    if let Err(ConnError::Hang(step)) = &result {
        result = Err(ConnError::FaultClosed(format!(
            "fault injection hung the connection at {step} until the peer closed"
        )));
    }
    if let Some(session) = &mut conn.session {
        // Told to the hand-off when the connection is dropped; an ended
        // DISCONNECT already said EOF.
        match &result {
            Ok(()) => session.ending = CloseReason::Eof,
            Err(ConnError::Killswitch(_)) => session.ending = CloseReason::Timeout,
            Err(_) => {}
        }
    }
    // Let requests still waiting for the disk send their replies first.
    let _all = conn.deferred.acquire_many(MAX_DEFERRED).await;
    let mut w = conn.writer.lock().await;
    let _ = w.shutdown().await;
    result
}

/// The greeting, and for newstyle the whole negotiation (STARTTLS and
/// the TLS handshake included), within the handshake time.
async fn greet<S: Stream, P: Probe>(
    stream: &mut Conn<S>,
    shared: &Shared<P>,
    stop: &CancellationToken,
) -> Result<Negotiated, ConnError> {
    let image = &shared.image;
    Ok(match shared.config.handshake {
        HandshakeMode::Oldstyle => {
            let flags = oldstyle_flags(shared.config.oldstyle_extra_flags);
            let greeting = proto::oldstyle_greeting_offering(
                image.size(),
                u32::from(flags),
                shared.config.extensions,
            );
            // Hung: reading and discarding needs the stream, so it is done
            // here rather than by `send`.
            let sent = fault_apply::send(
                shared.probe.step(Step::GreetingSend),
                || Step::GreetingSend.key(),
                stream,
                &greeting,
                std::future::ready(()),
            )
            .await;
            match sent {
                Ok(_sent_or_dropped) => {}
                Err(SendError::Io(e)) => return Err(ConnError::Send(e)),
                Err(SendError::Fault(ended)) => {
                    if ended.how == How::Hung {
                        hang_until_closed(stream, stop).await;
                    }
                    return Err(ended.into());
                }
            }
            Negotiated::default()
        }
        HandshakeMode::Newstyle => {
            let limit = shared.config.handshake_timeout;
            match tokio::time::timeout(
                limit,
                negotiate(
                    stream,
                    Offer {
                        extensions: shared.config.extensions,
                        ..Offer::image(image.size())
                    },
                    &*shared.probe,
                    shared.config.tls.as_deref(),
                ),
            )
            .await
            {
                Ok(result) => result?,
                Err(_) => return Err(ConnError::HandshakeTimeout(limit.as_secs_f64())),
            }
        }
    })
}

pub(super) struct Connection<R, W, P> {
    pub(super) reader: BufReader<R>,
    pub(super) writer: Writer<W>,
    pub(super) image: Arc<Image>,
    pub(super) negotiated: Negotiated,
    pub(super) probe: Arc<P>,
    pub(super) deferred: Arc<Semaphore>,
    /// Slots for reads waiting for the disk on their own (`defer_read`).
    pub(super) reads: Arc<Semaphore>,
    /// The server's slots for such reads, over all its connections.
    pub(super) all_reads: Arc<Semaphore>,
    /// Reused buffer for the pieces of large write payloads.
    pub(super) payload: Vec<u8>,
    /// Small writes received but not yet stored (and so not yet answered).
    pub(super) batch: Batch,
    pub(super) peer: SocketAddr,
    /// Cancelled to end the connection between requests (ACL change,
    /// shutdown, migration cut-off); a request in progress finishes first.
    pub(super) stop: CancellationToken,
    /// A request cycle (from its first byte to its reply) longer than this
    /// drops the client.
    pub(super) killswitch: Option<Duration>,
    /// In `listen`: this connection's part in the migration hand-off.
    pub(super) session: Option<Session>,
}

/// What to do after a request was handled.
pub(super) enum Next {
    Continue,
    Stop,
}

impl<R, W, P> Connection<R, W, P>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    P: Probe,
{
    async fn run(&mut self) -> Result<(), ConnError> {
        loop {
            if self.stop.is_cancelled() {
                // Writes already taken in are stored and answered: a stop
                // lets the request in progress finish, and a batch is that.
                self.store_batch().await?;
                self.send_replies().await?;
                info!("client {} stopped between requests", self.peer);
                return Ok(());
            }
            if self.reader.buffer().is_empty() {
                // Wait for the next request to start arriving, or a stop.
                tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => continue,
                    available = self.reader.fill_buf() => {
                        let closed = match available {
                            Ok(bytes) => bytes.is_empty(),
                            // A TLS client that closes without close_notify
                            // between requests cut no message short (NBD's
                            // framing shows where each ends): as clean an
                            // end as a plaintext close.
                            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => true,
                            Err(e) => return Err(ConnError::Receive(e)),
                        };
                        if closed {
                            debug!("client {} closed the connection", self.peer);
                            return Ok(());
                        }
                    }
                }
            }
            let next = match self.killswitch {
                None => self.request_cycle().await?,
                Some(limit) => match tokio::time::timeout(limit, self.request_cycle()).await {
                    Ok(next) => next?,
                    Err(_) => return Err(ConnError::Killswitch(limit.as_secs_f64())),
                },
            };
            if let Next::Stop = next {
                return Ok(());
            }
        }
    }

    /// One request: header, payload, execution, and (when no further
    /// request is already waiting) sending the replies.
    pub(super) async fn request_cycle(&mut self) -> Result<Next, ConnError> {
        let Some(request) = self.read_header().await? else {
            return Ok(Next::Stop);
        };
        let next = self.handle(request).await?;
        if !self.next_request_buffered() {
            // The next request would wait on the network: store the
            // burst's writes and send what it produced first. Holding them
            // while only the *start* of the next request had arrived
            // starved a pipelining client on a slow link of every reply,
            // since a stream of large writes always has the next header
            // waiting (seconds without a reply, over 200 Mbit/s).
            self.store_batch().await?;
            self.send_replies().await?;
        }
        Ok(next)
    }

    /// Whether the whole next request, its header and a write's payload,
    /// is in the read buffer already, so that handling it cannot wait on
    /// the network.
    fn next_request_buffered(&self) -> bool {
        let b = self.reader.buffer();
        let Some(header) = b.get(..proto::REQUEST_LEN) else {
            return false;
        };
        let r = Request::decode(header.try_into().expect("REQUEST_LEN bytes"));
        let payload = if r.kind == cmd::WRITE {
            r.length as usize
        } else {
            0
        };
        b.len() >= proto::REQUEST_LEN + payload
    }

    pub(super) async fn send_replies(&mut self) -> Result<(), ConnError> {
        self.writer
            .lock()
            .await
            .send()
            .await
            .map_err(ConnError::Send)
    }

    async fn handle(&mut self, req: Request) -> Result<Next, ConnError> {
        if !Batch::takes(&req) {
            // Everything before this request is stored and answered first:
            // a read sees earlier writes, a flush covers them.
            self.store_batch().await?;
        }
        let drop_request = !self
            .received(Step::RequestReceived { kind: req.kind })
            .await?;
        if !req.magic_ok() {
            warn!(
                "client {}: bad request magic: expected 0x{:08x}, got 0x{:08x}; answering EBADMSG and closing",
                self.peer,
                proto::REQUEST_MAGIC,
                req.magic
            );
            self.invalid(errno::EBADMSG).await?;
            let mut w = self.writer.lock().await;
            w.put(&SimpleReply::new(errno::EBADMSG, req.handle).encode());
            w.send().await.map_err(ConnError::Send)?;
            return Err(ConnError::BadMagic(req.magic));
        }
        if self.session.is_some() && matches!(req.kind, cmd::RESUME | cmd::CHECKPOINT) {
            // The hand-off's own: their offset is the migration id, not a
            // position in the image, so no range check.
            if drop_request {
                return Ok(Next::Continue);
            }
            if req.kind == cmd::RESUME {
                self.resume(&req).await?;
            } else {
                self.checkpoint(&req).await?;
            }
            return Ok(Next::Continue);
        }
        let size = self.image.size();
        if !req.in_range(size) {
            // The NBD spec asks for EINVAL from BLOCK_STATUS, ENOSPC otherwise.
            let (error, error_name) = if req.kind == cmd::BLOCK_STATUS {
                (errno::EINVAL, "EINVAL")
            } else {
                (errno::ENOSPC, "ENOSPC")
            };
            warn!(
                "client {}: {} of {} bytes at offset {} is beyond the export size {}; answering {error_name}",
                self.peer,
                cmd::name(req.kind),
                req.length,
                req.offset,
                size
            );
            if req.kind == cmd::WRITE {
                self.drain(u64::from(req.length)).await?;
            }
            self.error_reply(&req, error, "request is beyond the end of the export")
                .await?;
            return Ok(Next::Continue);
        }
        if drop_request {
            if req.kind == cmd::WRITE {
                self.drain(u64::from(req.length)).await?;
            }
            return Ok(Next::Continue);
        }
        let plan = request::plan(req.kind, req.flags);
        if plan.changes_data() {
            let payload = if req.kind == cmd::WRITE {
                u64::from(req.length)
            } else {
                0
            };
            self.before_change(payload).await?;
            // While a migration converges towards a slower destination,
            // clients' changes are paced to what it can absorb
            // (mirror::policy); otherwise this is zero.
            let wait = self.image.pace_write(req.offset, u64::from(req.length));
            self.image.pace_sleep(wait).await;
        }
        match req.kind {
            cmd::READ => self.read(&req).await?,
            cmd::WRITE => self.write(&req).await?,
            cmd::DISC => return self.disconnect().await,
            cmd::ENTRUST if self.session.is_some() => self.entrust(&req).await?,
            // The plan of a FLUSH: sync, then reply.
            cmd::FLUSH => self.defer_sync(&req).await,
            // Carried out when the batch is stored (`exec::zero_or_trim_now`).
            cmd::TRIM | cmd::WRITE_ZEROES => self.batch_zero(&req).await?,
            cmd::CACHE => self.cache(&req).await?,
            cmd::BLOCK_STATUS => self.block_status(&req).await?,
            cmd::DIGEST => self.digest(&req).await?,
            other => {
                warn!(
                    "client {}: unknown command type {other}; answering EINVAL",
                    self.peer
                );
                self.error_reply(&req, errno::EINVAL, "unknown command")
                    .await?;
            }
        }
        Ok(Next::Continue)
    }

    pub(super) async fn simple_reply(
        &mut self,
        req: &Request,
        error: u32,
    ) -> Result<(), ConnError> {
        let verdict = self.probe.step(Step::ReplySend { kind: req.kind });
        let mut w = self.writer.lock().await;
        let mark = w.mark();
        w.put(&SimpleReply::new(error, req.handle).encode());
        finish(&mut w, verdict, Step::ReplySend { kind: req.kind }, mark).await?;
        w.send_if_full().await.map_err(ConnError::Send)
    }

    /// An error reply: a structured error chunk for READ and BLOCK_STATUS
    /// when structured replies are on, a simple reply otherwise.
    pub(super) async fn error_reply(
        &mut self,
        req: &Request,
        error: u32,
        message: &str,
    ) -> Result<(), ConnError> {
        let structured =
            self.negotiated.structured && matches!(req.kind, cmd::READ | cmd::BLOCK_STATUS);
        if !structured {
            return self.simple_reply(req, error).await;
        }
        let verdict = self.probe.step(Step::ReplySend { kind: req.kind });
        let mut w = self.writer.lock().await;
        let mark = w.mark();
        w.put_with(|v| proto::put_error_chunk(v, req.handle, error, message));
        finish(&mut w, verdict, Step::ReplySend { kind: req.kind }, mark).await?;
        w.send_if_full().await.map_err(ConnError::Send)
    }
}
