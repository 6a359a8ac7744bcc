//! SPEC §1 "Rotation": each secret rotated under steady load, in both orders an operator can
//! take. Relay first: the relay gets the new value and keeps the old one as previous (`SIGHUP`),
//! then the peer switches. Peer first: the peer switches, then the relay. Either way nothing
//! carrying a value the relay holds is refused, nothing accepted is lost or sent twice, every
//! contact's messages arrive in order, and the counter says whether the previous value was
//! needed (relay first: it bridged the switch; peer first: never, it can go at once).
//!
//! The peers are the stand-ins of `helpers`, told which values they take, and load generators
//! playing BonyChat (`/message`), Meta (webhooks, the handshake) and the operator's tools (the
//! admin API), sending with a value the test switches. A refused request is sent again, as Meta
//! does with webhooks: in the peer-first order, a request carrying the new value before the
//! relay has it is refused (nothing can check a value it was not given) and must come through
//! once the relay has it.
//!
//! The rotation counter is process-wide: each test runs itself again, alone, in a child process.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bonychat_relay::config::{Config, Env};
use bonychat_relay::startup::Application;
use bonychat_relay::store::JobState;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    API_TOKEN, APP_SECRET, CHANNEL_ID, JOINCHAT_SECRET, PAGE_ID, PAGE_TOKEN, StandIn, TestApp, VERIFY_TOKEN,
    http_client, hub_signature, spawn_app_with, test_vars,
};

const CHILD: &str = "BONYCHAT_RELAY_ROTATION_ALONE";
/// Concurrent senders: contacts of `/message`, or Messenger users posting webhooks.
const SENDERS: usize = 4;
/// Deliveries between two steps of a rotation.
const STEP: usize = 40;
/// The admin token the admin API tests start with.
const ADMIN_TOKEN: &str = "admin-token-not-rotated";

/// Runs `test` in a child process, alone, so that no other relay moves the rotation counter.
async fn alone(test: &'static str) {
    tokio::task::spawn_blocking(move || crate::helpers::run_alone(test, CHILD)).await.unwrap();
}

/// In the parent process, runs the test alone in a child and returns from it.
macro_rules! alone {
    ($test:literal) => {
        if std::env::var_os(CHILD).is_none() {
            return alone(concat!("rotation::", $test)).await;
        }
    };
}

/// The new value of a secret: the old one with a suffix.
fn rotated(old: &str) -> String {
    format!("{old}-rotated")
}

/// A secret's two files, `<NAME>_FILE` and `<NAME>_PREVIOUS_FILE`, as an operator keeps them
/// (the previous one empty while no rotation is under way).
struct SecretFiles {
    dir: tempfile::TempDir,
    name: &'static str,
}

impl SecretFiles {
    fn new(name: &'static str, value: &str) -> Self {
        let files = Self { dir: tempfile::tempdir().unwrap(), name };
        files.write(value, "");
        files
    }

    fn current(&self) -> PathBuf {
        self.dir.path().join("current")
    }

    fn previous(&self) -> PathBuf {
        self.dir.path().join("previous")
    }

    /// Writes both files (a value and its line break, as `echo` does; `""` empties the file).
    fn write(&self, current: &str, previous: &str) {
        let line = |value: &str| if value.is_empty() { String::new() } else { format!("{value}\n") };
        std::fs::write(self.current(), line(current)).unwrap();
        std::fs::write(self.previous(), line(previous)).unwrap();
    }

    fn vars(&self) -> Vec<(String, String)> {
        vec![
            (self.name.to_owned(), String::new()),
            (format!("{}_FILE", self.name), self.current().display().to_string()),
            (format!("{}_PREVIOUS_FILE", self.name), self.previous().display().to_string()),
        ]
    }
}

/// The relay with `secret` in its files, quick retries of a long schedule (a peer-first gap is
/// bridged by retries), and no pacing between one contact's messages.
async fn relay(secret: &SecretFiles) -> TestApp {
    let retries = ["100ms"; 60].join(",");
    let mut vars = secret.vars();
    for (key, value) in [
        ("RELAY_RETRY_JOINCHAT", retries.as_str()),
        ("RELAY_RETRY_BONYCHAT", retries.as_str()),
        ("JOINCHAT_ORDER_GAP_SECS", "0"),
        ("MESSENGER_GRAPH_TIMEOUT_MS", "2000"),
    ] {
        vars.push((key.to_owned(), value.to_owned()));
    }
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    spawn_app_with(&vars).await
}

/// The relay's side of a rotation: the new value current, the old one previous, then `SIGHUP`.
/// Returns when the new configuration is in effect.
fn relay_switches(app: &TestApp, secret: &SecretFiles, new: &str, old: &str) -> Instant {
    secret.write(new, old);
    app.reloader.reload();
    Instant::now()
}

/// The end of a rotation: the previous value dropped (its file emptied), then `SIGHUP`.
fn relay_drops_the_previous(app: &TestApp, secret: &SecretFiles, new: &str) {
    secret.write(new, "");
    app.reloader.reload();
}

/// The value a peer sends now; switched by the test.
#[derive(Clone)]
struct Held(Arc<Mutex<String>>);

impl Held {
    fn new(value: &str) -> Self {
        Self(Arc::new(Mutex::new(value.to_owned())))
    }

