//! Grouping work so a pipelining client costs few thread hand-offs: small
//! writes, zeroes and trims stored in one trip to the I/O pool, and syncs and uncached reads
//! waiting for the disk on their own tasks while the requests behind them go
//! on. What must be durable before which reply is `core::request`'s
//! decision; this only decides how it is grouped.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use super::exec::{build_read_reply, zero_or_trim_now};
use super::framing::{finish, read_full};
use super::transmission::{ConnError, Connection};
use crate::error;
use crate::probe::{Probe, Step};
use crate::proto::{cmd, errno, Request, SimpleReply};
use crate::store::PIECE;

/// Requests waiting for the disk at once, per connection. Past this the
/// connection stops reading until one finishes.
pub(super) const MAX_DEFERRED: u32 = 64;
/// Reads waiting for the disk on their own at once, per connection (their
/// replies are held in memory: at most this many times `MAX_DEFERRED_READ`).
pub(super) const MAX_DEFERRED_READS: usize = 16;
/// Reads waiting for the disk on their own over a whole server (its
/// `Shared::deferred_reads`), so its connections together hold at most this
/// many times `MAX_DEFERRED_READ` of replies (64 MiB); past it a connection
/// waits for a slot.
pub(crate) const ALL_DEFERRED_READS: usize = 256;
/// Writes held in a connection's batch at once, and their bytes. A batch is
/// stored in one trip to the I/O pool (see `Batch`), so these bound both the
/// memory a pipelining client can pin and how long its first write waits.
const BATCH_WRITES: usize = 64;
const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Payload buffers kept for reuse once a batch is stored, and the largest
/// kept: enough for a burst of small writes without pinning memory.
const SPARE_BUFFERS: usize = 64;
const SPARE_BUFFER_MAX: usize = 64 * 1024;

