//! The `bonychat-relay` binary: reads the configuration, then serves.
//!
//! Run with `bonychat-relay --env-file config/example.env`.

use std::path::PathBuf;
use std::process::ExitCode;

use bonychat_relay::config::{Config, Env};
use bonychat_relay::startup::Application;
use bonychat_relay::{shutdown, telemetry};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Read variables from this file first; variables set in the environment win.
    #[arg(long, value_name = "PATH", global = true)]
    env_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default).
    Serve,
}

/// Exit code for a configuration the relay cannot start with.
const EXIT_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut env = Env::from_process();
    if let Some(path) = &cli.env_file {
        env = match env.with_env_file(path) {
            Ok(env) => env,
            Err(e) => return config_error(&e),
        };
    }
    let config = match Config::from_env(&env) {
        Ok(config) => config,
        Err(e) => return config_error(&e),
    };
    telemetry::init(&config.telemetry);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }

    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await,
    }
}

fn config_error(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("bonychat-relay: configuration error: {error}");
    ExitCode::from(EXIT_CONFIG)
}

async fn serve(config: Config) -> ExitCode {
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = CancellationToken::new();
    let signalled = stop.clone();
    tokio::spawn(async move {
        shutdown::signal().await;
        signalled.cancel();
    });
    match app.run_until_stopped(stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("relay failed: {e}");
            ExitCode::FAILURE
        }
    }
}
