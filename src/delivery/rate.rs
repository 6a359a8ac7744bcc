//! Each channel's JoinChat send rate, as the attempts see it (SPEC §5).
//!
//! Every request to JoinChat takes a send from its channel's bucket in the store
//! ([`Store::send_rate`]), which every replica shares. To keep the store off the path of each
//! send, a replica takes sends in small batches (a twentieth of a second's worth) and hands
//! them out locally; a batch left unused for [`BATCH_LIFETIME`] is dropped, so no replica
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
        rate.waiting.fetch_add(1, Ordering::SeqCst);
        let turn = self.take_in_turn(&rate, channel, max_per_sec, deadline).await;
        rate.waiting.fetch_sub(1, Ordering::SeqCst);
        turn
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

impl ChannelRate {
    fn current(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }

    fn learn(&self, channel: &str, grant: &Grant) {
        self.rate.store(grant.rate.to_bits(), Ordering::Relaxed);
        self.held_until.store(if grant.granted > 0 { 0 } else { grant.next_at }, Ordering::SeqCst);
        crate::monitoring::send_rate(channel, grant.rate);
    }
}
