//! The command-line side of the control socket.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::protocol::Response;

/// Longest response line read (the C limit).
const MAX_RESPONSE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to control socket {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("control socket {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("control socket {path}: no response within {secs} s")]
    Timeout { path: String, secs: u64 },
    #[error("control socket {path}: expected a response line '<code>: <text>', got {seen:?}")]
    BadResponse { path: String, seen: String },
}

/// Sends one request (command and argument lines) and returns the response.
pub fn request(path: &Path, lines: &[String], timeout: Duration) -> Result<Response, ClientError> {
    let shown = path.display().to_string();
    let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: shown.clone(),
        source,
    })?;
    let io_err = |source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            ClientError::Timeout {
                path: shown.clone(),
                secs: timeout.as_secs(),
            }
        } else {
            ClientError::Io {
                path: shown.clone(),
                source,
            }
        }
    };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    text.push('\n');
    (&stream).write_all(text.as_bytes()).map_err(io_err)?;
    let mut reader = BufReader::new((&stream).take_limited(MAX_RESPONSE as u64));
    let mut line = String::new();
    reader.read_line(&mut line).map_err(io_err)?;
    Response::parse(&line).ok_or(ClientError::BadResponse {
        path: shown.clone(),
        seen: line,
    })
}

trait TakeLimited: io::Read + Sized {
    fn take_limited(self, n: u64) -> io::Take<Self> {
        self.take(n)
    }
}
impl<R: io::Read> TakeLimited for R {}
