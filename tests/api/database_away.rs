//! A relay on Postgres whose database goes away and comes back (SPEC §5): requests get 503
//! `store_unavailable` with nothing of them stored, readiness turns 503, and everything resumes
//! by itself, queued work included, once the database is back.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::time::Instant;

use crate::helpers::{PSID, Reply, TestApp, assert_error, spawn_app_with, text, webhook_message};
use crate::postgres::DedicatedPostgres;

async fn ready(app: &TestApp) -> StatusCode {
    app.http.get(app.url("/readyz")).send().await.unwrap().status()
}

/// Texts JoinChat accepted, in arrival order.
fn delivered(app: &TestApp) -> Vec<String> {
    app.joinchat
        .received()
        .iter()
        .filter(|r| r.answered == 200)
        .filter_map(|r| r.json()["message"]["text"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_clusters),
    ignore = "no PostgreSQL binaries (initdb, pg_ctl) for a cluster of its own: install postgresql (see README)"
)]
async fn while_the_database_is_away_nothing_is_accepted_and_everything_resumes_when_it_returns() {
    let postgres = DedicatedPostgres::start().await;
    let url = postgres.fresh_database().await;
    let app = spawn_app_with(&[
        ("RELAY_DATABASE_URL", &url),
        ("RELAY_DATABASE_CONNECT_TIMEOUT_MS", "1000"),
        ("RELAY_DATABASE_STATEMENT_TIMEOUT_MS", "1000"),
        ("RELAY_SEND_WAIT_MS", "300"),
        ("RELAY_RETRY_JOINCHAT", "500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms"),
    ])
    .await;
    // One message stored but not yet delivered when the database goes: JoinChat is failing.
    app.joinchat.script((0..4).map(|_| Reply::status(503, r#"{"success": false}"#)));
    let (status, _) = app.send(PSID, text("queued before")).await;
    assert_eq!(status, StatusCode::OK);

    postgres.stop().await;

    let asked = Instant::now();
    let (status, body) = app.send(PSID, text("sent while away")).await;
    assert_error(status, &body, 503, "store_unavailable");
    assert!(asked.elapsed() < Duration::from_secs(10), "answered within the connect timeout, not hanging");
    let webhook = app.post_webhook(webhook_message(PSID, "mid.away", "hello while away")).await;
    assert_eq!(webhook.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = webhook.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert_eq!(ready(&app).await, StatusCode::SERVICE_UNAVAILABLE);

    postgres.start_again().await;

    let deadline = Instant::now() + Duration::from_secs(30);
    while ready(&app).await != StatusCode::OK {
        assert!(Instant::now() < deadline, "/readyz never turned 200 again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The pool may still hold connections the restart cut: each fails once, with a 503.
    let mut after = None;
    for _ in 0..20 {
        let (status, body) = app.send(PSID, text("sent after")).await;
        if status == StatusCode::OK {
            after = Some(body);
            break;
        }
        assert_error(status, &body, 503, "store_unavailable");
    }
    assert!(after.is_some(), "a message is accepted again once the database is back");
    let webhook = app.post_webhook(webhook_message(PSID, "mid.after", "hello after")).await;
    assert_eq!(webhook.status(), StatusCode::OK);

    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered(&app).len() < 2 || app.bonychat.received().is_empty() {
        assert!(Instant::now() < deadline, "delivery did not resume: {:?}", delivered(&app));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(delivered(&app), ["queued before", "sent after"], "in order, and nothing answered 503 was sent");
    let forwarded: Vec<Value> = app.bonychat.bodies();
    assert!(forwarded.iter().all(|post| post["events"][0]["mId"] != "mid.away"), "{forwarded:?}");
    assert_eq!(forwarded.len(), 1, "{forwarded:?}");
    app.stop().await;
}

/// Readiness says what intake can do: a table intake writes locked by a migration or a
/// `VACUUM FULL` makes the replica not ready while it lasts, and a lock on anything intake does
/// not touch does not.
#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn readiness_follows_what_intake_can_do_when_tables_are_locked() {
    let url = crate::postgres::fresh_database().await;
    let app = spawn_app_with(&[("RELAY_DATABASE_URL", &url), ("RELAY_DATABASE_STATEMENT_TIMEOUT_MS", "1500")]).await;
    assert_eq!(ready(&app).await, StatusCode::OK);
    let mut admin = crate::postgres::connect(&url).await;

    for table in ["jobs", "channel_queues", "contacts"] {
        sqlx::query("BEGIN").execute(&mut admin).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")))
            .execute(&mut admin)
            .await
            .unwrap();
        let (status, body) = app.send(PSID, text("while locked")).await;
        let readiness = ready(&app).await;
        sqlx::query("ROLLBACK").execute(&mut admin).await.unwrap();
        assert_error(status, &body, 503, "store_unavailable");
        assert_eq!(readiness, StatusCode::SERVICE_UNAVAILABLE, "{table} locked: intake fails, so not ready");
    }

    sqlx::query("CREATE TABLE unrelated (n int)").execute(&mut admin).await.unwrap();
    sqlx::query("BEGIN").execute(&mut admin).await.unwrap();
    sqlx::query("LOCK TABLE unrelated, relay_health IN ACCESS EXCLUSIVE MODE").execute(&mut admin).await.unwrap();
    let (status, _) = app.send(PSID, text("unrelated lock")).await;
    let readiness = ready(&app).await;
    sqlx::query("ROLLBACK").execute(&mut admin).await.unwrap();
    assert_eq!((status, readiness), (StatusCode::OK, StatusCode::OK), "intake works, so ready");
}
