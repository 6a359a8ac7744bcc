//! The contract every store implementation keeps (SPEC §5), tested through the `Store` trait
//! only, so that another implementation runs the same suite unchanged.
//!
//! Each test takes a `Backend`: a fresh SQLite file, or a fresh database on a Postgres server.

use std::pin::Pin;
use std::sync::Arc;

use bonychat_relay::config::{DatabaseUrl, PostgresOptions, Secret, StoreConfig};
use bonychat_relay::domain::bonychat::{BonyMessage, StatusValue, WebhookEvent};
use bonychat_relay::domain::joinchat::{Message, Recipient};
use bonychat_relay::store::{
    self, BeforeSend, Claim, Direction, Finish, FirstClaim, InboundBatch, InboundItem, JobQuery, JobState, NewOutbound,
    Payload, Store, StoreError,
};
use tempfile::TempDir;

const OWNER: &str = "worker-a";
const LEASE: i64 = 60_000;
/// When a test's outbound message left for JoinChat, unless it says otherwise.
const SENT_AT: i64 = 1;

struct Subject {
    store: Arc<dyn Store>,
    config: StoreConfig,
    _dir: Option<TempDir>,
}

/// Opens a fresh store of one backend with these intake caps.
type Backend = fn(store::IntakeCaps) -> Pin<Box<dyn Future<Output = Subject> + Send>>;

fn config(database_url: DatabaseUrl, intake: store::IntakeCaps) -> StoreConfig {
    StoreConfig {
        database_url,
        retention: std::time::Duration::from_secs(7 * 86_400),
        intake,
        postgres: PostgresOptions::DEFAULT,
    }
}

/// A fresh SQLite file.
async fn sqlite(intake: store::IntakeCaps) -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let config = config(DatabaseUrl::Sqlite(dir.path().join("nested/dir/relay.db")), intake);
    let store = store::open(&config).await.expect("store opens");
    Subject { store, config, _dir: Some(dir) }
}

/// A fresh Postgres database (see `postgres.rs`).
async fn postgres(intake: store::IntakeCaps) -> Subject {
    let url = crate::postgres::fresh_database().await;
    let config = config(DatabaseUrl::Postgres(Secret::new(url)), intake);
    let store = store::open(&config).await.expect("store opens");
    Subject { store, config, _dir: None }
}

/// Runs each contract test against every store: `store_contract::sqlite::…` and
/// `store_contract::postgres::…` (ignored, with the reason, where no PostgreSQL is at hand;
/// never under CI).
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name(|caps| Box::pin(super::sqlite(caps))).await;
            })*
        }
        mod postgres {
            $(#[tokio::test]
            #[cfg_attr(
                not(postgres_tests),
                ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
            )]
            async fn $name() {
                super::$name(|caps| Box::pin(super::postgres(caps))).await;
            })*
        }
    };
}

fn outbound(contact: &str, m_id: &str, now: i64) -> NewOutbound {
    NewOutbound {
        channel: store::DEFAULT_CHANNEL.into(),
        max_queued: store::IntakeCaps::DEFAULT.outbound,
        m_id: m_id.to_owned(),
        contact: contact.to_owned(),
        recipient: Recipient::Id(contact.to_owned()),
        parts: vec![Message::Text { text: format!("text of {m_id}") }],
        now,
        trace_context: None,
    }
}

/// A webhook batch of the default channel.
fn batch(items: Vec<InboundItem>, now: i64) -> InboundBatch {
    batch_in(store::DEFAULT_CHANNEL, items, now)
}

fn batch_in(channel: &str, items: Vec<InboundItem>, now: i64) -> InboundBatch {
    InboundBatch {
        channel: channel.to_owned(),
        max_queued: store::IntakeCaps::DEFAULT.inbound,
        items,
        now,
        trace_context: None,
    }
}

fn text_event(m_id: &str) -> WebhookEvent {
    WebhookEvent::Message { m_id: m_id.to_owned(), timestamp: 1, message: BonyMessage::Text { text: m_id.to_owned() } }
}

fn echo_event(m_id: &str) -> WebhookEvent {
    WebhookEvent::MessageEcho {
        m_id: m_id.to_owned(),
        timestamp: 1,
        message: BonyMessage::Text { text: "Hello".into() },
    }
}

fn message_item(contact: &str, events: Vec<WebhookEvent>, echo_fingerprint: Option<&str>) -> InboundItem {
    InboundItem::Message { contact: contact.to_owned(), events, echo_fingerprint: echo_fingerprint.map(str::to_owned) }
}

/// A claim of the default channel's jobs.
fn claim(owner: &str, direction: Direction, now: i64, lease_until: i64, limit: usize) -> Claim {
    claim_of(&[store::DEFAULT_CHANNEL], owner, direction, now, lease_until, limit)
}

/// A claim of the jobs of `channels`.
fn claim_of(channels: &[&str], owner: &str, direction: Direction, now: i64, lease_until: i64, limit: usize) -> Claim {
    Claim {
        owner: owner.to_owned(),
        direction,
        now,
        lease_until,
        limit,
        channels: channels.iter().map(|&channel| channel.to_owned()).collect(),
        per_channel: limit,
    }
}

async fn claim_ids(store: &dyn Store, now: i64) -> Vec<(String, String)> {
    store
        .claim(claim(OWNER, Direction::Outbound, now, now + LEASE, 100))
        .await
        .unwrap()
        .into_iter()
        .map(|job| (job.contact, job.m_id))
        .collect()
}

async fn deliver_outbound(store: &dyn Store, contact: &str, m_id: &str, at: i64) {
    deliver_outbound_answered_later(store, contact, m_id, at, at).await;
}

/// An outbound message that left at `sent_at` and that JoinChat answered at `answered_at`.
async fn deliver_outbound_answered_later(store: &dyn Store, contact: &str, m_id: &str, sent_at: i64, answered_at: i64) {
    store.enqueue_outbound(outbound(contact, m_id, sent_at), None).await.unwrap();
    let jobs = store.claim(claim(OWNER, Direction::Outbound, sent_at, sent_at + LEASE, 100)).await.unwrap();
    let job = jobs.iter().find(|j| j.m_id == m_id).expect("claimed");
    store.finish(job.lease(), Finish::Delivered { progress: 1, sent_at }, answered_at).await.unwrap();
}

async fn only_the_oldest_queued_job_of_each_contact_is_claimed(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    for (contact, m_id) in [("a", "a1"), ("a", "a2"), ("b", "b1"), ("a", "a3")] {
        store.enqueue_outbound(outbound(contact, m_id, 1_000), None).await.unwrap();
    }

    let first = claim_ids(store.as_ref(), 1_000).await;
    let while_leased = claim_ids(store.as_ref(), 1_001).await;

    assert_eq!(first, [("a".to_owned(), "a1".to_owned()), ("b".to_owned(), "b1".to_owned())]);
    assert!(while_leased.is_empty(), "one job in flight per contact");
}

async fn a_retry_keeps_its_place_ahead_of_newer_jobs(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    store.enqueue_outbound(outbound("a", "a1", 1_000), None).await.unwrap();
    store.enqueue_outbound(outbound("a", "a2", 1_000), None).await.unwrap();
    let job = store.claim(claim(OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap().remove(0);

    let retry = Finish::Retry { progress: 0, next_attempt_at: 5_000, error: "503".into(), status: None };
    store.finish(job.lease(), retry, 1_100).await.unwrap();

    assert!(claim_ids(store.as_ref(), 2_000).await.is_empty(), "a2 waits for a1's retry");
    let due = store.claim(claim(OWNER, Direction::Outbound, 5_000, 5_000 + LEASE, 10)).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].m_id.as_str(), due[0].attempts, due[0].last_error.as_deref()), ("a1", 1, Some("503")));
}

