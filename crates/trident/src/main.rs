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
            raise_open_files_limit();
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

/// Lifts the soft limit on open files to the hard one: a server holding thousands of agents'
/// long polls needs a socket for each, and the usual soft limit is 1024. (Executions get
/// their own, low limit from the sandbox.)
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
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
