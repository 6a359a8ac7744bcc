//! A replica that lost its claim on a job never acts on it again (SPEC §5: claims by lease with
//! a fencing token). The fencing token keeps a lost claim from recording anything, but a request
//! to an upstream cannot be called back once it left: so a replica paused past its lease stops
//! before its next request, and a replica cut off from the database mid-transaction holds up no
//! other replica for longer than the database takes to end its session.

use std::time::Duration;

use bonychat_relay::config::{DatabaseUrl, PostgresOptions, Secret, StoreConfig};
use bonychat_relay::store::{self, Direction, IntakeCaps};
use serde_json::{Value, json};

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
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn a_replica_paused_past_its_lease_sends_nothing_more_of_the_job_it_lost() {
    let database = fresh_database().await;
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
    let claim = store::Claim {
        owner: "other-replica".into(),
        direction: Direction::Outbound,
        now,
        lease_until: now + 60_000,
        limit: 10,
        channels: std::sync::Arc::from([store::DEFAULT_CHANNEL.to_owned()]),
        per_channel: 10,
    };
    let taken = other.claim(claim).await.unwrap();
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

/// A TCP relay to the database that can go silent both ways at once, as a network cut or a lost
/// host does: nothing crosses any more and nothing is closed, so the database never hears that
/// the client is gone.
struct CuttableLink {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
}

impl CuttableLink {
    async fn to(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = tokio::sync::watch::channel(false);
        let watching = cut.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { continue };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, watching.subscribe()));
                tokio::spawn(pump(server_read, client_write, watching.subscribe()));
            }
        });
        Self { addr, cut }
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }
}

