//! The `flexnbd-proxy` command: argument parsing and wiring only (the proxy
//! itself is `flexnbd::proxy`). Exit codes: 0 on SIGTERM, SIGINT or SIGQUIT;
//! 1 on a usage error, or when the first upstream connection fails.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use flexnbd::acl::parse_ip;
use flexnbd::log::{self, Level};
use flexnbd::probe::PlanProbe;
use flexnbd::proxy::{self, cache::DEFAULT_CACHE_SIZE, Listen, Options};
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
    /// Log more (info messages); the last of -v and -q wins.
    #[arg(short = 'v', long, overrides_with = "quiet")]
    verbose: bool,
    /// Log only fatal errors; the last of -v and -q wins.
    #[arg(short = 'q', long, overrides_with = "verbose")]
    quiet: bool,
}

fn parse_port(text: &str, what: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .map_err(|_| format!("bad {what} '{text}': expected a decimal number from 0 to 65535"))
}

fn parse_addr(text: &str, what: &str) -> Result<IpAddr, String> {
    parse_ip(text).map_err(|e| format!("bad {what}: {e}"))
}

fn options(cli: &Cli) -> Result<Options, String> {
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
        upstream_tls: None,
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
        Err(message) => return usage_error(&message),
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
