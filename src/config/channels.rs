//! The channels and Meta apps a relay serves (SPEC §7): from `RELAY_CHANNELS_FILE`, or from the
//! single-channel variables of SPEC §1 as the channel `default` and the app `default`.
//!
//! The file is walked by hand rather than deserialised with serde: every refusal must name the
//! file, the table and the key in one line, and must never quote a value that could be a secret
//! (serde's and toml's messages quote the offending value and print the line it stands on).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use super::env::{
    ConfigError, Env, PLACEHOLDER_PROBLEM, is_placeholder, read_optional_secret_file, read_secret_file,
    read_small_file, secret_problem,
};
use super::{
    BonyChatConfig, CURRENT_MESSAGE_TAGS, Endpoint, IntakeCaps, JoinChatConfig, RecipientField, Rotating, Secret,
    http_url, order_gap, page_id_problem, parse_recipient_field, positive_count,
};
use crate::domain::channel::{DEFAULT_CHANNEL, is_channel_name};

pub const CHANNELS_FILE_VAR: &str = "RELAY_CHANNELS_FILE";
/// The app of the `default` channel, whose callback is `/webhooks/messenger`.
pub const DEFAULT_APP: &str = "default";
/// A channels file is a few hundred bytes per channel: thousands of channels fit.
const CHANNELS_FILE_CAP: u64 = 8 << 20;
/// SPEC §5: below Meta's 300 calls per second per Page.
pub const DEFAULT_MAX_SENDS_PER_SEC: u32 = 200;
/// What Meta allows a Page by default: more is accepted (a Page Meta allows more, a JoinChat
/// stand-in in a load test) with a warning.
const META_SENDS_PER_SEC: u32 = 300;
const MAX_SENDS_PER_SEC_LIMIT: u64 = 100_000;
const JOINCHAT_DEFAULT_URL: &str = "https://joinchat.ai/api/send_message";

/// The variables of SPEC §1 that describe the `default` channel and app: with a channels file,
/// none of them may be set (which of the two would win is a guess).
pub const SINGLE_CHANNEL_VARS: &[&str] = &[
    "BONYCHAT_CHANNEL_ID",
    "BONYCHAT_API_TOKEN",
    "BONYCHAT_API_TOKEN_PREVIOUS",
    "BONYCHAT_WEBHOOK_URL",
    "JOINCHAT_API_URL",
    "JOINCHAT_PAGE_ID",
    "JOINCHAT_API_SECRET",
    "JOINCHAT_API_SECRET_PREVIOUS",
    "JOINCHAT_RECIPIENT_FIELD",
    "JOINCHAT_MESSAGE_TAG",
    "JOINCHAT_ORDER_GAP_SECS",
    "JOINCHAT_MAX_SENDS_PER_SEC",
    "MESSENGER_APP_SECRET",
    "MESSENGER_APP_SECRET_PREVIOUS",
    "MESSENGER_VERIFY_TOKEN",
    "MESSENGER_VERIFY_TOKEN_PREVIOUS",
    "MESSENGER_PAGE_ACCESS_TOKEN",
    "MESSENGER_PAGE_ACCESS_TOKEN_PREVIOUS",
];

/// Where the channels came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelsSource {
    /// The variables of SPEC §1: one channel and one app, both `default`.
    Environment,
    File(PathBuf),
}

/// Every channel and app, validated as a whole.
#[derive(Debug, Clone)]
pub struct Channels {
    pub source: ChannelsSource,
    pub apps: BTreeMap<String, AppConfig>,
    pub channels: BTreeMap<String, ChannelConfig>,
    /// Odd but accepted values, told to the operator.
    pub warnings: Vec<String>,
}

/// A Meta app: its secret signs the webhooks of every Page subscribed to it.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// `MESSENGER_APP_SECRET` / `app_secret_*` (and `_PREVIOUS` / `app_secret_previous_*`): key
    /// of `X-Hub-Signature-256`.
    pub app_secret: Rotating,
    /// `MESSENGER_VERIFY_TOKEN` / `verify_token_*` (and their previous): answers the
    /// subscription handshake.
    pub verify_token: Rotating,
}

/// One BonyChat channel and the Facebook Page it speaks through.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    pub bonychat: BonyChatConfig,
    pub joinchat: JoinChatConfig,
    /// The Meta app whose webhooks carry this channel's Page.
    pub messenger_app: String,
    /// `MESSENGER_PAGE_ACCESS_TOKEN` / `messenger_page_access_token_*` (and their previous):
    /// enables profile look-ups.
    pub page_access_token: Option<Rotating>,
    /// `max_queued`: this channel's intake cap, per direction (default `RELAY_MAX_QUEUED_*`).
    pub max_queued: QueueCaps,
}

/// Queued jobs of one channel past which new work of that direction is refused with 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCaps {
    pub outbound: u64,
    pub inbound: u64,
}

