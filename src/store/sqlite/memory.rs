//! What the one writer holds in memory instead of writing it for every message: each contact's
//! queue and when its head is due, the queued counts the intake caps compare with, the leases
//! and reservations of attempts, the pacing horizon of each contact and the echo marks of the
//! relay's own sends.
//!
//! A SQLite store serves one relay (its lock file says so), so none of this can change behind
//! the writer's back except through another process writing the file (the `jobs` command): the
//! writer then builds the queues again from the jobs table (see `PRAGMA data_version`). Leases
//! and reservations belong to this process only and are lost with it, as a restart already
//! took them over. The pacing horizons and echo marks are saved at a clean stop and rebuilt
//! conservatively from the jobs after a crash (see `super::recovery`).
//!
//! Every change an operation makes is journalled, so that an operation that fails (and is
//! rolled back in the database) or a batch whose commit fails leaves the memory as it was.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::store::{Direction, rules};

/// One contact's queue in one direction: (channel, direction, contact).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct QueueRef {
    pub channel: Arc<str>,
    pub direction: Direction,
    pub contact: Arc<str>,
}

/// When a queued job may be attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Waiting {
    pub next_attempt_at: i64,
    /// Until then only the `/message` request that stored the job may claim it (0: no one).
    pub reserved_until: i64,
}

/// A lease on a queued job.
#[derive(Debug, Clone)]
pub(super) struct Held {
    pub queue: QueueRef,
    pub m_id: Box<str>,
    pub owner: Arc<str>,
    pub token: i64,
    pub until: i64,
}

#[derive(Debug, Default)]
struct Contact {
    /// Queued jobs by id: the first is the head, the only one that may be claimed.
    jobs: BTreeMap<i64, Waiting>,
    /// (job id, lease end) of the leased ones: one in flight per contact, but a redrive can put
    /// an older job ahead of a leased one.
    leased: Vec<(i64, i64)>,
    /// When the head is due, as entered in its lane's `ready`.
    due: Option<i64>,
}

/// One channel's contacts in one direction.
#[derive(Debug, Default)]
struct Lane {
    contacts: HashMap<Arc<str>, Contact>,
    /// (due, contact) of every head: claims take them in this order.
    ready: BTreeSet<(i64, Arc<str>)>,
    /// Queued jobs, leased or not: what the intake cap compares with.
    queued: u64,
}

/// The inverse of one change, applied when its operation is undone.
#[derive(Debug)]
pub(super) enum Undo {
    Unqueue(QueueRef, i64),
    Requeue(QueueRef, i64, Waiting),
    SetWaiting(QueueRef, i64, Waiting),
    Unlease(i64),
    Relet(i64, Held),
    SetUntil(i64, i64),
    NextToken(i64),
    RestoreMark(u128),
}

/// The changes of the operations of a batch not committed yet.
#[derive(Debug, Default)]
pub(super) struct Journal(Vec<Undo>);

impl Journal {
    pub(super) fn mark(&self) -> usize {
        self.0.len()
    }

    pub(super) fn clear(&mut self) {
        self.0.clear();
    }

    pub(super) fn push(&mut self, undo: Undo) {
        self.0.push(undo);
    }
}

/// The queues, counts and leases.
#[derive(Debug, Default)]
pub(super) struct Queues {
    channels: BTreeMap<Arc<str>, [Lane; 2]>,
    leases: HashMap<i64, Held>,
    last_token: i64,
}

impl Queues {
    /// The queue of (`channel`, `direction`, `contact`), sharing the names already held.
    pub(super) fn queue_ref(&self, channel: &str, direction: Direction, contact: &str) -> QueueRef {
        let (channel, lanes) = match self.channels.get_key_value(channel) {
            Some((name, lanes)) => (Arc::clone(name), Some(lanes)),
            None => (Arc::from(channel), None),
        };
        let contact = lanes
            .and_then(|lanes| lanes[direction.index()].contacts.get_key_value(contact))
            .map_or_else(|| Arc::from(contact), |(name, _)| Arc::clone(name));
        QueueRef { channel, direction, contact }
    }

