//! The channels being served right now (SPEC §7): what a request, a webhook or an attempt of a
//! channel needs, ready to use, and swapped as a whole when `SIGHUP` brings a valid new file.
//!
//! A request or an attempt takes the [`Directory`] current when it starts and keeps it to the
//! end, so a reload never changes the secrets or the upstream of work already under way
//! ("attempts in flight finish as they began"). One HTTP client per upstream serves every
//! channel: a thousand channels share the connection pools, and building a directory costs
//! no TLS setup.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::rate::SendRates;
use super::{InboundPoster, OutboundSender, Profiles};
use crate::auth::{BearerToken, SecretDigest};
use crate::clients::bonychat::HttpBonyChat;
use crate::clients::graph::GraphProfiles;
use crate::clients::http;
use crate::clients::joinchat::HttpJoinChat;
use crate::config::{ChannelConfig, Channels, ChannelsSource, Rotating, UpstreamConfig};
use crate::rotation::{RELAY_OWNER, SecretName, SecretUse};
use crate::signing::HubSignature;
use crate::store::Store;

/// Everything one channel's work needs.
pub struct Channel {
    pub name: String,
    pub config: ChannelConfig,
    pub token: BearerToken,
    pub outbound: OutboundSender,
    pub inbound: InboundPoster,
}

/// A Meta app: the secrets its webhooks are checked with, and its Pages.
pub struct App {
    pub name: String,
    pub hub_signature: HubSignature,
    /// Where its secrets are set, for the operator told of a refused webhook.
    pub settings: AppSettings,
    pub verify_token: SecretDigest,
    /// Page id → the channel speaking through it.
    pages: HashMap<String, Arc<Channel>>,
}

impl App {
    /// The channel of the Page `page_id` among this app's, if one is.
    pub fn channel_of_page(&self, page_id: &str) -> Option<&Arc<Channel>> {
        self.pages.get(page_id)
    }
}

/// Where an app's secrets are set: the variables of SPEC §1, or the app's keys in the channels
/// file. What a warning about a refused webhook names, so the operator knows what to fix.
pub struct AppSettings {
    pub app_secret: String,
    pub app_secret_previous: String,
    pub verify_token: String,
}

impl AppSettings {
    fn of(app: &str, source: &ChannelsSource) -> Self {
        match source {
            ChannelsSource::Environment => Self {
                app_secret: "MESSENGER_APP_SECRET".into(),
                app_secret_previous: "MESSENGER_APP_SECRET_PREVIOUS".into(),
                verify_token: "MESSENGER_VERIFY_TOKEN".into(),
            },
            ChannelsSource::File(path) => Self {
                app_secret: format!("[apps.{app}] app_secret of {}", path.display()),
                app_secret_previous: format!("[apps.{app}] app_secret_previous"),
                verify_token: format!("[apps.{app}] verify_token of {}", path.display()),
            },
        }
    }
}

/// One configuration of channels and apps, immutable once built.
pub struct Directory {
    /// `RELAY_ADMIN_TOKEN`, as of this directory (it follows its `_FILE` on reload).
    admin_token: Option<BearerToken>,
    channels: HashMap<String, Arc<Channel>>,
    apps: HashMap<String, Arc<App>>,
    /// Every channel name, for claims: jobs of a channel not here stay queued, untouched.
    names: Arc<[String]>,
}

impl Directory {
    pub fn channel(&self, name: &str) -> Option<&Arc<Channel>> {
        self.channels.get(name)
    }

    pub fn app(&self, name: &str) -> Option<&Arc<App>> {
        self.apps.get(name)
    }

    pub fn app_names(&self) -> impl Iterator<Item = &str> {
        self.apps.keys().map(String::as_str)
    }

    pub fn admin_token(&self) -> Option<&BearerToken> {
        self.admin_token.as_ref()
    }

    pub fn names(&self) -> &Arc<[String]> {
        &self.names
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }
}

/// The HTTP clients every channel shares, one per upstream.
#[derive(Clone)]
pub struct Clients {
    joinchat: reqwest::Client,
    bonychat: reqwest::Client,
    graph: reqwest::Client,
    graph_url: url::Url,
    graph_timeout: Duration,
}

impl Clients {
    pub fn new(upstreams: &UpstreamConfig) -> Result<Self, reqwest::Error> {
        Ok(Self {
            joinchat: http::client(upstreams.joinchat_connect_timeout, upstreams.joinchat_timeout)?,
            bonychat: http::client(Duration::from_secs(5), upstreams.bonychat_timeout)?,
            graph: http::client(Duration::from_secs(5), upstreams.graph_timeout)?,
            graph_url: upstreams.graph_url.url().clone(),
            graph_timeout: upstreams.graph_timeout,
        })
    }
}

/// What a reload changed, for its log line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub kept: usize,
}

