//! The `flexnbd` command: argument parsing and wiring only. Exit codes are
//! decided here, in one place.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};

use flexnbd::acl::{parse_ip, Acl};
use flexnbd::daemon::{self, Role, ServeOptions};
use flexnbd::log::{self, Level};
use flexnbd::probe::{PlanProbe, Quiet};
use flexnbd::server::{Config, HandshakeMode};
use flexnbd::store::Image;
use flexnbd::transport::Tcp;
use flexnbd::{client, fatal, warn};

const ABOUT: &str = "flexnbd serves a raw image file over NBD and can live-migrate it to another \
flexnbd while clients keep working.";

#[derive(Parser)]
#[command(name = "flexnbd", version, about = ABOUT, disable_help_subcommand = true)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Serve an image file over NBD.
    Serve(ServeArgs),
    /// Receive a migration: serve one sender, exit 0 once it hands off.
    Listen(ServeArgs),
    /// Tell which copy of a migrated disk is canonical, and what to do.
    Resolve(ResolveArgs),
    /// Read bytes from an NBD server and write them to standard output.
    Read(TransferArgs),
    /// Write bytes from standard input to an NBD server.
    Write(TransferArgs),
    /// Print a running server's status line.
    Status(StatusArgs),
    /// Replace a running server's access control list.
    Acl(AclArgs),
    /// Start migrating a running server's image to a listening flexnbd.
    Mirror(MirrorArgs),
    /// Change the speed limit of a running migration.
    MirrorSpeed(MirrorSpeedArgs),
    /// Stop a running migration.
    Break(SockArgs),
    /// Make a running server read its TLS certificate, key and CA again, as
    /// SIGHUP does: new connections use them, existing ones keep theirs; a
    /// file that does not load leaves the old credentials in use.
    ReloadTls(SockArgs),
    /// Print the usage of flexnbd or of one mode.
    Help {
        /// The mode to explain.
        mode: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Handshake {
    /// The 152-byte greeting of the C flexnbd (no negotiation).
    Oldstyle,
    /// Fixed newstyle: export names, GO/INFO, structured replies, block status.
    Newstyle,
}

#[derive(Args)]
struct Verbosity {
    /// Log more (info messages); the last of -v and -q wins.
    #[arg(short = 'v', long, overrides_with = "quiet")]
    verbose: bool,
    /// Log only fatal errors; the last of -v and -q wins.
    #[arg(short = 'q', long, overrides_with = "verbose")]
    quiet: bool,
}

impl Verbosity {
    fn apply(&self) {
        log::set_threshold(if self.verbose {
            Level::Info
        } else if self.quiet {
            Level::Fatal
        } else {
            Level::Warn
        });
    }
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on: an IPv4 or IPv6 literal, [IPv6], or 0 for any IPv4 address.
    #[arg(short = 'l', long)]
    addr: Option<String>,
    /// TCP port to listen on (0 picks a free port; the log says which).
    #[arg(short = 'p', long)]
    port: Option<String>,
    /// The image file to serve. It must exist; it is never created or resized.
    #[arg(short = 'f', long)]
    file: Option<PathBuf>,
    /// Path of the control socket.
    #[arg(short = 's', long)]
    sock: Option<PathBuf>,
    /// With an empty access control list, refuse every client (instead of allowing all).
    #[arg(short = 'd', long)]
    default_deny: bool,
    /// Drop a client whose request takes longer than 120 seconds.
    #[arg(short = 'k', long)]
    killswitch: bool,
    /// Which greeting to send (default oldstyle, as the C flexnbd; newstyle
    /// when TLS is set up).
    #[arg(long, value_enum)]
    handshake: Option<Handshake>,
    /// Also advertise TRIM, WRITE_ZEROES, MULTI_CONN and CACHE in the
    /// oldstyle greeting (flags 1389 instead of the C flexnbd's 13). Without
    /// it the greeting is byte-identical to the C one. A migration source
    /// sends holes as WRITE_ZEROES only to a destination that advertises it.
    #[arg(long)]
    oldstyle_extra_flags: bool,
    /// Most clients served at once (default 16; listen takes exactly 1); more
    /// are closed without a greeting (at most 1000 a second; the log counts
    /// them once a second).
    #[arg(long)]
    max_clients: Option<usize>,
    /// A fault plan (see fixtures/faults/README.md), for reproducing failures;
    /// FLEXNBD_FAULTS is used when this is not given.
    #[arg(long, value_name = "PLAN")]
    faults: Option<String>,
    /// Seconds a newstyle client may take to finish negotiating before it is dropped.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    handshake_timeout: f64,
    /// listen only: receive even over an image whose completion record
    /// (FILE.COMPLETE) says a migration into it already completed; without
    /// it listen refuses to start there (exit 1). What the image holds is
    /// overwritten by the new migration.
    #[arg(long)]
    overwrite_complete: bool,
    #[command(flatten)]
    tls: ServerTlsArgs,
    #[command(flatten)]
    verbosity: Verbosity,
    /// Access control list: clients allowed to connect, as IP or IP/bits.
    #[arg(value_name = "ACL_ENTRY")]
    acl: Vec<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TlsPolicyArg {
    /// Every option but STARTTLS and ABORT is refused with
    /// NBD_REP_ERR_TLS_REQD until TLS is up.
    Required,
    /// STARTTLS is offered; plaintext clients are served too.
    Optional,
}

#[derive(Args)]
struct ServerTlsArgs {
    /// Certificate chain (PEM) the server presents; turns on STARTTLS.
    /// TLS needs the newstyle handshake, which it then selects.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that sign the clients' certificates; used with
    /// --tls-verify-peer.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Require every client to present a certificate signed by --tls-ca.
    #[arg(long)]
    tls_verify_peer: bool,
    /// Whether plaintext clients are refused (default: required when a
    /// certificate is given).
    #[arg(long, value_enum, value_name = "POLICY")]
    tls: Option<TlsPolicyArg>,
}

impl ServerTlsArgs {
    fn files(&self) -> flexnbd::tls::ServerFiles {
        flexnbd::tls::ServerFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
            verify_peer: self.tls_verify_peer,
            policy: self.tls.map(|p| match p {
                TlsPolicyArg::Required => flexnbd::tls::Policy::Required,
                TlsPolicyArg::Optional => flexnbd::tls::Policy::Optional,
            }),
        }
    }
}

#[derive(Args)]
struct ClientTlsArgs {
    /// CA certificates (PEM) that sign the server's certificate; turns on
    /// TLS (STARTTLS, newstyle only: nothing is sent in plaintext if the
    /// server cannot do it).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Our own certificate (PEM), for servers that verify their clients.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the address
    /// connected to).
    #[arg(long, value_name = "NAME")]
    tls_hostname: Option<String>,
}

impl ClientTlsArgs {
    fn files(&self) -> flexnbd::tls::ClientFiles {
        flexnbd::tls::ClientFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            hostname: self.tls_hostname.clone(),
        }
    }
}

