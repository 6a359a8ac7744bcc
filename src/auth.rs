//! Shared-secret checks in constant time.
//!
//! Both the expected and the presented value are hashed before comparing, so neither the
//! content nor the length of the secret leaks through timing.

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// A secret kept only as its digest, compared in constant time.
pub struct SecretDigest([u8; 32]);

impl SecretDigest {
    pub fn new(secret: &Secret) -> Self {
        Self(Sha256::digest(secret.expose().as_bytes()).into())
    }

    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        digest.ct_eq(&self.0).into()
    }
}

pub struct BearerToken(SecretDigest);

impl BearerToken {
    pub fn new(token: &Secret) -> Self {
        Self(SecretDigest::new(token))
    }

    /// Whether `headers` carry `Authorization: Bearer <this token>`.
    pub fn is_presented_in(&self, headers: &HeaderMap) -> bool {
        bearer_token(headers).is_some_and(|presented| self.0.matches(presented))
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

    #[test]
    fn the_right_token_is_accepted_whatever_the_scheme_case() {
        let token = BearerToken::new(&Secret::new("aaaxczsadzxc"));
        assert!(token.is_presented_in(&headers("Bearer aaaxczsadzxc")));
        assert!(token.is_presented_in(&headers("bearer aaaxczsadzxc")));
    }

    #[test]
    fn anything_else_is_refused() {
        let token = BearerToken::new(&Secret::new("aaaxczsadzxc"));
        assert!(!token.is_presented_in(&HeaderMap::new()));
        for wrong in
            ["Bearer aaaxczsadzx", "Bearer aaaxczsadzxcc", "Basic aaaxczsadzxc", "aaaxczsadzxc", "Bearer ", "Bearer"]
        {
            assert!(!token.is_presented_in(&headers(wrong)), "{wrong}");
        }
    }

    #[test]
    fn digests_match_only_the_same_bytes() {
        let digest = SecretDigest::new(&Secret::new("meatyhamhock"));
        assert!(digest.matches(b"meatyhamhock"));
        assert!(!digest.matches(b"meatyhamhoc"));
        assert!(!digest.matches(b""));
    }
}
