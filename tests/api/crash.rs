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
use crate::helpers::{API_TOKEN, CHANNEL_ID, JOINCHAT_SECRET, StandIn, http_client, test_vars};

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
