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

use super::negotiate::{negotiate, NegotiateError, Negotiated, Offer};
use super::writer::ReplyWriter;
use super::{oldstyle_flags, HandshakeMode, Shared};
use crate::fault_apply::{self, Ended, How, Incoming, SendError};
use crate::probe::{Action, Probe, Step};
use crate::proto::{self, chunk, cmd, cmd_flags, errno, Request, SimpleReply, REQUEST_LEN};
use crate::store::{offload, Image, BLOCK_SIZE, PIECE};
use crate::tls::Conn;
use crate::transport::Stream;
use crate::{debug, error, info, warn};

/// Size of the read buffer: large enough to take a pipelined burst of small
/// requests (and their payloads) in one system call.
const READ_BUFFER: usize = 256 * 1024;
/// Requests waiting for the disk at once, per connection. Past this the
/// connection stops reading until one finishes.
const MAX_DEFERRED: u32 = 64;
/// Reads waiting for the disk on their own at once, per connection (their
/// replies are held in memory: at most this many times `MAX_DEFERRED_READ`).
const MAX_DEFERRED_READS: usize = 16;
/// The largest read that may wait for the disk on its own; larger ones
/// stream in order.
const MAX_DEFERRED_READ: usize = PIECE;
/// Reads waiting for the disk on their own over a whole server (its
/// `Shared::deferred_reads`), so its connections together hold at most this
/// many times `MAX_DEFERRED_READ` of replies (64 MiB); past it a connection
/// waits for a slot.
pub(crate) const ALL_DEFERRED_READS: usize = 256;
/// Most descriptors in one block status reply (the spec asks for <= 2^20).
const MAX_DESCRIPTORS: usize = 1 << 16;
/// Writes held in a connection's batch at once, and their bytes. A batch is
/// stored in one trip to the I/O pool (see `Batch`), so these bound both the
/// memory a pipelining client can pin and how long its first write waits.
const BATCH_WRITES: usize = 64;
const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Payload buffers kept for reuse once a batch is stored, and the largest
/// kept: enough for a burst of small writes without pinning memory.
const SPARE_BUFFERS: usize = 64;
const SPARE_BUFFER_MAX: usize = 64 * 1024;

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
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared<P>>,
    stop: CancellationToken,
) -> Result<(), ConnError> {
    let image = shared.image.clone();
    // Plaintext until a newstyle client asks for STARTTLS.
    let mut stream = Conn::Plain(stream);
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
            match tokio::time::timeout(
                limit,
                negotiate(
                    &mut stream,
                    Offer::image(image.size()),
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
    /// Slots for reads waiting for the disk on their own (`defer_read`).
    reads: Arc<Semaphore>,
    /// The server's slots for such reads, over all its connections.
    all_reads: Arc<Semaphore>,
    /// Reused buffer for the pieces of large write payloads.
    payload: Vec<u8>,
    /// Small writes received but not yet stored (and so not yet answered).
    batch: Batch,
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
    async fn request_cycle(&mut self) -> Result<Next, ConnError> {
        let Some(request) = self.read_header().await? else {
            return Ok(Next::Stop);
        };
        let next = self.handle(request).await?;
        if self.reader.buffer().is_empty() {
            // Nothing more is waiting: store the burst's writes and send
            // what it produced.
            self.store_batch().await?;
            self.send_replies().await?;
        }
        Ok(next)
    }

    async fn send_replies(&mut self) -> Result<(), ConnError> {
        self.writer
            .lock()
            .await
            .send()
            .await
            .map_err(ConnError::Send)
    }

    /// Stores the batched writes in one trip to the I/O pool and answers
    /// each, in the order they arrived. Called before any other request is
    /// handled, so a read, flush or disconnect sees every earlier write.
    async fn store_batch(&mut self) -> Result<(), ConnError> {
        if self.batch.writes.is_empty() {
            return Ok(());
        }
        let mut writes = std::mem::take(&mut self.batch.writes);
        self.batch.bytes = 0;
        let image = self.image.clone();
        let (mut writes, results) = offload::run(&self.image, move || {
            let results: Vec<io::Result<()>> = writes
                .iter_mut()
                .map(|w| image.write_at(&w.data, w.req.offset))
                .collect();
            (writes, results)
        })
        .await
        .map_err(ConnError::Offload)?;
        for (w, result) in writes.iter().zip(results) {
            if w.answer {
                self.after_change(&w.req, result).await?;
            }
        }
        for w in writes.drain(..) {
            self.batch.recycle(w.data);
        }
        // The emptied vector keeps its capacity for the next burst.
        self.batch.writes = writes;
        Ok(())
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
            self.image.pace_sleep(wait).await;
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
                    let (source, bytes) = (self.peer.to_string(), self.bytes_received);
                    match offload::run(&self.image, move || {
                        destination.complete(&image, &source, bytes)
                    })
                    .await
                    .and_then(|r| r)
                    {
                        Ok(()) => {
                            info!(
                                "migration from {} complete: image durable, completion record written, marker removed",
                                self.peer
                            );
                            crate::fault_apply::milestone(&*self.probe, Step::DisconnectDone).await;
                        }
                        Err(e) => error!("cannot complete the migration from {}: {e}", self.peer),
                    }
                }
                return Ok(Next::Stop);
            }
            cmd::ENTRUST if self.destination.is_some() => self.entrust(&req).await?,
            cmd::FLUSH => self.defer_sync(&req).await,
            cmd::TRIM | cmd::WRITE_ZEROES
                if req.flags & cmd_flags::NO_HOLE == 0
                    && self.image.is_no_op_zero(req.offset, u64::from(req.length)) =>
            {
                // Already a hole: nothing to store, nothing for a mirror
                // to copy again.
                self.after_change(&req, Ok(())).await?;
            }
            cmd::TRIM | cmd::WRITE_ZEROES => {
                let image = self.image.clone();
                let (offset, length) = (req.offset, u64::from(req.length));
                let (kind, flags) = (req.kind, req.flags);
                let result = offload::run(&self.image, move || {
                    if kind == cmd::TRIM {
                        image.punch(offset, length, false)
                    } else if flags & cmd_flags::NO_HOLE != 0 {
                        image.write_zeroes(offset, length)
                    } else {
                        image.punch(offset, length, true)
                    }
                })
                .await
                .and_then(|r| r);
                self.after_change(&req, result).await?;
            }
            cmd::CACHE => {
                let image = self.image.clone();
                let (offset, length) = (req.offset, u64::from(req.length));
                // Readahead can block on the disk too.
                let result = offload::run(&self.image, move || image.prefetch(offset, length))
                    .await
                    .and_then(|r| r);
                let error = match result {
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
        offload::run(&self.image, move || destination.begin_receiving(&source))
            .await
            .and_then(|r| r)
            .map_err(|e| ConnError::Marker(e.to_string()))?;
        self.receiving_marked = true;
        Ok(())
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
        let result = offload::run(&self.image, move || {
            destination.entrust(&image, &source, bytes)
        })
        .await
        .and_then(|r| r);
        let error = match result {
            Ok(()) => {
                info!(
                    "entrusted by {}: image durable, marker says entrusted",
                    self.peer
                );
                0
            }
            Err(e) => {
                error!("entrust from {} failed: {e}", self.peer);
                errno::from_io(&e)
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

    /// Takes a write's payload and stores it: a small one joins the batch,
    /// a large one is stored piece by piece.
    async fn write(&mut self, req: &Request) -> Result<(), ConnError> {
        if Batch::takes(req) {
            return self.batch_write(req).await;
        }
        let mut pos = req.offset;
        let end = req.end();
        let mut failure: Option<io::Error> = None;
        while pos < end {
            // Pieces end on 4 KiB boundaries of the file, so zero detection
            // sees whole blocks.
            let n = ((end - pos) as usize).min(PIECE - (pos % BLOCK_SIZE) as usize);
            if self.payload.len() < n {
                self.payload.resize(n, 0);
            }
            let buffered = self.reader.buffer();
            if buffered.len() >= n {
                // The common small write: already buffered. It is copied
                // because the store runs on another thread and the read
                // buffer cannot travel there.
                if failure.is_none() {
                    self.payload[..n].copy_from_slice(&buffered[..n]);
                }
                self.reader.consume(n);
            } else {
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
            }
            if failure.is_none() {
                if let Err(e) = self.store_piece(n, pos).await {
                    failure = Some(e);
                }
            }
            pos += n as u64;
        }
        if !self
            .received(Step::PayloadReceived { kind: req.kind })
            .await?
        {
            return Ok(()); // dropped: stored, but never answered
        }
        self.after_change(req, failure.map_or(Ok(()), Err)).await
    }

    /// Takes a small write's payload into the batch; it is stored, and then
    /// answered, when the batch is (`store_batch`).
    async fn batch_write(&mut self, req: &Request) -> Result<(), ConnError> {
        let n = req.length as usize;
        let mut data = self.batch.buffer(n);
        let buffered = self.reader.buffer();
        if buffered.len() >= n {
            data.copy_from_slice(&buffered[..n]);
            self.reader.consume(n);
        } else {
            let got = read_full(&mut self.reader, &mut data)
                .await
                .map_err(ConnError::Receive)?;
            if got < n {
                return Err(ConnError::Vanished {
                    what: "in the middle of a write payload",
                    expected: u64::from(req.length),
                    got: got as u64,
                });
            }
        }
        // Dropped: stored, but never answered.
        let answer = self
            .received(Step::PayloadReceived { kind: req.kind })
            .await?;
        self.batch.bytes += n;
        self.batch.writes.push(BatchedWrite {
            req: *req,
            data,
            answer,
        });
        if self.batch.writes.len() >= BATCH_WRITES || self.batch.bytes >= BATCH_BYTES {
            self.store_batch().await?;
        }
        Ok(())
    }

    /// Stores the first `n` bytes of the payload buffer at `pos`, on the I/O
    /// pool (the buffer goes there and comes back).
    async fn store_piece(&mut self, n: usize, pos: u64) -> io::Result<()> {
        let payload = std::mem::take(&mut self.payload);
        let image = self.image.clone();
        let (payload, result) = offload::run(&self.image, move || {
            let result = match payload.get(..n) {
                Some(data) => image.write_at(data, pos),
                None => Err(io::Error::other("write piece larger than its buffer")),
            };
            (payload, result)
        })
        .await?;
        self.payload = payload;
        result
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
        let permit = slot(&self.deferred).await;
        let image = self.image.clone();
        let writer = self.writer.clone();
        let probe = self.probe.clone();
        let req = *req;
        let sync = offload::run(&self.image, move || image.sync());
        tokio::spawn(async move {
            let error = match sync.await {
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
        // A small read the page cache cannot serve waits for the disk on
        // its own (`defer_read`), so the requests behind it go on. Not
        // under a fault verdict (it acts on the reply in order) or a
        // killswitch (which times each request cycle).
        let may_defer =
            stream && self.killswitch.is_none() && req.length as usize <= MAX_DEFERRED_READ;
        let mode = Mode {
            stream,
            defer_unless_sent: may_defer.then_some(sends),
        };
        let result = if self.negotiated.structured {
            read_structured(&mut w, &image, req, mode).await
        } else {
            read_simple(&mut w, &image, req, mode).await
        };
        match result {
            Ok(()) => {}
            Err(ReadError::WouldWait) => {
                w.rollback(mark);
                drop(w);
                self.defer_read(req).await;
                return Ok(());
            }
            Err(ReadError::Send(e)) => return Err(ConnError::Send(e)),
            Err(ReadError::Lost(e)) => return Err(ConnError::Offload(e)),
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

    /// Runs a read that must wait for the disk in a task of its own: its
    /// reply is built apart and joins the connection's output when the data
    /// is in, so requests behind it (other reads, writes) do not queue
    /// behind the disk. At most `MAX_DEFERRED_READS` per connection at once
    /// (past that the connection waits, reading nothing more); replies may
    /// come out of order, as NBD allows: a client that needs an order waits
    /// for the reply first.
    async fn defer_read(&mut self, req: &Request) {
        let read_slot = slot(&self.reads).await;
        let process_slot = self
            .all_reads
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        // Also held by the connection's end, which waits for it.
        let permit = slot(&self.deferred).await;
        let image = self.image.clone();
        let writer = self.writer.clone();
        let structured = self.negotiated.structured;
        let req = *req;
        tokio::spawn(async move {
            let reply = build_read_reply(&image, &req, structured).await;
            let mut w = writer.lock().await;
            w.put(&reply);
            // The reader may be idle waiting for the client, so send now.
            let _ = w.send().await;
            drop((read_slot, process_slot, permit));
        });
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

/// Small writes taken in but not yet stored. Storing each on its own would
/// cost two thread hand-offs per write (to the I/O pool and back), which
/// dominates a 4 KiB write to the page cache; a pipelining client's burst is
/// instead stored in one hand-off, and answered after it. Nothing is answered
/// before it is stored, and any other request first waits for the batch.
#[derive(Default)]
struct Batch {
    writes: Vec<BatchedWrite>,
    /// Payload bytes in `writes`.
    bytes: usize,
    spare: Vec<Vec<u8>>,
}

struct BatchedWrite {
    req: Request,
    data: Vec<u8>,
    /// False when a fault dropped the write: stored, never answered.
    answer: bool,
}

impl Batch {
    /// Whether a request joins the batch: a write of at most one piece.
    fn takes(req: &Request) -> bool {
        req.kind == cmd::WRITE && req.length as usize <= PIECE
    }

    /// A buffer of exactly `n` bytes, reused when one is spare.
    fn buffer(&mut self, n: usize) -> Vec<u8> {
        let mut data = self.spare.pop().unwrap_or_default();
        data.resize(n, 0);
        data
    }

    fn recycle(&mut self, data: Vec<u8>) {
        if data.capacity() <= SPARE_BUFFER_MAX && self.spare.len() < SPARE_BUFFERS {
            self.spare.push(data);
        }
    }
}

/// Waits for a slot of one of the connection's own semaphores (never closed).
async fn slot(semaphore: &Arc<Semaphore>) -> tokio::sync::OwnedSemaphorePermit {
    semaphore
        .clone()
        .acquire_owned()
        .await
        .expect("a connection's semaphores are never closed")
}

/// The whole reply to a read, built apart from the connection's output: the
/// data, or the error the client gets instead.
async fn build_read_reply(image: &Arc<Image>, req: &Request, structured: bool) -> Vec<u8> {
    let mut w = ReplyWriter::new(tokio::io::sink());
    let mode = Mode {
        stream: false,
        defer_unless_sent: None,
    };
    let result = if structured {
        read_structured(&mut w, image, req, mode).await
    } else {
        read_simple(&mut w, image, req, mode).await
    };
    let error = match result {
        Ok(()) => None,
        // Cannot happen without streaming or deferring; answered as a
        // failed read rather than trusted.
        Err(ReadError::WouldWait) => Some(io::Error::other("read was deferred twice")),
        Err(ReadError::Send(e)) | Err(ReadError::Lost(e)) => Some(e),
        Err(ReadError::Image { error, .. }) => Some(error),
        Err(ReadError::Padded(error)) => {
            error!(
                "read of {} bytes at {} failed: {error}",
                req.length, req.offset
            );
            // The padded chunk is not DONE: the error chunk ends the reply.
            w.put_with(|v| {
                proto::put_error_chunk(v, req.handle, errno::from_io(&error), "read failed")
            });
            return w.pending().to_vec();
        }
    };
    let Some(error) = error else {
        return w.pending().to_vec();
    };
    error!(
        "read of {} bytes at {} failed: {error}",
        req.length, req.offset
    );
    let mut reply = Vec::new();
    if structured {
        proto::put_error_chunk(
            &mut reply,
            req.handle,
            errno::from_io(&error),
            "read failed",
        );
    } else {
        reply.extend_from_slice(&SimpleReply::new(errno::from_io(&error), req.handle).encode());
    }
    reply
}

/// How a read reply is built.
#[derive(Clone, Copy)]
struct Mode {
    /// Sent while it is being read (production), rather than built whole
    /// before a fault verdict acts on it.
    stream: bool,
    /// Give up with `ReadError::WouldWait` at the first piece the page cache
    /// does not hold, as long as the writer has sent nothing since it had
    /// sent this many times (nothing of the reply has left): the read is
    /// then run as a deferred read instead.
    defer_unless_sent: Option<u64>,
}

enum ReadError {
    /// The data is not in memory and the read may be deferred (`Mode`).
    WouldWait,
    Send(io::Error),
    /// The I/O pool lost the reply buffer (see `read_piece`).
    Lost(io::Error),
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

/// Reads `n` bytes at `pos` into the room after the writer's pending output:
/// here when the page cache holds them (a copy that cannot wait for the
/// disk, and spares the hand-off to another thread), otherwise on the I/O
/// pool, where the writer's buffer goes and comes back, so the data still
/// lands where it is sent from. The outer error ends the
/// connection (the buffer, and the output pending in it, was lost); the
/// inner one is the image's.
async fn read_piece<W: AsyncWrite + Unpin>(
    w: &mut ReplyWriter<W>,
    image: &Arc<Image>,
    pos: u64,
    n: usize,
    mode: Mode,
) -> Result<io::Result<()>, ReadError> {
    if image.read_cached(w.space(n), pos) {
        return Ok(Ok(()));
    }
    if mode.defer_unless_sent == Some(w.sends()) {
        return Err(ReadError::WouldWait);
    }
    let start = w.mark();
    let mut buf = w.lend(n);
    let slots = image.offload().clone();
    let image = image.clone();
    let done = slots
        .run(move || {
            let result = match buf.get_mut(start..start + n) {
                Some(space) => image.read_at(space, pos),
                None => Err(io::Error::other("reply buffer smaller than lent")),
            };
            (buf, result)
        })
        .await;
    match done {
        Ok((buf, result)) => {
            w.give_back(Some(buf));
            Ok(result)
        }
        Err(e) => {
            w.give_back(None);
            Err(ReadError::Lost(e))
        }
    }
}

/// Copies `length` bytes at `offset` into the writer in pieces.
async fn put_data<W: AsyncWrite + Unpin>(
    w: &mut ReplyWriter<W>,
    image: &Arc<Image>,
    offset: u64,
    length: u64,
    mode: Mode,
    chunk_mark: usize,
    pad: bool,
) -> Result<(), ReadError> {
    let mut pos = offset;
    let end = offset + length;
    let mut padded: Option<io::Error> = None;
    while pos < end {
        let n = ((end - pos) as usize).min(PIECE);
        if mode.stream && pos > offset {
            // Later pieces of a long chunk: the chunk has begun streaming.
            w.make_room(n).await.map_err(ReadError::Send)?;
        }
        if padded.is_some() {
            w.space(n).fill(0);
        } else if let Err(error) = read_piece(w, image, pos, n, mode).await? {
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
        if mode.stream {
            w.send_if_full().await.map_err(ReadError::Send)?;
        }
    }
    padded.map_or(Ok(()), |e| Err(ReadError::Padded(e)))
}

async fn read_simple<W: AsyncWrite + Unpin>(
    w: &mut ReplyWriter<W>,
    image: &Arc<Image>,
    req: &Request,
    mode: Mode,
) -> Result<(), ReadError> {
    let mark = w.mark();
    w.put(&SimpleReply::new(0, req.handle).encode());
    put_data(
        w,
        image,
        req.offset,
        u64::from(req.length),
        mode,
        mark,
        false,
    )
    .await
}

async fn read_structured<W: AsyncWrite + Unpin>(
    w: &mut ReplyWriter<W>,
    image: &Arc<Image>,
    req: &Request,
    mode: Mode,
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
        put_data(w, image, req.offset, u64::from(req.length), mode, mark, big).await?;
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
                    if mode.stream {
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
                    put_data(w, image, pos, n, mode, mark, false).await?;
                    pos += n;
                }
            }
            pos = run_end;
            if mode.stream {
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
