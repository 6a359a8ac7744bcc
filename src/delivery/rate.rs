//! Each channel's JoinChat send rate, as the attempts see it (SPEC §5).
//!
//! Every request to JoinChat takes a send from its channel's bucket in the store
//! ([`Store::send_rate`]), which every replica shares. To keep the store off the path of each
//! send, a replica takes sends in small batches (a twentieth of a second's worth) and hands
//! them out locally; a batch left unused for `BATCH_LIFETIME` is dropped, so no replica
//! saves sends up for a burst. Attempts of a channel queue for its sends in turn (a fair
//! lock), waiting at most [`MAX_WAIT`] in their slot; past that the send is held back: the job
//! goes back to the queue, due when the channel can send again, without counting as an
//! attempt. The dispatcher leaves a channel's jobs queued while the attempts already waiting
//! cover what it can send in [`MAX_WAIT`], so a slow channel never fills the slots with
//! waiters nor churns its queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::send_rate::DEFAULT_PAUSE_MS;
use crate::store::{Grant, RateOp, Store, StoreResult};

/// The longest an attempt waits in its slot for its channel's next send.
pub const MAX_WAIT: Duration = Duration::from_millis(500);
/// How long a batch of sends taken from the store stays good.
const BATCH_LIFETIME: Duration = Duration::from_millis(100);
/// A batch is this many seconds of the channel's rate, and at least [`MIN_BATCH`] sends (as
/// many as the bucket holds: a slow channel's bucket holds one).
const BATCH_SECS: f64 = 0.05;
const MIN_BATCH: f64 = 2.0;
/// The longest pause a throttle's `Retry-After` imposes; a longer one is most likely wrong.
const LONGEST_PAUSE: Duration = Duration::from_secs(3600);

/// Whether a send may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    Go,
    /// Not before this time (ms, the store's clock): the send is held back.
    HeldUntil(i64),
}

pub struct SendRates {
    store: Arc<dyn Store>,
    channels: Mutex<HashMap<String, Arc<ChannelRate>>>,
}

/// One channel's sends as this replica sees them.
struct ChannelRate {
    /// Sends taken from the store and not used yet; the lock is the queue of attempts.
    batch: tokio::sync::Mutex<Batch>,
    /// Attempts waiting for a send.
    waiting: AtomicUsize,
    /// When the channel can send next, as the store last said (ms); 0 when it could.
    held_until: AtomicI64,
    /// The rate in effect, as the store last said (sends a second, `f64` bits).
    rate: AtomicU64,
    /// The rate last shown by the gauge (`u64::MAX`: none yet).
    published: AtomicU64,
    /// Throttles this replica saw: a batch taken before the last one is not used.
    throttles: AtomicU64,
}

struct Batch {
    sends: u32,
    taken_at: Instant,
    /// [`ChannelRate::throttles`] when it was taken.
    throttles: u64,
}

