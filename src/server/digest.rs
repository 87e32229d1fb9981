//! DIGEST (docs/handoff.md, "Comparing instead of copying"): the BLAKE3
//! digest of a range, so a source can send only what differs from what
//! this image already holds. Read-only, in `serve` and `listen` alike.

use tokio::io::{AsyncRead, AsyncWrite};

use super::framing::finish;
use super::transmission::{ConnError, Connection};
use crate::error;
use crate::probe::{Probe, Step};
use crate::proto::{self, errno, Request, SimpleReply};

impl<R, W, P> Connection<R, W, P>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    P: Probe,
{
    /// Answers 0 and the 32-byte digest, or an error without a payload.
    pub(super) async fn digest(&mut self, req: &Request) -> Result<(), ConnError> {
        if req.length > proto::MAX_DIGEST {
            return self
                .error_reply(req, errno::EINVAL, "digest range too long")
                .await;
        }
        // Reading and hashing up to 64 MiB is blocking work: off the
        // async workers, so other requests and clients go on meanwhile.
        let image = self.image.clone();
        let (offset, len) = (req.offset, u64::from(req.length));
        let digest = crate::store::offload::run(&self.image, move || image.digest(offset, len))
            .await
            .and_then(|d| d);
        let digest = match digest {
            Ok(d) => d,
            Err(e) => {
                error!("digest of {len} bytes at {offset} failed: {e}");
                return self
                    .error_reply(req, errno::from_io(&e), "digest failed")
                    .await;
            }
        };
        let step = Step::ReplySend { kind: req.kind };
        let verdict = self.probe.step(step);
        let mut w = self.writer.lock().await;
        let mark = w.mark();
        w.put(&SimpleReply::new(0, req.handle).encode());
        w.put(&digest);
        finish(&mut w, verdict, step, mark).await?;
        w.send_if_full().await.map_err(ConnError::Send)
    }
}

#[cfg(test)]
mod tests {
    use crate::proto::{cmd, errno, Request, MAX_DIGEST};
    use crate::server::testkit::kit;

    #[tokio::test]
    async fn digest_answers_blake3_of_the_range_in_serve_and_listen() {
        for listen in [false, true] {
            let mut k = kit(256 * 1024, listen);
            let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 256) as u8).collect();
            k.send(Request::new(cmd::WRITE, 0, 1, 4096, 8192), &data)
                .await;
            k.conn.request_cycle().await.unwrap();
            assert_eq!(k.reply().await.error, 0);
            // Data and the hole after it.
            k.send(Request::new(cmd::DIGEST, 0, 2, 0, 64 * 1024), &[])
                .await;
            k.conn.request_cycle().await.unwrap();
            let reply = k.reply().await;
            assert_eq!((reply.error, reply.handle), (0, 2));
            let digest = k.bytes(32).await;
            let expect = blake3::hash(&k.contents()[..64 * 1024]);
            assert_eq!(digest, expect.as_bytes(), "listen: {listen}");
        }
    }

    #[tokio::test]
    async fn a_digest_too_long_or_out_of_range_is_an_error_without_payload() {
        let mut k = kit(64 * 1024, true);
        k.send(Request::new(cmd::DIGEST, 0, 3, 0, MAX_DIGEST + 1), &[])
            .await;
        k.conn.request_cycle().await.unwrap();
        // Out of range first (the export is 64 KiB): ENOSPC, as for READ.
        assert_eq!(k.reply().await.error, errno::ENOSPC);
        let mut big = kit(2 * u64::from(MAX_DIGEST), false);
        big.send(Request::new(cmd::DIGEST, 0, 4, 0, MAX_DIGEST + 4096), &[])
            .await;
        big.conn.request_cycle().await.unwrap();
        assert_eq!(big.reply().await.error, errno::EINVAL);
        // Nothing follows an error: the next reply is the next request's.
        big.send(Request::new(cmd::DIGEST, 0, 5, 0, 4096), &[])
            .await;
        big.conn.request_cycle().await.unwrap();
        let reply = big.reply().await;
        assert_eq!((reply.error, reply.handle), (0, 5));
        assert_eq!(big.bytes(32).await, blake3::hash(&[0u8; 4096]).as_bytes());
    }
}