    fn lane_mut(&mut self, queue: &QueueRef) -> &mut Lane {
        let lanes = self.channels.entry(Arc::clone(&queue.channel)).or_default();
        &mut lanes[queue.direction.index()]
    }

    fn lane(&self, channel: &str, direction: Direction) -> Option<&Lane> {
        self.channels.get(channel).map(|lanes| &lanes[direction.index()])
    }

    fn contact(&self, queue: &QueueRef) -> Option<&Contact> {
        self.lane(&queue.channel, queue.direction)?.contacts.get(&queue.contact)
    }

    /// Queued jobs of `channel` in `direction`.
    pub(super) fn queued(&self, channel: &str, direction: Direction) -> u64 {
        self.lane(channel, direction).map_or(0, |lane| lane.queued)
    }

    /// Queued jobs of one contact.
    pub(super) fn queued_for(&self, queue: &QueueRef) -> u64 {
        self.contact(queue).map_or(0, |contact| contact.jobs.len() as u64)
    }

    /// Whether the contact has no queued job: a new one heads its queue.
    pub(super) fn is_empty(&self, queue: &QueueRef) -> bool {
        self.contact(queue).is_none_or(|contact| contact.jobs.is_empty())
    }

    pub(super) fn waiting(&self, queue: &QueueRef, id: i64) -> Option<Waiting> {
        self.contact(queue)?.jobs.get(&id).copied()
    }

    pub(super) fn lease_of(&self, id: i64) -> Option<&Held> {
        self.leases.get(&id)
    }

    /// Whether job `id` heads its queue, is due at `now` and nothing of its contact is leased
    /// past `now`: what a request claiming its own job asks (its reservation is for it).
    pub(super) fn claimable_own(&self, queue: &QueueRef, id: i64, now: i64) -> bool {
        let Some(contact) = self.contact(queue) else { return false };
        contact.jobs.first_key_value().is_some_and(|(&head, waiting)| {
            head == id
                && rules::head_claimable_by_its_request(
                    waiting.next_attempt_at,
                    contact.leased.iter().map(|&(_, until)| until),
                    now,
                )
        })
    }

    /// The heads of `direction` due at `now`, per channel `eligible` accepts, in channel order,
    /// each channel's in due order and `per_channel` at most: (channel, [(job id, queue)]).
    pub(super) fn due_heads(
        &self,
        direction: Direction,
        now: i64,
        per_channel: usize,
        eligible: impl Fn(&str) -> bool,
    ) -> Vec<(String, Vec<(i64, QueueRef)>)> {
        let mut channels = Vec::new();
        for (channel, lanes) in &self.channels {
            let lane = &lanes[direction.index()];
            if lane.ready.is_empty() || !eligible(channel) {
                continue;
            }
            let heads: Vec<(i64, QueueRef)> = lane
                .ready
                .iter()
                .take_while(|(due, _)| *due <= now)
                .take(per_channel)
                .filter_map(|(_, contact)| {
                    let (&id, _) = lane.contacts.get(contact)?.jobs.first_key_value()?;
                    let queue = QueueRef { channel: Arc::clone(channel), direction, contact: Arc::clone(contact) };
                    Some((id, queue))
                })
                .collect();
            if !heads.is_empty() {
                channels.push((channel.to_string(), heads));
            }
        }
        channels
    }

    /// (ready, delayed, in flight) queued jobs per (channel, direction) at `now`.
    /// Per channel and direction with queued jobs: how many are ready, delayed and in flight
    /// at `now`, and the oldest one's id.
    pub(super) fn counts(&self, now: i64) -> Vec<(String, String, [i64; 3], i64)> {
        let mut counts = Vec::new();
        for (channel, lanes) in &self.channels {
            for direction in Direction::ALL {
                let lane = &lanes[direction.index()];
                if lane.queued == 0 {
                    continue;
                }
                let mut count = [0_i64; 3];
                let mut oldest = i64::MAX;
                for contact in lane.contacts.values() {
                    if let Some((&head, _)) = contact.jobs.first_key_value() {
                        oldest = oldest.min(head);
                    }
                    for (id, waiting) in &contact.jobs {
                        let slot = if contact.leased.iter().any(|(leased, _)| leased == id) {
                            2
                        } else if waiting.next_attempt_at <= now {
                            0
                        } else {
                            1
                        };
                        count[slot] += 1;
                    }
                }
                counts.push((channel.to_string(), direction.as_str().to_owned(), count, oldest));
            }
        }
        counts
    }

