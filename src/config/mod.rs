//! Configuration: every variable of SPEC §1, read once at start into typed structs.
//!
//! Nothing else in the crate reads the environment. A missing or malformed variable stops the
//! start with one line naming it ([`ConfigError`]); secrets are [`Secret`]s, so `Debug` of any
//! config struct is safe to log.

mod channels;
mod env;
mod secret;
pub mod traces;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

pub use crate::domain::joinchat::RecipientField;
pub use channels::{
    AppConfig, CHANNELS_FILE_VAR, ChannelConfig, Channels, ChannelsSource, DEFAULT_APP, QueueCaps, SINGLE_CHANNEL_VARS,
};
pub use env::{ConfigError, Env, parse_duration, parse_duration_list};
pub use secret::{Rotating, Secret, SecretValue};

use env::parse_u64;

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstreams: UpstreamConfig,
    /// Every channel and Meta app served; replaced as a whole on `SIGHUP` ([`Config::reload`]).
    pub channels: Channels,
    pub store: StoreConfig,
    pub delivery: DeliveryConfig,
    pub telemetry: TelemetryConfig,
    /// Things worth telling the operator that do not stop the start (typos, odd values).
    /// Logged once telemetry is up.
    pub warnings: Vec<String>,
    /// The environment the configuration was read from: a reload reads the channels from it
    /// again (the file it names and every secret file are read afresh).
    env: Env,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `RELAY_ADDR`, default `0.0.0.0:8080`.
    pub addr: SocketAddr,
    /// `RELAY_SHUTDOWN_GRACE_SECS`, default 10: how long in-flight work may finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// `RELAY_ADMIN_TOKEN` (and `RELAY_ADMIN_TOKEN_PREVIOUS` during a rotation): enables
    /// `/admin/*` when set.
    pub admin_token: Option<Rotating>,
    /// `RELAY_SANDBOX`, default false: mounts the JoinChat and BonyChat stand-ins under
    /// `/sandbox/`. Never in production: anyone reaching the port could read what they received.
    pub sandbox: bool,
    pub limits: ServerLimits,
}

/// What one client, or many, may hold of the relay: connections, time and body memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// `RELAY_MAX_CONNECTIONS`, default 1024: shared fairly between client addresses, silent
    /// connections closed first when full (see [`crate::server`]); clamped at start to fit the
    /// file-descriptor limit.
    pub max_connections: usize,
    /// `RELAY_HEADER_READ_TIMEOUT_MS`, default 10000: a request's head must arrive within it.
    pub header_read_timeout: Duration,
    /// `RELAY_IDLE_TIMEOUT_SECS`, default 60: a connection with no request for that long is closed.
    pub idle_timeout: Duration,
    /// `RELAY_BODY_READ_TIMEOUT_MS`, default 10000: a request body must arrive within it.
    pub body_read_timeout: Duration,
    /// `RELAY_MAX_BODY_BYTES_IN_FLIGHT`, default 64 MiB: request body bytes held at once.
    pub max_body_bytes_in_flight: usize,
}

#[derive(Debug, Clone)]
pub struct BonyChatConfig {
    /// `BONYCHAT_CHANNEL_ID`: the Channel ID BonyChat generated.
    pub channel_id: String,
    /// `BONYCHAT_API_TOKEN` (and `_PREVIOUS`): checked on `/message`, sent on webhook posts.
    pub api_token: Rotating,
    /// `BONYCHAT_WEBHOOK_URL`: where inbound events are posted.
    pub webhook_url: Endpoint,
}

#[derive(Debug, Clone)]
pub struct JoinChatConfig {
    /// `JOINCHAT_API_URL`, default `https://joinchat.ai/api/send_message`.
    pub api_url: Endpoint,
    /// `JOINCHAT_PAGE_ID`: the Page bound to the JoinChat bot, sent as a JSON string.
    pub page_id: String,
    /// `JOINCHAT_API_SECRET` (and `_PREVIOUS`): key of the `x-joinchat-signature` HMAC.
    pub api_secret: Rotating,
    /// `JOINCHAT_RECIPIENT_FIELD`, default `auto`.
    pub recipient_field: RecipientField,
    /// `JOINCHAT_MESSAGE_TAG`: sent as `tag` on every request when set.
    pub message_tag: Option<String>,
    /// `JOINCHAT_ORDER_GAP_SECS`, default 1: minimum spacing of two sends to one contact.
    pub order_gap: Duration,
    /// `JOINCHAT_MAX_SENDS_PER_SEC`, default 200: the Page's send rate (SPEC §5).
    pub max_sends_per_sec: u32,
}

/// How the relay talks to its upstreams, every channel alike: one HTTP client per upstream
/// serves every channel.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `BONYCHAT_TIMEOUT_MS`, default 10000: one webhook post, answer included.
    pub bonychat_timeout: Duration,
    /// `JOINCHAT_CONNECT_TIMEOUT_MS`, default 5000.
    pub joinchat_connect_timeout: Duration,
    /// `JOINCHAT_TIMEOUT_MS`, default 15000: the whole request, answer included.
    pub joinchat_timeout: Duration,
    /// `MESSENGER_GRAPH_URL`, default `https://graph.facebook.com/v21.0`.
    pub graph_url: Endpoint,
    /// `MESSENGER_GRAPH_TIMEOUT_MS`, default 2000: the most a profile look-up may hold up an event.
    pub graph_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `RELAY_DATABASE_URL`, default `sqlite://data/relay.db`.
    pub database_url: DatabaseUrl,
    /// `RELAY_RETENTION`, default `7d`: how long delivered jobs are kept.
    pub retention: Duration,
    /// `RELAY_MAX_QUEUED_OUTBOUND`, `RELAY_MAX_QUEUED_INBOUND`, default 100000 each: queued
    /// jobs past which new work of that direction is refused with 503;
    /// `RELAY_MAX_QUEUED_PER_CONTACT`, default 1000: the same for one contact's messages.
    pub intake: IntakeCaps,
    /// How each replica talks to a Postgres store (unused for SQLite).
    pub postgres: PostgresOptions,
}

/// Limits on new work (SPEC §5: intake is bounded). The store enforces `per_contact` itself;
/// the caps of a direction are a channel's own, handed to the store with each piece of work
/// ([`NewOutbound::max_queued`](crate::store::NewOutbound::max_queued),
/// [`InboundBatch::max_queued`](crate::store::InboundBatch::max_queued)), and these are the
/// defaults a channel gets them from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntakeCaps {
    /// Queued outbound jobs of a channel past which `/message` gets 503 (the default).
    pub outbound: u64,
    /// Queued inbound jobs (events and receipts) of a channel past which webhooks get 503 (the
    /// default).
    pub inbound: u64,
    /// Queued outbound messages to one contact (of one channel) past which `/message` gets 503
    /// for that contact.
    pub per_contact: u64,
}

impl IntakeCaps {
    pub const DEFAULT: Self = Self { outbound: 100_000, inbound: 100_000, per_contact: 1_000 };
}

/// Connections of one replica to a Postgres store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostgresOptions {
    /// `RELAY_DATABASE_POOL_SIZE`, default 10: connections per replica at most.
    pub pool_size: u32,
    /// `RELAY_DATABASE_CONNECT_TIMEOUT_MS`, default 5000: how long a connection (or a free one
    /// from the pool) is waited for before the request gets 503.
    pub connect_timeout: Duration,
    /// `RELAY_DATABASE_STATEMENT_TIMEOUT_MS`, default 5000: the server cancels a statement
    /// running longer.
    pub statement_timeout: Duration,
}

impl PostgresOptions {
    pub const DEFAULT: Self =
        Self { pool_size: 10, connect_timeout: Duration::from_secs(5), statement_timeout: Duration::from_secs(5) };
}

#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    /// The whole URL: it usually carries a password.
    Postgres(Secret),
}

