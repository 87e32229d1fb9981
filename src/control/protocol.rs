//! The control socket's line protocol: requests are LF-terminated lines
//! ending at an empty line or EOF (the first line is the command); the
//! response is one line `<code>: <text>\n`. Every response string is the C
//! flexnbd's.

use std::net::{IpAddr, SocketAddr};

use crate::acl::parse_ip;

/// Longest request line (the C limit).
pub const MAX_LINE: usize = 256;
/// Most lines in one request (a long ACL is the largest legitimate one).
pub const MAX_LINES: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Status,
    Acl(Vec<String>),
    Mirror(Vec<String>),
    MirrorMaxBps(Vec<String>),
    Break,
    /// Ours: answers when the running mirror ends, with its outcome.
    MirrorWait,
    /// Ours: `mirror` (same arguments) answered twice on one connection:
    /// the start line at once, then the outcome line at the end.
    MirrorFollow(Vec<String>),
    /// Read the TLS credentials again (as SIGHUP does): flexnbd's own;
    /// the C flexnbd has no TLS.
    ReloadTls,
    /// The first line was empty.
    Missing,
    Unknown(String),
}

pub fn parse_request(lines: &[String]) -> Request {
    let Some(command) = lines.first() else {
        return Request::Missing;
    };
    let args = lines[1..].to_vec();
    match command.as_str() {
        "" => Request::Missing,
        "status" => Request::Status,
        "acl" => Request::Acl(args),
        "mirror" => Request::Mirror(args),
        "mirror_max_bps" => Request::MirrorMaxBps(args),
        "break" => Request::Break,
        "mirror_wait" => Request::MirrorWait,
        "mirror_follow" => Request::MirrorFollow(args),
        "reload_tls" => Request::ReloadTls,
        other => Request::Unknown(other.to_string()),
    }
}

/// One response line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub code: u8,
    pub text: String,
}

impl Response {
    pub fn ok(text: impl Into<String>) -> Response {
        Response {
            code: 0,
            text: text.into(),
        }
    }
    pub fn fail(text: impl Into<String>) -> Response {
        Response {
            code: 1,
            text: text.into(),
        }
    }
    pub fn missing_command() -> Response {
        Response {
            code: 9,
            text: "missing command".into(),
        }
    }
    pub fn unknown_command() -> Response {
        Response {
            code: 10,
            text: "unknown command".into(),
        }
    }
    /// The bytes sent: `<code>: <text>\n` and nothing after the newline.
    pub fn encode(&self) -> String {
        format!("{}: {}\n", self.code, self.text)
    }
    /// Parses a response line (the CLI side). `None` when it is not one.
    pub fn parse(line: &str) -> Option<Response> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let (code, text) = line.split_once(": ")?;
        Some(Response {
            code: code.parse().ok()?,
            text: text.to_string(),
        })
    }
}

/// What the source does once a migration has copied everything (the
/// source's state machine decides with it).
pub use crate::core::source::MirrorAction;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorArgs {
    pub target: SocketAddr,
    pub action: MirrorAction,
    pub bind: Option<IpAddr>,
    pub max_bps: Option<u64>,
    /// `tls-ca=PATH`, `tls-cert=PATH`, `tls-key=PATH`, `tls-hostname=NAME`
    /// lines after the positional ones (our extension; the C flexnbd has
    /// no TLS).
    pub tls: crate::tls::ClientFiles,
    /// A `verify` line (ours): compare by digest instead of copying.
    pub verify: bool,
}

/// Parses a bytes-per-second figure strictly: decimal digits only, and
/// garbage is an error rather than 0 (the C version used strtoull).
pub fn parse_bps(text: &str) -> Result<u64, &'static str> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("max_bps couldn't be parsed");
    }
    text.parse::<u64>().map_err(|_| "max_bps out of range")
}

