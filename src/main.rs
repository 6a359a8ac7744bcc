//! The `bonychat-relay` binary: serves (the default), and the operator's tools beside it:
//! `check-config`, `simulate messenger`, `healthcheck` and `jobs …` on the store.
//!
//! Run with `bonychat-relay --env-file config/sandbox.env` to try it without any account, or
//! `--env-file config/example.env` (edited) in production.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bonychat_relay::config::{CHANNELS_FILE_VAR, Channels, Config, ConfigError, Env, IntakeCaps, Secret, StoreConfig};
use bonychat_relay::domain::channel::{DEFAULT_CHANNEL, is_channel_name};
use bonychat_relay::startup::Application;
use bonychat_relay::store::{self, JobState, JobView, Store, now_millis};
use bonychat_relay::{shutdown, telemetry};
use clap::{Parser, Subcommand};
use serde_json::json;
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
    /// Play an upstream against a running relay (the sandbox or a real deployment).
    Simulate {
        #[command(subcommand)]
        upstream: SimulateCommand,
    },
    /// Exit 0 when URL answers 200, 1 otherwise (for container health checks). Needs no
    /// other variable; URL defaults to /readyz on the loopback at RELAY_ADDR's port.
    Healthcheck {
        /// An http:// URL; default http://127.0.0.1:<port of RELAY_ADDR, else 8080>/readyz.
        url: Option<String>,
    },
}

#[derive(Subcommand)]
enum SimulateCommand {
    /// Post a Messenger page webhook, signed with MESSENGER_APP_SECRET, to /webhooks/messenger
    /// (needs only MESSENGER_APP_SECRET, JOINCHAT_PAGE_ID and, for the default URL, RELAY_ADDR).
    Messenger(SimulateMessenger),
}

#[derive(clap::Args)]
struct SimulateMessenger {
    /// The Messenger user (PSID) the event comes from or, with --echo, goes to.
    #[arg(long, value_name = "PSID")]
    contact: String,
    /// A text message from the contact.
    #[arg(long, required_unless_present_any = ["delivery", "read"], conflicts_with_all = ["delivery", "read"])]
    text: Option<String>,
    /// Send the text as an echo: written by the Page (in the Inbox, another app), not the contact.
    #[arg(long, requires = "text")]
    echo: bool,
    /// A delivery receipt: every message to the contact sent up to this time (ms since the
    /// epoch; now when left out).
    #[arg(long, value_name = "WATERMARK", num_args = 0..=1, conflicts_with = "read")]
    delivery: Option<Option<i64>>,
    /// A read receipt: every message to the contact sent up to this time (ms since the epoch;
    /// now when left out).
    #[arg(long, value_name = "WATERMARK", num_args = 0..=1)]
    read: Option<Option<i64>>,
    /// The relay's base URL; default http://127.0.0.1:<port of RELAY_ADDR>.
    #[arg(long)]
    url: Option<String>,
    /// With RELAY_CHANNELS_FILE: the channel whose Page the event is for (its app's secret
    /// signs it, and it goes to that app's /webhooks/messenger/<app>).
    #[arg(long, value_name = "NAME")]
    channel: Option<String>,
}

#[derive(Subcommand)]
enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// queued, delivered, dead, rejected or dropped; all states when left out.
        #[arg(long)]
        state: Option<String>,
        /// Only the jobs of this channel; every channel's when left out.
        #[arg(long, value_name = "NAME", value_parser = channel_name)]
        channel: Option<String>,
        /// How many jobs at most, 1 to 1000 (as the admin API).
        #[arg(
            long,
            default_value_t = 100,
            value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=store::LIST_LIMIT_MAX as u64)
        )]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Queue one dead or queued job again, due now, with a fresh retry schedule.
    Retry { id: i64 },
    /// Queue every dead job again, due now.
    Redrive {
        /// Only the dead jobs of this channel; every channel's when left out.
        #[arg(long, value_name = "NAME", value_parser = channel_name)]
        channel: Option<String>,
    },
}

/// A `--channel` value: refused at once when no channel can have that name.
fn channel_name(raw: &str) -> Result<String, String> {
    if is_channel_name(raw) {
        Ok(raw.to_owned())
    } else {
        Err("a channel's name is 1 to 32 of a-z, 0-9 and -, starting with a letter or digit".into())
    }
}

