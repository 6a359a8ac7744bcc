//! The relay's own ceilings: `POST /message` doing what the relay does, minus its bookkeeping.
//!
//! - `handler`: checks the Bearer token, parses and validates the body (`OutboundRequest::parse`),
//!   builds the job and its JoinChat parts as the relay does (`new_outbound_job`, `translate`),
//!   serializes each `send_message` body and computes its `x-joinchat-signature`, then answers
//!   200 `{"mId": …}` at once. It also serves `POST /webhooks/messenger`: the signature check and
//!   the envelope parse of the relay, then 200.
//! - `forwarder`: the same, but each part is sent to JoinChat (`JOINCHAT_API_URL`) with the
//!   relay's client (`HttpJoinChat`, which serializes and signs), and the answer waits for it.
//!   Neither stores anything.
//! - `durable`: the cheapest correct durable forwarder. The `forwarder` path, plus one INSERT of
//!   the message (its `mId`, contact, time and the payload as the relay encodes it) into a SQLite
//!   file in WAL mode with `synchronous=FULL`, awaited before the first send; once JoinChat has
//!   accepted every part, an `UPDATE … WHERE rowid = ?` marks it delivered, not awaited. One
//!   writer thread does both: it takes every operation waiting, runs them in one transaction,
//!   commits once, then answers the inserts of that group; a delivered mark thus rides in the
//!   next group commit. One table, no index but the rowid. The file is the third argument, else
//!   `BENCH_DURABLE_DB`, else `/var/tmp/bench_bare-durable-<pid>.db` (left behind); it must not
//!   exist yet, and its directory must be on a real disk, not tmpfs (where an fsync costs
//!   nothing).
//!
//! The configuration comes from the relay's variables (`Config::from_env`).
//! Run with `cargo run --release --example bench_bare -- handler 127.0.0.1:18084`, or
//! `-- durable 127.0.0.1:18084 /var/tmp/durable.db`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bonychat_relay::auth::BearerToken;
use bonychat_relay::clients::JoinChatApi;
use bonychat_relay::clients::joinchat::HttpJoinChat;
use bonychat_relay::config::{Config, Env};
use bonychat_relay::delivery::new_outbound_job;
use bonychat_relay::domain::inbound::parse_envelope;
use bonychat_relay::domain::joinchat::SendRequest;
use bonychat_relay::domain::outbound::OutboundRequest;
use bonychat_relay::rotation::{SecretName, SecretUse};
use bonychat_relay::signing::{HubSignature, joinchat_signature};
use bonychat_relay::store::{DEFAULT_CHANNEL, NewOutbound, Payload, encode_payload, now_millis};
use rusqlite::{Connection, params};
use tokio::sync::oneshot;

struct Bare {
    config: Config,
    token: BearerToken,
    hub: HubSignature,
    /// `Some` in `forwarder` and `durable` modes.
    joinchat: Option<HttpJoinChat>,
    /// `Some` in `durable` mode.
    store: Option<Store>,
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "handler".into());
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18084".into());
    let config = Config::from_env(&Env::from_process()).expect("the relay's variables are set");
    let joinchat = match mode.as_str() {
        "handler" => None,
        "forwarder" | "durable" => Some(HttpJoinChat::new(
            bonychat_relay::clients::http::client(
                config.upstreams.joinchat_connect_timeout,
                config.upstreams.joinchat_timeout,
            )
            .expect("HTTP client builds"),
            &config.channels.channels[DEFAULT_CHANNEL].joinchat,
            SecretUse::new(SecretName::JoinChatApiSecret, DEFAULT_CHANNEL),
        )),
        other => panic!("unknown mode {other}: handler, forwarder or durable"),
    };
    // Opened before the port listens, so that a harness waiting for the port finds it ready.
    let store = (mode == "durable").then(|| {
        let path = args.next().or_else(|| std::env::var("BENCH_DURABLE_DB").ok()).map_or_else(
            || PathBuf::from(format!("/var/tmp/bench_bare-durable-{}.db", std::process::id())),
            PathBuf::from,
        );
        Store::open(&path)
    });
    let bare = Arc::new(Bare {
        // Counted as the relay counts them: the rotation counter is part of a check's cost.
        token: BearerToken::new(
            &config.channels.channels[DEFAULT_CHANNEL].bonychat.api_token,
            Some(SecretUse::new(SecretName::BonyChatApiToken, DEFAULT_CHANNEL)),
        ),
        hub: HubSignature::new(
            config.channels.apps["default"].app_secret.clone(),
            Some(SecretUse::new(SecretName::MessengerAppSecret, "default")),
        ),
        joinchat,
        store,
        config,
    });
    let app =
        Router::new().route("/message", post(message)).route("/webhooks/messenger", post(webhook)).with_state(bare);
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("address is free");
    axum::serve(listener, app).await.expect("server runs");
}