    fn get(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    fn set(&self, value: &str) {
        *self.0.lock().unwrap() = value.to_owned();
    }
}

/// A request of a load generator that the relay refused.
#[derive(Debug, Clone)]
struct Refusal {
    /// The value it carried.
    value: String,
    status: u16,
    /// When it was sent.
    sent: Instant,
}

/// What a load generator's senders saw: per sender, what the relay accepted, in order.
#[derive(Debug, Default)]
struct Seen {
    accepted: BTreeMap<usize, Vec<String>>,
    /// When each accepted item was sent (its last try).
    sent: BTreeMap<String, Instant>,
    refusals: Vec<Refusal>,
}

impl Seen {
    /// Every refusal carried the new value and was sent before the relay had it.
    fn assert_refused_only_before_the_relay_had_the_value(&self, new: &str, relay_switched: Instant) {
        for refusal in &self.refusals {
            assert!(
                refusal.value == new && refusal.sent < relay_switched,
                "refused though the relay held the value it carried: {refusal:?} (new value {new:?})"
            );
        }
    }

    fn assert_nothing_refused(&self) {
        assert!(self.refusals.is_empty(), "refused: {:?}", self.refusals);
    }

    /// `received` (what reached the upstream, in arrival order) holds every accepted item once,
    /// nothing else, and each sender's items in the order they were accepted (one sender is one
    /// contact: order is kept per contact).
    fn assert_each_delivered_once_in_order(&self, received: &[String]) {
        self.assert_each_delivered_once(received);
        for (sender, items) in &self.accepted {
            let prefix = format!("{sender} #");
            let arrived: Vec<&String> = received.iter().filter(|item| item.starts_with(&prefix)).collect();
            assert_eq!(arrived, items.iter().collect::<Vec<_>>(), "sender {sender}'s items in order");
        }
    }

    /// `received` holds every accepted item once, and nothing else.
    fn assert_each_delivered_once(&self, received: &[String]) {
        let mut sorted = received.to_vec();
        sorted.sort();
        let before = sorted.len();
        sorted.dedup();
        assert_eq!(sorted.len(), before, "delivered twice: {received:?}");
        let mut accepted: Vec<String> = self.accepted.values().flatten().cloned().collect();
        accepted.sort();
        assert_eq!(sorted, accepted, "what reached the upstream is exactly what the relay accepted");
    }
}

/// Load generators running until stopped, each counting what the relay accepted.
struct Load {
    stop: CancellationToken,
    accepted: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<Seen>>,
}

/// What one request of a sender got: accepted, refused (sent again), or anything else (a bug).
enum Answer {
    Accepted,
    Refused(u16),
}

impl Load {
    fn new() -> Self {
        Self { stop: CancellationToken::new(), accepted: Arc::default(), refused: Arc::default(), tasks: Vec::new() }
    }