#[derive(Args)]
struct TransferArgs {
    /// Address of the NBD server.
    #[arg(short = 'l', long)]
    addr: Option<String>,
    /// Port of the NBD server.
    #[arg(short = 'p', long)]
    port: Option<String>,
    /// Offset in bytes.
    #[arg(short = 'F', long)]
    from: Option<String>,
    /// Number of bytes.
    #[arg(short = 'S', long)]
    size: Option<String>,
    /// Local address to connect from.
    #[arg(short = 'b', long)]
    bind: Option<String>,
    /// A fault plan (`client.*` keys); FLEXNBD_FAULTS is used when this is
    /// not given.
    #[arg(long, value_name = "PLAN")]
    faults: Option<String>,
    #[command(flatten)]
    tls: ClientTlsArgs,
    #[command(flatten)]
    verbosity: Verbosity,
}

#[derive(Args)]
struct SockArgs {
    /// Path of the server's control socket.
    #[arg(short = 's', long)]
    sock: Option<PathBuf>,
    #[command(flatten)]
    verbosity: Verbosity,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    sock: SockArgs,
    /// Print the status as a JSON object instead of the flexnbd status line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct AclArgs {
    #[command(flatten)]
    sock: SockArgs,
    /// The new ACL: IP or IP/bits entries (none: an empty ACL).
    #[arg(value_name = "ACL_ENTRY")]
    acl: Vec<String>,
}