impl DatabaseUrl {
    /// Which store this is, as the start log line and `check-config` show it: a SQLite file by its
    /// absolute path (a relative one resolved against the working directory, so the operator sees
    /// which file it is), a Postgres database by its URL without the password (nor any query
    /// parameter that may hold one).
    pub fn shown(&self) -> String {
        match self {
            Self::Sqlite(path) => {
                let absolute = std::path::absolute(path).unwrap_or_else(|_| path.clone());
                format!("sqlite://{}", absolute.display())
            }
            Self::Postgres(url) => match Url::parse(url.expose()) {
                Ok(parsed) => {
                    let mut shown = parsed.clone();
                    let _ = shown.set_password(None);
                    let query = parsed.query().map(redact_query);
                    shown.set_query(query.as_deref());
                    shown.to_string()
                }
                Err(_) => format!("postgres://{REDACTED}"),
            },
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Self::Postgres(url) => f.debug_tuple("Postgres").field(url).finish(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// `RELAY_SEND_WAIT_MS`, default 3000: how long `/message` waits for the first attempt.
    pub send_wait: Duration,
    /// `RELAY_RETRY_JOINCHAT`: delays between attempts towards JoinChat.
    pub retry_joinchat: Vec<Duration>,
    /// `RELAY_RETRY_BONYCHAT`: delays between attempts towards BonyChat.
    pub retry_bonychat: Vec<Duration>,
    /// `RELAY_LEASE_SECS`, default 15: how long a claim holds a job without being renewed; the
    /// longest another replica waits to take over the jobs of one that died.
    pub lease: Duration,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `RELAY_LOG_FORMAT`, default `pretty`.
    pub log_format: LogFormat,
    /// `RELAY_METRICS_ADDR`, default `127.0.0.1:9090`: kept off the public port.
    pub metrics_addr: SocketAddr,
    /// `OTEL_*` (SPEC §6): how spans are exported, or `None` when traces are off.
    pub traces: Option<traces::OtlpConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Every variable the relay reads besides [`SINGLE_CHANNEL_VARS`], for the unknown-variable warning.
const KNOWN_VARS: &[&str] = &[
    "RELAY_ADDR",
    "BONYCHAT_TIMEOUT_MS",
    "RELAY_CHANNELS_FILE",
    "JOINCHAT_CONNECT_TIMEOUT_MS",
    "JOINCHAT_TIMEOUT_MS",
    "MESSENGER_GRAPH_URL",
    "MESSENGER_GRAPH_TIMEOUT_MS",
    "RELAY_DATABASE_URL",
    "RELAY_SEND_WAIT_MS",
    "RELAY_RETRY_JOINCHAT",
    "RELAY_RETRY_BONYCHAT",
    "RELAY_LEASE_SECS",
    "RELAY_RETENTION",
    "RELAY_SHUTDOWN_GRACE_SECS",
    "RELAY_ADMIN_TOKEN",
    "RELAY_ADMIN_TOKEN_PREVIOUS",
    "RELAY_METRICS_ADDR",
    "RELAY_LOG_FORMAT",
    "RELAY_MAX_QUEUED_OUTBOUND",
    "RELAY_MAX_QUEUED_INBOUND",
    "RELAY_MAX_QUEUED_PER_CONTACT",
    "RELAY_DATABASE_POOL_SIZE",
    "RELAY_DATABASE_CONNECT_TIMEOUT_MS",
    "RELAY_DATABASE_STATEMENT_TIMEOUT_MS",
    "RELAY_MAX_CONNECTIONS",
    "RELAY_HEADER_READ_TIMEOUT_MS",
    "RELAY_IDLE_TIMEOUT_SECS",
    "RELAY_BODY_READ_TIMEOUT_MS",
    "RELAY_MAX_BODY_BYTES_IN_FLIGHT",
    "RELAY_SANDBOX",
];

/// The variables that also take `<NAME>_FILE`. Every secret but `RELAY_DATABASE_URL` also
/// takes `<NAME>_PREVIOUS` during a rotation (a database password is rotated with the
/// database's own overlap and a restart).
const SECRET_VARS: &[&str] = &[
    "BONYCHAT_API_TOKEN",
    "BONYCHAT_API_TOKEN_PREVIOUS",
    "JOINCHAT_API_SECRET",
    "JOINCHAT_API_SECRET_PREVIOUS",
    "MESSENGER_APP_SECRET",
    "MESSENGER_APP_SECRET_PREVIOUS",
    "MESSENGER_VERIFY_TOKEN",
    "MESSENGER_VERIFY_TOKEN_PREVIOUS",
    "MESSENGER_PAGE_ACCESS_TOKEN",
    "MESSENGER_PAGE_ACCESS_TOKEN_PREVIOUS",
    "RELAY_ADMIN_TOKEN",
    "RELAY_ADMIN_TOKEN_PREVIOUS",
    "RELAY_DATABASE_URL",
];

/// The tags Messenger accepts since March 2020; JoinChat's own list predates that.
const CURRENT_MESSAGE_TAGS: &[&str] =
    &["CONFIRMED_EVENT_UPDATE", "POST_PURCHASE_UPDATE", "ACCOUNT_UPDATE", "HUMAN_AGENT"];

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let mut warnings = unknown_variable_warnings(env);

        let server = ServerConfig {
            addr: env.parsed("RELAY_ADDR", default_addr([0, 0, 0, 0], 8080), parse_addr)?,
            shutdown_grace: env.parsed("RELAY_SHUTDOWN_GRACE_SECS", Duration::from_secs(10), grace_secs)?,
            admin_token: env.rotating("RELAY_ADMIN_TOKEN")?,
            sandbox: env.parsed("RELAY_SANDBOX", false, parse_bool)?,
            limits: ServerLimits::from_env(env)?,
        };

        let upstreams = UpstreamConfig {
            bonychat_timeout: env.parsed("BONYCHAT_TIMEOUT_MS", Duration::from_secs(10), timeout_millis)?,
            joinchat_connect_timeout: env.parsed(
                "JOINCHAT_CONNECT_TIMEOUT_MS",
                Duration::from_secs(5),
                timeout_millis,
            )?,
            joinchat_timeout: env.parsed("JOINCHAT_TIMEOUT_MS", Duration::from_secs(15), timeout_millis)?,
            graph_url: env.parsed(
                "MESSENGER_GRAPH_URL",
                Endpoint::default_of("https://graph.facebook.com/v21.0"),
                |raw| http_url(raw).map(Endpoint),
            )?,
            graph_timeout: env.parsed("MESSENGER_GRAPH_TIMEOUT_MS", Duration::from_secs(2), timeout_millis)?,
        };
        if upstreams.joinchat_connect_timeout > upstreams.joinchat_timeout {
            return Err(ConfigError::new(
                "JOINCHAT_CONNECT_TIMEOUT_MS",
                "must not exceed JOINCHAT_TIMEOUT_MS (the whole request includes connecting)",
            ));
        }

        let store = StoreConfig::from_env(env)?;
        let channels = Channels::load(env, store.intake)?;

        let delivery = DeliveryConfig {
            send_wait: env.parsed("RELAY_SEND_WAIT_MS", Duration::from_secs(3), send_wait_millis)?,
            retry_joinchat: env.parsed(
                "RELAY_RETRY_JOINCHAT",
                parse_duration_list("1s,5s,30s,2m,5m,15m,30m,1h").expect("default schedule is valid"),
                retry_schedule,
            )?,
            retry_bonychat: env.parsed(
                "RELAY_RETRY_BONYCHAT",
                parse_duration_list("5s,30s,2m,5m,30m,2h,5h,10h,10h").expect("default schedule is valid"),
                retry_schedule,
            )?,
            lease: env.parsed("RELAY_LEASE_SECS", Duration::from_secs(15), lease_secs)?,
        };

        let telemetry = TelemetryConfig {
            log_format: env.parsed("RELAY_LOG_FORMAT", LogFormat::Pretty, |raw| match raw {
                "pretty" => Ok(LogFormat::Pretty),
                "json" => Ok(LogFormat::Json),
                other => Err(format!("`{other}` is neither `pretty` nor `json`")),
            })?,
            metrics_addr: env.parsed("RELAY_METRICS_ADDR", default_addr([127, 0, 0, 1], 9090), parse_addr)?,
            traces: traces::from_env(env)?,
        };

        check_admin_token(server.admin_token.as_ref(), &channels)?;
        warnings.extend(admin_token_warning(server.admin_token.as_ref()));
        warnings.extend(channels.warnings.iter().cloned());
        warnings.extend(sandbox_warnings(&server, &channels));
        warnings.extend(traces::warnings(env, telemetry.traces.as_ref()));

        Ok(Self { server, upstreams, channels, store, delivery, telemetry, warnings, env: env.clone() })
    }

    /// The channels and the admin token as the environment and the files it names describe
    /// them now: what `SIGHUP` applies. Refused like at start, and for the same reasons; the
    /// running configuration is left alone by the caller when it is.
    ///
    /// The admin API is switched on or off by a restart (its routes exist or not), so a reload
    /// may change the token it takes but not take it away.
    pub fn reload(&self) -> Result<Reloaded, ConfigError> {
        let channels = Channels::load(&self.env, self.store.intake)?;
        let admin_token = self.env.rotating("RELAY_ADMIN_TOKEN")?;
        if self.server.admin_token.is_some() && admin_token.is_none() {
            return Err(ConfigError::new(
                "RELAY_ADMIN_TOKEN",
                "is no longer set: the admin API is switched off by a restart, not by a reload",
            ));
        }
        check_admin_token(admin_token.as_ref(), &channels)?;
        let mut warnings: Vec<String> = admin_token_warning(admin_token.as_ref()).into_iter().collect();
        warnings.extend(channels.warnings.iter().cloned());
        Ok(Reloaded { channels, admin_token, warnings })
    }

    /// Every variable with the value in effect, defaults included, for `check-config`. Secrets
    /// are `[redacted]` and URLs lose their credentials, so the list can be pasted into a ticket.
    pub fn effective(&self) -> Vec<(String, String)> {
        let secret = |s: Option<&Secret>| s.map_or_else(unset, |_| REDACTED.to_owned());
        let previous = |s: Option<&Rotating>| secret(s.and_then(|s| s.previous.as_ref()));
        let current = |s: Option<&Rotating>| secret(s.map(|s| &s.current));
        let url = Endpoint::shown;
        let ms = |d: Duration| d.as_millis().to_string();
        let secs = |d: Duration| d.as_secs().to_string();
        let list = |ds: &[Duration]| ds.iter().map(|d| format_duration(*d)).collect::<Vec<_>>().join(",");
        let Self { server, upstreams, channels, store, delivery, telemetry, warnings: _, env: _ } = self;
        let mut lines: Vec<(String, String)> = vec![
            ("RELAY_ADDR".into(), server.addr.to_string()),
            ("RELAY_SHUTDOWN_GRACE_SECS".into(), secs(server.shutdown_grace)),
            ("RELAY_ADMIN_TOKEN".into(), current(server.admin_token.as_ref())),
            ("RELAY_ADMIN_TOKEN_PREVIOUS".into(), previous(server.admin_token.as_ref())),
            ("RELAY_SANDBOX".into(), server.sandbox.to_string()),
            ("RELAY_MAX_CONNECTIONS".into(), server.limits.max_connections.to_string()),
            ("RELAY_HEADER_READ_TIMEOUT_MS".into(), ms(server.limits.header_read_timeout)),
            ("RELAY_IDLE_TIMEOUT_SECS".into(), secs(server.limits.idle_timeout)),
            ("RELAY_BODY_READ_TIMEOUT_MS".into(), ms(server.limits.body_read_timeout)),
            ("RELAY_MAX_BODY_BYTES_IN_FLIGHT".into(), server.limits.max_body_bytes_in_flight.to_string()),
            ("RELAY_METRICS_ADDR".into(), telemetry.metrics_addr.to_string()),
            (
                "RELAY_LOG_FORMAT".into(),
                match telemetry.log_format {
                    LogFormat::Pretty => "pretty",
                    LogFormat::Json => "json",
                }
                .to_owned(),
            ),
            (
                CHANNELS_FILE_VAR.into(),
                match &channels.source {
                    ChannelsSource::Environment => unset(),
                    ChannelsSource::File(path) => path.display().to_string(),
                },
            ),
            ("BONYCHAT_TIMEOUT_MS".into(), ms(upstreams.bonychat_timeout)),
            ("JOINCHAT_CONNECT_TIMEOUT_MS".into(), ms(upstreams.joinchat_connect_timeout)),
            ("JOINCHAT_TIMEOUT_MS".into(), ms(upstreams.joinchat_timeout)),
            ("MESSENGER_GRAPH_URL".into(), url(&upstreams.graph_url)),
            ("MESSENGER_GRAPH_TIMEOUT_MS".into(), ms(upstreams.graph_timeout)),
            (
                "RELAY_DATABASE_URL".into(),
                match &store.database_url {
                    // The file it is, wherever check-config runs from: a relative path is
                    // resolved against the working directory, as the relay resolves it.
                    sqlite @ DatabaseUrl::Sqlite(_) => sqlite.shown(),
                    // Query parameters may carry the password too: nothing of it is shown.
                    DatabaseUrl::Postgres(_) => format!("postgres://{REDACTED}"),
                },
            ),
            ("RELAY_RETENTION".into(), format_duration(store.retention)),
            ("RELAY_MAX_QUEUED_OUTBOUND".into(), store.intake.outbound.to_string()),
            ("RELAY_MAX_QUEUED_INBOUND".into(), store.intake.inbound.to_string()),
            ("RELAY_MAX_QUEUED_PER_CONTACT".into(), store.intake.per_contact.to_string()),
            ("RELAY_DATABASE_POOL_SIZE".into(), store.postgres.pool_size.to_string()),
            ("RELAY_DATABASE_CONNECT_TIMEOUT_MS".into(), ms(store.postgres.connect_timeout)),
            ("RELAY_DATABASE_STATEMENT_TIMEOUT_MS".into(), ms(store.postgres.statement_timeout)),
            ("RELAY_SEND_WAIT_MS".into(), ms(delivery.send_wait)),
            ("RELAY_RETRY_JOINCHAT".into(), list(&delivery.retry_joinchat)),
            ("RELAY_RETRY_BONYCHAT".into(), list(&delivery.retry_bonychat)),
            ("RELAY_LEASE_SECS".into(), delivery.lease.as_secs().to_string()),
        ];
        let by_file = matches!(channels.source, ChannelsSource::File(_));
        for (name, app) in &channels.apps {
            let AppConfig { app_secret, verify_token } = app;
            let key = |file_key: &str, var: &str| {
                if by_file { format!("apps.{name}.{file_key}") } else { var.to_owned() }
            };
            lines.extend([
                (key("app_secret", "MESSENGER_APP_SECRET"), REDACTED.to_owned()),
                (key("app_secret_previous", "MESSENGER_APP_SECRET_PREVIOUS"), previous(Some(app_secret))),
                (key("verify_token", "MESSENGER_VERIFY_TOKEN"), REDACTED.to_owned()),
                (key("verify_token_previous", "MESSENGER_VERIFY_TOKEN_PREVIOUS"), previous(Some(verify_token))),
            ]);
        }
        for (name, channel) in &channels.channels {
            let ChannelConfig { bonychat, joinchat, messenger_app, page_access_token, max_queued } = channel;
            let key = |file_key: &str, var: &str| {
                if by_file { format!("channels.{name}.{file_key}") } else { var.to_owned() }
            };
            lines.extend([
                (key("bonychat_channel_id", "BONYCHAT_CHANNEL_ID"), bonychat.channel_id.clone()),
                (key("bonychat_api_token", "BONYCHAT_API_TOKEN"), REDACTED.to_owned()),
                (
                    key("bonychat_api_token_previous", "BONYCHAT_API_TOKEN_PREVIOUS"),
                    previous(Some(&bonychat.api_token)),
                ),
                (key("bonychat_webhook_url", "BONYCHAT_WEBHOOK_URL"), url(&bonychat.webhook_url)),
                (key("joinchat_api_url", "JOINCHAT_API_URL"), url(&joinchat.api_url)),
                (key("joinchat_page_id", "JOINCHAT_PAGE_ID"), joinchat.page_id.clone()),
                (key("joinchat_api_secret", "JOINCHAT_API_SECRET"), REDACTED.to_owned()),
                (
                    key("joinchat_api_secret_previous", "JOINCHAT_API_SECRET_PREVIOUS"),
                    previous(Some(&joinchat.api_secret)),
                ),
                (
                    key("joinchat_recipient_field", "JOINCHAT_RECIPIENT_FIELD"),
                    format!("{:?}", joinchat.recipient_field).to_lowercase(),
                ),
                (
                    key("joinchat_message_tag", "JOINCHAT_MESSAGE_TAG"),
                    joinchat.message_tag.clone().unwrap_or_else(unset),
                ),
                (key("joinchat_order_gap_secs", "JOINCHAT_ORDER_GAP_SECS"), secs(joinchat.order_gap)),
                (
                    key("joinchat_max_sends_per_sec", "JOINCHAT_MAX_SENDS_PER_SEC"),
                    joinchat.max_sends_per_sec.to_string(),
                ),
                (
                    key("messenger_page_access_token", "MESSENGER_PAGE_ACCESS_TOKEN"),
                    current(page_access_token.as_ref()),
                ),
                (
                    key("messenger_page_access_token_previous", "MESSENGER_PAGE_ACCESS_TOKEN_PREVIOUS"),
                    previous(page_access_token.as_ref()),
                ),
            ]);
            if by_file {
                lines.push((key("messenger_app", ""), messenger_app.clone()));
                lines.push((key("max_queued", ""), max_queued.outbound.to_string()));
            }
        }
        lines.extend(traces::effective(telemetry.traces.as_ref()));
        lines
    }
}

/// What a reload read: every channel and app, and the admin token.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub channels: Channels,
    pub admin_token: Option<Rotating>,
    /// Odd but accepted values, the channels' included, for the log.
    pub warnings: Vec<String>,
}

/// The admin token must not be a token BonyChat holds: with it, BonyChat could also use /admin.
/// Every value counts, current and previous on both sides: a token dropped from BonyChat only a
/// moment ago is still live in the relay while the rotation lasts.
fn check_admin_token(admin: Option<&Rotating>, channels: &Channels) -> Result<(), ConfigError> {
    let Some(admin) = admin else { return Ok(()) };
    let Some(owner) = channels.token_owner(admin) else { return Ok(()) };
    let held_as = match channels.source {
        ChannelsSource::Environment => "BONYCHAT_API_TOKEN".to_owned(),
        ChannelsSource::File(_) => format!("the BonyChat API token of channel {owner}"),
    };
    let current_is_held = channels.channels[owner].bonychat.api_token.values().any(|token| token == &admin.current);
    let var = if current_is_held { "RELAY_ADMIN_TOKEN" } else { "RELAY_ADMIN_TOKEN_PREVIOUS" };
    Err(ConfigError::new(
        var,
        format!(
            "must differ from {held_as}, current and previous (BonyChat holds that token; with it, it could also \
             use /admin)"
        ),
    ))
}

fn admin_token_warning(admin: Option<&Rotating>) -> Option<String> {
    admin.and_then(|admin| channels::same_previous_warning("RELAY_ADMIN_TOKEN_PREVIOUS", "RELAY_ADMIN_TOKEN", admin))
}

const REDACTED: &str = "[redacted]";

fn unset() -> String {
    "(unset)".to_owned()
}

/// The largest whole unit of [`parse_duration`]'s, so the value reads as it would be written.
fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms != 0 && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

fn parse_bool(raw: &str) -> Result<bool, String> {
    match raw {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!("`{other}` is neither `true` nor `false`")),
    }
}

