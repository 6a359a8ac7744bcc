//! Who may use the console: a session cookie signed with a key only the admin token's holder can
//! make, a CSRF token per session on every form, and sign-ins slowed down after failures.
//!
//! The session is the cookie alone (`expiry.nonce.mac`), so every replica of a shared store takes
//! it and nothing is stored for it; the key derives from the current `RELAY_ADMIN_TOKEN`, so a
//! rotation of the token signs every operator out. Signing out revokes the session in this
//! process (a short list until the cookie would have expired anyway) and clears the cookie.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::auth::BearerToken;

/// The session cookie; scoped to the console's paths.
pub const SESSION_COOKIE: &str = "relay_console";
/// The sign-in form's own CSRF secret, set with the form (no session exists yet).
pub const SIGN_IN_COOKIE: &str = "relay_console_sign_in";
/// How long a session lasts from sign-in: a working day.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// Failed sign-ins let through at full speed; each one after waits twice as long as the last.
const FREE_FAILURES: u32 = 5;
const LONGEST_WAIT: Duration = Duration::from_secs(60);
/// Failures older than this are forgotten.
const FAILURE_MEMORY: Duration = Duration::from_secs(15 * 60);
/// Signed-out sessions remembered at most; past it the oldest are forgotten first (a cookie
/// whose holder signed out is gone from the browser anyway).
const REVOKED_KEPT: usize = 10_000;

/// A signed-in operator's session.
pub struct Session {
    nonce: String,
    key: [u8; 32],
}

impl Session {
    /// The token every form of this session carries.
    pub fn csrf(&self) -> String {
        URL_SAFE_NO_PAD.encode(mac(&self.key, &["csrf", &self.nonce]))
    }

    /// Whether `presented` is this session's CSRF token (constant time).
    pub fn accepts(&self, presented: &str) -> bool {
        bool::from(presented.as_bytes().ct_eq(self.csrf().as_bytes()))
    }
}

/// The console's process-wide guard: signed-out sessions and failed sign-ins.
#[derive(Default)]
pub struct Sessions {
    revoked: Mutex<HashMap<String, i64>>,
    failures: Mutex<Failures>,
}

#[derive(Default)]
struct Failures {
    count: u32,
    last_at: i64,
}

impl Sessions {
    /// A new session for an operator who just presented the token: its cookie's value.
    pub fn issue(&self, token: &BearerToken, now: i64) -> String {
        let expires_at = now + millis(SESSION_LIFETIME);
        let nonce = random_nonce();
        let signed = mac(&key(token), &["session", &expires_at.to_string(), &nonce]);
        format!("{expires_at}.{nonce}.{}", URL_SAFE_NO_PAD.encode(signed))
    }

    /// The session the request's cookie holds, if it is one of ours, unexpired, not signed out.
    pub fn session(&self, token: &BearerToken, headers: &HeaderMap, now: i64) -> Option<Session> {
        let value = cookie(headers, SESSION_COOKIE)?;
        let mut parts = value.splitn(3, '.');
        let (expires, nonce, signature) = (parts.next()?, parts.next()?, parts.next()?);
        let expires_at: i64 = expires.parse().ok()?;
        let key = key(token);
        let expected = mac(&key, &["session", expires, nonce]);
        let presented = URL_SAFE_NO_PAD.decode(signature).ok()?;
        if !bool::from(presented.ct_eq(&expected)) || expires_at <= now {
            return None;
        }
        if self.revoked.lock().expect("revoked sessions").contains_key(nonce) {
            return None;
        }
        Some(Session { nonce: nonce.to_owned(), key })
    }

    /// Ends `session` here for good (until it would have expired).
    pub fn revoke(&self, session: &Session, now: i64) {
        let mut revoked = self.revoked.lock().expect("revoked sessions");
        revoked.retain(|_, until| *until > now);
        if revoked.len() >= REVOKED_KEPT
            && let Some(oldest) = revoked.iter().min_by_key(|(_, until)| **until).map(|(nonce, _)| nonce.clone())
        {
            revoked.remove(&oldest);
        }
        revoked.insert(session.nonce.clone(), now + millis(SESSION_LIFETIME));
    }

    /// How long a sign-in must still wait after the failures before it, if at all.
    pub fn sign_in_wait(&self, now: i64) -> Option<Duration> {
        let failures = self.failures.lock().expect("sign-in failures");
        if failures.count < FREE_FAILURES || now - failures.last_at > millis(FAILURE_MEMORY) {
            return None;
        }
        let wait = Duration::from_secs(1 << (failures.count - FREE_FAILURES).min(6)).min(LONGEST_WAIT);
        let ready_at = failures.last_at + millis(wait);
        (ready_at > now).then(|| Duration::from_millis(u64::try_from(ready_at - now).unwrap_or(0)))
    }

    pub fn sign_in_failed(&self, now: i64) {
        let mut failures = self.failures.lock().expect("sign-in failures");
        if now - failures.last_at > millis(FAILURE_MEMORY) {
            failures.count = 0;
        }
        failures.count = failures.count.saturating_add(1);
        failures.last_at = now;
    }

    pub fn sign_in_succeeded(&self) {
        *self.failures.lock().expect("sign-in failures") = Failures::default();
    }
}