#[derive(Args)]
struct MirrorArgs {
    #[command(flatten)]
    sock: SockArgs,
    /// Address of the destination (a flexnbd listen).
    #[arg(short = 'l', long)]
    addr: Option<String>,
    /// Port of the destination.
    #[arg(short = 'p', long)]
    port: Option<String>,
    /// Delete the source image before handing off, so only one copy can ever
    /// look canonical.
    #[arg(short = 'u', long)]
    unlink: bool,
    /// Local address to connect from.
    #[arg(short = 'b', long)]
    bind: Option<String>,
    /// Speed limit in bytes per second from the start.
    #[arg(short = 'm', long)]
    max_speed: Option<String>,
    /// After it starts, follow the migration to its end (a progress bar on a
    /// terminal, plain lines otherwise) and exit with its outcome.
    #[arg(short = 'w', long)]
    wait: bool,
    /// Compare instead of copying: the destination digests each data range
    /// (BLAKE3) and only the ranges that differ are sent, so an identical
    /// copy costs a few bytes per megabyte on the wire and proves itself
    /// identical without trusting any record. Needs a destination of this
    /// version (an older one gets everything sent).
    #[arg(long)]
    verify: bool,
    /// TLS towards the destination (a `listen` with --tls-cert). The
    /// server that migrates reads these files when the migration starts.
    #[command(flatten)]
    tls: ClientTlsArgs,
}

#[derive(Args)]
struct ResolveArgs {
    /// The source image path (on this host).
    #[arg(long, conflicts_with = "source_exists")]
    source: Option<PathBuf>,
    /// Whether the source image exists, when it lives on another host.
    #[arg(long, value_parser = ["yes", "no"])]
    source_exists: Option<String>,
    /// The destination image path (its marker is DEST.INCOMPLETE, its
    /// completion record DEST.COMPLETE).
    #[arg(long)]
    dest: Option<PathBuf>,
    /// Perform the action where it is safe to automate (removing the marker
    /// of a destination found canonical: an `entrusted` one, or any marker
    /// beside a completion record).
    #[arg(long)]
    apply: bool,
}

#[derive(Args)]
struct MirrorSpeedArgs {
    #[command(flatten)]
    sock: SockArgs,
    /// Bytes per second.
    #[arg(short = 'm', long)]
    max_speed: Option<String>,
}

/// A failure that ends the process with a message.
struct Failure {
    message: String,
    usage_of: Option<&'static str>,
}

fn usage_error(message: impl Into<String>, mode: &'static str) -> Failure {
    Failure {
        message: message.into(),
        usage_of: Some(mode),
    }
}

fn failure(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        usage_of: None,
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .map_err(|_| format!("bad port number '{text}': expected a decimal number from 0 to 65535"))
}

fn parse_u64(text: &str, what: &str) -> Result<u64, String> {
    text.parse::<u64>()
        .map_err(|_| format!("bad {what} '{text}': expected a decimal number of bytes"))
}

fn socket_addr(addr: &str, port: &str) -> Result<SocketAddr, String> {
    let ip: IpAddr = parse_ip(addr).map_err(|e| e.to_string())?;
    Ok(SocketAddr::new(ip, parse_port(port)?))
}