impl Channels {
    /// The channels `env` describes: the file `RELAY_CHANNELS_FILE` names, else the channel and
    /// app `default` from the variables of SPEC §1. Reading again (on `SIGHUP`) re-reads the
    /// file and every secret file.
    pub fn load(env: &Env, defaults: IntakeCaps) -> Result<Self, ConfigError> {
        match env.get(CHANNELS_FILE_VAR)? {
            None => from_environment(env, defaults),
            Some(path) => {
                let set: Vec<&str> = SINGLE_CHANNEL_VARS
                    .iter()
                    .copied()
                    .filter(|var| {
                        env.get(var).ok().flatten().is_some()
                            || env.get(&format!("{var}_FILE")).ok().flatten().is_some()
                    })
                    .collect();
                if !set.is_empty() {
                    return Err(ConfigError::new(
                        CHANNELS_FILE_VAR,
                        format!(
                            "is set, and so is {}: with a channels file, every channel and app is described in the file; \
                             unset the single-channel variables (or RELAY_CHANNELS_FILE)",
                            set.join(", ")
                        ),
                    ));
                }
                from_file(env, Path::new(path.trim()), defaults)
            }
        }
    }

    /// The channel one of whose BonyChat API tokens (current or previous) is one of `token`'s
    /// values, when one is (for the admin token check: BonyChat holds those tokens).
    pub fn token_owner(&self, token: &Rotating) -> Option<&str> {
        self.channels
            .iter()
            .find(|(_, c)| c.bonychat.api_token.shares_a_value_with(token))
            .map(|(name, _)| name.as_str())
    }
}

fn from_environment(env: &Env, defaults: IntakeCaps) -> Result<Channels, ConfigError> {
    let mut warnings = Vec::new();
    let message_tag = env.get("JOINCHAT_MESSAGE_TAG")?.map(|tag| tag.trim().to_owned());
    if let Some(tag) = &message_tag {
        warnings.extend(tag_warning("JOINCHAT_MESSAGE_TAG", tag));
    }
    let channel = ChannelConfig {
        bonychat: BonyChatConfig {
            channel_id: env.required("BONYCHAT_CHANNEL_ID")?.trim().to_owned(),
            api_token: env.required_rotating("BONYCHAT_API_TOKEN")?,
            webhook_url: env
                .parsed("BONYCHAT_WEBHOOK_URL", None, |raw| http_url(raw).map(Endpoint).map(Some))?
                .ok_or_else(|| ConfigError::new("BONYCHAT_WEBHOOK_URL", "required but not set"))?,
        },
        joinchat: JoinChatConfig {
            api_url: env.parsed("JOINCHAT_API_URL", Endpoint::default_of(JOINCHAT_DEFAULT_URL), |raw| {
                http_url(raw).map(Endpoint)
            })?,
            page_id: env
                .parsed("JOINCHAT_PAGE_ID", None, |raw| page_id_problem(raw).map(Some))?
                .ok_or_else(|| ConfigError::new("JOINCHAT_PAGE_ID", "required but not set"))?,
            api_secret: env.required_rotating("JOINCHAT_API_SECRET")?,
            recipient_field: env.parsed("JOINCHAT_RECIPIENT_FIELD", RecipientField::Auto, parse_recipient_field)?,
            message_tag,
            order_gap: env.parsed("JOINCHAT_ORDER_GAP_SECS", Duration::from_secs(1), order_gap)?,
            max_sends_per_sec: env.parsed(
                "JOINCHAT_MAX_SENDS_PER_SEC",
                DEFAULT_MAX_SENDS_PER_SEC,
                max_sends_per_sec,
            )?,
        },
        messenger_app: DEFAULT_APP.to_owned(),
        page_access_token: env.rotating("MESSENGER_PAGE_ACCESS_TOKEN")?,
        max_queued: QueueCaps { outbound: defaults.outbound, inbound: defaults.inbound },
    };
    warnings.extend(rate_warning("JOINCHAT_MAX_SENDS_PER_SEC", channel.joinchat.max_sends_per_sec));
    let app = AppConfig {
        app_secret: env.required_rotating("MESSENGER_APP_SECRET")?,
        verify_token: env.required_rotating("MESSENGER_VERIFY_TOKEN")?,
    };
    let secrets = [
        ("BONYCHAT_API_TOKEN", Some(&channel.bonychat.api_token)),
        ("JOINCHAT_API_SECRET", Some(&channel.joinchat.api_secret)),
        ("MESSENGER_PAGE_ACCESS_TOKEN", channel.page_access_token.as_ref()),
        ("MESSENGER_APP_SECRET", Some(&app.app_secret)),
        ("MESSENGER_VERIFY_TOKEN", Some(&app.verify_token)),
    ];
    for (var, secret) in secrets {
        warnings.extend(secret.and_then(|s| same_previous_warning(&format!("{var}_PREVIOUS"), var, s)));
    }
    Ok(Channels {
        source: ChannelsSource::Environment,
        apps: BTreeMap::from([(DEFAULT_APP.to_owned(), app)]),
        channels: BTreeMap::from([(DEFAULT_CHANNEL.to_owned(), channel)]),
        warnings,
    })
}

/// A previous value equal to the current one keeps nothing else alive: the operator most likely
/// wrote the new value twice (the old one is then refused at once) or the old one twice (the
/// new one is then refused until the files are fixed).
pub(super) fn same_previous_warning(previous: &str, current: &str, secret: &Rotating) -> Option<String> {
    secret.previous_is_current().then(|| {
        format!(
            "{previous} is the same value as {current}: a rotation keeps the value being replaced there; \
             leave it unset (or its file empty) when no rotation is under way"
        )
    })
}