    pub(super) fn queue(&mut self, queue: &QueueRef, id: i64, waiting: Waiting, journal: &mut Journal) {
        let lane = self.lane_mut(queue);
        let contact = lane.contacts.entry(Arc::clone(&queue.contact)).or_default();
        if contact.jobs.insert(id, waiting).is_none() {
            lane.queued += 1;
        }
        journal.0.push(Undo::Unqueue(queue.clone(), id));
        self.refresh(queue);
    }

    /// Takes job `id` out of its queue (delivered, dead, …); its lease must be gone first.
    pub(super) fn unqueue(&mut self, queue: &QueueRef, id: i64, journal: &mut Journal) {
        let lane = self.lane_mut(queue);
        let Some(contact) = lane.contacts.get_mut(&queue.contact) else { return };
        if let Some(waiting) = contact.jobs.remove(&id) {
            lane.queued -= 1;
            journal.0.push(Undo::Requeue(queue.clone(), id, waiting));
            self.refresh(queue);
        }
    }

    pub(super) fn set_waiting(&mut self, queue: &QueueRef, id: i64, waiting: Waiting, journal: &mut Journal) {
        let lane = self.lane_mut(queue);
        let Some(entry) = lane.contacts.get_mut(&queue.contact).and_then(|contact| contact.jobs.get_mut(&id)) else {
            return;
        };
        let previous = std::mem::replace(entry, waiting);
        journal.0.push(Undo::SetWaiting(queue.clone(), id, previous));
        self.refresh(queue);
    }

    /// Leases job `id`, queued in `queue`, to `owner` until `until`; returns its fencing token.
    pub(super) fn lease(
        &mut self,
        queue: &QueueRef,
        id: i64,
        m_id: &str,
        owner: &Arc<str>,
        until: i64,
        journal: &mut Journal,
    ) -> i64 {
        journal.0.push(Undo::NextToken(self.last_token));
        self.last_token += 1;
        let token = self.last_token;
        if let Some(previous) = self.leases.remove(&id) {
            self.drop_lease(&previous.queue, id);
            journal.0.push(Undo::Relet(id, previous));
        }
        let held = Held { queue: queue.clone(), m_id: m_id.into(), owner: Arc::clone(owner), token, until };
        self.relet(id, held);
        journal.0.push(Undo::Unlease(id));
        token
    }

    fn relet(&mut self, id: i64, held: Held) {
        let queue = held.queue.clone();
        let lane = self.lane_mut(&queue);
        lane.contacts.entry(Arc::clone(&queue.contact)).or_default().leased.push((id, held.until));
        self.leases.insert(id, held);
        self.refresh(&queue);
    }

    fn drop_lease(&mut self, queue: &QueueRef, id: i64) {
        if let Some(contact) = self.lane_mut(queue).contacts.get_mut(&queue.contact) {
            contact.leased.retain(|&(leased, _)| leased != id);
        }
        self.refresh(queue);
    }

    /// Ends the lease on job `id`, if it has one; returns it.
    pub(super) fn unlease(&mut self, id: i64, journal: &mut Journal) -> Option<Held> {
        let held = self.leases.remove(&id)?;
        self.drop_lease(&held.queue, id);
        journal.0.push(Undo::Relet(id, held.clone()));
        Some(held)
    }

    pub(super) fn set_until(&mut self, id: i64, until: i64, journal: &mut Journal) {
        let Some(held) = self.leases.get_mut(&id) else { return };
        let previous = std::mem::replace(&mut held.until, until);
        let queue = held.queue.clone();
        if let Some(contact) = self.lane_mut(&queue).contacts.get_mut(&queue.contact) {
            for entry in contact.leased.iter_mut().filter(|(leased, _)| *leased == id) {
                entry.1 = until;
            }
        }
        journal.0.push(Undo::SetUntil(id, previous));
        self.refresh(&queue);
    }

