//! The multi-replica test: three relay processes on one PostgreSQL database, under a load of
//! messages to many contacts through a JoinChat that fails at random. Mid-run one replica is
//! killed with SIGKILL and started again, and later the database itself crashes and restarts. Every message
//! BonyChat got a 200 for must reach JoinChat, in order per contact, with few duplicates; and a
//! Messenger webhook delivered to all three replicas at once reaches BonyChat once.
//!
//! The database is a cluster of the test's own (`DedicatedPostgres`), so its restart does not
//! disturb the other tests on the shared cluster.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::binary::{RelayProcess, json_logs};
use crate::helpers::{
    API_TOKEN, APP_SECRET, CHANNEL_ID, JOINCHAT_SECRET, PAGE_ID, Reply, StandIn, http_client, hub_signature, test_vars,
};
use crate::postgres::DedicatedPostgres;

const REPLICAS: usize = 3;
const CONTACTS: usize = 300;
const MESSAGES_PER_CONTACT: usize = 10;
const MESSAGES: usize = CONTACTS * MESSAGES_PER_CONTACT;
/// Contacts whose messages are being sent at one time.
const CONCURRENT_CONTACTS: usize = 64;
/// Duplicates allowed, in percent of the messages (at-least-once, but not much more).
const MAX_DUPLICATE_PERCENT: usize = 3;
/// Attempts at one message (each a 503 or a connection error) before the test gives up.
const MAX_ATTEMPTS: usize = 300;

fn contact(i: usize) -> String {
    format!("{}", 3_000_000_000_000_000 + i)
}

/// 30 quick steps, about 10 s in all: a JoinChat failing one request in five never exhausts
/// it, so nothing is dead-lettered.
fn quick_long_schedule() -> String {
    let mut steps = vec!["50ms", "100ms"];
    steps.extend(["200ms"; 18]);
    steps.extend(["500ms"; 10]);
    steps.join(",")
}

fn set(vars: &mut Vec<(String, String)>, key: &str, value: &str) {
    vars.retain(|(k, _)| k != key);
    vars.push((key.to_owned(), value.to_owned()));
}

/// What the senders saw.
#[derive(Default)]
struct Load {
    /// Texts answered 200, in the order of the answers.
    acknowledged: Mutex<Vec<String>>,
    acknowledgements: AtomicUsize,
    refused: AtomicUsize,
    connection_errors: AtomicUsize,
    /// Round-robin over the replicas.
    next_replica: AtomicUsize,
    next_contact: AtomicUsize,
}

