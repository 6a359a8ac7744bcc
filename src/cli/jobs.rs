//! `jobs list|retry|redrive`: the store's jobs, read and queued again from the command line,
//! beside a running relay or without one.

use std::process::ExitCode;

use clap::Subcommand;

use super::{EXIT_REFUSED, config_error};
use crate::config::{Env, StoreConfig};
use crate::domain::channel::is_channel_name;
use crate::store::{self, JobState, JobView, Store};

#[derive(Subcommand)]
pub enum JobsCommand {
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

/// Runs `action` on the store `env` names (only its store variables are read).
pub async fn run(env: &Env, action: JobsCommand) -> ExitCode {
    match StoreConfig::from_env(env) {
        Ok(config) => jobs(&config, action).await,
        Err(e) => config_error(&e),
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
    println!("{}", table_header());
    for job in &jobs {
        println!("{}", table_row(job));
    }
    Ok(())
}

/// The columns of `jobs list`'s table, as the README names them.
fn table_header() -> String {
    format!(
        "{:>8}  {:<12}  {:<8}  {:<9}  {:>8}  {:<23}  {:<20}  {:<34}  last error",
        "id", "channel", "dir", "state", "attempts", "next attempt", "contact", "mId"
    )
}

/// One job as a line of the table: `next attempt` only for a queued job (`-` for the others:
/// nothing is tried again), the last error cut to 60 characters, no trailing blanks.
fn table_row(job: &JobView) -> String {
    let next_attempt =
        if job.state == JobState::Queued { crate::routes::console::utc(job.next_attempt_at) } else { "-".to_owned() };
    let error: String = job.last_error.as_deref().unwrap_or("").chars().take(60).collect();
    let line = format!(
        "{:>8}  {:<12}  {:<8}  {:<9}  {:>8}  {:<23}  {:<20}  {:<34}  {error}",
        job.id,
        job.channel,
        job.direction.as_str(),
        job.state.as_str(),
        job.attempts,
        next_attempt,
        job.contact_id,
        job.m_id
    );
    line.trim_end().to_owned()
}