fn tag_warning(place: &str, tag: &str) -> Option<String> {
    (!CURRENT_MESSAGE_TAGS.contains(&tag)).then(|| {
        format!(
            "{place}={tag} is not one of Messenger's current tags ({}); Messenger may refuse the messages",
            CURRENT_MESSAGE_TAGS.join(", ")
        )
    })
}

pub(super) fn max_sends_per_sec(raw: &str) -> Result<u32, String> {
    match super::env::parse_u64(raw)? {
        0 => Err("must be at least 1".into()),
        n @ 1..=MAX_SENDS_PER_SEC_LIMIT => Ok(u32::try_from(n).unwrap_or(u32::MAX)),
        _ => Err(format!("must be at most {MAX_SENDS_PER_SEC_LIMIT} (Meta allows about 300 calls a second per Page)")),
    }
}

fn rate_warning(place: &str, rate: u32) -> Option<String> {
    (rate > META_SENDS_PER_SEC).then(|| {
        format!(
            "{place} is {rate}: Meta allows a Page about {META_SENDS_PER_SEC} calls a second, so expect it to throttle \
             the Page (the relay then slows down by itself)"
        )
    })
}

/// Reading one table of the file: each refusal names the file, the table and the key.
struct TableReader<'a> {
    file: &'a Path,
    /// `apps.acme` or `channels.shoes`.
    table: String,
    values: &'a Table,
    env: &'a Env,
}