async fn message(State(bare): State<Arc<Bare>>, headers: HeaderMap, body: Bytes) -> Response {
    if !bare.token.is_presented_in(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let request =
        match OutboundRequest::parse(&body, &bare.config.channels.channels[DEFAULT_CHANNEL].bonychat.channel_id) {
            Ok(request) => request,
            Err(e) => return (StatusCode::BAD_REQUEST, format!("{e:?}")).into_response(),
        };
    let joinchat = &bare.config.channels.channels[DEFAULT_CHANNEL].joinchat;
    let job = new_outbound_job(DEFAULT_CHANNEL, u64::MAX, &request, joinchat.recipient_field, now_millis(), None);
    let stored = match &bare.store {
        None => None,
        Some(store) => match store.insert(&job).await {
            Ok(rowid) => Some(rowid),
            Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
        },
    };
    for message in &job.parts {
        let send = SendRequest {
            page_id: &joinchat.page_id,
            recipient: &job.recipient,
            message,
            tag: joinchat.message_tag.as_deref(),
            delay: None,
        };
        match &bare.joinchat {
            None => {
                let bytes = send.to_bytes();
                std::hint::black_box(joinchat_signature(joinchat.api_secret.current.expose().as_bytes(), &bytes));
            }
            Some(api) => {
                if let Err(e) = api.send(&send).await {
                    return (StatusCode::BAD_GATEWAY, e.to_string()).into_response();
                }
            }
        }
    }
    if let (Some(store), Some(rowid)) = (&bare.store, stored) {
        store.delivered(rowid);
    }
    axum::Json(serde_json::json!({ "mId": job.m_id })).into_response()
}

async fn webhook(State(bare): State<Arc<Bare>>, headers: HeaderMap, body: Bytes) -> Response {
    let signature = headers.get("x-hub-signature-256").map(|v| v.as_bytes());
    let Ok(verified) = bare.hub.verify(signature, body) else {
        return StatusCode::FORBIDDEN.into_response();
    };
    match parse_envelope(&verified, &bare.config.channels.channels[DEFAULT_CHANNEL].joinchat.page_id, now_millis()) {
        Ok(envelope) => axum::Json(serde_json::json!({ "received": envelope.events.len() })).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.0).into_response(),
    }
}

/// The durable mode's store: a queue to its one writer thread.
struct Store {
    ops: mpsc::Sender<Op>,
}

enum Op {
    /// Answered with the new row's rowid once the group holding it is committed.
    Insert { m_id: String, contact: String, payload: String, at: i64, done: oneshot::Sender<Result<i64, String>> },
    /// Not awaited: a mark lost to a crash only means the message would be sent again after a
    /// restart, which at-least-once delivery allows.
    Delivered { rowid: i64, at: i64 },
}

impl Store {
    fn open(path: &Path) -> Store {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        assert!(!on_tmpfs(dir), "{} is on tmpfs: give a store on a real disk", dir.display());
        // A fresh file only: rows of an earlier run would change what a commit costs, and a
        // path given by mistake must not be written over.
        assert!(!path.exists(), "{} exists: give a path to a new file", path.display());
        let conn = Connection::open(path).expect("the store opens");
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).expect("WAL is set");
        assert!(mode.eq_ignore_ascii_case("wal"), "journal_mode stayed {mode}");
        conn.execute_batch(
            "PRAGMA synchronous = FULL;
             CREATE TABLE messages (m_id TEXT NOT NULL, contact TEXT NOT NULL, payload TEXT NOT NULL,
                                    created_at INTEGER NOT NULL, delivered_at INTEGER);",
        )
        .expect("the table is created");
        let (ops, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("durable-writer".into())
            .spawn(move || write(conn, &queue))
            .expect("thread starts");
        Store { ops }
    }

    /// Stores the message; returns once it is committed.
    async fn insert(&self, job: &NewOutbound) -> Result<i64, String> {
        // Encoded here, on the request's thread, as the relay does: the writer only writes.
        let payload = encode_payload(&Payload::Send { recipient: job.recipient.clone(), parts: job.parts.clone() });
        let (done, committed) = oneshot::channel();
        let op = Op::Insert { m_id: job.m_id.clone(), contact: job.contact.clone(), payload, at: job.now, done };
        self.ops.send(op).map_err(|_| "the writer stopped".to_owned())?;
        committed.await.map_err(|_| "the writer stopped".to_owned())?
    }

    fn delivered(&self, rowid: i64) {
        let _ = self.ops.send(Op::Delivered { rowid, at: now_millis() });
    }
}

/// The writer thread: one transaction and one commit for everything waiting, then the answers.
fn write(mut conn: Connection, queue: &mpsc::Receiver<Op>) {
    while let Ok(first) = queue.recv() {
        let mut answers = Vec::new();
        let committed = (|| {
            let tx = conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO messages (m_id, contact, payload, created_at) VALUES (?1, ?2, ?3, ?4)",
                )?;
                let mut mark = tx.prepare_cached("UPDATE messages SET delivered_at = ?1 WHERE rowid = ?2")?;
                for op in std::iter::once(first).chain(queue.try_iter()) {
                    match op {
                        Op::Insert { m_id, contact, payload, at, done } => {
                            let rowid = insert.insert(params![m_id, contact, payload, at]).map_err(|e| e.to_string());
                            answers.push((done, rowid));
                        }
                        Op::Delivered { rowid, at } => {
                            mark.execute(params![at, rowid])?;
                        }
                    }
                }
            }
            tx.commit()
        })();
        for (done, rowid) in answers {
            let _ = done.send(match &committed {
                Ok(()) => rowid,
                Err(e) => Err(format!("the commit failed: {e}")),
            });
        }
    }
}

/// Whether `dir` lies on tmpfs (the mount point in `/proc/self/mounts` nearest above it).
fn on_tmpfs(dir: &Path) -> bool {
    let dir = dir.canonicalize().expect("the store's directory exists");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ').skip(1);
            Some((fields.next()?, fields.next()?))
        })
        .filter(|(point, _)| dir.starts_with(point))
        .max_by_key(|(point, _)| point.len())
        .is_some_and(|(_, kind)| kind == "tmpfs")
}