/// The sign-in form's CSRF token for the nonce in its cookie: only this relay can make it, and
/// only a page that read the cookie's nonce (the relay's own form) can send it.
pub fn sign_in_csrf(token: &BearerToken, nonce: &str) -> String {
    URL_SAFE_NO_PAD.encode(mac(&key(token), &["sign-in", nonce]))
}

pub fn sign_in_csrf_accepted(token: &BearerToken, headers: &HeaderMap, presented: &str) -> bool {
    let Some(nonce) = cookie(headers, SIGN_IN_COOKIE) else { return false };
    bool::from(presented.as_bytes().ct_eq(sign_in_csrf(token, nonce).as_bytes()))
}

pub fn random_nonce() -> String {
    URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes())
}

/// A `Set-Cookie` value for the console: `HttpOnly`, `SameSite=Strict`, on `/admin/` only,
/// `Secure` when the request came over TLS; `max_age` 0 deletes it.
pub fn set_cookie(name: &str, value: &str, max_age: Duration, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let cookie =
        format!("{name}={value}; Path=/admin/; HttpOnly; SameSite=Strict; Max-Age={}{secure}", max_age.as_secs());
    HeaderValue::from_str(&cookie).expect("cookie values are base64 and digits")
}

/// Whether the browser reached the relay over TLS (through a proxy that says so): the cookie is
/// then `Secure`. Believing a client that claims it costs nothing: its own cookie would only be
/// withheld from plain HTTP.
pub fn behind_tls(headers: &HeaderMap) -> bool {
    let says_https = |name: header::HeaderName, pattern: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(|value| value.to_ascii_lowercase().replace(' ', "").contains(pattern))
    };
    says_https(header::HeaderName::from_static("x-forwarded-proto"), "https")
        || says_https(header::FORWARDED, "proto=https")
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

fn key(token: &BearerToken) -> [u8; 32] {
    token.derived_key("bonychat-relay console sessions v1")
}

fn mac(key: &[u8; 32], parts: &[&str]) -> [u8; 32] {
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
    for part in parts {
        // Length-prefixed, so that no two lists of parts sign the same bytes.
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part.as_bytes());
    }
    mac.finalize().into_bytes().into()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Rotating, Secret};

    fn token(value: &str) -> BearerToken {
        BearerToken::new(&Rotating::new(Secret::new(value)), None)
    }

    fn with_cookie(name: &str, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(&format!("other=1; {name}={value}")).unwrap());
        headers
    }

    #[test]
    fn a_session_holds_until_it_expires_is_signed_out_or_the_token_changes() {
        let (sessions, admin) = (Sessions::default(), token("admin-token-1"));
        let cookie = sessions.issue(&admin, 1_000);
        let headers = with_cookie(SESSION_COOKIE, &cookie);
        let session = sessions.session(&admin, &headers, 2_000).expect("signed in");
        assert!(session.accepts(&session.csrf()));
        assert!(!session.accepts("forged"));

        let end = 1_000 + millis(SESSION_LIFETIME);
        assert!(sessions.session(&admin, &headers, end).is_none(), "expired");
        assert!(sessions.session(&token("admin-token-2"), &headers, 2_000).is_none(), "the token rotated");
        let (_, rest) = cookie.split_once('.').unwrap();
        let tampered = format!("{}.{rest}", end + 10_000_000);
        assert!(sessions.session(&admin, &with_cookie(SESSION_COOKIE, &tampered), 2_000).is_none());

        sessions.revoke(&session, 3_000);
        assert!(sessions.session(&admin, &headers, 3_000).is_none(), "signed out");
    }

    #[test]
    fn sign_ins_slow_down_after_repeated_failures_and_recover() {
        let sessions = Sessions::default();
        for failure in 0..FREE_FAILURES {
            assert_eq!(sessions.sign_in_wait(10_000), None, "failure {failure} is free");
            sessions.sign_in_failed(10_000);
        }
        assert_eq!(sessions.sign_in_wait(10_000), Some(Duration::from_secs(1)));
        sessions.sign_in_failed(11_000);
        assert_eq!(sessions.sign_in_wait(11_000), Some(Duration::from_secs(2)));
        for _ in 0..20 {
            sessions.sign_in_failed(11_000);
        }
        assert_eq!(sessions.sign_in_wait(11_000), Some(LONGEST_WAIT), "never longer than a minute");
        assert_eq!(sessions.sign_in_wait(11_000 + millis(FAILURE_MEMORY) + 1), None, "forgotten");
        sessions.sign_in_succeeded();
        assert_eq!(sessions.sign_in_wait(11_000), None);
    }

    #[test]
    fn the_cookie_is_secure_only_behind_tls() {
        let mut headers = HeaderMap::new();
        assert!(!behind_tls(&headers));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(behind_tls(&headers));
        let cookie = set_cookie(SESSION_COOKIE, "v", SESSION_LIFETIME, true);
        let cookie = cookie.to_str().unwrap();
        for attribute in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/admin/", "Max-Age=28800"] {
            assert!(cookie.contains(attribute), "{cookie}");
        }
        assert!(!set_cookie(SESSION_COOKIE, "v", SESSION_LIFETIME, false).to_str().unwrap().contains("Secure"));
    }
}
