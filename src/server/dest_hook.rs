//! In `listen`: the connection's side of the hand-off. Requests that matter
//! to it (a change, ENTRUST, DISCONNECT, CHECKPOINT, the RESUME query, an
//! invalid request) and the
//! connection's end are fed to the destination's pure machine
//! (`core::destination`); its I/O runs on the I/O pool through
//! `handoff::Destination::run`, and what it leaves (apply, reply, complete,
//! close, log lines) is carried out here.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use super::framing::finish;
use super::transmission::{ConnError, Connection, Next};
use crate::core::destination::{CloseReason, ConnId, Effect, Event, Level};
use crate::handoff::Destination;
use crate::probe::{Probe, Step};
use crate::proto::{errno, Request, SimpleReply};
use crate::store::Image;
use crate::{debug, error, info, warn};

/// One connection of a destination, known to its machine until dropped.
pub(super) struct Session {
    pub(super) destination: Arc<Destination>,
    pub(super) conn: ConnId,
    /// How the connection ended, told to the machine on drop; a connection
    /// dropped without being told (an aborted task) was reset.
    pub(super) ending: CloseReason,
    /// Held by a CHECKPOINT whose sync runs on its own task: the hand-off's
    /// other requests on this connection (RESUME, another CHECKPOINT,
    /// ENTRUST, DISCONNECT) wait for it, as one request at a time is all
    /// the machine keeps per connection.
    checkpointing: Arc<Semaphore>,
}

impl Session {
    pub(super) fn open(destination: Arc<Destination>, source: String) -> Session {
        let conn = destination.open(source);
        Session {
            destination,
            conn,
            ending: CloseReason::Reset,
            checkpointing: Arc::new(Semaphore::new(1)),
        }
    }

    /// Waits until no CHECKPOINT of this connection is still syncing.
    pub(super) async fn checkpoint_done(&self) {
        let _ = self.checkpointing.acquire().await;
    }

    /// Feeds `event` and carries out the I/O it leads to (on the I/O pool
    /// when there is any); returns the effects left to the connection.
    pub(super) async fn feed(
        &self,
        image: &Arc<Image>,
        event: Event,
    ) -> Result<Vec<Effect>, ConnError> {
        let effects = self.destination.handle(event);
        if !effects.iter().any(Effect::is_io) {
            // The common case (a change on the current sender): no hand-off
            // to another thread.
            return Ok(effects);
        }
        let destination = self.destination.clone();
        let image = image.clone();
        let slots = image.offload().clone();
        slots
            .run(move || destination.run(&image, effects))
            .await
            .map_err(ConnError::Offload)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let effects = self.destination.handle(Event::Closed {
            conn: self.conn,
            why: self.ending,
        });
        for effect in &effects {
            log(effect);
        }
    }
}

/// Writes a log effect; other effects are not logs and are skipped.
fn log(effect: &Effect) {
    if let Effect::Log { level, message } = effect {
        match level {
            Level::Info => info!("{message}"),
            Level::Error => error!("{message}"),
        }
    }
}

/// The text of the last error log among `effects`, for the connection's end.
fn last_error(effects: &[Effect]) -> Option<String> {
    effects.iter().rev().find_map(|e| match e {
        Effect::Log {
            level: Level::Error,
            message,
        } => Some(message.clone()),
        _ => None,
    })
}

impl<R, W, P> Connection<R, W, P>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    P: Probe,
{
    /// Before a change is applied: in `listen`, the machine decides whether
    /// the marker must say `receiving` first (durably). `bytes` is the
    /// payload the change carries.
    pub(super) async fn before_change(&mut self, bytes: u64) -> Result<(), ConnError> {
        let Some(session) = &self.session else {
            return Ok(());
        };
        let conn = session.conn;
        let effects = session
            .feed(&self.image, Event::Change { conn, bytes })
            .await?;
        let mut applied = false;
        for effect in &effects {
            match effect {
                Effect::Apply { .. } => applied = true,
                Effect::Log { .. } => log(effect),
                _ => {}
            }
        }
        if applied {
            return Ok(());
        }
        Err(ConnError::Marker(last_error(&effects).unwrap_or_else(
            || format!("the hand-off refused a change: expected it applied, got {effects:?}"),
        )))
    }

