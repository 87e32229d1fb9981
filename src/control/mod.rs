//! The control socket: a UNIX socket that operators and the `status`,
//! `acl`, `mirror`, `mirror-speed` and `break` commands talk to.
//!
//! Every connection is handled on its own task, so a slow `mirror` start or
//! a client that connects and sends nothing never holds up `status` or
//! shutdown (the C version served them one at a time and could deadlock).
//! Every read is bounded by a time limit and a line-length limit.

pub mod client;
pub mod protocol;

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fault_apply::{self, Incoming};
use crate::{debug, info, warn};
use protocol::{parse_request, Request, Response, MAX_LINE, MAX_LINES};

/// A request must arrive whole within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// At shutdown, control connections still running get this long to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the control socket can ask of a server.
pub trait Controlled: Send + Sync + 'static {
    fn status_line(&self) -> String;
    /// Replaces the ACL; on a bad entry, returns it and changes nothing.
    fn set_acl(&self, entries: &[String]) -> Result<(), String>;
    fn mirror(&self, args: Vec<String>) -> impl Future<Output = Response> + Send;
    /// Starts a mirror like `mirror`, then waits for its outcome: the first
    /// response is sent at once, the second (if the start succeeded) at the
    /// end. `first` receives the start response.
    fn mirror_follow(
        &self,
        args: Vec<String>,
        stop: CancellationToken,
        first: tokio::sync::oneshot::Sender<Response>,
    ) -> impl Future<Output = Option<Response>> + Send;
    fn mirror_max_bps(&self, args: Vec<String>) -> impl Future<Output = Response> + Send;
    fn break_mirror(&self) -> impl Future<Output = Response> + Send;
    /// Waits for the running mirror to end (or the hand-off to begin,
    /// which closes this socket) and answers with the outcome. `stop` is
    /// cancelled when the control socket closes.
    fn wait_mirror(&self, stop: CancellationToken) -> impl Future<Output = Response> + Send;
    /// Reads the TLS certificate, key and CA again; on failure keeps the
    /// ones in use, and says why.
    fn reload_tls(&self) -> impl Future<Output = Response> + Send;
    /// The fault plan's verdict for a command (`control.<command>` keys).
    fn control_step(&self, _command: &'static str) -> crate::probe::Action {
        crate::probe::Action::Pass
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("control socket {0} is in use by a running server; refusing to start")]
    InUse(PathBuf),
    #[error("control socket path {0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot create control socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
}

/// Checks a control socket path before anything else starts: a live server
/// there is an error; a stale socket may be replaced.
pub fn check_path(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Err(_) => return Ok(()),
        Ok(m) => m,
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_owned()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse(path.to_owned())),
        Err(_) => Ok(()),
    }
}

