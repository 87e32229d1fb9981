//! The `flexnbd` command: argument parsing and wiring only. Exit codes are
//! decided here, in one place.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};

use flexnbd::acl::{parse_ip, Acl};
use flexnbd::log::{self, Level};
use flexnbd::probe::Quiet;
use flexnbd::server::{self, Config, HandshakeMode, Shared};
use flexnbd::store::Image;
use flexnbd::transport::Tcp;
use flexnbd::{client, error, fatal, info, warn};

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
    /// Read bytes from an NBD server and write them to standard output.
    Read(TransferArgs),
    /// Write bytes from standard input to an NBD server.
    Write(TransferArgs),
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
    /// Which greeting to send.
    #[arg(long, value_enum, default_value = "oldstyle")]
    handshake: Handshake,
    /// Most clients served at once; more are closed without a greeting.
    #[arg(long, default_value_t = 16)]
    max_clients: usize,
    /// Seconds a newstyle client may take to finish negotiating before it is dropped.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    handshake_timeout: f64,
    #[command(flatten)]
    verbosity: Verbosity,
    /// Access control list: clients allowed to connect, as IP or IP/bits.
    #[arg(value_name = "ACL_ENTRY")]
    acl: Vec<String>,
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
    #[command(flatten)]
    verbosity: Verbosity,
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

fn serve(args: ServeArgs) -> Result<ExitCode, Failure> {
    args.verbosity.apply();
    let (Some(addr), Some(port)) = (&args.addr, &args.port) else {
        return Err(usage_error("both --addr and --port are required.", "serve"));
    };
    let Some(file) = &args.file else {
        return Err(usage_error("--file is required", "serve"));
    };
    let listen = socket_addr(addr, port).map_err(|m| usage_error(m, "serve"))?;
    if args.max_clients == 0 {
        return Err(usage_error("--max-clients must be at least 1", "serve"));
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
            "serve",
        ));
    }
    let acl = Acl::parse(&args.acl, args.default_deny)
        .map_err(|e| usage_error(e.to_string(), "serve"))?;
    log::set_context(file.display().to_string());
    // Check the file before binding: a port that listens must be able to serve.
    let image = Arc::new(Image::open(file).map_err(|e| failure(e.to_string()))?);
    if image.trailing_bytes() > 0 {
        warn!(
            "image size is not a multiple of 512: serving {} bytes and ignoring the last {}",
            image.size(),
            image.trailing_bytes()
        );
    }
    if args.sock.is_some() || args.killswitch {
        info!("--sock and --killswitch are accepted; the control socket and killswitch are not active in this build");
    }
    let config = Config {
        handshake: match args.handshake {
            Handshake::Oldstyle => HandshakeMode::Oldstyle,
            Handshake::Newstyle => HandshakeMode::Newstyle,
        },
        max_clients: args.max_clients,
        handshake_timeout: std::time::Duration::from_secs_f64(args.handshake_timeout),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| failure(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move {
        let (listener, local) = server::bind(&Tcp, listen)
            .await
            .map_err(|e| failure(format!("cannot listen on {listen}: {e}")))?;
        info!("listening on {local}");
        let scan_image = image.clone();
        tokio::task::spawn_blocking(move || match scan_image.scan_allocation() {
            Ok(()) => info!("allocation map built"),
            Err(e) => warn!("allocation map not built, serving without hole detection: {e}"),
        });
        let shared = Shared::new(image.clone(), config, acl, Arc::new(Quiet));
        let accept = tokio::spawn(server::accept_loop::<Tcp, Quiet>(listener, shared));
        let signal = wait_for_signal().await;
        info!("received {signal}, shutting down");
        accept.abort();
        image.stop_scan();
        Ok(ExitCode::SUCCESS)
    })
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = quit.recv() => "SIGQUIT",
    }
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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failure(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move {
        let (mut stream, export) = client::connect(&Tcp, target, bind)
            .await
            .map_err(|e| failure(e.to_string()))?;
        let result = if write {
            client::write(
                &mut stream,
                &export,
                offset,
                length,
                &mut tokio::io::stdin(),
            )
            .await
        } else {
            client::read(
                &mut stream,
                &export,
                offset,
                length,
                &mut tokio::io::stdout(),
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
    // A client that vanishes must not kill the server with SIGPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
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
    let result = match cli.mode {
        Mode::Serve(args) => serve(args),
        Mode::Read(args) => transfer(args, false),
        Mode::Write(args) => transfer(args, true),
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
            if log::enabled(Level::Error) {
                error!("{}", f.message);
            } else {
                fatal!("{}", f.message);
            }
            eprintln!("flexnbd: {}", f.message);
            if let Some(mode) = f.usage_of {
                print_usage(Some(mode), true);
            }
            ExitCode::from(1)
        }
    }
}
