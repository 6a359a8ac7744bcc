//! One job in flight per contact and direction: a fair async mutex per contact.
//!
//! tokio's mutex grants the lock in the order it was asked for, so jobs for one contact run
//! in arrival order. Entries go away with their last user, so the map holds only contacts
//! with work in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// One fair async mutex per contact with a message in flight; entries go away with their last user.
#[derive(Default)]
pub struct ContactLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub struct ContactTurn<'a> {
    guard: Option<OwnedMutexGuard<()>>,
    locks: &'a ContactLocks,
    contact: String,
}

impl ContactLocks {
    pub async fn lock(&self, contact: &str) -> ContactTurn<'_> {
        let lock = {
            let mut locks = self.locks.lock().expect("contact locks poisoned");
            Arc::clone(locks.entry(contact.to_owned()).or_default())
        };
        ContactTurn {
            guard: Some(lock.lock_owned().await),
            locks: self,
            contact: contact.to_owned(),
        }
    }
}

impl Drop for ContactTurn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.locks.locks.lock().expect("contact locks poisoned");
        // Only the map still holds it: nobody is waiting, so the entry can go.
        if locks
            .get(&self.contact)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            locks.remove(&self.contact);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn contact_locks_serialize_one_contact_and_clean_up_after_themselves() {
        let locks = ContactLocks::default();
        let first = locks.lock("a").await;
        let other = locks.lock("b").await;
        let waiting = tokio::time::timeout(Duration::from_millis(50), locks.lock("a")).await;
        assert!(
            waiting.is_err(),
            "a second turn for the same contact must wait"
        );
        drop(first);
        let second = locks.lock("a").await;
        drop((second, other));
        assert!(locks.locks.lock().unwrap().is_empty());
    }
}
