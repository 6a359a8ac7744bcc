//! `serve`, the default command: runs the relay until SIGTERM or SIGINT, reloading its channels
//! on SIGHUP.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use super::{EXIT_REFUSED, config_error};
use crate::config::{Config, Env};
use crate::startup::Application;
use crate::{shutdown, telemetry};

/// Starts the relay with the configuration `env` gives, and serves until a signal stops it.
pub async fn run(env: &Env) -> ExitCode {
    let config = match Config::from_env(env) {
        Ok(config) => config,
        Err(e) => return config_error(&e),
    };
    telemetry::init(&config.telemetry);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    serve(config).await
}

async fn serve(config: Config) -> ExitCode {
    // Before anything is served: a SIGTERM right after the start line still drains.
    let stops = match shutdown::stops() {
        Ok(stops) => stops,
        Err(e) => {
            eprintln!("bonychat-relay: cannot listen for SIGTERM and SIGINT: {e}");
            return ExitCode::FAILURE;
        }
    };
    let hangups = shutdown::hangups()
        .inspect_err(
            |e| tracing::warn!(error = %e, "cannot listen for SIGHUP: one would stop the relay without a drain"),
        )
        .ok();
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            // The log line may be pretty or JSON (and goes to stdout): the operator also gets
            // one plain line on stderr, as for a configuration error.
            eprintln!("bonychat-relay: cannot start: {}", e.to_string().replace(['\n', '\r'], " "));
            return if e.is_refusal() { ExitCode::from(EXIT_REFUSED) } else { ExitCode::FAILURE };
        }
    };
    if let Some(mut hangups) = hangups {
        let reloader = app.reloader();
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                reloader.reload();
            }
        });
    }
    let stop = CancellationToken::new();
    let signalled = stop.clone();
    tokio::spawn(async move {
        stops.await;
        signalled.cancel();
    });
    match app.run_until_stopped(stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("relay failed: {e}");
            eprintln!("bonychat-relay: relay failed: {e}");
            ExitCode::FAILURE
        }
    }
}
