//! Recognising the echoes of the relay's own sends (SPEC §4.3).
//!
//! Messenger echoes every message the Page sends, including the ones this relay sent through
//! JoinChat on BonyChat's behalf. BonyChat already shows those, so their echoes are dropped;
//! echoes of messages typed in the Page inbox or sent by JoinChat flows are forwarded. A send
//! is recorded as contact + content fingerprint for ten minutes, and each echo consumes at most
//! one record, so sending the same text twice lets exactly two echoes through the filter.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub const ECHO_WINDOW: Duration = Duration::from_secs(600);

pub struct EchoLedger {
    window: Duration,
    sent: Mutex<VecDeque<Sent>>,
}

struct Sent {
    at: Instant,
    contact: String,
    fingerprint: String,
}

impl Default for EchoLedger {
    fn default() -> Self {
        Self::new(ECHO_WINDOW)
    }
}

impl EchoLedger {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            sent: Mutex::default(),
        }
    }

    /// Notes a send before it goes out: its echo can arrive before JoinChat's answer does.
    pub fn record(&self, contact: &str, fingerprint: String) {
        let mut sent = self.lock_pruned();
        sent.push_back(Sent {
            at: Instant::now(),
            contact: contact.to_owned(),
            fingerprint,
        });
    }

    /// Takes back a record for a send JoinChat refused: it will never echo.
    pub fn forget(&self, contact: &str, fingerprint: &str) {
        let mut sent = self.lock_pruned();
        if let Some(index) = sent
            .iter()
            .rposition(|s| s.contact == contact && s.fingerprint == fingerprint)
        {
            sent.remove(index);
        }
    }

    /// Whether an echo to `contact` with this fingerprint is one of ours; consumes the record.
    pub fn take_match(&self, contact: &str, fingerprint: &str) -> bool {
        let mut sent = self.lock_pruned();
        match sent
            .iter()
            .position(|s| s.contact == contact && s.fingerprint == fingerprint)
        {
            Some(index) => {
                sent.remove(index);
                true
            }
            None => false,
        }
    }

    fn lock_pruned(&self) -> std::sync::MutexGuard<'_, VecDeque<Sent>> {
        let mut sent = self.sent.lock().expect("echo ledger poisoned");
        let now = Instant::now();
        while sent
            .front()
            .is_some_and(|s| now.duration_since(s.at) > self.window)
        {
            sent.pop_front();
        }
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_matches_one_send_to_the_same_contact() {
        let ledger = EchoLedger::default();
        ledger.record("42", "Hello".into());
        ledger.record("42", "Hello".into());
        assert!(!ledger.take_match("43", "Hello"), "another contact");
        assert!(!ledger.take_match("42", "Hello there"), "other content");
        assert!(ledger.take_match("42", "Hello"));
        assert!(ledger.take_match("42", "Hello"));
        assert!(!ledger.take_match("42", "Hello"), "two sends, two echoes");
    }

    #[test]
    fn a_refused_send_is_forgotten() {
        let ledger = EchoLedger::default();
        ledger.record("42", "Hello".into());
        ledger.forget("42", "Hello");
        assert!(!ledger.take_match("42", "Hello"));
    }

    #[tokio::test(start_paused = true)]
    async fn records_expire_after_the_window() {
        let ledger = EchoLedger::new(Duration::from_secs(600));
        ledger.record("42", "Hello".into());
        tokio::time::advance(Duration::from_secs(601)).await;
        assert!(!ledger.take_match("42", "Hello"));
    }
}