impl TableReader<'_> {
    fn error(&self, key: &str, problem: impl std::fmt::Display) -> ConfigError {
        ConfigError::new(CHANNELS_FILE_VAR, format!("{}: [{}] {key}: {problem}", self.file.display(), self.table))
    }

    fn refuse_unknown_keys(&self, known: &[&str], secrets: &[&str]) -> Result<(), ConfigError> {
        for key in self.values.keys() {
            if known.contains(&key.as_str()) {
                continue;
            }
            let secret = secrets.iter().find(|s| {
                key == *s
                    || key.strip_prefix(*s).is_some_and(|rest| rest == "_previous" || SECRET_SUFFIXES.contains(&rest))
            });
            match secret {
                Some(base) if key == base || key == &format!("{base}_previous") => {
                    return Err(self.error(
                        key,
                        format!(
                            "a secret is never written in the file (such files end up in repositories): \
                             use {key}_file (a path) or {key}_env (a variable's name)"
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    let mut all: Vec<String> = known.iter().map(|k| (*k).to_owned()).collect();
                    for suffix in SECRET_SUFFIXES {
                        all.extend(secrets.iter().map(|s| format!("{s}{suffix}")));
                    }
                    all.sort();
                    return Err(self.error(key, format!("unknown key (known: {})", all.join(", "))));
                }
            }
        }
        Ok(())
    }

    /// A string value (never a secret: secrets go through [`Self::secret`]).
    fn string(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        match self.values.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Err(self.error(key, "is empty")),
            Some(Value::String(s)) if is_placeholder(s) => Err(self.error(key, PLACEHOLDER_PROBLEM)),
            Some(Value::String(s)) => Ok(Some(s.trim())),
            Some(other) => Err(self.error(key, format!("must be a string, not {}", other.type_str()))),
        }
    }

    fn required_string(&self, key: &str) -> Result<&str, ConfigError> {
        self.string(key)?.ok_or_else(|| self.error(key, "required but not set"))
    }

    fn parsed<T>(&self, key: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<Option<T>, ConfigError> {
        self.string(key)?.map(|raw| parse(raw).map_err(|problem| self.error(key, problem))).transpose()
    }

    /// A whole number; written as a string or as a TOML integer alike.
    fn number<T>(&self, key: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<Option<T>, ConfigError> {
        match self.values.get(key) {
            Some(Value::Integer(n)) => parse(&n.to_string()).map(Some).map_err(|problem| self.error(key, problem)),
            _ => self.parsed(key, parse),
        }
    }

    /// A secret named by `<key>_file` (a path) or `<key>_env` (a variable's name), never both.
    fn secret(&self, key: &str) -> Result<Option<Secret>, ConfigError> {
        self.secret_or_empty_file(key, false)
    }

    /// [`Self::secret`]; with `empty_file_is_unset`, an empty `<key>_file` counts as unset.
    fn secret_or_empty_file(&self, key: &str, empty_file_is_unset: bool) -> Result<Option<Secret>, ConfigError> {
        let (file_key, env_key) = (format!("{key}_file"), format!("{key}_env"));
        match (self.string(&file_key)?, self.string(&env_key)?) {
            (Some(_), Some(_)) => Err(self.error(key, format!("set either {file_key} or {env_key}, not both"))),
            (Some(path), None) if empty_file_is_unset => {
                read_optional_secret_file(Path::new(path)).map_err(|problem| self.error(&file_key, problem))
            }
            (Some(path), None) => {
                read_secret_file(Path::new(path)).map(Some).map_err(|problem| self.error(&file_key, problem))
            }
            (None, Some(var)) => {
                let value = self
                    .env
                    .get(var)
                    .map_err(|e| self.error(&env_key, e))?
                    .ok_or_else(|| self.error(&env_key, format!("the variable {var} is not set")))?;
                secret_problem(value).map_err(|problem| self.error(&env_key, format!("{var} {problem}")))?;
                Ok(Some(Secret::new(value)))
            }
            (None, None) => Ok(None),
        }
    }

    /// The value a secret replaces during a rotation (SPEC §1), read like the secret itself,
    /// except that an empty `<key>_previous_file` means "no previous value" (as with
    /// `<NAME>_PREVIOUS_FILE`: the file can stay named while no rotation is under way).
    fn previous_secret(&self, key: &str) -> Result<Option<Secret>, ConfigError> {
        self.secret_or_empty_file(&format!("{key}_previous"), true)
    }

    /// A secret and its previous value; a previous one without a current one is refused.
    fn rotating(&self, key: &str, warnings: &mut Vec<String>) -> Result<Option<Rotating>, ConfigError> {
        let current = self.secret(key)?;
        let previous = self.previous_secret(key)?;
        let rotating = match (current, previous) {
            (Some(current), previous) => Rotating::with_previous(current, previous),
            (None, None) => return Ok(None),
            (None, Some(_)) => {
                let previous_key = format!("{key}_previous");
                let set = if self.values.contains_key(&format!("{previous_key}_file")) {
                    format!("{previous_key}_file")
                } else {
                    format!("{previous_key}_env")
                };
                return Err(self.error(
                    &set,
                    format!(
                        "is set without {key}_file or {key}_env: the previous value is kept beside a current one \
                         during a rotation, never alone"
                    ),
                ));
            }
        };
        let place = |key: &str| format!("[{}] {key}", self.table);
        warnings.extend(same_previous_warning(&place(&format!("{key}_previous")), &place(key), &rotating));
        Ok(Some(rotating))
    }

    fn required_rotating(&self, key: &str, warnings: &mut Vec<String>) -> Result<Rotating, ConfigError> {
        self.rotating(key, warnings)?.ok_or_else(|| self.error(key, format!("required: set {key}_file or {key}_env")))
    }
}

const SECRET_SUFFIXES: &[&str] = &["_file", "_env", "_previous_file", "_previous_env"];

const APP_SECRETS: &[&str] = &["app_secret", "verify_token"];
const CHANNEL_KEYS: &[&str] = &[
    "bonychat_channel_id",
    "bonychat_webhook_url",
    "joinchat_page_id",
    "messenger_app",
    "joinchat_api_url",
    "joinchat_recipient_field",
    "joinchat_message_tag",
    "joinchat_order_gap_secs",
    "joinchat_max_sends_per_sec",
    "max_queued",
];
const CHANNEL_SECRETS: &[&str] = &["bonychat_api_token", "joinchat_api_secret", "messenger_page_access_token"];

fn from_file(env: &Env, path: &Path, defaults: IntakeCaps) -> Result<Channels, ConfigError> {
    let shown = path.display();
    let file_error = |problem: String| ConfigError::new(CHANNELS_FILE_VAR, problem);
    let bytes = read_small_file(path, CHANNELS_FILE_CAP).map_err(file_error)?;
    let text = String::from_utf8(bytes).map_err(|_| file_error(format!("{shown} is not UTF-8 text")))?;
    let document: Table = text.parse().map_err(|e: toml::de::Error| {
        // toml's own message prints the line, which may hold a secret written inline by mistake:
        // only its position and first line are kept.
        let line = e.span().map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let what = e.message().lines().next().unwrap_or("invalid TOML").to_owned();
        file_error(match line {
            Some(line) => format!("{shown}: line {line}: not valid TOML: {what}"),
            None => format!("{shown}: not valid TOML: {what}"),
        })
    })?;

    for key in document.keys() {
        if key != "apps" && key != "channels" {
            return Err(file_error(format!(
                "{shown}: [{key}]: unknown table (the file holds [apps.<name>] and [channels.<name>] tables)"
            )));
        }
    }
    let section = |name: &str| -> Result<Option<&Table>, ConfigError> {
        match document.get(name) {
            None => Ok(None),
            Some(Value::Table(table)) => Ok(Some(table)),
            Some(_) => Err(file_error(format!("{shown}: {name}: must be tables such as [{name}.<name>]"))),
        }
    };
    let reader = |section: &str, name: &str, value: &Value| -> Result<(), ConfigError> {
        if !is_channel_name(name) {
            return Err(file_error(format!(
                "{shown}: [{section}.{name}]: `{name}` is not a name (1–32 of a-z 0-9 -, starting with a letter or a digit)"
            )));
        }
        if !value.is_table() {
            return Err(file_error(format!("{shown}: {section}.{name}: must be a table [{section}.{name}]")));
        }
        Ok(())
    };

    let mut warnings = Vec::new();
    let mut apps = BTreeMap::new();
    for (name, value) in section("apps")?.into_iter().flatten() {
        reader("apps", name, value)?;
        let table =
            TableReader { file: path, table: format!("apps.{name}"), values: value.as_table().expect("checked"), env };
        table.refuse_unknown_keys(&[], APP_SECRETS)?;
        let app = AppConfig {
            app_secret: table.required_rotating("app_secret", &mut warnings)?,
            verify_token: table.required_rotating("verify_token", &mut warnings)?,
        };
        apps.insert(name.clone(), app);
    }

    let mut channels = BTreeMap::new();
    // Every BonyChat token, current and previous, and its channel: another channel's previous
    // token must not open this one.
    let mut tokens: HashMap<String, String> = HashMap::new();
    let mut pages: HashMap<(String, String), String> = HashMap::new();
    for (name, value) in section("channels")?.into_iter().flatten() {
        reader("channels", name, value)?;
        let table = TableReader {
            file: path,
            table: format!("channels.{name}"),
            values: value.as_table().expect("checked"),
            env,
        };
        table.refuse_unknown_keys(CHANNEL_KEYS, CHANNEL_SECRETS)?;
        let message_tag = table.string("joinchat_message_tag")?.map(str::to_owned);
        if let Some(tag) = &message_tag {
            warnings.extend(tag_warning(&format!("[channels.{name}] joinchat_message_tag"), tag));
        }
        let messenger_app = table.required_string("messenger_app")?.to_owned();
        if !apps.contains_key(&messenger_app) {
            let known: Vec<&str> = apps.keys().map(String::as_str).collect();
            return Err(table.error(
                "messenger_app",
                format!(
                    "`{messenger_app}` is not an app of this file (apps: {})",
                    if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                ),
            ));
        }
        let channel = ChannelConfig {
            bonychat: BonyChatConfig {
                channel_id: table.required_string("bonychat_channel_id")?.to_owned(),
                api_token: table.required_rotating("bonychat_api_token", &mut warnings)?,
                webhook_url: table
                    .parsed("bonychat_webhook_url", |raw| http_url(raw).map(Endpoint))?
                    .ok_or_else(|| table.error("bonychat_webhook_url", "required but not set"))?,
            },
            joinchat: JoinChatConfig {
                api_url: table
                    .parsed("joinchat_api_url", |raw| http_url(raw).map(Endpoint))?
                    .unwrap_or_else(|| Endpoint::default_of(JOINCHAT_DEFAULT_URL)),
                page_id: table
                    .number("joinchat_page_id", page_id_problem)?
                    .ok_or_else(|| table.error("joinchat_page_id", "required but not set"))?,
                api_secret: table.required_rotating("joinchat_api_secret", &mut warnings)?,
                recipient_field: table
                    .parsed("joinchat_recipient_field", parse_recipient_field)?
                    .unwrap_or(RecipientField::Auto),
                message_tag,
                order_gap: table.number("joinchat_order_gap_secs", order_gap)?.unwrap_or(Duration::from_secs(1)),
                max_sends_per_sec: table
                    .number("joinchat_max_sends_per_sec", max_sends_per_sec)?
                    .unwrap_or(DEFAULT_MAX_SENDS_PER_SEC),
            },
            page_access_token: table.rotating("messenger_page_access_token", &mut warnings)?,
            max_queued: match table.number("max_queued", positive_count)? {
                Some(cap) => QueueCaps { outbound: cap, inbound: cap },
                None => QueueCaps { outbound: defaults.outbound, inbound: defaults.inbound },
            },
            messenger_app,
        };
        warnings.extend(rate_warning(
            &format!("[channels.{name}] joinchat_max_sends_per_sec"),
            channel.joinchat.max_sends_per_sec,
        ));
        let token = &channel.bonychat.api_token;
        for (key, value) in
            [("bonychat_api_token", Some(&token.current)), ("bonychat_api_token_previous", token.previous.as_ref())]
        {
            let Some(value) = value else { continue };
            match tokens.get(value.expose()) {
                Some(other) if other != name => {
                    return Err(table.error(
                        key,
                        format!(
                            "is the same token as one of channel {other}'s, current or previous (each BonyChat \
                             channel has its own: with it, one channel's caller could send as the other)"
                        ),
                    ));
                }
                _ => {
                    tokens.insert(value.expose().to_owned(), name.clone());
                }
            }
        }
        let page = (channel.messenger_app.clone(), channel.joinchat.page_id.clone());
        if let Some(other) = pages.insert(page, name.clone()) {
            return Err(table.error(
                "joinchat_page_id",
                format!(
                    "channel {other} already has Page {} in app {}: a Page's webhooks could go to only one of them",
                    channel.joinchat.page_id, channel.messenger_app
                ),
            ));
        }
        channels.insert(name.clone(), channel);
    }
    if channels.is_empty() {
        return Err(file_error(format!("{shown}: no [channels.<name>] table: a relay serves at least one channel")));
    }
    Ok(Channels { source: ChannelsSource::File(path.to_owned()), apps, channels, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let fixture = Self { dir: tempfile::tempdir().unwrap() };
            for (name, value) in [
                ("acme-secret", "acme-app-secret"),
                ("shoes-token", "shoes-bonychat-token"),
                ("shoes-joinchat", "shoes-joinchat-secret"),
                ("hats-token", "hats-bonychat-token"),
                ("hats-joinchat", "hats-joinchat-secret"),
            ] {
                std::fs::write(fixture.dir.path().join(name), format!("{value}\n")).unwrap();
            }
            fixture
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).display().to_string()
        }

        /// Two channels on two Pages of the app `acme`.
        fn valid(&self) -> String {
            format!(
                r#"
[apps.acme]
app_secret_file = "{acme}"
verify_token_env = "ACME_VERIFY_TOKEN"

[channels.shoes]
bonychat_channel_id = "shoes-channel"
bonychat_api_token_file = "{shoes_token}"
bonychat_webhook_url = "https://app.bonychat.test/custom/channel/webhook/"
joinchat_page_id = "104857600123456"
joinchat_api_secret_file = "{shoes_joinchat}"
messenger_app = "acme"

[channels.hats]
bonychat_channel_id = "hats-channel"
bonychat_api_token_file = "{hats_token}"
bonychat_webhook_url = "https://app.bonychat.test/custom/channel/webhook/"
joinchat_page_id = 204857600123456
joinchat_api_secret_file = "{hats_joinchat}"
messenger_app = "acme"
max_queued = 500
joinchat_order_gap_secs = 0
"#,
                acme = self.path("acme-secret"),
                shoes_token = self.path("shoes-token"),
                shoes_joinchat = self.path("shoes-joinchat"),
                hats_token = self.path("hats-token"),
                hats_joinchat = self.path("hats-joinchat"),
            )
        }

        fn load(&self, content: &str) -> Result<Channels, ConfigError> {
            self.load_with(content, &[])
        }

        fn load_with(&self, content: &str, vars: &[(&str, &str)]) -> Result<Channels, ConfigError> {
            let file = self.dir.path().join("channels.toml");
            std::fs::write(&file, content).unwrap();
            let mut pairs = vec![
                ("RELAY_CHANNELS_FILE".to_owned(), file.display().to_string()),
                ("ACME_VERIFY_TOKEN".to_owned(), "acme-verify".to_owned()),
            ];
            pairs.extend(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
            Channels::load(&Env::from_pairs(pairs), IntakeCaps::DEFAULT)
        }

        fn refusal(&self, content: &str) -> String {
            self.load(content).expect_err("refused").to_string()
        }
    }

    #[test]
    fn a_file_of_two_channels_on_two_pages_of_one_app_is_read_whole() {
        let fixture = Fixture::new();
        let channels = fixture.load(&fixture.valid()).unwrap();

        assert_eq!(channels.channels.keys().collect::<Vec<_>>(), ["hats", "shoes"]);
        let shoes = &channels.channels["shoes"];
        assert_eq!(shoes.bonychat.api_token.current.expose(), "shoes-bonychat-token");
        assert_eq!(shoes.joinchat.page_id, "104857600123456");
        assert_eq!(shoes.joinchat.order_gap, Duration::from_secs(1), "the default of JOINCHAT_ORDER_GAP_SECS");
        assert_eq!(shoes.max_queued.outbound, IntakeCaps::DEFAULT.outbound, "the default of RELAY_MAX_QUEUED_*");
        let hats = &channels.channels["hats"];
        assert_eq!(hats.joinchat.page_id, "204857600123456", "a Page id may be written as a TOML integer");
        assert_eq!(hats.max_queued, QueueCaps { outbound: 500, inbound: 500 });
        assert_eq!(hats.joinchat.order_gap, Duration::ZERO);
        assert_eq!(channels.apps["acme"].verify_token.current.expose(), "acme-verify");
    }

    #[test]
    fn a_secret_written_inline_is_refused_without_quoting_it() {
        let fixture = Fixture::new();
        let content = fixture.valid().replace(
            &format!("bonychat_api_token_file = \"{}\"", fixture.path("shoes-token")),
            "bonychat_api_token = \"inline-secret-value\"",
        );
        let refusal = fixture.refusal(&content);
        assert!(refusal.contains("[channels.shoes] bonychat_api_token:"), "{refusal}");
        assert!(refusal.contains("bonychat_api_token_file"), "{refusal}");
        assert!(!refusal.contains("inline-secret-value"), "{refusal}");
    }

    #[test]
    fn every_refusal_names_the_file_the_table_and_the_key() {
        let fixture = Fixture::new();
        let valid = fixture.valid();
        let file = fixture.dir.path().join("channels.toml").display().to_string();
        let cases = [
            (valid.replace("max_queued = 500", "max_queue = 500"), "[channels.hats] max_queue: unknown key"),
            (
                valid.replace("bonychat_channel_id = \"shoes-channel\"\n", ""),
                "[channels.shoes] bonychat_channel_id: required",
            ),
            (
                valid.replace("\"104857600123456\"", "\"10485x\""),
                "[channels.shoes] joinchat_page_id: `10485x` is not a Page id",
            ),
            (
                valid.replace("messenger_app = \"acme\"\nmax_queued", "messenger_app = \"other\"\nmax_queued"),
                "[channels.hats] messenger_app: `other` is not an app",
            ),
            (valid.replace("max_queued = 500", "max_queued = 0"), "[channels.hats] max_queued: must be at least 1"),
            (
                valid.replace("max_queued = 500", "joinchat_max_sends_per_sec = 100001"),
                "[channels.hats] joinchat_max_sends_per_sec: must be at most 100000",
            ),
            (
                valid.replace("joinchat_order_gap_secs = 0", "joinchat_order_gap_secs = 3601"),
                "[channels.hats] joinchat_order_gap_secs: must be at most 3600",
            ),
            (
                valid.replace(
                    "https://app.bonychat.test/custom/channel/webhook/\"\njoinchat_page_id = 2",
                    "ftp://x\"\njoinchat_page_id = 2",
                ),
                "[channels.hats] bonychat_webhook_url:",
            ),
            (
                valid.replace("verify_token_env = \"ACME_VERIFY_TOKEN\"", "verify_token_env = \"UNSET_VARIABLE\""),
                "[apps.acme] verify_token_env: the variable UNSET_VARIABLE is not set",
            ),
            (valid.replace("[channels.hats]", "[channels.Hats]"), "[channels.Hats]: `Hats` is not a name"),
            (
                valid.replace(&fixture.path("hats-token"), &fixture.path("shoes-token")),
                "[channels.shoes] bonychat_api_token: is the same token as one of channel hats's",
            ),
            (
                valid.replace("204857600123456", "104857600123456"),
                "[channels.shoes] joinchat_page_id: channel hats already has Page 104857600123456 in app acme",
            ),
            (
                valid.replace(&fixture.path("shoes-joinchat"), &fixture.path("missing")),
                "[channels.shoes] joinchat_api_secret_file: cannot read",
            ),
        ];
        for (content, expected) in cases {
            let refusal = fixture.refusal(&content);
            assert!(refusal.starts_with(&format!("RELAY_CHANNELS_FILE: {file}: ")), "{refusal}");
            assert!(refusal.contains(expected), "expected {expected:?} in {refusal:?}");
            assert!(!refusal.contains('\n'), "one line: {refusal:?}");
        }
    }

    #[test]
    fn a_toml_error_gives_its_line_but_never_the_line_itself() {
        let fixture = Fixture::new();
        let refusal =
            fixture.refusal("[apps.acme]\napp_secret_file = \"/x\"\nverify_token_env = \"unterminated-secret-ish\n");
        assert!(refusal.contains("line 3"), "{refusal}");
        assert!(!refusal.contains("unterminated-secret-ish"), "{refusal}");
        assert!(!refusal.contains('\n'), "{refusal}");
    }

    /// The file with the rotation keys of SPEC §7 added to `[apps.acme]` and `[channels.shoes]`.
    fn rotating(fixture: &Fixture) -> String {
        for (name, value) in
            [("shoes-token-old", "shoes-bonychat-token-old"), ("shoes-joinchat-old", "shoes-joinchat-old")]
        {
            std::fs::write(fixture.dir.path().join(name), format!("{value}\n")).unwrap();
        }
        fixture
            .valid()
            .replace(
                "verify_token_env = \"ACME_VERIFY_TOKEN\"\n",
                "verify_token_env = \"ACME_VERIFY_TOKEN\"\nverify_token_previous_env = \"ACME_VERIFY_TOKEN_OLD\"\n\
                 app_secret_previous_env = \"ACME_APP_SECRET_OLD\"\n",
            )
            .replace(
                "messenger_app = \"acme\"\n\n[channels.hats]",
                &format!(
                    "messenger_app = \"acme\"\nbonychat_api_token_previous_file = \"{}\"\n\
                     joinchat_api_secret_previous_file = \"{}\"\nmessenger_page_access_token_env = \"SHOES_PAGE\"\n\
                     messenger_page_access_token_previous_env = \"SHOES_PAGE_OLD\"\n\n[channels.hats]",
                    fixture.path("shoes-token-old"),
                    fixture.path("shoes-joinchat-old")
                ),
            )
    }

    const ROTATION_VARS: &[(&str, &str)] = &[
        ("ACME_VERIFY_TOKEN_OLD", "acme-verify-old"),
        ("ACME_APP_SECRET_OLD", "acme-app-secret-old"),
        ("SHOES_PAGE", "shoes-page-token"),
        ("SHOES_PAGE_OLD", "shoes-page-token-old"),
    ];

    #[test]
    fn previous_values_are_kept_beside_the_current_ones() {
        let fixture = Fixture::new();
        let channels = fixture.load_with(&rotating(&fixture), ROTATION_VARS).unwrap();

        let previous = |secret: &Rotating| secret.previous.as_ref().map(|p| p.expose().to_owned());
        let shoes = &channels.channels["shoes"];
        assert_eq!(previous(&shoes.bonychat.api_token).as_deref(), Some("shoes-bonychat-token-old"));
        assert_eq!(shoes.bonychat.api_token.current.expose(), "shoes-bonychat-token");
        assert_eq!(previous(&shoes.joinchat.api_secret).as_deref(), Some("shoes-joinchat-old"));
        let page = shoes.page_access_token.as_ref().unwrap();
        assert_eq!(
            (page.current.expose(), previous(page).as_deref()),
            ("shoes-page-token", Some("shoes-page-token-old"))
        );
        let acme = &channels.apps["acme"];
        assert_eq!(previous(&acme.app_secret).as_deref(), Some("acme-app-secret-old"));
        assert_eq!(previous(&acme.verify_token).as_deref(), Some("acme-verify-old"));
        assert_eq!(previous(&channels.channels["hats"].bonychat.api_token), None, "no rotation there");
        assert!(channels.warnings.is_empty(), "{:?}", channels.warnings);
    }

    #[test]
    fn a_previous_value_without_a_current_one_is_refused_naming_its_key() {
        let fixture = Fixture::new();
        let content = rotating(&fixture).replace("messenger_page_access_token_env = \"SHOES_PAGE\"\n", "");

        let refusal = fixture.load_with(&content, ROTATION_VARS).expect_err("refused").to_string();

        assert!(
            refusal.contains("[channels.shoes] messenger_page_access_token_previous_env: is set without"),
            "{refusal}"
        );
        assert!(!refusal.contains("shoes-page-token-old"), "{refusal}");
    }

    #[test]
    fn a_previous_value_is_refused_like_any_secret() {
        let fixture = Fixture::new();
        std::fs::write(fixture.dir.path().join("shoes-token-old"), "two\nlines\n").unwrap();
        let cases = [
            (
                rotating(&fixture).replace(
                    "verify_token_previous_env = \"ACME_VERIFY_TOKEN_OLD\"",
                    "verify_token_previous = \"inline\"",
                ),
                "[apps.acme] verify_token_previous: a secret is never written in the file",
            ),
            (
                rotating(&fixture).replace(&fixture.path("shoes-token-old"), &fixture.path("missing")),
                "[channels.shoes] bonychat_api_token_previous_file: cannot read",
            ),
        ];
        for (content, expected) in cases {
            let refusal = fixture.load_with(&content, ROTATION_VARS).expect_err("refused").to_string();
            assert!(refusal.contains(expected), "expected {expected:?} in {refusal:?}");
        }
        let blank = rotating(&fixture);
        let refusal = fixture
            .load_with(
                &blank,
                &[
                    ("ACME_VERIFY_TOKEN_OLD", " "),
                    ("ACME_APP_SECRET_OLD", "x"),
                    ("SHOES_PAGE", "p"),
                    ("SHOES_PAGE_OLD", "q"),
                ],
            )
            .expect_err("refused")
            .to_string();
        assert!(refusal.contains("[apps.acme] verify_token_previous_env:"), "{refusal}");
    }

    #[test]
    fn another_channel_s_previous_token_is_refused_like_its_current_one() {
        let fixture = Fixture::new();
        // hats keeps shoes's token as its previous one: shoes's caller could then send as hats.
        let content = rotating(&fixture).replace(
            "max_queued = 500",
            &format!("max_queued = 500\nbonychat_api_token_previous_file = \"{}\"", fixture.path("shoes-token")),
        );
        let refusal = fixture.load_with(&content, ROTATION_VARS).expect_err("refused").to_string();
        assert!(
            refusal.contains("[channels.shoes] bonychat_api_token: is the same token as one of channel hats's"),
            "{refusal}"
        );

        let content = rotating(&fixture).replace(
            "max_queued = 500",
            &format!("max_queued = 500\nbonychat_api_token_previous_file = \"{}\"", fixture.path("shoes-token-old")),
        );
        let refusal = fixture.load_with(&content, ROTATION_VARS).expect_err("refused").to_string();
        assert!(
            refusal
                .contains("[channels.shoes] bonychat_api_token_previous: is the same token as one of channel hats's"),
            "{refusal}"
        );
        assert!(!refusal.contains("shoes-bonychat-token"), "{refusal}");
    }

    #[test]
    fn a_previous_value_equal_to_the_current_one_is_warned_about() {
        let fixture = Fixture::new();
        let vars = [
            ("ACME_VERIFY_TOKEN_OLD", "acme-verify"),
            ("ACME_APP_SECRET_OLD", "x"),
            ("SHOES_PAGE", "p"),
            ("SHOES_PAGE_OLD", "q"),
        ];

        let channels = fixture.load_with(&rotating(&fixture), &vars).unwrap();

        assert_eq!(channels.warnings.len(), 1, "{:?}", channels.warnings);
        assert!(
            channels.warnings[0]
                .starts_with("[apps.acme] verify_token_previous is the same value as [apps.acme] verify_token"),
            "{:?}",
            channels.warnings
        );
        assert!(!channels.warnings[0].contains("acme-verify"), "{:?}", channels.warnings);
    }

    #[test]
    fn a_previous_single_channel_variable_beside_the_file_is_refused_naming_it() {
        let fixture = Fixture::new();
        for var in ["BONYCHAT_API_TOKEN_PREVIOUS", "JOINCHAT_API_SECRET_PREVIOUS_FILE"] {
            let refusal = fixture.load_with(&fixture.valid(), &[(var, "old")]).expect_err("refused").to_string();
            assert!(refusal.starts_with("RELAY_CHANNELS_FILE: is set, and so is "), "{refusal}");
            assert!(refusal.contains(var.trim_end_matches("_FILE")), "{refusal}");
        }
    }

    #[test]
    fn the_file_and_the_single_channel_variables_together_are_refused_naming_them() {
        let fixture = Fixture::new();
        let refusal = fixture
            .load_with(&fixture.valid(), &[("JOINCHAT_PAGE_ID", "1"), ("MESSENGER_APP_SECRET_FILE", "/x")])
            .expect_err("refused")
            .to_string();
        assert!(
            refusal.starts_with("RELAY_CHANNELS_FILE: is set, and so is JOINCHAT_PAGE_ID, MESSENGER_APP_SECRET"),
            "{refusal}"
        );
    }
}