/// Exit code for a start the relay refuses: a configuration it cannot start with, or a store a
/// newer relay migrated. Unlike 1 (a port taken, a database away), trying again will not help.
const EXIT_REFUSED: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut env = Env::from_process();
    if let Some(path) = &cli.env_file {
        env = match env.with_env_file(path) {
            Ok(env) => env,
            // Docker reserves exit code 2 in health checks.
            Err(e) if matches!(cli.command, Some(Command::Healthcheck { .. })) => {
                eprintln!("unhealthy: {e}");
                return ExitCode::FAILURE;
            }
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
        Command::Simulate { upstream: SimulateCommand::Messenger(args) } => simulate_messenger(&env, args).await,
        Command::Healthcheck { url } => healthcheck(url, &env).await,
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

async fn simulate_messenger(env: &Env, args: SimulateMessenger) -> ExitCode {
    let (secret, page_id, path, base) = match simulate_settings(env, args.url.as_deref(), args.channel.as_deref()) {
        Ok(settings) => settings,
        Err(e) => return config_error(&e),
    };
    let envelope = messenger_envelope(&args, &page_id, now_millis());
    let body = serde_json::to_vec(&envelope).expect("JSON values serialize");
    let signature = bonychat_relay::signing::hub_signature(secret.expose().as_bytes(), &body);
    let url = format!("{}{path}", base.trim_end_matches('/'));

    // The relay's client settings (and its crypto provider), so https deployments work too.
    let client = match bonychat_relay::clients::http::client(Duration::from_secs(5), Duration::from_secs(30)) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("bonychat-relay: cannot build the HTTP client: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("POST {url}");
    println!("{}", String::from_utf8_lossy(&body));
    let response = match client
        .post(&url)
        .header("content-type", "application/json")
        .header("x-hub-signature-256", signature)
        .body(body)
        .send()
        .await
    {
        Ok(response) => response,
        Err(e) => {
            eprintln!("bonychat-relay: no answer from {url}: {}", root_cause(&e));
            return ExitCode::FAILURE;
        }
    };
    let status = response.status();
    let answer = response.text().await.unwrap_or_default();
    println!("{} {answer}", status.as_u16());
    if status.is_success() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// Only the variables a simulated Messenger needs: it must work with a production env file
/// whose other values (store, BonyChat) this machine knows nothing about.
/// With a channels file, the channel's app secret, Page and app path come from the file.
fn simulate_settings(
    env: &Env,
    url: Option<&str>,
    channel: Option<&str>,
) -> Result<(Secret, String, String, String), ConfigError> {
    let base = match url {
        Some(url) => url.to_owned(),
        None => local_base_url(env)?,
    };
    if env.get(CHANNELS_FILE_VAR)?.is_none() {
        if channel.is_some_and(|name| name != DEFAULT_CHANNEL) {
            return Err(ConfigError::new(
                "--channel",
                "needs RELAY_CHANNELS_FILE (without it, the only channel is default)",
            ));
        }
        let secret = env.required_secret("MESSENGER_APP_SECRET")?;
        let page_id = env.required("JOINCHAT_PAGE_ID")?.trim().to_owned();
        return Ok((secret, page_id, "/webhooks/messenger".to_owned(), base));
    }
    let channels = Channels::load(env, IntakeCaps::DEFAULT)?;
    let name = match channel {
        Some(name) => name.to_owned(),
        None if channels.channels.len() == 1 => channels.channels.keys().next().expect("one").clone(),
        None => {
            let names: Vec<&str> = channels.channels.keys().map(String::as_str).collect();
            return Err(ConfigError::new(
                "--channel",
                format!("required with several channels ({})", names.join(", ")),
            ));
        }
    };
    let config = channels
        .channels
        .get(&name)
        .ok_or_else(|| ConfigError::new("--channel", format!("no channel {name} in the channels file")))?;
    let app = &config.messenger_app;
    let secret = channels.apps[app].app_secret.current.clone();
    Ok((secret, config.joinchat.page_id.clone(), format!("/webhooks/messenger/{app}"), base))
}

/// A page envelope as Meta sends it (PROTOCOLS.md, `tests/api/fixtures/d2*.json`).
fn messenger_envelope(args: &SimulateMessenger, page_id: &str, now: i64) -> serde_json::Value {
    let mid = format!("m_simulated_{}", uuid::Uuid::new_v4().simple());
    let (sender, recipient) =
        if args.echo { (page_id, args.contact.as_str()) } else { (args.contact.as_str(), page_id) };
    let mut event = json!({"sender": {"id": sender}, "recipient": {"id": recipient}, "timestamp": now});
    if let Some(watermark) = args.delivery {
        event["delivery"] = json!({"watermark": watermark.unwrap_or(now)});
    } else if let Some(watermark) = args.read {
        event["read"] = json!({"watermark": watermark.unwrap_or(now)});
    } else {
        let mut message = json!({"mid": mid, "text": args.text.as_deref().unwrap_or_default()});
        if args.echo {
            message["is_echo"] = json!(true);
        }
        event["message"] = message;
    }
    json!({"object": "page", "entry": [{"id": page_id, "time": now, "messaging": [event]}]})
}

fn config_error(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("bonychat-relay: configuration error: {error}");
    ExitCode::from(EXIT_REFUSED)
}

async fn serve(config: Config) -> ExitCode {
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
            return if matches!(e, store::StoreError::SchemaTooNew { .. }) {
                ExitCode::from(EXIT_REFUSED)
            } else {
                ExitCode::FAILURE
            };
        }
    };
    let result = match action {
        JobsCommand::List { state, channel, limit, json } => {
            list(store.as_ref(), state.as_deref(), channel.as_deref(), limit, json).await
        }
        JobsCommand::Retry { id } => store.retry(id, store.now()).await.map(|job| {
            println!(
                "job {} queued again ({} {} to {} of channel {})",
                job.id,
                job.direction.as_str(),
                job.m_id,
                job.contact,
                job.channel
            );
        }),
        JobsCommand::Redrive { channel } => store::redrive_all_dead(store.as_ref(), store.now(), channel.as_deref())
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

async fn list(
    store: &dyn Store,
    state: Option<&str>,
    channel: Option<&str>,
    limit: usize,
    json: bool,
) -> Result<(), store::StoreError> {
    let state = match state {
        None => None,
        Some(raw) => Some(JobState::parse(raw).ok_or_else(|| {
            store::StoreError::Conflict(format!("--state {raw}: must be queued, delivered, dead, rejected or dropped"))
        })?),
    };
    let jobs: Vec<JobView> = store.list(state, channel, limit).await?.iter().map(JobView::from).collect();
    if json {
        for job in &jobs {
            println!("{}", serde_json::to_string(job).expect("jobs serialize"));
        }
        return Ok(());
    }
    println!(
        "{:>8}  {:<12}  {:<8}  {:<9}  {:>8}  {:<20}  {:<34}  last error",
        "id", "channel", "dir", "state", "attempts", "contact", "mId"
    );
    for job in &jobs {
        let error = job.last_error.as_deref().unwrap_or("");
        let error: String = error.chars().take(60).collect();
        println!(
            "{:>8}  {:<12}  {:<8}  {:<9}  {:>8}  {:<20}  {:<34}  {error}",
            job.id,
            job.channel,
            job.direction.as_str(),
            job.state.as_str(),
            job.attempts,
            job.contact_id,
            job.m_id
        );
    }
    Ok(())
}

/// Docker and compose wait at most their own timeout (30 s by default) for a health check;
/// a probe that gives up sooner reports why instead of being killed silently.
const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(3);

async fn healthcheck(url: Option<String>, env: &Env) -> ExitCode {
    // Docker reserves exit code 2 in health checks, so every failure, a bad URL included, is 1.
    let unhealthy = |reason: &str| {
        eprintln!("unhealthy: {reason}");
        ExitCode::FAILURE
    };
    let url = match url {
        Some(url) => url,
        None => match local_base_url(env) {
            Ok(base) => format!("{base}/readyz"),
            Err(e) => return unhealthy(&e.to_string()),
        },
    };
    // Refused before connecting: the relay's own port serves plain HTTP, and that port is what
    // a container health check is about (a TLS proxy in front of it has health of its own).
    match url::Url::parse(&url) {
        Ok(parsed) if parsed.scheme() == "http" => {}
        Ok(parsed) => {
            return unhealthy(&format!(
                "{url}: only http:// is supported, not {}:// (the health check probes the relay's own port, which serves plain HTTP)",
                parsed.scheme()
            ));
        }
        Err(e) => return unhealthy(&format!("{url} is not a URL ({e}); give an http:// URL")),
    }
    let client = match bonychat_relay::clients::http::client(HEALTHCHECK_TIMEOUT, HEALTHCHECK_TIMEOUT) {
        Ok(client) => client,
        Err(e) => return unhealthy(&format!("cannot build the HTTP client: {e}")),
    };
    match client.get(&url).send().await {
        Ok(response) if response.status() == reqwest::StatusCode::OK => {
            println!("healthy: {url} answered 200");
            ExitCode::SUCCESS
        }
        Ok(response) => unhealthy(&format!("{url} answered {}", response.status().as_u16())),
        Err(e) => unhealthy(&format!("{url}: {}", root_cause(&e))),
    }
}

/// The relay's own base URL on this machine, from `RELAY_ADDR` (default port 8080): the
/// loopback when it listens on every interface, else the address it listens on.
fn local_base_url(env: &Env) -> Result<String, ConfigError> {
    let addr = env.parsed("RELAY_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)), |raw| {
        raw.parse::<SocketAddr>().map_err(|_| format!("`{raw}` is not an address such as 0.0.0.0:8080"))
    })?;
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    Ok(format!("http://{}", SocketAddr::new(ip, addr.port())))
}

/// reqwest's own message is only "error sending request": the cause is at the bottom.
fn root_cause(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}
