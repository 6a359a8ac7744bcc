//! What a claim costs with one channel's backlog (SPEC §5: claims are fair across channels, and
//! their cost must not follow the depth of any channel's queue). For each backlog size, `busy`
//! gets that many due jobs (one per contact, so each heads its queue) and `quiet` three; then
//! claims of 64 from both channels, and from `quiet` alone, are timed. After each claim its jobs
//! are delivered and as many new ones queued in their channels (untimed), as in a flood that
//! keeps coming: every claim takes fresh heads, and the backlog stays as deep. Run with
//! `cargo run --release --example bench_claim -- [ROUNDS] [postgres://… of an empty server]`:
//! SQLite always, Postgres when a server URL is given (a database per backlog size is created
//! on it and dropped after).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bonychat_relay::config::PostgresOptions;
use bonychat_relay::domain::bonychat::{BonyMessage, WebhookEvent};
use bonychat_relay::store::postgres::PostgresStore;
use bonychat_relay::store::sqlite::SqliteStore;
use bonychat_relay::store::{Claim, Direction, Finish, InboundBatch, InboundItem, IntakeCaps, Store};
use sqlx::{Connection, PgConnection};

const BACKLOGS: [usize; 3] = [100, 10_000, 100_000];
const LIMIT: usize = 64;
const OWNER: &str = "bench";
const UNCAPPED: IntakeCaps = IntakeCaps { outbound: u64::MAX, inbound: u64::MAX, per_contact: u64::MAX };

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let server = args.next();
    for backlog in BACKLOGS {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = SqliteStore::open(&dir.path().join("relay.db"), UNCAPPED).await.expect("store opens");
        report("sqlite", backlog, &store, rounds).await;
    }
    let Some(server) = server else { return };
    let _ = rustls::crypto::ring::default_provider().install_default();
    for backlog in BACKLOGS {
        let name = format!("bench_claim_{backlog}");
        let mut admin = PgConnection::connect(&server).await.expect("the server answers");
        let drop_it = format!(r#"DROP DATABASE IF EXISTS "{name}""#);
        sqlx::raw_sql(sqlx::AssertSqlSafe(drop_it.clone())).execute(&mut admin).await.expect("dropped");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .execute(&mut admin)
            .await
            .expect("created");
        let mut url = url::Url::parse(&server).expect("a URL");
        url.set_path(&format!("/{name}"));
        let store = PostgresStore::open(url.as_str(), PostgresOptions::DEFAULT, UNCAPPED).await.expect("store opens");
        report("postgres", backlog, &store, rounds).await;
        drop(store);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("{drop_it} WITH (FORCE)"))).execute(&mut admin).await;
    }
}

async fn report(backend: &str, backlog: usize, store: &dyn Store, rounds: usize) {
    let mut queued = Queued::default();
    queued.fill(store, "busy", backlog, 1_000).await;
    queued.fill(store, "quiet", 3, 2_000).await;
    let both = time_claims(store, &mut queued, &["busy", "quiet"], rounds).await;
    let quiet_only = time_claims(store, &mut queued, &["quiet"], rounds).await;
    println!(
        "{backend:<8} busy {backlog:>7} due + quiet 3: claim of {LIMIT} from both {} (quiet got {} a claim); from quiet alone {}",
        both.0, both.1, quiet_only.0
    );
}

/// How many events each channel was given so far: new ones go to new contacts.
#[derive(Default)]
struct Queued(std::collections::HashMap<String, usize>);

impl Queued {
    /// `jobs` more due events in `channel`, one per new contact, in batches of a thousand.
    async fn fill(&mut self, store: &dyn Store, channel: &str, jobs: usize, due: i64) {
        let given = self.0.entry(channel.to_owned()).or_default();
        let (from, to) = (*given, *given + jobs);
        *given = to;
        for start in (from..to).step_by(1_000) {
            let items = (start..to.min(start + 1_000))
                .map(|i| InboundItem::Message {
                    contact: format!("{channel}-{i}"),
                    events: vec![WebhookEvent::Message {
                        m_id: format!("{channel}-m{i}"),
                        timestamp: due,
                        message: BonyMessage::Text { text: "hello".into() },
                    }],
                    echo_fingerprint: None,
                })
                .collect();
            let batch =
                InboundBatch { channel: channel.into(), max_queued: u64::MAX, items, now: due, trace_context: None };
            store.enqueue_inbound(batch).await.expect("stored");
        }
    }
}

/// Claims `rounds` times from `channels`, delivering what each claim took and queueing as much
/// again; the fastest, the median and the 99th percentile of a claim (on a shared machine the
/// fastest says most about the claim itself), and how many of `quiet`'s jobs a claim took.
async fn time_claims(store: &dyn Store, queued: &mut Queued, channels: &[&str], rounds: usize) -> (String, usize) {
    let channels: Arc<[String]> = channels.iter().map(|&channel| channel.to_owned()).collect();
    let mut took = Vec::with_capacity(rounds);
    let mut quiet = 0;
    for _ in 0..rounds {
        let claim = Claim {
            owner: OWNER.into(),
            direction: Direction::Inbound,
            now: 10_000,
            lease_until: 70_000,
            limit: LIMIT,
            channels: Arc::clone(&channels),
            per_channel: LIMIT,
        };
        let started = Instant::now();
        let jobs = store.claim(claim).await.expect("claimed");
        took.push(started.elapsed());
        quiet = jobs.iter().filter(|job| job.channel == "quiet").count();
        for job in &jobs {
            store.finish(job.lease(), Finish::Delivered { progress: 1, sent_at: 10_000 }, 10_000).await.expect("done");
        }
        queued.fill(store, "busy", jobs.len() - quiet, 1_000).await;
        queued.fill(store, "quiet", quiet, 2_000).await;
    }
    took.sort_unstable();
    let at = |q: f64| took[((took.len() - 1) as f64 * q) as usize];
    (format!("min {:.2} ms, median {:.2} ms, p99 {:.2} ms", ms(at(0.0)), ms(at(0.5)), ms(at(0.99))), quiet)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}
