//! Shared-secret checks in constant time.
//!
//! Both the expected and the presented value are hashed before comparing, so neither the
//! content nor the length of the secret leaks through timing. During a rotation (SPEC §1) a
//! secret has two live values: the presented digest is compared with both, every time, and the
//! results combined without branching, so the time taken does not tell which one matched, or
//! whether a rotation is under way at all.

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use crate::config::{Rotating, Secret, SecretValue};
use crate::rotation::SecretUse;

/// A secret kept only as the digests of its live values, compared in constant time.
pub struct SecretDigest {
    current: [u8; 32],
    /// The previous value's digest; when there is none, a digest no value has (see `new`),
    /// compared all the same and masked by `has_previous`.
    previous: [u8; 32],
    has_previous: Choice,
    /// What a match is counted as, when it is counted.
    usage: Option<SecretUse>,
}

impl SecretDigest {
    /// The digests of `secret`'s values; every match is counted as `usage` (the rotation
    /// counter), when given.
    pub fn new(secret: &Rotating, usage: Option<SecretUse>) -> Self {
        let current = digest(secret.current.expose().as_bytes());
        let (previous, has_previous) = match &secret.previous {
            Some(previous) => (digest(previous.expose().as_bytes()), Choice::from(1)),
            // Compared anyway, so a check costs the same with and without a rotation.
            None => (digest(b"\0no previous value"), Choice::from(0)),
        };
        Self { current, previous, has_previous, usage }
    }

    /// A single value, counted nowhere (a stand-in's own check).
    pub fn single(secret: &Secret) -> Self {
        Self::new(&Rotating::new(secret.clone()), None)
    }

    /// Which live value `presented` is, if any. The presented value is hashed once and compared
    /// with both digests without a short circuit.
    pub fn check(&self, presented: &[u8]) -> Option<SecretValue> {
        let presented = digest(presented);
        let current = presented.ct_eq(&self.current);
        let previous = presented.ct_eq(&self.previous) & self.has_previous;
        if !bool::from(current | previous) {
            return None;
        }
        // Either value opens the same door: which one did is not secret, only the values are.
        let value = if bool::from(current) { SecretValue::Current } else { SecretValue::Previous };
        if let Some(usage) = &self.usage {
            usage.record(value);
        }
        Some(value)
    }

    pub fn matches(&self, presented: &[u8]) -> bool {
        self.check(presented).is_some()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub struct BearerToken(SecretDigest);

impl BearerToken {
    pub fn new(token: &Rotating, usage: Option<SecretUse>) -> Self {
        Self(SecretDigest::new(token, usage))
    }

    /// Which live token `headers` carry as `Authorization: Bearer <token>`, if any.
    pub fn presented_in(&self, headers: &HeaderMap) -> Option<SecretValue> {
        bearer_token(headers).and_then(|presented| self.0.check(presented))
    }

    /// Whether `headers` carry `Authorization: Bearer <one of this token's live values>`.
    pub fn is_presented_in(&self, headers: &HeaderMap) -> bool {
        self.presented_in(headers).is_some()
    }

    /// Whether `presented` (typed into a form, not sent as a header) is one of the live values.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.matches(presented)
    }

    /// A key for `purpose` that only a holder of the current value can make: what the console
    /// signs its sessions with, so that every replica takes them and a rotation of the token
    /// ends them all.
    pub fn derived_key(&self, purpose: &str) -> [u8; 32] {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&self.0.current).expect("HMAC takes any key");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is case-insensitive
/// (RFC 7235).
fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at(value.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(authorization).unwrap());
        headers
    }

    fn single(token: &str) -> BearerToken {
        BearerToken::new(&Rotating::new(Secret::new(token)), None)
    }

    fn rotating(current: &str, previous: &str) -> Rotating {
        Rotating::with_previous(Secret::new(current), Some(Secret::new(previous)))
    }

    #[test]
    fn the_right_token_is_accepted_whatever_the_scheme_case() {
        let token = single("aaaxczsadzxc");
        assert!(token.is_presented_in(&headers("Bearer aaaxczsadzxc")));
        assert!(token.is_presented_in(&headers("bearer aaaxczsadzxc")));
    }

    #[test]
    fn anything_else_is_refused() {
        let token = single("aaaxczsadzxc");
        assert!(!token.is_presented_in(&HeaderMap::new()));
        for wrong in
            ["Bearer aaaxczsadzx", "Bearer aaaxczsadzxcc", "Basic aaaxczsadzxc", "aaaxczsadzxc", "Bearer ", "Bearer"]
        {
            assert!(!token.is_presented_in(&headers(wrong)), "{wrong}");
        }
    }

    #[test]
    fn digests_match_only_the_same_bytes() {
        let digest = SecretDigest::single(&Secret::new("meatyhamhock"));
        assert!(digest.matches(b"meatyhamhock"));
        assert!(!digest.matches(b"meatyhamhoc"));
        assert!(!digest.matches(b""));
    }

    #[test]
    fn during_a_rotation_either_value_matches_and_says_which() {
        let digest = SecretDigest::new(&rotating("new-token", "old-token"), None);
        assert_eq!(digest.check(b"new-token"), Some(SecretValue::Current));
        assert_eq!(digest.check(b"old-token"), Some(SecretValue::Previous));
        for wrong in [&b"older-token"[..], b"new-toke", b"", b"new-tokenold-token"] {
            assert_eq!(digest.check(wrong), None, "{}", String::from_utf8_lossy(wrong));
        }
        let token = BearerToken::new(&rotating("new-token", "old-token"), None);
        assert_eq!(token.presented_in(&headers("Bearer old-token")), Some(SecretValue::Previous));
        assert_eq!(token.presented_in(&headers("Bearer new-token")), Some(SecretValue::Current));
    }

    #[test]
    fn without_a_previous_value_nothing_matches_as_previous() {
        let digest = SecretDigest::single(&Secret::new("only"));
        // The stand-in digest of "no previous value" is compared too, and masked.
        assert_eq!(digest.check(b"\0no previous value"), None);
        assert_eq!(digest.check(b"only"), Some(SecretValue::Current));
    }

    #[test]
    fn a_previous_value_equal_to_the_current_one_counts_as_current() {
        let digest = SecretDigest::new(&rotating("same", "same"), None);
        assert_eq!(digest.check(b"same"), Some(SecretValue::Current));
    }
}
