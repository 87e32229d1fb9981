//! Carrying requests out on the image: writes too large for a batch,
//! zeroes and trims, reads (streamed, or built whole under a fault verdict),
//! prefetches and block status, and the replies that follow a change.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite};

use super::batch::Batch;
use super::framing::{finish, read_full};
use super::transmission::{ConnError, Connection};
use super::writer::ReplyWriter;
use crate::core::request;
use crate::probe::{Probe, Step};
use crate::proto::{self, chunk, cmd, cmd_flags, errno, Request, SimpleReply};
use crate::store::{Image, BLOCK_SIZE, PIECE};
use crate::{error, warn};

/// The largest read that may wait for the disk on its own; larger ones
/// stream in order.
pub(super) const MAX_DEFERRED_READ: usize = PIECE;
/// Carries out a WRITE_ZEROES or TRIM, on the I/O pool (in a batch, after
/// the changes before it). Over a known hole it has nothing to do: nothing
/// to store, nothing for a mirror to copy again.
pub(super) fn zero_or_trim_now(image: &Image, req: &Request) -> io::Result<()> {
    let (offset, length) = (req.offset, u64::from(req.length));
    if req.flags & cmd_flags::NO_HOLE == 0 && image.is_no_op_zero(offset, length) {
        return Ok(());
    }
    if req.kind == cmd::TRIM {
        image.punch(offset, length, false)
    } else if req.flags & cmd_flags::NO_HOLE != 0 {
        image.write_zeroes(offset, length)
    } else {
        image.punch(offset, length, true)
    }
}

/// Most descriptors in one block status reply (the spec asks for <= 2^20).
const MAX_DESCRIPTORS: usize = 1 << 16;

impl<R, W, P> Connection<R, W, P>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    P: Probe,
{
    /// Takes a write's payload and stores it: a small one joins the batch,
    /// a large one is stored piece by piece.
    pub(super) async fn write(&mut self, req: &Request) -> Result<(), ConnError> {
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
        if failure.is_some() {
            self.change_failed().await?;
        }
        if !self
            .received(Step::PayloadReceived { kind: req.kind })
            .await?
        {
            return Ok(()); // dropped: stored, but never answered
        }
        self.after_change(req, failure.map_or(Ok(()), Err)).await
    }

