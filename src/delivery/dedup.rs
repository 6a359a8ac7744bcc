//! Ids of inbound events already handled, so that Meta's redeliveries are not forwarded twice.
//!
//! Held in memory for a bounded time and count: Meta redelivers within minutes to hours.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct RecentIds {
    ttl: Duration,
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    ids: HashSet<String>,
    order: VecDeque<(Instant, String)>,
}

impl RecentIds {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity,
            state: Mutex::default(),
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.state
            .lock()
            .expect("dedup set poisoned")
            .ids
            .contains(id)
    }

    pub fn insert(&self, id: &str) {
        let mut state = self.state.lock().expect("dedup set poisoned");
        let now = Instant::now();
        while let Some((at, _)) = state.order.front() {
            let expired = now.duration_since(*at) > self.ttl;
            if !expired && state.order.len() < self.capacity {
                break;
            }
            let (_, oldest) = state.order.pop_front().expect("front exists");
            state.ids.remove(&oldest);
        }
        if state.ids.insert(id.to_owned()) {
            state.order.push_back((now, id.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_remembered_up_to_the_capacity() {
        let ids = RecentIds::new(Duration::from_secs(60), 2);
        ids.insert("a");
        ids.insert("b");
        assert!(ids.contains("a") && ids.contains("b"));
        ids.insert("c");
        assert!(!ids.contains("a"), "the oldest goes first");
        assert!(ids.contains("b") && ids.contains("c"));
    }

    #[tokio::test(start_paused = true)]
    async fn ids_are_forgotten_after_their_time() {
        let ids = RecentIds::new(Duration::from_secs(60), 100);
        ids.insert("a");
        tokio::time::advance(Duration::from_secs(61)).await;
        ids.insert("b");
        assert!(!ids.contains("a"));
        assert!(ids.contains("b"));
    }
}