/// Takes contacts one after another and sends each one's messages in order: message k+1 only
/// after message k was acknowledged. A 503 or a connection error is retried, with the same
/// text, on the next replica after a short pause.
async fn sender(replicas: Arc<RwLock<Vec<String>>>, load: Arc<Load>) {
    let http = http_client();
    loop {
        let i = load.next_contact.fetch_add(1, Ordering::Relaxed);
        if i >= CONTACTS {
            return;
        }
        let contact = contact(i);
        for k in 1..=MESSAGES_PER_CONTACT {
            let text = format!("{contact}#{k}");
            let body =
                json!({"channelId": CHANNEL_ID, "contactId": contact, "message": {"type": "text", "text": text}});
            let mut replica = load.next_replica.fetch_add(1, Ordering::Relaxed) % REPLICAS;
            for attempt in 1.. {
                assert!(attempt <= MAX_ATTEMPTS, "{text} was not acknowledged after {MAX_ATTEMPTS} attempts");
                let url = format!("{}/message", replicas.read().unwrap()[replica]);
                let answer =
                    http.post(url).bearer_auth(API_TOKEN).json(&body).timeout(Duration::from_secs(10)).send().await;
                match answer {
                    Ok(response) if response.status() == 200 => break,
                    Ok(response) if response.status() == 503 => {
                        load.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(response) => {
                        let status = response.status();
                        panic!("{text}: the relay answered {status}: {}", response.text().await.unwrap_or_default())
                    }
                    // Perhaps stored before the connection broke: a retry may make a duplicate.
                    Err(_) => {
                        load.connection_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                replica = (replica + 1) % REPLICAS;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            load.acknowledged.lock().unwrap().push(text);
            load.acknowledgements.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Waits until `n` messages were acknowledged, or every sender has ended (then the caller's
/// join shows why), at most `limit`.
async fn wait_for_acknowledgements(load: &Load, n: usize, senders: &[JoinHandle<()>], limit: Duration) {
    let deadline = Instant::now() + limit;
    while load.acknowledgements.load(Ordering::Relaxed) < n && !senders.iter().all(JoinHandle::is_finished) {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages acknowledged after {limit:?}",
            load.acknowledgements.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `(contact, text)` of every request JoinChat accepted, in arrival order.
fn accepted_by(joinchat: &StandIn) -> Vec<(String, String)> {
    joinchat
        .received()
        .iter()
        .filter(|r| r.authentic && r.answered == 200)
        .map(|r| {
            let body = r.json();
            let contact = body["recipient"]["id"].as_str().expect("recipient.id").to_owned();
            (contact, body["message"]["text"].as_str().expect("message.text").to_owned())
        })
        .collect()
}

/// A Messenger webhook batch: `messages` text messages from each of `contacts` senders, each
/// in an entry of its own as Meta batches them, every mid distinct.
fn webhook_batch(contacts: usize, messages: usize) -> (Vec<u8>, Vec<String>) {
    let mut entries = Vec::new();
    let mut mids = Vec::new();
    for c in 0..contacts {
        let sender = format!("{}", 4_000_000_000_000_000 + c);
        for m in 0..messages {
            let mid = format!("mid.replicas.{c}.{m}");
            let timestamp = 1_700_000_000_000_i64 + i64::try_from(c * messages + m).unwrap();
            entries.push(json!({"id": PAGE_ID, "time": timestamp, "messaging": [
                {"sender": {"id": sender}, "recipient": {"id": PAGE_ID}, "timestamp": timestamp,
                 "message": {"mid": mid, "text": format!("from {sender}, {m}")}}
            ]}));
            mids.push(mid);
        }
    }
    (serde_json::to_vec(&json!({"object": "page", "entry": entries})).unwrap(), mids)
}

/// The mId of every `message` event BonyChat received, with how many times it came.
fn bonychat_events(bonychat: &StandIn) -> BTreeMap<String, usize> {
    let mut events = BTreeMap::new();
    for post in bonychat.received().iter().filter(|r| r.authentic && r.answered == 200) {
        for event in post.json()["events"].as_array().expect("events").iter().filter(|e| e["type"] == "message") {
            *events.entry(event["mId"].as_str().expect("mId").to_owned()).or_insert(0) += 1;
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_clusters),
    ignore = "no PostgreSQL binaries (initdb, pg_ctl) for a cluster of its own: install postgresql (see README)"
)]
async fn three_replicas_on_one_database_deliver_everything_in_order_through_a_sigkill_and_a_database_restart() {
    // Arrange: a database of the test's own, a JoinChat failing one request in five, three relays.
    let postgres = DedicatedPostgres::start().await;
    let database_url = postgres.fresh_database().await;
    let joinchat = StandIn::joinchat(JOINCHAT_SECRET).await;
    joinchat.fail_randomly(20);
    let bonychat = StandIn::bonychat(API_TOKEN).await;
    // Only for test_vars' SQLite default, which RELAY_DATABASE_URL replaces.
    let unused = tempfile::tempdir().unwrap();
    let mut vars = test_vars(&joinchat.url, unused.path());
    let schedule = quick_long_schedule();
    for (key, value) in [
        ("RELAY_DATABASE_URL", database_url.as_str()),
        ("BONYCHAT_WEBHOOK_URL", bonychat.url.as_str()),
        ("RELAY_RETRY_JOINCHAT", &schedule),
        ("RELAY_RETRY_BONYCHAT", &schedule),
        ("JOINCHAT_ORDER_GAP_SECS", "0"),
        // Long enough for the requests to take most first attempts themselves, across replicas.
        ("RELAY_SEND_WAIT_MS", "1000"),
    ] {
        set(&mut vars, key, value);
    }
    json_logs(&mut vars);
    set(&mut vars, "RUST_LOG", "info");
    let mut relays = Vec::new();
    for _ in 0..REPLICAS {
        relays.push(RelayProcess::start(&vars, &[]).await);
    }
    let replicas = Arc::new(RwLock::new(relays.iter().map(|relay| relay.url("")).collect::<Vec<_>>()));
    let load = Arc::new(Load::default());
    let started = Instant::now();

    // Act: the load, a SIGKILL of one replica after a third, a database restart after two thirds.
    let senders: Vec<_> =
        (0..CONCURRENT_CONTACTS).map(|_| tokio::spawn(sender(Arc::clone(&replicas), Arc::clone(&load)))).collect();

    wait_for_acknowledgements(&load, MESSAGES / 3, &senders, Duration::from_secs(300)).await;
    let acknowledged_at_kill = load.acknowledgements.load(Ordering::Relaxed);
    let victim = relays.remove(1);
    victim.kill().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = RelayProcess::start(&vars, &[]).await;
    replicas.write().unwrap()[1] = again.url("");
    relays.insert(1, again);

    wait_for_acknowledgements(&load, 2 * MESSAGES / 3, &senders, Duration::from_secs(300)).await;
    let acknowledged_at_restart = load.acknowledgements.load(Ordering::Relaxed);
    // A crash, not a shutdown: what was committed must come back from the write-ahead log.
    postgres.crash_restart().await;

    for sender in senders {
        sender.await.expect("a sender failed");
    }

    // Assert: every acknowledged message reaches JoinChat.
    let acknowledged = load.acknowledged.lock().unwrap().clone();
    assert_eq!(acknowledged.len(), MESSAGES);
    let deadline = Instant::now() + Duration::from_secs(120);
    let accepted = loop {
        let accepted = accepted_by(&joinchat);
        let delivered: HashSet<&str> = accepted.iter().map(|(_, text)| text.as_str()).collect();
        let missing: Vec<&String> = acknowledged.iter().filter(|text| !delivered.contains(text.as_str())).collect();
        if missing.is_empty() {
            break accepted;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged messages never reached JoinChat, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let seconds = started.elapsed().as_secs_f64();

    // In order per contact: the first appearances of each contact's messages only go up.
    let mut firsts: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for (recipient, text) in &accepted {
        let (contact, k) = text.split_once('#').expect("contact#k");
        assert_eq!(recipient, contact, "{text} went to {recipient}");
        if seen.insert(text.as_str()) {
            firsts.entry(contact).or_default().push(k.parse().unwrap());
        }
    }
    for (contact, sequence) in &firsts {
        assert!(sequence.windows(2).all(|w| w[0] < w[1]), "contact {contact} out of order: {sequence:?}");
    }
    let duplicates = accepted.len() - seen.len();
    println!(
        "replicas test: {MESSAGES} messages over {REPLICAS} replicas ({acknowledged_at_kill} acknowledged at the SIGKILL, \
         {acknowledged_at_restart} at the database restart), {} accepted by JoinChat, {duplicates} duplicate(s), \
         {} 503s and {} connection errors retried, {seconds:.1} s",
        accepted.len(),
        load.refused.load(Ordering::Relaxed),
        load.connection_errors.load(Ordering::Relaxed),
    );
    assert!(
        duplicates * 100 <= MESSAGES * MAX_DUPLICATE_PERCENT,
        "{duplicates} duplicates: more than {MAX_DUPLICATE_PERCENT} % of {MESSAGES}"
    );

    // Act: one webhook batch, delivered by Meta to all three replicas at once.
    let (batch, mids) = webhook_batch(3, 4);
    let signature = hub_signature(APP_SECRET, &batch);
    let posts: Vec<_> = relays
        .iter()
        .map(|relay| {
            let (url, batch, signature) = (relay.url("/webhooks/messenger"), batch.clone(), signature.clone());
            tokio::spawn(async move {
                let response = http_client()
                    .post(url)
                    .header("content-type", "application/json")
                    .header("x-hub-signature-256", signature)
                    .body(batch)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .expect("the relay answers");
                let status = response.status().as_u16();
                (status, response.text().await.unwrap_or_default())
            })
        })
        .collect();
    for post in posts {
        let (status, body) = post.await.unwrap();
        assert_eq!(status, 200, "every replica takes the batch: {body}");
    }

    // Assert: BonyChat gets every event once, however many replicas took it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while bonychat_events(&bonychat).len() < mids.len() {
        assert!(Instant::now() < deadline, "BonyChat got only {:?}", bonychat_events(&bonychat));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stragglers: a second copy would come within the retry schedule's first steps.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let expected: BTreeMap<String, usize> = mids.into_iter().map(|mid| (mid, 1)).collect();
    assert_eq!(bonychat_events(&bonychat), expected, "each event exactly once");

    for relay in relays {
        relay.kill().await;
    }
}

/// `/message` takes its own job's first attempt in the replica that took it, even behind a job
/// of the same contact that another replica has in flight: that replica's finish wakes it
/// (`NOTIFY`), so JoinChat's refusal still reaches BonyChat as a 400 within the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn a_request_behind_another_replicas_job_takes_its_own_first_attempt_when_that_one_ends() {
    let url = crate::postgres::fresh_database().await;
    let joinchat = StandIn::joinchat(JOINCHAT_SECRET).await;
    joinchat.script([
        Reply::ok().after(Duration::from_millis(800)),
        Reply::status(400, r#"{"success": false, "errors": {"msg": "blocked by the page"}}"#),
    ]);
    let unused = tempfile::tempdir().unwrap();
    let mut vars = test_vars(&joinchat.url, unused.path());
    set(&mut vars, "RELAY_DATABASE_URL", &url);
    set(&mut vars, "JOINCHAT_ORDER_GAP_SECS", "0");
    set(&mut vars, "RELAY_SEND_WAIT_MS", "5000");
    json_logs(&mut vars);
    let (first, second) = (RelayProcess::start(&vars, &[]).await, RelayProcess::start(&vars, &[]).await);
    let send = |relay: &RelayProcess, text: &str| {
        let body = json!({"channelId": CHANNEL_ID, "contactId": contact(0), "message": {"type": "text", "text": text}});
        http_client().post(relay.url("/message")).bearer_auth(API_TOKEN).json(&body).send()
    };

    let slow = tokio::spawn(send(&first, "first"));
    joinchat.wait_for(1).await;
    let asked = Instant::now();
    let refused = send(&second, "second").await.unwrap();
    let waited = asked.elapsed();

    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    assert_eq!(refused.status(), 400, "the second replica heard JoinChat's refusal itself");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rejected_by_joinchat");
    assert!(waited < Duration::from_secs(3), "woken when the first ended, not at the end of its wait: {waited:?}");
    let texts: Vec<String> =
        joinchat.bodies().iter().map(|b| b["message"]["text"].as_str().unwrap_or_default().to_owned()).collect();
    assert_eq!(texts, ["first", "second"], "in order, each once");
    first.kill().await;
    second.kill().await;
}
