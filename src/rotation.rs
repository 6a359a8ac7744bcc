//! Secrets with two live values (SPEC §1, "Rotation"): the counter that tells the operator
//! which value is still in use, and the value an upstream is sent first.
//!
//! Checks (the BonyChat token on `/message`, the Messenger signature and verify token, the admin
//! token) accept either value; see [`crate::auth`] and [`crate::signing`]. What the relay sends
//! (the JoinChat signature, the Bearer token on BonyChat posts, the Graph API token) goes with
//! one value, and once more with the other when the upstream refuses it (401 or 403, or
//! Graph's error code 190); whichever value was accepted goes first from then on. The
//! preference lives in the channel's clients, which a reload rebuilds: after `SIGHUP` the
//! current value goes first again.

use std::sync::atomic::{AtomicBool, Ordering};

use reqwest::StatusCode;

use crate::config::{Rotating, Secret, SecretValue};

/// A secret of SPEC §1 that can rotate: the `secret` label of the rotation counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretName {
    BonyChatApiToken,
    JoinChatApiSecret,
    MessengerAppSecret,
    MessengerVerifyToken,
    MessengerPageAccessToken,
    AdminToken,
}

impl SecretName {
    pub fn label(self) -> &'static str {
        match self {
            Self::BonyChatApiToken => "bonychat_api_token",
            Self::JoinChatApiSecret => "joinchat_api_secret",
            Self::MessengerAppSecret => "messenger_app_secret",
            Self::MessengerVerifyToken => "messenger_verify_token",
            Self::MessengerPageAccessToken => "messenger_page_access_token",
            Self::AdminToken => "admin_token",
        }
    }
}

/// The owner of the admin token in the counter's `owner` label (channel secrets are owned by
/// their channel, app secrets by their app).
pub const RELAY_OWNER: &str = "relay";

/// Whose secret a use is counted for: one series per (secret, owner, value).
#[derive(Debug, Clone)]
pub struct SecretUse {
    secret: SecretName,
    owner: String,
    /// The series of the current value, looked up at its first use rather than at every one:
    /// with a thousand channels, a lookup among their series cost more than the rest of the
    /// count. The previous value's series stay unresolved until a rotation uses them.
    current: std::sync::OnceLock<metrics::Counter>,
}

impl SecretUse {
    pub fn new(secret: SecretName, owner: impl Into<String>) -> Self {
        Self { secret, owner: owner.into(), current: std::sync::OnceLock::new() }
    }

    /// `value` matched a check, or an upstream accepted it.
    pub fn record(&self, value: SecretValue) {
        match value {
            SecretValue::Current => self
                .current
                .get_or_init(|| crate::monitoring::secret_counter(self.secret.label(), &self.owner, false))
                .increment(1),
            SecretValue::Previous => crate::monitoring::secret_used(self.secret.label(), &self.owner, true),
        }
    }

    /// Makes the counter's series of a rotation under way exist at zero, so that "the previous
    /// value was not needed since the last reload" reads as 0 rather than as no data.
    pub fn rotation_configured(&self, secret: &Rotating) {
        if secret.previous.is_some() {
            crate::monitoring::secret_rotation_configured(self.secret.label(), &self.owner);
        }
    }
}

/// A secret the relay sends to an upstream, with the value to send first.
pub struct Outgoing {
    secret: Rotating,
    /// Whether the previous value goes first: set when the upstream refused the current one and
    /// took the previous one (an upstream not switched yet), cleared when it goes the other way.
    prefer_previous: AtomicBool,
    /// Whether the upstream has taken one of the values since this client was built.
    taken: AtomicBool,
    usage: SecretUse,
    /// The upstream's name, for the log line of a switch.
    upstream: &'static str,
}

impl Outgoing {
    pub fn new(secret: Rotating, usage: SecretUse, upstream: &'static str) -> Self {
        usage.rotation_configured(&secret);
        Self { secret, prefer_previous: AtomicBool::new(false), taken: AtomicBool::new(false), usage, upstream }
    }

    /// The value to send first: the current one, unless the upstream last took the previous one.
    pub fn preferred(&self) -> (SecretValue, &Secret) {
        match &self.secret.previous {
            Some(previous) if self.prefer_previous.load(Ordering::Relaxed) => (SecretValue::Previous, previous),
            _ => (SecretValue::Current, &self.secret.current),
        }
    }

    /// The value to send after `refused` was refused, when the secret has another one.
    pub fn other(&self, refused: SecretValue) -> Option<(SecretValue, &Secret)> {
        let other = refused.other();
        self.secret.value(other).map(|secret| (other, secret))
    }

    /// The upstream accepted `value`: counted, and sent first from now on.
    pub fn accepted(&self, value: SecretValue) {
        self.usage.record(value);
        self.taken.store(true, Ordering::Relaxed);
        let previous = value == SecretValue::Previous;
        if self.prefer_previous.swap(previous, Ordering::Relaxed) != previous {
            let (refused, taken) = (value.other().as_str(), value.as_str());
            tracing::info!(
                secret = self.usage.secret.label(),
                owner = %self.usage.owner,
                "{} refused the {refused} value and accepted the {taken} one: the {taken} value goes first from \
                 now on (until the next reload)",
                self.upstream,
            );
        }
    }

