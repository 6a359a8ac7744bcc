//! The sandbox as a newcomer runs it: the compiled binary with `config/sandbox.env`, its
//! stand-ins reached over loopback, `simulate messenger` and `check-config` run as processes.

use std::path::Path;
use std::time::Duration;

use bonychat_relay::routes::sandbox::{KEPT, KEPT_BODY_BYTES, KEPT_BYTES};
use serde_json::{Value, json};

use crate::binary::{RelayProcess, json_logs, run_binary};
use crate::helpers::{assert_error, http_client, test_vars};

const SANDBOX_ENV: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/sandbox.env");
/// The throwaway values of `config/sandbox.env`.
const TOKEN: &str = "sandbox-bonychat-token";
const CHANNEL: &str = "sandbox-channel";
const SECRETS: [&str; 4] =
    ["sandbox-bonychat-token", "sandbox-joinchat-secret", "sandbox-messenger-app-secret", "sandbox-verify-token"];
const CONTACT: &str = "1234567890";
/// What a stand-in's log may hold at most: its kept entries and the wrapping around them.
const KEPT_BYTES_SERVED: usize = KEPT_BYTES + 64;

/// The overrides a test needs on top of the env file: its own port (the file names 8080, and the
/// stand-in URLs must follow the port), its own store, JSON logs. The environment wins over the
/// file, as for an operator.
fn overrides(data: &Path) -> Vec<(String, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut vars: Vec<(String, String)> = [
        ("RELAY_ADDR", format!("127.0.0.1:{port}")),
        ("JOINCHAT_API_URL", format!("http://127.0.0.1:{port}/sandbox/joinchat/api/send_message")),
        ("BONYCHAT_WEBHOOK_URL", format!("http://127.0.0.1:{port}/sandbox/bonychat/webhook")),
        ("RELAY_DATABASE_URL", format!("sqlite://{}/sandbox.db", data.display())),
        ("RELAY_METRICS_ADDR", "127.0.0.1:0".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    json_logs(&mut vars);
    vars
}

async fn start_sandbox(data: &Path) -> (RelayProcess, Vec<(String, String)>) {
    let vars = overrides(data);
    (RelayProcess::start(&vars, &["--env-file", SANDBOX_ENV]).await, vars)
}

async fn post_message(relay: &RelayProcess, text: &str) -> reqwest::Response {
    http_client()
        .post(relay.url("/message"))
        .bearer_auth(TOKEN)
        .json(&json!({"channelId": CHANNEL, "contactId": CONTACT, "message": {"type": "text", "text": text}}))
        .send()
        .await
        .unwrap()
}

async fn get_json(relay: &RelayProcess, path: &str) -> Value {
    http_client().get(relay.url(path)).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn the_sandbox_relays_a_message_each_way_through_its_stand_ins() {
    // Arrange
    let data = tempfile::tempdir().unwrap();
    let (relay, vars) = start_sandbox(data.path()).await;

    // Act
    let sent = post_message(&relay, "hello from BonyChat").await;
    assert_eq!(sent.status(), 200);
    let sent_m_id = sent.json::<Value>().await.unwrap()["mId"].clone();
    let simulated = run_binary(
        &vars,
        &["--env-file", SANDBOX_ENV, "simulate", "messenger", "--text", "hi from Messenger", "--contact", CONTACT],
    )
    .await;
    let read =
        run_binary(&vars, &["--env-file", SANDBOX_ENV, "simulate", "messenger", "--read", "--contact", CONTACT]).await;
    let mut events = Value::Null;
    for _ in 0..100 {
        events = get_json(&relay, "/sandbox/bonychat/events").await;
        if events["events"].as_array().is_some_and(|e| e.len() >= 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let requests = get_json(&relay, "/sandbox/joinchat/requests").await;
    let (code, output) = relay.terminate().await;

    // Assert
    let request = &requests["requests"][0];
    assert_eq!(request["signatureValid"], true, "{requests}");
    assert_eq!(request["status"], 200);
    assert_eq!(request["body"]["message"]["text"], "hello from BonyChat");
    assert_eq!(request["body"]["recipient"]["id"], CONTACT);
    assert!(request["headers"]["x-joinchat-signature"].is_string());
    assert!(request["receivedAt"].is_number());

    assert_eq!(simulated.0, Some(0), "simulate: {simulated:?}");
    assert!(simulated.1.contains("200"), "the relay's answer is printed: {simulated:?}");
    let event = &events["events"][0];
    assert_eq!(event["tokenValid"], true, "{events}");
    assert_eq!(event["status"], 200);
    assert_eq!(event["body"]["channelId"], CHANNEL);
    assert_eq!(event["body"]["contactId"], CONTACT);
    assert_eq!(event["body"]["events"][0]["message"]["text"], "hi from Messenger");
    assert_eq!(read.0, Some(0), "simulate --read: {read:?}");
    let receipt = &events["events"][1]["body"]["events"][0];
    assert_eq!(receipt["type"], "message_status", "{events}");
    assert_eq!(receipt["status"]["value"], "read");
    assert_eq!(receipt["mId"], sent_m_id);

    assert_eq!(code, 0);
    let all = output.join("\n");
    for secret in SECRETS {
        assert!(!all.contains(secret), "{secret} appeared in the logs");
    }
}

#[tokio::test]
async fn a_message_containing_reject_is_refused_and_the_start_warns_it_is_a_sandbox() {
    // Arrange
    let data = tempfile::tempdir().unwrap();
    let (relay, _) = start_sandbox(data.path()).await;

    // Act
    let refused = post_message(&relay, "please #reject this").await;
    let status = refused.status();
    let body: Value = refused.json().await.unwrap();
    let requests = get_json(&relay, "/sandbox/joinchat/requests").await;
    let (_, output) = relay.terminate().await;

    // Assert
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "rejected_by_joinchat", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("#reject"), "{body}");
    assert_eq!(requests["requests"][0]["status"], 400);
    assert_eq!(requests["requests"][0]["signatureValid"], true);
    let warned = output.iter().filter_map(|line| serde_json::from_str::<Value>(line).ok()).any(|event| {
        event["level"] == "WARN"
            && event["message"].as_str().is_some_and(|m| m.contains("SANDBOX") && m.contains("production"))
    });
    assert!(warned, "a warning at start: {output:?}");
}

#[tokio::test]
async fn the_stand_ins_refuse_a_bad_signature_or_token_and_keep_the_verdict() {
    // Arrange
    let data = tempfile::tempdir().unwrap();
    let (relay, mut vars) = start_sandbox(data.path()).await;
    let http = http_client();

    // Act
    let joinchat = http
        .post(relay.url("/sandbox/joinchat/api/send_message"))
        .header("x-joinchat-signature", "bm90IGEgc2lnbmF0dXJl")
        .json(&json!({"page_id": "1", "recipient": {"id": CONTACT}, "message": {"text": "x"}}))
        .send()
        .await
        .unwrap();
    let joinchat_status = joinchat.status();
    let joinchat_body: Value = joinchat.json().await.unwrap();
    let bonychat =
        http.post(relay.url("/sandbox/bonychat/webhook")).bearer_auth("guessed").json(&json!({})).send().await;
    vars.retain(|(k, _)| k != "MESSENGER_APP_SECRET");
    vars.push(("MESSENGER_APP_SECRET".into(), "not-the-app-secret".into()));
    let badly_signed =
        run_binary(&vars, &["--env-file", SANDBOX_ENV, "simulate", "messenger", "--text", "hi", "--contact", CONTACT])
            .await;
    let requests = get_json(&relay, "/sandbox/joinchat/requests").await;
    let events = get_json(&relay, "/sandbox/bonychat/events").await;
    relay.terminate().await;

    // Assert
    assert_eq!(joinchat_status, 401);
    assert_eq!(joinchat_body, json!({"success": false, "errors": {"msg": "signature mismatch"}}));
    assert_eq!(requests["requests"][0]["signatureValid"], false);
    assert_eq!(bonychat.unwrap().status(), 401);
    assert_eq!(events["events"][0]["tokenValid"], false);
    assert_eq!(events["events"][0]["headers"]["authorization"], "Bearer [redacted]");
    assert_ne!(badly_signed.0, Some(0), "a refused simulation fails: {badly_signed:?}");
    assert!(badly_signed.1.contains("401"), "{badly_signed:?}");
}

#[tokio::test]
async fn sandbox_routes_are_not_found_unless_relay_sandbox_is_true() {
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars("http://127.0.0.1:9/api/send_message", data.path());
    json_logs(&mut vars);
    let relay = RelayProcess::start(&vars, &[]).await;
    let http = http_client();

    let requests = http.get(relay.url("/sandbox/joinchat/requests")).send().await.unwrap();
    let send = http.post(relay.url("/sandbox/joinchat/api/send_message")).json(&json!({})).send().await.unwrap();
    let webhook = http.post(relay.url("/sandbox/bonychat/webhook")).json(&json!({})).send().await.unwrap();
    let (_, output) = relay.terminate().await;

    for response in [requests, send, webhook] {
        let status = response.status();
        assert_error(status, &response.json().await.unwrap(), 404, "not_found");
    }
    assert!(!output.join("\n").contains("SANDBOX"), "no sandbox warning: {output:?}");
}

#[tokio::test]
async fn check_config_prints_the_configuration_without_a_secret_and_exits_0() {
    let data = tempfile::tempdir().unwrap();
    let vars = overrides(data.path());

    let (code, stdout, stderr) = run_binary(&vars, &["--env-file", SANDBOX_ENV, "check-config"]).await;

    assert_eq!(code, Some(0), "{stderr}");
    for line in
        ["RELAY_SANDBOX=true", "BONYCHAT_API_TOKEN=[redacted]", "JOINCHAT_API_SECRET=[redacted]", "RELAY_RETENTION=1d"]
    {
        assert!(stdout.lines().any(|l| l == line), "{line} missing from {stdout}");
    }
    assert!(stdout.lines().any(|l| l == "BONYCHAT_TIMEOUT_MS=10000"), "defaults are listed too: {stdout}");
    for secret in SECRETS {
        assert!(!stdout.contains(secret) && !stderr.contains(secret), "{secret} shown: {stdout}{stderr}");
    }
    assert!(std::fs::read_dir(data.path()).unwrap().next().is_none(), "no store was opened");
}

#[tokio::test]
async fn check_config_names_the_bad_variable_in_one_line_and_exits_2() {
    let data = tempfile::tempdir().unwrap();
    let mut vars = overrides(data.path());
    vars.push(("JOINCHAT_PAGE_ID".into(), "my-page".into()));

    let (code, stdout, stderr) = run_binary(&vars, &["--env-file", SANDBOX_ENV, "check-config"]).await;

    assert_eq!(code, Some(2));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("bonychat-relay: configuration error: JOINCHAT_PAGE_ID: "), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
}

/// A sandbox left on by mistake, flooded: more unsigned 1 MiB posts to each stand-in than it
/// keeps. What the stand-ins keep and serve stays bounded: the logs are small and quick to read,
/// each flooded entry is cut and says how big the body was, the process holds tens of MiB
/// rather than the gigabytes a kept megabyte per entry cost, and `/healthz` answers meanwhile.
#[tokio::test]
async fn a_flood_of_large_posts_leaves_the_stand_ins_logs_small_and_the_relay_responsive() {
    // Arrange
    let data = tempfile::tempdir().unwrap();
    let (relay, _) = start_sandbox(data.path()).await;
    let http = http_client();
    const MIB: usize = 1024 * 1024;
    let posts = KEPT + 20;
    let joinchat_body =
        json!({"page_id": "1", "recipient": {"id": CONTACT}, "message": {"text": "j".repeat(MIB - 100)}}).to_string();
    let bonychat_body = "b".repeat(MIB);

    // Act
    for round in 0..posts {
        let joinchat = http
            .post(relay.url("/sandbox/joinchat/api/send_message"))
            .header("x-joinchat-signature", "bm90IGEgc2lnbmF0dXJl")
            .header("content-type", "application/json")
            .body(joinchat_body.clone())
            .send();
        let bonychat =
            http.post(relay.url("/sandbox/bonychat/webhook")).bearer_auth("guessed").body(bonychat_body.clone()).send();
        let (joinchat, bonychat) = tokio::join!(joinchat, bonychat);
        assert_eq!(joinchat.unwrap().status(), 401, "post {round}");
        assert_eq!(bonychat.unwrap().status(), 401, "post {round}");
    }
    let started = std::time::Instant::now();
    let health = http.get(relay.url("/healthz")).timeout(Duration::from_secs(2)).send();
    let requests = http.get(relay.url("/sandbox/joinchat/requests")).send();
    let events = http.get(relay.url("/sandbox/bonychat/events")).send();
    let (health, requests, events) = tokio::join!(health, requests, events);
    let (requests, events) = (requests.unwrap().bytes().await.unwrap(), events.unwrap().bytes().await.unwrap());
    let read_in = started.elapsed();
    let peak = relay.peak_memory();
    relay.terminate().await;

    // Assert
    assert_eq!(health.expect("/healthz answers within 2 s").status(), 200);
    assert!(read_in < Duration::from_secs(2), "both logs read in {read_in:?}");
    for (log, key, size) in [(&requests, "requests", joinchat_body.len()), (&events, "events", bonychat_body.len())] {
        assert!(log.len() <= KEPT_BYTES_SERVED, "{key}: {} bytes served", log.len());
        let entries = serde_json::from_slice::<Value>(log).unwrap()[key].as_array().unwrap().clone();
        assert!(!entries.is_empty() && entries.len() <= KEPT, "{key}: {} entries", entries.len());
        let newest = entries.last().unwrap();
        assert_eq!(newest["bodyBytes"], size, "{key}");
        let body = newest["body"].as_str().unwrap();
        assert!(
            body.ends_with(&format!("[truncated: {size} bytes received, the first {KEPT_BODY_BYTES} kept]")),
            "{key}"
        );
    }
    assert!(peak < 200 * MIB as u64, "the relay peaked at {} MiB", peak / MIB as u64);
}

#[tokio::test]
async fn check_config_warns_about_a_sandbox_listening_beyond_the_loopback() {
    let data = tempfile::tempdir().unwrap();
    let mut vars = overrides(data.path());
    let port = vars.iter().find(|(k, _)| k == "RELAY_ADDR").unwrap().1.rsplit(':').next().unwrap().to_owned();

    let (local_code, _, on_loopback) = run_binary(&vars, &["--env-file", SANDBOX_ENV, "check-config"]).await;
    vars.retain(|(k, _)| k != "RELAY_ADDR");
    vars.push(("RELAY_ADDR".into(), format!("0.0.0.0:{port}")));
    let (code, _, exposed) = run_binary(&vars, &["--env-file", SANDBOX_ENV, "check-config"]).await;

    assert_eq!((local_code, code), (Some(0), Some(0)), "a warning, not a refusal: {exposed}");
    assert!(!on_loopback.contains("NON-LOOPBACK"), "{on_loopback}");
    let warning = exposed.lines().find(|line| line.contains("NON-LOOPBACK")).unwrap_or_else(|| panic!("{exposed}"));
    assert!(warning.starts_with("bonychat-relay: warning: RELAY_SANDBOX=true"), "{warning}");
    assert!(warning.contains(&format!("RELAY_ADDR=0.0.0.0:{port} is not a loopback address")), "{warning}");
}

/// Trying traces in the sandbox: the stand-ins show the `traceparent` the relay sent them (the
/// caller's, passed through with traces off), and nothing when there was none.
#[tokio::test]
async fn the_stand_ins_show_the_traceparent_the_relay_sent() {
    let data = tempfile::tempdir().unwrap();
    let (relay, _) = start_sandbox(data.path()).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    let traced = http_client()
        .post(relay.url("/message"))
        .bearer_auth(TOKEN)
        .header("traceparent", traceparent)
        .json(&json!({"channelId": CHANNEL, "contactId": CONTACT, "message": {"type": "text", "text": "traced"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(traced.status(), 200);
    assert_eq!(post_message(&relay, "untraced").await.status(), 200);

    let requests = get_json(&relay, "/sandbox/joinchat/requests").await;
    let requests = requests["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0]["headers"]["traceparent"], traceparent);
    assert!(requests[1]["headers"].get("traceparent").is_none(), "{requests:?}");
    relay.terminate().await;
}