/// The sandbox's stand-ins answer on the relay's own port: upstream URLs that point at
/// `/sandbox/` elsewhere, or with the sandbox off, would fail every delivery, and only later.
/// And whoever reaches that port reads and fills the stand-ins' logs: a sandbox listening
/// beyond the loopback is most likely one left on by mistake.
fn sandbox_warnings(server: &ServerConfig, channels: &Channels) -> Vec<String> {
    let mut warnings = Vec::new();
    if server.sandbox && !server.addr.ip().to_canonical().is_loopback() {
        warnings.push(format!(
            "RELAY_SANDBOX=true ON A NON-LOOPBACK ADDRESS: RELAY_ADDR={} is not a loopback address, so anyone \
             who can reach it can read what the stand-ins under /sandbox/ received and post to them. Listen on \
             127.0.0.1 (or publish the port on the host's loopback only, as docker-compose's sandbox profile \
             does), and never turn the sandbox on in production",
            server.addr
        ));
    }
    let by_file = matches!(channels.source, ChannelsSource::File(_));
    let endpoints = channels.channels.iter().flat_map(|(name, channel)| {
        let place = |key: &str, var: &str| if by_file { format!("[channels.{name}] {key}") } else { var.to_owned() };
        [
            (place("joinchat_api_url", "JOINCHAT_API_URL"), &channel.joinchat.api_url),
            (place("bonychat_webhook_url", "BONYCHAT_WEBHOOK_URL"), &channel.bonychat.webhook_url),
        ]
    });
    for (var, endpoint) in endpoints {
        let url = endpoint.url();
        if !url.path().starts_with("/sandbox/") {
            continue;
        }
        if !server.sandbox {
            warnings.push(format!(
                "{var} points at /sandbox/ but RELAY_SANDBOX is not true: the stand-ins are not mounted"
            ));
        } else if server.addr.port() != 0 && url.port_or_known_default() != Some(server.addr.port()) {
            warnings.push(format!(
                "{var} points at /sandbox/ on port {}, but the relay listens on {}: set it to the relay's own address",
                url.port_or_known_default().unwrap_or(0),
                server.addr
            ));
        }
    }
    warnings
}

