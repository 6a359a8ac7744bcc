//! The `contact` block on the first event of a contact BonyChat has not met yet (SPEC §4.3).
//!
//! A look-up happens at most once per contact and is bounded by a short timeout: a failing or
//! slow Graph API sends the event on without the block rather than holding it up. A contact
//! counts as introduced once BonyChat accepted a post for it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clients::ProfileLookup;
use crate::domain::bonychat::ContactProfile;

pub struct Profiles {
    lookup: Arc<dyn ProfileLookup>,
    timeout: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    introduced: HashSet<String>,
    /// Look-up results, failures included (as `None`), so a retried post does not look up again.
    looked_up: HashMap<String, Option<ContactProfile>>,
}

impl Profiles {
    pub fn new(lookup: Arc<dyn ProfileLookup>, timeout: Duration) -> Self {
        Self {
            lookup,
            timeout,
            state: Mutex::default(),
        }
    }

    /// The block for the next post about `contact`: `None` once BonyChat knows the contact, or
    /// when no profile could be had in time.
    pub async fn block_for(&self, contact: &str) -> Option<ContactProfile> {
        {
            let state = self.state.lock().expect("profiles poisoned");
            if state.introduced.contains(contact) {
                return None;
            }
            if let Some(known) = state.looked_up.get(contact) {
                return known.clone();
            }
        }
        let profile = match tokio::time::timeout(self.timeout, self.lookup.profile(contact)).await {
            Ok(Ok(profile)) if !profile.is_empty() => Some(profile),
            Ok(Ok(_)) => None,
            Ok(Err(reason)) => {
                tracing::warn!(contact, %reason, "profile look-up failed; the event goes without it");
                None
            }
            Err(_) => {
                tracing::warn!(
                    contact,
                    timeout_ms = self.timeout.as_millis() as u64,
                    "profile look-up too slow; the event goes without it"
                );
                None
            }
        };
        let mut state = self.state.lock().expect("profiles poisoned");
        state.looked_up.insert(contact.to_owned(), profile.clone());
        profile
    }

    /// BonyChat accepted a post about `contact`: later posts go without the block.
    pub fn introduced(&self, contact: &str) {
        let mut state = self.state.lock().expect("profiles poisoned");
        state.looked_up.remove(contact);
        state.introduced.insert(contact.to_owned());
    }
}
