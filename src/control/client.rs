//! The command-line side of the control socket.

use std::io::{self, BufRead, BufReader, Read, Write};
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

/// An open control connection whose request has been sent.
pub struct Conversation {
    reader: BufReader<UnixStream>,
    path: String,
}

impl Conversation {
    /// Connects and sends one request (command and argument lines).
    pub fn start(
        path: &Path,
        lines: &[String],
        timeout: Duration,
    ) -> Result<Conversation, ClientError> {
        let shown = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: shown.clone(),
            source,
        })?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(|source| ClientError::Io {
                path: shown.clone(),
                source,
            })?;
        let mut text = String::new();
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        text.push('\n');
        (&stream)
            .write_all(text.as_bytes())
            .map_err(|source| ClientError::Io {
                path: shown.clone(),
                source,
            })?;
        Ok(Conversation {
            reader: BufReader::new(stream),
            path: shown,
        })
    }

    /// Reads the next response line, waiting at most `timeout`.
    pub fn response(&mut self, timeout: Duration) -> Result<Response, ClientError> {
        let path = self.path.clone();
        let io_err = |source: io::Error| {
            if matches!(
                source.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                ClientError::Timeout {
                    path: path.clone(),
                    secs: timeout.as_secs(),
                }
            } else {
                ClientError::Io {
                    path: path.clone(),
                    source,
                }
            }
        };
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(io_err)?;
        let mut line = String::new();
        (&mut self.reader)
            .take(MAX_RESPONSE as u64)
            .read_line(&mut line)
            .map_err(io_err)?;
        Response::parse(&line).ok_or(ClientError::BadResponse {
            path: self.path.clone(),
            seen: line,
        })
    }
}

/// Sends one request (command and argument lines) and returns the response.
pub fn request(path: &Path, lines: &[String], timeout: Duration) -> Result<Response, ClientError> {
    Conversation::start(path, lines, timeout)?.response(timeout)
}
