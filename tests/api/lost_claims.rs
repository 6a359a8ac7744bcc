//! A replica that lost its claim on a job never acts on it again (SPEC §5: claims by lease with
//! a fencing token). The fencing token keeps a lost claim from recording anything, but a request
//! to an upstream cannot be called back once it left: so a replica paused past its lease stops
//! before its next request, and a replica cut off from the database mid-transaction holds up no
//! other replica for longer than the database takes to end its session.

use std::time::Duration;

use bonychat_relay::config::{DatabaseUrl, PostgresOptions, Secret, StoreConfig};
use bonychat_relay::store::{self, Direction, IntakeCaps};
use serde_json::json;

use crate::binary::{RelayProcess, json_logs};
use crate::helpers::{API_TOKEN, CHANNEL_ID, JOINCHAT_SECRET, Reply, StandIn, http_client, test_vars};
use crate::postgres::{connect, fresh_database};

fn set(vars: &mut Vec<(String, String)>, key: &str, value: &str) {
    vars.retain(|(k, _)| k != key);
    vars.push((key.to_owned(), value.to_owned()));
}

/// A text JoinChat gets in three parts (SPEC §3.3: parts of at most 640 characters).
fn three_part_text() -> String {
    ["first", "second", "third"].map(|part| format!("{part} part {}", "x".repeat(600))).join("\n\n")
}

/// Waits until a session of the database at `url` waits for a lock.
async fn until_a_session_waits_for_a_lock(url: &str) {
    let mut connection = connect(url).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(&mut connection)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the relay never waited for the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The replica holds a three-part message; after part 1 was accepted it is held up on its way to
/// part 2, then frozen (SIGSTOP) past its lease while another replica takes the job over. Resumed,
/// it must not send part 2: the new holder sends it.
#[tokio::test]
async fn a_replica_paused_past_its_lease_sends_nothing_more_of_the_job_it_lost() {
    let Some(database) = fresh_database().await else { return };
    let joinchat = StandIn::joinchat(JOINCHAT_SECRET).await;
    // Part 1 is answered after a while, long enough to hold the replica up right after it.
    joinchat.script([Reply::ok().after(Duration::from_millis(1500))]);
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars(&joinchat.url, data.path());
    json_logs(&mut vars);
    for (key, value) in [
        ("RELAY_DATABASE_URL", database.as_str()),
        ("RELAY_LEASE_SECS", "3"),
        ("RELAY_DATABASE_STATEMENT_TIMEOUT_MS", "30000"),
        ("JOINCHAT_TIMEOUT_MS", "10000"),
        ("JOINCHAT_ORDER_GAP_SECS", "0"),
    ] {
        set(&mut vars, key, value);
    }
    let replica = RelayProcess::start(&vars, &[]).await;
    let contact = "5000000000000001";
    let body =
        json!({"channelId": CHANNEL_ID, "contactId": contact, "message": {"type": "text", "text": three_part_text()}});
    let request = tokio::spawn(http_client().post(replica.url("/message")).bearer_auth(API_TOKEN).json(&body).send());
    joinchat.wait_for(1).await;

    // Part 2's pacing record waits for the contact's row, which the test holds.
    let mut holder = connect(&database).await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM contacts WHERE direction = 'outbound' AND contact = $1 FOR UPDATE")
        .bind(contact)
        .fetch_one(&mut holder)
        .await
        .unwrap();
    until_a_session_waits_for_a_lock(&database).await;
    replica.signal("STOP").await;
    tokio::time::sleep(Duration::from_millis(3500)).await;

    // Another replica takes the job over once the lease ran out.
    let config = StoreConfig {
        database_url: DatabaseUrl::Postgres(Secret::new(database.clone())),
        retention: Duration::from_secs(86_400),
        intake: IntakeCaps::DEFAULT,
        postgres: PostgresOptions::DEFAULT,
    };
    let other = store::open(&config).await.unwrap();
    let now = other.now();
    let taken = other.claim("other-replica", Direction::Outbound, now, now + 60_000, 10).await.unwrap();
    assert_eq!(taken.len(), 1, "the lease ran out");
    assert_eq!(taken[0].progress, 1, "part 1 was recorded as accepted");

    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    replica.signal("CONT").await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let sent: Vec<String> =
        joinchat.bodies().iter().map(|body| body["message"]["text"].as_str().unwrap()[..11].to_owned()).collect();
    assert_eq!(sent, ["first part "], "the paused replica sent nothing after losing its claim");
    let logs = replica.output().join("\n");
    assert!(
        logs.contains("took this job over") || logs.contains("the lease may have run out"),
        "the replica says why it stopped: {logs}"
    );
    drop(request);
    replica.kill().await;
}
