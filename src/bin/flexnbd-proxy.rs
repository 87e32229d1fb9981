//! The `flexnbd-proxy` command: argument parsing and wiring only (the proxy
//! itself is `flexnbd::proxy`). Exit codes: 0 on SIGTERM, SIGINT or SIGQUIT;
//! 1 on a usage error, on TLS files that cannot be used, or when the first
//! upstream connection fails.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

use flexnbd::acl::parse_ip;
use flexnbd::log::{self, Level};
use flexnbd::probe::PlanProbe;
use flexnbd::proxy::{self, cache::DEFAULT_CACHE_SIZE, Listen, Options};
use flexnbd::tls::{ClientFiles, Policy, ServerFiles, TlsError};
use flexnbd::transport::Tcp;
use flexnbd::{fatal, warn};

const ABOUT: &str = "flexnbd-proxy serves one NBD client at a time and forwards its requests \
to an upstream NBD server, reconnecting and replaying the request in flight whenever the \
upstream goes away (for example while it migrates).";

#[derive(Parser)]
#[command(name = "flexnbd-proxy", version, about = ABOUT)]
struct Cli {
    /// Address to listen on: an IPv4 or IPv6 literal, [IPv6], 0 for any IPv4
    /// address, or a path starting with / for a UNIX socket (removed at exit).
    #[arg(short = 'l', long)]
    addr: String,
    /// TCP port to listen on (0 picks a free port; -v logs which); not used
    /// with a UNIX socket.
    #[arg(short = 'p', long)]
    port: Option<String>,
    /// Address of the upstream NBD server (an IP address).
    #[arg(short = 'C', long)]
    conn_addr: String,
    /// Port of the upstream NBD server.
    #[arg(short = 'P', long)]
    conn_port: String,
    /// Local address to connect to the upstream server from.
    #[arg(short = 'b', long)]
    bind: Option<String>,
    /// Read-ahead cache: READs of up to BYTES (default 4096) fetch twice as
    /// much and serve the second half from memory; 0 or a negative number
    /// disables it.
    #[arg(
        long,
        value_name = "BYTES",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "4096",
        allow_negative_numbers = true
    )]
    cache: Option<i64>,
    /// A fault plan (`proxy.*` keys, see fixtures/faults/README.md);
    /// FLEXNBD_FAULTS is used when this is not given.
    #[arg(long, value_name = "PLAN")]
    faults: Option<String>,
    /// Certificate chain (PEM) the proxy presents to its client; turns on
    /// STARTTLS downstream, which needs the fixed newstyle greeting, so the
    /// proxy then greets with it instead of oldstyle.
    #[arg(long, value_name = "FILE", help_heading = "Downstream TLS")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, value_name = "FILE", help_heading = "Downstream TLS")]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that sign the client's certificate; used with
    /// --tls-verify-peer.
    #[arg(long, value_name = "FILE", help_heading = "Downstream TLS")]
    tls_ca: Option<PathBuf>,
    /// Require the client to present a certificate signed by --tls-ca.
    #[arg(long, help_heading = "Downstream TLS")]
    tls_verify_peer: bool,
    /// Whether a plaintext client is refused (default: required when a
    /// certificate is given).
    #[arg(
        long,
        value_enum,
        value_name = "POLICY",
        help_heading = "Downstream TLS"
    )]
    tls: Option<PolicyArg>,
    /// CA certificates (PEM) that sign the upstream server's certificate;
    /// turns on TLS (STARTTLS) on every upstream connection, reconnections
    /// included. The upstream must speak fixed newstyle: nothing is sent in
    /// plaintext if it cannot start TLS.
    #[arg(long, value_name = "FILE", help_heading = "Upstream TLS")]
    upstream_tls_ca: Option<PathBuf>,
    /// The proxy's own certificate (PEM), for an upstream that verifies its
    /// clients.
    #[arg(long, value_name = "FILE", help_heading = "Upstream TLS")]
    upstream_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --upstream-tls-cert.
    #[arg(long, value_name = "FILE", help_heading = "Upstream TLS")]
    upstream_tls_key: Option<PathBuf>,
    /// The name the upstream's certificate must carry (default: the
    /// --conn-addr address).
    #[arg(long, value_name = "NAME", help_heading = "Upstream TLS")]
    upstream_tls_hostname: Option<String>,
    /// Log more (info messages); the last of -v and -q wins.
    #[arg(short = 'v', long, overrides_with = "quiet")]
    verbose: bool,
    /// Log only fatal errors; the last of -v and -q wins.
    #[arg(short = 'q', long, overrides_with = "verbose")]
    quiet: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PolicyArg {
    /// Every option but STARTTLS and ABORT is refused with
    /// NBD_REP_ERR_TLS_REQD until TLS is up.
    Required,
    /// STARTTLS is offered; a plaintext client is served too.
    Optional,
}

/// Why the options cannot be used: a usage error (exit 1 with the usage
/// line), or files that cannot be loaded (exit 1, logged).
enum Refusal {
    Usage(String),
    Files(String),
}

impl From<String> for Refusal {
    fn from(message: String) -> Refusal {
        Refusal::Usage(message)
    }
}

impl From<&str> for Refusal {
    fn from(message: &str) -> Refusal {
        Refusal::Usage(message.into())
    }
}

