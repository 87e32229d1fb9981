//! Reading requests off the wire: headers, payloads discarded, the fault
//! probe's verdicts on what was received and on replies, and a hung
//! connection's wait for its peer to leave.

use std::io;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::transmission::{ConnError, Connection};
use super::writer::ReplyWriter;
use crate::fault_apply::{self, Incoming, SendError};
use crate::probe::{Action, Probe, Step};
use crate::proto::{Request, REQUEST_LEN};

impl<R, W, P> Connection<R, W, P>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    P: Probe,
{
    /// Reads a 28-byte header; `None` on a clean end of stream between requests.
    pub(super) async fn read_header(&mut self) -> Result<Option<Request>, ConnError> {
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
    pub(super) async fn received(&self, step: Step) -> Result<bool, ConnError> {
        // Hung: `serve_client` holds the connection until the peer leaves.
        let verdict =
            fault_apply::incoming(self.probe.step(step), || step.key(), std::future::ready(()))
                .await?;
        Ok(verdict == Incoming::Proceed)
    }

    /// Reads and discards `length` payload bytes (a refused write's data).
    pub(super) async fn drain(&mut self, length: u64) -> Result<(), ConnError> {
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
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
pub(super) async fn read_full<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> io::Result<usize> {
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
pub(super) async fn finish<W: AsyncWrite + Unpin>(
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
pub(super) async fn hang_until_closed<R: AsyncRead + Unpin>(
    reader: &mut R,
    stop: &CancellationToken,
) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::cmd;
    use crate::server::testkit::kit;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_header_split_across_sends_is_read_whole() {
        let mut k = kit(4096, false);
        let req = Request::new(cmd::READ, 0, 7, 512, 1024);
        let bytes = req.encode();
        k.client.write_all(&bytes[..5]).await.unwrap();
        let (got, ()) = tokio::join!(k.conn.read_header(), async {
            tokio::task::yield_now().await;
            k.client.write_all(&bytes[5..]).await.unwrap();
        });
        assert_eq!(got.unwrap(), Some(req));
    }

    #[tokio::test]
    async fn a_clean_end_between_requests_is_none_and_mid_header_is_vanished() {
        let mut k = kit(4096, false);
        k.client.shutdown().await.unwrap();
        assert_eq!(k.conn.read_header().await.unwrap(), None);

        let mut k = kit(4096, false);
        k.client.write_all(&[0u8; 10]).await.unwrap();
        k.client.shutdown().await.unwrap();
        match k.conn.read_header().await {
            Err(ConnError::Vanished { expected, got, .. }) => {
                assert_eq!((expected, got), (REQUEST_LEN as u64, 10))
            }
            other => panic!("expected Vanished after 10 header bytes, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn drain_discards_exactly_the_payload() {
        let mut k = kit(4096, false);
        let next = Request::new(cmd::FLUSH, 0, 9, 0, 0);
        k.client.write_all(&[0xaa; 300]).await.unwrap();
        k.client.write_all(&next.encode()).await.unwrap();
        k.conn.drain(300).await.unwrap();
        assert_eq!(k.conn.read_header().await.unwrap(), Some(next));

        let mut k = kit(4096, false);
        k.client.write_all(&[0xaa; 100]).await.unwrap();
        k.client.shutdown().await.unwrap();
        match k.conn.drain(300).await {
            Err(ConnError::Vanished { expected, got, .. }) => {
                assert_eq!((expected, got), (300, 100))
            }
            other => panic!("expected Vanished after 100 of 300 bytes, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn read_full_stops_at_the_end_of_the_stream() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"abc").await.unwrap();
        drop(a);
        let mut buf = [0u8; 8];
        assert_eq!(read_full(&mut b, &mut buf).await.unwrap(), 3);
        assert_eq!(&buf[..3], b"abc");
    }

    #[tokio::test]
    async fn a_hung_connection_waits_until_its_peer_leaves_or_it_is_stopped() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let stop = CancellationToken::new();
        let hang = hang_until_closed(&mut b, &stop);
        tokio::pin!(hang);
        a.write_all(b"ignored").await.unwrap();
        // Still hung after reading what the peer sent.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), &mut hang)
                .await
                .is_err(),
            "returned while the peer was still there"
        );
        drop(a);
        tokio::time::timeout(std::time::Duration::from_secs(10), hang)
            .await
            .expect("returns once the peer closed");

        let (_a, mut b) = tokio::io::duplex(64);
        let stop = CancellationToken::new();
        stop.cancel();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            hang_until_closed(&mut b, &stop),
        )
        .await
        .expect("returns once stopped");
    }

    #[tokio::test]
    async fn a_message_the_probe_passes_is_acted_on() {
        let k = kit(4096, false);
        assert!(k
            .conn
            .received(Step::RequestReceived { kind: cmd::READ })
            .await
            .unwrap());
    }
}
