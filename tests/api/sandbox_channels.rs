//! The two-channel sandbox as a newcomer runs it (`config/sandbox-channels.env` and
//! `config/sandbox-channels.toml`), and `SIGHUP` sent to the real process: channels added and
//! removed, a bad file refused, `check-config` and a refused start naming the file, table and key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::binary::{RelayProcess, json_logs, run_binary};
use crate::helpers::{http_client, hub_signature};

const ENV_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/sandbox-channels.env");
const CHANNELS_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/sandbox-channels.toml");
/// The throwaway values of `config/sandbox-channels.env`.
const APP_SECRET: &str = "sandbox-messenger-app-secret";
const SECRETS: [&str; 6] = [
    "sandbox-messenger-app-secret",
    "sandbox-verify-token",
    "sandbox-shoes-token",
    "sandbox-shoes-joinchat-secret",
    "sandbox-hats-token",
    "sandbox-hats-joinchat-secret",
];
const SHOES_PAGE: &str = "100000000000001";
const HATS_PAGE: &str = "100000000000002";
const CONTACT: &str = "1234567890";

struct Sandbox {
    relay: RelayProcess,
    vars: Vec<(String, String)>,
    /// The channels file the relay reads: `config/sandbox-channels.toml` on this test's port.
    file: PathBuf,
    port: u16,
    metrics: String,
    _data: tempfile::TempDir,
}