    /// Starts `senders` senders; each calls `send(sender, n, value)` for n = 0, 1, … one after the
    /// other, each n again until the relay accepts it, with the value `held` has when it goes.
    fn start<F, Fut>(&mut self, senders: usize, held: &Held, send: F)
    where
        F: Fn(usize, u64, String) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = (String, Answer)> + Send + 'static,
    {
        for sender in 0..senders {
            let (stop, held, send) = (self.stop.clone(), held.clone(), send.clone());
            let (accepted, refused) = (Arc::clone(&self.accepted), Arc::clone(&self.refused));
            self.tasks.push(tokio::spawn(async move {
                let mut seen = Seen::default();
                let mut n = 0;
                'items: while !stop.is_cancelled() {
                    loop {
                        let (value, sent) = (held.get(), Instant::now());
                        match send(sender, n, value.clone()).await {
                            (item, Answer::Accepted) => {
                                seen.sent.insert(item.clone(), sent);
                                seen.accepted.entry(sender).or_default().push(item);
                                accepted.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            (_, Answer::Refused(status)) => {
                                seen.refusals.push(Refusal { value, status, sent });
                                refused.fetch_add(1, Ordering::Relaxed);
                                if stop.is_cancelled() {
                                    break 'items;
                                }
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                    n += 1;
                }
                seen
            }));
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    async fn stop(self) -> Seen {
        self.stop.cancel();
        let mut seen = Seen::default();
        for task in self.tasks {
            let part = task.await.unwrap();
            seen.accepted.extend(part.accepted);
            seen.sent.extend(part.sent);
            seen.refusals.extend(part.refusals);
        }
        seen
    }
}

/// Waits until `progress` has grown by `more` from now.
async fn after(more: usize, what: &str, progress: impl Fn() -> usize) {
    let target = progress() + more;
    let deadline = Instant::now() + Duration::from_secs(20);
    while progress() < target {
        assert!(Instant::now() < deadline, "{what}: {} of {target}", progress());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The requests `stand_in` took (passed its check).
fn taken(stand_in: &StandIn) -> usize {
    stand_in.received().iter().filter(|r| r.authentic).count()
}

fn refused_by(stand_in: &StandIn) -> usize {
    stand_in.received().iter().filter(|r| !r.authentic).count()
}

/// BonyChat sending `/message`, with the token `held`: sender k is the contact `rot_k`, its
/// messages `k #n`.
fn bonychat_sends(load: &mut Load, app: &TestApp, held: &Held) {
    let (http, url) = (http_client(), app.url("/message"));
    load.start(SENDERS, held, move |sender, n, token| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let text = format!("{sender} #{n}");
            let body = json!({"channelId": CHANNEL_ID, "contactId": format!("rot_{sender}"), "message": {"type": "text", "text": text}});
            let answer = http.post(&url).bearer_auth(&token).json(&body).send().await.expect("relay answers");
            match answer.status() {
                StatusCode::OK => (text, Answer::Accepted),
                StatusCode::UNAUTHORIZED => (text, Answer::Refused(401)),
                status => panic!("/message answered {status}: {}", answer.text().await.unwrap_or_default()),
            }
        }
    });
}

/// Meta posting webhooks signed with the app secret `held`: sender k is the user `psid(k, n)`,
/// its messages `k #n`.
fn meta_posts(load: &mut Load, app: &TestApp, held: &Held, psid: fn(usize, u64) -> String) {
    let (http, url) = (http_client(), app.url("/webhooks/messenger"));
    load.start(SENDERS, held, move |sender, n, secret| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let text = format!("{sender} #{n}");
            let sender_id = psid(sender, n);
            let body = serde_json::to_vec(
                &json!({"object": "page", "entry": [{"id": PAGE_ID, "time": 1_700_000_000_000_i64, "messaging": [
                    {"sender": {"id": sender_id}, "recipient": {"id": PAGE_ID}, "timestamp": 1_700_000_000_000_i64,
                     "message": {"mid": format!("m-rotation-{sender}-{n}"), "text": text}}
                ]}]}),
            )
            .unwrap();
            let signature = hub_signature(&secret, &body);
            let answer = http
                .post(&url)
                .header("content-type", "application/json")
                .header("x-hub-signature-256", signature)
                .body(body)
                .send()
                .await
                .expect("relay answers");
            match answer.status() {
                StatusCode::OK => (text, Answer::Accepted),
                StatusCode::UNAUTHORIZED => (text, Answer::Refused(401)),
                status => panic!("the webhook was answered {status}: {}", answer.text().await.unwrap_or_default()),
            }
        }
    });
}

/// One Messenger user per sender.
fn user_of_sender(sender: usize, _: u64) -> String {
    format!("20668354366910{sender:02}")
}

/// A new Messenger user for every message: each one's first event carries a profile look-up.
fn new_user_each_time(sender: usize, n: u64) -> String {
    format!("3{sender}{n:012}")
}

/// Meta's subscription handshake, one after the other, with the verify token `held`.
fn meta_verifies(load: &mut Load, app: &TestApp, held: &Held) {
    let (http, url) = (http_client(), app.url("/webhooks/messenger"));
    load.start(1, held, move |_, n, token| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let mut url = url::Url::parse(&url).unwrap();
            url.query_pairs_mut()
                .append_pair("hub.mode", "subscribe")
                .append_pair("hub.verify_token", &token)
                .append_pair("hub.challenge", &format!("c{n}"));
            let answer = http.get(url).send().await.expect("relay answers");
            match answer.status() {
                StatusCode::OK => {
                    assert_eq!(answer.text().await.unwrap(), format!("c{n}"));
                    (n.to_string(), Answer::Accepted)
                }
                StatusCode::FORBIDDEN => (n.to_string(), Answer::Refused(403)),
                status => panic!("the handshake was answered {status}: {}", answer.text().await.unwrap_or_default()),
            }
        }
    });
}

/// The operator's tools reading the admin API, one request after the other, with the token `held`.
fn tools_list_jobs(load: &mut Load, app: &TestApp, held: &Held) {
    let (http, url) = (http_client(), app.url("/admin/jobs?limit=1"));
    load.start(1, held, move |_, n, token| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let answer = http.get(&url).bearer_auth(token).send().await.expect("relay answers");
            match answer.status() {
                StatusCode::OK => (n.to_string(), Answer::Accepted),
                StatusCode::UNAUTHORIZED => (n.to_string(), Answer::Refused(401)),
                status => panic!("the admin API answered {status}: {}", answer.text().await.unwrap_or_default()),
            }
        }
    });
}

/// The texts JoinChat took, in arrival order.
fn joinchat_texts(app: &TestApp) -> Vec<String> {
    let taken = app.joinchat.received().into_iter().filter(|r| r.authentic);
    taken.map(|r| r.json()["message"]["text"].as_str().expect("a text message").to_owned()).collect()
}

/// The posts BonyChat took, in arrival order: none but messages.
fn bonychat_posts(app: &TestApp) -> Vec<Value> {
    let posts: Vec<Value> = app.bonychat.received().into_iter().filter(|r| r.authentic).map(|r| r.json()).collect();
    for post in &posts {
        assert_eq!(post["channelId"], CHANNEL_ID);
        assert_eq!(post["events"][0]["type"], "message", "no receipt (a failed one would mean a lost message): {post}");
    }
    posts
}

fn texts_of(posts: &[Value]) -> Vec<String> {
    posts.iter().map(|post| post["events"][0]["message"]["text"].as_str().expect("a text").to_owned()).collect()
}

async fn assert_nothing_dead_or_rejected(app: &TestApp) {
    app.settle().await;
    for state in [JobState::Dead, JobState::Rejected] {
        let jobs = app.jobs(state).await;
        assert!(jobs.is_empty(), "{state:?}: {jobs:?}");
    }
}

/// The sum of the samples of `name` whose labels include `labels`, as the relay's `/metrics`
/// would show them now.
fn sample(name: &str, labels: &[(&str, &str)]) -> f64 {
    let page = bonychat_relay::monitoring::handle().render();
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, shown) = series.split_once('{').unwrap_or((series, "}"));
            let shown: Vec<&str> = shown.trim_end_matches('}').split(',').collect();
            let all = labels.iter().all(|(k, v)| shown.contains(&format!("{k}=\"{v}\"").as_str()));
            (metric == name && all).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// `bonychat_relay_secret_matches_total` of `secret` (owned by the channel or app `default`,
/// or by `relay`) for `value`.
fn uses(secret: &str, value: &str) -> f64 {
    let owner = if secret == "admin_token" { "relay" } else { "default" };
    sample("bonychat_relay_secret_matches_total", &[("secret", secret), ("owner", owner), ("value", value)])
}

fn previous_last_used(secret: &str) -> f64 {
    let owner = if secret == "admin_token" { "relay" } else { "default" };
    sample("bonychat_relay_secret_previous_last_used_timestamp_seconds", &[("secret", secret), ("owner", owner)])
}