    /// The ids leased to `owner`.
    pub(super) fn leased_to(&self, owner: &str) -> Vec<i64> {
        self.leases.iter().filter(|(_, held)| &*held.owner == owner).map(|(&id, _)| id).collect()
    }

    /// Puts the contact's entry in `ready` right: its head is due at its next attempt, but not
    /// before its reservation ends, nor while any of its jobs is leased. A contact with nothing
    /// queued or leased is forgotten.
    fn refresh(&mut self, queue: &QueueRef) {
        let lane = self.lane_mut(queue);
        let Some(contact) = lane.contacts.get_mut(&queue.contact) else { return };
        let due = contact.jobs.first_key_value().map(|(_, head)| {
            rules::head_due_at(
                head.next_attempt_at,
                head.reserved_until,
                contact.leased.iter().map(|&(_, until)| until),
            )
        });
        if due != contact.due {
            if let Some(old) = contact.due {
                lane.ready.remove(&(old, Arc::clone(&queue.contact)));
            }
            if let Some(new) = due {
                lane.ready.insert((new, Arc::clone(&queue.contact)));
            }
            contact.due = due;
        }
        if contact.jobs.is_empty() && contact.leased.is_empty() {
            lane.contacts.remove(&queue.contact);
        }
    }

    /// Undoes the changes journalled since `mark`, newest first.
    pub(super) fn undo(&mut self, journal: &mut Journal, mark: usize, recent: &mut Recent) {
        while journal.0.len() > mark {
            let Some(undo) = journal.0.pop() else { break };
            match undo {
                Undo::Unqueue(queue, id) => {
                    let lane = self.lane_mut(&queue);
                    if let Some(contact) = lane.contacts.get_mut(&queue.contact)
                        && contact.jobs.remove(&id).is_some()
                    {
                        lane.queued -= 1;
                    }
                    self.refresh(&queue);
                }
                Undo::Requeue(queue, id, waiting) => {
                    let lane = self.lane_mut(&queue);
                    let contact = lane.contacts.entry(Arc::clone(&queue.contact)).or_default();
                    if contact.jobs.insert(id, waiting).is_none() {
                        lane.queued += 1;
                    }
                    self.refresh(&queue);
                }
                Undo::SetWaiting(queue, id, waiting) => {
                    if let Some(entry) = self
                        .lane_mut(&queue)
                        .contacts
                        .get_mut(&queue.contact)
                        .and_then(|contact| contact.jobs.get_mut(&id))
                    {
                        *entry = waiting;
                    }
                    self.refresh(&queue);
                }
                Undo::Unlease(id) => {
                    if let Some(held) = self.leases.remove(&id) {
                        self.drop_lease(&held.queue, id);
                    }
                }
                Undo::Relet(id, held) => self.relet(id, held),
                Undo::SetUntil(id, until) => {
                    let mut scratch = Journal::default();
                    self.set_until(id, until, &mut scratch);
                }
                Undo::NextToken(token) => self.last_token = token,
                Undo::RestoreMark(digest) => recent.restore_mark(digest),
            }
        }
    }

    /// Queues rebuilt from the queued jobs `(id, channel, direction, contact, next attempt)`,
    /// keeping this process's leases and reservations on the jobs still queued.
    pub(super) fn rebuilt(&self, queued: impl IntoIterator<Item = (i64, String, Direction, String, i64)>) -> Self {
        let mut fresh = Self { last_token: self.last_token, ..Self::default() };
        let mut scratch = Journal::default();
        for (id, channel, direction, contact, next_attempt_at) in queued {
            let queue = fresh.queue_ref(&channel, direction, &contact);
            let reserved_until = self.waiting(&queue, id).map_or(0, |waiting| waiting.reserved_until);
            fresh.queue(&queue, id, Waiting { next_attempt_at, reserved_until }, &mut scratch);
            scratch.clear();
        }
        for (&id, held) in &self.leases {
            if fresh.waiting(&held.queue, id).is_some() {
                let queue = fresh.queue_ref(&held.queue.channel, held.queue.direction, &held.queue.contact);
                fresh.relet(id, Held { queue, ..held.clone() });
            }
        }
        fresh
    }
}

