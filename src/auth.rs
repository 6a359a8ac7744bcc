//! Bearer token checks in constant time.
//!
//! Both the expected and the presented token are hashed before comparing, so neither the
//! content nor the length of the token leaks through timing.

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Secret;

pub struct BearerToken {
    digest: [u8; 32],
}

impl BearerToken {
    pub fn new(token: &Secret) -> Self {
        Self {
            digest: Sha256::digest(token.expose().as_bytes()).into(),
        }
    }

    /// Whether `headers` carry `Authorization: Bearer <this token>`.
    pub fn is_presented_in(&self, headers: &HeaderMap) -> bool {
        let Some(presented) = bearer_token(headers) else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(presented).into();
        digest.ct_eq(&self.digest).into()
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
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(authorization).unwrap(),
        );
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
        for wrong in [
            "Bearer aaaxczsadzx",
            "Bearer aaaxczsadzxcc",
            "Basic aaaxczsadzxc",
            "aaaxczsadzxc",
            "Bearer ",
            "Bearer",
        ] {
            assert!(!token.is_presented_in(&headers(wrong)), "{wrong}");
        }
    }
}