/// Creates the control socket with mode 0600, replacing a stale one.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    check_path(path)?;
    if std::fs::symlink_metadata(path).is_ok() {
        warn!(
            "replacing stale control socket {} (nobody answered there)",
            path.display()
        );
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| SocketError::Bind {
        path: path.to_owned(),
        source,
    };
    // Create it private from the start: no window where others may connect.
    // std has no way to set the file creation mask; rustix does.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let result = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = result.map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Serves control connections until `stop` is cancelled, then stops
/// accepting, lets connections in progress finish (bounded), and removes
/// the socket file.
pub async fn serve<C: Controlled>(
    listener: UnixListener,
    path: PathBuf,
    target: Arc<C>,
    stop: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let target = target.clone();
                let stop = stop.clone();
                tracker.spawn(async move {
                    if let Err(e) = handle(stream, &*target, &stop).await {
                        debug!("control connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            "control connections still running after {} s; leaving them",
            DRAIN_TIMEOUT.as_secs()
        );
    }
    info!("control socket {} closed", path.display());
}

#[derive(Debug, thiserror::Error)]
enum HandleError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("no complete request within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    #[error("shutting down before a complete request arrived")]
    ShuttingDown,
}

/// Reads the request lines: up to an empty line or EOF.
pub async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> io::Result<Result<Vec<String>, Response>> {
    let mut lines = Vec::new();
    let mut line = Vec::with_capacity(MAX_LINE + 1);
    loop {
        line.clear();
        // Read at most one byte past the limit so an overlong line is caught
        // without buffering it.
        let n = (&mut *reader)
            .take((MAX_LINE + 1) as u64)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(Ok(lines)); // EOF ends the request
        }
        let ended = line.last() == Some(&b'\n');
        if ended {
            line.pop();
        }
        if line.len() > MAX_LINE || (!ended && n > MAX_LINE) {
            return Ok(Err(Response::fail(format!(
                "request line longer than {MAX_LINE} bytes"
            ))));
        }
        if line.is_empty() && ended {
            return Ok(Ok(lines)); // a blank line ends the request
        }
        if lines.len() >= MAX_LINES {
            return Ok(Err(Response::fail(format!(
                "request has more than {MAX_LINES} lines"
            ))));
        }
        lines.push(String::from_utf8_lossy(&line).into_owned());
        if !ended {
            return Ok(Ok(lines)); // EOF in the middle of the last line
        }
    }
}

async fn handle<C: Controlled>(
    stream: UnixStream,
    target: &C,
    stop: &CancellationToken,
) -> Result<(), HandleError> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    // A connection still waiting for its request is closed at shutdown:
    // only requests already received are waited for.
    let request = tokio::select! {
        biased;
        r = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut reader)) => match r {
            Err(_) => return Err(HandleError::Timeout),
            Ok(r) => r?,
        },
        _ = stop.cancelled() => return Err(HandleError::ShuttingDown),
    };
    let response = match request {
        Err(refusal) => refusal,
        Ok(lines) => {
            let request = parse_request(&lines);
            debug!("control request {request:?}");
            let command = match &request {
                Request::Status => Some("status"),
                Request::Acl(_) => Some("acl"),
                Request::Mirror(_) => Some("mirror"),
                Request::MirrorMaxBps(_) => Some("mirror_speed"),
                Request::Break => Some("break"),
                Request::MirrorWait => Some("mirror_wait"),
                Request::MirrorFollow(_) => Some("mirror"),
                // No fault step of its own: rotation is tested with real
                // files, good and bad.
                Request::ReloadTls | Request::Missing | Request::Unknown(_) => None,
            };
            if let Some(command) = command {
                // Hung: no answer until the request timeout (or shutdown)
                // ends the connection.
                let hang = async {
                    tokio::select! {
                        _ = tokio::time::sleep(REQUEST_TIMEOUT) => {}
                        _ = stop.cancelled() => {}
                    }
                };
                let key = || format!("control.{command}");
                match fault_apply::incoming(target.control_step(command), key, hang).await {
                    Ok(Incoming::Proceed) => {}
                    Ok(Incoming::Ignore) => {
                        // As if the request never came: read on for one
                        // until the client closes, the request timeout or
                        // shutdown; then close without an answer.
                        let mut sink = tokio::io::sink();
                        let rest = tokio::io::copy(&mut reader, &mut sink);
                        tokio::select! {
                            _ = tokio::time::timeout(REQUEST_TIMEOUT, rest) => {}
                            _ = stop.cancelled() => {}
                        }
                        debug!("control request {command} ignored (fault injection)");
                        return Ok(());
                    }
                    // Closed without an answer (a damaged request is
                    // rejected the same way).
                    Err(ended) => {
                        debug!("control request {command}: {ended}");
                        return Ok(());
                    }
                }
            }
            match request {
                Request::Status => Response::ok(target.status_line()),
                Request::Acl(entries) => match target.set_acl(&entries) {
                    Ok(()) => Response::ok("updated"),
                    Err(bad) => Response::fail(format!("bad spec: {bad}")),
                },
                Request::Mirror(args) => target.mirror(args).await,
                Request::MirrorMaxBps(args) => target.mirror_max_bps(args).await,
                Request::Break => target.break_mirror().await,
                Request::ReloadTls => target.reload_tls().await,
                Request::MirrorWait => target.wait_mirror(stop.clone()).await,
                Request::MirrorFollow(args) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let follow = target.mirror_follow(args, stop.clone(), tx);
                    tokio::pin!(follow);
                    // Send the start line as soon as it is known, while the
                    // follow goes on.
                    let mut rx = Some(rx);
                    let outcome = loop {
                        tokio::select! {
                            outcome = &mut follow => break outcome,
                            first = async { rx.as_mut().expect("polled once").await }, if rx.is_some() => {
                                rx = None;
                                if let Ok(first) = first {
                                    write.write_all(first.encode().as_bytes()).await?;
                                }
                            }
                        }
                    };
                    if let Some(mut rx) = rx {
                        if let Ok(first) = rx.try_recv() {
                            write.write_all(first.encode().as_bytes()).await?;
                        }
                    }
                    match outcome {
                        Some(outcome) => outcome,
                        None => {
                            write.shutdown().await?;
                            return Ok(());
                        }
                    }
                }
                Request::Missing => Response::missing_command(),
                Request::Unknown(command) => {
                    info!("control: unknown command {command:?}");
                    Response::unknown_command()
                }
            }
        }
    };
    write.write_all(response.encode().as_bytes()).await?;
    write.shutdown().await?;
    Ok(())
}