impl SendRates {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, channels: Mutex::default() }
    }

    fn channel(&self, channel: &str, max_per_sec: u32) -> Arc<ChannelRate> {
        let mut channels = self.channels.lock().expect("send rates");
        if let Some(rate) = channels.get(channel) {
            return Arc::clone(rate);
        }
        let rate = Arc::new(ChannelRate {
            batch: tokio::sync::Mutex::new(Batch { sends: 0, taken_at: Instant::now(), throttles: 0 }),
            waiting: AtomicUsize::new(0),
            held_until: AtomicI64::new(0),
            rate: AtomicU64::new(f64::from(max_per_sec).to_bits()),
            published: AtomicU64::new(u64::MAX),
            throttles: AtomicU64::new(0),
        });
        channels.insert(channel.to_owned(), Arc::clone(&rate));
        rate
    }

    /// Shows `channel`'s configured rate until it has sent (and the store says the rate).
    pub fn announce(&self, channel: &str, max_per_sec: u32) {
        if !self.channels.lock().expect("send rates").contains_key(channel) {
            crate::monitoring::send_rate(channel, f64::from(max_per_sec));
        }
    }

    /// One send for `channel` (configured at `max_per_sec`), waited for at most [`MAX_WAIT`].
    pub async fn take(&self, channel: &str, max_per_sec: u32) -> StoreResult<Turn> {
        let rate = self.channel(channel, max_per_sec);
        let deadline = Instant::now() + MAX_WAIT;
        // Counted off when dropped: an attempt cut short while it waits (its lease lost, the
        // shutdown) must not leave its channel looking busy to the dispatcher for good.
        let _waiting = Waiting::on(&rate);
        self.take_in_turn(&rate, channel, max_per_sec, deadline).await
    }

    async fn take_in_turn(
        &self,
        rate: &ChannelRate,
        channel: &str,
        max_per_sec: u32,
        deadline: Instant,
    ) -> StoreResult<Turn> {
        let held = || {
            // Behind the attempts still queued: at least the time they need.
            let queued = rate.waiting.load(Ordering::SeqCst) as f64 / rate.current().max(f64::EPSILON);
            let behind = self.store.now().saturating_add((queued * 1000.0) as i64);
            Turn::HeldUntil(rate.held_until.load(Ordering::SeqCst).max(behind))
        };
        let Ok(mut batch) = tokio::time::timeout_at(deadline, rate.batch.lock()).await else {
            return Ok(held());
        };
        loop {
            let throttles = rate.throttles.load(Ordering::SeqCst);
            if batch.sends > 0 && batch.taken_at.elapsed() < BATCH_LIFETIME && batch.throttles == throttles {
                batch.sends -= 1;
                return Ok(Turn::Go);
            }
            let want = (rate.current() * BATCH_SECS).ceil().max(MIN_BATCH) as u32;
            let grant = self.store.send_rate(channel, RateOp::Take { want }, max_per_sec).await?;
            rate.learn(channel, &grant);
            if grant.granted > 0 {
                *batch = Batch { sends: grant.granted - 1, taken_at: Instant::now(), throttles };
                return Ok(Turn::Go);
            }
            let wait = Duration::from_millis(u64::try_from(grant.next_at - self.store.now()).unwrap_or(0));
            if Instant::now() + wait > deadline {
                drop(batch);
                return Ok(held());
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// JoinChat throttled `channel`: its rate halves and it pauses (for every replica) for
    /// `retry_after`, or a second. Returns when the channel may send again.
    pub async fn throttled(&self, channel: &str, max_per_sec: u32, retry_after: Option<Duration>) -> StoreResult<i64> {
        let pause = retry_after.map_or(DEFAULT_PAUSE_MS, |after| {
            i64::try_from(after.min(LONGEST_PAUSE).as_millis()).unwrap_or(DEFAULT_PAUSE_MS)
        });
        let rate = self.channel(channel, max_per_sec);
        // The sends this replica still holds were taken at the old rate.
        rate.throttles.fetch_add(1, Ordering::SeqCst);
        let grant = self.store.send_rate(channel, RateOp::Throttle { pause_ms: pause }, max_per_sec).await?;
        rate.learn(channel, &grant);
        crate::monitoring::send_throttled(channel);
        Ok(grant.next_at)
    }

    /// The channels whose jobs the dispatcher leaves queued for now: paused, or with attempts
    /// enough waiting for what they can send in [`MAX_WAIT`].
    pub fn busy_channels(&self, now: i64) -> Vec<String> {
        let channels = self.channels.lock().expect("send rates");
        let horizon = now.saturating_add(i64::try_from(MAX_WAIT.as_millis()).unwrap_or(0));
        channels
            .iter()
            .filter(|(_, rate)| {
                let sendable = (rate.current() * MAX_WAIT.as_secs_f64()).ceil().max(1.0) as usize;
                rate.held_until.load(Ordering::SeqCst) > horizon || rate.waiting.load(Ordering::SeqCst) >= sendable
            })
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// One attempt waiting for its channel's next send.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn on(rate: &'a ChannelRate) -> Self {
        rate.waiting.fetch_add(1, Ordering::SeqCst);
        Self(&rate.waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ChannelRate {
    fn current(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }

    fn learn(&self, channel: &str, grant: &Grant) {
        self.rate.store(grant.rate.to_bits(), Ordering::Relaxed);
        self.held_until.store(if grant.granted > 0 { 0 } else { grant.next_at }, Ordering::SeqCst);
        // Only a change is worth the gauge's lookup among every channel's series: a quiet
        // channel takes a batch for nearly every send, and the rate seldom moves.
        if self.published.swap(grant.rate.to_bits(), Ordering::Relaxed) != grant.rate.to_bits() {
            crate::monitoring::send_rate(channel, grant.rate);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::IntakeCaps;
    use crate::store::sqlite::SqliteStore;

    async fn rates() -> (SendRates, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("relay.db"), IntakeCaps::DEFAULT).await.unwrap();
        (SendRates::new(Arc::new(store)), dir)
    }

    #[tokio::test]
    async fn an_attempt_cut_short_while_it_waits_no_longer_counts_as_waiting() {
        let (rates, _dir) = rates().await;
        let waiting_on = |rates: &SendRates| rates.channel("shoes", 3).waiting.load(Ordering::SeqCst);
        assert_eq!(rates.take("shoes", 3).await.unwrap(), Turn::Go);

        // Three a second: the next send is a third of a second away, and the attempt waits for it.
        let mut waiting = Box::pin(rates.take("shoes", 3));
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut waiting).await.is_err());
        assert_eq!(waiting_on(&rates), 1);
        // Cut short (its lease lost, the shutdown): were it still counted, the dispatcher would
        // leave the channel's jobs queued for good once enough such attempts added up.
        drop(waiting);
        assert_eq!(waiting_on(&rates), 0);

        // One a second: a send a second away is held back at once, not waited for.
        assert_eq!(rates.take("hats", 1).await.unwrap(), Turn::Go);
        let held = rates.take("hats", 1).await.unwrap();
        assert!(matches!(held, Turn::HeldUntil(until) if until > rates.store.now() + 500), "{held:?}");
        assert_eq!(rates.busy_channels(rates.store.now()), vec!["hats".to_owned()], "held back: its jobs wait");
    }

    #[tokio::test]
    async fn a_throttle_pauses_for_its_retry_after_up_to_an_hour_else_a_second() {
        let (rates, _dir) = rates().await;
        let pause_of = |until: i64, now: i64| until - now;
        for (channel, retry_after, expected_ms) in [
            ("shoes", Some(Duration::from_secs(7)), 7_000),
            ("hats", None, DEFAULT_PAUSE_MS),
            ("bags", Some(Duration::from_secs(86_400)), 3_600_000),
        ] {
            let now = rates.store.now();
            let until = rates.throttled(channel, 100, retry_after).await.unwrap();
            let paused = pause_of(until, now);
            assert!((expected_ms..expected_ms + 100).contains(&paused), "{channel}: paused {paused} ms");
            assert_eq!(rates.take(channel, 100).await.unwrap(), Turn::HeldUntil(until), "{channel}");
        }
    }
}
