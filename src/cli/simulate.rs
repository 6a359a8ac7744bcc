//! `simulate messenger`: plays Messenger against a running relay, with a webhook signed as Meta
//! signs it.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use super::{config_error, local_base_url, root_cause};
use crate::config::{CHANNELS_FILE_VAR, Channels, ConfigError, Env, IntakeCaps, Secret};
use crate::domain::channel::DEFAULT_CHANNEL;
use crate::store::now_millis;

#[derive(Subcommand)]
pub enum SimulateCommand {
    /// Post a Messenger page webhook, signed with MESSENGER_APP_SECRET, to /webhooks/messenger
    /// (needs only MESSENGER_APP_SECRET, JOINCHAT_PAGE_ID and, for the default URL, RELAY_ADDR).
    Messenger(SimulateMessenger),
}

// The field docs are the terminal help, where `<app>` is a placeholder, not an HTML tag.
#[allow(rustdoc::invalid_html_tags)]
#[derive(clap::Args)]
pub struct SimulateMessenger {
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

/// Posts one signed event to the relay's Messenger webhook and prints what was sent and the
/// answer: 0 when the relay took it (2xx).
pub async fn messenger(env: &Env, args: SimulateMessenger) -> ExitCode {
    let (secret, page_id, path, base) = match simulate_settings(env, args.url.as_deref(), args.channel.as_deref()) {
        Ok(settings) => settings,
        Err(e) => return config_error(&e),
    };
    let envelope = messenger_envelope(&args, &page_id, now_millis());
    let body = serde_json::to_vec(&envelope).expect("JSON values serialize");
    let signature = crate::signing::hub_signature(secret.expose().as_bytes(), &body);
    let url = format!("{}{path}", base.trim_end_matches('/'));

    // The relay's client settings (and its crypto provider), so https deployments work too.
    let client = match crate::clients::http::client(Duration::from_secs(5), Duration::from_secs(30)) {
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

/// A page envelope as Meta sends it (as the captured `tests/api/fixtures/d2*.json`).
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
