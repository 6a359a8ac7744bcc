//! The two HMAC-SHA256 signatures of the relay's wire protocols.
//!
//! Both are computed over raw bytes, never over re-serialised JSON: JoinChat checks the exact
//! body it received, and Meta signs the exact body it sent, `\u00e4` escapes and all (Meta's webhook
//! documentation: the signature is computed over the raw payload, not the decoded one).

use axum::body::Bytes;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::{Rotating, Secret, SecretValue};
use crate::rotation::SecretUse;

type HmacSha256 = Hmac<Sha256>;

/// The `x-joinchat-signature` header value: `base64(HMAC-SHA256(body, secret))`.
pub fn joinchat_signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    STANDARD.encode(mac.finalize().into_bytes())
}

/// The `X-Hub-Signature-256` header value Meta would send: `sha256=<hex HMAC-SHA256(body, secret)>`.
/// The relay only checks it; `simulate messenger` plays Meta with it.
pub fn hub_signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// A webhook body whose `X-Hub-Signature-256` was checked. The field is private and the only
/// constructor is [`HubSignature::verify`], so code that parses Messenger events (which takes
/// this type) cannot be handed bytes nobody verified.
#[derive(Debug)]
pub struct VerifiedBody(Bytes);

impl VerifiedBody {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Why a webhook signature was refused: which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("X-Hub-Signature-256 is missing")]
    Missing,
    /// Another algorithm's prefix, such as `sha1=` (the older `X-Hub-Signature` header's).
    #[error("X-Hub-Signature-256 is not a sha256= signature (sha1= is the older X-Hub-Signature header's)")]
    WrongAlgorithm,
    #[error("X-Hub-Signature-256 is not `sha256=` and 64 hex digits")]
    Malformed,
    #[error("X-Hub-Signature-256 does not match the body")]
    Mismatch,
}

impl SignatureError {
    /// Which check failed, as one word for the log.
    pub fn check(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::WrongAlgorithm => "wrong_algorithm",
            Self::Malformed => "malformed",
            Self::Mismatch => "mismatch",
        }
    }
}

/// Checks Meta's `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>` with the App
/// Secret, or with the one it replaces while a rotation lasts.
pub struct HubSignature {
    app_secret: Rotating,
    /// What a match is counted as (the rotation counter), when it is counted.
    usage: Option<SecretUse>,
}

impl HubSignature {
    pub fn new(app_secret: Rotating, usage: Option<SecretUse>) -> Self {
        Self { app_secret, usage }
    }

    /// Whether a previous App Secret is checked too (a rotation is under way).
    pub fn has_previous(&self) -> bool {
        self.app_secret.previous.is_some()
    }

    /// Verifies `header` against the exact `body` bytes, in constant time. During a rotation
    /// the HMAC is computed with both secrets, every time, and both compared before the
    /// results are combined: the time taken does not say which secret signed.
    pub fn verify(&self, header: Option<&[u8]>, body: Bytes) -> Result<VerifiedBody, SignatureError> {
        let header = header.ok_or(SignatureError::Missing)?;
        let hex = header.strip_prefix(b"sha256=").ok_or_else(|| {
            // `sha1=…`, `sha512=…`: a signature, of another kind. Anything else is garbage.
            let named = header.split(|b| *b == b'=').next().filter(|name| name.len() < header.len());
            match named {
                Some(name) if (1..=16).contains(&name.len()) && name.iter().all(u8::is_ascii_alphanumeric) => {
                    SignatureError::WrongAlgorithm
                }
                _ => SignatureError::Malformed,
            }
        })?;
        let expected = decode_hex(hex.trim_ascii()).ok_or(SignatureError::Malformed)?;
        if expected.len() != 32 {
            return Err(SignatureError::Malformed);
        }
        let signed_with = |secret: &Secret| {
            let mut mac =
                HmacSha256::new_from_slice(secret.expose().as_bytes()).expect("HMAC accepts keys of any length");
            mac.update(&body);
            let tag = mac.finalize().into_bytes();
            tag.as_slice().ct_eq(expected.as_slice())
        };
        let current = signed_with(&self.app_secret.current);
        let previous = self.app_secret.previous.as_ref().map(signed_with);
        let either = previous.map_or(current, |previous| current | previous);
        if !bool::from(either) {
            return Err(SignatureError::Mismatch);
        }
        let value = if bool::from(current) { SecretValue::Current } else { SecretValue::Previous };
        if let Some(usage) = &self.usage {
            usage.record(value);
        }
        Ok(VerifiedBody(body))
    }
}

