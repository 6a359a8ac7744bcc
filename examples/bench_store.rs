//! The store alone: how many outbound jobs per second it commits durably for N concurrent
//! writers, and how many commits (fsyncs) that took. Run with
//! `cargo run --release --example bench_store -- 64 5` (writers, seconds).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bonychat_relay::domain::joinchat::{Message, Recipient};
use bonychat_relay::store::sqlite::SqliteStore;
use bonychat_relay::store::{DEFAULT_CHANNEL, IntakeCaps, NewOutbound, Store, now_millis};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let writers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("bench-store-{}", std::process::id()));
    let store = Arc::new(
        SqliteStore::open(
            &dir.join("relay.db"),
            IntakeCaps { outbound: u64::MAX, inbound: u64::MAX, per_contact: u64::MAX },
        )
        .await
        .expect("store opens"),
    );
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);

    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (store, done) = (Arc::clone(&store), Arc::clone(&done));
            tokio::spawn(async move {
                let mut i = 0_u64;
                while Instant::now() < deadline {
                    i += 1;
                    let job = NewOutbound {
                        channel: DEFAULT_CHANNEL.into(),
                        max_queued: u64::MAX,
                        m_id: format!("{w}-{i}"),
                        contact: format!("{}", 1_000_000_000_000_000 + (w as u64 * 100_003 + i) % 100_000),
                        recipient: Recipient::Id("1066835436691078".into()),
                        parts: vec![Message::Text { text: format!("Benchmark message number {i} from writer {w}") }],
                        now: now_millis(),
                        trace_context: None,
                    };
                    store.enqueue_outbound(job, None).await.expect("stored");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer runs");
    }
    let jobs = done.load(Ordering::Relaxed);
    println!(
        "{writers} writers: {} jobs/s, {} commits/s, {:.1} jobs per commit",
        jobs / seconds,
        store.commits() / seconds,
        jobs as f64 / store.commits() as f64
    );
    let _ = std::fs::remove_dir_all(dir);
}