fn serve(args: ServeArgs, role: Role) -> Result<ExitCode, Failure> {
    let mode = match role {
        Role::Serve => "serve",
        Role::Listen => "listen",
    };
    args.verbosity.apply();
    let (Some(addr), Some(port)) = (&args.addr, &args.port) else {
        return Err(usage_error("both --addr and --port are required.", mode));
    };
    let Some(file) = &args.file else {
        return Err(usage_error("--file is required", mode));
    };
    let listen = socket_addr(addr, port).map_err(|m| usage_error(m, mode))?;
    let max_clients = match (role, args.max_clients) {
        (_, Some(0)) => return Err(usage_error("--max-clients must be at least 1", mode)),
        (Role::Serve, n) => n.unwrap_or(16),
        (Role::Listen, None | Some(1)) => 1,
        (Role::Listen, Some(_)) => {
            return Err(usage_error(
                "listen takes one sender at a time: --max-clients must be 1",
                mode,
            ))
        }
    };
    if role == Role::Listen && args.killswitch {
        return Err(usage_error("--killswitch is for serve only", mode));
    }
    if role == Role::Serve && args.overwrite_complete {
        return Err(usage_error("--overwrite-complete is for listen only", mode));
    }
    if !(args.handshake_timeout.is_finite()
        && args.handshake_timeout > 0.0
        && args.handshake_timeout <= 3600.0)
    {
        return Err(usage_error(
            format!(
                "bad --handshake-timeout '{}': expected seconds, more than 0 and at most 3600",
                args.handshake_timeout
            ),
            mode,
        ));
    }
    let tls_files = args.tls.files();
    let handshake = match (args.handshake, tls_files.any()) {
        (Some(Handshake::Oldstyle), true) => {
            return Err(usage_error(
                "TLS needs --handshake newstyle: the oldstyle greeting cannot start TLS",
                mode,
            ))
        }
        (Some(h), _) => h,
        (None, true) => Handshake::Newstyle,
        (None, false) => Handshake::Oldstyle,
    };
    if args.oldstyle_extra_flags && matches!(handshake, Handshake::Newstyle) {
        return Err(usage_error(
            "--oldstyle-extra-flags needs --handshake oldstyle (newstyle always advertises every flag)",
            mode,
        ));
    }
    let acl =
        Acl::parse(&args.acl, args.default_deny).map_err(|e| usage_error(e.to_string(), mode))?;
    log::set_context(file.display().to_string());
    let plan = fault_plan(args.faults.as_deref(), mode)?;
    // The instance's power-loss model belongs to its fault plan: the probe
    // cuts it at a `powercut` step, and the storage stack records into it.
    let probe = plan.map(|plan| {
        let power = plan
            .can_cut_power()
            .then(|| Arc::new(flexnbd::power::Power::new(plan.seed())));
        Arc::new(PlanProbe::new(plan).with_power(power))
    });
    // The image's storage stack, wired here once: the file, and under a
    // fault plan the power-loss recorder and the plan's store faults.
    let stack = probe
        .as_ref()
        .map(flexnbd::fault_apply::storage_stack)
        .unwrap_or_default();
    // Check the file before binding: a port that listens must be able to serve.
    let image = Arc::new(Image::open_stacked(file, stack).map_err(|e| failure(e.to_string()))?);
    if image.trailing_bytes() > 0 {
        warn!(
            "image size is not a multiple of 512: serving {} bytes and ignoring the last {}",
            image.size(),
            image.trailing_bytes()
        );
    }
    // Loaded before binding: a port that listens must be able to serve.
    let tls = tls_files.load().map_err(|e| match e {
        flexnbd::tls::TlsError::Usage(m) => usage_error(m, mode),
        other => failure(other.to_string()),
    })?;
    let config = Config {
        handshake: match handshake {
            Handshake::Oldstyle => HandshakeMode::Oldstyle,
            Handshake::Newstyle => HandshakeMode::Newstyle,
        },
        max_clients,
        handshake_timeout: std::time::Duration::from_secs_f64(args.handshake_timeout),
        killswitch: args.killswitch.then(daemon::killswitch_limit),
        oldstyle_extra_flags: args.oldstyle_extra_flags,
        tls,
        // A destination offers resuming (docs/handoff.md, "Resuming").
        extensions: match role {
            Role::Listen => flexnbd::proto::ext::LISTEN,
            Role::Serve => 0,
        },
        // Newcomers are negotiated with below the clients already served.
        gate: Some(Arc::new(flexnbd::gate::Gate::start().map_err(|e| {
            failure(format!(
                "cannot start the thread that negotiates with new clients: {e}"
            ))
        })?)),
    };
    if let Some(path) = &args.sock {
        // Refuse early: a live server there means we must not start at all.
        flexnbd::control::check_path(path).map_err(|e| failure(e.to_string()))?;
    }
    let options = ServeOptions {
        listen,
        image,
        sock: args.sock.clone(),
        acl,
        config,
        overwrite_complete: args.overwrite_complete,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| failure(format!("cannot start the runtime: {e}")))?;
    let code = match probe {
        // No plan: the probe is a constant that compiles away.
        None => runtime.block_on(daemon::run(Tcp, role, options, Arc::new(Quiet))),
        Some(probe) => runtime.block_on(daemon::run(Tcp, role, options, probe)),
    }
    .map_err(failure)?;
    // Blocking work still running (a map scan) must not delay the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(ExitCode::from(code))
}

