//! The `bonychat-relay` binary: serves, or manages the store's jobs from the command line.
//!
//! Run with `bonychat-relay --env-file config/example.env`.

use std::path::PathBuf;
use std::process::ExitCode;

use bonychat_relay::config::{Config, Env, StoreConfig};
use bonychat_relay::startup::Application;
use bonychat_relay::store::{self, JobState, JobView, Store, now_millis};
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
    /// Inspect and replay the store's jobs (needs only RELAY_DATABASE_URL); works beside a
    /// running relay, on an existing store only.
    Jobs {
        #[command(subcommand)]
        action: JobsCommand,
    },
    /// Validate the environment as a start would and print the configuration in effect, secrets
    /// redacted; exit 2 on an error. Opens no store and binds no port.
    CheckConfig,
}

#[derive(Subcommand)]
enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// queued, delivered, dead, rejected or dropped; all states when left out.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Queue one dead or queued job again, due now, with a fresh retry schedule.
    Retry { id: i64 },
    /// Queue every dead job again, due now.
    Redrive,
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
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let config = match Config::from_env(&env) {
                Ok(config) => config,
                Err(e) => return config_error(&e),
            };
            telemetry::init(&config.telemetry);
            for warning in &config.warnings {
                tracing::warn!("{warning}");
            }
            serve(config).await
        }
        Command::Jobs { action } => match StoreConfig::from_env(&env) {
            Ok(config) => jobs(&config, action).await,
            Err(e) => config_error(&e),
        },
        Command::CheckConfig => check_config(&env),
    }
}

/// Validates exactly as a start would, then stops short of opening the store or binding.
fn check_config(env: &Env) -> ExitCode {
    let config = match Config::from_env(env) {
        Ok(config) => config,
        Err(e) => return config_error(&e),
    };
    for (name, value) in config.effective() {
        println!("{name}={value}");
    }
    // On stderr, so stdout stays a list of NAME=value lines a script can read.
    for warning in &config.warnings {
        eprintln!("bonychat-relay: warning: {warning}");
    }
    ExitCode::SUCCESS
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
            // The log line may be pretty or JSON (and goes to stdout): the operator also gets
            // one plain line on stderr, as for a configuration error.
            eprintln!("bonychat-relay: cannot start: {}", e.to_string().replace(['\n', '\r'], " "));
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
            eprintln!("bonychat-relay: relay failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn jobs(config: &StoreConfig, action: JobsCommand) -> ExitCode {
    let store = match store::open_existing(config).await {
        Ok((store, opened)) => {
            eprintln!("store: {opened}");
            store
        }
        Err(e) => {
            eprintln!("bonychat-relay: RELAY_DATABASE_URL: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match action {
        JobsCommand::List { state, limit, json } => list(store.as_ref(), state.as_deref(), limit, json).await,
        JobsCommand::Retry { id } => store.retry(id, now_millis()).await.map(|job| {
            println!("job {} queued again ({} {} to {})", job.id, job.direction.as_str(), job.m_id, job.contact);
        }),
        JobsCommand::Redrive => store::redrive_all_dead(store.as_ref(), now_millis())
            .await
            .map(|n| println!("{n} dead job(s) queued again")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bonychat-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn list(store: &dyn Store, state: Option<&str>, limit: usize, json: bool) -> Result<(), store::StoreError> {
    let state = match state {
        None => None,
        Some(raw) => Some(JobState::parse(raw).ok_or_else(|| {
            store::StoreError::Conflict(format!("--state {raw}: must be queued, delivered, dead, rejected or dropped"))
        })?),
    };
    let jobs: Vec<JobView> = store.list(state, limit).await?.iter().map(JobView::from).collect();
    if json {
        for job in &jobs {
            println!("{}", serde_json::to_string(job).expect("jobs serialize"));
        }
        return Ok(());
    }
    println!(
        "{:>8}  {:<8}  {:<9}  {:>8}  {:<20}  {:<34}  last error",
        "id", "dir", "state", "attempts", "contact", "mId"
    );
    for job in &jobs {
        let error = job.last_error.as_deref().unwrap_or("");
        let error: String = error.chars().take(60).collect();
        println!(
            "{:>8}  {:<8}  {:<9}  {:>8}  {:<20}  {:<34}  {error}",
            job.id,
            job.direction.as_str(),
            job.state.as_str(),
            job.attempts,
            job.contact_id,
            job.m_id
        );
    }
    Ok(())
}