/// Echo marks held at most: each costs some 50 bytes, and Messenger's echoes come within
/// seconds, so a relay sending faster than this many per [`crate::store::ECHO_WINDOW`] only
/// forgets the oldest marks early.
pub(super) const MAX_ECHO_MARKS: usize = 200_000;

/// Horizons held before the first sweep of those that stopped mattering.
const SWEEP_FLOOR: usize = 10_000;

/// Pacing horizons and echo marks (SPEC §3.4, §4.3): written by attempts just before each send
/// (no write to the disk), read by claims and by webhooks.
#[derive(Debug)]
pub(crate) struct Recent {
    /// channel → contact → (when the last send takes effect, when the record stops mattering).
    horizons: HashMap<Box<str>, HashMap<Box<str>, Horizon>>,
    /// How many horizons are held, and at how many the next sweep forgets those past.
    horizons_held: usize,
    sweep_at: usize,
    /// Live marks per digest of (channel, contact, fingerprint).
    marks: HashMap<u128, u32>,
    /// (expiry, digest) in the order the marks were made.
    expiries: VecDeque<(i64, u128)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Horizon {
    pub effective_at: i64,
    pub forget_at: i64,
}

/// What an echo mark is kept by: a digest of its channel, contact and fingerprint, so that a
/// long text costs no more than a short one.
pub(super) fn mark_digest(channel: &str, contact: &str, fingerprint: &str) -> u128 {
    let mut hasher = Sha256::new();
    for part in [channel, contact, fingerprint] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let mut first = [0_u8; 16];
    first.copy_from_slice(&digest[..16]);
    u128::from_le_bytes(first)
}

impl Default for Recent {
    fn default() -> Self {
        Self {
            horizons: HashMap::new(),
            horizons_held: 0,
            sweep_at: SWEEP_FLOOR,
            marks: HashMap::new(),
            expiries: VecDeque::new(),
        }
    }
}

impl Recent {
    pub(super) fn horizon(&self, channel: &str, contact: &str) -> Option<Horizon> {
        self.horizons.get(channel)?.get(contact).copied()
    }

    /// Moves the contact's horizon to `effective_at`, never backwards.
    pub(super) fn raise_horizon(&mut self, channel: &str, contact: &str, horizon: Horizon) {
        let contacts = match self.horizons.get_mut(channel) {
            Some(contacts) => contacts,
            None => self.horizons.entry(channel.into()).or_default(),
        };
        match contacts.get_mut(contact) {
            Some(kept) => {
                kept.effective_at = kept.effective_at.max(horizon.effective_at);
                kept.forget_at = kept.forget_at.max(horizon.forget_at);
            }
            None => {
                contacts.insert(contact.into(), horizon);
                self.horizons_held += 1;
                if self.horizons_held >= self.sweep_at {
                    // Most horizons matter for a second (the default gap): sweeping whenever
                    // their number doubles keeps them within twice the live ones.
                    self.forget_before(crate::store::now_millis());
                    self.sweep_at = self.horizons_held.saturating_mul(2).max(SWEEP_FLOOR);
                }
            }
        }
    }

    pub(super) fn add_mark(&mut self, digest: u128, expires_at: i64) {
        *self.marks.entry(digest).or_default() += 1;
        self.expiries.push_back((expires_at, digest));
        while self.expiries.len() > MAX_ECHO_MARKS {
            self.expire_oldest();
        }
    }

    fn expire_oldest(&mut self) {
        if let Some((_, digest)) = self.expiries.pop_front()
            && let Some(count) = self.marks.get_mut(&digest)
        {
            *count -= 1;
            if *count == 0 {
                self.marks.remove(&digest);
            }
        }
    }

    /// Takes one unexpired mark of `digest` at `now`; whether there was one.
    pub(super) fn take_mark(&mut self, digest: u128, now: i64) -> bool {
        while self.expiries.front().is_some_and(|&(expires_at, _)| expires_at <= now) {
            self.expire_oldest();
        }
        match self.marks.get_mut(&digest) {
            Some(count) => {
                *count -= 1;
                if *count == 0 {
                    self.marks.remove(&digest);
                }
                true
            }
            None => false,
        }
    }

    fn restore_mark(&mut self, digest: u128) {
        *self.marks.entry(digest).or_default() += 1;
    }