/// `config/sandbox-channels.toml` as shipped, on `port` instead of 8080.
fn channels_file(port: u16) -> String {
    std::fs::read_to_string(CHANNELS_FILE).unwrap().replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Sandbox {
    async fn start() -> Self {
        let data = tempfile::tempdir().unwrap();
        let (port, metrics_port) = (free_port(), free_port());
        let file = data.path().join("channels.toml");
        std::fs::write(&file, channels_file(port)).unwrap();
        let mut vars: Vec<(String, String)> = vec![
            ("RELAY_ADDR".into(), format!("127.0.0.1:{port}")),
            ("RELAY_METRICS_ADDR".into(), format!("127.0.0.1:{metrics_port}")),
            ("RELAY_CHANNELS_FILE".into(), file.display().to_string()),
            ("RELAY_DATABASE_URL".into(), format!("sqlite://{}/sandbox.db", data.path().display())),
        ];
        json_logs(&mut vars);
        let relay = RelayProcess::start(&vars, &["--env-file", ENV_FILE]).await;
        let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
        Self { relay, vars, file, port, metrics, _data: data }
    }

    async fn send(&self, channel: &str, token: &str, channel_id: &str, text: &str) -> reqwest::Response {
        http_client()
            .post(self.relay.url(&format!("/channels/{channel}/message")))
            .bearer_auth(token)
            .json(&json!({"channelId": channel_id, "contactId": CONTACT, "message": {"type": "text", "text": text}}))
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> Value {
        http_client().get(self.relay.url(path)).send().await.unwrap().json().await.unwrap()
    }

    /// What a stand-in of `channel` kept, once it holds `n` entries.
    async fn kept(&self, path: &str, key: &str, n: usize) -> Vec<Value> {
        for _ in 0..100 {
            let kept = self.get(path).await[key].as_array().cloned().unwrap_or_default();
            if kept.len() >= n {
                return kept;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{path} never held {n} entries: {}", self.get(path).await);
    }

    /// Sends SIGHUP and waits for the reload's log line (applied or refused).
    async fn hang_up(&self, seen_before: usize) {
        self.relay.signal("HUP").await;
        for _ in 0..200 {
            if self.reload_lines() > seen_before {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no reload logged: {:?}", self.relay.output());
    }

    fn reload_lines(&self) -> usize {
        self.relay.output().iter().filter(|line| line.contains("SIGHUP: configuration")).count()
    }

    /// The reloads counted with `result`, once it reads `expected` (scrapes are cached for a
    /// second), or what it reads after three.
    async fn reloads(&self, result: &str, expected: u64) -> u64 {
        let series = format!("bonychat_relay_config_reloads_total{{result=\"{result}\"}} ");
        let mut count = 0;
        for _ in 0..30 {
            let text = http_client().get(&self.metrics).send().await.unwrap().text().await.unwrap();
            count = text.lines().find_map(|line| line.strip_prefix(&series)).map_or(0, |n| n.trim().parse().unwrap());
            if count == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        count
    }
}

fn entry(page: &str, mid: &str, text: &str) -> Value {
    json!({"id": page, "time": 1_700_000_000_000_i64, "messaging": [{
        "sender": {"id": CONTACT}, "recipient": {"id": page}, "timestamp": 1_700_000_000_000_i64,
        "message": {"mid": mid, "text": text}
    }]})
}

#[tokio::test]
async fn the_two_channel_sandbox_keeps_each_channels_traffic_apart() {
    // Arrange
    let sandbox = Sandbox::start().await;

    // Act: one message each way on each channel, the inbound ones in one batch of both Pages.
    let shoes = sandbox.send("shoes", "sandbox-shoes-token", "sandbox-shoes", "shoes outbound").await;
    let hats = sandbox.send("hats", "sandbox-hats-token", "sandbox-hats", "hats outbound").await;
    let batch = serde_json::to_vec(&json!({"object": "page", "entry": [
        entry(SHOES_PAGE, "m_shoes", "shoes inbound"),
        entry(HATS_PAGE, "m_hats", "hats inbound"),
    ]}))
    .unwrap();
    let webhook = http_client()
        .post(sandbox.relay.url("/webhooks/messenger/sandbox"))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", hub_signature(APP_SECRET, &batch))
        .body(batch)
        .send()
        .await
        .unwrap();
    let simulated = run_binary(
        &sandbox.vars,
        &[
            "--env-file",
            ENV_FILE,
            "simulate",
            "messenger",
            "--channel",
            "hats",
            "--text",
            "simulated",
            "--contact",
            CONTACT,
        ],
    )
    .await;

    // Assert
    assert_eq!((shoes.status().as_u16(), hats.status().as_u16(), webhook.status().as_u16()), (200, 200, 200));
    assert_eq!(simulated.0, Some(0), "simulate --channel: {simulated:?}");
    for (channel, page, outbound, inbound) in [
        ("shoes", SHOES_PAGE, "shoes outbound", vec!["shoes inbound"]),
        ("hats", HATS_PAGE, "hats outbound", vec!["hats inbound", "simulated"]),
    ] {
        let requests = sandbox.kept(&format!("/sandbox/channels/{channel}/joinchat/requests"), "requests", 1).await;
        assert_eq!(requests.len(), 1, "{channel}: only its own message: {requests:?}");
        assert_eq!(requests[0]["signatureValid"], true, "{channel}: signed with its own secret");
        assert_eq!(requests[0]["body"]["page_id"], page);
        assert_eq!(requests[0]["body"]["message"]["text"], outbound);
        let events =
            sandbox.kept(&format!("/sandbox/channels/{channel}/bonychat/events"), "events", inbound.len()).await;
        let texts: Vec<&str> =
            events.iter().map(|e| e["body"]["events"][0]["message"]["text"].as_str().unwrap()).collect();
        assert_eq!(texts, inbound, "{channel}: only its own events");
        assert!(
            events.iter().all(|e| e["tokenValid"] == true && e["body"]["channelId"] == format!("sandbox-{channel}"))
        );
    }
    let (code, output) = sandbox.relay.terminate().await;
    assert_eq!(code, 0);
    let all = output.join("\n");
    for secret in SECRETS {
        assert!(!all.contains(secret), "{secret} appeared in the logs");
    }
}

#[tokio::test]
async fn sighup_adds_and_removes_channels_and_a_bad_file_changes_nothing() {
    // Arrange
    let sandbox = Sandbox::start().await;
    // `boots` borrows the stand-ins of `shoes` (they exist from the start) on a third Page.
    let with_boots = channels_file(sandbox.port).replace("[channels.hats]", "[channels.boots]\nbonychat_channel_id = \"sandbox-boots\"\nbonychat_api_token_env = \"BOOTS_TOKEN\"\nbonychat_webhook_url = \"http://127.0.0.1:PORT/sandbox/channels/shoes/bonychat/webhook\"\njoinchat_api_url = \"http://127.0.0.1:PORT/sandbox/channels/shoes/joinchat/api/send_message\"\njoinchat_page_id = \"100000000000003\"\njoinchat_api_secret_env = \"SANDBOX_SHOES_JOINCHAT_SECRET\"\nmessenger_app = \"sandbox\"\n\n[channels.hats]").replace("PORT", &sandbox.port.to_string());
    assert_eq!(sandbox.reloads("applied", 0).await, 0);

    // Act + Assert: a channel whose secret variable is not set is refused, nothing changes.
    std::fs::write(&sandbox.file, &with_boots).unwrap();
    sandbox.hang_up(0).await;
    assert_eq!(sandbox.reloads("refused", 1).await, 1);
    let refused = sandbox.relay.output().into_iter().find(|line| line.contains("configuration refused")).unwrap();
    assert!(refused.contains("[channels.boots] bonychat_api_token_env"), "{refused}");
    assert_eq!(sandbox.send("boots", "boots-token", "sandbox-boots", "too early").await.status(), 404);

    // The variable cannot change under a running process; a secret file can.
    let token_file = sandbox.file.with_file_name("boots-token");
    std::fs::write(&token_file, "boots-token\n").unwrap();
    let with_boots = with_boots.replace(
        "bonychat_api_token_env = \"BOOTS_TOKEN\"",
        &format!("bonychat_api_token_file = \"{}\"", token_file.display()),
    );
    std::fs::write(&sandbox.file, &with_boots).unwrap();
    sandbox.hang_up(1).await;
    assert_eq!(sandbox.reloads("applied", 1).await, 1);
    let boots = sandbox.send("boots", "boots-token", "sandbox-boots", "boots outbound").await;
    assert_eq!(boots.status(), 200, "a channel added serves at once");
    let requests = sandbox.kept("/sandbox/channels/shoes/joinchat/requests", "requests", 1).await;
    assert_eq!(requests[0]["body"]["page_id"], "100000000000003");

    let without_hats = &with_boots[..with_boots.find("[channels.hats]").unwrap()];
    std::fs::write(&sandbox.file, without_hats).unwrap();
    sandbox.hang_up(2).await;
    let hats = sandbox.send("hats", "sandbox-hats-token", "sandbox-hats", "gone").await;
    assert_eq!(hats.status(), 404, "a channel removed answers 404");
    assert_eq!(hats.json::<Value>().await.unwrap()["error"]["code"], "unknown_channel");
    assert_eq!(sandbox.send("shoes", "sandbox-shoes-token", "sandbox-shoes", "kept").await.status(), 200);
    assert_eq!(sandbox.reloads("applied", 2).await, 2);
    let (code, _) = sandbox.relay.terminate().await;
    assert_eq!(code, 0);
}

async fn check_config_with(file: &Path, vars: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut all: Vec<(String, String)> = vec![("RELAY_CHANNELS_FILE".into(), file.display().to_string())];
    all.extend(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    run_binary(&all, &["--env-file", ENV_FILE, "check-config"]).await
}

#[tokio::test]
async fn check_config_lists_every_channel_and_app_without_a_secret() {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("channels.toml");
    std::fs::write(&file, channels_file(8080)).unwrap();

    let (code, stdout, stderr) = check_config_with(&file, &[]).await;

    assert_eq!(code, Some(0), "{stderr}");
    for line in [
        "apps.sandbox.app_secret=[redacted]",
        "channels.shoes.bonychat_channel_id=sandbox-shoes",
        "channels.shoes.bonychat_api_token=[redacted]",
        "channels.hats.joinchat_page_id=100000000000002",
        "channels.hats.messenger_app=sandbox",
        "channels.hats.max_queued=100000",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line} missing from {stdout}");
    }
    for secret in SECRETS {
        assert!(!stdout.contains(secret) && !stderr.contains(secret), "{secret} shown");
    }
}

#[tokio::test]
async fn a_bad_channels_file_stops_the_start_with_one_line_naming_file_table_and_key() {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("channels.toml");
    std::fs::write(
        &file,
        channels_file(8080).replace("joinchat_page_id = \"100000000000002\"", "joinchat_page_id = \"hats\""),
    )
    .unwrap();

    let (check, _, check_stderr) = check_config_with(&file, &[]).await;
    let mut vars = vec![("RELAY_CHANNELS_FILE".to_owned(), file.display().to_string())];
    vars.push(("RELAY_DATABASE_URL".into(), format!("sqlite://{}/relay.db", data.path().display())));
    let (start, _, start_stderr) = run_binary(&vars, &["--env-file", ENV_FILE]).await;
    let (both, _, both_stderr) = check_config_with(&file, &[("JOINCHAT_PAGE_ID", "1")]).await;

    for (code, stderr) in [(check, &check_stderr), (start, &start_stderr)] {
        assert_eq!(code, Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!(
                "RELAY_CHANNELS_FILE: {}: [channels.hats] joinchat_page_id: `hats`",
                file.display()
            )),
            "{stderr}"
        );
    }
    assert_eq!(both, Some(2));
    assert!(both_stderr.contains("JOINCHAT_PAGE_ID"), "the variables set besides the file are named: {both_stderr}");
    assert!(!data.path().join("relay.db").exists(), "no store was opened");
}