    /// Stores the first `n` bytes of the payload buffer at `pos`, on the I/O
    /// pool (the buffer goes there and comes back).
    pub(super) async fn store_piece(&mut self, n: usize, pos: u64) -> io::Result<()> {
        let payload = std::mem::take(&mut self.payload);
        let image = self.image.clone();
        let (payload, result) = self
            .image
            .offload()
            .run(move || {
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

    /// CACHE: readahead, on the I/O pool since it can block on the disk.
    pub(super) async fn cache(&mut self, req: &Request) -> Result<(), ConnError> {
        let image = self.image.clone();
        let (offset, length) = (req.offset, u64::from(req.length));
        let result = self
            .image
            .offload()
            .run(move || image.prefetch(offset, length))
            .await
            .and_then(|r| r);
        let error = match result {
            Ok(()) => 0,
            Err(e) => errno::from_io(&e),
        };
        self.simple_reply(req, error).await
    }

    /// Answers a data-changing request: at once, or after a sync when its
    /// plan (`core::request`) says so.
    pub(super) async fn after_change(
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
            // FUA: durable before the reply; the sync runs on its own
            // task so the requests behind this one go on.
            Ok(()) if request::plan(req.kind, req.flags).sync_before_reply() => {
                self.defer_sync(req).await;
                Ok(())
            }
            Ok(()) => self.simple_reply(req, 0).await,
        }
    }

    pub(super) async fn read(&mut self, req: &Request) -> Result<(), ConnError> {
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

    pub(super) async fn block_status(&mut self, req: &Request) -> Result<(), ConnError> {
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

/// The whole reply to a read, built apart from the connection's output: the
/// data, or the error the client gets instead.
pub(super) async fn build_read_reply(
    image: &Arc<Image>,
    req: &Request,
    structured: bool,
) -> Vec<u8> {
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
pub(super) struct Mode {
    /// Sent while it is being read (production), rather than built whole
    /// before a fault verdict acts on it.
    stream: bool,
    /// Give up with `ReadError::WouldWait` at the first piece the page cache
    /// does not hold, as long as the writer has sent nothing since it had
    /// sent this many times (nothing of the reply has left): the read is
    /// then run as a deferred read instead.
    defer_unless_sent: Option<u64>,
}

pub(super) enum ReadError {
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
pub(super) async fn read_piece<W: AsyncWrite + Unpin>(
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
pub(super) async fn put_data<W: AsyncWrite + Unpin>(
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

pub(super) async fn read_simple<W: AsyncWrite + Unpin>(
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

pub(super) async fn read_structured<W: AsyncWrite + Unpin>(
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

pub(super) fn put_chunk<W: AsyncWrite + Unpin>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::testkit::kit;

    #[tokio::test]
    async fn a_large_write_is_stored_in_pieces_and_answered() {
        let len = PIECE + 3 * 4096;
        let mut k = kit(2 * PIECE as u64, false);
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let req = Request::new(cmd::WRITE, 0, 3, 4096, len as u32);
        k.send(req, &payload).await;
        k.conn.request_cycle().await.unwrap();
        let reply = k.reply().await;
        assert_eq!((reply.error, reply.handle), (0, 3));
        assert_eq!(&k.contents()[4096..4096 + len], &payload[..]);
    }

    #[tokio::test]
    async fn zeroes_and_trims_clear_the_range() {
        let mut k = kit(64 * 1024, false);
        std::fs::write(&k.path, vec![5u8; 64 * 1024]).unwrap();
        for (kind, flags, handle, offset) in [
            (cmd::WRITE_ZEROES, 0, 1, 0),
            (cmd::WRITE_ZEROES, cmd_flags::NO_HOLE, 2, 8192),
            (cmd::TRIM, cmd_flags::FUA, 3, 16384),
        ] {
            k.send(Request::new(kind, flags, handle, offset, 8192), &[])
                .await;
            k.conn.request_cycle().await.unwrap();
            let reply = k.reply().await;
            assert_eq!((reply.error, reply.handle), (0, handle));
        }
        let data = k.contents();
        assert!(data[..16384].iter().all(|&b| b == 0), "zeroed");
        assert!(data[24576..].iter().all(|&b| b == 5), "untouched");
    }

    #[tokio::test]
    async fn a_simple_read_returns_the_data_and_a_structured_one_chunks() {
        let mut k = kit(64 * 1024, false);
        let mut data = vec![0u8; 64 * 1024];
        data[4096..8192].fill(0x42);
        std::fs::write(&k.path, &data).unwrap();
        k.send(Request::new(cmd::READ, 0, 8, 4096, 4096), &[]).await;
        k.conn.request_cycle().await.unwrap();
        let reply = k.reply().await;
        assert_eq!((reply.error, reply.handle), (0, 8));
        assert_eq!(k.bytes(4096).await, vec![0x42; 4096]);

        k.conn.negotiated.structured = true;
        k.send(Request::new(cmd::READ, cmd_flags::DF, 9, 4096, 16), &[])
            .await;
        k.conn.request_cycle().await.unwrap();
        let header = k.bytes(proto::STRUCTURED_HEADER_LEN).await;
        let header = proto::ChunkHeader::decode(&header.try_into().unwrap()).unwrap();
        assert_eq!(
            (header.flags, header.kind, header.handle, header.length),
            (chunk::FLAG_DONE, chunk::OFFSET_DATA, 9, 8 + 16)
        );
        let body = k.bytes(8 + 16).await;
        assert_eq!(&body[..8], &4096u64.to_be_bytes());
        assert_eq!(&body[8..], &[0x42; 16]);
    }

    #[tokio::test]
    async fn block_status_without_a_context_is_einval() {
        let mut k = kit(64 * 1024, false);
        k.send(Request::new(cmd::BLOCK_STATUS, 0, 4, 0, 4096), &[])
            .await;
        k.conn.request_cycle().await.unwrap();
        let reply = k.reply().await;
        assert_eq!((reply.error, reply.handle), (errno::EINVAL, 4));
    }

    #[tokio::test]
    async fn a_read_beyond_the_end_is_refused_and_a_write_beyond_drained() {
        let mut k = kit(4096, false);
        k.send(Request::new(cmd::WRITE, 0, 1, 4096, 512), &[1; 512])
            .await;
        k.send(Request::new(cmd::READ, 0, 2, 0, 8), &[]).await;
        k.conn.request_cycle().await.unwrap();
        k.conn.request_cycle().await.unwrap();
        let reply = k.reply().await;
        assert_eq!((reply.error, reply.handle), (errno::ENOSPC, 1));
        let reply = k.reply().await;
        assert_eq!(
            (reply.error, reply.handle),
            (0, 2),
            "the payload was drained"
        );
    }

    #[tokio::test]
    async fn put_chunk_encodes_a_header_and_offset() {
        let mut w = ReplyWriter::new(tokio::io::sink());
        put_chunk(&mut w, true, chunk::OFFSET_HOLE, 77, 12, 4096);
        let v = w.pending().to_vec();
        let header =
            proto::ChunkHeader::decode(&v[..proto::STRUCTURED_HEADER_LEN].try_into().unwrap())
                .unwrap();
        assert_eq!(
            (header.flags, header.kind, header.handle, header.length),
            (chunk::FLAG_DONE, chunk::OFFSET_HOLE, 77, 12)
        );
        assert_eq!(&v[proto::STRUCTURED_HEADER_LEN..], &4096u64.to_be_bytes());
    }

    #[tokio::test]
    async fn a_built_read_reply_is_whole() {
        let k = kit(8192, false);
        std::fs::write(&k.path, vec![3u8; 8192]).unwrap();
        let req = Request::new(cmd::READ, 0, 12, 0, 100);
        let reply = build_read_reply(&k.image, &req, false).await;
        assert_eq!(reply.len(), proto::SIMPLE_REPLY_LEN + 100);
        let head = SimpleReply::decode(&reply[..proto::SIMPLE_REPLY_LEN].try_into().unwrap());
        assert_eq!((head.error, head.handle), (0, 12));
        assert!(reply[proto::SIMPLE_REPLY_LEN..].iter().all(|&b| b == 3));
    }
}
