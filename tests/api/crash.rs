//! The crash test (SPEC §5): the relay binary is killed with SIGKILL in the middle of a load of
//! messages to many contacts, through a JoinChat that fails at random, then restarted on the
//! same store. Every message BonyChat got a 200 for must reach JoinChat, in order per contact;
//! duplicates are allowed (at-least-once) but bounded, counted and reported.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::RwLock;
use tokio::time::Instant;

use crate::binary::{RelayProcess, json_logs};
use crate::helpers::{
    API_TOKEN, APP_SECRET, CHANNEL_ID, JOINCHAT_SECRET, PAGE_ID, PSID, StandIn, http_client, hub_signature, test_vars,
};

const CONTACTS: usize = 20;
const MESSAGES_PER_CONTACT: usize = 25;
/// Acknowledged messages after which the relay is killed.
const KILL_AFTER: usize = CONTACTS * MESSAGES_PER_CONTACT / 3;

fn contact(i: usize) -> String {
    format!("{}", 2_000_000_000_000_000 + i)
}

#[tokio::test]
async fn every_acknowledged_message_survives_a_sigkill_in_order_per_contact() {
    // Arrange: a JoinChat failing one request in five, a relay with a patient retry schedule.
    let joinchat = StandIn::joinchat(JOINCHAT_SECRET).await;
    joinchat.fail_randomly(20);
    let bonychat = StandIn::bonychat(API_TOKEN).await;
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars(&joinchat.url, data.path());
    for (key, value) in [
        ("BONYCHAT_WEBHOOK_URL", bonychat.url.as_str()),
        ("RELAY_RETRY_JOINCHAT", "20ms,50ms,100ms,200ms,300ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms"),
        ("JOINCHAT_ORDER_GAP_SECS", "0"),
        ("RELAY_SEND_WAIT_MS", "500"),
    ] {
        vars.retain(|(k, _)| k != key);
        vars.push((key.to_owned(), value.to_owned()));
    }
    json_logs(&mut vars);
    vars.retain(|(k, _)| k != "RUST_LOG");
    vars.push(("RUST_LOG".into(), "info".into()));
    let relay = RelayProcess::start(&vars, &[]).await;
    let base = Arc::new(RwLock::new(relay.url("")));
    let acknowledged: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let unanswered = Arc::new(AtomicUsize::new(0));

    // Act: every contact's messages in order, all contacts at once; kill the relay mid-way.
    let senders: Vec<_> = (0..CONTACTS)
        .map(|i| {
            let (base, acknowledged, unanswered) = (Arc::clone(&base), Arc::clone(&acknowledged), Arc::clone(&unanswered));
            tokio::spawn(async move {
                let http = http_client();
                let contact = contact(i);
                for k in 1..=MESSAGES_PER_CONTACT {
                    let url = format!("{}/message", base.read().await);
                    let body = json!({"channelId": CHANNEL_ID, "contactId": contact, "message": {"type": "text", "text": format!("{contact}#{k}")}});
                    match http.post(url).bearer_auth(API_TOKEN).json(&body).timeout(Duration::from_secs(10)).send().await {
                        Ok(response) if response.status() == 200 => acknowledged.lock().unwrap().push((contact.clone(), k)),
                        // Killed mid-request: BonyChat was not answered, so nothing was promised.
                        _ => {
                            unanswered.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            })
        })
        .collect();

    while acknowledged.lock().unwrap().len() < KILL_AFTER {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    relay.kill().await;
    let acknowledged_before_kill = acknowledged.lock().unwrap().len();
    let restarted = RelayProcess::start(&vars, &[]).await;
    *base.write().await = restarted.url("");
    for sender in senders {
        sender.await.unwrap();
    }

    // Assert: wait until every acknowledged message was accepted by JoinChat.
    let acknowledged = acknowledged.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let accepted = loop {
        let accepted: Vec<String> = joinchat
            .received()
            .iter()
            .filter(|r| r.answered == 200)
            .map(|r| r.json()["message"]["text"].as_str().unwrap().to_owned())
            .collect();
        let missing = acknowledged.iter().filter(|(c, k)| !accepted.contains(&format!("{c}#{k}"))).count();
        if missing == 0 {
            break accepted;
        }
        assert!(Instant::now() < deadline, "{missing} acknowledged messages never reached JoinChat");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    restarted.terminate().await;

    let mut per_contact: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for text in &accepted {
        let (contact, k) = text.split_once('#').unwrap();
        per_contact.entry(contact.to_owned()).or_default().push(k.parse().unwrap());
    }
    let mut duplicates = 0;
    for (contact, sequence) in &per_contact {
        let mut firsts = sequence.clone();
        firsts.dedup();
        duplicates += sequence.len() - firsts.len();
        assert!(firsts.windows(2).all(|w| w[0] < w[1]), "contact {contact} out of order: {sequence:?}");
    }
    println!(
        "crash test: {} acknowledged ({acknowledged_before_kill} before the SIGKILL), {} unanswered, {} accepted by JoinChat, {duplicates} duplicate(s)",
        acknowledged.len(),
        unanswered.load(Ordering::Relaxed),
        accepted.len(),
    );
    // At most one attempt per contact is in flight when the process dies.
    assert!(duplicates <= CONTACTS, "{duplicates} duplicates");
    assert!(
        acknowledged.len() >= KILL_AFTER + CONTACTS * MESSAGES_PER_CONTACT / 3,
        "the restarted relay took messages too"
    );
}

/// What a relay keeps only in memory between sends (SPEC §3.4 pacing, §4.3 echoes) is rebuilt
/// from the store after a SIGKILL: the next send to a contact still keeps its distance from the
/// last one, and Messenger's echo of that last one is still recognised as the relay's own.
#[tokio::test]
async fn pacing_and_echo_records_hold_across_a_sigkill() {
    let joinchat = StandIn::joinchat(JOINCHAT_SECRET).await;
    let bonychat = StandIn::bonychat(API_TOKEN).await;
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars(&joinchat.url, data.path());
    for (key, value) in [("BONYCHAT_WEBHOOK_URL", bonychat.url.as_str()), ("JOINCHAT_ORDER_GAP_SECS", "5")] {
        vars.retain(|(k, _)| k != key);
        vars.push((key.to_owned(), value.to_owned()));
    }
    json_logs(&mut vars);
    let http = http_client();
    let send = |base: String, text: &'static str| {
        let http = http.clone();
        async move {
            let body = json!({"channelId": CHANNEL_ID, "contactId": PSID, "message": {"type": "text", "text": text}});
            http.post(format!("{base}/message")).bearer_auth(API_TOKEN).json(&body).send().await.unwrap().status()
        }
    };
    let relay = RelayProcess::start(&vars, &[]).await;
    assert_eq!(send(relay.url(""), "Sent before the crash").await, 200);
    relay.kill().await;

    let restarted = RelayProcess::start(&vars, &[]).await;
    let echo = json!({"object": "page", "entry": [{"id": PAGE_ID, "time": 1, "messaging": [
        {"sender": {"id": PAGE_ID}, "recipient": {"id": PSID}, "timestamp": 2,
         "message": {"is_echo": true, "mid": "m_echo_after_crash", "text": "Sent before the crash"}}
    ]}]})
    .to_string();
    let answer: serde_json::Value = http
        .post(restarted.url("/webhooks/messenger"))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", hub_signature(APP_SECRET, echo.as_bytes()))
        .body(echo)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(send(restarted.url(""), "Sent after the crash").await, 200);
    restarted.terminate().await;

    assert_eq!(answer["own_echoes"], 1, "{answer}");
    assert!(bonychat.received().is_empty(), "the relay's own message went to BonyChat as an echo");
    let bodies = joinchat.bodies();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    let delay = bodies[1]["delay"].as_u64().unwrap_or(0);
    assert!((4..=5).contains(&delay), "the send after the crash keeps 5 s from the one before: {bodies:?}");
}
