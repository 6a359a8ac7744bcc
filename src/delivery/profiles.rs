//! Contact profiles for the `contact` block of a new contact's first event (SPEC §4.3).
//!
//! A look-up is bounded by a short timeout: a failing or slow Graph API sends the event on
//! without the block rather than holding it up. Results, failures included, are cached, so a
//! retried post does not look up again. Whether BonyChat already knows a contact is kept in
//! the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clients::{LookupError, ProfileLookup};
use crate::domain::bonychat::ContactProfile;

/// Enough for every contact active in a day; a full cache is simply emptied.
const CACHE_MAX: usize = 50_000;

pub struct Profiles {
    lookup: Arc<dyn ProfileLookup>,
    timeout: Duration,
    cache: Mutex<HashMap<String, Option<ContactProfile>>>,
}

impl Profiles {
    pub fn new(lookup: Arc<dyn ProfileLookup>, timeout: Duration) -> Self {
        Self { lookup, timeout, cache: Mutex::default() }
    }

    /// The profile of `contact`, or `None` when none could be had in time.
    pub async fn profile(&self, contact: &str) -> Option<ContactProfile> {
        if let Some(known) = self.cache.lock().expect("profiles poisoned").get(contact) {
            return known.clone();
        }
        let profile = match tokio::time::timeout(self.timeout, self.lookup.profile(contact)).await {
            Ok(Ok(profile)) if !profile.is_empty() => Some(profile),
            Ok(Ok(_)) => None,
            Ok(Err(LookupError { url, status, reason })) => {
                tracing::warn!(
                    contact,
                    upstream = "Graph API",
                    url,
                    status,
                    reason,
                    "profile look-up failed; the event goes without it"
                );
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
        let mut cache = self.cache.lock().expect("profiles poisoned");
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(contact.to_owned(), profile.clone());
        profile
    }
}