/// Copies `from` to `to` until the link is cut; after that, swallows everything and keeps `to`
/// open for good (a FIN must not cross either).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = from.read(&mut buffer).await.unwrap_or(0);
        if *cut.borrow() {
            if read == 0 {
                // The client end closed after the cut: hold the other end open, silent.
                std::future::pending::<()>().await;
            }
            continue;
        }
        if read == 0 || to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// How a replica goes away in the middle of a transaction.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Gone {
    /// Its host lost: its packets to the database dropped, then the process killed. The database
    /// never sees the connection close (the kernel's keepalive would take about two hours).
    HostLost,
    /// Frozen (SIGSTOP) and not resumed: the connection stays open and silent.
    Frozen,
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn a_replica_whose_host_is_lost_mid_transaction_holds_up_no_other_replica() {
    replica_gone_mid_transaction(Gone::HostLost).await;
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn a_replica_frozen_mid_transaction_holds_up_no_other_replica() {
    replica_gone_mid_transaction(Gone::Frozen).await;
}

/// The contact whose lock the gone replica's transaction holds must not stay blocked for the
/// others: the surviving replica serves that contact within seconds, every other contact at
/// once, and takes over the gone replica's message in flight within the lease.
async fn replica_gone_mid_transaction(how: Gone) {
    let database = fresh_database().await;
    let joinchat = StandIn::joinchat(JOINCHAT_SECRET).await;
    // The lost replica's message in flight: JoinChat holds it until after the replica is gone.
    joinchat.script([Reply::ok().after(Duration::from_secs(30))]);
    let database_url = url::Url::parse(&database).unwrap();
    let server = tokio::net::lookup_host((database_url.host_str().unwrap(), database_url.port().unwrap_or(5432)))
        .await
        .unwrap()
        .next()
        .unwrap();
    let link = CuttableLink::to(server).await;
    let mut through_link = database_url.clone();
    through_link.set_host(Some("127.0.0.1")).unwrap();
    through_link.set_port(Some(link.addr.port())).unwrap();

    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars(&joinchat.url, data.path());
    json_logs(&mut vars);
    for (key, value) in [("RELAY_LEASE_SECS", "3"), ("JOINCHAT_TIMEOUT_MS", "60000"), ("JOINCHAT_ORDER_GAP_SECS", "0")]
    {
        set(&mut vars, key, value);
    }
    let mut lost_vars = vars.clone();
    set(&mut lost_vars, "RELAY_DATABASE_URL", through_link.as_str());
    set(&mut vars, "RELAY_DATABASE_URL", &database);
    let lost = RelayProcess::start(&lost_vars, &[]).await;
    let survivor = RelayProcess::start(&vars, &[]).await;
    let http = http_client();
    let send = |relay: &RelayProcess, contact: &str, text: &str| {
        let body = json!({"channelId": CHANNEL_ID, "contactId": contact, "message": {"type": "text", "text": text}});
        http.post(relay.url("/message")).bearer_auth(API_TOKEN).json(&body).timeout(Duration::from_secs(30)).send()
    };

    // 1. A message in flight on the replica about to be lost.
    let in_flight = tokio::spawn(send(&lost, "6000000000000001", "in flight when lost"));
    joinchat.wait_for(1).await;
    // 2. Its transaction storing another contact's message holds that contact's queue, stopped
    //    (by the test's table lock) just before its insert, when the link goes down.
    let mut holder = connect(&database).await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("LOCK TABLE jobs IN SHARE MODE").execute(&mut holder).await.unwrap();
    let stuck = tokio::spawn(send(&lost, "6000000000000002", "stored when lost"));
    until_a_session_waits_for_a_lock(&database).await;
    match how {
        Gone::HostLost => {
            link.cut();
            lost.signal("KILL").await;
        }
        Gone::Frozen => lost.signal("STOP").await,
    }
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let cut_at = tokio::time::Instant::now();

    // The survivor: the locked contact within a few seconds (the dead session's end), others at once.
    let others = futures_of((3..13).map(|i| send(&survivor, &format!("60000000000000{i:02}"), "another contact")));
    let (locked_contact, others) =
        tokio::join!(send(&survivor, "6000000000000002", "same contact, other replica"), others);
    let locked_contact_in = cut_at.elapsed();
    for answer in others {
        assert_eq!(answer.unwrap().status(), 200);
    }
    let locked_contact = locked_contact.unwrap();
    assert_eq!(locked_contact.status(), 200, "{}", locked_contact.text().await.unwrap());
    assert!(locked_contact_in < Duration::from_secs(5), "held up for {locked_contact_in:?}");

    // The message in flight is taken over within the lease and delivered.
    let deadline = cut_at + Duration::from_secs(3 + 3);
    loop {
        let again = joinchat.bodies().iter().filter(|body| body["message"]["text"] == "in flight when lost").count();
        if again >= 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the lost replica's message was not taken over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    in_flight.abort();
    stuck.abort();
    survivor.kill().await;
    lost.kill().await;
}

/// Runs every future to its end, side by side.
async fn futures_of<F: Future + Send + 'static>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(tasks.len());
    for task in tasks {
        outputs.push(task.await.unwrap());
    }
    outputs
}

/// A client that hangs up while its message is being stored leaves a job leased to a request
/// that is gone: the lease is handed back at once, so the message goes out and the contact's next
/// message waits for nothing, instead of both waiting for the lease to run out.
#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn a_message_whose_client_hung_up_while_it_was_stored_holds_up_nothing() {
    let database = fresh_database().await;
    let app = crate::helpers::spawn_app_with(&[("RELAY_DATABASE_URL", &database)]).await;
    let contact = "7000000000000001";
    let body =
        |text: &str| json!({"channelId": CHANNEL_ID, "contactId": contact, "message": {"type": "text", "text": text}});
    // The store is held up (a lock on the jobs table), so the client gives up before it commits.
    let mut holder = connect(&database).await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("LOCK TABLE jobs IN SHARE MODE").execute(&mut holder).await.unwrap();
    let hung_up = app
        .http
        .post(app.url("/message"))
        .bearer_auth(API_TOKEN)
        .json(&body("stored after its client left"))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(hung_up.is_err(), "the client gave up: {hung_up:?}");
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();

    let started = tokio::time::Instant::now();
    let next = app.post_message(&body("the next message")).await;
    let answered_in = started.elapsed();

    assert_eq!(next.status(), 200);
    let sent = app.joinchat.wait_for(2).await;
    let texts: Vec<Value> = sent.iter().map(|r| r.json()["message"]["text"].clone()).collect();
    assert_eq!(texts, [json!("stored after its client left"), json!("the next message")], "both, in order");
    assert!(answered_in < Duration::from_secs(2), "the next message waited {answered_in:?} for a request long gone");
    app.stop().await;
}
