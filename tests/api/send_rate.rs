//! A channel's JoinChat send rate (SPEC §5): the relay never sends faster than the channel's
//! `JOINCHAT_MAX_SENDS_PER_SEC`, and when Meta throttles the Page (a 429, or one of its
//! rate-limit codes in JoinChat's error body) it slows down for every replica and settles at
//! what the Page takes, with no message lost, reordered or dead-lettered for it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::helpers::{CHANNEL_ID, JOINCHAT_SECRET, TestApp, expected_signature, spawn_app_with, text};
use bonychat_relay::store::JobState;

/// How the stand-in says "too fast".
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// 429 with `Retry-After: 1`.
    TooManyRequests,
    /// 200 with JoinChat's error shape carrying Meta's code 613, no `Retry-After`.
    Code613,
}

/// A JoinChat that takes at most `limit` sends in any second (a sliding window) and refuses
/// the rest; it checks every signature and records what it took and when it refused.
#[derive(Clone)]
struct RateLimitedJoinChat {
    url: String,
    state: Arc<LimitState>,
}

struct LimitState {
    limit: usize,
    refusal: Refusal,
    accepted_at: Mutex<VecDeque<Instant>>,
    /// (contact, text) in the order taken.
    taken: Mutex<Vec<(String, String)>>,
    refused_at: Mutex<Vec<Instant>>,
    taken_at: Mutex<Vec<Instant>>,
}