/// The directory in effect, replaced whole by [`Live::replace`].
pub struct Live {
    current: RwLock<Arc<Directory>>,
    clients: Clients,
    store: Arc<dyn Store>,
    /// Every channel's send rate: kept across reloads (a reload must not reset a throttle).
    rates: Arc<SendRates>,
    /// How many times the directory was replaced.
    generation: std::sync::atomic::AtomicU64,
}

impl Live {
    pub fn new(channels: &Channels, admin_token: Option<&Rotating>, clients: Clients, store: Arc<dyn Store>) -> Self {
        let rates = Arc::new(SendRates::new(Arc::clone(&store)));
        let directory = build(channels, admin_token, &clients, &store, &rates);
        Self { current: RwLock::new(Arc::new(directory)), clients, store, rates, generation: Default::default() }
    }

    pub fn rates(&self) -> &SendRates {
        &self.rates
    }

    /// Changes each time a reload puts a new directory in effect.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The directory in effect now; kept by the caller for the whole of its work.
    pub fn current(&self) -> Arc<Directory> {
        Arc::clone(&self.current.read().expect("directory lock"))
    }

    /// Puts `channels` in effect for everything that starts from now on.
    pub fn replace(&self, channels: &Channels, admin_token: Option<&Rotating>) -> Changes {
        let next = Arc::new(build(channels, admin_token, &self.clients, &self.store, &self.rates));
        let previous = std::mem::replace(&mut *self.current.write().expect("directory lock"), Arc::clone(&next));
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut changes = Changes::default();
        for name in next.names.iter() {
            if previous.channels.contains_key(name) {
                changes.kept += 1;
            } else {
                changes.added.push(name.clone());
            }
        }
        changes.removed = previous.names.iter().filter(|name| !next.channels.contains_key(*name)).cloned().collect();
        changes
    }
}

/// Builds the directory of `channels`. Every secret's checks and clients are made afresh from
/// the configuration: the value an upstream was last sent first (see [`crate::rotation`]) is
/// forgotten, and the current value goes first again. The send rates outlive it.
fn build(
    channels: &Channels,
    admin_token: Option<&Rotating>,
    clients: &Clients,
    store: &Arc<dyn Store>,
    rates: &Arc<SendRates>,
) -> Directory {
    for (name, config) in &channels.channels {
        rates.announce(name, config.joinchat.max_sends_per_sec);
    }
    let built: HashMap<String, Arc<Channel>> = channels
        .channels
        .iter()
        .map(|(name, config)| {
            let usage = |secret: SecretName| SecretUse::new(secret, name.clone());
            let profiles = config.page_access_token.as_ref().map(|token| {
                let graph = GraphProfiles::new(
                    clients.graph.clone(),
                    clients.graph_url.clone(),
                    token.clone(),
                    usage(SecretName::MessengerPageAccessToken),
                );
                Profiles::new(Arc::new(graph), clients.graph_timeout)
            });
            let token = &config.bonychat.api_token;
            usage(SecretName::BonyChatApiToken).rotation_configured(token);
            let channel = Channel {
                name: name.clone(),
                token: BearerToken::new(token, Some(usage(SecretName::BonyChatApiToken))),
                outbound: OutboundSender::new(
                    Arc::new(HttpJoinChat::new(
                        clients.joinchat.clone(),
                        &config.joinchat,
                        usage(SecretName::JoinChatApiSecret),
                    )),
                    Arc::clone(store),
                    Arc::clone(rates),
                    &config.joinchat,
                ),
                inbound: InboundPoster::new(
                    Arc::new(HttpBonyChat::new(
                        clients.bonychat.clone(),
                        &config.bonychat,
                        usage(SecretName::BonyChatApiToken),
                    )),
                    config.bonychat.channel_id.clone(),
                    profiles,
                ),
                config: config.clone(),
            };
            (name.clone(), Arc::new(channel))
        })
        .collect();
    let apps = channels
        .apps
        .iter()
        .map(|(name, app)| {
            let pages = built
                .values()
                .filter(|channel| &channel.config.messenger_app == name)
                .map(|channel| (channel.config.joinchat.page_id.clone(), Arc::clone(channel)))
                .collect();
            let usage = |secret: SecretName, value: &Rotating| {
                let usage = SecretUse::new(secret, name.clone());
                usage.rotation_configured(value);
                Some(usage)
            };
            let app = App {
                name: name.clone(),
                settings: AppSettings::of(name, &channels.source),
                hub_signature: HubSignature::new(
                    app.app_secret.clone(),
                    usage(SecretName::MessengerAppSecret, &app.app_secret),
                ),
                verify_token: SecretDigest::new(
                    &app.verify_token,
                    usage(SecretName::MessengerVerifyToken, &app.verify_token),
                ),
                pages,
            };
            (name.clone(), Arc::new(app))
        })
        .collect();
    let names: Arc<[String]> = channels.channels.keys().cloned().collect();
    let admin_token = admin_token.map(|token| {
        let usage = SecretUse::new(SecretName::AdminToken, RELAY_OWNER);
        usage.rotation_configured(token);
        BearerToken::new(token, Some(usage))
    });
    Directory { admin_token, channels: built, apps, names }
}