    /// Forgets the horizons that no longer matter and the marks expired at `now`.
    pub(super) fn forget_before(&mut self, now: i64) {
        while self.expiries.front().is_some_and(|&(expires_at, _)| expires_at <= now) {
            self.expire_oldest();
        }
        let mut held = 0;
        self.horizons.retain(|_, contacts| {
            contacts.retain(|_, horizon| horizon.forget_at > now);
            held += contacts.len();
            !contacts.is_empty()
        });
        self.horizons_held = held;
    }

    /// Every horizon: (channel, contact, horizon).
    pub(super) fn horizons(&self) -> impl Iterator<Item = (&str, &str, Horizon)> {
        self.horizons.iter().flat_map(|(channel, contacts)| {
            contacts.iter().map(move |(contact, horizon)| (&**channel, &**contact, *horizon))
        })
    }

    /// Every live mark: (digest, expiry), the newest of each digest's expiries kept.
    pub(super) fn marks(&self) -> Vec<(u128, i64)> {
        let mut left = self.marks.clone();
        let mut kept = Vec::new();
        for &(expires_at, digest) in self.expiries.iter().rev() {
            if let Some(count) = left.get_mut(&digest)
                && *count > 0
            {
                *count -= 1;
                kept.push((digest, expires_at));
            }
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(at: i64) -> Waiting {
        Waiting { next_attempt_at: at, reserved_until: 0 }
    }

    fn heads(queues: &Queues, now: i64) -> Vec<(String, Vec<i64>)> {
        queues
            .due_heads(Direction::Outbound, now, 10, |_| true)
            .into_iter()
            .map(|(channel, heads)| (channel, heads.into_iter().map(|(id, _)| id).collect()))
            .collect()
    }

    #[test]
    fn only_each_contacts_oldest_job_is_due_and_a_lease_holds_its_contact() {
        let mut queues = Queues::default();
        let mut journal = Journal::default();
        let (a, b) =
            (queues.queue_ref("shop", Direction::Outbound, "a"), queues.queue_ref("shop", Direction::Outbound, "b"));
        queues.queue(&a, 1, waiting(100), &mut journal);
        queues.queue(&a, 2, waiting(100), &mut journal);
        queues.queue(&b, 3, waiting(300), &mut journal);

        assert_eq!(heads(&queues, 200), [("shop".to_owned(), vec![1])]);
        assert_eq!(heads(&queues, 300), [("shop".to_owned(), vec![1, 3])], "in due order");
        assert_eq!(queues.queued("shop", Direction::Outbound), 3);

        let owner: Arc<str> = Arc::from("worker");
        let token = queues.lease(&a, 1, "m1", &owner, 1_000, &mut journal);
        assert_eq!(heads(&queues, 999), [("shop".to_owned(), vec![3])], "a waits for its lease");
        assert_eq!(heads(&queues, 1_000), [("shop".to_owned(), vec![3, 1])], "an ended lease frees a, due since");
        assert_eq!(queues.lease_of(1).map(|held| held.token), Some(token));

        queues.unlease(1, &mut journal);
        queues.unqueue(&a, 1, &mut journal);
        assert_eq!(heads(&queues, 300), [("shop".to_owned(), vec![2, 3])]);
        assert_eq!(queues.queued("shop", Direction::Outbound), 2);
    }

    #[test]
    fn undoing_an_operation_puts_every_queue_count_and_lease_back() {
        let mut queues = Queues::default();
        let mut recent = Recent::default();
        let mut journal = Journal::default();
        let owner: Arc<str> = Arc::from("worker");
        let a = queues.queue_ref("shop", Direction::Outbound, "a");
        queues.queue(&a, 1, waiting(100), &mut journal);
        queues.lease(&a, 1, "m1", &owner, 1_000, &mut journal);
        journal.clear();
        let before = (heads(&queues, 5_000), queues.queued("shop", Direction::Outbound), queues.lease_of(1).cloned());

        let mark = journal.mark();
        let b = queues.queue_ref("shop", Direction::Outbound, "b");
        queues.queue(&b, 2, waiting(100), &mut journal);
        queues.unlease(1, &mut journal);
        queues.unqueue(&a, 1, &mut journal);
        queues.lease(&b, 2, "m2", &owner, 2_000, &mut journal);
        queues.undo(&mut journal, mark, &mut recent);

        let after = (heads(&queues, 5_000), queues.queued("shop", Direction::Outbound), queues.lease_of(1).cloned());
        assert_eq!((&after.0, after.1), (&before.0, before.1));
        assert_eq!(after.2.map(|held| held.token), before.2.map(|held| held.token));
        assert!(queues.lease_of(2).is_none());
        let token = queues.lease(&a, 1, "m1", &owner, 3_000, &mut journal);
        assert_eq!(token, 2, "the tokens handed out by the undone operation are handed out again");
    }

    #[test]
    fn rebuilt_queues_keep_the_leases_of_jobs_still_queued() {
        let mut queues = Queues::default();
        let mut journal = Journal::default();
        let owner: Arc<str> = Arc::from("worker");
        let a = queues.queue_ref("shop", Direction::Outbound, "a");
        queues.queue(&a, 1, waiting(100), &mut journal);
        queues.queue(&a, 2, waiting(100), &mut journal);
        let token = queues.lease(&a, 1, "m1", &owner, 1_000, &mut journal);

        // Another process delivered nothing but redrove job 0, older than both.
        let rebuilt = queues.rebuilt([
            (0, "shop".to_owned(), Direction::Outbound, "a".to_owned(), 50),
            (1, "shop".to_owned(), Direction::Outbound, "a".to_owned(), 100),
            (2, "shop".to_owned(), Direction::Outbound, "a".to_owned(), 100),
        ]);

        assert_eq!(rebuilt.lease_of(1).map(|held| held.token), Some(token));
        assert_eq!(heads(&rebuilt, 999), Vec::<(String, Vec<i64>)>::new(), "job 0 waits for the lease on 1");
        assert_eq!(heads(&rebuilt, 1_000), [("shop".to_owned(), vec![0])]);
        assert_eq!(rebuilt.queued("shop", Direction::Outbound), 3);
    }

    #[test]
    fn an_echo_mark_matches_once_until_it_expires() {
        let mut recent = Recent::default();
        let digest = mark_digest("shop", "u", "Hello");
        recent.add_mark(digest, 2_000);
        recent.add_mark(digest, 2_500);

        assert!(recent.take_mark(digest, 1_000));
        assert!(!recent.take_mark(mark_digest("shop", "u", "Hello!"), 1_000), "another text");
        assert!(!recent.take_mark(mark_digest("hats", "u", "Hello"), 1_000), "another channel");
        assert!(!recent.take_mark(digest, 2_000), "the second one went with the first's expiry");
    }

    #[test]
    fn echo_marks_past_the_cap_forget_the_oldest_first() {
        let mut recent = Recent::default();
        for i in 0..=MAX_ECHO_MARKS {
            recent.add_mark(mark_digest("shop", &i.to_string(), "Hello"), 10_000);
        }

        assert!(!recent.take_mark(mark_digest("shop", "0", "Hello"), 1_000));
        assert!(recent.take_mark(mark_digest("shop", "1", "Hello"), 1_000));
        assert_eq!(recent.marks().len(), MAX_ECHO_MARKS - 1);
    }

    #[test]
    fn horizons_only_move_forward_and_are_swept_once_they_stop_mattering() {
        let mut recent = Recent::default();
        recent.raise_horizon("shop", "a", Horizon { effective_at: 5_000, forget_at: 6_000 });
        recent.raise_horizon("shop", "a", Horizon { effective_at: 4_000, forget_at: 5_000 });
        assert_eq!(recent.horizon("shop", "a"), Some(Horizon { effective_at: 5_000, forget_at: 6_000 }));

        let now = crate::store::now_millis();
        for i in 0..SWEEP_FLOOR {
            recent.raise_horizon("shop", &format!("old{i}"), Horizon { effective_at: 1, forget_at: 2 });
        }
        recent.raise_horizon("shop", "live", Horizon { effective_at: now, forget_at: now + 60_000 });

        assert_eq!(recent.horizon("shop", "old1"), None, "swept when their number reached the floor");
        assert!(recent.horizon("shop", "live").is_some());
    }
}
