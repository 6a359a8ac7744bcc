//! A message's first send, recorded ahead with the insert that leased it to its request, so
//! the usual message costs no transaction of its own for its pacing and echo records.

use std::time::Duration;

use crate::store::{BeforeSend, NewOutbound};

/// How long after the insert that leased it a message's first send may leave and still be the
/// one recorded with the insert (see [`FirstSends`]).
pub(super) const FIRST_SEND_SLACK: Duration = Duration::from_millis(250);

/// Records ahead kept at most before the stale ones (of attempts that ended without a finish,
/// their lease lost) are dropped.
pub(super) const FIRST_SENDS_KEPT: usize = 4096;

/// The first send of a message leased with its insert, recorded ahead: pacing as if it took
/// effect by `effective_by`, and its echo mark until `expires_by` (see [`FirstSends`]).
pub(super) struct AheadPlan {
    pub(super) effective_by: i64,
    pub(super) fingerprint: Option<String>,
    pub(super) expires_by: i64,
}

impl AheadPlan {
    pub(super) fn of(job: &NewOutbound, now: i64) -> Self {
        let slack = i64::try_from(FIRST_SEND_SLACK.as_millis()).unwrap_or(0);
        let window = i64::try_from(crate::store::ECHO_WINDOW.as_millis()).unwrap_or(i64::MAX);
        Self {
            effective_by: now.saturating_add(slack),
            fingerprint: job.parts.first().and_then(|part| part.echo_fingerprint()),
            expires_by: now.saturating_add(slack).saturating_add(window),
        }
    }
}

/// What the insert found and wrote for an [`AheadPlan`]: the contact's last effective send
/// before it, and the echo mark's id.
pub(super) struct WrittenAhead {
    pub(super) previous: Option<i64>,
    pub(super) mark: Option<i64>,
}

/// A first send recorded ahead, until its attempt ends.
pub(super) struct FirstSend {
    pub(super) job: i64,
    pub(super) channel: String,
    pub(super) contact: String,
    pub(super) plan: AheadPlan,
    pub(super) written: WrittenAhead,
    pub(super) recorded_at: std::time::Instant,
    /// When the send takes effect, once `before_send` found it the one recorded.
    pub(super) sent: Option<i64>,
}

/// What the finish of an attempt puts right of its first send recorded ahead: the pacing record
/// from the bound written to `value` (when the send took effect, or what it was before for a
/// send that never left) if nobody moved it since, and an echo mark no send will match.
pub(super) struct AheadSettled {
    pub(super) channel: String,
    pub(super) contact: String,
    pub(super) written: i64,
    pub(super) value: Option<i64>,
    pub(super) spare_mark: Option<i64>,
}

impl FirstSend {
    pub(super) fn settled(self) -> AheadSettled {
        let (value, spare_mark) = match self.sent {
            Some(effective_at) => (Some(effective_at), None),
            None => (self.written.previous, self.written.mark),
        };
        AheadSettled {
            channel: self.channel,
            contact: self.contact,
            written: self.plan.effective_by,
            value,
            spare_mark,
        }
    }
}

/// The first sends recorded ahead, by job.
///
/// A `/message` request sends its job's first JoinChat request within milliseconds of the insert
/// that leased it the job, and `before_send` would record that send in a transaction of its own
/// (the contact's pacing and the echo mark). Postgres writes that record with the insert
/// instead, bounded: as if the send took effect [`FIRST_SEND_SLACK`] after the insert. When the
/// send comes within that bound, `before_send` finds it recorded and writes nothing: one
/// transaction less per message. The finish of the attempt puts the record right in the
/// transaction it takes anyway: the pacing record goes back from the bound to when the send took effect, or,
/// for a send that never left (held back by the send rate, paced, its request gone), to what it
/// was before, and that send's echo mark goes. Nobody reads the contact's pacing meanwhile: its
/// next job waits for this one's lease to end. A crash in between leaves the bound, at most
/// [`FIRST_SEND_SLACK`] past the send (the contact's next message may get one second more of
/// `delay`), and for a send that never left an echo mark that an echo of the same text within
/// ten minutes may take, as a send that failed after `before_send` always could.
#[derive(Default)]
pub(super) struct FirstSends(std::sync::Mutex<Vec<FirstSend>>);

/// What `before_send` has to write, given the first sends recorded ahead.
pub(super) enum Ahead {
    /// The send was recorded with its insert: nothing.
    Covered,
    /// The usual record; and the echo mark of a first send recorded ahead that never left, if any.
    Record { spare_mark: Option<i64> },
}

impl FirstSends {
    pub(super) fn add(&self, send: FirstSend) {
        let mut sends = self.0.lock().expect("first sends");
        if sends.len() >= FIRST_SENDS_KEPT {
            sends.retain(|kept| kept.recorded_at.elapsed() < FIRST_SEND_SLACK * 240);
        }
        sends.push(send);
    }

    /// Whether `send` is a first send recorded ahead, which it then marks sent. Any other send to
    /// the same contact (the first one late, or the next part) records itself, and takes the
    /// record ahead out: its pacing record is the later one, and the echo mark of a send that
    /// never left goes with it.
    pub(super) fn before_send(&self, send: &BeforeSend) -> Ahead {
        let mut sends = self.0.lock().expect("first sends");
        let Some(at) = sends.iter().position(|first| first.channel == send.channel && first.contact == send.contact)
        else {
            return Ahead::Record { spare_mark: None };
        };
        let first = &mut sends[at];
        if first.sent.is_none()
            && first.plan.fingerprint == send.echo_fingerprint
            && send.effective_at <= first.plan.effective_by
            && send.echo_expires_at <= first.plan.expires_by
            && first.recorded_at.elapsed() <= FIRST_SEND_SLACK
        {
            first.sent = Some(send.effective_at);
            return Ahead::Covered;
        }
        let first = sends.swap_remove(at);
        Ahead::Record { spare_mark: first.sent.is_none().then_some(first.written.mark).flatten() }
    }

    /// Takes out the first send of job `id` recorded ahead, at the end of its attempt.
    pub(super) fn take(&self, id: i64) -> Option<FirstSend> {
        let mut sends = self.0.lock().expect("first sends");
        let at = sends.iter().position(|first| first.job == id)?;
        Some(sends.swap_remove(at))
    }
}