impl RateLimitedJoinChat {
    async fn start(limit: usize, refusal: Refusal) -> Self {
        let state = Arc::new(LimitState {
            limit,
            refusal,
            accepted_at: Mutex::default(),
            taken: Mutex::default(),
            refused_at: Mutex::default(),
            taken_at: Mutex::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/api/send_message", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(take).with_state(Arc::clone(&state));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, state }
    }

    fn taken(&self) -> Vec<(String, String)> {
        self.state.taken.lock().unwrap().clone()
    }

    fn refused(&self) -> usize {
        self.state.refused_at.lock().unwrap().len()
    }

    fn refused_since(&self, from: Instant) -> usize {
        self.state.refused_at.lock().unwrap().iter().filter(|t| **t >= from).count()
    }

    fn taken_since(&self, from: Instant) -> usize {
        self.state.taken_at.lock().unwrap().iter().filter(|t| **t >= from).count()
    }

    /// Requests (taken and refused) per second from `from` on.
    fn requests_per_sec_since(&self, from: Instant) -> f64 {
        let count = |times: &Mutex<Vec<Instant>>| times.lock().unwrap().iter().filter(|t| **t >= from).count();
        let requests = count(&self.state.taken_at) + count(&self.state.refused_at);
        let last = self.state.taken_at.lock().unwrap().last().copied().unwrap_or(from);
        requests as f64 / last.saturating_duration_since(from).as_secs_f64().max(0.001)
    }

    /// The most sends taken within any one second.
    fn most_in_one_second(&self) -> usize {
        let times = self.state.taken_at.lock().unwrap().clone();
        let within = |start: &Instant| {
            times.iter().filter(|t| **t >= *start && t.duration_since(*start) < Duration::from_secs(1)).count()
        };
        times.iter().map(within).max().unwrap_or(0)
    }

    fn taken_per_sec_since(&self, from: Instant) -> f64 {
        let taken_at = self.state.taken_at.lock().unwrap();
        let count = taken_at.iter().filter(|t| **t >= from).count();
        let last = taken_at.last().copied().unwrap_or(from);
        count as f64 / last.saturating_duration_since(from).as_secs_f64().max(0.001)
    }

    async fn wait_for(&self, n: usize, within: Duration) -> Vec<(String, String)> {
        let deadline = Instant::now() + within;
        loop {
            let taken = self.taken();
            if taken.len() >= n {
                return taken;
            }
            assert!(Instant::now() < deadline, "JoinChat took {} of {n} sends in {within:?}", taken.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn take(State(state): State<Arc<LimitState>>, headers: HeaderMap, body: Bytes) -> Response {
    let signature = headers.get("x-joinchat-signature").and_then(|v| v.to_str().ok());
    if signature != Some(expected_signature(JOINCHAT_SECRET, &body).as_str()) {
        return (StatusCode::UNAUTHORIZED, r#"{"success":false,"errors":{"msg":"signature mismatch"}}"#)
            .into_response();
    }
    let now = Instant::now();
    {
        let mut accepted = state.accepted_at.lock().unwrap();
        while accepted.front().is_some_and(|at| now.duration_since(*at) >= Duration::from_secs(1)) {
            accepted.pop_front();
        }
        if accepted.len() >= state.limit {
            state.refused_at.lock().unwrap().push(now);
            return match state.refusal {
                Refusal::TooManyRequests => (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "1")],
                    r#"{"success":false,"errors":{"msg":"Too Many Requests"}}"#,
                )
                    .into_response(),
                Refusal::Code613 => (
                    StatusCode::OK,
                    r#"{"success":false,"errors":{"code":613,"msg":"Calls to this api have exceeded the rate limit."}}"#,
                )
                    .into_response(),
            };
        }
        accepted.push_back(now);
    }
    let request: Value = serde_json::from_slice(&body).unwrap();
    let contact = request["recipient"]["id"].as_str().unwrap_or_default().to_owned();
    let text = request["message"]["text"].as_str().unwrap_or_default().to_owned();
    state.taken.lock().unwrap().push((contact, text));
    state.taken_at.lock().unwrap().push(now);
    (StatusCode::OK, r#"{"success":true,"recipient_id":"1"}"#).into_response()
}

/// The metrics once `ready` says so (renders are cached for a second).
async fn scrape_until(app: &TestApp, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let url = format!("http://{}/metrics", app.metrics_addr);
        let text = app.http.get(url).send().await.unwrap().text().await.unwrap();
        if ready(&text) || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A channel at 20 a second sends at most that in any second, plus its bucket's tenth of a
/// second (2), as the bucket grants them. Arriving at JoinChat, the sends granted within a
/// little more than a second can fall within one, since what an attempt does between its grant
/// and its request (a store write) takes a varying time: up to 0.2 s on a loaded 2-core CI
/// machine. Without a shared bucket, three replicas would send 60.
const MOST_IN_A_SECOND_AT_20: usize = 26;

fn contact(i: usize) -> String {
    format!("{}", 4_100_000_000_000_000 + i)
}

/// Each contact's messages posted in order, one after the other's answer, contacts at once,
/// spread over `relays`; every answer must be 200.
async fn post_in_order(relays: &[&TestApp], contacts: usize, per_contact: usize) {
    let senders = (0..contacts).map(|i| {
        let relays: Vec<(reqwest::Client, String)> =
            relays.iter().map(|app| (app.http.clone(), app.url("/message"))).collect();
        tokio::spawn(async move {
            for k in 1..=per_contact {
                let (http, url) = &relays[(i + k) % relays.len()];
                let body =
                    json!({"channelId": CHANNEL_ID, "contactId": contact(i), "message": text(&format!("{i}#{k}"))});
                let response = http
                    .post(url)
                    .bearer_auth(crate::helpers::API_TOKEN)
                    .json(&body)
                    .send()
                    .await
                    .expect("the relay answers");
                assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
            }
        })
    });
    for sender in senders.collect::<Vec<_>>() {
        sender.await.unwrap();
    }
}

/// Every message taken exactly once and in its contact's order.
fn assert_all_once_in_order(taken: &[(String, String)], contacts: usize, per_contact: usize) {
    let mut by_contact: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (contact, text) in taken {
        by_contact.entry(contact.clone()).or_default().push(text.clone());
    }
    assert_eq!(by_contact.len(), contacts);
    for (i, texts) in (0..contacts).map(|i| (i, &by_contact[&contact(i)])) {
        let expected: Vec<String> = (1..=per_contact).map(|k| format!("{i}#{k}")).collect();
        assert_eq!(texts, &expected, "contact {i}: lost, repeated or reordered");
    }
}

fn rate_vars<'a>(extra: &[(&'a str, &'a str)], joinchat_url: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut vars = vec![
        ("JOINCHAT_API_URL", joinchat_url),
        // Spacing per contact would hide the rate: each contact sends one message at a time.
        ("JOINCHAT_ORDER_GAP_SECS", "0"),
        ("RELAY_SEND_WAIT_MS", "300"),
        // Three quick retries: a throttle counted as a failure would dead-letter at once.
        ("RELAY_RETRY_JOINCHAT", "50ms,50ms,50ms"),
    ];
    vars.extend_from_slice(extra);
    vars
}

async fn assert_nothing_dead(apps: &[&TestApp]) {
    for app in apps {
        let dead = app.jobs(JobState::Dead).await;
        assert!(dead.is_empty(), "dead-lettered: {:?}", dead.iter().map(|j| &j.last_error).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn a_channel_never_sends_faster_than_its_configured_rate() {
    // A JoinChat that would take far more: any refusal here is the relay's fault.
    let joinchat = RateLimitedJoinChat::start(10_000, Refusal::TooManyRequests).await;
    let app = spawn_app_with(&rate_vars(&[("JOINCHAT_MAX_SENDS_PER_SEC", "20")], &joinchat.url)).await;
    let (contacts, per_contact) = (30, 3);

    post_in_order(&[&app], contacts, per_contact).await;
    joinchat.wait_for(contacts * per_contact, Duration::from_secs(20)).await;

    let times = joinchat.state.taken_at.lock().unwrap().clone();
    // At most a second's worth plus the bucket's tenth of a second in any second.
    let most_in_a_second = times
        .iter()
        .map(|start| {
            times.iter().filter(|t| **t >= *start && t.duration_since(*start) < Duration::from_secs(1)).count()
        })
        .max();
    assert!(most_in_a_second <= Some(22), "{most_in_a_second:?} sends within one second at 20/s");
    let span = times.last().unwrap().duration_since(times[0]);
    assert!(span >= Duration::from_millis(3500), "90 sends at 20/s took only {span:?}");
    assert_eq!(joinchat.refused(), 0);
    assert_all_once_in_order(&joinchat.taken(), contacts, per_contact);
    assert_nothing_dead(&[&app]).await;
}

/// The Page takes 20 a second; the relays, configured for 100, learn it from the throttles.
/// `database_url` is the replicas' shared store (each relay its own SQLite file when `None`).
async fn settles_under_a_throttling_joinchat(refusal: Refusal, replicas: usize, database_url: Option<&str>) {
    const LIMIT: usize = 20;
    let joinchat = RateLimitedJoinChat::start(LIMIT, refusal).await;
    // Answered once stored, so the whole load is queued at once and the rate alone paces it.
    let mut extra = vec![("JOINCHAT_MAX_SENDS_PER_SEC", "100"), ("RELAY_SEND_WAIT_MS", "0")];
    extra.extend(database_url.map(|url| ("RELAY_DATABASE_URL", url)));
    let vars = rate_vars(&extra, &joinchat.url);
    let mut apps = Vec::new();
    for _ in 0..replicas {
        apps.push(spawn_app_with(&vars).await);
    }
    let apps: Vec<&TestApp> = apps.iter().collect();
    let (contacts, per_contact) = (40, 6);
    let started = Instant::now();

    post_in_order(&apps, contacts, per_contact).await;
    let taken = joinchat.wait_for(contacts * per_contact, Duration::from_secs(60)).await;

    assert_all_once_in_order(&taken, contacts, per_contact);
    assert_nothing_dead(&apps).await;
    // Once it has learnt the Page's limit: the first seconds are spent finding it.
    let learnt = started + Duration::from_secs(8);
    let settled = joinchat.requests_per_sec_since(learnt);
    let refused = joinchat.refused_since(learnt);
    let taken_since = joinchat.taken_since(learnt);
    let taken_per_sec = joinchat.taken_per_sec_since(learnt);
    if std::env::var_os("RATE_TIMELINE").is_some() {
        let per_tenth = |times: &[Instant]| {
            let mut counts = vec![0; 250];
            for t in times {
                counts[(t.duration_since(started).as_millis() / 100).min(249) as usize] += 1;
            }
            counts
        };
        let taken = per_tenth(&joinchat.state.taken_at.lock().unwrap());
        let refused = per_tenth(&joinchat.state.refused_at.lock().unwrap());
        for (i, (t, r)) in taken.iter().zip(refused.iter()).enumerate() {
            if *t > 0 || *r > 0 {
                eprintln!("{:>5.1}s {} {}", i as f64 / 10.0, "#".repeat(*t), "x".repeat(*r));
            }
        }
    }
    eprintln!("{refusal:?}: {refused} refused, {settled:.1} requests/s and {taken_per_sec:.1} taken/s once settled");
    assert!(settled <= LIMIT as f64 * 1.1, "{settled:.1} requests/s against a Page that takes {LIMIT}");
    assert!(taken_per_sec >= LIMIT as f64 * 0.5, "{taken_per_sec:.1} taken/s: the relay slowed down far too much");
    assert!(refused * 10 <= taken_since, "{refused} refused for {taken_since} taken once settled");
    let metrics =
        scrape_until(apps[0], |m| m.contains("bonychat_relay_joinchat_throttles_total{channel=\"default\"}")).await;
    assert!(metrics.contains("bonychat_relay_joinchat_send_rate{channel=\"default\"}"), "{metrics}");
    assert!(metrics.contains("outcome=\"throttled\""), "{metrics}");
}

#[tokio::test]
async fn a_relay_settles_at_what_a_page_answering_429_takes() {
    settles_under_a_throttling_joinchat(Refusal::TooManyRequests, 1, None).await;
}

#[tokio::test]
async fn a_relay_settles_at_what_a_page_answering_code_613_takes() {
    settles_under_a_throttling_joinchat(Refusal::Code613, 1, None).await;
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn three_replicas_on_postgres_settle_together_at_what_the_page_takes() {
    let url = crate::postgres::fresh_database().await;
    settles_under_a_throttling_joinchat(Refusal::TooManyRequests, 3, Some(&url)).await;
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn one_replica_on_postgres_settles_at_what_the_page_takes() {
    let url = crate::postgres::fresh_database().await;
    settles_under_a_throttling_joinchat(Refusal::Code613, 1, Some(&url)).await;
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn replicas_on_postgres_share_the_configured_rate() {
    let url = crate::postgres::fresh_database().await;
    let joinchat = RateLimitedJoinChat::start(10_000, Refusal::TooManyRequests).await;
    let vars = rate_vars(&[("JOINCHAT_MAX_SENDS_PER_SEC", "20"), ("RELAY_DATABASE_URL", &url)], &joinchat.url);
    let (a, b, c) = (spawn_app_with(&vars).await, spawn_app_with(&vars).await, spawn_app_with(&vars).await);
    let (contacts, per_contact) = (30, 3);

    post_in_order(&[&a, &b, &c], contacts, per_contact).await;
    joinchat.wait_for(contacts * per_contact, Duration::from_secs(30)).await;

    let most = joinchat.most_in_one_second();
    assert!(most <= MOST_IN_A_SECOND_AT_20, "{most} sends within one second from three replicas at 20/s together");
    assert_all_once_in_order(&joinchat.taken(), contacts, per_contact);
    assert_nothing_dead(&[&a, &b, &c]).await;
}

#[tokio::test]
async fn a_message_held_back_by_the_rate_is_still_sent_within_its_request() {
    // Two a second: the fourth message of a burst can go 1.5 s on, within the 3 s wait.
    let app = spawn_app_with(&[("JOINCHAT_MAX_SENDS_PER_SEC", "2"), ("RELAY_SEND_WAIT_MS", "3000")]).await;
    app.joinchat.script([
        crate::helpers::Reply::ok(),
        crate::helpers::Reply::ok(),
        crate::helpers::Reply::ok(),
        crate::helpers::Reply::status(200, r#"{"success":false,"errors":{"code":10010,"msg":"Recipient not found"}}"#),
    ]);

    let contacts: Vec<String> = (0..4).map(contact).collect();
    let (a, b, c, d) = tokio::join!(
        app.send(&contacts[0], text("hello")),
        app.send(&contacts[1], text("hello")),
        app.send(&contacts[2], text("hello")),
        app.send(&contacts[3], text("hello")),
    );
    let answers = [a, b, c, d];

    let statuses: Vec<u16> = answers.iter().map(|(status, _)| status.as_u16()).collect();
    let rejected: Vec<&Value> = answers.iter().filter(|(status, _)| *status == 400).map(|(_, body)| body).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3, "{answers:?}");
    assert_eq!(rejected.len(), 1, "the last one's refusal reaches its request: {answers:?}");
    assert_eq!(rejected[0]["error"]["code"], "rejected_by_joinchat");
    let times: Vec<Instant> = app.joinchat.received().iter().map(|r| r.at).collect();
    assert_eq!(times.len(), 4, "every message was sent before its request was answered");
    let span = times[3].duration_since(times[0]);
    assert!(span >= Duration::from_millis(1200), "four sends at 2/s within {span:?}");
}