async fn a_dead_job_lets_the_next_one_through_and_a_redrive_puts_it_first_again(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    store.enqueue_outbound(outbound("a", "a1", 1_000), None).await.unwrap();
    store.enqueue_outbound(outbound("a", "a2", 1_000), None).await.unwrap();
    let job = store.claim(claim(OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap().remove(0);
    store
        .finish(
            job.lease(),
            Finish::Dead { progress: 0, error: "gave up".into(), failed_receipt: false, status: None },
            1_100,
        )
        .await
        .unwrap();

    assert_eq!(claim_ids(store.as_ref(), 1_200).await, [("a".to_owned(), "a2".to_owned())]);
    let dead = store.list(Some(JobState::Dead), None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(store.redrive_dead(1_300, None, store::BATCH).await.unwrap(), 1);
    let redriven = store.list(Some(JobState::Queued), None, 10).await.unwrap();
    let a1 = redriven.iter().find(|j| j.m_id == "a1").unwrap();
    assert_eq!((a1.attempts, a1.next_attempt_at), (0, 1_300), "a fresh schedule, due now");
}

/// A dead letter outlives its contact's emptied queue (pruned meanwhile): redriven or retried,
/// it is claimable again all the same.
async fn dead_letters_come_back_after_their_queue_was_pruned(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    for (contact, m_id) in [("a", "a1"), ("b", "b1")] {
        store.enqueue_outbound(outbound(contact, m_id, 1_000), None).await.unwrap();
    }
    for job in store.claim(claim(OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap() {
        let dead = Finish::Dead { progress: 0, error: "gave up".into(), failed_receipt: false, status: None };
        store.finish(job.lease(), dead, 1_100).await.unwrap();
    }
    store.prune(1_000_000, 1_000_000, store::BATCH).await.unwrap();

    let a1 = store.list(Some(JobState::Dead), None, 10).await.unwrap().into_iter().find(|j| j.m_id == "a1").unwrap();
    store.retry(a1.id, 2_000).await.unwrap();
    assert_eq!(store.redrive_dead(2_000, None, store::BATCH).await.unwrap(), 1);

    let mut claimed = claim_ids(store.as_ref(), 2_000).await;
    claimed.sort();
    assert_eq!(claimed, [("a".to_owned(), "a1".to_owned()), ("b".to_owned(), "b1".to_owned())]);
}

async fn a_redriven_job_waits_while_a_newer_job_of_its_contact_is_in_flight(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    store.enqueue_outbound(outbound("a", "a1", 1_000), None).await.unwrap();
    store.enqueue_outbound(outbound("a", "a2", 1_000), None).await.unwrap();
    let a1 = store.claim(claim(OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap().remove(0);
    store
        .finish(a1.lease(), Finish::Dead { progress: 0, error: "x".into(), failed_receipt: false, status: None }, 1_100)
        .await
        .unwrap();
    let a2 = store.claim(claim(OWNER, Direction::Outbound, 1_200, 1_200 + LEASE, 10)).await.unwrap().remove(0);
    assert_eq!(a2.m_id, "a2");

    store.redrive_dead(1_300, None, store::BATCH).await.unwrap();
    let while_a2_in_flight = claim_ids(store.as_ref(), 1_400).await;
    store.finish(a2.lease(), Finish::Delivered { progress: 1, sent_at: SENT_AT }, 1_500).await.unwrap();
    let after = claim_ids(store.as_ref(), 1_600).await;

    assert!(while_a2_in_flight.is_empty(), "still one job in flight per contact");
    assert_eq!(after, [("a".to_owned(), "a1".to_owned())]);
}

async fn a_backlog_does_not_hide_other_contacts(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    for i in 0..300 {
        store.enqueue_outbound(outbound("busy", &format!("busy{i}"), 1_000), None).await.unwrap();
    }
    store.enqueue_outbound(outbound("quiet", "quiet1", 2_000), None).await.unwrap();

    let claimed = claim_ids(store.as_ref(), 2_000).await;

    assert_eq!(claimed, [("busy".to_owned(), "busy0".to_owned()), ("quiet".to_owned(), "quiet1".to_owned())]);
}

async fn an_expired_lease_makes_the_job_claimable_again(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    store.enqueue_outbound(outbound("a", "a1", 1_000), None).await.unwrap();
    store.claim(claim("crashed-worker", Direction::Outbound, 1_000, 2_000, 10)).await.unwrap();

    assert!(claim_ids(store.as_ref(), 1_500).await.is_empty());
    let taken_over = store.claim(claim(OWNER, Direction::Outbound, 2_000, 2_000 + LEASE, 10)).await.unwrap();

    assert_eq!(taken_over.len(), 1);
}

/// Fencing: whoever held a lease that ran out and was claimed again (by another replica, or by
/// the same one) can no longer write anything about the job.
async fn a_lost_lease_can_record_nothing_over_the_new_claim(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    store.enqueue_outbound(outbound("a", "a1", 1_000), None).await.unwrap();
    store.enqueue_outbound(outbound("a", "a2", 1_000), None).await.unwrap();
    let stale = store.claim(claim(OWNER, Direction::Outbound, 1_000, 2_000, 10)).await.unwrap().remove(0);
    // The same owner name: only the token tells the two claims apart.
    let current = store.claim(claim(OWNER, Direction::Outbound, 2_000, 2_000 + LEASE, 10)).await.unwrap().remove(0);
    assert_eq!((stale.id, stale.m_id.as_str()), (current.id, "a1"));
    assert_ne!(stale.lease_token, current.lease_token);

    let progress = store.record_progress(stale.lease(), 3, 2_100).await;
    store.renew(vec![stale.lease()], 1_000_000).await.unwrap();
    let late = store.finish(stale.lease(), Finish::Delivered { progress: 1, sent_at: SENT_AT }, 2_100).await;

    assert!(matches!(progress, Err(StoreError::Conflict(_))), "{progress:?}");
    assert!(matches!(late, Err(StoreError::Conflict(_))), "{late:?}");
    let a1 = store.list(Some(JobState::Queued), None, 10).await.unwrap().into_iter().find(|j| j.m_id == "a1").unwrap();
    assert_eq!((a1.progress, a1.attempts), (0, 0), "nothing of the stale holder was written");
    // The stale renewal did not extend the current lease: it runs out when it was going to.
    assert_eq!(claim_ids(store.as_ref(), 2_000 + LEASE).await, [("a".to_owned(), "a1".to_owned())]);
    let retaken = store.claim(claim(OWNER, Direction::Outbound, 2_000 + LEASE, 3_000 + LEASE, 10)).await.unwrap();
    assert!(retaken.is_empty(), "claimed once more just above, so in flight again");
    let again = store.finish(current.lease(), Finish::Delivered { progress: 1, sent_at: SENT_AT }, 2_200).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "the claim above superseded `current` too");
}

/// `/message` takes its own job's first attempt: leased with the insert when nothing of the
/// contact is queued, and workers do not see it.
async fn a_message_heading_its_queue_is_leased_to_its_request_with_the_insert(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    let first = FirstClaim { owner: "request".into(), lease_until: 1_000 + LEASE, reserved_until: 4_000 };

    let enqueued = store.enqueue_outbound(outbound("a", "a1", 1_000), Some(first)).await.unwrap();

    let job = enqueued.claimed.expect("leased at once").take();
    assert_eq!((job.id, job.m_id.as_str(), job.attempts, job.in_flight), (enqueued.id, "a1", 0, true));
    assert!(claim_ids(store.as_ref(), 1_000).await.is_empty(), "one in flight per contact");
    store.finish(job.lease(), Finish::Delivered { progress: 1, sent_at: SENT_AT }, 1_100).await.unwrap();
    assert_eq!(store.list(Some(JobState::Delivered), None, 10).await.unwrap().len(), 1);
}

/// A request's job leased with the insert and then held back by pacing stays its request's
/// until the wait ends: no worker takes the send the request is waiting for.
async fn a_paced_first_attempt_stays_with_its_request_until_its_wait_ends(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    let first = FirstClaim { owner: "request".into(), lease_until: 1_000 + LEASE, reserved_until: 5_000 };
    let job = store.enqueue_outbound(outbound("a", "a1", 1_000), Some(first)).await.unwrap().claimed.unwrap().take();

    store.finish(job.lease(), Finish::Defer { progress: 0, next_attempt_at: 2_000 }, 1_100).await.unwrap();

    assert!(claim_ids(store.as_ref(), 3_000).await.is_empty(), "reserved for the request");
    let own = store.claim_own("request", job.id, 3_000, 3_000 + LEASE).await.unwrap();
    assert_eq!(own.map(|job| job.take().m_id), Some("a1".to_owned()));
}

/// Behind another job of its contact, a request's job is reserved for the request until its
/// wait ends: the request claims it once it heads the queue, a worker only after the wait.
async fn a_message_behind_others_is_left_to_its_request_until_its_wait_ends(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    store.enqueue_outbound(outbound("a", "a1", 1_000), None).await.unwrap();
    let first = FirstClaim { owner: "request".into(), lease_until: 1_000 + LEASE, reserved_until: 5_000 };
    let enqueued = store.enqueue_outbound(outbound("a", "a2", 1_000), Some(first)).await.unwrap();
    assert!(enqueued.claimed.is_none(), "a1 heads the queue");

    assert!(store.claim_own("request", enqueued.id, 1_000, 1_000 + LEASE).await.unwrap().is_none());
    let a1 = store.claim(claim(OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap().remove(0);
    assert!(store.claim_own("request", enqueued.id, 1_100, 1_100 + LEASE).await.unwrap().is_none(), "a1 in flight");
    store.finish(a1.lease(), Finish::Delivered { progress: 1, sent_at: SENT_AT }, 1_200).await.unwrap();

    assert!(claim_ids(store.as_ref(), 1_300).await.is_empty(), "reserved for the request");
    let own = store.claim_own("request", enqueued.id, 1_300, 1_300 + LEASE).await.unwrap().expect("its turn").take();
    assert_eq!(own.m_id, "a2");
    // Paced: no attempt; it stays the request's until its wait ends, then any worker's.
    store.finish(own.lease(), Finish::Defer { progress: 0, next_attempt_at: 2_000 }, 1_400).await.unwrap();
    assert!(claim_ids(store.as_ref(), 2_500).await.is_empty(), "still reserved");
    assert_eq!(claim_ids(store.as_ref(), 5_000).await, [("a".to_owned(), "a2".to_owned())]);
}

/// Workers of several replicas claiming at once never get the same job, nor two jobs of one
/// contact.
async fn concurrent_claims_hand_out_each_job_once_and_one_per_contact(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    for i in 0..200 {
        store.enqueue_outbound(outbound(&format!("c{}", i % 40), &format!("m{i}"), 1_000), None).await.unwrap();
    }

    let claims = (0..8).map(|worker| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            store
                .claim(claim(&format!("worker-{worker}"), Direction::Outbound, 1_000, 1_000 + LEASE, 10))
                .await
                .unwrap()
        })
    });
    let mut claimed = Vec::new();
    for claim in claims.collect::<Vec<_>>() {
        claimed.extend(claim.await.unwrap());
    }

    let mut contacts: Vec<&str> = claimed.iter().map(|job| job.contact.as_str()).collect();
    contacts.sort_unstable();
    contacts.dedup();
    assert_eq!(contacts.len(), claimed.len(), "one job per contact, each once");
    assert_eq!(claimed.len(), 40, "every contact's head is claimed by someone");
    assert!(claimed.iter().all(|job| job.m_id.trim_start_matches('m').parse::<usize>().unwrap() < 40));
}

/// One contact never takes the capacity the others need (SPEC §5): past its own cap, only that
/// contact's new messages are refused.
async fn a_contact_past_its_cap_is_refused_while_the_others_are_not(backend: Backend) {
    let caps = store::IntakeCaps { per_contact: 2, ..store::IntakeCaps::DEFAULT };
    let Subject { store, _dir, .. } = backend(caps).await;
    for i in 0..2 {
        store.enqueue_outbound(outbound("busy", &format!("busy{i}"), 1_000), None).await.unwrap();
    }

    let refused = store.enqueue_outbound(outbound("busy", "busy2", 1_000), None).await;
    let other = store.enqueue_outbound(outbound("quiet", "quiet1", 1_000), None).await;

    assert!(matches!(refused, Err(StoreError::ContactFull { cap: 2 })), "{refused:?}");
    assert!(other.is_ok(), "{other:?}");
    let job = store.claim(claim(OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap();
    let busy = job.into_iter().find(|job| job.contact == "busy").unwrap();
    store.finish(busy.lease(), Finish::Delivered { progress: 1, sent_at: SENT_AT }, 1_100).await.unwrap();
    assert!(
        store.enqueue_outbound(outbound("busy", "busy3", 1_200), None).await.is_ok(),
        "room again once one was delivered"
    );
}

/// An outbound message to `contact` of a channel whose outbound queue holds `cap` jobs at most.
fn capped(channel: &str, contact: &str, m_id: &str, now: i64, cap: u64) -> NewOutbound {
    NewOutbound { channel: channel.to_owned(), max_queued: cap, ..outbound(contact, m_id, now) }
}

async fn the_outbound_cap_refuses_new_messages_and_stores_nothing_of_them(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    for i in 0..3 {
        store.enqueue_outbound(capped("default", "a", &format!("a{i}"), 1_000, 3), None).await.unwrap();
    }

    let refused = store.enqueue_outbound(capped("default", "b", "b1", 1_000, 3), None).await;

    let full = StoreError::Full { channel: "default".into(), direction: Direction::Outbound, cap: 3 };
    assert_eq!(refused.as_ref().err(), Some(&full), "{refused:?}");
    let said = full.to_string();
    assert_eq!(said, "outbound queue of channel default is full (3 jobs waiting); try again later");
    assert_eq!(store.list(None, None, 10).await.unwrap().len(), 3);
}

async fn renewed_leases_hold_and_released_ones_are_claimable_at_once(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    store.enqueue_outbound(outbound("a", "a1", 1_000), None).await.unwrap();
    let job = store.claim(claim(OWNER, Direction::Outbound, 1_000, 2_000, 10)).await.unwrap().remove(0);

    store.renew(vec![job.lease()], 10_000).await.unwrap();
    assert!(claim_ids(store.as_ref(), 5_000).await.is_empty());
    assert_eq!(store.release(OWNER).await.unwrap(), 1);
    assert_eq!(claim_ids(store.as_ref(), 5_000).await.len(), 1);
}

async fn stored_jobs_survive_reopening_the_store(backend: Backend) {
    let Subject { store, config, _dir } = backend(store::IntakeCaps::DEFAULT).await;
    store.enqueue_outbound(outbound("a", "a1", 1_000), None).await.unwrap();
    drop(store);

    let reopened = store::open(&config).await.unwrap();

    let jobs = reopened.list(Some(JobState::Queued), None, 10).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0].payload,
        Ok(Payload::Send {
            recipient: Recipient::Id("a".into()),
            parts: vec![Message::Text { text: "text of a1".into() }]
        })
    );
}

async fn progress_is_kept_for_the_next_attempt(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    store.enqueue_outbound(outbound("a", "a1", 1_000), None).await.unwrap();
    let job = store.claim(claim(OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap().remove(0);

    store.record_progress(job.lease(), 2, 1_100).await.unwrap();
    store.release(OWNER).await.unwrap();

    assert_eq!(store.claim(claim(OWNER, Direction::Outbound, 1_200, 1_200 + LEASE, 10)).await.unwrap()[0].progress, 2);
}

async fn pacing_remembers_the_latest_send_to_a_contact(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    let send = |effective_at| BeforeSend {
        channel: store::DEFAULT_CHANNEL.into(),
        contact: "a".into(),
        effective_at,
        pacing_until: effective_at + 1_000,
        echo_fingerprint: None,
        echo_expires_at: 0,
    };
    store.before_send(send(5_000)).await.unwrap();
    store.before_send(send(4_000)).await.unwrap();
    store.enqueue_outbound(outbound("a", "a1", 1_000), None).await.unwrap();

    let job = store.claim(claim(OWNER, Direction::Outbound, 6_000, 6_000 + LEASE, 10)).await.unwrap().remove(0);

    assert_eq!(job.contact_last_effective_at, Some(5_000), "never moves backwards");
}

async fn inbound_events_are_deduplicated_by_m_id(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    let batch = || batch(vec![message_item("u", vec![text_event("m1"), text_event("m2")], None)], 1_000);

    let first = store.enqueue_inbound(batch()).await.unwrap();
    let again = store.enqueue_inbound(batch()).await.unwrap();

    assert_eq!((first.queued, first.duplicates), (2, 0));
    assert_eq!((again.queued, again.duplicates), (0, 2));
}

async fn an_echo_of_a_recorded_send_is_dropped_once(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    let mark = BeforeSend {
        channel: store::DEFAULT_CHANNEL.into(),
        contact: "u".into(),
        effective_at: 1_000,
        pacing_until: 2_000,
        echo_fingerprint: Some("Hello".into()),
        echo_expires_at: 600_000,
    };
    store.before_send(mark).await.unwrap();

    let own = store
        .enqueue_inbound(batch(vec![message_item("u", vec![echo_event("e1")], Some("Hello"))], 2_000))
        .await
        .unwrap();
    let redelivered = store
        .enqueue_inbound(batch(vec![message_item("u", vec![echo_event("e1")], Some("Hello"))], 2_000))
        .await
        .unwrap();
    let typed_again = store
        .enqueue_inbound(batch(vec![message_item("u", vec![echo_event("e2")], Some("Hello"))], 3_000))
        .await
        .unwrap();

    assert_eq!((own.own_echoes, own.queued), (1, 0));
    assert_eq!((redelivered.own_echoes, redelivered.duplicates), (0, 1), "a dropped echo stays dropped");
    assert_eq!((typed_again.own_echoes, typed_again.queued), (0, 1), "one send matches one echo");
    assert_eq!(store.list(Some(JobState::Dropped), None, 10).await.unwrap().len(), 1);
}

async fn echo_records_expire(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    let mark = BeforeSend {
        channel: store::DEFAULT_CHANNEL.into(),
        contact: "u".into(),
        effective_at: 1_000,
        pacing_until: 2_000,
        echo_fingerprint: Some("Hello".into()),
        echo_expires_at: 2_000,
    };
    store.before_send(mark).await.unwrap();

    let late = store
        .enqueue_inbound(batch(vec![message_item("u", vec![echo_event("e1")], Some("Hello"))], 2_000))
        .await
        .unwrap();

    assert_eq!((late.own_echoes, late.queued), (0, 1));
}

async fn a_watermark_covers_a_message_by_the_time_it_left_not_the_time_joinchat_answered(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    // JoinChat took 900 ms to answer; Meta's watermark came 100 ms after the send.
    deliver_outbound_answered_later(store.as_ref(), "u", "slow", 1_000, 1_900).await;

    let batch = batch(
        vec![InboundItem::Watermark {
            contact: "u".into(),
            status: StatusValue::Delivered,
            watermark: 1_100,
            timestamp: 1_100,
        }],
        2_000,
    );
    let summary = store.enqueue_inbound(batch).await.unwrap();

    assert_eq!(summary.receipts, 1, "the newest message's receipt is not lost");
}

async fn watermarks_queue_one_receipt_per_covered_message_and_status(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    deliver_outbound(store.as_ref(), "u", "out1", 1_000).await;
    deliver_outbound(store.as_ref(), "u", "out2", 2_000).await;
    deliver_outbound(store.as_ref(), "someone-else", "out3", 1_500).await;
    let watermark = |status, watermark| {
        batch(vec![InboundItem::Watermark { contact: "u".into(), status, watermark, timestamp: 9_000 }], 9_000)
    };

    let first = store.enqueue_inbound(watermark(StatusValue::Delivered, 1_500)).await.unwrap();
    let same = store.enqueue_inbound(watermark(StatusValue::Delivered, 1_500)).await.unwrap();
    let later = store.enqueue_inbound(watermark(StatusValue::Delivered, 2_000)).await.unwrap();
    let read = store.enqueue_inbound(watermark(StatusValue::Read, 5_000)).await.unwrap();
    let delivered_after_read = store.enqueue_inbound(watermark(StatusValue::Delivered, 5_000)).await.unwrap();

    assert_eq!(
        [first.receipts, same.receipts, later.receipts, read.receipts, delivered_after_read.receipts],
        [1, 0, 1, 2, 0]
    );
    let receipts: Vec<(String, StatusValue)> = store
        .list(Some(JobState::Queued), None, 100)
        .await
        .unwrap()
        .into_iter()
        .rev()
        .map(|job| match job.payload {
            Ok(Payload::Event { event: WebhookEvent::MessageStatus { m_id, status, .. } }) => (m_id, status.value),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        receipts,
        [
            ("out1".to_owned(), StatusValue::Delivered),
            ("out2".to_owned(), StatusValue::Delivered),
            ("out1".to_owned(), StatusValue::Read),
            ("out2".to_owned(), StatusValue::Read),
        ]
    );
}

async fn a_dead_outbound_job_can_queue_its_failed_receipt(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    store.enqueue_outbound(outbound("u", "out1", 1_000), None).await.unwrap();
    let job = store.claim(claim(OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap().remove(0);

    store
        .finish(
            job.lease(),
            Finish::Dead { progress: 0, error: "gave up".into(), failed_receipt: true, status: None },
            1_100,
        )
        .await
        .unwrap();

    let queued = store.list(Some(JobState::Queued), None, 10).await.unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].contact, "u");
    let Ok(Payload::Event { event: WebhookEvent::MessageStatus { m_id, status, .. } }) = &queued[0].payload else {
        panic!()
    };
    assert_eq!(
        (m_id.as_str(), status.value, status.message.as_deref()),
        ("out1", StatusValue::Failed, Some("gave up"))
    );
    // Queued twice (a retried record), it is still one receipt.
    store.queue_failed_receipt(store::DEFAULT_CHANNEL, "u", "out1", "gave up", 1_200).await.unwrap();
    assert_eq!(store.list(Some(JobState::Queued), None, 10).await.unwrap().len(), 1);
}

async fn queue_counts_tell_ready_delayed_in_flight_and_dead_jobs_apart_per_direction(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    for contact in ["a", "b", "c"] {
        store.enqueue_outbound(outbound(contact, &format!("{contact}1"), 1_000), None).await.unwrap();
    }
    let claimed = store.claim(claim(OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap();
    let lease = |m_id: &str| claimed.iter().find(|job| job.m_id == m_id).unwrap().lease();
    let retry = Finish::Retry { progress: 0, next_attempt_at: 5_000, error: "503".into(), status: None };
    store.finish(lease("b1"), retry, 1_100).await.unwrap();
    let dead = Finish::Dead { progress: 0, error: "gave up".into(), failed_receipt: false, status: None };
    store.finish(lease("c1"), dead, 1_100).await.unwrap();
    store.enqueue_outbound(outbound("a", "a2", 1_200), None).await.unwrap();
    let batch = batch(vec![message_item("u", vec![text_event("in1")], None)], 1_200);
    store.enqueue_inbound(batch).await.unwrap();

    let at = |now| {
        let store = Arc::clone(&store);
        async move {
            let counts = store.queue_counts(now).await.unwrap();
            assert!(counts.iter().all(|(channel, ..)| channel == "default"), "{counts:?}");
            Direction::ALL.map(|d| counts.iter().find(|(_, of, _)| *of == d).expect("every direction").2)
        }
    };
    let [outbound_now, inbound_now] = at(2_000).await;
    let [outbound_later, _] = at(6_000).await;

    // a1 is leased; a2 waits behind it but is due; b1 waits for its retry; c1 is dead.
    assert_eq!((outbound_now.ready, outbound_now.delayed, outbound_now.in_flight, outbound_now.dead), (1, 1, 1, 1));
    assert_eq!((inbound_now.ready, inbound_now.delayed, inbound_now.in_flight, inbound_now.dead), (1, 0, 0, 0));
    assert_eq!((outbound_later.ready, outbound_later.delayed), (2, 0));
}

async fn retrying_one_job_makes_it_due_and_refuses_delivered_or_unknown_ones(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    deliver_outbound(store.as_ref(), "u", "done", 1_000).await;
    store.enqueue_outbound(outbound("u", "dead", 1_000), None).await.unwrap();
    let job = store.claim(claim(OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap().remove(0);
    store
        .finish(
            job.lease(),
            Finish::Dead { progress: 0, error: "x".into(), failed_receipt: false, status: None },
            1_100,
        )
        .await
        .unwrap();
    let delivered_id = store.list(Some(JobState::Delivered), None, 1).await.unwrap()[0].id;

    let retried = store.retry(job.id, 2_000).await.unwrap();

    assert_eq!((retried.state, retried.next_attempt_at), (JobState::Queued, 2_000));
    assert!(matches!(store.retry(delivered_id, 2_000).await, Err(StoreError::Conflict(_))));
    assert!(matches!(store.retry(999_999, 2_000).await, Err(StoreError::NotFound(999_999))));
}

async fn pruning_removes_old_finished_jobs_and_keeps_dead_letters(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    deliver_outbound(store.as_ref(), "u", "old", 1_000).await;
    store.enqueue_outbound(outbound("v", "dead", 1_000), None).await.unwrap();
    let job = store.claim(claim(OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap().remove(0);
    store
        .finish(
            job.lease(),
            Finish::Dead { progress: 0, error: "x".into(), failed_receipt: false, status: None },
            1_000,
        )
        .await
        .unwrap();
    deliver_outbound(store.as_ref(), "w", "recent", 9_000).await;

    let pruned = store.prune(5_000, 9_000, store::BATCH).await.unwrap();

    assert_eq!(pruned, 1);
    let left: Vec<String> = store.list(None, None, 10).await.unwrap().into_iter().map(|j| j.m_id).collect();
    assert_eq!(left, ["recent", "dead"]);
}

async fn concurrent_writes_are_all_committed(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;

    let writes = (0..500).map(|i| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let enqueued = store.enqueue_outbound(outbound(&format!("c{}", i % 50), &format!("m{i}"), 1_000), None);
            enqueued.await.map(|enqueued| enqueued.id)
        })
    });
    let ids: Vec<i64> = futures_join(writes).await;

    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 500);
    assert_eq!(store.list(Some(JobState::Queued), None, 1000).await.unwrap().len(), 500);
    // The intake count took every one of them, whichever connection wrote it.
    let full = store.enqueue_outbound(capped("default", "z", "z1", 2_000, 500), None).await;
    assert!(matches!(full, Err(StoreError::Full { .. })), "{full:?}");
    store.enqueue_outbound(capped("default", "z", "z1", 2_000, 501), None).await.unwrap();
}

async fn futures_join(handles: impl Iterator<Item = tokio::task::JoinHandle<Result<i64, StoreError>>>) -> Vec<i64> {
    let mut ids = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        ids.push(handle.await.unwrap().unwrap());
    }
    ids
}

/// The receipts queued so far, oldest first: (mId, status).
async fn queued_receipts(store: &dyn Store) -> Vec<(String, StatusValue)> {
    store
        .list(Some(JobState::Queued), None, 100)
        .await
        .unwrap()
        .into_iter()
        .rev()
        .filter_map(|job| match job.payload {
            Ok(Payload::Event { event: WebhookEvent::MessageStatus { m_id, status, .. } }) => {
                Some((m_id, status.value))
            }
            _ => None,
        })
        .collect()
}

fn watermark_batch(contact: &str, status: StatusValue, watermark: i64, now: i64) -> InboundBatch {
    batch(vec![InboundItem::Watermark { contact: contact.to_owned(), status, watermark, timestamp: watermark }], now)
}

async fn a_watermark_that_comes_while_the_send_waits_for_joinchat_is_applied_once_joinchat_accepts(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    store.enqueue_outbound(outbound("u", "slow", 1_000), None).await.unwrap();
    let job = store.claim(claim(OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap().remove(0);
    // The request left at 1 000; Meta delivered it at 1 300 and the contact read it at 1 400,
    // while JoinChat took until 1 800 to answer.
    let delivered = store.enqueue_inbound(watermark_batch("u", StatusValue::Delivered, 1_300, 1_310)).await.unwrap();
    let read = store.enqueue_inbound(watermark_batch("u", StatusValue::Read, 1_400, 1_410)).await.unwrap();
    assert_eq!((delivered.receipts, read.receipts), (0, 0), "nothing delivered yet to report");

    store.finish(job.lease(), Finish::Delivered { progress: 1, sent_at: 1_000 }, 1_800).await.unwrap();

    assert_eq!(
        queued_receipts(store.as_ref()).await,
        [("slow".to_owned(), StatusValue::Delivered), ("slow".to_owned(), StatusValue::Read)]
    );
    // Meta's next delivery of the same watermarks reports nothing twice.
    let again = store.enqueue_inbound(watermark_batch("u", StatusValue::Read, 1_400, 2_000)).await.unwrap();
    assert_eq!(again.receipts, 0);
}

async fn a_watermark_racing_the_end_of_its_send_is_never_missed(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    const CONTACTS: usize = 40;
    for i in 0..CONTACTS {
        store.enqueue_outbound(outbound(&format!("c{i}"), &format!("m{i}"), 1_000), None).await.unwrap();
    }
    let claimed = store.claim(claim(OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 100)).await.unwrap();
    assert_eq!(claimed.len(), CONTACTS);

    // Each send ends at the very moment its delivery watermark arrives (two replicas, say).
    let races = claimed.into_iter().map(|job| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let finished = store.finish(job.lease(), Finish::Delivered { progress: 1, sent_at: 1_000 }, 1_800);
            let watermark = store.enqueue_inbound(watermark_batch(&job.contact, StatusValue::Delivered, 1_500, 1_800));
            let (finished, watermark) = tokio::join!(finished, watermark);
            finished.unwrap();
            watermark.unwrap();
        })
    });
    for race in races.collect::<Vec<_>>() {
        race.await.unwrap();
    }

    let mut receipts: Vec<String> = queued_receipts(store.as_ref()).await.into_iter().map(|(m_id, _)| m_id).collect();
    receipts.sort();
    let mut expected: Vec<String> = (0..CONTACTS).map(|i| format!("m{i}")).collect();
    expected.sort();
    assert_eq!(receipts, expected, "one delivered receipt per message, whichever came first");
}

async fn a_kept_watermark_covers_only_what_left_before_it(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    store.enqueue_inbound(watermark_batch("u", StatusValue::Delivered, 1_500, 1_500)).await.unwrap();
    // A lower watermark arriving late never lowers the one kept.
    store.enqueue_inbound(watermark_batch("u", StatusValue::Delivered, 1_200, 1_600)).await.unwrap();

    deliver_outbound_answered_later(store.as_ref(), "u", "before", 1_400, 1_700).await;
    deliver_outbound_answered_later(store.as_ref(), "u", "after", 1_600, 1_700).await;
    deliver_outbound_answered_later(store.as_ref(), "someone-else", "other", 1_000, 1_700).await;

    assert_eq!(queued_receipts(store.as_ref()).await, [("before".to_owned(), StatusValue::Delivered)]);
}

async fn pruning_forgets_watermarks_past_the_retention(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    store.enqueue_inbound(watermark_batch("u", StatusValue::Read, 1_500, 1_500)).await.unwrap();

    store.prune(5_000, 9_000, store::BATCH).await.unwrap();
    deliver_outbound_answered_later(store.as_ref(), "u", "late", 1_000, 9_100).await;

    assert_eq!(queued_receipts(store.as_ref()).await, []);
}

async fn a_renewal_reports_a_lease_someone_else_claimed_since(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    store.enqueue_outbound(outbound("a", "a1", 1_000), None).await.unwrap();
    let paused = store.claim(claim("paused", Direction::Outbound, 1_000, 2_000, 10)).await.unwrap().remove(0);
    let taken_over =
        store.claim(claim("other", Direction::Outbound, 3_000, 3_000 + LEASE, 10)).await.unwrap().remove(0);

    let renewed_late = store.renew(vec![paused.lease()], 4_000 + LEASE).await.unwrap();
    let renewed_current = store.renew(vec![taken_over.lease()], 4_000 + LEASE).await.unwrap();

    assert_eq!(renewed_late, [], "the paused worker learns it lost its claim");
    assert_eq!(renewed_current, [taken_over.lease()]);
    assert!(matches!(store.record_progress(paused.lease(), 1, 4_000).await, Err(StoreError::Conflict(_))));
}

async fn a_job_handed_back_by_its_request_is_claimable_at_once_with_its_attempts_kept(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    let first = FirstClaim { owner: "request".into(), lease_until: 1_000 + LEASE, reserved_until: 4_000 };
    let enqueued = store.enqueue_outbound(outbound("a", "a1", 1_000), Some(first)).await.unwrap();
    let job = enqueued.claimed.expect("leased with the insert").take();

    store.finish(job.lease(), Finish::Release { progress: 0 }, 1_050).await.unwrap();

    let claimed = store.claim(claim(OWNER, Direction::Outbound, 1_100, 1_100 + LEASE, 10)).await.unwrap();
    assert_eq!(claimed.iter().map(|job| (job.m_id.as_str(), job.attempts)).collect::<Vec<_>>(), [("a1", 0)]);
}

async fn a_lease_its_request_dropped_unused_is_handed_back_at_once(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    let now = store.now();
    let first = FirstClaim { owner: "request".into(), lease_until: now + LEASE, reserved_until: now + LEASE };
    let enqueued = store.enqueue_outbound(outbound("a", "a1", now), Some(first)).await.unwrap();
    assert!(enqueued.claimed.is_some());

    // The request is gone (its client hung up) before it attempted the job.
    drop(enqueued);

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now = store.now();
        let claimed = store.claim(claim(OWNER, Direction::Outbound, now, now + LEASE, 10)).await.unwrap();
        if let Some(job) = claimed.first() {
            assert_eq!((job.m_id.as_str(), job.attempts), ("a1", 0), "handed back unattempted");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still leased to a request that is gone");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A request's first send paces its contact's next message from when it took effect, and its
/// echo is recognised, however the store records it; a first send that never left (held back,
/// then handed on) paces nothing and leaves no echo record for a message of the same text.
async fn a_first_send_is_recorded_as_it_left_and_one_that_never_left_not_at_all(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    let first = |now: i64| FirstClaim { owner: "request".into(), lease_until: now + LEASE, reserved_until: now + 500 };
    let sent = store.enqueue_outbound(outbound("a", "a1", 1_000), Some(first(1_000))).await.unwrap();
    let sent = sent.claimed.expect("leased at once").take();
    let record = BeforeSend {
        channel: store::DEFAULT_CHANNEL.into(),
        contact: "a".into(),
        effective_at: 1_020,
        pacing_until: 2_020,
        echo_fingerprint: Some("text of a1".into()),
        echo_expires_at: 1_020 + 600_000,
    };
    store.before_send(record).await.unwrap();
    store.finish(sent.lease(), Finish::Delivered { progress: 1, sent_at: 1_020 }, 1_100).await.unwrap();
    let held = store.enqueue_outbound(outbound("b", "b1", 2_000), Some(first(2_000))).await.unwrap();
    let held = held.claimed.expect("leased at once").take();
    store.finish(held.lease(), Finish::Defer { progress: 0, next_attempt_at: 2_100 }, 2_010).await.unwrap();
    store.enqueue_outbound(outbound("a", "a2", 3_000), None).await.unwrap();

    let mut claimed = store.claim(claim(OWNER, Direction::Outbound, 3_000, 3_000 + LEASE, 10)).await.unwrap();
    claimed.sort_by(|x, y| x.m_id.cmp(&y.m_id));
    let echoes = |contact: &str, m_id: &str, text: &str| {
        let item = message_item(contact, vec![echo_event(m_id)], Some(text));
        store.enqueue_inbound(batch(vec![item], 3_000))
    };
    let a1_echo = echoes("a", "e-a1", "text of a1").await.unwrap();
    let b1_text_typed = echoes("b", "e-b1", "text of b1").await.unwrap();

    let paced: Vec<(&str, Option<i64>)> =
        claimed.iter().map(|job| (job.m_id.as_str(), job.contact_last_effective_at)).collect();
    assert_eq!(paced, [("a2", Some(1_020)), ("b1", None)], "paced from when a1 took effect; b1 never left");
    assert_eq!((a1_echo.own_echoes, a1_echo.queued), (1, 0), "a1's echo is recognised");
    assert_eq!((b1_text_typed.own_echoes, b1_text_typed.queued), (0, 1), "b1 never left: no echo of it to expect");
}

async fn the_intake_cap_follows_every_change_of_the_queue(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    let outbound = |contact: &str, m_id: &str, now| capped("default", contact, m_id, now, 2);
    let is_full = |result: Result<store::Enqueued, StoreError>| matches!(result, Err(StoreError::Full { .. }));
    store.enqueue_outbound(outbound("a", "a1", 1_000), None).await.unwrap();
    store.enqueue_outbound(outbound("b", "b1", 1_000), None).await.unwrap();
    assert!(is_full(store.enqueue_outbound(outbound("c", "c1", 1_000), None).await));

    // Delivered and dead jobs leave room; a redrive takes it again; pruning is no change.
    let claimed = store.claim(claim(OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap();
    let lease = |m_id: &str| claimed.iter().find(|job| job.m_id == m_id).unwrap().lease();
    store.finish(lease("a1"), Finish::Delivered { progress: 1, sent_at: 1_000 }, 1_100).await.unwrap();
    let dead = Finish::Dead { progress: 0, error: "refused".into(), failed_receipt: false, status: None };
    store.finish(lease("b1"), dead, 1_100).await.unwrap();
    store.enqueue_outbound(outbound("c", "c1", 1_200), None).await.unwrap();
    store.enqueue_outbound(outbound("d", "d1", 1_200), None).await.unwrap();
    assert!(is_full(store.enqueue_outbound(outbound("e", "e1", 1_200), None).await));
    store.prune(5_000, 5_000, store::BATCH).await.unwrap();
    assert!(is_full(store.enqueue_outbound(outbound("e", "e1", 5_000), None).await));
    let dead_id = store.list(Some(JobState::Dead), None, 1).await.unwrap()[0].id;
    let claimed = store.claim(claim(OWNER, Direction::Outbound, 5_000, 5_000 + LEASE, 10)).await.unwrap();
    for job in &claimed {
        store.finish(job.lease(), Finish::Delivered { progress: 1, sent_at: 5_000 }, 5_000).await.unwrap();
    }
    store.retry(dead_id, 5_100).await.unwrap();
    store.enqueue_outbound(outbound("e", "e1", 5_200), None).await.unwrap();
    assert!(is_full(store.enqueue_outbound(outbound("f", "f1", 5_200), None).await));
}

// Channels (SPEC §7): a job belongs to one channel, and the same contact id in two channels is
// two unrelated contacts.

fn in_channel(channel: &str, contact: &str, m_id: &str, now: i64) -> NewOutbound {
    NewOutbound { channel: channel.to_owned(), ..outbound(contact, m_id, now) }
}

fn send_record(channel: &str, contact: &str, effective_at: i64, echo_fingerprint: Option<&str>) -> BeforeSend {
    BeforeSend {
        channel: channel.to_owned(),
        contact: contact.to_owned(),
        effective_at,
        pacing_until: effective_at + 1_000,
        echo_fingerprint: echo_fingerprint.map(str::to_owned),
        echo_expires_at: 600_000,
    }
}

/// (channel, mId) of the jobs claimed from `channels` at `now`, sorted.
async fn claimed_in(store: &dyn Store, channels: &[&str], direction: Direction, now: i64) -> Vec<(String, String)> {
    let claimed = store.claim(claim_of(channels, OWNER, direction, now, now + LEASE, 100)).await.unwrap();
    let mut claimed: Vec<(String, String)> = claimed.into_iter().map(|job| (job.channel, job.m_id)).collect();
    claimed.sort();
    claimed
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected.iter().map(|&(a, b)| (a.to_owned(), b.to_owned())).collect()
}

async fn one_contact_id_in_two_channels_is_two_queues_each_in_order(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    for (channel, m_id) in [("shoes", "s1"), ("hats", "h1"), ("shoes", "s2"), ("hats", "h2")] {
        store.enqueue_outbound(in_channel(channel, "u", m_id, 1_000), None).await.unwrap();
    }

    let both_heads = store.claim(claim_of(&["hats", "shoes"], OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10));
    let both_heads = both_heads.await.unwrap();
    let while_in_flight = claimed_in(store.as_ref(), &["hats", "shoes"], Direction::Outbound, 1_001).await;
    let shoes_head = both_heads.iter().find(|job| job.channel == "shoes").unwrap();
    store.finish(shoes_head.lease(), Finish::Delivered { progress: 1, sent_at: 1_002 }, 1_002).await.unwrap();
    let after_shoes_moved_on = claimed_in(store.as_ref(), &["hats", "shoes"], Direction::Outbound, 1_003).await;

    let mut heads: Vec<(&str, &str)> = both_heads.iter().map(|job| (job.channel.as_str(), job.m_id.as_str())).collect();
    heads.sort_unstable();
    assert_eq!(heads, [("hats", "h1"), ("shoes", "s1")], "both heads at once");
    assert!(while_in_flight.is_empty(), "one in flight per (channel, contact): {while_in_flight:?}");
    assert_eq!(after_shoes_moved_on, pairs(&[("shoes", "s2")]), "hats' u still has h1 in flight");
}

async fn dedup_echoes_and_watermarks_are_per_channel(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    let event = |channel| batch_in(channel, vec![message_item("u", vec![text_event("m1")], None)], 1_000);
    let echo = |channel, m_id| batch_in(channel, vec![message_item("u", vec![echo_event(m_id)], Some("Hello"))], 2_000);

    // The same Messenger mid in two channels: two events.
    let first = store.enqueue_inbound(event("shoes")).await.unwrap();
    let other = store.enqueue_inbound(event("hats")).await.unwrap();
    let again = store.enqueue_inbound(event("shoes")).await.unwrap();
    // The relay's own send in shoes: its echo in hats is someone else's message.
    store.before_send(send_record("shoes", "u", 1_500, Some("Hello"))).await.unwrap();
    let echo_elsewhere = store.enqueue_inbound(echo("hats", "e1")).await.unwrap();
    let echo_of_own = store.enqueue_inbound(echo("shoes", "e2")).await.unwrap();

    assert_eq!((first.queued, other.queued, again.duplicates), (1, 1, 1));
    assert_eq!((echo_elsewhere.own_echoes, echo_elsewhere.queued), (0, 1));
    assert_eq!((echo_of_own.own_echoes, echo_of_own.queued), (1, 0), "the mark was left for shoes' echo");

    // A message delivered in shoes; a watermark for u in hats covers nothing of it.
    store.enqueue_outbound(in_channel("shoes", "u", "out1", 3_000), None).await.unwrap();
    let job = store.claim(claim_of(&["shoes"], OWNER, Direction::Outbound, 3_000, 3_000 + LEASE, 1)).await.unwrap();
    store.finish(job[0].lease(), Finish::Delivered { progress: 1, sent_at: 3_000 }, 3_100).await.unwrap();
    let mark = |channel| {
        let items = vec![InboundItem::Watermark {
            contact: "u".into(),
            status: StatusValue::Delivered,
            watermark: 3_500,
            timestamp: 3_500,
        }];
        batch_in(channel, items, 3_600)
    };
    let in_hats = store.enqueue_inbound(mark("hats")).await.unwrap();
    let in_shoes = store.enqueue_inbound(mark("shoes")).await.unwrap();
    assert_eq!((in_hats.receipts, in_shoes.receipts), (0, 1));

    // A watermark kept in hats is not applied to a later delivery in shoes.
    store.enqueue_outbound(in_channel("shoes", "u", "out2", 4_000), None).await.unwrap();
    let kept =
        InboundItem::Watermark { contact: "u".into(), status: StatusValue::Read, watermark: 9_000, timestamp: 9_000 };
    store.enqueue_inbound(batch_in("hats", vec![kept], 4_100)).await.unwrap();
    let job = store.claim(claim_of(&["shoes"], OWNER, Direction::Outbound, 4_200, 4_200 + LEASE, 1)).await.unwrap();
    store.finish(job[0].lease(), Finish::Delivered { progress: 1, sent_at: 4_200 }, 4_300).await.unwrap();
    let receipts: Vec<(String, String)> = store
        .list(Some(JobState::Queued), None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|job| match job.payload {
            Ok(Payload::Event { event: WebhookEvent::MessageStatus { m_id, .. } }) => Some((job.channel, m_id)),
            _ => None,
        })
        .collect();
    assert_eq!(receipts, pairs(&[("shoes", "out1")]), "only shoes' own watermark made a receipt");
}

async fn pacing_and_introductions_are_per_channel(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    store.before_send(send_record("shoes", "u", 5_000, None)).await.unwrap();
    // BonyChat's shoes channel is introduced to u by u's first event there.
    let first = vec![message_item("u", vec![text_event("shoes-first")], None)];
    store.enqueue_inbound(batch_in("shoes", first, 900)).await.unwrap();
    let first = store.claim(claim_of(&["shoes"], OWNER, Direction::Inbound, 900, 900 + LEASE, 10)).await.unwrap();
    assert!(!first[0].contact_introduced, "not before its first event was delivered");
    store.finish(first[0].lease(), Finish::Introduced, 950).await.unwrap();
    for channel in ["shoes", "hats"] {
        store.enqueue_outbound(in_channel(channel, "u", &format!("{channel}-out"), 1_000), None).await.unwrap();
        let event = vec![message_item("u", vec![text_event(&format!("{channel}-in"))], None)];
        store.enqueue_inbound(batch_in(channel, event, 1_000)).await.unwrap();
    }

    let both = ["hats", "shoes"];
    let outbound = store.claim(claim_of(&both, OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap();
    let inbound = store.claim(claim_of(&both, OWNER, Direction::Inbound, 1_000, 1_000 + LEASE, 10)).await.unwrap();

    let of = |jobs: &[store::Job], channel: &str| jobs.iter().find(|job| job.channel == channel).unwrap().clone();
    assert_eq!(of(&outbound, "shoes").contact_last_effective_at, Some(5_000));
    assert_eq!(of(&outbound, "hats").contact_last_effective_at, None, "hats' u was never sent to");
    assert!(of(&inbound, "shoes").contact_introduced);
    assert!(!of(&inbound, "hats").contact_introduced, "BonyChat's hats channel never heard of u");
}

async fn a_full_channel_refuses_new_work_while_the_others_take_it(backend: Backend) {
    let caps = store::IntakeCaps { per_contact: 100, ..store::IntakeCaps::DEFAULT };
    let Subject { store, _dir, .. } = backend(caps).await;
    for i in 0..2 {
        store.enqueue_outbound(capped("shoes", &format!("c{i}"), &format!("s{i}"), 1_000, 2), None).await.unwrap();
    }
    let events = |n: usize, prefix: &str| {
        (0..n).map(|i| message_item(&format!("c{i}"), vec![text_event(&format!("{prefix}{i}"))], None)).collect()
    };
    let inbound_capped =
        |channel: &str, items, cap| InboundBatch { max_queued: cap, ..batch_in(channel, items, 1_000) };
    store.enqueue_inbound(inbound_capped("shoes", events(2, "in-shoes"), 2)).await.unwrap();

    let outbound_full = store.enqueue_outbound(capped("shoes", "c9", "s9", 1_000, 2), None).await;
    let outbound_other = store.enqueue_outbound(capped("hats", "c9", "h9", 1_000, 2), None).await;
    let inbound_full = store.enqueue_inbound(inbound_capped("shoes", events(1, "more-shoes"), 2)).await;
    let inbound_other = store.enqueue_inbound(inbound_capped("hats", events(2, "in-hats"), 2)).await;

    let full = |direction| StoreError::Full { channel: "shoes".into(), direction, cap: 2 };
    assert_eq!(outbound_full.err(), Some(full(Direction::Outbound)));
    assert_eq!(inbound_full, Err(full(Direction::Inbound)));
    assert!(outbound_other.is_ok(), "{outbound_other:?}");
    assert_eq!(inbound_other.map(|summary| summary.queued), Ok(2));
    assert_eq!(
        full(Direction::Inbound).to_string(),
        "inbound queue of channel shoes is full (2 jobs waiting); try again later"
    );
    assert_eq!(store.list(None, Some("shoes"), 100).await.unwrap().len(), 4, "nothing of the refused work stored");
}

/// SPEC §5: one channel's backlog never delays another channel's messages.
async fn claims_take_the_channels_in_turns_and_leave_ineligible_ones_untouched(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    // A flood in busy, 2 000 contacts due since 1 000, then three messages in quiet due at 2 000.
    let flood: Vec<InboundItem> =
        (0..2_000).map(|i| message_item(&format!("b{i}"), vec![text_event(&format!("busy{i}"))], None)).collect();
    store.enqueue_inbound(batch_in("busy", flood, 1_000)).await.unwrap();
    for i in 0..3 {
        let quiet = vec![message_item(&format!("q{i}"), vec![text_event(&format!("quiet{i}"))], None)];
        store.enqueue_inbound(batch_in("quiet", quiet, 2_000 + i)).await.unwrap();
    }

    // Busy is not eligible (a channel removed from the configuration): its jobs stay as they are.
    let only_quiet = claimed_in(store.as_ref(), &["quiet"], Direction::Inbound, 3_000).await;
    assert_eq!(only_quiet, pairs(&[("quiet", "quiet0"), ("quiet", "quiet1"), ("quiet", "quiet2")]));
    let busy = store.list(None, Some("busy"), 5_000).await.unwrap();
    assert_eq!(busy.len(), 2_000);
    assert!(
        busy.iter().all(|job| job.state == JobState::Queued
            && job.attempts == 0
            && job.next_attempt_at == 1_000
            && !job.in_flight
            && job.lease_until.is_none()),
        "busy's jobs untouched"
    );
    store.release(OWNER).await.unwrap();

    // Both eligible: quiet gets one job a turn however much busy has waiting, and longer.
    let both = store.claim(claim_of(&["busy", "quiet"], OWNER, Direction::Inbound, 3_000, 3_000 + LEASE, 4)).await;
    let both = both.unwrap();
    let quiet = both.iter().filter(|job| job.channel == "quiet").count();
    assert_eq!((both.len(), quiet), (4, 2), "in turns: busy, quiet, busy, quiet");
    let next = store.claim(claim_of(&["busy", "quiet"], OWNER, Direction::Inbound, 3_000, 3_000 + LEASE, 4)).await;
    assert_eq!(next.unwrap().iter().filter(|job| job.channel == "quiet").count(), 1, "quiet's last one");
}

/// A worker claims as its slots free up, often one job at a time: a channel whose heads are
/// older than another's must not take every such claim until its backlog is through.
async fn claims_of_one_job_at_a_time_go_round_the_channels(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    let flood: Vec<InboundItem> =
        (0..200).map(|i| message_item(&format!("b{i}"), vec![text_event(&format!("busy{i}"))], None)).collect();
    store.enqueue_inbound(batch_in("busy", flood, 1_000)).await.unwrap();
    for (channel, due) in [("quiet", 2_000), ("calm", 3_000)] {
        for i in 0..3 {
            let one = vec![message_item(&format!("c{i}"), vec![text_event(&format!("{channel}{i}"))], None)];
            store.enqueue_inbound(batch_in(channel, one, due + i)).await.unwrap();
        }
    }

    let mut taken = Vec::new();
    for _ in 0..9 {
        let one = store.claim(claim_of(&["busy", "calm", "quiet"], OWNER, Direction::Inbound, 5_000, 9_000, 1));
        taken.extend(one.await.unwrap().into_iter().map(|job| job.channel));
    }

    let count = |channel: &str| taken.iter().filter(|taken| *taken == channel).count();
    assert_eq!((count("busy"), count("calm"), count("quiet")), (3, 3, 3), "{taken:?}");
    assert!(taken.windows(2).all(|pair| pair[0] != pair[1]), "never the same channel twice in a row: {taken:?}");
}

async fn listing_redriving_and_counting_by_channel(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    for channel in ["shoes", "hats"] {
        store.enqueue_outbound(in_channel(channel, "u", &format!("{channel}-dead"), 1_000), None).await.unwrap();
    }
    let claimed = store.claim(claim_of(&["hats", "shoes"], OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10));
    for job in claimed.await.unwrap() {
        let dead = Finish::Dead { progress: 0, error: "gave up".into(), failed_receipt: false, status: None };
        store.finish(job.lease(), dead, 1_100).await.unwrap();
    }
    store.enqueue_outbound(in_channel("shoes", "v", "shoes-queued", 1_200), None).await.unwrap();

    let m_ids = |jobs: Vec<store::Job>| jobs.into_iter().map(|job| job.m_id).collect::<Vec<_>>();
    assert_eq!(m_ids(store.list(None, Some("shoes"), 10).await.unwrap()), ["shoes-queued", "shoes-dead"]);
    assert_eq!(m_ids(store.list(Some(JobState::Dead), Some("hats"), 10).await.unwrap()), ["hats-dead"]);
    assert_eq!(store.list(None, Some("socks"), 10).await.unwrap(), []);
    assert_eq!(store.list(Some(JobState::Dead), None, 10).await.unwrap().len(), 2);

    let counts = store.queue_counts(2_000).await.unwrap();
    let count = |channel: &str, direction| {
        counts.iter().find(|(c, d, _)| c == channel && *d == direction).map(|(.., counts)| *counts)
    };
    assert_eq!(count("shoes", Direction::Outbound).map(|c| (c.ready, c.dead)), Some((1, 1)));
    assert_eq!(count("hats", Direction::Outbound).map(|c| (c.ready, c.dead)), Some((0, 1)));
    assert_eq!(count("default", Direction::Inbound), Some(store::QueueCounts::default()), "always there");
    assert_eq!(count("hats", Direction::Inbound), None, "nothing of hats came in");

    assert_eq!(store.redrive_dead(2_000, Some("socks"), store::BATCH).await.unwrap(), 0);
    assert_eq!(store::redrive_all_dead(store.as_ref(), 2_000, Some("hats")).await.unwrap(), 1);
    let dead = m_ids(store.list(Some(JobState::Dead), None, 10).await.unwrap());
    assert_eq!(dead, ["shoes-dead"], "only hats' dead job was redriven");
    assert_eq!(store::redrive_all_dead(store.as_ref(), 2_000, None).await.unwrap(), 1);
}

/// A SQLite store serves one relay: every lease and reservation found at start is a leftover
/// of a process that is gone, and is taken over at once.
#[tokio::test]
async fn reopening_a_sqlite_store_takes_over_its_leases_and_reservations() {
    let Subject { store, config, _dir } = sqlite(store::IntakeCaps::DEFAULT).await;
    store.enqueue_outbound(outbound("a", "a1", 1_000), None).await.unwrap();
    store.claim(claim("previous-process", Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap();
    let first =
        FirstClaim { owner: "previous-process".into(), lease_until: 1_000 + LEASE, reserved_until: 1_000 + LEASE };
    // Kept leased, as by an attempt still running when that process died.
    let _in_flight = store
        .enqueue_outbound(outbound("b", "b1", 1_000), Some(first))
        .await
        .unwrap()
        .claimed
        .map(store::LeasedJob::take);
    drop(store);

    let reopened = store::open(&config).await.unwrap();

    let mut claimed = claim_ids(reopened.as_ref(), 1_001).await;
    claimed.sort();
    assert_eq!(claimed, [("a".to_owned(), "a1".to_owned()), ("b".to_owned(), "b1".to_owned())]);
}

/// A store written by the relay before channels (SQLite schema 5, Postgres schema 2) opens
/// under this one with its work in flight, all of it in `default` (SPEC §7).
mod upgrade {
    use super::*;

    /// Work in flight as the previous relay left it, in its own layout: c1 has o1 (leased by a
    /// replica still running, one part sent) then o2; c2 has o3; w has ow, and a delivery
    /// watermark that came while ow waited for JoinChat; c3's d1 is dead; u has an event queued
    /// (with its dedup key), was introduced to BonyChat, and the relay's last send to u left an
    /// echo mark. c1 has a pacing record.
    const JOBS: &str = "INSERT INTO jobs (direction, contact, m_id, dedup_key, payload, state, attempts, progress, \
        next_attempt_at, lease_owner, lease_until, lease_token, last_error, created_at, updated_at) VALUES \
        ('outbound', 'c1', 'o1', NULL, $1, 'queued', 1, 1, 1000, 'old-replica', 1000000, 3, '503', 1000, 1000), \
        ('outbound', 'c1', 'o2', NULL, $1, 'queued', 0, 0, 1000, NULL, NULL, 0, NULL, 1000, 1000), \
        ('outbound', 'c2', 'o3', NULL, $1, 'queued', 0, 0, 1000, NULL, NULL, 0, NULL, 1000, 1000), \
        ('outbound', 'w', 'ow', NULL, $1, 'queued', 0, 0, 1000, NULL, NULL, 0, NULL, 1000, 1000), \
        ('outbound', 'c3', 'd1', NULL, $1, 'dead', 8, 0, 1000, NULL, NULL, 8, 'gave up', 1000, 1000), \
        ('inbound', 'u', 'mid-old', 'event:mid-old', $2, 'queued', 0, 0, 1000, NULL, NULL, 0, NULL, 1000, 1000)";
    const HEADS: &str = "SELECT direction, contact, id, CASE WHEN lease_until IS NULL THEN next_attempt_at ELSE lease_until END \
        FROM jobs WHERE m_id IN ('o1', 'o3', 'ow', 'mid-old')";
    const ECHO: &str = "INSERT INTO echo_marks (contact, fingerprint, expires_at) VALUES ('u', 'Hello', 10000000)";
    const WATERMARK: &str = "INSERT INTO watermarks (contact, status, watermark, timestamp, updated_at) VALUES ('w', 'delivered', 5000, 5000, 1000)";

    fn payloads() -> (String, String) {
        let send = Payload::Send {
            recipient: Recipient::Id("c1".into()),
            parts: vec![Message::Text { text: "a".into() }, Message::Text { text: "b".into() }],
        };
        (store::encode_payload(&send), store::encode_payload(&Payload::Event { event: text_event("mid-old") }))
    }

    #[tokio::test]
    async fn a_sqlite_store_of_the_previous_schema_opens_with_its_work_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        store::sqlite::SqliteStore::create_with_schema_version(&path, 5).unwrap();
        let (send, event) = payloads();
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute(&JOBS.replace('$', "?"), [&send, &event]).unwrap();
        conn.execute(&format!("INSERT INTO queue_heads (direction, contact, job_id, due_at) {HEADS}"), []).unwrap();
        conn.execute_batch(&format!(
            "INSERT INTO contacts (direction, contact, last_effective_at, introduced) VALUES \
             ('outbound', 'c1', 9000000, 0), ('inbound', 'u', NULL, 1); {ECHO}; {WATERMARK};"
        ))
        .unwrap();
        drop(conn);

        let config = config(DatabaseUrl::Sqlite(path), store::IntakeCaps::DEFAULT);
        let store = store::open(&config).await.expect("the store opens and is migrated");

        // One relay per SQLite file: the previous relay's lease is a leftover, taken over at start.
        upgraded_work_is_in_default_and_goes_on(store.as_ref(), false).await;
    }

    #[tokio::test]
    #[cfg_attr(
        not(postgres_tests),
        ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
    )]
    async fn a_postgres_store_of_the_previous_schema_opens_with_its_work_in_flight() {
        let url = crate::postgres::fresh_database().await;
        store::postgres::PostgresStore::create_with_schema_version(&url, 2).await.unwrap();
        let (send, event) = payloads();
        let mut connection = crate::postgres::connect(&url).await;
        sqlx::query(JOBS).bind(&send).bind(&event).execute(&mut connection).await.unwrap();
        let heads = format!("INSERT INTO queues (direction, contact, head_id, due_at) {HEADS}");
        sqlx::query(sqlx::AssertSqlSafe(heads)).execute(&mut connection).await.unwrap();
        let rest = format!(
            "INSERT INTO contacts (direction, contact, last_effective_at, introduced) VALUES \
             ('outbound', 'c1', 9000000, false), ('inbound', 'u', NULL, true); {ECHO}; {WATERMARK};"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(rest)).execute(&mut connection).await.unwrap();

        let config = config(DatabaseUrl::Postgres(Secret::new(url)), store::IntakeCaps::DEFAULT);
        let store = store::open(&config).await.expect("the store opens and is migrated");

        // Shared by replicas: the lease of one still running holds.
        upgraded_work_is_in_default_and_goes_on(store.as_ref(), true).await;
    }

    /// Postgres schema 4, the one before the intake count moved to a row per connection: its
    /// triggers counted the jobs below in their shards, and the counts come along too.
    #[tokio::test]
    #[cfg_attr(
        not(postgres_tests),
        ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
    )]
    async fn a_postgres_store_of_schema_4_opens_with_its_work_in_flight() {
        let url = crate::postgres::fresh_database().await;
        store::postgres::PostgresStore::create_with_schema_version(&url, 4).await.unwrap();
        let (send, event) = payloads();
        let mut connection = crate::postgres::connect(&url).await;
        sqlx::query(JOBS).bind(&send).bind(&event).execute(&mut connection).await.unwrap();
        let heads = format!(
            "INSERT INTO channel_queues (channel, direction, contact, head_id, due_at) SELECT 'default', h.* FROM ({HEADS}) h"
        );
        sqlx::query(sqlx::AssertSqlSafe(heads)).execute(&mut connection).await.unwrap();
        // A shard of its own, as a writer that found every shard taken left one.
        let rest = format!(
            "INSERT INTO contacts (direction, contact, last_effective_at, introduced) VALUES \
             ('outbound', 'c1', 9000000, false), ('inbound', 'u', NULL, true); {ECHO}; {WATERMARK}; \
             INSERT INTO queue_depth (channel, direction, shard, queued) VALUES ('default', 'outbound', 123456789, 0);"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(rest)).execute(&mut connection).await.unwrap();

        let config = config(DatabaseUrl::Postgres(Secret::new(url)), store::IntakeCaps::DEFAULT);
        let store = store::open(&config).await.expect("the store opens and is migrated");

        upgraded_work_is_in_default_and_goes_on(store.as_ref(), true).await;
        // No process id is that high (Linux allows 2^22 at most): only the upgrade removes it.
        let leftover: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM queue_depth WHERE shard = 123456789")
            .fetch_one(&mut connection)
            .await
            .unwrap();
        assert_eq!(leftover, 0, "the shards of schema 4 were folded into shard 0");
    }

    async fn upgraded_work_is_in_default_and_goes_on(store: &dyn Store, lease_held: bool) {
        let listed = store.list(None, None, 100).await.unwrap();
        assert_eq!(listed.len(), 6);
        assert!(listed.iter().all(|job| job.channel == "default"), "{listed:?}");
        let dead = store.list(Some(JobState::Dead), Some("default"), 10).await.unwrap();
        assert_eq!(dead.iter().map(|job| job.m_id.as_str()).collect::<Vec<_>>(), ["d1"]);

        // The intake counts came along: 4 outbound and 1 inbound job queued.
        let full = store.enqueue_outbound(capped("default", "z", "z1", 2_000, 4), None).await;
        assert!(matches!(full, Err(StoreError::Full { .. })), "{full:?}");
        store.enqueue_outbound(capped("default", "z", "z1", 2_000, 5), None).await.unwrap();
        let one_more =
            InboundBatch { max_queued: 1, ..batch(vec![message_item("z", vec![text_event("z")], None)], 2_000) };
        assert!(matches!(store.enqueue_inbound(one_more).await, Err(StoreError::Full { .. })));

        // Each contact's oldest job, in order; o1 only once its lease is free.
        let claimed = store.claim(claim(OWNER, Direction::Outbound, 2_000, 2_000 + LEASE, 10)).await.unwrap();
        let mut m_ids: Vec<&str> = claimed.iter().map(|job| job.m_id.as_str()).collect();
        m_ids.sort_unstable();
        let o1 = if lease_held {
            assert_eq!(m_ids, ["o3", "ow", "z1"], "o1 is still leased, o2 waits behind it");
            // The replica that held o1 before the upgrade finishes it under its token.
            store::Lease { id: listed.iter().find(|job| job.m_id == "o1").unwrap().id, token: 3 }
        } else {
            assert_eq!(m_ids, ["o1", "o3", "ow", "z1"]);
            let o1 = claimed.iter().find(|job| job.m_id == "o1").unwrap();
            assert_eq!((o1.progress, o1.attempts), (1, 1), "its progress kept");
            assert_eq!(o1.contact_last_effective_at, Some(9_000_000), "the pacing record kept");
            o1.lease()
        };
        store.finish(o1, Finish::Delivered { progress: 2, sent_at: 2_100 }, 2_100).await.unwrap();
        let next = store.claim(claim(OWNER, Direction::Outbound, 2_200, 2_200 + LEASE, 10)).await.unwrap();
        assert_eq!(next.iter().map(|job| job.m_id.as_str()).collect::<Vec<_>>(), ["o2"]);
        assert_eq!(next[0].contact_last_effective_at, Some(9_000_000), "the pacing record kept");

        // The watermark that came while ow waited covers it once JoinChat accepts it.
        let ow = claimed.iter().find(|job| job.m_id == "ow").unwrap();
        store.finish(ow.lease(), Finish::Delivered { progress: 2, sent_at: 4_000 }, 4_100).await.unwrap();
        assert_eq!(queued_receipts(store).await, [("ow".to_owned(), StatusValue::Delivered)]);

        // Messenger's redelivery of the stored event is a duplicate; the echo of the last send
        // is recognised; u is known to BonyChat.
        let redelivered = batch(vec![message_item("u", vec![text_event("mid-old")], None)], 5_000);
        let redelivered = store.enqueue_inbound(redelivered).await.unwrap();
        assert_eq!((redelivered.queued, redelivered.duplicates), (0, 1));
        let echo = batch(vec![message_item("u", vec![echo_event("e-new")], Some("Hello"))], 5_000);
        assert_eq!(store.enqueue_inbound(echo).await.unwrap().own_echoes, 1);
        let inbound = store.claim(claim(OWNER, Direction::Inbound, 5_000, 5_000 + LEASE, 10)).await.unwrap();
        let event = inbound.iter().find(|job| job.m_id == "mid-old").expect("the stored event is claimable");
        assert!(event.contact_introduced, "the introduction kept");

        assert_eq!(store.redrive_dead(6_000, Some("default"), store::BATCH).await.unwrap(), 1);
    }
}

/// The console's lists: each filter alone and together, newest first, a page at a time.
async fn jobs_are_found_by_state_channel_direction_id_and_contact_a_page_at_a_time(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    for (channel, contact, m_id) in
        [("shoes", "u", "s1"), ("shoes", "v", "s2"), ("hats", "u", "h1"), ("shoes", "u", "s3")]
    {
        store.enqueue_outbound(in_channel(channel, contact, m_id, 1_000), None).await.unwrap();
    }
    let event = vec![message_item("u", vec![text_event("mid.in1")], None)];
    store.enqueue_inbound(batch_in("shoes", event, 1_000)).await.unwrap();
    let found = |query: JobQuery| {
        let store = store.clone();
        async move { store.find(query).await.unwrap().into_iter().map(|job| job.m_id).collect::<Vec<_>>() }
    };
    let all = JobQuery { limit: 10, ..JobQuery::default() };

    assert_eq!(found(all.clone()).await, ["mid.in1", "s3", "h1", "s2", "s1"], "newest first");
    let shoes = JobQuery { channel: Some("shoes".into()), ..all.clone() };
    assert_eq!(found(shoes.clone()).await, ["mid.in1", "s3", "s2", "s1"]);
    let outbound_shoes = JobQuery { direction: Some(Direction::Outbound), ..shoes.clone() };
    assert_eq!(found(outbound_shoes.clone()).await, ["s3", "s2", "s1"]);
    assert_eq!(
        found(JobQuery { search: Some("u".into()), ..all.clone() }).await,
        ["mid.in1", "s3", "h1", "s1"],
        "by contact"
    );
    assert_eq!(found(JobQuery { search: Some("s2".into()), ..all.clone() }).await, ["s2"], "by BonyChat mId");
    assert_eq!(
        found(JobQuery { search: Some("mid.in1".into()), ..all.clone() }).await,
        ["mid.in1"],
        "by Messenger mid"
    );
    assert!(found(JobQuery { search: Some("nobody".into()), ..all.clone() }).await.is_empty());

    let first_page = store.find(JobQuery { limit: 2, ..outbound_shoes.clone() }).await.unwrap();
    let next = JobQuery { limit: 2, before: Some(first_page.last().unwrap().id), ..outbound_shoes };
    assert_eq!(found(next).await, ["s1"], "the page after s2");
    assert!(found(JobQuery { state: Some(JobState::Dead), ..all }).await.is_empty());
}

/// A job's page shows every attempt that did not deliver it: numbered, with the upstream's
/// status, the latest ones kept, and gone with the job when it is pruned.
async fn failed_attempts_are_kept_per_job_bounded_and_pruned_with_it(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    let id = store.enqueue_outbound(outbound("a", "a1", 1_000), None).await.unwrap().id;
    let failures = store::ATTEMPTS_KEPT + 3;
    for attempt in 0..failures {
        let now = 2_000 + attempt as i64 * 1_000;
        let job = store.claim(claim(OWNER, Direction::Outbound, now, now + LEASE, 10)).await.unwrap().remove(0);
        let error = format!("JoinChat answered 503 Service Unavailable: busy {attempt}");
        store
            .finish(job.lease(), Finish::Retry { progress: 0, next_attempt_at: now + 1, error, status: None }, now + 1)
            .await
            .unwrap();
    }
    let history = store.job_history(id).await.unwrap().expect("the job is there");
    assert_eq!(history.attempts.len(), store::ATTEMPTS_KEPT, "the latest ones kept");
    let first = &history.attempts[0];
    assert_eq!((first.attempt, first.outcome.as_str(), first.status), (4, "retry", Some(503)));
    let last = history.attempts.last().unwrap();
    assert_eq!(last.attempt as usize, failures);
    assert!(last.error.ends_with(&format!("busy {}", failures - 1)), "{}", last.error);

    let now = 100_000;
    let job = store.claim(claim(OWNER, Direction::Outbound, now, now + LEASE, 10)).await.unwrap().remove(0);
    store.finish(job.lease(), Finish::Delivered { progress: 1, sent_at: now }, now).await.unwrap();
    let history = store.job_history(id).await.unwrap().unwrap();
    assert_eq!(history.job.state, JobState::Delivered);
    assert_eq!(history.attempts.len(), store::ATTEMPTS_KEPT, "the delivering attempt is the job itself");
    assert!(store.job_history(id + 1000).await.unwrap().is_none());

    store.prune(now + 1, now + 1, store::BATCH).await.unwrap();
    assert!(store.job_history(id).await.unwrap().is_none());
    let dead = store.enqueue_outbound(outbound("a", "a2", now), None).await.unwrap().id;
    let job = store.claim(claim(OWNER, Direction::Outbound, now, now + LEASE, 10)).await.unwrap().remove(0);
    let refused = Finish::Dead {
        progress: 0,
        error: "cannot reach JoinChat: connection refused".into(),
        failed_receipt: false,
        status: None,
    };
    store.finish(job.lease(), refused, now + 5).await.unwrap();
    let history = store.job_history(dead).await.unwrap().unwrap();
    let only = &history.attempts[..];
    assert_eq!(only.len(), 1);
    assert_eq!((only[0].attempt, only[0].outcome.as_str(), only[0].status, only[0].at), (1, "dead", None, now + 5));
    assert_ne!(dead, id, "ids are never given again");
}

async fn queue_counts_say_when_the_oldest_queued_job_was_accepted(backend: Backend) {
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    store.enqueue_outbound(in_channel("shoes", "b", "b1", 1_500), None).await.unwrap();
    store.enqueue_outbound(in_channel("shoes", "a", "a1", 1_700), None).await.unwrap();
    store.enqueue_outbound(in_channel("shoes", "b", "b2", 1_900), None).await.unwrap();
    let oldest = |counts: &[(String, Direction, store::QueueCounts)], channel: &str, direction: Direction| {
        counts.iter().find(|(c, d, _)| c == channel && *d == direction).and_then(|(.., n)| n.oldest_queued_at)
    };
    let counts = store.queue_counts(2_000).await.unwrap();
    assert_eq!(oldest(&counts, "shoes", Direction::Outbound), Some(1_500));
    assert_eq!(oldest(&counts, "default", Direction::Outbound), None);

    let b1 = store.claim(claim_of(&["shoes"], OWNER, Direction::Outbound, 2_000, 2_000 + LEASE, 1)).await.unwrap();
    assert_eq!(b1[0].m_id, "b1");
    let counts = store.queue_counts(2_000).await.unwrap();
    assert_eq!(oldest(&counts, "shoes", Direction::Outbound), Some(1_500), "in flight is still queued");
    store.finish(b1[0].lease(), Finish::Delivered { progress: 1, sent_at: 2_000 }, 2_000).await.unwrap();
    let counts = store.queue_counts(2_000).await.unwrap();
    assert_eq!(oldest(&counts, "shoes", Direction::Outbound), Some(1_700));
}

/// SPEC §6: each job keeps the trace context of the request that stored it, whichever way it is
/// claimed, so that every attempt (by any replica, after any restart) continues that trace.
async fn every_job_keeps_the_trace_context_of_the_request_that_stored_it(backend: Backend) {
    const MESSAGE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const BEHIND: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    const WEBHOOK: &str = "00-5e6c5a1b2f3d4c5b6a7980a1b2c3d4e5-1122334455667788-00";
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    let traced = |m_id: &str, trace_context: &str| NewOutbound {
        trace_context: Some(trace_context.to_owned()),
        ..outbound("a", m_id, 1_000)
    };
    let first = FirstClaim { owner: "request".into(), lease_until: 1_000 + LEASE, reserved_until: 1_000 };

    let leased = store.enqueue_outbound(traced("a1", MESSAGE), Some(first)).await.unwrap();
    let a1 = leased.claimed.expect("leased with the insert").take();
    assert_eq!(a1.trace_context.as_deref(), Some(MESSAGE));
    store.enqueue_outbound(traced("a2", BEHIND), None).await.unwrap();
    store.enqueue_outbound(outbound("a", "a3", 1_000), None).await.unwrap();
    store.finish(a1.lease(), Finish::Delivered { progress: 1, sent_at: 1_000 }, 1_100).await.unwrap();

    let a2 = store.claim(claim(OWNER, Direction::Outbound, 1_200, 1_200 + LEASE, 10)).await.unwrap().remove(0);
    assert_eq!((a2.m_id.as_str(), a2.trace_context.as_deref()), ("a2", Some(BEHIND)));
    store.finish(a2.lease(), Finish::Delivered { progress: 1, sent_at: 1_200 }, 1_300).await.unwrap();
    let a3 = store.claim(claim(OWNER, Direction::Outbound, 1_400, 1_400 + LEASE, 10)).await.unwrap().remove(0);
    assert_eq!((a3.m_id.as_str(), a3.trace_context), ("a3", None), "no context: none made up");

    // A webhook's events and the receipts its watermark queues keep the webhook's context.
    let items = vec![
        message_item("a", vec![text_event("in1")], None),
        InboundItem::Watermark { contact: "a".into(), status: StatusValue::Read, watermark: 1_250, timestamp: 1_250 },
    ];
    let webhook = InboundBatch { trace_context: Some(WEBHOOK.to_owned()), ..batch(items, 1_500) };
    let summary = store.enqueue_inbound(webhook).await.unwrap();
    assert_eq!((summary.queued, summary.receipts), (1, 2));
    let mut inbound = Vec::new();
    for now in [1_600, 1_700, 1_800] {
        let mut claimed = store.claim(claim(OWNER, Direction::Inbound, now, now + LEASE, 10)).await.unwrap();
        let job = claimed.remove(0);
        store.finish(job.lease(), Finish::Delivered { progress: 1, sent_at: now }, now).await.unwrap();
        inbound.push(job);
    }
    assert!(inbound.iter().all(|job| job.trace_context.as_deref() == Some(WEBHOOK)), "{inbound:?}");

    // Listed and looked up, as stored.
    let history = store.job_history(a2.id).await.unwrap().expect("kept");
    assert_eq!(history.job.trace_context.as_deref(), Some(BEHIND));
}

/// The receipts about a message (its `failed` receipt, and those a watermark that came before
/// JoinChat's answer owes it) continue the message's trace, not the webhook's or none.
async fn receipts_about_a_message_continue_its_trace(backend: Backend) {
    const FAILED: &str = "00-11111111111111111111111111111111-1111111111111111-01";
    const READ: &str = "00-22222222222222222222222222222222-2222222222222222-01";
    const ASKED: &str = "00-33333333333333333333333333333333-3333333333333333-01";
    let Subject { store, _dir, .. } = backend(store::IntakeCaps::DEFAULT).await;
    let traced = |contact: &str, m_id: &str, trace_context: &str| NewOutbound {
        trace_context: Some(trace_context.to_owned()),
        ..outbound(contact, m_id, 1_000)
    };
    store.enqueue_outbound(traced("f", "failed1", FAILED), None).await.unwrap();
    store.enqueue_outbound(traced("r", "read1", READ), None).await.unwrap();
    store.enqueue_outbound(traced("q", "asked1", ASKED), None).await.unwrap();
    let claimed = store.claim(claim(OWNER, Direction::Outbound, 1_000, 1_000 + LEASE, 10)).await.unwrap();
    let job = |m_id: &str| claimed.iter().find(|job| job.m_id == m_id).unwrap().clone();

    let gave_up = Finish::Dead { progress: 0, error: "refused".into(), failed_receipt: true, status: Some(400) };
    store.finish(job("failed1").lease(), gave_up, 1_100).await.unwrap();
    // Read before JoinChat's answer came: the receipt is owed once it does.
    store.enqueue_inbound(watermark_batch("r", StatusValue::Read, 2_000, 1_200)).await.unwrap();
    store.finish(job("read1").lease(), Finish::Delivered { progress: 1, sent_at: 1_500 }, 1_300).await.unwrap();
    store
        .finish(job("asked1").lease(), Finish::Rejected { progress: 0, error: "400".into(), status: None }, 1_300)
        .await
        .unwrap();
    store.queue_failed_receipt(store::DEFAULT_CHANNEL, "q", "asked1", "refused", 1_400).await.unwrap();

    let receipts = store.claim(claim(OWNER, Direction::Inbound, 1_500, 1_500 + LEASE, 10)).await.unwrap();
    let trace_of = |contact: &str| {
        let receipt = receipts.iter().find(|job| job.contact == contact).unwrap_or_else(|| panic!("{receipts:?}"));
        receipt.trace_context.clone()
    };
    assert_eq!(trace_of("f").as_deref(), Some(FAILED));
    assert_eq!(trace_of("r").as_deref(), Some(READ));
    assert_eq!(trace_of("q").as_deref(), Some(ASKED));
}

contract!(
    every_job_keeps_the_trace_context_of_the_request_that_stored_it,
    receipts_about_a_message_continue_its_trace,
    jobs_are_found_by_state_channel_direction_id_and_contact_a_page_at_a_time,
    failed_attempts_are_kept_per_job_bounded_and_pruned_with_it,
    queue_counts_say_when_the_oldest_queued_job_was_accepted,
    only_the_oldest_queued_job_of_each_contact_is_claimed,
    a_retry_keeps_its_place_ahead_of_newer_jobs,
    a_dead_job_lets_the_next_one_through_and_a_redrive_puts_it_first_again,
    a_redriven_job_waits_while_a_newer_job_of_its_contact_is_in_flight,
    dead_letters_come_back_after_their_queue_was_pruned,
    a_backlog_does_not_hide_other_contacts,
    an_expired_lease_makes_the_job_claimable_again,
    a_lost_lease_can_record_nothing_over_the_new_claim,
    a_message_heading_its_queue_is_leased_to_its_request_with_the_insert,
    a_paced_first_attempt_stays_with_its_request_until_its_wait_ends,
    a_message_behind_others_is_left_to_its_request_until_its_wait_ends,
    concurrent_claims_hand_out_each_job_once_and_one_per_contact,
    the_outbound_cap_refuses_new_messages_and_stores_nothing_of_them,
    a_contact_past_its_cap_is_refused_while_the_others_are_not,
    renewed_leases_hold_and_released_ones_are_claimable_at_once,
    stored_jobs_survive_reopening_the_store,
    progress_is_kept_for_the_next_attempt,
    pacing_remembers_the_latest_send_to_a_contact,
    inbound_events_are_deduplicated_by_m_id,
    an_echo_of_a_recorded_send_is_dropped_once,
    echo_records_expire,
    a_watermark_covers_a_message_by_the_time_it_left_not_the_time_joinchat_answered,
    watermarks_queue_one_receipt_per_covered_message_and_status,
    a_dead_outbound_job_can_queue_its_failed_receipt,
    queue_counts_tell_ready_delayed_in_flight_and_dead_jobs_apart_per_direction,
    retrying_one_job_makes_it_due_and_refuses_delivered_or_unknown_ones,
    pruning_removes_old_finished_jobs_and_keeps_dead_letters,
    concurrent_writes_are_all_committed,
    a_watermark_that_comes_while_the_send_waits_for_joinchat_is_applied_once_joinchat_accepts,
    a_kept_watermark_covers_only_what_left_before_it,
    a_watermark_racing_the_end_of_its_send_is_never_missed,
    pruning_forgets_watermarks_past_the_retention,
    a_renewal_reports_a_lease_someone_else_claimed_since,
    a_job_handed_back_by_its_request_is_claimable_at_once_with_its_attempts_kept,
    a_lease_its_request_dropped_unused_is_handed_back_at_once,
    a_first_send_is_recorded_as_it_left_and_one_that_never_left_not_at_all,
    the_intake_cap_follows_every_change_of_the_queue,
    one_contact_id_in_two_channels_is_two_queues_each_in_order,
    dedup_echoes_and_watermarks_are_per_channel,
    pacing_and_introductions_are_per_channel,
    a_full_channel_refuses_new_work_while_the_others_take_it,
    claims_take_the_channels_in_turns_and_leave_ineligible_ones_untouched,
    listing_redriving_and_counting_by_channel,
    claims_of_one_job_at_a_time_go_round_the_channels,
);