impl<R, W, P> Connection<R, W, P>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    P: Probe,
{
    /// Stores the batched changes in one trip to the I/O pool and answers
    /// each, in the order they arrived. Called before any other request is
    /// handled, so a read, flush or disconnect sees every earlier change.
    pub(super) async fn store_batch(&mut self) -> Result<(), ConnError> {
        if self.batch.writes.is_empty() {
            return Ok(());
        }
        let mut writes = std::mem::take(&mut self.batch.writes);
        self.batch.bytes = 0;
        let image = self.image.clone();
        let (mut writes, results) = self
            .image
            .offload()
            .run(move || {
                // In arrival order: a zero that follows a write to the same
                // blocks must see it (it is no longer a hole to skip).
                let results: Vec<io::Result<()>> = writes
                    .iter_mut()
                    .map(|w| match w.req.kind {
                        cmd::WRITE => image.write_at(&w.data, w.req.offset),
                        _ => zero_or_trim_now(&image, &w.req),
                    })
                    .collect();
                (writes, results)
            })
            .await
            .map_err(ConnError::Offload)?;
        for (w, result) in writes.iter().zip(results) {
            if result.is_err() {
                self.change_failed().await?;
            }
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

    /// Takes a small write's payload into the batch; it is stored, and then
    /// answered, when the batch is (`store_batch`).
    pub(super) async fn batch_write(&mut self, req: &Request) -> Result<(), ConnError> {
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
        self.store_batch_if_full().await
    }

    /// Takes a WRITE_ZEROES or TRIM into the batch. A migration's sweep
    /// sends one for every hole of the source, between the data pieces
    /// around it: each storing the batch on its own would cost a trip to
    /// the I/O pool per data piece once clients' writes scatter data
    /// through a hole (half the link's rate, measured over 1 Gbit/s).
    pub(super) async fn batch_zero(&mut self, req: &Request) -> Result<(), ConnError> {
        self.batch.writes.push(BatchedWrite {
            req: *req,
            data: Vec::new(),
            answer: true,
        });
        self.store_batch_if_full().await
    }

    async fn store_batch_if_full(&mut self) -> Result<(), ConnError> {
        if self.batch.writes.len() >= BATCH_WRITES || self.batch.bytes >= BATCH_BYTES {
            self.store_batch().await?;
        }
        Ok(())
    }

    /// Syncs the image on a worker thread and replies when it is durable,
    /// without holding up the requests behind this one.
    pub(super) async fn defer_sync(&mut self, req: &Request) {
        let permit = slot(&self.deferred).await;
        let image = self.image.clone();
        let writer = self.writer.clone();
        let probe = self.probe.clone();
        let req = *req;
        let sync = self.image.offload().run(move || image.sync());
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

    /// Runs a read that must wait for the disk in a task of its own: its
    /// reply is built apart and joins the connection's output when the data
    /// is in, so requests behind it (other reads, writes) do not queue
    /// behind the disk. At most `MAX_DEFERRED_READS` per connection at once
    /// (past that the connection waits, reading nothing more); replies may
    /// come out of order, as NBD allows: a client that needs an order waits
    /// for the reply first.
    pub(super) async fn defer_read(&mut self, req: &Request) {
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
}

/// Small writes, zeroes and trims taken in but not yet stored. Storing each on
/// its own would cost two thread hand-offs per request (to the I/O pool and
/// back), which dominates a 4 KiB write to the page cache; a pipelining
/// client's burst is instead stored in one hand-off, and answered after it.
/// Nothing is answered before it is stored, and any other request first
/// waits for the batch.
#[derive(Default)]
pub(super) struct Batch {
    writes: Vec<BatchedWrite>,
    /// Payload bytes in `writes`.
    bytes: usize,
    spare: Vec<Vec<u8>>,
}

pub(super) struct BatchedWrite {
    req: Request,
    /// A write's payload (empty for a zero or trim).
    data: Vec<u8>,
    /// False when a fault dropped the write: stored, never answered.
    answer: bool,
}

impl Batch {
    /// Whether a request joins the batch: a write of at most one piece, or
    /// a WRITE_ZEROES or TRIM (no payload; a large one that must reach the
    /// disk costs the same trip to the I/O pool in a batch as alone).
    pub(super) fn takes(req: &Request) -> bool {
        match req.kind {
            cmd::WRITE => req.length as usize <= PIECE,
            cmd::WRITE_ZEROES | cmd::TRIM => true,
            _ => false,
        }
    }

    /// A buffer of exactly `n` bytes, reused when one is spare.
    fn buffer(&mut self, n: usize) -> Vec<u8> {
        let mut data = self.spare.pop().unwrap_or_default();
        data.resize(n, 0);
        data
    }

    fn recycle(&mut self, data: Vec<u8>) {
        if data.capacity() > 0
            && data.capacity() <= SPARE_BUFFER_MAX
            && self.spare.len() < SPARE_BUFFERS
        {
            self.spare.push(data);
        }
    }
}

/// Waits for a slot of one of the connection's own semaphores (never closed).
pub(super) async fn slot(semaphore: &Arc<Semaphore>) -> tokio::sync::OwnedSemaphorePermit {
    semaphore
        .clone()
        .acquire_owned()
        .await
        .expect("a connection's semaphores are never closed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::cmd_flags;
    use crate::server::testkit::kit;

    #[test]
    fn only_writes_of_at_most_one_piece_join_a_batch() {
        let req = |kind, length| Request::new(kind, 0, 1, 0, length);
        assert!(Batch::takes(&req(cmd::WRITE, 4096)));
        assert!(Batch::takes(&req(cmd::WRITE, PIECE as u32)));
        assert!(!Batch::takes(&req(cmd::WRITE, PIECE as u32 + 1)));
        assert!(Batch::takes(&req(cmd::WRITE_ZEROES, u32::MAX)));
        assert!(Batch::takes(&req(cmd::TRIM, 4096)));
        for kind in [cmd::READ, cmd::FLUSH, cmd::CACHE, cmd::DISC] {
            assert!(!Batch::takes(&req(kind, 4096)), "{kind}");
        }
    }

    #[test]
    fn spare_buffers_are_reused_within_bounds() {
        let mut b = Batch::default();
        let data = b.buffer(100);
        assert_eq!(data.len(), 100);
        let ptr = data.as_ptr();
        b.recycle(data);
        let again = b.buffer(50);
        assert_eq!(
            (again.len(), again.as_ptr()),
            (50, ptr),
            "the spare is reused"
        );
        // A large buffer is not kept.
        b.recycle(vec![0; SPARE_BUFFER_MAX + 1]);
        assert!(b.spare.is_empty());
        for _ in 0..SPARE_BUFFERS + 5 {
            b.recycle(Vec::with_capacity(16));
        }
        assert_eq!(b.spare.len(), SPARE_BUFFERS);
    }

    #[tokio::test]
    async fn a_pipelined_burst_is_stored_then_answered_in_order() {
        let mut k = kit(64 * 1024, false);
        for i in 0..3u64 {
            let req = Request::new(cmd::WRITE, 0, 100 + i, i * 4096, 4096);
            k.send(req, &[i as u8 + 1; 4096]).await;
        }
        // The burst is waiting: the first two cycles keep their writes
        // batched, the last stores them and answers.
        for _ in 0..3 {
            k.conn.request_cycle().await.unwrap();
        }
        assert!(k.conn.batch.writes.is_empty(), "the batch was stored");
        for i in 0..3u64 {
            let reply = k.reply().await;
            assert_eq!((reply.error, reply.handle), (0, 100 + i));
        }
        let data = k.contents();
        for i in 0..3usize {
            assert!(data[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == i as u8 + 1));
        }
    }

    #[tokio::test]
    async fn zeroes_join_a_burst_of_writes_and_are_carried_out_in_order() {
        // A sweep through a hole with clients' blocks in it: data, zeroes,
        // data, zeroes. Zeroes must not store the batch on their own, and
        // a zero after a write to the same blocks must clear them even
        // though the map called them a hole when the zero arrived.
        let mut k = kit(64 * 1024, false);
        k.conn.image.scan_allocation().unwrap();
        // Small writes, so the whole burst is in the first read.
        k.send(Request::new(cmd::WRITE, 0, 1, 0, 512), &[1; 512])
            .await;
        k.send(Request::new(cmd::WRITE_ZEROES, 0, 2, 4096, 8192), &[])
            .await;
        k.send(Request::new(cmd::WRITE, 0, 3, 12288, 512), &[3; 512])
            .await;
        k.send(Request::new(cmd::WRITE_ZEROES, 0, 4, 12288, 4096), &[])
            .await;
        for held in 1..4 {
            k.conn.request_cycle().await.unwrap();
            assert_eq!(k.conn.batch.writes.len(), held, "still in the batch");
        }
        k.conn.request_cycle().await.unwrap();
        assert!(k.conn.batch.writes.is_empty(), "the batch was stored");
        for handle in 1..=4 {
            let reply = k.reply().await;
            assert_eq!((reply.error, reply.handle), (0, handle), "in order");
        }
        let data = k.contents();
        assert!(data[..512].iter().all(|&b| b == 1));
        assert!(
            data[4096..16384].iter().all(|&b| b == 0),
            "the zero after the write cleared it"
        );
    }

    #[tokio::test]
    async fn replies_go_out_before_a_next_request_whose_payload_has_not_all_arrived() {
        // A pipelining client on a slow link: the next write's header is
        // here, its payload still arriving. Its predecessor's reply must
        // not wait for it (nor for the stream of writes behind it).
        let mut k = kit(64 * 1024, false);
        k.send(Request::new(cmd::WRITE, 0, 1, 0, 8192), &[1; 8192])
            .await;
        k.send(Request::new(cmd::WRITE, 0, 2, 8192, 8192), &[2; 4096])
            .await;
        k.conn.request_cycle().await.unwrap();
        let first = tokio::time::timeout(std::time::Duration::from_secs(1), k.reply())
            .await
            .expect("the first write's reply without waiting for the second's payload");
        assert_eq!((first.error, first.handle), (0, 1));
        tokio::io::AsyncWriteExt::write_all(&mut k.client, &[2; 4096])
            .await
            .unwrap();
        k.conn.request_cycle().await.unwrap();
        let second = k.reply().await;
        assert_eq!((second.error, second.handle), (0, 2));
    }

    #[tokio::test]
    async fn a_batch_is_stored_before_a_request_that_does_not_join_it() {
        let mut k = kit(64 * 1024, false);
        k.send(Request::new(cmd::WRITE, 0, 1, 0, 512), &[7; 512])
            .await;
        k.send(Request::new(cmd::READ, 0, 2, 0, 512), &[]).await;
        k.conn.request_cycle().await.unwrap();
        assert_eq!(k.conn.batch.writes.len(), 1, "held while the read waits");
        k.conn.request_cycle().await.unwrap();
        let write = k.reply().await;
        assert_eq!((write.error, write.handle), (0, 1));
        let read = k.reply().await;
        assert_eq!((read.error, read.handle), (0, 2));
        assert_eq!(k.bytes(512).await, vec![7; 512], "the read saw the write");
    }

    #[tokio::test]
    async fn flush_and_fua_are_answered_after_a_deferred_sync() {
        let mut k = kit(64 * 1024, false);
        k.send(Request::new(cmd::FLUSH, 0, 5, 0, 0), &[]).await;
        k.conn.request_cycle().await.unwrap();
        let reply = k.reply().await;
        assert_eq!((reply.error, reply.handle), (0, 5));
        k.send(
            Request::new(cmd::WRITE, cmd_flags::FUA, 6, 0, 512),
            &[1; 512],
        )
        .await;
        k.conn.request_cycle().await.unwrap();
        let reply = k.reply().await;
        assert_eq!((reply.error, reply.handle), (0, 6));
        // Every deferred request gave its slot back.
        assert_eq!(k.conn.deferred.available_permits(), MAX_DEFERRED as usize);
    }

    #[tokio::test]
    async fn a_deferred_read_answers_with_the_data() {
        let mut k = kit(64 * 1024, false);
        std::fs::write(&k.path, vec![9u8; 64 * 1024]).unwrap();
        let req = Request::new(cmd::READ, 0, 11, 4096, 1024);
        k.conn.defer_read(&req).await;
        let reply = k.reply().await;
        assert_eq!((reply.error, reply.handle), (0, 11));
        assert_eq!(k.bytes(1024).await, vec![9; 1024]);
    }
}