    /// ENTRUST: answered only once the image is durable and the marker
    /// says `entrusted` (or with the error that stopped it).
    pub(super) async fn entrust(&mut self, req: &Request) -> Result<(), ConnError> {
        let Some(session) = &self.session else {
            return Ok(());
        };
        session.checkpoint_done().await;
        let event = Event::Entrust {
            conn: session.conn,
            told: req.offset,
            size: self.image.size(),
        };
        let effects = session.feed(&self.image, event).await?;
        self.answer(req, &effects).await
    }

    /// A change failed (its store returned an error): in `listen`, nothing
    /// after it on this connection may be entrusted. Told whether or not
    /// the change is answered (a fault may keep its reply back).
    pub(super) async fn change_failed(&mut self) -> Result<(), ConnError> {
        let Some(session) = &self.session else {
            return Ok(());
        };
        let event = Event::ChangeFailed { conn: session.conn };
        for effect in session.feed(&self.image, event).await? {
            log(&effect);
        }
        Ok(())
    }

    /// CHECKPOINT (`offset` the migration id, `length` the checkpoint):
    /// answered like ENTRUST, once the image is durable and the marker
    /// holds the checkpoint.
    pub(super) async fn checkpoint(&mut self, req: &Request) -> Result<(), ConnError> {
        let Some(session) = &self.session else {
            return Ok(());
        };
        let event = Event::Checkpoint {
            conn: session.conn,
            migration: req.offset,
            checkpoint: u64::from(req.length),
        };
        let one = session
            .checkpointing
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let effects = session.destination.handle(event);
        if !effects.iter().any(Effect::is_io) {
            // Refused (invalid, or the connection is done for): at once.
            return self.answer(req, &effects).await;
        }
        // The sync and the marker's rewrite run on a task of their own,
        // and the source's writes behind the checkpoint go on being stored
        // meanwhile (the machine applies them: the marker says `receiving`
        // for this connection throughout). Waiting here left the link idle
        // for the whole sync: 200 ms at a time at 1 Gbit/s.
        let permit = super::batch::slot(&self.deferred).await;
        let destination = session.destination.clone();
        let image = self.image.clone();
        let writer = self.writer.clone();
        let probe = self.probe.clone();
        let req = *req;
        let run = self
            .image
            .offload()
            .run(move || destination.run(&image, effects));
        tokio::spawn(async move {
            let error = match run.await {
                Ok(effects) => {
                    let mut answer = None;
                    for effect in &effects {
                        match effect {
                            Effect::Reply { errno, .. } => answer = Some(*errno),
                            Effect::Close { .. } => {
                                // Not among a checkpoint's outcomes; were it
                                // one, the source must not count it held.
                                error!(
                                    "checkpoint: the hand-off closed the connection; answering EIO"
                                );
                                answer = Some(errno::EIO);
                            }
                            _ => log(effect),
                        }
                    }
                    answer
                }
                Err(e) => {
                    error!("checkpoint: the sync did not finish: {e}; answering EIO");
                    Some(errno::EIO)
                }
            };
            if let Some(error) = error {
                let step = Step::ReplySend { kind: req.kind };
                let verdict = probe.step(step);
                let mut w = writer.lock().await;
                let mark = w.mark();
                w.put(&SimpleReply::new(error, req.handle).encode());
                // The connection may be waiting for the source: send now.
                if finish(&mut w, verdict, step, mark).await.is_ok() {
                    let _ = w.send().await;
                }
            }
            drop(permit);
            drop(one);
        });
        Ok(())
    }

