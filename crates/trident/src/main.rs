//! The `trident` binary: `serve` (the service), `bench` (a load client that prints a
//! table), `image` (pull, list, remove images), `ws` (a tiny WebSocket client for executions), and the hidden `runner-init` that
//! the native sandbox re-executes for each runner.

#![forbid(unsafe_code)]

mod bench;
mod config;
mod image_cli;
mod images;
mod serve;
mod ws;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "trident",
    version,
    about = "Runs untrusted code fast and safely in prewarmed sandboxed runners"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Poseidon API v1 on the native sandbox.
    Serve(config::ServeArgs),
    /// Measure a running server beside baselines taken in the same run: executions (alone
    /// and under load), prewarming at scale, files, a learner's flow, jobs, Docker.
    Bench(bench::BenchArgs),
    /// Pull, list and remove the server's OCI images (through its API, or in a data dir).
    Image(image_cli::ImageArgs),
    /// Connect to an execution's WebSocket URL and print its messages (stdin lines are sent).
    Ws(ws::WsArgs),
    /// Internal: the init process of one runner (started by `serve`, never by hand).
    #[command(hide = true)]
    RunnerInit { dir: PathBuf },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        // Before any thread exists: runner-init forks.
        Command::RunnerInit { dir } => trident_sandbox::init::main(&dir),
        Command::Serve(args) => {
            let settings = config::Settings::resolve(args)?;
            init_logging(&settings.server.log);
            let open_files = raise_open_files_limit();
            tracing::debug!(open_files, "limit on open files");
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve::run(settings))
        }
        Command::Ws(args) => {
            init_logging("warn");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(ws::run(args))
        }
        Command::Image(args) => {
            init_logging("warn");
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(image_cli::run(args))
        }
        Command::Bench(args) => {
            init_logging("warn");
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(bench::run(args))
        }
    }
}

/// Lifts the limit on open files as far as this process may: a server holding thousands of
/// agents' long polls needs a socket for each, and one fd (a pidfd) per runner it started,
/// while the usual soft limit is 1024. As root the hard limit goes up to the kernel's
/// `fs.nr_open` too (10,000 runners and as many agents need more than the 20,000 some hosts
/// set); otherwise the soft limit rises to the hard one. (Executions get their own, low limit
/// from the sandbox.) Returns the limit now in force.
pub(crate) fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if let Some(max) = nr_open.filter(|&max| max > hard) {
        if setrlimit(Resource::RLIMIT_NOFILE, max, max).is_ok() {
            return max;
        }
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => hard,
        Err(_) => soft,
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRIDENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
