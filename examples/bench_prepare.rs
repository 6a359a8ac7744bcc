//! Inputs for `bench/harness.sh`, made with the relay's own code and variables (`Config::from_env`).
//!
//! - `webhooks FILE BATCHES PER_BATCH`: writes BATCHES signed Messenger webhook bodies, one a
//!   line as `<X-Hub-Signature-256> <body>`: a page envelope for `JOINCHAT_PAGE_ID` with PER_BATCH
//!   text messages, each with its own `mid` and from a sender of its own within the batch
//!   (senders cycle over 100 000), signed with `MESSENGER_APP_SECRET` (`signing::hub_signature`).
//! - `backlog JOBS CONTACTS`: enqueues JOBS outbound jobs into the relay's SQLite store
//!   (`RELAY_DATABASE_URL`) while the relay is stopped, as `/message` would (`OutboundRequest::parse`,
//!   `new_outbound_job`), spread over CONTACTS contacts; contact `c` gets texts `c<c> n1`, `n2`, …
//!   in order, so `bench_joinchat` can check the order they are delivered in.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use bonychat_relay::config::{Config, DatabaseUrl, Env};
use bonychat_relay::delivery::new_outbound_job;
use bonychat_relay::domain::outbound::OutboundRequest;
use bonychat_relay::signing::hub_signature;
use bonychat_relay::store::sqlite::SqliteStore;
use bonychat_relay::store::{DEFAULT_CHANNEL, IntakeCaps, Store, now_millis};

/// Contact ids as the Lua scripts make them: numeric, so the recipient is an `id`.
const CONTACT_BASE: u64 = 1_000_000_000_000_000;
const WRITERS: u64 = 64;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let config = Config::from_env(&Env::from_process()).expect("the relay's variables are set");
    match args.first().map(String::as_str) {
        Some("webhooks") => webhooks(&config, args.get(1).expect("FILE"), number(2, 50_000), number(3, 3)),
        Some("backlog") => backlog(config, number(1, 100_000), number(2, 1_000)).await,
        _ => panic!("usage: bench_prepare webhooks FILE BATCHES PER_BATCH | backlog JOBS CONTACTS"),
    }
}

fn webhooks(config: &Config, file: &str, batches: u64, per_batch: u64) {
    let secret = config.channels.apps["default"].app_secret.current.expose().as_bytes();
    let page = &config.channels.channels[DEFAULT_CHANNEL].joinchat.page_id;
    let now = now_millis();
    let mut out = std::io::BufWriter::new(std::fs::File::create(file).expect("file can be written"));
    for b in 0..batches {
        let messaging: Vec<_> = (0..per_batch)
            .map(|i| {
                let n = b * per_batch + i;
                serde_json::json!({
                    "sender": {"id": format!("{}", 2 * CONTACT_BASE + n % 100_000)},
                    "recipient": {"id": page},
                    "timestamp": now,
                    "message": {"mid": format!("m_bench.{now}.{n}"), "text": format!("Benchmark webhook message {n}")},
                })
            })
            .collect();
        let body = serde_json::json!({"object": "page", "entry": [{"id": page, "time": now, "messaging": messaging}]});
        let body = serde_json::to_vec(&body).expect("serializes");
        out.write_all(hub_signature(secret, &body).as_bytes()).expect("written");
        out.write_all(b" ").expect("written");
        out.write_all(&body).expect("written");
        out.write_all(b"\n").expect("written");
    }
    out.flush().expect("written");
}

async fn backlog(config: Config, jobs: u64, contacts: u64) {
    let DatabaseUrl::Sqlite(path) = &config.store.database_url else { panic!("RELAY_DATABASE_URL is not SQLite") };
    let caps = IntakeCaps { outbound: u64::MAX, inbound: u64::MAX, per_contact: u64::MAX };
    let store = Arc::new(SqliteStore::open(path, caps).await.expect("store opens"));
    let config = Arc::new(config);
    let started = Instant::now();
    // Writer `w` owns the contacts `c ≡ w (mod WRITERS)` and enqueues each one's jobs in order.
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, config) = (Arc::clone(&store), Arc::clone(&config));
            tokio::spawn(async move {
                let mut k = 0;
                loop {
                    k += 1;
                    for c in (w..contacts).step_by(WRITERS as usize) {
                        if (k - 1) * contacts + c >= jobs {
                            return;
                        }
                        let body = format!(
                            r#"{{"channelId":"{}","contactId":"{}","message":{{"type":"text","text":"c{c} n{k}"}}}}"#,
                            config.channels.channels[DEFAULT_CHANNEL].bonychat.channel_id,
                            CONTACT_BASE + c
                        );
                        let request = OutboundRequest::parse(
                            body.as_bytes(),
                            &config.channels.channels[DEFAULT_CHANNEL].bonychat.channel_id,
                        )
                        .expect("a valid request");
                        let job = new_outbound_job(
                            DEFAULT_CHANNEL,
                            u64::MAX,
                            &request,
                            config.channels.channels[DEFAULT_CHANNEL].joinchat.recipient_field,
                            now_millis(),
                            None,
                        );
                        store.enqueue_outbound(job, None).await.expect("stored");
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer runs");
    }
    println!("queued {jobs} jobs over {contacts} contacts in {:.1} s", started.elapsed().as_secs_f64());
}
