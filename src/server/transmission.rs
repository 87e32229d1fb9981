//! The transmission phase of one client connection.
//!
//! One task reads requests and executes them in arrival order; replies are
//! batched into a shared writer and sent when no further request is already
//! waiting (so a pipelined burst costs one send). Requests that must wait for
//! the disk (FLUSH, and writes with FUA) finish on their own tasks and may be
//! answered out of order. Every payload is handled in pieces of at most
//! [`PIECE`] bytes, so memory stays bounded whatever length a client sends.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use super::negotiate::{negotiate, NegotiateError, Negotiated};
use super::writer::ReplyWriter;
use super::{oldstyle_flags, HandshakeMode, Shared};
use crate::fault_apply::{self, Ended, How, Incoming, SendError};
use crate::probe::{Action, Probe, Step};
use crate::proto::{self, chunk, cmd, cmd_flags, errno, Request, SimpleReply, REQUEST_LEN};
use crate::store::{Image, BLOCK_SIZE, PIECE};
use crate::transport::Stream;
use crate::{debug, error, info, warn};

/// Size of the read buffer: large enough to take a pipelined burst of small
/// requests (and their payloads) in one system call.
const READ_BUFFER: usize = 256 * 1024;
/// Requests waiting for the disk at once, per connection. Past this the
/// connection stops reading until one finishes.
const MAX_DEFERRED: u32 = 64;
/// Most descriptors in one block status reply (the spec asks for <= 2^20).
const MAX_DESCRIPTORS: usize = 1 << 16;

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
}

impl From<Ended> for ConnError {
    fn from(e: Ended) -> ConnError {
        match e.how {
            How::Hung => ConnError::Hang(e.key),
            _ => ConnError::FaultClosed(e.to_string()),
        }
    }
}

type Writer<W> = Arc<Mutex<ReplyWriter<W>>>;