impl StoreConfig {
    /// Only the store's variables: what `bonychat-relay jobs …` needs.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            database_url: match env.secret("RELAY_DATABASE_URL")? {
                None => DatabaseUrl::Sqlite(PathBuf::from("data/relay.db")),
                Some(url) => parse_database_url(url.expose())
                    .map_err(|problem| ConfigError::new("RELAY_DATABASE_URL", problem))?,
            },
            retention: env.parsed("RELAY_RETENTION", Duration::from_secs(7 * 86_400), retention)?,
            intake: IntakeCaps {
                outbound: env.parsed("RELAY_MAX_QUEUED_OUTBOUND", IntakeCaps::DEFAULT.outbound, positive_count)?,
                inbound: env.parsed("RELAY_MAX_QUEUED_INBOUND", IntakeCaps::DEFAULT.inbound, positive_count)?,
                per_contact: env.parsed(
                    "RELAY_MAX_QUEUED_PER_CONTACT",
                    IntakeCaps::DEFAULT.per_contact,
                    positive_count,
                )?,
            },
            postgres: PostgresOptions {
                pool_size: env.parsed("RELAY_DATABASE_POOL_SIZE", PostgresOptions::DEFAULT.pool_size, pool_size)?,
                connect_timeout: env.parsed(
                    "RELAY_DATABASE_CONNECT_TIMEOUT_MS",
                    PostgresOptions::DEFAULT.connect_timeout,
                    timeout_millis,
                )?,
                statement_timeout: env.parsed(
                    "RELAY_DATABASE_STATEMENT_TIMEOUT_MS",
                    PostgresOptions::DEFAULT.statement_timeout,
                    timeout_millis,
                )?,
            },
        })
    }
}

impl ServerLimits {
    fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let at_least = |min: u64| {
            move |raw: &str| match parse_u64(raw)? {
                n if n < min => Err(format!("must be at least {min}")),
                n => usize::try_from(n).map_err(|_| "is too large".to_owned()),
            }
        };
        Ok(Self {
            max_connections: env.parsed("RELAY_MAX_CONNECTIONS", 1024, at_least(1))?,
            header_read_timeout: env.parsed("RELAY_HEADER_READ_TIMEOUT_MS", Duration::from_secs(10), timeout_millis)?,
            idle_timeout: env.parsed("RELAY_IDLE_TIMEOUT_SECS", Duration::from_secs(60), |raw| {
                match parse_u64(raw)? {
                    0 => Err("must be greater than 0".into()),
                    secs @ 1..=MAX_IDLE_SECS => Ok(Duration::from_secs(secs)),
                    _ => Err(format!("must be at most {MAX_IDLE_SECS} seconds (an hour)")),
                }
            })?,
            body_read_timeout: env.parsed("RELAY_BODY_READ_TIMEOUT_MS", Duration::from_secs(10), timeout_millis)?,
            // One whole `/message` body must fit, or no `/message` could ever be read.
            max_body_bytes_in_flight: env.parsed("RELAY_MAX_BODY_BYTES_IN_FLIGHT", 64 << 20, at_least(64 << 10))?,
        })
    }
}

fn unknown_variable_warnings(env: &Env) -> Vec<String> {
    let prefixes = ["RELAY_", "BONYCHAT_", "JOINCHAT_", "MESSENGER_"];
    let mut unknown: Vec<&str> = env
        .names()
        .filter(|name| prefixes.iter().any(|p| name.starts_with(p)))
        .filter(|name| !KNOWN_VARS.contains(name) && !SINGLE_CHANNEL_VARS.contains(name))
        .filter(|name| !name.strip_suffix("_FILE").is_some_and(|base| SECRET_VARS.contains(&base)))
        .collect();
    unknown.sort_unstable();
    unknown.into_iter().map(|name| format!("{name} is set but the relay does not read it (a typo?)")).collect()
}

