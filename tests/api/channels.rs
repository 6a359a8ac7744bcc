//! Many channels in one relay (SPEC §7): a real channels file, each channel with its own JoinChat
//! and BonyChat stand-ins checking that channel's signature and token.

use std::sync::Arc;
use std::time::Duration;

use bonychat_relay::config::{Config, Env};
use bonychat_relay::startup::{Application, Reloader};
use bonychat_relay::store::{JobState, Store};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::{StandIn, http_client, hub_signature, test_vars};

const APP_SECRET: &str = "acme-app-secret";
const VERIFY_TOKEN: &str = "acme-verify-token";

/// One channel of the test deployment and its upstreams.
struct TestChannel {
    name: String,
    /// Extra lines of its table (optional keys).
    extra: String,
    channel_id: String,
    token: String,
    page_id: String,
    joinchat: StandIn,
    bonychat: StandIn,
}

impl TestChannel {
    async fn new(name: &str, page_id: &str) -> Self {
        let token = format!("{name}-bonychat-token");
        Self {
            name: name.to_owned(),
            extra: String::new(),
            channel_id: format!("{name}-channel-id"),
            joinchat: StandIn::joinchat(&format!("{name}-joinchat-secret")).await,
            bonychat: StandIn::bonychat(&token).await,
            token,
            page_id: page_id.to_owned(),
        }
    }

    /// The channel's table, its secrets written to files in `dir`.
    fn table(&self, dir: &std::path::Path, app: &str) -> String {
        let token_file = dir.join(format!("{}-token", self.name));
        let secret_file = dir.join(format!("{}-joinchat", self.name));
        std::fs::write(&token_file, &self.token).unwrap();
        std::fs::write(&secret_file, format!("{}-joinchat-secret\n", self.name)).unwrap();
        format!(
            "[channels.{name}]\nbonychat_channel_id = \"{id}\"\nbonychat_api_token_file = \"{token}\"\n\
             bonychat_webhook_url = \"{webhook}\"\njoinchat_page_id = \"{page}\"\n\
             joinchat_api_secret_file = \"{secret}\"\njoinchat_api_url = \"{joinchat}\"\nmessenger_app = \"{app}\"\n\
             joinchat_order_gap_secs = 0\n{extra}\n",
            name = self.name,
            id = self.channel_id,
            token = token_file.display(),
            webhook = self.bonychat.url,
            page = self.page_id,
            secret = secret_file.display(),
            joinchat = self.joinchat.url,
            extra = self.extra,
        )
    }
}

struct Deployment {
    addr: std::net::SocketAddr,
    store: Arc<dyn Store>,
    reloader: Reloader,
    file: std::path::PathBuf,
    dir: tempfile::TempDir,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    http: reqwest::Client,
}