/// The fault plan from `--faults` or FLEXNBD_FAULTS; `None` when there is
/// none. The seed is always logged, so a run can be replayed.
fn fault_plan(
    flag: Option<&str>,
    mode: &'static str,
) -> Result<Option<faults::FaultPlan>, Failure> {
    let plan = match flag {
        Some(text) => faults::FaultPlan::parse(text),
        None => faults::FaultPlan::from_env(),
    }
    .map_err(|e| usage_error(e.to_string(), mode))?;
    if plan.is_empty() {
        return Ok(None);
    }
    for warning in plan.warnings() {
        warn!("{warning}");
    }
    warn!("fault plan active (seed {}): {plan}", plan.seed());
    Ok(Some(plan))
}

/// Sends one control request and turns the response into output and an
/// exit code: the text goes to stdout when the code is 0, else to stderr.
fn control_request(
    sock: &SockArgs,
    mode: &'static str,
    lines: Vec<String>,
    json: bool,
) -> Result<ExitCode, Failure> {
    sock.verbosity.apply();
    let Some(path) = &sock.sock else {
        return Err(usage_error("--sock is required.", mode));
    };
    // `mirror` waits for the first connection attempt (up to 15 s to connect
    // and 5 s for the greeting).
    let timeout = std::time::Duration::from_secs(60);
    let response = flexnbd::control::client::request(path, &lines, timeout)
        .map_err(|e| failure(e.to_string()))?;
    if response.code == 0 {
        if json {
            println!("{}", flexnbd::status::line_to_json(&response.text));
        } else {
            println!("{}", response.text);
        }
    } else {
        eprintln!("{}", response.text);
    }
    Ok(ExitCode::from(response.code))
}

fn mirror(args: MirrorArgs) -> Result<ExitCode, Failure> {
    let (Some(addr), Some(port)) = (&args.addr, &args.port) else {
        args.sock.verbosity.apply();
        return Err(usage_error(
            "both --addr and --port are required.",
            "mirror",
        ));
    };
    let mut lines = vec!["mirror".to_string(), addr.clone(), port.clone()];
    args.sock.verbosity.apply();
    lines.push(if args.unlink { "unlink" } else { "exit" }.to_string());
    if args.bind.is_some() || args.max_speed.is_some() {
        // The bind line must be present for max_bps to follow it.
        lines.push(args.bind.clone().unwrap_or_else(|| "0".to_string()));
    }
    if let Some(speed) = &args.max_speed {
        lines.push(speed.clone());
    }
    // The server may run in another directory: send whole paths.
    let absolute = |p: &PathBuf| {
        let text = std::path::absolute(p)
            .map_err(|e| failure(format!("bad path {}: {e}", p.display())))?
            .display()
            .to_string();
        if text.contains('\n') {
            // The control protocol is one parameter a line.
            return Err(failure(format!("bad path {text:?}: it contains a newline")));
        }
        Ok(text)
    };
    let files = args.tls.files();
    for (name, path) in [
        ("ca", &files.ca),
        ("cert", &files.cert),
        ("key", &files.key),
    ] {
        if let Some(path) = path {
            lines.push(format!("tls-{name}={}", absolute(path)?));
        }
    }
    if let Some(name) = &files.hostname {
        lines.push(format!("tls-hostname={name}"));
    }
    if args.verify {
        lines.push("verify".to_string());
    }
    if files.any() && files.ca.is_none() {
        return Err(usage_error(
            "TLS needs --tls-ca: the CA that signed the destination's certificate",
            "mirror",
        ));
    }
    if !args.wait {
        return control_request(&args.sock, "mirror", lines, false);
    }
    let Some(path) = args.sock.sock.clone() else {
        return Err(usage_error("--sock is required.", "mirror"));
    };
    lines[0] = "mirror_follow".to_string();
    follow_migration(&path, &lines)
}