/// Runs one client from greeting to close.
pub async fn serve_client<S: Stream, P: Probe>(
    mut stream: S,
    peer: SocketAddr,
    shared: Arc<Shared<P>>,
    stop: CancellationToken,
) -> Result<(), ConnError> {
    let image = shared.image.clone();
    let negotiated = match shared.config.handshake {
        HandshakeMode::Oldstyle => {
            let flags = oldstyle_flags(shared.config.oldstyle_extra_flags);
            let greeting = proto::oldstyle_greeting(image.size(), u32::from(flags));
            // Hung: reading and discarding needs the stream, so it is done
            // here rather than by `send`.
            let sent = fault_apply::send(
                shared.probe.step(Step::GreetingSend),
                || Step::GreetingSend.key(),
                &mut stream,
                &greeting,
                std::future::ready(()),
            )
            .await;
            match sent {
                Ok(_sent_or_dropped) => {}
                Err(SendError::Io(e)) => return Err(ConnError::Send(e)),
                Err(SendError::Fault(ended)) => {
                    if ended.how == How::Hung {
                        hang_until_closed(&mut stream, &stop).await;
                    }
                    return Err(ended.into());
                }
            }
            Negotiated::default()
        }
        HandshakeMode::Newstyle => {
            let limit = shared.config.handshake_timeout;
            match tokio::time::timeout(limit, negotiate(&mut stream, &image, &*shared.probe)).await
            {
                Ok(result) => result?,
                Err(_) => return Err(ConnError::HandshakeTimeout(limit.as_secs_f64())),
            }
        }
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
        payload: Vec::new(),
        peer,
        stop,
        killswitch: shared.config.killswitch,
        destination: shared.destination.clone(),
        receiving_marked: false,
        bytes_received: 0,
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
    // Let requests still waiting for the disk send their replies first.
    let _all = conn.deferred.acquire_many(MAX_DEFERRED).await;
    let mut w = conn.writer.lock().await;
    let _ = w.shutdown().await;
    result
}

struct Connection<R, W, P> {
    reader: BufReader<R>,
    writer: Writer<W>,
    image: Arc<Image>,
    negotiated: Negotiated,
    probe: Arc<P>,
    deferred: Arc<Semaphore>,
    /// Reused buffer for write payloads that are not already buffered.
    payload: Vec<u8>,
    peer: SocketAddr,
    /// Cancelled to end the connection between requests (ACL change,
    /// shutdown, migration cut-off); a request in progress finishes first.
    stop: CancellationToken,
    /// A request cycle (from its first byte to its reply) longer than this
    /// drops the client.
    killswitch: Option<Duration>,
    /// In `listen`: the migration destination's marker and hand-off.
    destination: Option<Arc<crate::handoff::Destination>>,
    /// Whether this connection has marked the destination `receiving` yet.
    receiving_marked: bool,
    /// Payload bytes this connection wrote (recorded in the marker).
    bytes_received: u64,
}

/// What to do after a request was handled.
enum Next {
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
                info!("client {} stopped between requests", self.peer);
                return Ok(());
            }
            if self.reader.buffer().is_empty() {
                // Wait for the next request to start arriving, or a stop.
                tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => continue,
                    available = self.reader.fill_buf() => {
                        if available.map_err(ConnError::Receive)?.is_empty() {
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
    async fn request_cycle(&mut self) -> Result<Next, ConnError> {
        let Some(request) = self.read_header().await? else {
            return Ok(Next::Stop);
        };
        let next = self.handle(request).await?;
        if self.reader.buffer().is_empty() {
            // Nothing more is waiting: send what the burst produced.
            self.writer
                .lock()
                .await
                .send()
                .await
                .map_err(ConnError::Send)?;
        }
        Ok(next)
    }

    /// Reads a 28-byte header; `None` on a clean end of stream between requests.
    async fn read_header(&mut self) -> Result<Option<Request>, ConnError> {
        let available = self.reader.fill_buf().await.map_err(ConnError::Receive)?;
        if available.is_empty() {
            return Ok(None);
        }
        let mut header = [0u8; REQUEST_LEN];
        if available.len() >= REQUEST_LEN {
            header.copy_from_slice(&available[..REQUEST_LEN]);
            self.reader.consume(REQUEST_LEN);
        } else {
            let mut got = 0;
            while got < REQUEST_LEN {
                let n = self
                    .reader
                    .read(&mut header[got..])
                    .await
                    .map_err(ConnError::Receive)?;
                if n == 0 {
                    return Err(ConnError::Vanished {
                        what: "in the middle of a request header",
                        expected: REQUEST_LEN as u64,
                        got: got as u64,
                    });
                }
                got += n;
            }
        }
        Ok(Some(Request::decode(&header)))
    }

    /// The probe's verdict on a message just received: `true` to act on
    /// it, `false` to ignore it (dropped), or the error that ends the
    /// connection.
    async fn received(&self, step: Step) -> Result<bool, ConnError> {
        // Hung: `serve_client` holds the connection until the peer leaves.
        let verdict =
            fault_apply::incoming(self.probe.step(step), || step.key(), std::future::ready(()))
                .await?;
        Ok(verdict == Incoming::Proceed)
    }

    async fn handle(&mut self, req: Request) -> Result<Next, ConnError> {
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
            let mut w = self.writer.lock().await;
            w.put(&SimpleReply::new(errno::EBADMSG, req.handle).encode());
            w.send().await.map_err(ConnError::Send)?;
            return Err(ConnError::BadMagic(req.magic));
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
        if matches!(req.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES) {
            self.mark_receiving().await?;
            // While a migration converges towards a slower destination,
            // clients' changes are paced to what it can absorb
            // (mirror::policy); otherwise this is zero.
            let wait = self.image.pace_write(req.offset, u64::from(req.length));
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        match req.kind {
            cmd::READ => self.read(&req).await?,
            cmd::WRITE => {
                self.write(&req).await?;
                self.bytes_received += u64::from(req.length);
            }
            cmd::DISC => {
                debug!("client {} sent DISCONNECT", self.peer);
                if let Some(destination) = self.destination.clone() {
                    let image = self.image.clone();
                    match tokio::task::spawn_blocking(move || destination.complete(&image)).await {
                        Ok(Ok(())) => {
                            info!(
                                "migration from {} complete: image durable, marker removed",
                                self.peer
                            );
                            crate::probe::milestone(&*self.probe, Step::DisconnectDone).await;
                        }
                        Ok(Err(e)) => {
                            error!("cannot complete the migration from {}: {e}", self.peer)
                        }
                        Err(e) => error!("cannot complete the migration from {}: {e}", self.peer),
                    }
                }
                return Ok(Next::Stop);
            }
            cmd::ENTRUST if self.destination.is_some() => self.entrust(&req).await?,
            cmd::FLUSH => self.defer_sync(&req).await,
            cmd::TRIM => {
                let result = self.image.punch(req.offset, u64::from(req.length), false);
                self.after_change(&req, result).await?;
            }
            cmd::WRITE_ZEROES => {
                let result = if req.flags & cmd_flags::NO_HOLE != 0 {
                    self.image.write_zeroes(req.offset, u64::from(req.length))
                } else {
                    self.image.punch(req.offset, u64::from(req.length), true)
                };
                self.after_change(&req, result).await?;
            }
            cmd::CACHE => {
                let error = match self.image.prefetch(req.offset, u64::from(req.length)) {
                    Ok(()) => 0,
                    Err(e) => errno::from_io(&e),
                };
                self.simple_reply(&req, error).await?;
            }
            cmd::BLOCK_STATUS => self.block_status(&req).await?,
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

    /// In `listen`, before this connection's first change is applied: the
    /// marker says `receiving`, durably.
    async fn mark_receiving(&mut self) -> Result<(), ConnError> {
        let Some(destination) = self.destination.clone() else {
            return Ok(());
        };
        if self.receiving_marked {
            return Ok(());
        }
        let source = self.peer.to_string();
        let result =
            tokio::task::spawn_blocking(move || destination.begin_receiving(&source)).await;
        match result {
            Ok(Ok(())) => {
                self.receiving_marked = true;
                Ok(())
            }
            Ok(Err(e)) => Err(ConnError::Marker(e.to_string())),
            Err(e) => Err(ConnError::Marker(e.to_string())),
        }
    }

    /// ENTRUST: answered only once the image is durable and the marker
    /// says `entrusted`.
    async fn entrust(&mut self, req: &Request) -> Result<(), ConnError> {
        let Some(destination) = self.destination.clone() else {
            return Ok(());
        };
        let image = self.image.clone();
        let source = self.peer.to_string();
        let bytes = self.bytes_received;
        let result =
            tokio::task::spawn_blocking(move || destination.entrust(&image, &source, bytes)).await;
        let error = match result {
            Ok(Ok(())) => {
                info!(
                    "entrusted by {}: image durable, marker says entrusted",
                    self.peer
                );
                0
            }
            Ok(Err(e)) => {
                error!("entrust from {} failed: {e}", self.peer);
                errno::from_io(&e)
            }
            Err(e) => {
                error!("entrust from {} failed: {e}", self.peer);
                errno::EIO
            }
        };
        self.simple_reply(req, error).await
    }

    /// Reads and discards `length` payload bytes (a refused write's data).
    async fn drain(&mut self, length: u64) -> Result<(), ConnError> {
        let copied = tokio::io::copy(&mut (&mut self.reader).take(length), &mut tokio::io::sink())
            .await
            .map_err(ConnError::Receive)?;
        if copied < length {
            return Err(ConnError::Vanished {
                what: "in the middle of a write payload",
                expected: length,
                got: copied,
            });
        }
        Ok(())
    }

    /// Takes a write's payload piece by piece and stores it.
    async fn write(&mut self, req: &Request) -> Result<(), ConnError> {
        let mut pos = req.offset;
        let end = req.end();
        let mut failure: Option<io::Error> = None;
        while pos < end {
            // Pieces end on 4 KiB boundaries of the file, so zero detection
            // sees whole blocks.
            let n = ((end - pos) as usize).min(PIECE - (pos % BLOCK_SIZE) as usize);
            let buffered = self.reader.buffer();
            let result = if buffered.len() >= n {
                // The common small write: store straight from the read buffer.
                let r = if failure.is_none() {
                    self.image.write_at(&buffered[..n], pos)
                } else {
                    Ok(())
                };
                self.reader.consume(n);
                r
            } else {
                if self.payload.len() < n {
                    self.payload.resize(n, 0);
                }
                let got = read_full(&mut self.reader, &mut self.payload[..n])
                    .await
                    .map_err(ConnError::Receive)?;
                if got < n {
                    return Err(ConnError::Vanished {
                        what: "in the middle of a write payload",
                        expected: u64::from(req.length),
                        got: pos - req.offset + got as u64,
                    });
                }
                if failure.is_none() {
                    self.image.write_at(&self.payload[..n], pos)
                } else {
                    Ok(())
                }
            };
            if let Err(e) = result {
                failure.get_or_insert(e);
            }
            pos += n as u64;
        }
        if self.payload.len() > 4 * PIECE {
            self.payload = Vec::new();
        }
        if !self
            .received(Step::PayloadReceived { kind: req.kind })
            .await?
        {
            return Ok(()); // dropped: stored, but never answered
        }
        self.after_change(req, failure.map_or(Ok(()), Err)).await
    }

    /// Answers a data-changing request: at once, or after a sync for FUA.
    async fn after_change(
        &mut self,
        req: &Request,
        result: io::Result<()>,
    ) -> Result<(), ConnError> {
        match result {
            Err(e) => {
                error!(
                    "{} of {} bytes at {} failed: {e}",
                    cmd::name(req.kind),
                    req.length,
                    req.offset
                );
                self.simple_reply(req, errno::from_io(&e)).await
            }
            Ok(()) if req.flags & cmd_flags::FUA != 0 => {
                self.defer_sync(req).await;
                Ok(())
            }
            Ok(()) => self.simple_reply(req, 0).await,
        }
    }

    /// Syncs the image on a worker thread and replies when it is durable,
    /// without holding up the requests behind this one.
    async fn defer_sync(&mut self, req: &Request) {
        let permit = self
            .deferred
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let image = self.image.clone();
        let writer = self.writer.clone();
        let probe = self.probe.clone();
        let req = *req;
        tokio::spawn(async move {
            let error = match tokio::task::spawn_blocking(move || image.sync()).await {
                Ok(Ok(())) => 0,
                Ok(Err(e)) => {
                    error!("sync for {} failed: {e}", cmd::name(req.kind));
                    errno::from_io(&e)
                }
                Err(e) => {
                    error!("sync for {} did not finish: {e}", cmd::name(req.kind));
                    errno::EIO
                }
            };
            let mut w = writer.lock().await;
            let verdict = probe.step(Step::ReplySend { kind: req.kind });
            let mark = w.mark();
            w.put(&SimpleReply::new(error, req.handle).encode());
            // The reader may be idle waiting for the client, so send now.
            if finish(&mut w, verdict, Step::ReplySend { kind: req.kind }, mark)
                .await
                .is_ok()
            {
                let _ = w.send().await;
            }
            drop(permit);
        });
    }

    async fn simple_reply(&mut self, req: &Request, error: u32) -> Result<(), ConnError> {
        let verdict = self.probe.step(Step::ReplySend { kind: req.kind });
        let mut w = self.writer.lock().await;
        let mark = w.mark();
        w.put(&SimpleReply::new(error, req.handle).encode());
        finish(&mut w, verdict, Step::ReplySend { kind: req.kind }, mark).await?;
        w.send_if_full().await.map_err(ConnError::Send)
    }

    /// An error reply: a structured error chunk for READ and BLOCK_STATUS
    /// when structured replies are on, a simple reply otherwise.
    async fn error_reply(
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

    async fn read(&mut self, req: &Request) -> Result<(), ConnError> {
        let verdict = self.probe.step(Step::ReplySend { kind: req.kind });
        let image = self.image.clone();
        let writer = self.writer.clone();
        let mut w = writer.lock().await;
        // Under a fault verdict the whole reply is built before it is acted
        // on; in production it streams.
        let stream = verdict.is_pass();
        if stream {
            // Room for the first header and piece, so the buffer stays near
            // `SEND_AT` and this reply can still be taken back on an error.
            let first = proto::STRUCTURED_HEADER_LEN + 8 + (req.length as usize).min(PIECE);
            w.make_room(first).await.map_err(ConnError::Send)?;
        }
        let mark = w.mark();
        let sends = w.sends();
        let result = if self.negotiated.structured {
            read_structured(&mut w, &image, req, stream).await
        } else {
            read_simple(&mut w, &image, req, stream).await
        };
        match result {
            Ok(()) => {}
            Err(ReadError::Send(e)) => return Err(ConnError::Send(e)),
            Err(ReadError::Padded(error)) => {
                error!(
                    "read of {} bytes at {} failed: {error}",
                    req.length, req.offset
                );
                w.put_with(|v| {
                    proto::put_error_chunk(v, req.handle, errno::from_io(&error), "read failed")
                });
            }
            Err(ReadError::Image { error, chunk_mark }) => {
                error!(
                    "read of {} bytes at {} failed: {error}",
                    req.length, req.offset
                );
                if w.sends() == sends {
                    // Nothing of this reply has left: replace it with an error.
                    w.rollback(mark);
                    drop(w);
                    return self
                        .error_reply(req, errno::from_io(&error), "read failed")
                        .await;
                }
                if !self.negotiated.structured {
                    return Err(ConnError::ReadAfterSend(error));
                }
                w.rollback(chunk_mark);
                w.put_with(|v| {
                    proto::put_error_chunk(v, req.handle, errno::from_io(&error), "read failed")
                });
            }
        }
        finish(&mut w, verdict, Step::ReplySend { kind: req.kind }, mark).await?;
        w.send_if_full().await.map_err(ConnError::Send)
    }

    async fn block_status(&mut self, req: &Request) -> Result<(), ConnError> {
        if !self.negotiated.base_allocation {
            warn!(
                "client {}: BLOCK_STATUS without a selected metadata context; answering EINVAL",
                self.peer
            );
            return self
                .error_reply(req, errno::EINVAL, "no metadata context was selected")
                .await;
        }
        if req.length == 0 {
            return self
                .error_reply(req, errno::EINVAL, "block status of 0 bytes")
                .await;
        }
        let one = req.flags & cmd_flags::REQ_ONE != 0;
        let extents = self.image.extents(
            req.offset,
            u64::from(req.length),
            if one { 1 } else { MAX_DESCRIPTORS },
        );
        let verdict = self.probe.step(Step::ReplySend { kind: req.kind });
        let mut w = self.writer.lock().await;
        let mark = w.mark();
        w.put_with(|v| {
            let length = 4 + 8 * extents.len() as u32;
            proto::put_chunk_header(v, true, chunk::BLOCK_STATUS, req.handle, length);
            v.extend_from_slice(&proto::BASE_ALLOCATION_ID.to_be_bytes());
            for (len, hole) in &extents {
                v.extend_from_slice(&(*len as u32).to_be_bytes());
                let state = if *hole {
                    proto::STATE_HOLE | proto::STATE_ZERO
                } else {
                    0
                };
                v.extend_from_slice(&state.to_be_bytes());
            }
        });
        finish(&mut w, verdict, Step::ReplySend { kind: req.kind }, mark).await?;
        w.send_if_full().await.map_err(ConnError::Send)
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Applies a probe's verdict to the reply that starts at `mark`. A hung
/// reply is taken back and `serve_client` holds the connection.
async fn finish<W: AsyncWrite + Unpin>(
    w: &mut ReplyWriter<W>,
    verdict: Action,
    step: Step,
    mark: usize,
) -> Result<(), ConnError> {
    match fault_apply::reply(verdict, || step.key(), w, mark, std::future::ready(())).await {
        Ok(()) => Ok(()),
        Err(SendError::Io(e)) => Err(ConnError::Send(e)),
        Err(SendError::Fault(ended)) => Err(ended.into()),
    }
}

/// Reads and discards until the peer closes (or the connection is stopped):
/// what a hung server looks like from outside, without holding its slot
/// forever once the peer has given up.
async fn hang_until_closed<R: AsyncRead + Unpin>(reader: &mut R, stop: &CancellationToken) {
    let mut sink = [0u8; 4096];
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            n = reader.read(&mut sink) => match n {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}

enum ReadError {
    Send(io::Error),
    /// Reading the image failed; `chunk_mark` is where the failed chunk began.
    Image {
        error: io::Error,
        chunk_mark: usize,
    },
    /// Reading the image failed inside a data chunk that may already be
    /// partly sent; the chunk was completed with zeros and is not DONE, so an
    /// error chunk must follow.
    Padded(io::Error),
}

/// Copies `length` bytes at `offset` into the writer in pieces.
async fn put_data<W: AsyncWrite + Unpin>(
    w: &mut ReplyWriter<W>,
    image: &Image,
    offset: u64,
    length: u64,
    stream: bool,
    chunk_mark: usize,
    pad: bool,
) -> Result<(), ReadError> {
    let mut pos = offset;
    let end = offset + length;
    let mut padded: Option<io::Error> = None;
    while pos < end {
        let n = ((end - pos) as usize).min(PIECE);
        if stream && pos > offset {
            // Later pieces of a long chunk: the chunk has begun streaming.
            w.make_room(n).await.map_err(ReadError::Send)?;
        }
        let space = w.space(n);
        if padded.is_some() {
            space.fill(0);
        } else if let Err(error) = image.read_at(space, pos) {
            if !pad {
                return Err(ReadError::Image { error, chunk_mark });
            }
            // The chunk header promised these bytes and part of the chunk
            // may be gone already: keep the framing with zeros.
            w.space(n).fill(0);
            padded = Some(error);
        }
        w.commit(n);
        pos += n as u64;
        if stream {
            w.send_if_full().await.map_err(ReadError::Send)?;
        }
    }
    padded.map_or(Ok(()), |e| Err(ReadError::Padded(e)))
}

async fn read_simple<W: AsyncWrite + Unpin>(
    w: &mut ReplyWriter<W>,
    image: &Image,
    req: &Request,
    stream: bool,
) -> Result<(), ReadError> {
    let mark = w.mark();
    w.put(&SimpleReply::new(0, req.handle).encode());
    put_data(
        w,
        image,
        req.offset,
        u64::from(req.length),
        stream,
        mark,
        false,
    )
    .await
}

async fn read_structured<W: AsyncWrite + Unpin>(
    w: &mut ReplyWriter<W>,
    image: &Image,
    req: &Request,
    stream: bool,
) -> Result<(), ReadError> {
    let end = req.end();
    if req.length == 0 {
        let mut v = Vec::new();
        proto::put_chunk_header(&mut v, true, chunk::NONE, req.handle, 0);
        w.put(&v);
        return Ok(());
    }
    if req.flags & cmd_flags::DF != 0 {
        // Do not fragment: one data chunk, holes included as zeros.
        let Some(chunk_len) = req.length.checked_add(8) else {
            let mut v = Vec::new();
            proto::put_error_chunk(
                &mut v,
                req.handle,
                errno::EOVERFLOW,
                "read too large for one chunk",
            );
            w.put(&v);
            return Ok(());
        };
        // A chunk larger than one piece is sent while it is still being
        // read, so it cannot carry DONE (an error may still follow): a NONE
        // chunk ends the reply instead.
        let big = req.length as usize > PIECE;
        let mark = w.mark();
        put_chunk(
            w,
            !big,
            chunk::OFFSET_DATA,
            req.handle,
            chunk_len,
            req.offset,
        );
        put_data(
            w,
            image,
            req.offset,
            u64::from(req.length),
            stream,
            mark,
            big,
        )
        .await?;
        if big {
            let mut v = Vec::new();
            proto::put_chunk_header(&mut v, true, chunk::NONE, req.handle, 0);
            w.put(&v);
        }
        return Ok(());
    }
    let mut pos = req.offset;
    while pos < end {
        for (len, hole) in image.extents(pos, end - pos, 64) {
            let run_end = pos + len;
            if hole {
                put_chunk(w, run_end == end, chunk::OFFSET_HOLE, req.handle, 12, pos);
                w.put(&(len as u32).to_be_bytes());
            } else {
                while pos < run_end {
                    let n = (run_end - pos).min(PIECE as u64);
                    if stream {
                        let room = proto::STRUCTURED_HEADER_LEN + 8 + n as usize;
                        w.make_room(room).await.map_err(ReadError::Send)?;
                    }
                    let mark = w.mark();
                    put_chunk(
                        w,
                        pos + n == end,
                        chunk::OFFSET_DATA,
                        req.handle,
                        8 + n as u32,
                        pos,
                    );
                    put_data(w, image, pos, n, stream, mark, false).await?;
                    pos += n;
                }
            }
            pos = run_end;
            if stream {
                w.send_if_full().await.map_err(ReadError::Send)?;
            }
        }
    }
    Ok(())
}

fn put_chunk<W: AsyncWrite + Unpin>(
    w: &mut ReplyWriter<W>,
    done: bool,
    kind: u16,
    handle: u64,
    length: u32,
    offset: u64,
) {
    let mut v = [0u8; proto::STRUCTURED_HEADER_LEN + 8];
    let flags = if done { chunk::FLAG_DONE } else { 0 };
    v[..proto::STRUCTURED_HEADER_LEN].copy_from_slice(
        &proto::ChunkHeader {
            flags,
            kind,
            handle,
            length,
        }
        .encode(),
    );
    v[proto::STRUCTURED_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    w.put(&v);
}