fn default_addr(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn parse_addr(raw: &str) -> Result<SocketAddr, String> {
    raw.parse().map_err(|_| format!("`{raw}` is not an address such as 0.0.0.0:8080"))
}

/// Connections per replica: Postgres serves a few hundred in all by default.
fn pool_size(raw: &str) -> Result<u32, String> {
    match parse_u64(raw)? {
        n @ 1..=100 => Ok(u32::try_from(n).unwrap_or(100)),
        0 => Err("must be at least 1".into()),
        _ => Err("must be at most 100 (connections per replica)".into()),
    }
}

fn positive_count(raw: &str) -> Result<u64, String> {
    match parse_u64(raw)? {
        0 => Err("must be at least 1".into()),
        n => Ok(n),
    }
}

/// Upper bounds of the duration variables. Beyond them a value is a slip (a unit mistaken, a
/// zero too many), and far beyond them time arithmetic on it would overflow.
const MAX_SHUTDOWN_GRACE_SECS: u64 = 3600;
const MAX_IDLE_SECS: u64 = 3600;
const MAX_SEND_WAIT_MS: u64 = 60_000;
const MIN_LEASE_SECS: u64 = 2;
const MAX_LEASE_SECS: u64 = 300;
const MAX_TIMEOUT_MS: u64 = 600_000;
const MAX_RETRY_DELAY: Duration = Duration::from_secs(7 * 86_400);
const MAX_RETENTION: Duration = Duration::from_secs(3650 * 86_400);

fn grace_secs(raw: &str) -> Result<Duration, String> {
    match parse_u64(raw)? {
        secs @ 0..=MAX_SHUTDOWN_GRACE_SECS => Ok(Duration::from_secs(secs)),
        _ => Err(format!("must be at most {MAX_SHUTDOWN_GRACE_SECS} seconds (an hour)")),
    }
}

/// How long `/message` waits for the first attempt: BonyChat should not wait longer than a minute.
fn send_wait_millis(raw: &str) -> Result<Duration, String> {
    match parse_u64(raw)? {
        ms @ 0..=MAX_SEND_WAIT_MS => Ok(Duration::from_millis(ms)),
        _ => {
            Err(format!("must be at most {MAX_SEND_WAIT_MS} (a minute): BonyChat should not wait longer for an answer"))
        }
    }
}

/// A lease is renewed every third of it: under 2 s, a renewal would compete with the attempt
/// it keeps alive; past 5 minutes, a dead replica's contacts would wait that long.
fn lease_secs(raw: &str) -> Result<Duration, String> {
    match parse_u64(raw)? {
        secs @ MIN_LEASE_SECS..=MAX_LEASE_SECS => Ok(Duration::from_secs(secs)),
        secs if secs < MIN_LEASE_SECS => Err(format!("must be at least {MIN_LEASE_SECS} seconds")),
        _ => Err(format!("must be at most {MAX_LEASE_SECS} seconds (five minutes)")),
    }
}

fn retention(raw: &str) -> Result<Duration, String> {
    match parse_duration(raw)? {
        retention if retention > MAX_RETENTION => Err(format!("`{raw}` is longer than the 3650d (ten years) maximum")),
        retention => Ok(retention),
    }
}

/// An upstream timeout: more than 0, at most ten minutes.
fn timeout_millis(raw: &str) -> Result<Duration, String> {
    match parse_u64(raw)? {
        0 => Err("must be greater than 0".into()),
        ms @ 1..=MAX_TIMEOUT_MS => Ok(Duration::from_millis(ms)),
        _ => Err(format!("must be at most {MAX_TIMEOUT_MS} (ten minutes)")),
    }
}

/// A retry schedule: each delay at most seven days.
fn retry_schedule(raw: &str) -> Result<Vec<Duration>, String> {
    let delays = parse_duration_list(raw)?;
    match delays.iter().position(|delay| *delay > MAX_RETRY_DELAY) {
        Some(i) => Err(format!("`{}` is longer than the 7d maximum", raw.split(',').nth(i).unwrap_or(raw).trim())),
        None => Ok(delays),
    }
}

/// Parses an http(s) URL. Errors show the value with any `user:password@` replaced by `***@`.
fn http_url(raw: &str) -> Result<Url, String> {
    let shown = redact_userinfo(raw);
    let url = Url::parse(raw).map_err(|e| format!("`{shown}` is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("`{shown}` is not an http(s) URL"));
    }
    refuse_example_url(&url, &shown)?;
    Ok(url)
}

/// Host names reserved for documentation (RFC 2606, RFC 6761): `example`, `example.com`,
/// `example.net`, `example.org`, and every name under them. No upstream or database answers
/// there, so a URL naming one is an example value left in (`config/example.env`'s
/// `app.bonychat.example`), never a real one.
fn is_documentation_host(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    ["example", "example.com", "example.net", "example.org"]
        .iter()
        .any(|reserved| host == *reserved || host.strip_suffix(reserved).is_some_and(|rest| rest.ends_with('.')))
}

/// Refuses a URL that is still an example: its host is reserved for documentation, or its
/// password is a placeholder. `shown` is the URL as errors may show it (or only its host, for
/// one that is a secret).
fn refuse_example_url(url: &Url, shown: &str) -> Result<(), String> {
    if let Some(host) = url.host_str().filter(|host| is_documentation_host(host)) {
        return Err(format!(
            "`{shown}` is still an example value: {host} is a name reserved for documentation (RFC 2606), where no \
             server answers; set the real URL"
        ));
    }
    if url.password().is_some_and(env::is_placeholder) {
        return Err(format!(
            "the password in `{}` is still a placeholder (change-me, as in the examples): replace it with the real one",
            redact_userinfo(shown)
        ));
    }
    Ok(())
}

/// Query parameters whose value may be a credential (`access_token`, `api_key`, `password`,
/// `sig`…): their values are never shown. Erring on the side of hiding: a parameter hidden
/// needlessly costs nothing.
fn is_secret_parameter(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["token", "secret", "pass", "pwd", "key", "sig", "auth", "credential", "code"]
        .iter()
        .any(|word| name.contains(word))
}

/// `url` as logs and `check-config` show it: any `user:password@` replaced by `***@` and the
/// value of each query parameter that may be a credential by `[redacted]`, the rest as it is
/// (a log line saying where a request went must not say with which key).
pub fn shown_url(url: &Url) -> String {
    let mut shown = url.clone();
    if !shown.username().is_empty() || shown.password().is_some() {
        // Never fails for the http(s) and postgres URLs this is given, which have a host.
        let _ = shown.set_password(None);
        let _ = shown.set_username("***");
    }
    let query = url.query().map(redact_query);
    shown.set_query(query.as_deref());
    shown.to_string()
}

/// A query string with the value of each parameter that may be a credential replaced by
/// `[redacted]`, the rest left exactly as written.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _))
                if url::form_urlencoded::parse(name.as_bytes()).any(|(name, _)| is_secret_parameter(&name)) =>
            {
                format!("{name}={REDACTED}")
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `raw` with everything between the scheme's `://` (or the start) and the last `@` replaced by
/// `***`. Errs on the side of hiding: a malformed URL may hold an unencoded password with a `/`
/// in it, so the last `@` anywhere counts, not only the one inside a well-formed authority.
fn redact_userinfo(raw: &str) -> std::borrow::Cow<'_, str> {
    let start = raw.find("://").map_or(0, |i| i + 3);
    match raw[start..].rfind('@') {
        Some(at) => format!("{}***{}", &raw[..start], &raw[start + at..]).into(),
        None => raw.into(),
    }
}

/// An upstream's URL. It may carry credentials (`user:password@`), so its `Debug` hides them
/// like every other secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint(Url);

impl Endpoint {
    fn default_of(url: &str) -> Self {
        Self(Url::parse(url).expect("default URLs are valid"))
    }

    pub fn url(&self) -> &Url {
        &self.0
    }
}

impl Endpoint {
    /// The URL with its credentials hidden ([`shown_url`]): for logs and `check-config`.
    pub fn shown(&self) -> String {
        shown_url(&self.0)
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

fn page_id_problem(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
        Ok(raw.to_owned())
    } else {
        Err(format!("`{raw}` is not a Page id (digits only, as shown under JoinChat's Settings → API)"))
    }
}

fn order_gap(raw: &str) -> Result<Duration, String> {
    match parse_u64(raw)? {
        secs @ 0..=3600 => Ok(Duration::from_secs(secs)),
        _ => Err("must be at most 3600 seconds".into()),
    }
}

fn parse_recipient_field(raw: &str) -> Result<RecipientField, String> {
    match raw {
        "auto" => Ok(RecipientField::Auto),
        "id" => Ok(RecipientField::Id),
        "phone" => Ok(RecipientField::Phone),
        "email" => Ok(RecipientField::Email),
        "uuid" => Ok(RecipientField::Uuid),
        other => Err(format!("`{other}` is not one of auto, id, phone, email, uuid")),
    }
}

/// `sqlite://data/relay.db` (relative), `sqlite:///var/lib/relay.db` (absolute) or `postgres://…`.
fn parse_database_url(raw: &str) -> Result<DatabaseUrl, String> {
    let raw = raw.trim();
    if let Some(rest) = raw.strip_prefix("sqlite:") {
        return sqlite_path(raw, rest).map(DatabaseUrl::Sqlite);
    }
    if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
        // The URL is a secret: a refusal shows its host at most.
        if let Ok(url) = Url::parse(raw) {
            refuse_example_url(&url, &format!("{}://{}", url.scheme(), url.host_str().unwrap_or("")))?;
        }
        return Ok(DatabaseUrl::Postgres(Secret::new(raw)));
    }
    Err("must start with sqlite:// or postgres://".into())
}

/// The top-level directories of the Filesystem Hierarchy Standard: a relative SQLite path
/// starting with one (`sqlite://var/lib/relay.db`) is an absolute path that lost a slash.
const ROOT_DIRECTORIES: &[&str] = &[
    "bin", "boot", "dev", "etc", "home", "lib", "media", "mnt", "opt", "proc", "root", "run", "srv", "sys", "tmp",
    "usr", "var",
];

/// The file of a `sqlite:` URL: `sqlite://PATH` is relative to the working directory,
/// `sqlite:///PATH` absolute. A form that another tool reads as another file is refused, since
/// the relay would create a new, empty store there without a word: the queued jobs would seem
/// gone, and a second relay could run on the real store.
fn sqlite_path(raw: &str, after_scheme: &str) -> Result<PathBuf, String> {
    let forms = "write sqlite:///PATH for an absolute path (sqlite:///var/lib/bonychat-relay/relay.db), or \
                 sqlite://PATH for one relative to the working directory (sqlite://data/relay.db)";
    let Some(path) = after_scheme.strip_prefix("//") else {
        // sqlx reads `sqlite:x` as relative and `sqlite:/x` as absolute, other tools otherwise,
        // and either may be a slash lost from the other form: one spelling only.
        return Err(format!("`{raw}` is neither form of a sqlite URL: {forms}"));
    };
    if path.is_empty() {
        return Err("sqlite:// needs a file path, e.g. sqlite://data/relay.db".into());
    }
    if path.starts_with("//") {
        return Err(format!(
            "`{raw}` has four slashes (SQLAlchemy's absolute form, where sqlite:/// is a relative path): here \
             sqlite:/// is already absolute; {forms}"
        ));
    }
    if path.contains('?') {
        return Err(format!(
            "`{raw}` carries parameters (`?…`): the relay takes none, and the file would be named with them; {forms}"
        ));
    }
    if path == "~" || path.starts_with("~/") {
        return Err(format!("`{raw}`: `~` is not expanded (it would be a directory named ~): {forms}"));
    }
    let first = path.split('/').next().unwrap_or("");
    if first.eq_ignore_ascii_case("localhost") {
        return Err(format!(
            "`{raw}` names a host, as file:// URLs may: here it would be a directory named {first} under the \
             working directory; {forms}"
        ));
    }
    if !path.starts_with('/') && ROOT_DIRECTORIES.contains(&first) {
        return Err(format!(
            "`{raw}` is relative to the working directory, yet reads like /{path} with a slash lost: write \
             sqlite:///{path} for that file, or sqlite://./{path} for a directory {first} under the working \
             directory"
        ));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn required() -> Vec<(&'static str, &'static str)> {
        vec![
            ("BONYCHAT_CHANNEL_ID", "gfd8g7fd89dgfd"),
            ("BONYCHAT_API_TOKEN", "bony-token"),
            ("BONYCHAT_WEBHOOK_URL", "https://app.bonychat.test/custom/channel/webhook/"),
            ("JOINCHAT_PAGE_ID", "510249619162304"),
            ("JOINCHAT_API_SECRET", "join-secret"),
            ("MESSENGER_APP_SECRET", "app-secret"),
            ("MESSENGER_VERIFY_TOKEN", "verify-token"),
        ]
    }

    fn with(overrides: &[(&'static str, &'static str)]) -> Env {
        let mut vars = required();
        vars.retain(|(k, _)| !overrides.iter().any(|(o, _)| o == k));
        vars.extend_from_slice(overrides);
        Env::from_pairs(vars)
    }

    #[test]
    fn the_required_variables_alone_give_the_documented_defaults() {
        let config = Config::from_env(&with(&[])).unwrap();

        assert_eq!(config.server.addr.to_string(), "0.0.0.0:8080");
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(10));
        assert!(config.server.admin_token.is_none());
        assert_eq!(
            config.channels.channels["default"].joinchat.api_url.url().as_str(),
            "https://joinchat.ai/api/send_message"
        );
        assert_eq!(config.channels.channels["default"].joinchat.recipient_field, RecipientField::Auto);
        assert_eq!(config.channels.channels["default"].joinchat.message_tag, None);
        assert_eq!(config.channels.channels["default"].joinchat.order_gap, Duration::from_secs(1));
        assert_eq!(config.upstreams.joinchat_connect_timeout, Duration::from_secs(5));
        assert_eq!(config.upstreams.joinchat_timeout, Duration::from_secs(15));
        assert!(config.channels.channels["default"].page_access_token.is_none());
        assert_eq!(config.upstreams.graph_url.url().as_str(), "https://graph.facebook.com/v21.0");
        assert_eq!(config.store.database_url, DatabaseUrl::Sqlite("data/relay.db".into()));
        assert_eq!(config.store.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(config.delivery.send_wait, Duration::from_secs(3));
        assert_eq!(config.delivery.retry_joinchat.len(), 8);
        assert_eq!(config.delivery.retry_joinchat[7], Duration::from_secs(3600));
        assert_eq!(config.delivery.retry_bonychat.len(), 9);
        assert_eq!(config.delivery.retry_bonychat[8], Duration::from_secs(36_000));
        assert_eq!(config.telemetry.log_format, LogFormat::Pretty);
        assert_eq!(config.telemetry.metrics_addr.to_string(), "127.0.0.1:9090");
        assert!(config.warnings.is_empty());
    }

    #[test]
    fn each_missing_required_variable_is_named() {
        for (missing, _) in required() {
            let vars: Vec<_> = required().into_iter().filter(|(k, _)| *k != missing).collect();
            let err = Config::from_env(&Env::from_pairs(vars)).unwrap_err();
            assert_eq!(err.var, missing, "{err}");
        }
    }

    #[test]
    fn malformed_values_are_named_with_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("RELAY_ADDR", "8080"),
            ("BONYCHAT_WEBHOOK_URL", "ftp://example.com/hook"),
            ("JOINCHAT_API_URL", "not a url"),
            ("JOINCHAT_PAGE_ID", "my-page"),
            ("JOINCHAT_RECIPIENT_FIELD", "psid"),
            ("JOINCHAT_ORDER_GAP_SECS", "-1"),
            ("JOINCHAT_TIMEOUT_MS", "0"),
            ("MESSENGER_GRAPH_URL", "graph.facebook.com"),
            ("RELAY_DATABASE_URL", "mysql://db"),
            ("RELAY_SEND_WAIT_MS", "3s"),
            ("RELAY_RETRY_JOINCHAT", "1s,5"),
            ("RELAY_RETRY_BONYCHAT", "soon"),
            ("RELAY_RETENTION", "7"),
            ("RELAY_SHUTDOWN_GRACE_SECS", "ten"),
            ("RELAY_METRICS_ADDR", "localhost"),
            ("RELAY_LOG_FORMAT", "xml"),
        ];
        for (var, value) in cases {
            let err = Config::from_env(&with(&[(var, value)])).unwrap_err();
            assert_eq!(&err.var, var, "{err}");
            assert!(!err.to_string().contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn errors_never_echo_a_secret() {
        let env = with(&[("RELAY_DATABASE_URL", "mysql://user:pa55word@db/relay")]);
        let err = Config::from_env(&env).unwrap_err();
        assert!(!err.to_string().contains("pa55word"), "{err}");
    }

    #[test]
    fn debug_output_redacts_every_secret() {
        let env = with(&[
            ("MESSENGER_PAGE_ACCESS_TOKEN", "page-token"),
            ("RELAY_ADMIN_TOKEN", "admin-token"),
            ("RELAY_DATABASE_URL", "postgres://relay:pa55word@db/relay"),
            ("BONYCHAT_WEBHOOK_URL", "https://hook:hook-pass@app.bonychat.test/custom/channel/webhook/"),
        ]);
        let debug = format!("{:?}", Config::from_env(&env).unwrap());
        for secret in [
            "bony-token",
            "join-secret",
            "app-secret",
            "verify-token",
            "page-token",
            "admin-token",
            "pa55word",
            "hook-pass",
        ] {
            assert!(!debug.contains(secret), "{secret} leaked into {debug}");
        }
        assert!(debug.contains("gfd8g7fd89dgfd"), "non-secret values stay visible");
    }

    #[test]
    fn sqlite_urls_take_relative_and_absolute_paths() {
        assert_eq!(parse_database_url("sqlite://data/relay.db"), Ok(DatabaseUrl::Sqlite("data/relay.db".into())));
        assert_eq!(
            parse_database_url("sqlite:///var/lib/relay.db"),
            Ok(DatabaseUrl::Sqlite("/var/lib/relay.db".into()))
        );
        assert!(parse_database_url("sqlite://").is_err());
        assert!(matches!(parse_database_url("postgresql://db/relay"), Ok(DatabaseUrl::Postgres(_))));
        assert_eq!(parse_database_url("sqlite://./var/relay.db"), Ok(DatabaseUrl::Sqlite("./var/relay.db".into())));
        assert_eq!(parse_database_url("sqlite://relay.db"), Ok(DatabaseUrl::Sqlite("relay.db".into())));
    }

    #[test]
    fn sqlite_urls_another_tool_reads_as_another_file_are_refused_saying_which_form_to_write() {
        for (raw, says) in [
            ("sqlite:data/relay.db", "neither form"),
            ("sqlite:/var/lib/relay.db", "neither form"),
            ("sqlite:////var/lib/relay.db", "four slashes"),
            ("sqlite://localhost/var/lib/relay.db", "names a host"),
            ("sqlite://var/lib/relay.db", "sqlite:///var/lib/relay.db for that file"),
            ("sqlite://tmp/relay.db", "sqlite://./tmp/relay.db for a directory tmp"),
            ("sqlite://~/relay.db", "`~` is not expanded"),
            ("sqlite://data/relay.db?mode=rwc", "carries parameters"),
        ] {
            let err = Config::from_env(&with(&[("RELAY_DATABASE_URL", raw)])).unwrap_err();
            assert_eq!(err.var, "RELAY_DATABASE_URL", "{raw}: {err}");
            assert!(err.problem.contains(says), "{raw}: {err}");
            assert!(err.problem.contains("sqlite:///"), "{raw}: names the absolute form: {err}");
        }
    }

    #[test]
    fn the_store_is_shown_by_its_absolute_path_or_its_url_without_the_password() {
        let cwd = std::env::current_dir().unwrap();
        let relative = Config::from_env(&with(&[("RELAY_DATABASE_URL", "sqlite://data/relay.db")])).unwrap();
        assert_eq!(relative.store.database_url.shown(), format!("sqlite://{}/data/relay.db", cwd.display()));
        let effective = relative.effective();
        let shown = effective.iter().find(|(name, _)| name == "RELAY_DATABASE_URL").map(|(_, v)| v.as_str());
        assert_eq!(shown, Some(format!("sqlite://{}/data/relay.db", cwd.display()).as_str()), "check-config too");

        let postgres = with(&[(
            "RELAY_DATABASE_URL",
            "postgres://relay:pa55word@db.internal:5432/relay?sslmode=require&password=pa55word",
        )]);
        let shown = Config::from_env(&postgres).unwrap().store.database_url.shown();
        assert_eq!(shown, "postgres://relay@db.internal:5432/relay?sslmode=require&password=[redacted]");
    }

    #[test]
    fn shown_urls_hide_userinfo_and_credentials_in_the_query() {
        let url = Url::parse(
            "https://user:pa55@graph.test/v21.0/123?fields=first_name&access_token=EAAG&appsecret_proof=ab&sig=x",
        )
        .unwrap();
        assert_eq!(
            shown_url(&url),
            "https://***@graph.test/v21.0/123?fields=first_name&access_token=[redacted]&appsecret_proof=[redacted]&sig=[redacted]"
        );
        let plain = Url::parse("http://127.0.0.1:8080/api/send_message").unwrap();
        assert_eq!(shown_url(&plain), "http://127.0.0.1:8080/api/send_message");
    }

    #[test]
    fn placeholders_of_the_example_files_are_refused_like_a_blank_value_naming_the_variable() {
        let cases: &[(&str, &str)] = &[
            ("BONYCHAT_API_TOKEN", "change-me-bonychat-api-token"),
            ("JOINCHAT_API_SECRET", "CHANGE_ME"),
            ("MESSENGER_APP_SECRET", "changeme"),
            ("BONYCHAT_CHANNEL_ID", "change-me-channel-id"),
            ("JOINCHAT_PAGE_ID", "change-me-page-id"),
            ("RELAY_ADMIN_TOKEN", "change-me"),
            ("BONYCHAT_WEBHOOK_URL", "https://app.bonychat.example/custom/channel/webhook/"),
            ("JOINCHAT_API_URL", "https://joinchat.example.com/api/send_message"),
            ("MESSENGER_GRAPH_URL", "https://graph.EXAMPLE.org./v21.0"),
            ("RELAY_DATABASE_URL", "postgres://relay:change-me@db.internal:5432/relay"),
            ("RELAY_DATABASE_URL", "postgres://relay:s3cret@postgres.example:5432/relay"),
        ];
        for (var, value) in cases {
            let err = Config::from_env(&with(&[(var, value)])).unwrap_err();
            assert_eq!(&err.var, var, "{value}: {err}");
            assert!(err.problem.contains("placeholder") || err.problem.contains("example value"), "{err}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
        // What only looks alike is a value like any other.
        for (var, value) in [
            ("BONYCHAT_API_TOKEN", "change-meadow-tulip"),
            ("JOINCHAT_API_SECRET", "exchange-me-not"),
            ("BONYCHAT_WEBHOOK_URL", "https://example.bonychat.test/custom/channel/webhook/"),
            ("JOINCHAT_API_URL", "https://myexample.com/api/send_message"),
        ] {
            assert!(Config::from_env(&with(&[(var, value)])).is_ok(), "{var}={value} is a real value");
        }
    }

    #[test]
    fn a_placeholder_in_a_secret_file_is_refused_naming_the_file_variable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "change-me-bonychat-api-token\n").unwrap();
        let path: &'static str = Box::leak(file.to_str().unwrap().to_owned().into_boxed_str());
        let mut vars = required();
        vars.retain(|(k, _)| *k != "BONYCHAT_API_TOKEN");
        vars.push(("BONYCHAT_API_TOKEN_FILE", path));

        let err = Config::from_env(&Env::from_pairs(vars)).unwrap_err();

        assert_eq!(err.var, "BONYCHAT_API_TOKEN_FILE", "{err}");
        assert!(err.problem.contains("placeholder"), "{err}");
    }

    #[test]
    fn optional_values_are_read() {
        let env = with(&[
            ("RELAY_ADDR", "127.0.0.1:0"),
            ("JOINCHAT_RECIPIENT_FIELD", "uuid"),
            ("JOINCHAT_MESSAGE_TAG", "ACCOUNT_UPDATE"),
            ("JOINCHAT_ORDER_GAP_SECS", "0"),
            ("RELAY_RETRY_JOINCHAT", "100ms,1s"),
            ("RELAY_LOG_FORMAT", "json"),
        ]);
        let config = Config::from_env(&env).unwrap();
        assert_eq!(config.server.addr.port(), 0);
        assert_eq!(config.channels.channels["default"].joinchat.recipient_field, RecipientField::Uuid);
        assert_eq!(config.channels.channels["default"].joinchat.message_tag.as_deref(), Some("ACCOUNT_UPDATE"));
        assert_eq!(config.channels.channels["default"].joinchat.order_gap, Duration::ZERO);
        assert_eq!(config.delivery.retry_joinchat, vec![Duration::from_millis(100), Duration::from_secs(1)]);
        assert_eq!(config.telemetry.log_format, LogFormat::Json);
        assert!(config.warnings.is_empty());
    }

    #[test]
    fn typos_and_outdated_tags_become_warnings() {
        let env = with(&[
            ("RELAY_ADRR", "0.0.0.0:1"),
            ("BONYCHAT_API_TOKEN_FILE_X", "x"),
            ("JOINCHAT_MESSAGE_TAG", "SHIPPING_UPDATE"),
            ("PATH", "/usr/bin"),
        ]);
        let config = Config::from_env(&env).unwrap();
        assert_eq!(config.warnings.len(), 3, "{:?}", config.warnings);
        assert!(config.warnings.iter().any(|w| w.starts_with("RELAY_ADRR")));
        assert!(config.warnings.iter().any(|w| w.starts_with("BONYCHAT_API_TOKEN_FILE_X")));
        assert!(config.warnings.iter().any(|w| w.contains("SHIPPING_UPDATE")));
    }

    #[test]
    fn a_send_rate_above_what_meta_allows_is_taken_with_a_warning() {
        let config = Config::from_env(&with(&[("JOINCHAT_MAX_SENDS_PER_SEC", "300")])).unwrap();
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        let config = Config::from_env(&with(&[("JOINCHAT_MAX_SENDS_PER_SEC", "5000")])).unwrap();
        assert_eq!(config.channels.channels["default"].joinchat.max_sends_per_sec, 5000);
        assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
        assert!(
            config.warnings[0].starts_with("JOINCHAT_MAX_SENDS_PER_SEC is 5000: Meta allows"),
            "{:?}",
            config.warnings
        );
    }

    #[test]
    fn durations_past_their_maximum_are_refused() {
        let cases: &[(&str, &str, &str)] = &[
            ("RELAY_SHUTDOWN_GRACE_SECS", "3600", "3601"),
            ("RELAY_SEND_WAIT_MS", "60000", "60001"),
            ("RELAY_LEASE_SECS", "300", "301"),
            ("JOINCHAT_CONNECT_TIMEOUT_MS", "5000", "600001"),
            ("JOINCHAT_TIMEOUT_MS", "600000", "600001"),
            ("BONYCHAT_TIMEOUT_MS", "600000", "18446744073709551615"),
            ("MESSENGER_GRAPH_TIMEOUT_MS", "600000", "600001"),
            ("RELAY_DATABASE_CONNECT_TIMEOUT_MS", "600000", "600001"),
            ("RELAY_DATABASE_STATEMENT_TIMEOUT_MS", "600000", "600001"),
            ("RELAY_DATABASE_POOL_SIZE", "100", "101"),
            ("RELAY_RETRY_JOINCHAT", "1s,7d", "1s,7d,169h"),
            ("RELAY_RETRY_BONYCHAT", "168h", "5s,213503982334d"),
            ("RELAY_RETENTION", "3650d", "3651d"),
            ("RELAY_RETENTION", "1d", "18446744073709551615ms"),
        ];
        for (var, largest, too_large) in cases {
            assert!(Config::from_env(&with(&[(var, largest)])).is_ok(), "{var}={largest} is allowed");
            let err = Config::from_env(&with(&[(var, too_large)])).unwrap_err();
            assert_eq!(&err.var, var, "{err}");
            assert!(err.problem.contains("at most") || err.problem.contains("maximum"), "{err}");
        }
    }

    #[test]
    fn counts_that_would_stop_all_work_are_refused() {
        for var in [
            "RELAY_DATABASE_POOL_SIZE",
            "RELAY_MAX_QUEUED_OUTBOUND",
            "RELAY_MAX_QUEUED_INBOUND",
            "RELAY_MAX_QUEUED_PER_CONTACT",
        ] {
            assert!(Config::from_env(&with(&[(var, "1")])).is_ok(), "{var}=1 is allowed");
            let err = Config::from_env(&with(&[(var, "0")])).unwrap_err();
            assert_eq!((err.var.as_str(), err.problem.as_str()), (var, "must be at least 1"));
        }
    }

    #[test]
    fn a_lease_too_short_to_renew_is_refused() {
        assert_eq!(
            Config::from_env(&with(&[("RELAY_LEASE_SECS", "2")])).unwrap().delivery.lease,
            Duration::from_secs(2)
        );
        let err = Config::from_env(&with(&[("RELAY_LEASE_SECS", "1")])).unwrap_err();
        assert_eq!(err.var, "RELAY_LEASE_SECS");
        assert!(err.problem.contains("at least 2"), "{err}");
    }

    #[test]
    fn the_admin_token_must_differ_from_the_bonychat_token() {
        let env = with(&[("RELAY_ADMIN_TOKEN", "bony-token")]);

        let err = Config::from_env(&env).unwrap_err();

        assert_eq!(err.var, "RELAY_ADMIN_TOKEN");
        assert!(err.problem.starts_with("must differ from BONYCHAT_API_TOKEN"), "{err}");
        assert!(!err.to_string().contains("bony-token"), "{err}");
        assert!(Config::from_env(&with(&[("RELAY_ADMIN_TOKEN", "admin-token")])).is_ok());
    }

    #[test]
    fn url_errors_never_echo_credentials() {
        let cases: &[(&str, &str)] = &[
            ("BONYCHAT_WEBHOOK_URL", "ftp://user:pa55word@host/x"),
            ("BONYCHAT_WEBHOOK_URL", "https://user:pa55word@ho st/x"),
            ("JOINCHAT_API_URL", "https://user:pa55word@host:99999/x"),
            ("JOINCHAT_API_URL", "user:pa55word@host/x"),
            ("MESSENGER_GRAPH_URL", "https://user:pa/55word@host/x"),
            ("MESSENGER_GRAPH_URL", "mailto:user:pa55word@host"),
            ("RELAY_DATABASE_URL", "mysql://user:pa55word@host/x"),
        ];
        for (var, value) in cases {
            let err = Config::from_env(&with(&[(var, value)])).unwrap_err();
            assert_eq!(&err.var, var, "{err}");
            assert!(!err.to_string().contains("55word"), "{err}");
        }
        assert_eq!(redact_userinfo("https://u:p@host/x"), "https://***@host/x");
        assert_eq!(redact_userinfo("https://host/x"), "https://host/x");
    }

    #[test]
    fn the_sandbox_is_off_unless_set_to_true() {
        assert!(!Config::from_env(&with(&[])).unwrap().server.sandbox);
        assert!(Config::from_env(&with(&[("RELAY_SANDBOX", "true")])).unwrap().server.sandbox);
        assert!(!Config::from_env(&with(&[("RELAY_SANDBOX", "false")])).unwrap().server.sandbox);
        for value in ["yes", "1", "TRUE "] {
            let err = Config::from_env(&with(&[("RELAY_SANDBOX", value)])).unwrap_err();
            assert_eq!(err.var, "RELAY_SANDBOX", "{err}");
        }
    }

    #[test]
    fn stand_in_urls_that_cannot_be_reached_are_warned_about() {
        let joinchat = ("JOINCHAT_API_URL", "http://127.0.0.1:8080/sandbox/joinchat/api/send_message");
        let elsewhere =
            Config::from_env(&with(&[joinchat, ("RELAY_SANDBOX", "true"), ("RELAY_ADDR", "127.0.0.1:9000")]));
        let off = Config::from_env(&with(&[joinchat]));
        let right = Config::from_env(&with(&[joinchat, ("RELAY_SANDBOX", "true"), ("RELAY_ADDR", "0.0.0.0:8080")]));

        assert!(
            elsewhere
                .unwrap()
                .warnings
                .iter()
                .any(|w| w.starts_with("JOINCHAT_API_URL points at /sandbox/ on port 8080"))
        );
        assert!(off.unwrap().warnings.iter().any(|w| w.contains("RELAY_SANDBOX is not true")));
        let right = right.unwrap();
        assert!(right.warnings.iter().all(|w| !w.contains("points at /sandbox/")), "{:?}", right.warnings);
    }

    #[test]
    fn a_sandbox_beyond_the_loopback_is_warned_about_and_one_on_it_is_not() {
        let sandbox_on = |addr: &'static str| {
            Config::from_env(&with(&[("RELAY_SANDBOX", "true"), ("RELAY_ADDR", addr)])).unwrap().warnings
        };
        let exposed = |warnings: &[String]| warnings.iter().any(|w| w.contains("NON-LOOPBACK"));

        for addr in ["0.0.0.0:8080", "[::]:8080", "192.0.2.7:8080"] {
            let warnings = sandbox_on(addr);
            assert!(exposed(&warnings), "{addr}: {warnings:?}");
            assert!(warnings.iter().any(|w| w.contains(&format!("RELAY_ADDR={addr} "))), "{warnings:?}");
        }
        for addr in ["127.0.0.1:8080", "127.0.0.2:8080", "[::1]:8080", "[::ffff:127.0.0.1]:8080"] {
            assert!(!exposed(&sandbox_on(addr)), "{addr}");
        }
        let production = Config::from_env(&with(&[("RELAY_ADDR", "0.0.0.0:8080")])).unwrap();
        assert!(!exposed(&production.warnings), "no sandbox, no warning");
    }

    #[test]
    fn the_effective_configuration_lists_every_variable_with_secrets_redacted() {
        let env = with(&[
            ("MESSENGER_PAGE_ACCESS_TOKEN", "page-token"),
            ("RELAY_ADMIN_TOKEN", "admin-token"),
            ("BONYCHAT_WEBHOOK_URL", "https://hook:hook-pass@app.bonychat.test/custom/channel/webhook/"),
            ("RELAY_RETRY_JOINCHAT", "1500ms,2m"),
        ]);
        let effective = Config::from_env(&env).unwrap().effective();
        let value = |name: &str| effective.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());

        let listed: Vec<&str> = effective.iter().map(|(name, _)| name.as_str()).collect();
        for known in KNOWN_VARS.iter().chain(SINGLE_CHANNEL_VARS) {
            assert!(listed.contains(known), "{known} missing from {listed:?}");
        }
        // With traces off, their one line says so.
        assert!(listed.contains(&traces::ENDPOINT), "{listed:?}");
        assert_eq!(listed.len(), KNOWN_VARS.len() + SINGLE_CHANNEL_VARS.len() + 1);
        let text = format!("{effective:?}");
        for secret in
            ["bony-token", "join-secret", "app-secret", "verify-token", "page-token", "admin-token", "hook-pass"]
        {
            assert!(!text.contains(secret), "{secret} leaked into {text}");
        }
        assert_eq!(value("BONYCHAT_API_TOKEN"), Some("[redacted]"));
        assert_eq!(value("BONYCHAT_WEBHOOK_URL"), Some("https://***@app.bonychat.test/custom/channel/webhook/"));
        assert_eq!(value("JOINCHAT_MESSAGE_TAG"), Some("(unset)"));
        assert_eq!(value("RELAY_RETRY_JOINCHAT"), Some("1500ms,2m"));
        assert_eq!(value("RELAY_RETENTION"), Some("7d"));
        assert_eq!(value("RELAY_SANDBOX"), Some("false"));
        let postgres = with(&[("RELAY_DATABASE_URL", "postgres://relay:pa55word@db/relay?password=pa55word")]);
        let shown = Config::from_env(&postgres).unwrap().effective();
        assert!(!format!("{shown:?}").contains("pa55word"));
    }

    const PREVIOUS_VARS: &[(&str, &str)] = &[
        ("BONYCHAT_API_TOKEN_PREVIOUS", "bony-token-old"),
        ("JOINCHAT_API_SECRET_PREVIOUS", "join-secret-old"),
        ("MESSENGER_APP_SECRET_PREVIOUS", "app-secret-old"),
        ("MESSENGER_VERIFY_TOKEN_PREVIOUS", "verify-token-old"),
        ("MESSENGER_PAGE_ACCESS_TOKEN", "page-token"),
        ("MESSENGER_PAGE_ACCESS_TOKEN_PREVIOUS", "page-token-old"),
        ("RELAY_ADMIN_TOKEN", "admin-token"),
        ("RELAY_ADMIN_TOKEN_PREVIOUS", "admin-token-old"),
    ];

    #[test]
    fn every_secret_takes_its_previous_value_without_a_warning() {
        let config = Config::from_env(&with(PREVIOUS_VARS)).unwrap();

        let previous = |secret: &Rotating| secret.previous.as_ref().map(|p| p.expose().to_owned());
        let channel = &config.channels.channels["default"];
        let app = &config.channels.apps["default"];
        assert_eq!(previous(&channel.bonychat.api_token).as_deref(), Some("bony-token-old"));
        assert_eq!(channel.bonychat.api_token.current.expose(), "bony-token");
        assert_eq!(previous(&channel.joinchat.api_secret).as_deref(), Some("join-secret-old"));
        assert_eq!(previous(channel.page_access_token.as_ref().unwrap()).as_deref(), Some("page-token-old"));
        assert_eq!(previous(&app.app_secret).as_deref(), Some("app-secret-old"));
        assert_eq!(previous(&app.verify_token).as_deref(), Some("verify-token-old"));
        assert_eq!(previous(config.server.admin_token.as_ref().unwrap()).as_deref(), Some("admin-token-old"));
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        let debug = format!("{config:?}");
        assert!(!debug.contains("-old"), "{debug}");
    }

    #[test]
    fn a_previous_file_is_known_and_a_previous_database_url_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        std::fs::write(&old, "bony-token-old\n").unwrap();
        let old = old.to_str().unwrap().to_owned();
        let old: &'static str = Box::leak(old.into_boxed_str());

        let config = Config::from_env(&with(&[
            ("BONYCHAT_API_TOKEN_PREVIOUS_FILE", old),
            ("RELAY_DATABASE_URL_PREVIOUS", "sqlite://old.db"),
        ]))
        .unwrap();

        let previous = config.channels.channels["default"].bonychat.api_token.previous.clone();
        assert_eq!(previous.unwrap().expose(), "bony-token-old");
        assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
        assert!(config.warnings[0].starts_with("RELAY_DATABASE_URL_PREVIOUS is set but the relay does not read it"));
    }

    #[test]
    fn a_previous_value_without_its_current_one_stops_the_start_naming_it() {
        for (var, current) in [
            ("MESSENGER_PAGE_ACCESS_TOKEN_PREVIOUS", "MESSENGER_PAGE_ACCESS_TOKEN"),
            ("RELAY_ADMIN_TOKEN_PREVIOUS", "RELAY_ADMIN_TOKEN"),
        ] {
            let err = Config::from_env(&with(&[(var, "old-value")])).unwrap_err();
            assert_eq!(err.var, var, "{err}");
            assert!(err.problem.starts_with(&format!("is set but {current} is not")), "{err}");
            assert!(!err.to_string().contains("old-value") && !err.to_string().contains('\n'), "{err}");
        }
    }

    #[test]
    fn a_previous_value_equal_to_the_current_one_is_warned_about() {
        let config = Config::from_env(&with(&[
            ("JOINCHAT_API_SECRET_PREVIOUS", "join-secret"),
            ("RELAY_ADMIN_TOKEN", "admin-token"),
            ("RELAY_ADMIN_TOKEN_PREVIOUS", "admin-token"),
        ]))
        .unwrap();

        assert_eq!(config.warnings.len(), 2, "{:?}", config.warnings);
        for var in ["JOINCHAT_API_SECRET", "RELAY_ADMIN_TOKEN"] {
            let expected = format!("{var}_PREVIOUS is the same value as {var}:");
            assert!(config.warnings.iter().any(|w| w.starts_with(&expected)), "{expected}: {:?}", config.warnings);
        }
        assert!(!format!("{:?}", config.warnings).contains("join-secret"));
    }

    #[test]
    fn the_admin_token_must_differ_from_every_bonychat_token_current_or_previous() {
        let cases: &[(&[(&'static str, &'static str)], &str)] = &[
            (
                &[("RELAY_ADMIN_TOKEN", "bony-token-old"), ("BONYCHAT_API_TOKEN_PREVIOUS", "bony-token-old")],
                "RELAY_ADMIN_TOKEN",
            ),
            (
                &[("RELAY_ADMIN_TOKEN", "admin-token"), ("RELAY_ADMIN_TOKEN_PREVIOUS", "bony-token")],
                "RELAY_ADMIN_TOKEN_PREVIOUS",
            ),
            (
                &[
                    ("RELAY_ADMIN_TOKEN", "admin-token"),
                    ("RELAY_ADMIN_TOKEN_PREVIOUS", "bony-token-old"),
                    ("BONYCHAT_API_TOKEN_PREVIOUS", "bony-token-old"),
                ],
                "RELAY_ADMIN_TOKEN_PREVIOUS",
            ),
        ];
        for (vars, var) in cases {
            let err = Config::from_env(&with(vars)).unwrap_err();
            assert_eq!(&err.var, var, "{err}");
            assert!(err.problem.starts_with("must differ from BONYCHAT_API_TOKEN"), "{err}");
            assert!(!err.to_string().contains("bony-token"), "{err}");
        }
    }

    #[test]
    fn the_effective_configuration_shows_whether_a_previous_value_is_set() {
        let config = Config::from_env(&with(&[
            ("JOINCHAT_API_SECRET_PREVIOUS", "join-secret-old"),
            ("RELAY_ADMIN_TOKEN", "admin-token"),
        ]))
        .unwrap();
        let effective = config.effective();
        let value = |name: &str| effective.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());

        assert_eq!(value("JOINCHAT_API_SECRET_PREVIOUS"), Some("[redacted]"));
        assert_eq!(value("BONYCHAT_API_TOKEN_PREVIOUS"), Some("(unset)"));
        assert_eq!(value("RELAY_ADMIN_TOKEN_PREVIOUS"), Some("(unset)"));
        assert_eq!(value("MESSENGER_PAGE_ACCESS_TOKEN_PREVIOUS"), Some("(unset)"));
        assert!(!format!("{effective:?}").contains("-old"));
    }

    #[test]
    fn a_reload_reads_previous_files_again_and_refuses_an_unusable_one() {
        let dir = tempfile::tempdir().unwrap();
        let (current, previous) = (dir.path().join("admin"), dir.path().join("admin-old"));
        std::fs::write(&current, "admin-token\n").unwrap();
        let leak =
            |path: &std::path::Path| -> &'static str { Box::leak(path.to_str().unwrap().to_owned().into_boxed_str()) };
        let config = Config::from_env(&with(&[
            ("RELAY_ADMIN_TOKEN_FILE", leak(&current)),
            ("RELAY_ADMIN_TOKEN_PREVIOUS_FILE", leak(&previous)),
        ]));
        assert_eq!(config.unwrap_err().var, "RELAY_ADMIN_TOKEN_PREVIOUS_FILE", "a missing file stops the start");
        std::fs::write(&previous, "admin-token-old\n").unwrap();
        let config = Config::from_env(&with(&[
            ("RELAY_ADMIN_TOKEN_FILE", leak(&current)),
            ("RELAY_ADMIN_TOKEN_PREVIOUS_FILE", leak(&previous)),
        ]))
        .unwrap();

        std::fs::write(&current, "admin-token-new\n").unwrap();
        std::fs::write(&previous, "admin-token\n").unwrap();
        let reloaded = config.reload().unwrap().admin_token.unwrap();
        assert_eq!(reloaded.current.expose(), "admin-token-new");
        assert_eq!(reloaded.previous.unwrap().expose(), "admin-token");

        for unusable in ["  \n", "two\nlines\n", "\t\n"] {
            std::fs::write(&previous, unusable).unwrap();
            let err = config.reload().unwrap_err();
            assert_eq!(err.var, "RELAY_ADMIN_TOKEN_PREVIOUS_FILE", "{unusable:?}: {err}");
        }
        std::fs::write(&previous, "").unwrap();
        assert_eq!(config.reload().unwrap().admin_token.unwrap().previous, None, "an empty file: the rotation is over");
    }

    #[test]
    fn connect_timeout_must_fit_in_the_request_timeout() {
        let env = with(&[("JOINCHAT_CONNECT_TIMEOUT_MS", "5000"), ("JOINCHAT_TIMEOUT_MS", "1000")]);
        assert_eq!(Config::from_env(&env).unwrap_err().var, "JOINCHAT_CONNECT_TIMEOUT_MS");
    }

    #[test]
    fn server_limits_have_safe_defaults_and_refuse_zero() {
        let limits = Config::from_env(&with(&[])).unwrap().server.limits;
        assert_eq!(
            limits,
            ServerLimits {
                max_connections: 1024,
                header_read_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                body_read_timeout: Duration::from_secs(10),
                max_body_bytes_in_flight: 64 << 20,
            }
        );
        for (var, value) in [
            ("RELAY_MAX_CONNECTIONS", "0"),
            ("RELAY_HEADER_READ_TIMEOUT_MS", "0"),
            ("RELAY_IDLE_TIMEOUT_SECS", "0"),
            ("RELAY_BODY_READ_TIMEOUT_MS", "soon"),
            ("RELAY_MAX_BODY_BYTES_IN_FLIGHT", "1000"),
        ] {
            let err = Config::from_env(&with(&[(var, value)])).unwrap_err();
            assert_eq!(err.var, var, "{err}");
        }
    }
}
