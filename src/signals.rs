//! The signals that stop a long-running process (server, destination,
//! proxy): SIGINT, SIGTERM and SIGQUIT, received as events rather than
//! killing the process, so shutdown can follow its order. And SIGHUP, which
//! asks it to read its TLS credentials again ([`Hangup`]).

use tokio::signal::unix::{signal, Signal, SignalKind};

pub struct Signals {
    term: Signal,
    int: Signal,
    quit: Signal,
}

impl Signals {
    /// Install before anything listens, so a signal that arrives as soon as
    /// the port is ready is handled, never fatal.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    /// Waits for the next one and names it.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.quit.recv() => "SIGQUIT",
        }
    }
}

/// SIGHUP: read the TLS credentials again (certificate rotation). Installed
/// with the others, so that a SIGHUP never kills the process (its default
/// action), with or without TLS.
pub struct Hangup(Signal);

impl Hangup {
    pub fn install() -> std::io::Result<Hangup> {
        Ok(Hangup(signal(SignalKind::hangup())?))
    }

    /// Waits for the next SIGHUP.
    pub async fn recv(&mut self) {
        self.0.recv().await;
    }
}