/// Relay first: the previous value carried the traffic until the peer switched, then stopped
/// being needed (`before_drop` is its count once the peer had switched, `after_more` after more
/// traffic).
fn assert_the_previous_bridged_the_switch(secret: &str, before_drop: f64, after_more: f64) {
    assert!(before_drop > 0.0, "{secret}: the previous value was used while the peer had not switched");
    assert_eq!(after_more, before_drop, "{secret}: not used any more once the peer had switched: time to drop it");
    assert!(uses(secret, "current") > 0.0, "{secret}: the current value was used");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let last_used = previous_last_used(secret);
    assert!(last_used > now - 60.0 && last_used <= now + 1.0, "{secret}: previous last used at {last_used}");
}

/// Peer first: the previous value was never needed; it could be dropped at once.
fn assert_the_previous_was_never_needed(secret: &str) {
    assert_eq!(uses(secret, "previous"), 0.0, "{secret}: the previous value was never needed");
    assert!(uses(secret, "current") > 0.0, "{secret}: the current value was used");
    assert_eq!(previous_last_used(secret), 0.0, "{secret}: no last use of the previous value");
}

// ---------------------------------------------------------------------------------------------
// JOINCHAT_API_SECRET: the relay signs; JoinChat checks.

#[tokio::test]
async fn the_joinchat_secret_rotated_relay_first_loses_nothing_under_load() {
    alone!("the_joinchat_secret_rotated_relay_first_loses_nothing_under_load");
    let (old, new) = (JOINCHAT_SECRET, rotated(JOINCHAT_SECRET));
    let secret = SecretFiles::new("JOINCHAT_API_SECRET", old);
    let app = relay(&secret).await;
    let mut messages = Load::new();
    bonychat_sends(&mut messages, &app, &Held::new(API_TOKEN));
    let sent = || taken(&app.joinchat);

    after(STEP, "sent before the rotation", sent).await;
    relay_switches(&app, &secret, &new, old);
    after(STEP, "sent while the relay has switched and JoinChat has not", sent).await;
    app.joinchat.accept(&[&new]);
    after(STEP, "sent once JoinChat has switched too", sent).await;
    let previous = uses("joinchat_api_secret", "previous");
    after(STEP, "sent after that", sent).await;
    let previous_later = uses("joinchat_api_secret", "previous");
    relay_drops_the_previous(&app, &secret, &new);
    after(STEP, "sent once the previous secret is dropped", sent).await;
    let seen = messages.stop().await;
    assert_nothing_dead_or_rejected(&app).await;

    seen.assert_nothing_refused();
    seen.assert_each_delivered_once_in_order(&joinchat_texts(&app));
    assert_the_previous_bridged_the_switch("joinchat_api_secret", previous, previous_later);
    // Without keeping the value that worked, JoinChat would refuse one request of every
    // message between the two switches; with it, only those in flight as each side switched.
    let refused = refused_by(&app.joinchat);
    assert!(refused <= 3 * SENDERS, "JoinChat refused {refused} requests: the value that worked goes first");
    app.stop().await;
}

