//! The reply side of a connection: replies are assembled in one buffer and
//! sent with as few system calls as possible.

use std::io;

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Pending output is sent once it reaches this size, even while more
/// requests are waiting, so large reads stream instead of piling up.
pub const SEND_AT: usize = 256 * 1024;

pub struct ReplyWriter<W> {
    out: W,
    /// Initialised storage; `filled` bytes of it are pending. Kept between
    /// replies so reads land in it without zeroing or reallocating.
    buf: Vec<u8>,
    filled: usize,
    /// Counts sends, so a reply being built can tell whether part of it
    /// has already left (and can no longer be taken back).
    sends: u64,
    /// Set while `lend` has the buffer out. If the lender is dropped before
    /// it gives the buffer back (the killswitch abandons a request), the
    /// pending output is gone and is discarded at the next send.
    lent: bool,
}

impl<W: AsyncWrite + Unpin> ReplyWriter<W> {
    pub fn new(out: W) -> ReplyWriter<W> {
        ReplyWriter {
            out,
            buf: Vec::new(),
            filled: 0,
            sends: 0,
            lent: false,
        }
    }

    pub fn put(&mut self, bytes: &[u8]) {
        self.space(bytes.len()).copy_from_slice(bytes);
        self.filled += bytes.len();
    }

    /// Room for `n` more bytes; call `commit` with how many were filled.
    pub fn space(&mut self, n: usize) -> &mut [u8] {
        let need = self.filled + n;
        if self.buf.len() < need {
            // Exactly what is needed: every initialised byte is resident
            // memory, and the buffer lives as long as the connection.
            self.buf.resize(need, 0);
        }
        &mut self.buf[self.filled..need]
    }

    /// Takes the buffer out, with room for `n` more bytes after the pending
    /// output, so another thread can fill them (image reads run off the
    /// async workers); `give_back` returns it. Nothing else may touch the
    /// writer in between.
    pub fn lend(&mut self, n: usize) -> Vec<u8> {
        self.space(n);
        self.lent = true;
        std::mem::take(&mut self.buf)
    }

    /// Returns a buffer taken by `lend`; `None` when it was lost (the thread
    /// that had it never finished), and the pending output with it.
    pub fn give_back(&mut self, buf: Option<Vec<u8>>) {
        match buf {
            Some(buf) => self.buf = buf,
            None => self.filled = 0,
        }
        self.lent = false;
    }

    /// Forgets pending output whose buffer was lent and never returned.
    fn drop_lost(&mut self) {
        if self.lent {
            self.lent = false;
            self.filled = 0;
        }
    }

    pub fn commit(&mut self, n: usize) {
        self.filled += n;
    }

    /// Where the next byte goes; with `sends()`, lets a caller roll back a
    /// reply that failed before any of it was sent.
    pub fn mark(&self) -> usize {
        self.filled
    }

    /// The output not yet sent.
    pub fn pending(&self) -> &[u8] {
        &self.buf[..self.filled]
    }

    pub fn sends(&self) -> u64 {
        self.sends
    }

    pub fn rollback(&mut self, mark: usize) {
        self.filled = mark.min(self.filled);
    }

    /// Appends with a closure over a Vec (for small encoded messages).
    pub fn put_with(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let mut v = Vec::with_capacity(64);
        f(&mut v);
        self.put(&v);
    }

    /// Damages the byte at `at` (fault injection: a corrupted magic).
    pub fn corrupt_byte(&mut self, at: usize) {
        if at < self.filled {
            if let Some(byte) = self.buf.get_mut(at..at + 1) {
                faults::corrupt(byte);
            }
        }
    }

    pub async fn send(&mut self) -> io::Result<()> {
        self.drop_lost();
        if self.filled > 0 {
            self.out.write_all(&self.buf[..self.filled]).await?;
            // Over TLS, write_all can return with the last records still
            // queued inside the session (the socket was full); only a flush
            // pushes them out, and nothing else would before the client's
            // next request, which may wait for this very reply. On a plain
            // socket it does nothing.
            self.out.flush().await?;
            self.filled = 0;
            self.sends += 1;
            // Don't keep a huge buffer alive after one large reply.
            if self.buf.len() > 16 * SEND_AT {
                self.buf = Vec::new();
            }
        }
        Ok(())
    }

    /// Sends what is pending if `n` more bytes would take it past
    /// `SEND_AT`, so the buffer never grows much beyond that.
    pub async fn make_room(&mut self, n: usize) -> io::Result<()> {
        if self.filled > 0 && self.filled + n > SEND_AT {
            self.send().await?;
        }
        Ok(())
    }

    pub async fn send_if_full(&mut self) -> io::Result<()> {
        if self.filled >= SEND_AT {
            self.send().await?;
        }
        Ok(())
    }

    /// Sends the first `n` pending bytes and drops the rest (fault injection:
    /// a truncated message).
    pub async fn send_truncated(&mut self, n: usize) -> io::Result<()> {
        self.drop_lost();
        let n = n.min(self.filled);
        self.out.write_all(&self.buf[..n]).await?;
        self.out.flush().await?;
        self.filled = 0;
        Ok(())
    }

    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.send().await?;
        self.out.shutdown().await
    }
}

/// A send fault acts on the reply queued here.
impl<W: AsyncWrite + Unpin> crate::fault_apply::Queued for ReplyWriter<W> {
    fn rollback(&mut self, mark: usize) {
        ReplyWriter::rollback(self, mark)
    }

    fn corrupt_byte(&mut self, at: usize) {
        ReplyWriter::corrupt_byte(self, at)
    }

    async fn send_truncated(&mut self, n: usize) -> io::Result<()> {
        ReplyWriter::send_truncated(self, n).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use tokio::io::AsyncReadExt;

    /// A TLS session over a pipe far smaller than the reply: the socket is
    /// full for most of the send, so rustls still holds records when the
    /// last plaintext is accepted.
    #[tokio::test]
    async fn a_reply_sent_over_tls_reaches_the_peer_in_full() {
        let (ours, mut theirs) = crate::tls::test_pair(4096).await;

        let reply: Vec<u8> = (0..1024 * 1024u32).map(|i| i as u8).collect();
        let expected = reply.clone();
        let peer = tokio::spawn(async move {
            let mut got = vec![0; expected.len()];
            theirs.read_exact(&mut got).await.map(|_| got == expected)
        });
        let mut w = ReplyWriter::new(ours);
        w.put(&reply);
        w.send().await.unwrap();
        // The writer is kept open: only what `send` pushed out may arrive.
        let got = tokio::time::timeout(Duration::from_secs(10), peer).await;
        assert!(
            matches!(got, Ok(Ok(Ok(true)))),
            "the peer did not get the whole reply: {got:?}"
        );
        drop(w);
    }
}