fn server_files(cli: &Cli) -> ServerFiles {
    ServerFiles {
        cert: cli.tls_cert.clone(),
        key: cli.tls_key.clone(),
        ca: cli.tls_ca.clone(),
        verify_peer: cli.tls_verify_peer,
        policy: cli.tls.map(|p| match p {
            PolicyArg::Required => Policy::Required,
            PolicyArg::Optional => Policy::Optional,
        }),
    }
}

fn client_files(cli: &Cli) -> Result<ClientFiles, String> {
    let files = ClientFiles {
        ca: cli.upstream_tls_ca.clone(),
        cert: cli.upstream_tls_cert.clone(),
        key: cli.upstream_tls_key.clone(),
        hostname: cli.upstream_tls_hostname.clone(),
    };
    // Checked here: the library's messages name `flexnbd read`'s flags.
    if files.any() && files.ca.is_none() {
        return Err(
            "upstream TLS needs --upstream-tls-ca: the CA that signed the upstream server's certificate"
                .into(),
        );
    }
    if files.cert.is_some() != files.key.is_some() {
        return Err(
            "a certificate for the upstream needs both --upstream-tls-cert and --upstream-tls-key"
                .into(),
        );
    }
    Ok(files)
}

fn tls_refusal(e: TlsError) -> Refusal {
    match e {
        TlsError::Usage(m) => Refusal::Usage(m),
        e @ TlsError::HostName(_) => Refusal::Usage(format!("--upstream-tls-hostname: {e}")),
        other => Refusal::Files(other.to_string()),
    }
}

fn parse_port(text: &str, what: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .map_err(|_| format!("bad {what} '{text}': expected a decimal number from 0 to 65535"))
}

fn parse_addr(text: &str, what: &str) -> Result<IpAddr, String> {
    parse_ip(text).map_err(|e| format!("bad {what}: {e}"))
}

fn options(cli: &Cli) -> Result<Options, Refusal> {
    let listen = if cli.addr.starts_with('/') {
        Listen::Unix(PathBuf::from(&cli.addr))
    } else {
        let Some(port) = &cli.port else {
            return Err("--port is required unless --addr is a UNIX socket path".into());
        };
        Listen::Tcp(SocketAddr::new(
            parse_addr(&cli.addr, "--addr")?,
            parse_port(port, "--port")?,
        ))
    };
    if cli.conn_addr.starts_with('/') {
        return Err("--conn-addr must be an IP address: UNIX upstreams are not supported".into());
    }
    let upstream = SocketAddr::new(
        parse_addr(&cli.conn_addr, "--conn-addr")?,
        parse_port(&cli.conn_port, "--conn-port")?,
    );
    if upstream.port() == 0 {
        return Err("--conn-port must not be 0".into());
    }
    let bind = match &cli.bind {
        Some(b) => Some(SocketAddr::new(parse_addr(b, "--bind")?, 0)),
        None => None,
    };
    let cache = match cli.cache {
        None => 0,
        Some(n) if n <= 0 => 0,
        Some(n) => u32::try_from(n)
            .map_err(|_| format!("--cache={n} is too large: at most {}", u32::MAX))?,
    };
    let upstream_timeout = proxy::upstream_timeout_from_env()?;
    // Loaded before the runtime starts: a proxy that listens must be able
    // to serve, and every reconnection reuses what was loaded here.
    let upstream_tls = client_files(cli)?
        .load(upstream.ip())
        .map_err(tls_refusal)?;
    let downstream_tls = server_files(cli).load().map_err(tls_refusal)?;
    let plan = match &cli.faults {
        Some(text) => faults::FaultPlan::parse(text),
        None => faults::FaultPlan::from_env(),
    }
    .map_err(|e| e.to_string())?;
    let faults = if plan.is_empty() {
        None
    } else {
        for warning in plan.warnings() {
            warn!("{warning}");
        }
        warn!("fault plan active (seed {}): {plan}", plan.seed());
        Some(PlanProbe::new(plan))
    };
    Ok(Options {
        listen,
        upstream,
        bind,
        cache,
        upstream_timeout,
        faults,
        upstream_tls,
        downstream_tls,
    })
}

fn usage_error(message: &str) -> ExitCode {
    use clap::CommandFactory;
    eprintln!("flexnbd-proxy: {message}");
    eprintln!("{}", Cli::command().render_usage());
    ExitCode::from(1)
}

fn main() -> ExitCode {
    // No write may kill the proxy with SIGPIPE (a log reader or a client
    // gone): std's runtime sets SIGPIPE to SIG_IGN before main runs, so such
    // a write fails with EPIPE instead (sockets are written with MSG_NOSIGNAL
    // anyway). The acceptance suite checks that the running proxy ignores it.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(1),
            };
        }
    };
    log::set_threshold(if cli.verbose {
        Level::Info
    } else if cli.quiet {
        Level::Fatal
    } else {
        Level::Warn
    });
    log::set_context(format!("{}:{}", cli.conn_addr, cli.conn_port));
    let options = match options(&cli) {
        Ok(o) => o,
        Err(Refusal::Usage(message)) => return usage_error(&message),
        Err(Refusal::Files(message)) => {
            fatal!("{message}");
            return ExitCode::from(1);
        }
    };
    // One client, one request in flight: one thread is plenty.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            fatal!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(proxy::run(Tcp, options));
    ExitCode::from(code)
}

// `--cache` without a value: clap needs the literal above.
const _: () = assert!(DEFAULT_CACHE_SIZE == 4096);