#[tokio::test]
async fn the_joinchat_secret_rotated_joinchat_first_loses_nothing_under_load() {
    alone!("the_joinchat_secret_rotated_joinchat_first_loses_nothing_under_load");
    let (old, new) = (JOINCHAT_SECRET, rotated(JOINCHAT_SECRET));
    let secret = SecretFiles::new("JOINCHAT_API_SECRET", old);
    let app = relay(&secret).await;
    let mut messages = Load::new();
    bonychat_sends(&mut messages, &app, &Held::new(API_TOKEN));
    let sent = || taken(&app.joinchat);

    after(STEP, "sent before the rotation", sent).await;
    app.joinchat.accept(&[&new]);
    // JoinChat refuses the old secret: the messages wait, queued, for the relay to have the new one.
    after(3, "refused by JoinChat before the relay has the new secret", || refused_by(&app.joinchat)).await;
    relay_switches(&app, &secret, &new, old);
    after(STEP, "sent once the relay has switched too", sent).await;
    relay_drops_the_previous(&app, &secret, &new);
    after(STEP, "sent once the previous secret is dropped", sent).await;
    let seen = messages.stop().await;
    assert_nothing_dead_or_rejected(&app).await;

    seen.assert_nothing_refused();
    seen.assert_each_delivered_once_in_order(&joinchat_texts(&app));
    assert_the_previous_was_never_needed("joinchat_api_secret");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// BONYCHAT_API_TOKEN: BonyChat sends it on /message and checks it on the relay's posts.

/// BonyChat sending messages with `token` and Meta posting webhooks the relay forwards to BonyChat.
fn bonychat_both_ways(app: &TestApp, token: &Held) -> (Load, Load) {
    let (mut messages, mut webhooks) = (Load::new(), Load::new());
    bonychat_sends(&mut messages, app, token);
    meta_posts(&mut webhooks, app, &Held::new(APP_SECRET), user_of_sender);
    (messages, webhooks)
}

#[tokio::test]
async fn the_bonychat_token_rotated_relay_first_loses_nothing_under_load() {
    alone!("the_bonychat_token_rotated_relay_first_loses_nothing_under_load");
    let (old, new) = (API_TOKEN, rotated(API_TOKEN));
    let secret = SecretFiles::new("BONYCHAT_API_TOKEN", old);
    let app = relay(&secret).await;
    let bonychat = Held::new(old);
    let (messages, webhooks) = bonychat_both_ways(&app, &bonychat);
    let both = || taken(&app.joinchat).min(taken(&app.bonychat));

    after(STEP, "both ways before the rotation", both).await;
    relay_switches(&app, &secret, &new, old);
    after(STEP, "both ways while the relay has switched and BonyChat has not", both).await;
    // BonyChat regenerated the token: it sends the new one and takes nothing else.
    bonychat.set(&new);
    app.bonychat.accept(&[&new]);
    after(STEP, "both ways once BonyChat has switched too", both).await;
    let previous = uses("bonychat_api_token", "previous");
    after(STEP, "both ways after that", both).await;
    let previous_later = uses("bonychat_api_token", "previous");
    relay_drops_the_previous(&app, &secret, &new);
    after(STEP, "both ways once the previous token is dropped", both).await;
    let (messages, webhooks) = (messages.stop().await, webhooks.stop().await);
    assert_nothing_dead_or_rejected(&app).await;

    messages.assert_nothing_refused();
    webhooks.assert_nothing_refused();
    messages.assert_each_delivered_once_in_order(&joinchat_texts(&app));
    webhooks.assert_each_delivered_once_in_order(&texts_of(&bonychat_posts(&app)));
    assert_the_previous_bridged_the_switch("bonychat_api_token", previous, previous_later);
    let refused = refused_by(&app.bonychat);
    assert!(refused <= 3 * SENDERS, "BonyChat refused {refused} posts: the token that worked goes first");
    app.stop().await;
}

#[tokio::test]
async fn the_bonychat_token_rotated_bonychat_first_loses_nothing_under_load() {
    alone!("the_bonychat_token_rotated_bonychat_first_loses_nothing_under_load");
    let (old, new) = (API_TOKEN, rotated(API_TOKEN));
    let secret = SecretFiles::new("BONYCHAT_API_TOKEN", old);
    let app = relay(&secret).await;
    let bonychat = Held::new(old);
    let (messages, webhooks) = bonychat_both_ways(&app, &bonychat);
    let both = || taken(&app.joinchat).min(taken(&app.bonychat));

    after(STEP, "both ways before the rotation", both).await;
    bonychat.set(&new);
    app.bonychat.accept(&[&new]);
    // BonyChat's messages with the new token are refused, the relay's posts with the old one too.
    after(3, "messages refused before the relay has the new token", || messages.refused()).await;
    after(3, "posts refused before the relay has the new token", || refused_by(&app.bonychat)).await;
    let relay_switched = relay_switches(&app, &secret, &new, old);
    after(STEP, "both ways once the relay has switched too", both).await;
    relay_drops_the_previous(&app, &secret, &new);
    after(STEP, "both ways once the previous token is dropped", both).await;
    let (messages, webhooks) = (messages.stop().await, webhooks.stop().await);
    assert_nothing_dead_or_rejected(&app).await;

    messages.assert_refused_only_before_the_relay_had_the_value(&new, relay_switched);
    webhooks.assert_nothing_refused();
    messages.assert_each_delivered_once_in_order(&joinchat_texts(&app));
    webhooks.assert_each_delivered_once_in_order(&texts_of(&bonychat_posts(&app)));
    assert_the_previous_was_never_needed("bonychat_api_token");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// MESSENGER_APP_SECRET: Meta signs webhooks; the relay checks.

#[tokio::test]
async fn the_app_secret_rotated_relay_first_loses_nothing_under_load() {
    alone!("the_app_secret_rotated_relay_first_loses_nothing_under_load");
    let (old, new) = (APP_SECRET, rotated(APP_SECRET));
    let secret = SecretFiles::new("MESSENGER_APP_SECRET", old);
    let app = relay(&secret).await;
    let meta = Held::new(old);
    let mut webhooks = Load::new();
    meta_posts(&mut webhooks, &app, &meta, user_of_sender);
    let forwarded = || taken(&app.bonychat);

    after(STEP, "forwarded before the rotation", forwarded).await;
    relay_switches(&app, &secret, &new, old);
    after(STEP, "forwarded while the relay has switched and Meta has not", forwarded).await;
    meta.set(&new);
    after(STEP, "forwarded once Meta has switched too", forwarded).await;
    let previous = uses("messenger_app_secret", "previous");
    after(STEP, "forwarded after that", forwarded).await;
    let previous_later = uses("messenger_app_secret", "previous");
    relay_drops_the_previous(&app, &secret, &new);
    after(STEP, "forwarded once the previous secret is dropped", forwarded).await;
    let webhooks = webhooks.stop().await;
    assert_nothing_dead_or_rejected(&app).await;

    webhooks.assert_nothing_refused();
    webhooks.assert_each_delivered_once_in_order(&texts_of(&bonychat_posts(&app)));
    assert_the_previous_bridged_the_switch("messenger_app_secret", previous, previous_later);
    app.stop().await;
}

#[tokio::test]
async fn the_app_secret_rotated_meta_first_loses_nothing_under_load() {
    alone!("the_app_secret_rotated_meta_first_loses_nothing_under_load");
    let (old, new) = (APP_SECRET, rotated(APP_SECRET));
    let secret = SecretFiles::new("MESSENGER_APP_SECRET", old);
    let app = relay(&secret).await;
    let meta = Held::new(old);
    let mut webhooks = Load::new();
    meta_posts(&mut webhooks, &app, &meta, user_of_sender);
    let forwarded = || taken(&app.bonychat);

    after(STEP, "forwarded before the rotation", forwarded).await;
    // The App Secret was reset in the App Dashboard: Meta signs with the new one at once and
    // sends again what the relay refuses.
    meta.set(&new);
    after(3, "webhooks refused before the relay has the new secret", || webhooks.refused()).await;
    let relay_switched = relay_switches(&app, &secret, &new, old);
    after(STEP, "forwarded once the relay has switched too", forwarded).await;
    relay_drops_the_previous(&app, &secret, &new);
    after(STEP, "forwarded once the previous secret is dropped", forwarded).await;
    let webhooks = webhooks.stop().await;
    assert_nothing_dead_or_rejected(&app).await;

    webhooks.assert_refused_only_before_the_relay_had_the_value(&new, relay_switched);
    webhooks.assert_each_delivered_once_in_order(&texts_of(&bonychat_posts(&app)));
    assert_the_previous_was_never_needed("messenger_app_secret");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// MESSENGER_VERIFY_TOKEN: Meta presents it in the subscription handshake; the relay checks.

/// A secret the relay checks (`var`, counted as `metric`), presented by a peer that `present`
/// sets to work: rotated relay first, nothing is refused, and the previous value bridges the
/// time until the peer switches.
async fn checked_secret_rotated_relay_first(
    var: &'static str,
    metric: &str,
    old: &str,
    present: fn(&mut Load, &TestApp, &Held),
) {
    let new = rotated(old);
    let secret = SecretFiles::new(var, old);
    let app = relay(&secret).await;
    let peer = Held::new(old);
    let mut load = Load::new();
    present(&mut load, &app, &peer);
    let accepted = || load.accepted();

    after(STEP, "accepted before the rotation", accepted).await;
    relay_switches(&app, &secret, &new, old);
    after(STEP, "accepted while the relay has switched and the peer has not", accepted).await;
    peer.set(&new);
    after(STEP, "accepted once the peer has switched too", accepted).await;
    let previous = uses(metric, "previous");
    after(STEP, "accepted after that", accepted).await;
    let previous_later = uses(metric, "previous");
    relay_drops_the_previous(&app, &secret, &new);
    after(STEP, "accepted once the previous value is dropped", accepted).await;
    let load = load.stop().await;

    load.assert_nothing_refused();
    assert_the_previous_bridged_the_switch(metric, previous, previous_later);
    app.stop().await;
}

/// The same secret rotated by the peer first: only what carried the new value before the relay
/// had it is refused, and the previous value is never needed. The load, for more checks.
async fn checked_secret_rotated_peer_first(
    var: &'static str,
    metric: &str,
    old: &str,
    present: fn(&mut Load, &TestApp, &Held),
) -> Seen {
    let new = rotated(old);
    let secret = SecretFiles::new(var, old);
    let app = relay(&secret).await;
    let peer = Held::new(old);
    let mut load = Load::new();
    present(&mut load, &app, &peer);
    let accepted = || load.accepted();

    after(STEP, "accepted before the rotation", accepted).await;
    peer.set(&new);
    after(3, "refused before the relay has the new value", || load.refused()).await;
    let relay_switched = relay_switches(&app, &secret, &new, old);
    after(STEP, "accepted once the relay has switched too", accepted).await;
    relay_drops_the_previous(&app, &secret, &new);
    after(STEP, "accepted once the previous value is dropped", accepted).await;
    let load = load.stop().await;

    load.assert_refused_only_before_the_relay_had_the_value(&new, relay_switched);
    assert_the_previous_was_never_needed(metric);
    app.stop().await;
    load
}

#[tokio::test]
async fn the_verify_token_rotated_relay_first_refuses_no_handshake() {
    alone!("the_verify_token_rotated_relay_first_refuses_no_handshake");
    checked_secret_rotated_relay_first("MESSENGER_VERIFY_TOKEN", "messenger_verify_token", VERIFY_TOKEN, meta_verifies)
        .await;
}

#[tokio::test]
async fn the_verify_token_rotated_meta_first_refuses_only_what_the_relay_could_not_know() {
    alone!("the_verify_token_rotated_meta_first_refuses_only_what_the_relay_could_not_know");
    let handshakes = checked_secret_rotated_peer_first(
        "MESSENGER_VERIFY_TOKEN",
        "messenger_verify_token",
        VERIFY_TOKEN,
        meta_verifies,
    )
    .await;
    assert!(handshakes.refusals.iter().all(|r| r.status == 403));
}

// ---------------------------------------------------------------------------------------------
// MESSENGER_PAGE_ACCESS_TOKEN: the relay sends it to the Graph API; Graph checks.

/// Every post introduces a new contact: it carries the profile Graph gave for it.
fn has_profile(post: &Value) -> bool {
    post["contact"]["firstName"] == "Peter"
}

#[tokio::test]
async fn the_page_token_rotated_relay_first_keeps_every_profile_under_load() {
    alone!("the_page_token_rotated_relay_first_keeps_every_profile_under_load");
    let (old, new) = (PAGE_TOKEN, rotated(PAGE_TOKEN));
    let secret = SecretFiles::new("MESSENGER_PAGE_ACCESS_TOKEN", old);
    let app = relay(&secret).await;
    let mut webhooks = Load::new();
    meta_posts(&mut webhooks, &app, &Held::new(APP_SECRET), new_user_each_time);
    let forwarded = || taken(&app.bonychat);

    after(STEP, "forwarded before the rotation", forwarded).await;
    relay_switches(&app, &secret, &new, old);
    after(STEP, "forwarded while the relay has switched and Graph has not", forwarded).await;
    app.graph.accept(&[&new]);
    after(STEP, "forwarded once Graph has switched too", forwarded).await;
    let previous = uses("messenger_page_access_token", "previous");
    after(STEP, "forwarded after that", forwarded).await;
    let previous_later = uses("messenger_page_access_token", "previous");
    relay_drops_the_previous(&app, &secret, &new);
    after(STEP, "forwarded once the previous token is dropped", forwarded).await;
    let webhooks = webhooks.stop().await;
    assert_nothing_dead_or_rejected(&app).await;

    webhooks.assert_nothing_refused();
    // Each message comes from a contact of its own: there is no order between them to keep.
    let posts = bonychat_posts(&app);
    webhooks.assert_each_delivered_once(&texts_of(&posts));
    let without: Vec<&Value> = posts.iter().filter(|post| !has_profile(post)).collect();
    assert!(without.is_empty(), "every new contact got its profile: {without:?}");
    assert_the_previous_bridged_the_switch("messenger_page_access_token", previous, previous_later);
    // Look-ups run as many at a time as the relay has events of new contacts to post, so more
    // are in flight at each switch than there are senders; without the token that worked going
    // first, Graph would refuse one of every look-up between the switches (a step or more).
    let refused = refused_by(&app.graph);
    assert!(refused < STEP, "Graph refused {refused} look-ups: the token that worked goes first");
    app.stop().await;
}

#[tokio::test]
async fn the_page_token_rotated_graph_first_loses_no_event_under_load() {
    alone!("the_page_token_rotated_graph_first_loses_no_event_under_load");
    let (old, new) = (PAGE_TOKEN, rotated(PAGE_TOKEN));
    let secret = SecretFiles::new("MESSENGER_PAGE_ACCESS_TOKEN", old);
    let app = relay(&secret).await;
    let mut webhooks = Load::new();
    meta_posts(&mut webhooks, &app, &Held::new(APP_SECRET), new_user_each_time);
    let forwarded = || taken(&app.bonychat);

    after(STEP, "forwarded before the rotation", forwarded).await;
    app.graph.accept(&[&new]);
    // A look-up Graph refuses never holds an event up: it goes on without the profile.
    after(3, "look-ups refused before the relay has the new token", || refused_by(&app.graph)).await;
    let relay_switched = relay_switches(&app, &secret, &new, old);
    after(STEP, "forwarded once the relay has switched too", forwarded).await;
    relay_drops_the_previous(&app, &secret, &new);
    after(STEP, "forwarded once the previous token is dropped", forwarded).await;
    let webhooks = webhooks.stop().await;
    assert_nothing_dead_or_rejected(&app).await;

    webhooks.assert_nothing_refused();
    // Each message comes from a contact of its own: there is no order between them to keep.
    let posts = bonychat_posts(&app);
    webhooks.assert_each_delivered_once(&texts_of(&posts));
    for post in posts.iter().filter(|post| !has_profile(post)) {
        let item = post["events"][0]["message"]["text"].as_str().unwrap();
        assert!(
            webhooks.sent[item] < relay_switched,
            "a contact first seen after the relay switched has a profile: {post}"
        );
    }
    assert!(posts.iter().filter(|post| has_profile(post)).count() >= 2 * STEP);
    assert_the_previous_was_never_needed("messenger_page_access_token");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// RELAY_ADMIN_TOKEN: the operator's tools present it; the relay checks.

#[tokio::test]
async fn the_admin_token_rotated_relay_first_refuses_no_request() {
    alone!("the_admin_token_rotated_relay_first_refuses_no_request");
    checked_secret_rotated_relay_first("RELAY_ADMIN_TOKEN", "admin_token", ADMIN_TOKEN, tools_list_jobs).await;
}

#[tokio::test]
async fn the_admin_token_rotated_tools_first_refuses_only_what_the_relay_could_not_know() {
    alone!("the_admin_token_rotated_tools_first_refuses_only_what_the_relay_could_not_know");
    checked_secret_rotated_peer_first("RELAY_ADMIN_TOKEN", "admin_token", ADMIN_TOKEN, tools_list_jobs).await;
}

// ---------------------------------------------------------------------------------------------
// SIGHUP with an unusable new value, and a channel of a channels file.

/// SPEC §1, §7: a reload whose new value cannot be a secret (two lines, a blank previous file)
/// is refused whole and logged; the running values stay in effect, and the traffic with them.
#[tokio::test]
async fn an_unusable_value_on_sighup_is_refused_and_the_running_ones_keep_working() {
    alone!("an_unusable_value_on_sighup_is_refused_and_the_running_ones_keep_working");
    let (old, new) = (API_TOKEN, rotated(API_TOKEN));
    let secret = SecretFiles::new("BONYCHAT_API_TOKEN", old);
    let app = relay(&secret).await;
    let bonychat = Held::new(old);
    let (messages, webhooks) = bonychat_both_ways(&app, &bonychat);
    let both = || taken(&app.joinchat).min(taken(&app.bonychat));
    let reloads = |result: &str| sample("bonychat_relay_config_reloads_total", &[("result", result)]);
    let with_new_token = || {
        let body = json!({"channelId": CHANNEL_ID, "contactId": "rot_x", "message": {"type": "text", "text": "x"}});
        app.http.post(app.url("/message")).bearer_auth(&new).json(&body).send()
    };

    after(STEP, "both ways before the rotation", both).await;
    std::fs::write(secret.current(), format!("{new}\nsecond line\n")).unwrap();
    app.reloader.reload();
    after(STEP, "both ways after a reload refused for a two-line token", both).await;
    let two_lines = with_new_token().await.unwrap().status();
    std::fs::write(secret.current(), format!("{new}\n")).unwrap();
    std::fs::write(secret.previous(), "   \n").unwrap();
    app.reloader.reload();
    after(STEP, "both ways after a reload refused for a blank previous token", both).await;
    let blank_previous = with_new_token().await.unwrap().status();
    assert_eq!(reloads("refused"), 2.0);
    assert_eq!(reloads("applied"), 0.0);

    relay_switches(&app, &secret, &new, old);
    after(STEP, "both ways once a valid rotation is in effect", both).await;
    bonychat.set(&new);
    app.bonychat.accept(&[&new]);
    after(STEP, "both ways once BonyChat has switched", both).await;
    let (messages, webhooks) = (messages.stop().await, webhooks.stop().await);
    assert_nothing_dead_or_rejected(&app).await;

    assert_eq!((two_lines, blank_previous), (StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED), "never taken");
    assert_eq!(reloads("applied"), 1.0);
    messages.assert_nothing_refused();
    webhooks.assert_nothing_refused();
    messages.assert_each_delivered_once_in_order(&joinchat_texts(&app));
    webhooks.assert_each_delivered_once_in_order(&texts_of(&bonychat_posts(&app)));
    app.stop().await;
}

/// In a channels file each channel rotates on its own (`bonychat_api_token_previous_file`), its
/// counter is labelled with its name, and its tokens, current or previous, open no other channel.
#[tokio::test]
async fn a_channel_of_the_channels_file_rotates_its_token_alone() {
    alone!("a_channel_of_the_channels_file_rotates_its_token_alone");
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let (joinchat, bonychat) = (StandIn::joinchat("joinchat-secret").await, StandIn::bonychat("unused").await);
    for (file, value) in [
        ("app-secret", "acme-app-secret\n"),
        ("shoes-token", "shoes-token-old\n"),
        ("shoes-token-previous", ""),
        ("hats-token", "hats-token\n"),
        ("joinchat-secret", "joinchat-secret\n"),
    ] {
        std::fs::write(path(file), value).unwrap();
    }
    let channel = |name: &str, page: &str, token_keys: &str| {
        format!(
            "[channels.{name}]\nbonychat_channel_id = \"{name}-id\"\n{token_keys}\nbonychat_webhook_url = \"{hook}\"\n\
             joinchat_page_id = \"{page}\"\njoinchat_api_secret_file = \"{secret}\"\njoinchat_api_url = \"{api}\"\n\
             messenger_app = \"acme\"\njoinchat_order_gap_secs = 0\n\n",
            hook = bonychat.url,
            secret = path("joinchat-secret"),
            api = joinchat.url,
        )
    };
    let file = format!(
        "[apps.acme]\napp_secret_file = \"{}\"\nverify_token_env = \"ACME_VERIFY_TOKEN\"\n\n{}{}",
        path("app-secret"),
        channel(
            "shoes",
            "104857600123456",
            &format!(
                "bonychat_api_token_file = \"{}\"\nbonychat_api_token_previous_file = \"{}\"",
                path("shoes-token"),
                path("shoes-token-previous")
            )
        ),
        channel("hats", "204857600123456", &format!("bonychat_api_token_file = \"{}\"", path("hats-token"))),
    );
    std::fs::write(path("channels.toml"), file).unwrap();
    let mut vars: Vec<(String, String)> = test_vars("http://127.0.0.1:9/unused", dir.path())
        .into_iter()
        .filter(|(k, _)| !k.starts_with("BONYCHAT_") && !k.starts_with("MESSENGER_") && !k.starts_with("JOINCHAT_"))
        .collect();
    vars.push(("RELAY_CHANNELS_FILE".into(), path("channels.toml")));
    vars.push(("ACME_VERIFY_TOKEN".into(), "acme-verify".into()));
    let config = Config::from_env(&Env::from_pairs(vars.clone())).expect("the channels file is valid");
    let app = Application::build(config).await.expect("relay starts");
    let (addr, reloader, stop) = (app.local_addr(), app.reloader(), CancellationToken::new());
    let server = tokio::spawn(app.run_until_stopped(stop.clone()));
    let http = http_client();
    let send = |channel: &str, token: &str| {
        let body = json!({"channelId": format!("{channel}-id"), "contactId": "1066835436691078", "message": {"type": "text", "text": format!("to {channel}")}});
        http.post(format!("http://{addr}/channels/{channel}/message")).bearer_auth(token).json(&body).send()
    };
    let status = |answer: reqwest::Result<reqwest::Response>| answer.unwrap().status().as_u16();
    let shoes = |value: &str| {
        sample(
            "bonychat_relay_secret_matches_total",
            &[("secret", "bonychat_api_token"), ("owner", "shoes"), ("value", value)],
        )
    };

    std::fs::write(path("shoes-token"), "shoes-token-new\n").unwrap();
    std::fs::write(path("shoes-token-previous"), "shoes-token-old\n").unwrap();
    reloader.reload();
    let rotating = [
        status(send("shoes", "shoes-token-old").await),
        status(send("shoes", "shoes-token-new").await),
        status(send("hats", "shoes-token-old").await),
        status(send("shoes", "hats-token").await),
        status(send("hats", "hats-token").await),
    ];
    let counted = (shoes("previous"), shoes("current"));
    let shown = Config::from_env(&Env::from_pairs(vars)).unwrap().effective();
    std::fs::write(path("shoes-token-previous"), "").unwrap();
    reloader.reload();
    let dropped = status(send("shoes", "shoes-token-old").await);

    assert_eq!(rotating, [200, 200, 401, 401, 200], "old and new open shoes only; hats keeps its own");
    assert_eq!(counted, (1.0, 1.0));
    let value = |name: &str| shown.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    assert_eq!(value("channels.shoes.bonychat_api_token_previous").as_deref(), Some("[redacted]"));
    assert_eq!(value("channels.hats.bonychat_api_token_previous").as_deref(), Some("(unset)"));
    assert_eq!(dropped, 401, "the previous token is refused once dropped");
    stop.cancel();
    server.await.unwrap().unwrap();
}