/// Validates the arguments of `mirror`, answering with the C messages.
pub fn parse_mirror(all: &[String]) -> Result<MirrorArgs, &'static str> {
    let mut tls = crate::tls::ClientFiles::default();
    let mut verify = false;
    let mut args = Vec::with_capacity(all.len());
    for arg in all {
        if arg == "verify" {
            verify = true;
            continue;
        }
        let Some(setting) = arg.strip_prefix("tls-") else {
            args.push(arg.clone());
            continue;
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or("a TLS parameter to mirror must be tls-NAME=VALUE")?;
        if value.is_empty() {
            return Err("a TLS parameter to mirror has an empty value");
        }
        match name {
            "ca" => tls.ca = Some(value.into()),
            "cert" => tls.cert = Some(value.into()),
            "key" => tls.key = Some(value.into()),
            "hostname" => tls.hostname = Some(value.into()),
            _ => return Err("unrecognised TLS parameter to mirror (known: tls-ca, tls-cert, tls-key, tls-hostname)"),
        }
    }
    if args.len() < 2 {
        return Err("mirror takes at least two parameters");
    }
    if args.len() > 5 {
        return Err("unrecognised parameters to mirror");
    }
    let ip = parse_ip(&args[0]).map_err(|_| "bad IP address")?;
    let port = if !args[1].is_empty() && args[1].bytes().all(|b| b.is_ascii_digit()) {
        args[1].parse::<u16>().map_err(|_| "bad IP port number")?
    } else {
        return Err("bad IP port number");
    };
    let action = match args.get(2).map(String::as_str) {
        None | Some("exit") => MirrorAction::Exit,
        Some("unlink") => MirrorAction::Unlink,
        Some("nothing") => MirrorAction::Nothing,
        Some(_) => return Err("action must be 'exit' or 'nothing'"),
    };
    let bind = match args.get(3) {
        None => None,
        Some(b) => Some(parse_ip(b).map_err(|_| "bad bind address")?),
    };
    let max_bps = match args.get(4) {
        None => None,
        Some(m) => Some(parse_bps(m)?),
    };
    Ok(MirrorArgs {
        target: SocketAddr::new(ip, port),
        action,
        bind,
        max_bps,
        tls,
        verify,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn commands_are_recognised() {
        assert_eq!(parse_request(&v(&["status"])), Request::Status);
        assert_eq!(
            parse_request(&v(&["acl", "1.2.3.4"])),
            Request::Acl(v(&["1.2.3.4"]))
        );
        assert_eq!(parse_request(&v(&[""])), Request::Missing);
        assert_eq!(parse_request(&[]), Request::Missing);
        assert_eq!(
            parse_request(&v(&["Status"])),
            Request::Unknown("Status".into())
        );
    }

    #[test]
    fn responses_encode_and_parse() {
        assert_eq!(
            Response::unknown_command().encode(),
            "10: unknown command\n"
        );
        assert_eq!(
            Response::parse("0: Mirror started\n"),
            Some(Response::ok("Mirror started"))
        );
        assert_eq!(Response::parse("garbage"), None);
    }

    #[test]
    fn mirror_arguments_are_validated_with_the_c_messages() {
        assert_eq!(
            parse_mirror(&v(&["127.0.0.1"])),
            Err("mirror takes at least two parameters")
        );
        assert_eq!(parse_mirror(&v(&["x", "1"])), Err("bad IP address"));
        assert_eq!(
            parse_mirror(&v(&["127.0.0.1", "abc"])),
            Err("bad IP port number")
        );
        assert_eq!(
            parse_mirror(&v(&["127.0.0.1", "70000"])),
            Err("bad IP port number")
        );
        assert_eq!(
            parse_mirror(&v(&["127.0.0.1", ""])),
            Err("bad IP port number")
        );
        assert_eq!(
            parse_mirror(&v(&["127.0.0.1", "1", "later"])),
            Err("action must be 'exit' or 'nothing'")
        );
        assert_eq!(
            parse_mirror(&v(&["127.0.0.1", "1", "exit", "nope"])),
            Err("bad bind address")
        );
        assert_eq!(
            parse_mirror(&v(&["127.0.0.1", "1", "exit", "0", "12x"])),
            Err("max_bps couldn't be parsed")
        );
        assert_eq!(
            parse_mirror(&v(&["127.0.0.1", "1", "exit", "0", "99999999999999999999"])),
            Err("max_bps out of range")
        );
        assert_eq!(
            parse_mirror(&v(&["127.0.0.1", "1", "exit", "0", "5", "x"])),
            Err("unrecognised parameters to mirror")
        );
        let ok = parse_mirror(&v(&["::1", "10809", "unlink", "::1", "1000"])).unwrap();
        assert_eq!(ok.target, "[::1]:10809".parse().unwrap());
        assert_eq!((ok.action, ok.max_bps), (MirrorAction::Unlink, Some(1000)));
    }

    #[test]
    fn mirror_tls_lines_fill_the_client_files_and_do_not_count_as_positional() {
        let ok = parse_mirror(&v(&[
            "127.0.0.1",
            "10809",
            "exit",
            "0",
            "1000",
            "tls-ca=/pki/ca.pem",
            "tls-cert=/pki/client cert.pem",
            "tls-key=/pki/client-key.pem",
            "tls-hostname=dest.example",
        ]))
        .unwrap();
        assert_eq!(ok.max_bps, Some(1000));
        assert_eq!(
            ok.tls,
            crate::tls::ClientFiles {
                ca: Some("/pki/ca.pem".into()),
                cert: Some("/pki/client cert.pem".into()),
                key: Some("/pki/client-key.pem".into()),
                hostname: Some("dest.example".into()),
            }
        );
        // Only what is given is set; a value may itself hold '='.
        let ca_only = parse_mirror(&v(&["127.0.0.1", "1", "tls-ca=/a=b.pem"])).unwrap();
        assert_eq!(
            ca_only.tls,
            crate::tls::ClientFiles {
                ca: Some("/a=b.pem".into()),
                ..Default::default()
            }
        );
        assert_eq!(ca_only.action, MirrorAction::Exit);
        let plain = parse_mirror(&v(&["127.0.0.1", "1"])).unwrap();
        assert!(!plain.tls.any(), "no tls- line means no TLS: {plain:?}");
    }

    #[test]
    fn a_verify_line_asks_for_comparing_and_is_not_positional() {
        let with = parse_mirror(&v(&["127.0.0.1", "1", "verify", "unlink"])).unwrap();
        assert!(with.verify);
        assert_eq!(with.action, MirrorAction::Unlink);
        assert!(!parse_mirror(&v(&["127.0.0.1", "1"])).unwrap().verify);
    }

    #[test]
    fn bad_mirror_tls_lines_are_refused_with_what_was_expected() {
        assert_eq!(
            parse_mirror(&v(&["127.0.0.1", "1", "tls-ca"])),
            Err("a TLS parameter to mirror must be tls-NAME=VALUE")
        );
        assert_eq!(
            parse_mirror(&v(&["127.0.0.1", "1", "tls-key="])),
            Err("a TLS parameter to mirror has an empty value")
        );
        assert_eq!(
            parse_mirror(&v(&["127.0.0.1", "1", "tls-crl=/x"])),
            Err("unrecognised TLS parameter to mirror (known: tls-ca, tls-cert, tls-key, tls-hostname)")
        );
        // TLS lines cannot stand in for the two positional parameters.
        assert_eq!(
            parse_mirror(&v(&["127.0.0.1", "tls-ca=/ca.pem"])),
            Err("mirror takes at least two parameters")
        );
    }
}