    /// The resume query (`offset` the migration id, `length` 8 or 16):
    /// answered 0 and 8 bytes, the checkpoint held for that migration
    /// (big-endian, 0 for none), and with length 16 (`proto::ext::EMPTY`)
    /// 8 more, bit 0 set when the image holds no data. Any other length is
    /// EINVAL, without a payload.
    pub(super) async fn resume(&mut self, req: &Request) -> Result<(), ConnError> {
        let Some(session) = &self.session else {
            return Ok(());
        };
        if req.length != 8 && req.length != 16 {
            warn!(
                "client {}: resume query of length {}: expected 8 or 16 (the size of its answer); answering EINVAL",
                self.peer, req.length
            );
            return self.simple_reply(req, errno::EINVAL).await;
        }
        session.checkpoint_done().await;
        // Whether every block is a hole: the map (or the file) is asked off
        // the async workers. Only a hint: a source told "empty" sends
        // everything, which is never wrong.
        let empty = if req.length == 16 {
            let image = self.image.clone();
            let size = image.size();
            tokio::task::spawn_blocking(move || image.extents(0, size, 1) == [(size, true)])
                .await
                .unwrap_or(false)
        } else {
            false
        };
        let event = Event::Resume {
            conn: session.conn,
            migration: req.offset,
        };
        let effects = session.feed(&self.image, event).await?;
        for effect in &effects {
            match effect {
                Effect::ResumeReply { checkpoint, .. } => {
                    let step = Step::ReplySend { kind: req.kind };
                    let verdict = self.probe.step(step);
                    let mut w = self.writer.lock().await;
                    let mark = w.mark();
                    w.put(&SimpleReply::new(0, req.handle).encode());
                    w.put(&checkpoint.to_be_bytes());
                    if req.length == 16 {
                        w.put(&u64::from(empty).to_be_bytes());
                    }
                    finish(&mut w, verdict, step, mark).await?;
                    w.send_if_full().await.map_err(ConnError::Send)?;
                }
                Effect::Close { .. } => return Err(self.closed_by_hand_off(&effects)),
                _ => log(effect),
            }
        }
        Ok(())
    }

    /// Carries out what the machine left for a request it answers: the
    /// reply, or the connection's end; logs the rest.
    async fn answer(&mut self, req: &Request, effects: &[Effect]) -> Result<(), ConnError> {
        for effect in effects {
            match effect {
                Effect::Reply { errno, .. } => self.simple_reply(req, *errno).await?,
                Effect::Close { .. } => return Err(self.closed_by_hand_off(effects)),
                _ => log(effect),
            }
        }
        Ok(())
    }

    /// A valid DISCONNECT: in `listen`, sync, completion record, marker
    /// removal, then the migration is complete. The connection ends either
    /// way.
    pub(super) async fn disconnect(&mut self) -> Result<Next, ConnError> {
        debug!("client {} sent DISCONNECT", self.peer);
        let Some(session) = &mut self.session else {
            return Ok(Next::Stop);
        };
        session.checkpoint_done().await;
        let conn = session.conn;
        let effects = session
            .feed(&self.image, Event::Disconnect { conn })
            .await?;
        for effect in &effects {
            match effect {
                Effect::Complete => {
                    crate::fault_apply::milestone(&*self.probe, Step::DisconnectDone).await
                }
                _ => log(effect),
            }
        }
        if let Some(session) = &mut self.session {
            session.ending = CloseReason::Eof;
        }
        Ok(Next::Stop)
    }

    /// A request with a bad magic: in `listen` the machine is told (it
    /// completes nothing); the caller answers and closes as in `serve`.
    pub(super) async fn invalid(&mut self, errno: u32) -> Result<(), ConnError> {
        let Some(session) = &self.session else {
            return Ok(());
        };
        let conn = session.conn;
        let effects = session
            .feed(&self.image, Event::Invalid { conn, errno })
            .await?;
        for effect in &effects {
            log(effect);
        }
        Ok(())
    }

