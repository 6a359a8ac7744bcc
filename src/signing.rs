//! The two HMAC-SHA256 signatures of the relay's wire protocols.
//!
//! Both are computed over raw bytes, never over re-serialised JSON: JoinChat checks the exact
//! body it received, and Meta signs the exact body it sent (PROTOCOLS.md B.2, D.3).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The `x-joinchat-signature` header value: `base64(HMAC-SHA256(body, secret))`.
pub fn joinchat_signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    STANDARD.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PROTOCOLS.md D.3, V9: the JoinChat documentation's own request sample.
    #[test]
    fn joinchat_signature_matches_test_vector_v9() {
        let body = br#"{"page_id":12345,"recipient":{"id":"123456"},"message":{"template_type":"text","text":"Hello World"},"tag":"ACCOUNT_UPDATE","delay":1}"#;
        assert_eq!(
            joinchat_signature(b"xxxxx", body),
            "pjxfCwQlwtXvvMRKAPy5T16qFq9qBYc3CEWjI45M3mo="
        );
    }

    #[test]
    fn joinchat_signature_changes_with_a_single_byte() {
        let a = joinchat_signature(b"xxxxx", b"{\"a\":1}");
        let b = joinchat_signature(b"xxxxx", b"{\"a\":2}");
        assert_ne!(a, b);
    }
}
