//! The `seedling` command; all logic lives in the `seedling_server` library.

use std::io::IsTerminal;

use clap::Parser;
use seedling_server::cli::{Cli, Command};
use seedling_server::dispatch::dispatch;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The progress bar of `train` owns the terminal: only warnings there.
    let default = if matches!(cli.command, Command::Train(_)) {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match dispatch(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
