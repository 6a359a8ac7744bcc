//! One clock for a shared store (SPEC §5): every time written to a Postgres store or compared
//! with it is the database's, never a replica's own. A replica whose machine clock is wrong (here
//! by libfaketime) neither delays what it makes due nor deletes what is not yet past retention.

use std::time::Duration;

use bonychat_relay::store::{Direction, JobState};

use crate::binary::{RelayProcess, clock_off_by, json_logs, run_binary};
use crate::helpers::{PSID, Reply, spawn_app_with, text};
use crate::postgres::fresh_database;

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
#[cfg_attr(
    all(postgres_tests, not(faketime_tests)),
    ignore = "no libfaketime to put a replica's clock off: apt-get install faketime"
)]
async fn a_replica_whose_clock_runs_eight_days_ahead_deletes_no_history_at_start() {
    let database = fresh_database().await;
    let app = spawn_app_with(&[("RELAY_DATABASE_URL", &database)]).await;
    let (status, _) = app.send(PSID, text("delivered just now")).await;
    assert_eq!(status, 200);
    app.settle().await;

    let mut vars = app.vars.clone();
    vars.retain(|(key, _)| key != "RELAY_RETENTION");
    json_logs(&mut vars);
    vars.extend(clock_off_by("+8d"));
    let ahead = RelayProcess::start(&vars, &[]).await;
    // The pruner runs as the relay starts; give it time to do its worst.
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(app.jobs(JobState::Delivered).await.len(), 1, "a delivered job of a minute ago is kept 7 days");
    ahead.kill().await;
    app.stop().await;
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
#[cfg_attr(
    all(postgres_tests, not(faketime_tests)),
    ignore = "no libfaketime to put a replica's clock off: apt-get install faketime"
)]
async fn dead_letters_redriven_from_a_machine_an_hour_ahead_are_due_at_once() {
    let database = fresh_database().await;
    let app = spawn_app_with(&[("RELAY_DATABASE_URL", &database), ("RELAY_RETRY_JOINCHAT", "50ms")]).await;
    app.joinchat.script([Reply::status(503, "down"), Reply::status(503, "down")]);
    app.send(PSID, text("dead, then redriven")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.jobs(JobState::Dead).await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the message never ran out of retries");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let vars: Vec<(String, String)> = app.vars.iter().cloned().chain(clock_off_by("+1h")).collect();
    let (code, stdout, stderr) = run_binary(&vars, &["jobs", "redrive"]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");

    app.settle().await;
    let delivered: Vec<_> =
        app.jobs(JobState::Delivered).await.into_iter().filter(|job| job.direction == Direction::Outbound).collect();
    assert_eq!(delivered.len(), 1, "redriven for now on the database's clock, not in an hour");
    app.stop().await;
}