fn decode_hex(hex: &[u8]) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    hex.chunks(2)
        .map(|pair| {
            let digit = |b: u8| (b as char).to_digit(16);
            Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
        })
        .collect()
}

/// Unit tests of the parsers need verified bodies without computing signatures.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub fn verified(body: &[u8]) -> VerifiedBody {
        VerifiedBody(Bytes::copy_from_slice(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// B1: a Messenger body captured in `maciekmm/messenger-platform-go-sdk`'s tests, with
    /// `\u00e4`-style escapes, byte-exact (`tests/api/fixtures/b1.json`).
    const B1: &[u8] = br#"{"object":"page","entry":[{"id":"1751036168465324","time":1460923697656,"messaging":[{"sender":{"id":"982337261802700"},"recipient":{"id":"1751036168465324"},"timestamp":1460923697635,"message":{"mid":"mid.1460923697625:5c96e8279b55505308","seq":614,"text":"Test \u00e4\u00eb\u00ef"}}]}]}"#;
    /// B2: the same with numeric ids.
    const B2: &[u8] = br#"{"object":"page","entry":[{"id":1751036168465324,"time":1460923697656,"messaging":[{"sender":{"id":982337261802700},"recipient":{"id":1751036168465324},"timestamp":1460923697635,"message":{"mid":"mid.1460923697625:5c96e8279b55505308","seq":614,"text":"Test \u00e4\u00eb\u00ef"}}]}]}"#;
    const MESSENGER_SECRET: &str = "e6af24be1d683c8c911949f897eea1f6";

    fn verify(secret: &str, header: &str, body: &[u8]) -> Result<VerifiedBody, SignatureError> {
        HubSignature::new(Rotating::new(Secret::new(secret)), None)
            .verify(Some(header.as_bytes()), Bytes::copy_from_slice(body))
    }

    /// V1: GitHub's published vector for the same `sha256=` scheme.
    #[test]
    fn hub_signature_accepts_vector_v1() {
        let verified = verify(
            "It's a Secret to Everybody",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            b"Hello, World!",
        );
        assert_eq!(verified.unwrap().bytes(), b"Hello, World!");
    }

    #[test]
    fn hub_signature_produces_vector_v1_and_verifies_itself() {
        let header = hub_signature(b"It's a Secret to Everybody", b"Hello, World!");
        assert_eq!(header, "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17");
        assert!(verify("s", &hub_signature(b"s", B1), B1).is_ok());
    }

    #[test]
    fn hub_signature_accepts_vectors_v6_and_v7_over_raw_bytes() {
        assert!(
            verify(MESSENGER_SECRET, "sha256=3bf62d5bc657e3a17e55fa0095fa29964db507393b05209c260e2c845254968b", B1)
                .is_ok()
        );
        assert!(
            verify(MESSENGER_SECRET, "sha256=7f202c12ba7dbbd1cb23d8a1b4af648fe22ea04456c0a926fcf8cb4e6da31ab4", B2)
                .is_ok()
        );
    }

    /// V8: the same body with the escapes decoded to UTF-8 has another signature, so a
    /// verifier that re-serialises the JSON would fail.
    #[test]
    fn hub_signature_refuses_vector_v8_decoded_body() {
        let decoded = std::str::from_utf8(B1).unwrap().replace("\\u00e4\\u00eb\\u00ef", "äëï");
        assert_ne!(decoded.as_bytes(), B1);
        let v6 = "sha256=3bf62d5bc657e3a17e55fa0095fa29964db507393b05209c260e2c845254968b";
        assert_eq!(verify(MESSENGER_SECRET, v6, decoded.as_bytes()).unwrap_err(), SignatureError::Mismatch);
        let v8 = "sha256=b3d30a2399faba00e21a74a438727a3d403c4fe5a110f7042382596427c8ace4";
        assert!(verify(MESSENGER_SECRET, v8, decoded.as_bytes()).is_ok());
    }

    #[test]
    fn hub_signature_refuses_missing_malformed_and_wrong_headers() {
        let signer = HubSignature::new(Rotating::new(Secret::new("s")), None);
        assert_eq!(signer.verify(None, Bytes::from_static(b"{}")).unwrap_err(), SignatureError::Missing);
        for malformed in [
            "",
            "sha256=",
            "sha256=zz",
            "sha256=abc",
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            "=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            "sha 256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        ] {
            assert_eq!(verify("s", malformed, b"{}").unwrap_err(), SignatureError::Malformed, "{malformed}");
        }
        for other_algorithm in ["sha1=da611bd448dc12acdf0cd3ab33fdb3adaee26145", "SHA256=abc", "sha512=00"] {
            assert_eq!(
                verify("s", other_algorithm, b"{}").unwrap_err(),
                SignatureError::WrongAlgorithm,
                "{other_algorithm}"
            );
        }
        assert_eq!(
            verify("s", "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17", b"{}").unwrap_err(),
            SignatureError::Mismatch
        );
    }

    #[test]
    fn hub_signature_hex_is_case_insensitive() {
        assert!(
            verify(
                "It's a Secret to Everybody",
                "sha256=757107EA0EB2509FC211221CCE984B8A37570B6D7586C22C46F4379C8B043E17",
                b"Hello, World!",
            )
            .is_ok()
        );
    }

    #[test]
    fn during_a_rotation_a_body_signed_with_either_secret_verifies() {
        let signer =
            HubSignature::new(Rotating::with_previous(Secret::new("new"), Some(Secret::new(MESSENGER_SECRET))), None);
        let v6 = "sha256=3bf62d5bc657e3a17e55fa0095fa29964db507393b05209c260e2c845254968b";
        let verify = |header: &str| signer.verify(Some(header.as_bytes()), Bytes::from_static(B1));

        assert!(verify(v6).is_ok(), "signed with the previous secret");
        assert!(verify(&hub_signature(b"new", B1)).is_ok(), "signed with the current secret");
        assert_eq!(verify(&hub_signature(b"older", B1)).unwrap_err(), SignatureError::Mismatch);
        assert_eq!(verify(&hub_signature(b"new", B2)).unwrap_err(), SignatureError::Mismatch, "another body");
    }

    /// The JoinChat documentation's own request sample, signed with the secret `xxxxx` as its PHP
    /// sample signs (base64 of the raw HMAC-SHA256); the value was computed independently.
    #[test]
    fn joinchat_signature_matches_test_vector_v9() {
        let body = br#"{"page_id":12345,"recipient":{"id":"123456"},"message":{"template_type":"text","text":"Hello World"},"tag":"ACCOUNT_UPDATE","delay":1}"#;
        assert_eq!(joinchat_signature(b"xxxxx", body), "pjxfCwQlwtXvvMRKAPy5T16qFq9qBYc3CEWjI45M3mo=");
    }

    #[test]
    fn joinchat_signature_changes_with_a_single_byte() {
        let a = joinchat_signature(b"xxxxx", b"{\"a\":1}");
        let b = joinchat_signature(b"xxxxx", b"{\"a\":2}");
        assert_ne!(a, b);
    }
}