    fn closed_by_hand_off(&self, effects: &[Effect]) -> ConnError {
        ConnError::FaultClosed(
            last_error(effects).unwrap_or_else(|| {
                format!("the hand-off closed the connection from {}", self.peer)
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::destination::entrust_offset;
    use crate::handoff::{marker_path, read_marker_state, read_record, record_path, MarkerState};
    use crate::proto::{cmd, errno, REQUEST_MAGIC};
    use crate::server::testkit::{kit, kit_stacked};
    use crate::store::PIECE;
    use faults::FaultPlan;
    use std::sync::Arc;

    fn marker_text(path: &std::path::Path) -> String {
        std::fs::read_to_string(marker_path(path)).expect("a marker")
    }

    #[tokio::test]
    async fn the_first_write_of_a_connection_marks_receiving_with_its_source() {
        let mut k = kit(64 * 1024, true);
        // prepare's marker names no source; the first write's does.
        assert!(marker_text(&k.path).contains("source=none"));
        k.send(Request::new(cmd::WRITE, 0, 1, 0, 512), &[1; 512])
            .await;
        k.conn.request_cycle().await.unwrap();
        assert_eq!(k.reply().await.error, 0);
        let text = marker_text(&k.path);
        assert!(
            text.starts_with("state=receiving\nsource=127.0.0.1:4000\n"),
            "{text}"
        );
        // Not rewritten by the next write of the same connection.
        std::fs::write(marker_path(&k.path), "state=receiving\nsource=sentinel\n").unwrap();
        k.send(Request::new(cmd::WRITE, 0, 2, 0, 512), &[2; 512])
            .await;
        k.conn.request_cycle().await.unwrap();
        assert_eq!(k.reply().await.error, 0);
        assert!(marker_text(&k.path).contains("source=sentinel"));
    }

    #[tokio::test]
    async fn entrust_then_disconnect_completes_with_a_record() {
        let mut k = kit(64 * 1024, true);
        k.send(Request::new(cmd::WRITE, 0, 1, 0, 4096), &[3; 4096])
            .await;
        k.conn.request_cycle().await.unwrap();
        assert_eq!(k.reply().await.error, 0);
        k.send(Request::new(cmd::ENTRUST, 0, 2, 0, 0), &[]).await;
        k.conn.request_cycle().await.unwrap();
        let reply = k.reply().await;
        assert_eq!((reply.error, reply.handle), (0, 2));
        assert_eq!(
            read_marker_state(&crate::store::files::Disk, &k.path).unwrap(),
            Some(MarkerState::Entrusted)
        );
        assert!(marker_text(&k.path).contains("bytes_received=4096"));
        k.send(Request::new(cmd::DISC, 0, 3, 0, 0), &[]).await;
        assert!(matches!(k.conn.request_cycle().await, Ok(Next::Stop)));
        let destination = k.destination.as_ref().unwrap();
        assert!(destination.completed.is_cancelled());
        assert!(!marker_path(&k.path).exists());
        let record = read_record(&crate::store::files::Disk, &k.path).unwrap();
        let record = record.matching().expect("a completion record");
        assert_eq!(record.bytes_received, 4096);
        assert_eq!(record.source.as_deref(), Some("127.0.0.1:4000"));
    }

    #[tokio::test]
    async fn entrust_is_refused_when_the_changes_before_it_went_missing() {
        let mut k = kit(64 * 1024, true);
        let size = k.image.size();
        for handle in 1..=2u64 {
            k.send(Request::new(cmd::WRITE, 0, handle, 0, 4096), &[3; 4096])
                .await;
            k.conn.request_cycle().await.unwrap();
            assert_eq!(k.reply().await.error, 0);
        }
        // The source says three went before it: one never arrived.
        let told = entrust_offset(3, size);
        k.send(Request::new(cmd::ENTRUST, 0, 3, told, 0), &[]).await;
        k.conn.request_cycle().await.unwrap();
        assert_eq!(k.reply().await.error, errno::EIO);
        assert_eq!(
            read_marker_state(&crate::store::files::Disk, &k.path).unwrap(),
            Some(MarkerState::Receiving)
        );
        let told = entrust_offset(2, size);
        k.send(Request::new(cmd::ENTRUST, 0, 4, told, 0), &[]).await;
        k.conn.request_cycle().await.unwrap();
        assert_eq!(k.reply().await.error, 0);
        assert_eq!(
            read_marker_state(&crate::store::files::Disk, &k.path).unwrap(),
            Some(MarkerState::Entrusted)
        );
    }

    #[tokio::test]
    async fn entrust_is_refused_after_a_failed_change_answered_or_not() {
        use crate::probe::PlanProbe;
        // The first write fails and is answered EIO; the second fails and
        // its reply is dropped; ENTRUST after either is refused, even
        // from a source that tells no count.
        // A small write is stored in a batch, a large one piece by piece.
        let small = [
            "store.write#1=eio",
            "store.write#1=eio; server.reply_send.write#1=drop",
        ];
        for (plan, len) in small
            .iter()
            .map(|p| (*p, 4096))
            .chain(small.iter().map(|p| (*p, PIECE + 4096)))
        {
            let probe = Arc::new(PlanProbe::new(FaultPlan::parse(plan).unwrap()));
            let stack = crate::fault_apply::storage_stack(&probe);
            let mut k = kit_stacked(1 << 20, true, probe.clone(), stack);
            k.send(Request::new(cmd::WRITE, 0, 1, 0, len as u32), &vec![3; len])
                .await;
            k.send(Request::new(cmd::ENTRUST, 0, 2, 0, 0), &[]).await;
            k.conn.request_cycle().await.unwrap();
            k.conn.request_cycle().await.unwrap();
            let mut replies = vec![k.reply().await];
            if !plan.contains("drop") {
                replies.push(k.reply().await);
            }
            if let [write, _] = replies[..] {
                assert_eq!((write.handle, write.error), (1, errno::EIO), "{plan}");
            }
            // Replies go in order: with the write's dropped, the first is
            // the entrust's.
            let entrust = replies.last().unwrap();
            assert_eq!((entrust.handle, entrust.error), (2, errno::EIO), "{plan}");
            assert!(
                k.contents()[..4096].iter().all(|&b| b == 0),
                "{plan}, {len} bytes: the store fault fired"
            );
            assert_eq!(
                read_marker_state(&crate::store::files::Disk, &k.path).unwrap(),
                Some(MarkerState::Receiving),
                "{plan}"
            );
        }
    }

    #[tokio::test]
    async fn a_failed_disconnect_does_not_complete() {
        let mut k = kit(64 * 1024, true);
        // The record cannot be written: a directory is in its way.
        std::fs::create_dir(record_path(&k.path)).unwrap();
        k.send(Request::new(cmd::DISC, 0, 3, 0, 0), &[]).await;
        assert!(matches!(k.conn.request_cycle().await, Ok(Next::Stop)));
        assert!(!k.destination.as_ref().unwrap().completed.is_cancelled());
        assert_eq!(
            read_marker_state(&crate::store::files::Disk, &k.path).unwrap(),
            Some(MarkerState::Receiving)
        );
    }

    #[tokio::test]
    async fn a_bad_magic_is_answered_and_completes_nothing() {
        let mut k = kit(64 * 1024, true);
        let mut req = Request::new(cmd::DISC, 0, 4, 0, 0);
        req.magic = REQUEST_MAGIC ^ 1;
        k.send(req, &[]).await;
        assert!(matches!(
            k.conn.request_cycle().await,
            Err(ConnError::BadMagic(_))
        ));
        assert_eq!(k.reply().await.error, errno::EBADMSG);
        assert!(!k.destination.as_ref().unwrap().completed.is_cancelled());
        assert!(marker_path(&k.path).exists());
    }

    #[tokio::test]
    async fn entrust_is_unknown_outside_listen() {
        let mut k = kit(64 * 1024, false);
        k.send(Request::new(cmd::ENTRUST, 0, 2, 0, 0), &[]).await;
        k.conn.request_cycle().await.unwrap();
        assert_eq!(k.reply().await.error, errno::EINVAL);
    }

    const A: u64 = 0x0123_4567_89ab_cdef;
    const B: u64 = 0xfedc_ba98_7654_3210;

    /// Asks the resume query for `migration`; returns the checkpoint
    /// answered, after checking the reply's header.
    async fn ask<P: Probe>(k: &mut crate::server::testkit::Kit<P>, migration: u64) -> u64 {
        k.send(Request::new(cmd::RESUME, 0, 50, migration, 8), &[])
            .await;
        k.conn.request_cycle().await.unwrap();
        let reply = k.reply().await;
        assert_eq!((reply.error, reply.handle), (0, 50));
        u64::from_be_bytes(k.bytes(8).await.try_into().unwrap())
    }

    async fn checkpoint<P: Probe>(
        k: &mut crate::server::testkit::Kit<P>,
        migration: u64,
        n: u32,
    ) -> u32 {
        k.send(Request::new(cmd::CHECKPOINT, 0, 60, migration, n), &[])
            .await;
        k.conn.request_cycle().await.unwrap();
        let reply = k.reply().await;
        assert_eq!(reply.handle, 60);
        reply.error
    }

    async fn write<P: Probe>(k: &mut crate::server::testkit::Kit<P>, byte: u8) {
        k.send(Request::new(cmd::WRITE, 0, 70, 0, 512), &[byte; 512])
            .await;
        k.conn.request_cycle().await.unwrap();
        assert_eq!(k.reply().await.error, 0);
    }

    fn resume_part(path: &std::path::Path) -> Option<(u64, u64)> {
        crate::handoff::read_marker(&crate::store::files::Disk, path)
            .unwrap()
            .expect("a marker")
            .resume()
    }

    #[tokio::test]
    async fn writes_behind_a_checkpoint_are_stored_and_answered_while_it_syncs() {
        use crate::probe::PlanProbe;
        // The checkpoint's sync takes a second; the write sent right behind
        // it is stored and answered meanwhile, and the checkpoint still
        // holds.
        let probe = Arc::new(PlanProbe::new(
            FaultPlan::parse("store.sync#1=slow(1000); store.sync#2=slow(300)").unwrap(),
        ));
        let stack = crate::fault_apply::storage_stack(&probe);
        let mut k = kit_stacked(1 << 20, true, probe.clone(), stack);
        write(&mut k, 1).await;
        let asked = std::time::Instant::now();
        k.send(Request::new(cmd::CHECKPOINT, 0, 60, A, 1), &[])
            .await;
        k.send(Request::new(cmd::WRITE, 0, 71, 4096, 512), &[2; 512])
            .await;
        k.conn.request_cycle().await.unwrap();
        k.conn.request_cycle().await.unwrap();
        let first = k.reply().await;
        assert_eq!((first.handle, first.error), (71, 0), "the write first");
        let second = k.reply().await;
        assert_eq!((second.handle, second.error), (60, 0));
        assert!(
            asked.elapsed() >= std::time::Duration::from_millis(900),
            "the sync's delay fired: answered after {:?}",
            asked.elapsed()
        );
        assert_eq!(resume_part(&k.path), Some((A, 1)));
        assert_eq!(k.contents()[4096..4096 + 512], [2; 512]);
        // RESUME waits for a checkpoint still syncing: asked at once after
        // one, it names it.
        k.send(Request::new(cmd::CHECKPOINT, 0, 61, A, 2), &[])
            .await;
        k.send(Request::new(cmd::RESUME, 0, 50, A, 8), &[]).await;
        k.conn.request_cycle().await.unwrap();
        k.conn.request_cycle().await.unwrap();
        let checkpointed = k.reply().await;
        assert_eq!((checkpointed.handle, checkpointed.error), (61, 0));
        let resumed = k.reply().await;
        assert_eq!((resumed.handle, resumed.error), (50, 0));
        assert_eq!(k.bytes(8).await, 2u64.to_be_bytes());
    }

    #[tokio::test]
    async fn resume_answers_0_then_the_checkpoint_in_8_big_endian_bytes() {
        let mut k = kit(64 * 1024, true);
        assert_eq!(ask(&mut k, A).await, 0, "nothing held yet");
        write(&mut k, 1).await;
        assert_eq!(checkpoint(&mut k, A, 0x0102_0304).await, 0);
        assert_eq!(resume_part(&k.path), Some((A, 0x0102_0304)));
        let text = marker_text(&k.path);
        assert!(
            text.contains("migration=0123456789abcdef\ncheckpoint=16909060\n"),
            "{text}"
        );
        k.send(Request::new(cmd::RESUME, 0, 51, A, 8), &[]).await;
        k.conn.request_cycle().await.unwrap();
        let reply = k.reply().await;
        assert_eq!((reply.error, reply.handle), (0, 51));
        assert_eq!(k.bytes(8).await, vec![0, 0, 0, 0, 1, 2, 3, 4]);
        assert_eq!(ask(&mut k, B).await, 0, "another migration");
    }

    #[tokio::test]
    async fn resume_asked_with_16_bytes_also_says_whether_the_image_holds_data() {
        let mut k = kit(64 * 1024, true);
        let ask16 = async |k: &mut crate::server::testkit::Kit, handle: u64| {
            k.send(Request::new(cmd::RESUME, 0, handle, A, 16), &[])
                .await;
            k.conn.request_cycle().await.unwrap();
            let reply = k.reply().await;
            assert_eq!((reply.error, reply.handle), (0, handle));
            k.bytes(16).await
        };
        // A fresh image: all holes.
        let mut fresh = vec![0; 16];
        fresh[15] = 1;
        assert_eq!(ask16(&mut k, 60).await, fresh);
        // Once a write landed, it holds data.
        write(&mut k, 1).await;
        assert_eq!(ask16(&mut k, 61).await, vec![0; 16]);
        // Any other length but 8 or 16 is refused, without a payload.
        k.send(Request::new(cmd::RESUME, 0, 62, A, 12), &[]).await;
        k.conn.request_cycle().await.unwrap();
        let reply = k.reply().await;
        assert_eq!((reply.error, reply.handle), (errno::EINVAL, 62));
    }

    #[tokio::test]
    async fn a_checkpoint_is_answered_on_a_new_connection_and_kept_by_its_resumed_writes() {
        let mut k = kit(64 * 1024, true);
        write(&mut k, 1).await;
        assert_eq!(checkpoint(&mut k, A, 3).await, 0);
        k.reconnect("127.0.0.1:4001");
        assert_eq!(ask(&mut k, A).await, 3);
        write(&mut k, 2).await;
        let text = marker_text(&k.path);
        assert!(
            text.starts_with("state=receiving\nsource=127.0.0.1:4001\n"),
            "the write's rewrite: {text}"
        );
        assert_eq!(resume_part(&k.path), Some((A, 3)));
        k.reconnect("127.0.0.1:4002");
        assert_eq!(ask(&mut k, A).await, 3);
    }

    #[tokio::test]
    async fn another_migrations_first_write_drops_the_checkpoint_durably() {
        for asked in [Some(B), None] {
            let mut k = kit(64 * 1024, true);
            write(&mut k, 1).await;
            assert_eq!(checkpoint(&mut k, A, 3).await, 0);
            k.reconnect("127.0.0.1:4001");
            if let Some(migration) = asked {
                assert_eq!(ask(&mut k, migration).await, 0);
            }
            write(&mut k, 2).await;
            assert_eq!(resume_part(&k.path), None, "asked {asked:?}");
            assert!(!marker_text(&k.path).contains("migration="));
            k.reconnect("127.0.0.1:4002");
            assert_eq!(ask(&mut k, A).await, 0, "asked {asked:?}");
        }
    }

    #[tokio::test]
    async fn a_resume_query_of_another_length_is_einval_without_a_payload() {
        let mut k = kit(64 * 1024, true);
        k.send(Request::new(cmd::RESUME, 0, 7, A, 4), &[]).await;
        k.send(Request::new(cmd::FLUSH, 0, 8, 0, 0), &[]).await;
        k.conn.request_cycle().await.unwrap();
        k.conn.request_cycle().await.unwrap();
        let reply = k.reply().await;
        assert_eq!((reply.error, reply.handle), (errno::EINVAL, 7));
        // The next bytes are the FLUSH's reply, not a payload.
        let reply = k.reply().await;
        assert_eq!((reply.error, reply.handle), (0, 8));
    }

    #[tokio::test]
    async fn a_checkpoint_numbered_0_or_of_migration_0_is_einval_and_marks_nothing() {
        let mut k = kit(64 * 1024, true);
        let before = marker_text(&k.path);
        assert_eq!(checkpoint(&mut k, A, 0).await, errno::EINVAL);
        assert_eq!(checkpoint(&mut k, 0, 1).await, errno::EINVAL);
        assert_eq!(marker_text(&k.path), before);
        assert_eq!(ask(&mut k, A).await, 0);
    }

    #[tokio::test]
    async fn resume_and_checkpoint_are_unknown_outside_listen() {
        let mut k = kit(64 * 1024, false);
        // An id beyond the export is out of range there, as in the C
        // flexnbd; one within it is an unknown command.
        k.send(Request::new(cmd::RESUME, 0, 1, A, 8), &[]).await;
        k.send(Request::new(cmd::RESUME, 0, 2, 0, 8), &[]).await;
        k.send(Request::new(cmd::CHECKPOINT, 0, 3, 0, 1), &[]).await;
        k.send(Request::new(cmd::FLUSH, 0, 4, 0, 0), &[]).await;
        for _ in 0..4 {
            k.conn.request_cycle().await.unwrap();
        }
        let replies: Vec<(u32, u64)> = [
            k.reply().await,
            k.reply().await,
            k.reply().await,
            k.reply().await,
        ]
        .iter()
        .map(|r| (r.error, r.handle))
        .collect();
        assert_eq!(
            replies,
            vec![
                (errno::ENOSPC, 1),
                (errno::EINVAL, 2),
                (errno::EINVAL, 3),
                (0, 4)
            ]
        );
    }

    /// Records every step's key, and answers what the fault plan `plan`
    /// says there.
    struct Recording {
        keys: std::sync::Mutex<Vec<String>>,
        plan: crate::probe::PlanProbe,
    }

    impl Probe for Recording {
        fn step(&self, step: Step) -> crate::probe::Action {
            self.keys.lock().unwrap().push(step.key());
            self.plan.step(step)
        }
    }

    fn recording(plan: &str) -> Arc<Recording> {
        Arc::new(Recording {
            keys: Default::default(),
            plan: crate::probe::PlanProbe::new(faults::FaultPlan::parse(plan).unwrap()),
        })
    }

    #[tokio::test]
    async fn resume_and_checkpoint_pass_their_own_fault_steps() {
        use crate::server::testkit::kit_with;
        let probe = recording("");
        let mut k = kit_with(64 * 1024, true, probe.clone());
        ask(&mut k, A).await;
        checkpoint(&mut k, A, 1).await;
        let keys = probe.keys.lock().unwrap().clone();
        assert_eq!(
            keys,
            vec![
                "server.request_received.resume",
                "server.reply_send.resume",
                "server.request_received.checkpoint",
                "server.reply_send.checkpoint",
            ]
        );
        for key in &keys {
            let (side, step) = key.split_once('.').unwrap();
            assert!(faults::plan::is_known_step(side, step), "{key}");
        }
        // A dropped CHECKPOINT is not acted on: no reply, nothing held.
        let probe = recording("server.request_received.checkpoint=drop");
        let mut k = kit_with(64 * 1024, true, probe);
        k.send(Request::new(cmd::CHECKPOINT, 0, 60, A, 1), &[])
            .await;
        k.send(Request::new(cmd::FLUSH, 0, 61, 0, 0), &[]).await;
        k.conn.request_cycle().await.unwrap();
        k.conn.request_cycle().await.unwrap();
        assert_eq!(k.reply().await.handle, 61);
        assert_eq!(resume_part(&k.path), None);
        // A RESUME reply truncated by a fault ends the connection after
        // the bytes it let through.
        let probe = recording("server.reply_send.resume=truncate(4)");
        let mut k = kit_with(64 * 1024, true, probe);
        k.send(Request::new(cmd::RESUME, 0, 50, A, 8), &[]).await;
        assert!(matches!(
            k.conn.request_cycle().await,
            Err(ConnError::FaultClosed(_))
        ));
        drop(k.conn);
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut k.client, &mut rest)
            .await
            .unwrap();
        assert_eq!(rest.len(), 4, "{rest:?}");
    }

    #[tokio::test]
    async fn a_new_connection_after_entrust_marks_receiving_again() {
        let mut k = kit(64 * 1024, true);
        k.send(Request::new(cmd::ENTRUST, 0, 2, 0, 0), &[]).await;
        k.conn.request_cycle().await.unwrap();
        assert_eq!(k.reply().await.error, 0);
        assert_eq!(
            read_marker_state(&crate::store::files::Disk, &k.path).unwrap(),
            Some(MarkerState::Entrusted)
        );
        // The connection ends (EOF after entrust): nothing changes.
        let destination = k.destination.clone().unwrap();
        drop(k.conn);
        assert_eq!(
            read_marker_state(&crate::store::files::Disk, &k.path).unwrap(),
            Some(MarkerState::Entrusted)
        );
        let image = k.image.clone();
        let session = Session::open(destination, "127.0.0.1:4001".into());
        let effects = session
            .feed(
                &image,
                Event::Change {
                    conn: session.conn,
                    bytes: 1,
                },
            )
            .await
            .unwrap();
        assert_eq!(effects, vec![Effect::Apply { conn: session.conn }]);
        let text = marker_text(&k.path);
        assert!(
            text.starts_with("state=receiving\nsource=127.0.0.1:4001\n"),
            "{text}"
        );
    }
}
