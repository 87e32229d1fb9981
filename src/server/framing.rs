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