impl Deployment {
    async fn start(channels: &[&TestChannel], overrides: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("channels.toml");
        std::fs::write(dir.path().join("app-secret"), APP_SECRET).unwrap();
        write_file(&file, dir.path(), channels);
        let mut vars: Vec<(String, String)> = test_vars("http://127.0.0.1:9/unused", dir.path())
            .into_iter()
            .filter(|(k, _)| {
                !k.starts_with("BONYCHAT_CHANNEL")
                    && !matches!(
                        k.as_str(),
                        "BONYCHAT_API_TOKEN"
                            | "BONYCHAT_WEBHOOK_URL"
                            | "JOINCHAT_API_URL"
                            | "JOINCHAT_PAGE_ID"
                            | "JOINCHAT_API_SECRET"
                            | "MESSENGER_APP_SECRET"
                            | "MESSENGER_VERIFY_TOKEN"
                    )
            })
            .collect();
        vars.push(("RELAY_CHANNELS_FILE".into(), file.display().to_string()));
        vars.push(("ACME_VERIFY_TOKEN".into(), VERIFY_TOKEN.into()));
        for (k, v) in overrides {
            vars.retain(|(key, _)| key != k);
            vars.push(((*k).into(), (*v).into()));
        }
        let config = Config::from_env(&Env::from_pairs(vars)).expect("the channels file is valid");
        let app = Application::build(config).await.expect("relay starts");
        let (addr, store, reloader) = (app.local_addr(), app.store(), app.reloader());
        let stop = CancellationToken::new();
        let server = tokio::spawn(app.run_until_stopped(stop.clone()));
        Self { addr, store, reloader, file, dir, stop, server, http: http_client() }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Writes a new channels file and reloads, as `SIGHUP` does.
    fn reload_with(&self, channels: &[&TestChannel]) {
        write_file(&self.file, self.dir.path(), channels);
        self.reloader.reload();
    }

    async fn send_as(
        &self,
        path: &str,
        token: &str,
        channel_id: &str,
        contact: &str,
        text: &str,
    ) -> (StatusCode, Value) {
        let body = json!({"channelId": channel_id, "contactId": contact, "message": {"type": "text", "text": text}});
        let answer = self.http.post(self.url(path)).bearer_auth(token).json(&body).send().await.unwrap();
        let status = answer.status();
        (status, answer.json().await.unwrap_or(Value::Null))
    }

    async fn send(&self, channel: &TestChannel, contact: &str, text: &str) -> (StatusCode, Value) {
        let path = format!("/channels/{}/message", channel.name);
        self.send_as(&path, &channel.token, &channel.channel_id, contact, text).await
    }

    async fn webhook(&self, app: &str, body: &Value) -> reqwest::Response {
        let body = serde_json::to_vec(body).unwrap();
        self.http
            .post(self.url(&format!("/webhooks/messenger/{app}")))
            .header("content-type", "application/json")
            .header("x-hub-signature-256", hub_signature(APP_SECRET, &body))
            .body(body)
            .send()
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.server.await.unwrap().unwrap();
    }
}

fn write_file(file: &std::path::Path, dir: &std::path::Path, channels: &[&TestChannel]) {
    let mut content = format!(
        "[apps.acme]\napp_secret_file = \"{}\"\nverify_token_env = \"ACME_VERIFY_TOKEN\"\n\n",
        dir.join("app-secret").display()
    );
    for channel in channels {
        content.push_str(&channel.table(dir, "acme"));
    }
    std::fs::write(file, content).unwrap();
}

fn entry(page_id: &str, sender: &str, mid: &str, text: &str) -> Value {
    json!({"id": page_id, "time": 1_700_000_000_000_i64, "messaging": [{
        "sender": {"id": sender}, "recipient": {"id": page_id}, "timestamp": 1_700_000_000_000_i64,
        "message": {"mid": mid, "text": text}
    }]})
}

#[tokio::test]
async fn each_channel_sends_through_its_own_page_signed_with_its_own_secret() {
    let shoes = TestChannel::new("shoes", "104857600123456").await;
    let hats = TestChannel::new("hats", "204857600123456").await;
    let relay = Deployment::start(&[&shoes, &hats], &[]).await;

    let (shoes_status, _) = relay.send(&shoes, "1066835436691078", "shoes hello").await;
    let (hats_status, _) = relay.send(&hats, "1066835436691078", "hats hello").await;

    assert_eq!((shoes_status, hats_status), (StatusCode::OK, StatusCode::OK));
    for (channel, text) in [(&shoes, "shoes hello"), (&hats, "hats hello")] {
        let received = channel.joinchat.wait_for(1).await;
        assert_eq!(received.len(), 1, "{}: exactly its own message", channel.name);
        assert!(received[0].authentic, "{}: signed with its own secret", channel.name);
        let body = received[0].json();
        assert_eq!(body["page_id"], channel.page_id.as_str());
        assert_eq!(body["message"]["text"], text);
    }
    relay.stop().await;
}

#[tokio::test]
async fn one_webhook_batch_of_two_pages_reaches_each_channel_and_an_unknown_page_is_only_acknowledged() {
    let shoes = TestChannel::new("shoes", "104857600123456").await;
    let hats = TestChannel::new("hats", "204857600123456").await;
    let relay = Deployment::start(&[&shoes, &hats], &[]).await;
    let batch = json!({"object": "page", "entry": [
        entry(&shoes.page_id, "111", "m_shoes_1", "to shoes"),
        entry(&hats.page_id, "222", "m_hats_1", "to hats"),
        entry("999999999", "333", "m_nobody", "to nobody"),
        entry(&shoes.page_id, "111", "m_shoes_2", "to shoes again"),
    ]});

    let answer = relay.webhook("acme", &batch).await;

    assert_eq!(answer.status(), 200);
    let summary: Value = answer.json().await.unwrap();
    assert_eq!(summary["queued"], 3);
    assert_eq!(summary["unknown_pages"], 1);
    let shoes_posts = shoes.bonychat.wait_for(2).await;
    let hats_posts = hats.bonychat.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let texts = |posts: &[crate::helpers::Received], channel: &TestChannel| -> Vec<String> {
        posts
            .iter()
            .map(|post| {
                assert!(post.authentic, "{}: posted with its own token", channel.name);
                let body = post.json();
                assert_eq!(body["channelId"], channel.channel_id.as_str());
                body["events"][0]["message"]["text"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    assert_eq!(texts(&shoes.bonychat.received(), &shoes), ["to shoes", "to shoes again"]);
    assert_eq!(texts(&hats.bonychat.received(), &hats), ["to hats"]);
    drop((shoes_posts, hats_posts));
    relay.stop().await;
}

#[tokio::test]
async fn a_channel_answers_only_its_own_token_and_unknown_names_get_404() {
    let shoes = TestChannel::new("shoes", "104857600123456").await;
    let hats = TestChannel::new("hats", "204857600123456").await;
    let relay = Deployment::start(&[&shoes, &hats], &[]).await;

    let (wrong_token, body) =
        relay.send_as("/channels/shoes/message", &hats.token, &shoes.channel_id, "1066835436691078", "x").await;
    assert_eq!(wrong_token, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");

    let (unknown, body) = relay.send_as("/channels/boots/message", &shoes.token, "x", "1066835436691078", "x").await;
    assert_eq!(unknown, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "unknown_channel");

    let (no_default, body) = relay.send_as("/message", &shoes.token, &shoes.channel_id, "1066835436691078", "x").await;
    assert_eq!(no_default, StatusCode::NOT_FOUND, "no channel is named default here");
    assert_eq!(body["error"]["code"], "unknown_channel");

    let (other_channel_id, body) =
        relay.send_as("/channels/shoes/message", &shoes.token, &hats.channel_id, "1066835436691078", "x").await;
    assert_eq!(other_channel_id, StatusCode::BAD_REQUEST, "{body}");

    let unknown_app = relay.webhook("other", &json!({"object": "page", "entry": []})).await;
    assert_eq!(unknown_app.status(), 404);
    let forged = relay
        .http
        .post(relay.url("/webhooks/messenger/acme"))
        .header("x-hub-signature-256", hub_signature("another-app-secret", b"{}"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401, "signed with another app's secret");

    let handshake =
        |token: &str| {
            relay.http.get(relay.url(&format!(
                "/webhooks/messenger/acme?hub.mode=subscribe&hub.verify_token={token}&hub.challenge=c123"
            )))
        };
    let ok = handshake(VERIFY_TOKEN).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.text().await.unwrap(), "c123");
    assert_eq!(handshake("wrong").send().await.unwrap().status(), 403);
    assert!(shoes.joinchat.received().is_empty() && hats.joinchat.received().is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn a_removed_channel_answers_404_and_keeps_its_jobs_until_it_returns() {
    let shoes = TestChannel::new("shoes", "104857600123456").await;
    let hats = TestChannel::new("hats", "204857600123456").await;
    // Nothing is attempted while a request waits: the job stays queued for the dispatcher.
    let relay = Deployment::start(&[&shoes, &hats], &[("RELAY_SEND_WAIT_MS", "0")]).await;
    // A retry far away: the job is queued, not in flight, when the channel goes.
    hats.joinchat.script([crate::helpers::Reply::status(503, "")]);

    let (status, _) = relay.send(&hats, "1066835436691078", "kept while away").await;
    assert_eq!(status, StatusCode::OK);
    hats.joinchat.wait_for(1).await;
    relay.reload_with(&[&shoes]);
    let (gone, body) = relay.send(&hats, "1066835436691078", "refused").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let queued_while_away = relay.store.list(Some(JobState::Queued), None, 10).await.unwrap();

    relay.reload_with(&[&shoes, &hats]);
    let received = hats.joinchat.wait_for(2).await;

    assert_eq!(gone, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(queued_while_away.len(), 1, "the removed channel's job stays queued");
    assert_eq!(queued_while_away[0].channel, "hats");
    assert_eq!(received.len(), 2, "attempted again only once the channel returned");
    assert_eq!(received[1].json()["message"]["text"], "kept while away");
    relay.stop().await;
}

#[tokio::test]
async fn an_invalid_file_on_reload_changes_nothing() {
    let shoes = TestChannel::new("shoes", "104857600123456").await;
    let relay = Deployment::start(&[&shoes], &[]).await;

    std::fs::write(&relay.file, "[channels.shoes]\nbonychat_api_token = \"inline\"\n").unwrap();
    relay.reloader.reload();
    let (status, _) = relay.send(&shoes, "1066835436691078", "still served").await;

    assert_eq!(status, StatusCode::OK, "the running configuration stays in effect");
    assert_eq!(shoes.joinchat.wait_for(1).await.len(), 1);
    relay.stop().await;
}

/// Reloads adding and removing a channel while another channel takes a steady stream of
/// messages: every message accepted is sent once, in order, none lost or doubled.
#[tokio::test]
async fn reloads_under_load_lose_or_duplicate_nothing() {
    let shoes = TestChannel::new("shoes", "104857600123456").await;
    let hats = TestChannel::new("hats", "204857600123456").await;
    let relay = Arc::new(Deployment::start(&[&shoes], &[]).await);
    let shoes = Arc::new(shoes);

    let sender = {
        let (relay, shoes) = (Arc::clone(&relay), Arc::clone(&shoes));
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            for n in 0..150 {
                let contact = format!("contact{}", n % 5);
                let (status, _) = relay.send(&shoes, &contact, &format!("{contact} #{n}")).await;
                if status == StatusCode::OK {
                    accepted.push(format!("{contact} #{n}"));
                }
            }
            accepted
        })
    };
    for round in 0..10 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if round % 2 == 0 {
            relay.reload_with(&[&shoes, &hats]);
        } else {
            relay.reload_with(&[&shoes]);
        }
    }
    let accepted = sender.await.unwrap();

    assert_eq!(accepted.len(), 150, "the kept channel refused nothing during reloads");
    let received = shoes.joinchat.wait_for(150).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let texts: Vec<String> =
        shoes.joinchat.bodies().iter().map(|body| body["message"]["text"].as_str().unwrap().to_owned()).collect();
    assert_eq!(received.len(), 150);
    let mut unique = texts.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 150, "nothing sent twice");
    for contact in 0..5 {
        let prefix = format!("contact{contact} #");
        let order: Vec<u32> =
            texts.iter().filter_map(|t| t.strip_prefix(&prefix)).map(|n| n.parse().unwrap()).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "contact{contact} in order: {order:?}");
    }
    match Arc::try_unwrap(relay) {
        Ok(relay) => relay.stop().await,
        Err(_) => panic!("the sender still holds the relay"),
    }
}

/// One channel flooded while its JoinChat hangs (accepts connections, never answers): its
/// attempts hold their slots until the timeout, yet another channel's messages still go out at
/// once, because no channel holds more than its share of the slots.
#[tokio::test]
async fn a_flooded_channel_whose_joinchat_hangs_never_holds_up_another() {
    let hanging_url = format!("http://{}/api/send_message", crate::helpers::hanging_server().await);
    let mut flooded = TestChannel::new("flooded", "104857600123456").await;
    flooded.joinchat.url = hanging_url;
    let calm = TestChannel::new("calm", "204857600123456").await;
    let relay = Deployment::start(
        &[&flooded, &calm],
        &[("RELAY_SEND_WAIT_MS", "0"), ("JOINCHAT_TIMEOUT_MS", "20000"), ("RELAY_SHUTDOWN_GRACE_SECS", "0")],
    )
    .await;

    for n in 0..300 {
        let (status, _) = relay.send(&flooded, &format!("c{n}"), "flood").await;
        assert_eq!(status, StatusCode::OK);
    }
    // Every slot the flooded channel may hold is taken by an attempt that hangs.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = tokio::time::Instant::now();
    for n in 0..20 {
        let (status, _) = relay.send(&calm, &format!("calm{n}"), &format!("calm {n}")).await;
        assert_eq!(status, StatusCode::OK);
    }
    let received = calm.joinchat.wait_for(20).await;

    assert_eq!(received.len(), 20);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the calm channel's messages waited {:?} for the flooded one's hanging attempts",
        started.elapsed()
    );
    relay.stop().await;
}

/// `SIGHUP` re-reads every secret file, the admin token's too: the new token is taken at once
/// and the old one no longer is.
#[tokio::test]
async fn a_reload_takes_the_admin_token_from_its_file_again() {
    let shoes = TestChannel::new("shoes", "104857600123456").await;
    let secrets = tempfile::tempdir().unwrap();
    let admin_file = secrets.path().join("admin-token");
    std::fs::write(&admin_file, "first-admin-token\n").unwrap();
    let relay = Deployment::start(&[&shoes], &[("RELAY_ADMIN_TOKEN_FILE", admin_file.to_str().unwrap())]).await;
    let jobs = |token: &'static str| relay.http.get(relay.url("/admin/jobs")).bearer_auth(token).send();

    let before = jobs("first-admin-token").await.unwrap().status();
    std::fs::write(&admin_file, "second-admin-token\n").unwrap();
    relay.reloader.reload();
    let old = jobs("first-admin-token").await.unwrap().status();
    let new = jobs("second-admin-token").await.unwrap().status();

    assert_eq!((before, old, new), (StatusCode::OK, StatusCode::UNAUTHORIZED, StatusCode::OK));
    relay.stop().await;
}

/// A channel whose JoinChat fails every send rests instead of attempting each queued contact on
/// every retry: its upstream (and the store every channel shares) sees a few attempts a second,
/// not thousands, and the messages stay queued with their retries unspent.
#[tokio::test]
async fn a_channel_whose_joinchat_keeps_failing_rests_instead_of_hammering_it() {
    let failing = TestChannel::new("failing", "104857600123456").await;
    failing.joinchat.fail_randomly(100);
    let relay = Deployment::start(
        &[&failing],
        &[("RELAY_SEND_WAIT_MS", "0"), ("RELAY_RETRY_JOINCHAT", &["50ms"; 200].join(","))],
    )
    .await;

    for n in 0..50 {
        let (status, _) = relay.send(&failing, &format!("c{n}"), "x").await;
        assert_eq!(status, StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = failing.joinchat.received().len();
    let queued = relay.store.list(Some(JobState::Queued), None, 100).await.unwrap();

    // Without the rest: 50 contacts, a retry every 50 ms for 3 s, about 3 000 calls.
    assert!(calls < 400, "JoinChat got {calls} calls in 3 s");
    assert_eq!(queued.len(), 50, "every message still queued");
    assert!(
        queued.iter().all(|job| job.attempts < 20),
        "retries unspent: {:?}",
        queued.iter().map(|j| j.attempts).collect::<Vec<_>>()
    );
    relay.stop().await;
}

/// SPEC §5: each channel has its own intake cap; a full channel gets 503 `queue_full`, the others
/// go on.
#[tokio::test]
async fn a_channel_past_its_own_cap_is_refused_while_another_is_served() {
    let mut full = TestChannel::new("full", "104857600123456").await;
    full.extra = "max_queued = 3\n".into();
    full.joinchat.fail_randomly(100);
    let open = TestChannel::new("open", "204857600123456").await;
    let relay = Deployment::start(&[&full, &open], &[("RELAY_SEND_WAIT_MS", "0")]).await;

    let mut statuses = Vec::new();
    for n in 0..4 {
        statuses.push(relay.send(&full, &format!("c{n}"), "x").await);
    }
    let (open_status, _) = relay.send(&open, "c0", "still served").await;

    assert_eq!(statuses[..3].iter().map(|(s, _)| *s).collect::<Vec<_>>(), [StatusCode::OK; 3]);
    let (status, body) = &statuses[3];
    assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "queue_full");
    assert!(body["error"]["message"].as_str().unwrap().contains("full"), "{body}");
    assert_eq!(open_status, StatusCode::OK);
    assert_eq!(open.joinchat.wait_for(1).await.len(), 1);
    relay.stop().await;
}

/// The console lists every channel served, with its own queues, and redrives one channel's dead
/// letters without touching another's.
#[tokio::test]
async fn the_console_shows_each_channel_and_redrives_one_channel_s_dead_letters_only() {
    use crate::console::{ADMIN_TOKEN, FormPost, hidden, no_redirects, signed_in};
    let (shoes, hats) =
        (TestChannel::new("shoes", "104857600123456").await, TestChannel::new("hats", "204857600123456").await);
    for channel in [&shoes, &hats] {
        channel.joinchat.script([crate::helpers::Reply::status(400, r#"{"success":false,"errors":{"msg":"no"}}"#)]);
    }
    let relay =
        Deployment::start(&[&shoes, &hats], &[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN), ("RELAY_SEND_WAIT_MS", "0")]).await;
    assert_eq!(relay.send(&shoes, "c1", "for shoes").await.0, StatusCode::OK);
    assert_eq!(relay.send(&hats, "c1", "for hats").await.0, StatusCode::OK);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while relay.store.list(Some(JobState::Dead), None, 10).await.unwrap().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "both messages dead");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (http, base) = (no_redirects(), format!("http://{}", relay.addr));
    let session = signed_in(&http, &base).await;

    let overview = http.get(format!("{base}/admin/")).header("cookie", &session).send().await.unwrap();
    let overview = overview.text().await.unwrap();
    for channel in ["shoes", "hats"] {
        assert!(
            overview.contains(&format!("<a class=\"dead\" href=\"/admin/dead-letters?channel={channel}\">1</a>")),
            "{overview}"
        );
    }
    assert!(!overview.contains("<td>default</td>"), "no default channel is served here: {overview}");

    let csrf = hidden(&overview, "csrf");
    let redrive = http
        .post(format!("{base}/admin/dead-letters/redrive"))
        .header("cookie", &session)
        .form_of(&[("csrf", csrf.as_str()), ("channel", "shoes")])
        .send()
        .await
        .unwrap();
    assert_eq!(redrive.headers()["location"], "/admin/dead-letters?channel=shoes&redriven=1");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while shoes.joinchat.received().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "shoes' message sent again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dead = relay.store.list(Some(JobState::Dead), None, 10).await.unwrap();
    assert_eq!(dead.iter().map(|job| job.channel.as_str()).collect::<Vec<_>>(), ["hats"], "hats' dead letter stays");
    assert_eq!(hats.joinchat.received().len(), 1);
    relay.stop().await;
}