/// `mirror --wait`: one `mirror_follow` request, answered with the start
/// line at once and the outcome line at the end (on the same connection, so
/// a migration that ends quickly is never mistaken for a failure), with
/// progress from status requests meanwhile.
fn follow_migration(path: &std::path::Path, lines: &[String]) -> Result<ExitCode, Failure> {
    use std::io::{IsTerminal, Write};
    let mut talk = flexnbd::control::client::Conversation::start(
        path,
        lines,
        std::time::Duration::from_secs(60),
    )
    .map_err(|e| failure(e.to_string()))?;
    // The first attempt's connection takes at most 15 s + 5 s.
    let started = talk
        .response(std::time::Duration::from_secs(60))
        .map_err(|e| failure(e.to_string()))?;
    if started.code != 0 {
        eprintln!("{}", started.text);
        return Ok(ExitCode::from(started.code));
    }
    println!("{}", started.text);
    let terminal = std::io::stderr().is_terminal();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // As long as the migration takes: the server answers at its end.
        let _ = tx.send(talk.response(std::time::Duration::from_secs(365 * 24 * 3600)));
    });
    let mut last_line = String::new();
    loop {
        match rx.recv_timeout(std::time::Duration::from_millis(if terminal {
            200
        } else {
            1000
        })) {
            Ok(outcome) => {
                if terminal {
                    eprintln!();
                }
                let response =
                    outcome.map_err(|e| failure(format!("lost the migration's outcome: {e}")))?;
                if response.code == 0 {
                    println!("{}", response.text);
                    return Ok(ExitCode::SUCCESS);
                }
                eprintln!("{}", response.text);
                return Ok(ExitCode::from(1));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(failure("lost the migration's outcome"));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        let Ok(response) = flexnbd::control::client::request(
            path,
            &["status".to_string()],
            std::time::Duration::from_secs(10),
        ) else {
            continue; // the outcome decides; status is only for progress
        };
        let text = response.text;
        let field = |key: &str| {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                .map(str::to_string)
        };
        if field("is_mirroring").as_deref() != Some("true") {
            continue;
        }
        let size: f64 = field("size").and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let left: f64 = field("migration_bytes_left")
            .and_then(|v| v.parse().ok())
            .unwrap_or(size);
        let state = field("migration_state").unwrap_or_default();
        let attempt = field("migration_attempt").unwrap_or_default();
        let speed = field("migration_speed").unwrap_or_default();
        let done = if size > 0.0 {
            (100.0 * (1.0 - left / size)).clamp(0.0, 100.0)
        } else {
            100.0
        };
        // While converging, why it has not cut off yet (status.rs keys).
        let waiting = match (
            field("migration_remainder_ms"),
            field("migration_cutoff_ms"),
            field("migration_bottleneck"),
        ) {
            (Some(r), Some(c), Some(b)) => {
                let eta = field("migration_cutoff_eta_ms").unwrap_or_else(|| "unknown".into());
                format!(" remainder_ms={r} cutoff_ms={c} bottleneck={b} cutoff_eta_ms={eta}")
            }
            _ => String::new(),
        };
        // A resumed attempt: what the destination held, not sent again.
        let resumed = match (
            field("migration_checkpoint"),
            field("migration_resumed_bytes"),
        ) {
            (Some(k), Some(b)) => format!(" checkpoint={k} resumed_bytes={b}"),
            _ => String::new(),
        };
        let waiting = waiting + &resumed;
        if terminal {
            let width = 30;
            let filled = (done / 100.0 * width as f64) as usize;
            eprint!(
                "\r[{}{}] {done:5.1}% {state} attempt {attempt} {speed} B/s{waiting}   ",
                "#".repeat(filled),
                " ".repeat(width - filled)
            );
            let _ = std::io::stderr().flush();
        } else {
            let line = format!("migration {done:.1}% state={state} attempt={attempt} bytes_left={left} speed={speed}{waiting}");
            if line != last_line {
                println!("{line}");
                last_line = line;
            }
        }
    }
}

/// Applies the verdict table of the hand-off contract.
fn resolve(args: ResolveArgs) -> Result<ExitCode, Failure> {
    use flexnbd::handoff;
    let Some(dest) = &args.dest else {
        return Err(usage_error("--dest is required", "resolve"));
    };
    let source_exists = match (&args.source, args.source_exists.as_deref()) {
        (Some(path), None) => match std::fs::symlink_metadata(path) {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                return Err(failure(format!(
                    "cannot tell whether {} exists: {e}",
                    path.display()
                )))
            }
        },
        (None, Some(answer)) => answer == "yes",
        _ => {
            return Err(usage_error(
                "give --source PATH or --source-exists yes|no",
                "resolve",
            ))
        }
    };
    let marker = handoff::read_marker_state(&flexnbd::store::Disk, dest).map_err(|e| {
        failure(format!(
            "cannot read {}: {e}",
            handoff::marker_path(dest).display()
        ))
    })?;
    let record = handoff::read_record(&flexnbd::store::Disk, dest).map_err(|e| {
        failure(format!(
            "cannot read {}: {e}",
            handoff::record_path(dest).display()
        ))
    })?;
    if let handoff::RecordFound::Stale(why) = &record {
        // Counted as absent; said on stderr so the three lines stay three.
        eprintln!(
            "flexnbd: ignoring the stale completion record {}: {why}",
            handoff::record_path(dest).display()
        );
    }
    let verdict = handoff::verdict(source_exists, record.matching().is_some(), marker);
    let (reason, action) = handoff::explain(verdict, dest, record.matching());
    println!("verdict: {}", verdict.name());
    println!("reason: {reason}");
    println!("action: {action}");
    if args.apply {
        if verdict.marker_to_remove() {
            handoff::remove_marker(&flexnbd::store::Disk, dest)
                .map_err(|e| failure(format!("cannot remove the marker: {e}")))?;
            println!("applied: removed {}", handoff::marker_path(dest).display());
        } else {
            println!("applied: nothing (only removing the marker of a canonical destination is automated)");
        }
    }
    Ok(ExitCode::from(verdict.exit_code()))
}

