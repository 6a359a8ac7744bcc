//! A JoinChat stand-in that checks per-contact order: every `send_message` whose text reads
//! `c<contact> n<k>` is recorded under its recipient, and an arrival other than the next `k`
//! counts as out of order (a gap, or a late one) or as a duplicate. The signature is checked with
//! `JOINCHAT_API_SECRET` (default `bench-secret`). Answers 200 `{"success":true}` at once.
//!
//! `GET /stats` answers one line: `delivered N out_of_order N duplicates N missing N
//! bad_signature N unparsed N contacts N` (`missing`: numbers skipped and not arrived since).
//! Run with `cargo run --release --example bench_joinchat -- 127.0.0.1:18085`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use bonychat_relay::signing::joinchat_signature;

#[derive(Default)]
struct Contact {
    last: u64,
    skipped: HashSet<u64>,
}

#[derive(Default)]
struct Counts {
    delivered: u64,
    out_of_order: u64,
    duplicates: u64,
    bad_signature: u64,
    unparsed: u64,
    contacts: HashMap<String, Contact>,
}

struct StandIn {
    secret: String,
    counts: Mutex<Counts>,
}

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:18085".into());
    let secret = std::env::var("JOINCHAT_API_SECRET").unwrap_or_else(|_| "bench-secret".into());
    let state = Arc::new(StandIn { secret, counts: Mutex::default() });
    let app =
        Router::new().route("/api/send_message", post(send_message)).route("/stats", get(stats)).with_state(state);
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("address is free");
    axum::serve(listener, app).await.expect("server runs");
}

/// `(recipient, k)` of a body whose text is `c<contact> n<k>`.
fn sequence_of(body: &[u8]) -> Option<(String, u64)> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = value["message"]["text"].as_str()?;
    let k = text.split_once(" n")?.1.parse().ok()?;
    Some((value["recipient"].to_string(), k))
}

async fn send_message(State(state): State<Arc<StandIn>>, headers: HeaderMap, body: Bytes) -> &'static str {
    let signed = headers
        .get("x-joinchat-signature")
        .is_some_and(|v| v.as_bytes() == joinchat_signature(state.secret.as_bytes(), &body).as_bytes());
    let sequence = sequence_of(&body);
    let mut counts = state.counts.lock().expect("not poisoned");
    counts.delivered += 1;
    if !signed {
        counts.bad_signature += 1;
    }
    let Some((recipient, k)) = sequence else {
        counts.unparsed += 1;
        return r#"{"success":true}"#;
    };
    let contact = counts.contacts.entry(recipient).or_default();
    let (mut out_of_order, mut duplicate) = (false, false);
    if k == contact.last + 1 {
        contact.last = k;
    } else if k > contact.last {
        contact.skipped.extend(contact.last + 1..k);
        contact.last = k;
        out_of_order = true;
    } else if contact.skipped.remove(&k) {
        out_of_order = true;
    } else {
        duplicate = true;
    }
    counts.out_of_order += u64::from(out_of_order);
    counts.duplicates += u64::from(duplicate);
    r#"{"success":true}"#
}

async fn stats(State(state): State<Arc<StandIn>>) -> String {
    let counts = state.counts.lock().expect("not poisoned");
    let missing: usize = counts.contacts.values().map(|c| c.skipped.len()).sum();
    format!(
        "delivered {} out_of_order {} duplicates {} missing {missing} bad_signature {} unparsed {} contacts {}\n",
        counts.delivered,
        counts.out_of_order,
        counts.duplicates,
        counts.bad_signature,
        counts.unparsed,
        counts.contacts.len()
    )
}