    /// Whether the upstream has taken one of these values since the last reload: a refusal of
    /// every value then means the upstream's value changed under the relay (see
    /// [`unknown_credential`](crate::clients::http::unknown_credential)), not that the relay's was wrong from the start.
    pub fn was_taken(&self) -> bool {
        self.taken.load(Ordering::Relaxed)
    }

    /// Sends with the value that goes first and, when the answer says the upstream refused it
    /// (`refused`) and the secret has another value, once more with that one. The value of the
    /// answer returned is counted, and preferred from then on, when `accepted` says the
    /// upstream took it.
    pub async fn send<T, E, Fut>(
        &self,
        mut send: impl FnMut(&Secret) -> Fut,
        refused: impl Fn(&T) -> bool,
        accepted: impl Fn(&T) -> bool,
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let (first, secret) = self.preferred();
        let answer = send(secret).await?;
        let (value, answer) = match self.other(first) {
            // The refused answer is let go (and its connection with it) before the second request.
            Some((other, secret)) if refused(&answer) => {
                drop(answer);
                (other, send(secret).await?)
            }
            _ => (first, answer),
        };
        if accepted(&answer) {
            self.accepted(value);
        }
        Ok(answer)
    }
}

/// Whether an upstream's status says it refused the credential: try the other value.
pub fn credential_refused(status: StatusCode) -> bool {
    matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
}

/// Whether an upstream's status says it took the credential: a success, or a refusal of the
/// request itself (a 4xx other than 401, 403, 408 and 429). A 5xx, a timeout or a throttle says
/// nothing about the credential.
pub fn credential_accepted(status: StatusCode) -> bool {
    status.is_success()
        || (status.is_client_error()
            && !matches!(
                status,
                StatusCode::UNAUTHORIZED
                    | StatusCode::FORBIDDEN
                    | StatusCode::REQUEST_TIMEOUT
                    | StatusCode::TOO_MANY_REQUESTS
            ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(previous: Option<&str>) -> Outgoing {
        Outgoing::new(
            Rotating::with_previous(Secret::new("new"), previous.map(Secret::new)),
            SecretUse::new(SecretName::JoinChatApiSecret, "test"),
            "Upstream",
        )
    }

    /// An upstream that takes only `accepts`, answering with the status it would send.
    fn answer_of(accepts: &str, secret: &Secret) -> std::future::Ready<Result<StatusCode, ()>> {
        std::future::ready(Ok(if secret.expose() == accepts { StatusCode::OK } else { StatusCode::UNAUTHORIZED }))
    }

    #[tokio::test]
    async fn an_upstream_not_switched_yet_gets_the_previous_value_and_keeps_getting_it_first() {
        let credential = outgoing(Some("old"));
        let sent = std::sync::Mutex::new(Vec::new());
        let send = |accepts: &'static str| {
            let sent = &sent;
            move |secret: &Secret| {
                sent.lock().unwrap().push(secret.expose().to_owned());
                answer_of(accepts, secret)
            }
        };
        let refused = |status: &StatusCode| credential_refused(*status);
        let accepted = |status: &StatusCode| credential_accepted(*status);

        assert_eq!(credential.send(send("old"), refused, accepted).await, Ok(StatusCode::OK));
        assert_eq!(credential.send(send("old"), refused, accepted).await, Ok(StatusCode::OK));
        assert_eq!(*sent.lock().unwrap(), ["new", "old", "old"], "the previous value goes first once it worked");

        sent.lock().unwrap().clear();
        assert_eq!(credential.send(send("new"), refused, accepted).await, Ok(StatusCode::OK));
        assert_eq!(credential.send(send("new"), refused, accepted).await, Ok(StatusCode::OK));
        assert_eq!(*sent.lock().unwrap(), ["old", "new", "new"], "and the current one once the upstream switched");

        sent.lock().unwrap().clear();
        assert_eq!(credential.send(send("neither"), refused, accepted).await, Ok(StatusCode::UNAUTHORIZED));
        assert_eq!(*sent.lock().unwrap(), ["new", "old"], "one more try, not a loop");
        assert_eq!(credential.preferred().0, SecretValue::Current, "a refusal of both changes nothing");
        assert!(credential.was_taken(), "the upstream took a value before");
    }

    #[tokio::test]
    async fn without_a_previous_value_a_refusal_is_the_answer() {
        let credential = outgoing(None);
        let sends = std::sync::atomic::AtomicUsize::new(0);
        let answer = credential
            .send(
                |secret: &Secret| {
                    sends.fetch_add(1, Ordering::Relaxed);
                    answer_of("other", secret)
                },
                |status| credential_refused(*status),
                |status| credential_accepted(*status),
            )
            .await;
        assert_eq!(answer, Ok(StatusCode::UNAUTHORIZED));
        assert_eq!(sends.load(Ordering::Relaxed), 1);
        assert!(!credential.was_taken(), "never taken: a wrong credential, not a rotated one");
    }

    #[test]
    fn only_answers_about_the_credential_move_the_preference() {
        for status in [200, 202, 400, 404, 422] {
            assert!(credential_accepted(StatusCode::from_u16(status).unwrap()), "{status}");
        }
        for status in [401, 403, 408, 429, 500, 503, 301] {
            assert!(!credential_accepted(StatusCode::from_u16(status).unwrap()), "{status}");
        }
        assert!(credential_refused(StatusCode::UNAUTHORIZED) && credential_refused(StatusCode::FORBIDDEN));
        assert!(!credential_refused(StatusCode::BAD_REQUEST));
    }
}