fn transfer(args: TransferArgs, write: bool) -> Result<ExitCode, Failure> {
    let mode = if write { "write" } else { "read" };
    args.verbosity.apply();
    let (Some(addr), Some(port)) = (&args.addr, &args.port) else {
        return Err(usage_error("both --addr and --port are required.", mode));
    };
    let (Some(from), Some(size)) = (&args.from, &args.size) else {
        return Err(usage_error("both --from and --size are required.", mode));
    };
    let target = socket_addr(addr, port).map_err(|m| usage_error(m, mode))?;
    let offset = parse_u64(from, "--from").map_err(|m| usage_error(m, mode))?;
    let length = parse_u64(size, "--size").map_err(|m| usage_error(m, mode))?;
    let bind = match &args.bind {
        Some(b) => Some(SocketAddr::new(
            parse_ip(b).map_err(|e| usage_error(e.to_string(), mode))?,
            0,
        )),
        None => None,
    };
    let tls = args.tls.files().load(target.ip()).map_err(|e| match e {
        flexnbd::tls::TlsError::Usage(m) => usage_error(m, mode),
        other => failure(other.to_string()),
    })?;
    let faults = fault_plan(args.faults.as_deref(), mode)?.map(PlanProbe::new);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failure(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move {
        let (mut stream, export) =
            client::connect(&Tcp, target, bind, tls.as_deref(), faults.as_ref())
                .await
                .map_err(|e| failure(e.to_string()))?;
        let result = if write {
            client::write(
                &mut stream,
                &export,
                offset,
                length,
                &mut tokio::io::stdin(),
                faults.as_ref(),
            )
            .await
        } else {
            client::read(
                &mut stream,
                &export,
                offset,
                length,
                &mut tokio::io::stdout(),
                faults.as_ref(),
            )
            .await
        };
        result.map_err(|e| failure(e.to_string()))?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Prints the usage of `mode` (or of flexnbd) to stdout or stderr.
fn print_usage(mode: Option<&str>, to_stderr: bool) -> bool {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    // Building names each mode's usage line "flexnbd MODE", not just "MODE".
    cmd.build();
    let text = match mode {
        None => cmd.render_help().to_string(),
        Some(name) => match cmd.find_subcommand_mut(name) {
            Some(sub) if name != "help" => sub.render_help().to_string(),
            _ => return false,
        },
    };
    if to_stderr {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    true
}

fn main() -> ExitCode {
    // No write may kill the server with SIGPIPE (a log reader or a client
    // gone): std's runtime sets SIGPIPE to SIG_IGN before main runs, so such
    // a write fails with EPIPE instead (sockets are written with MSG_NOSIGNAL
    // anyway). The acceptance suite checks that the running server ignores it.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                _ => {
                    let _ = e.print();
                    ExitCode::from(1)
                }
            };
        }
    };
    // Servers report failures as log lines; one-shot commands as plain text.
    let logs_failures = matches!(cli.mode, Mode::Serve(_) | Mode::Listen(_));
    let result = match cli.mode {
        Mode::Serve(args) => serve(args, Role::Serve),
        Mode::Listen(args) => serve(args, Role::Listen),
        Mode::Resolve(args) => resolve(args),
        Mode::Read(args) => transfer(args, false),
        Mode::Write(args) => transfer(args, true),
        Mode::Status(args) => {
            control_request(&args.sock, "status", vec!["status".into()], args.json)
        }
        Mode::Acl(args) => {
            let mut lines = vec!["acl".to_string()];
            lines.extend(args.acl);
            control_request(&args.sock, "acl", lines, false)
        }
        Mode::Mirror(args) => mirror(args),
        Mode::MirrorSpeed(args) => match &args.max_speed {
            None => {
                args.sock.verbosity.apply();
                Err(usage_error("--max-speed is required.", "mirror-speed"))
            }
            Some(speed) => control_request(
                &args.sock,
                "mirror-speed",
                vec!["mirror_max_bps".into(), speed.clone()],
                false,
            ),
        },
        Mode::Break(args) => control_request(&args, "break", vec!["break".into()], false),
        Mode::ReloadTls(args) => {
            control_request(&args, "reload-tls", vec!["reload_tls".into()], false)
        }
        Mode::Help { mode } => {
            return match mode.as_deref() {
                None => {
                    print_usage(None, false);
                    ExitCode::SUCCESS
                }
                Some(name) if print_usage(Some(name), false) => ExitCode::SUCCESS,
                Some(name) => {
                    eprintln!("flexnbd: no help for unknown mode '{name}'");
                    print_usage(None, true);
                    ExitCode::from(1)
                }
            };
        }
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            if logs_failures {
                fatal!("{}", f.message);
            } else {
                eprintln!("flexnbd: {}", f.message);
            }
            if let Some(mode) = f.usage_of {
                print_usage(Some(mode), true);
            }
            ExitCode::from(1)
        }
    }
}
