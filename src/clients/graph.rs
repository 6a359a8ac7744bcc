//! Contact profiles from the Graph API (SPEC §4.3, last paragraph).

use serde_json::Value;
use url::Url;

use reqwest::StatusCode;

use super::{BoxFuture, LookupError, ProfileLookup, http};
use crate::config::{Rotating, Secret, shown_url};
use crate::domain::bonychat::ContactProfile;
use crate::domain::text::truncate;
use crate::rotation::{Outgoing, SecretUse, credential_accepted, credential_refused};

const UPSTREAM: &str = "Graph API";
/// BonyChat's limit for `firstName` and `lastName`.
const NAME_MAX: usize = 50;
/// Graph's error code for an access token it does not take (expired, revoked, malformed):
/// answered with 400 as often as with 401.
const INVALID_TOKEN_CODE: i64 = 190;

pub struct GraphProfiles {
    http: reqwest::Client,
    base: Url,
    /// `MESSENGER_PAGE_ACCESS_TOKEN` and, during a rotation, its previous value (SPEC §1).
    token: Outgoing,
}

impl GraphProfiles {
    /// `http` is the relay's one Graph client, shared by every channel.
    pub fn new(http: reqwest::Client, base: Url, token: Rotating, usage: SecretUse) -> Self {
        Self { http, base, token: Outgoing::new(token, usage, "The Graph API") }
    }
}

impl ProfileLookup for GraphProfiles {
    fn profile<'a>(&'a self, psid: &'a str) -> BoxFuture<'a, Result<ContactProfile, LookupError>> {
        Box::pin(async move {
            let mut base = self.base.clone();
            let shown_base = shown_url(&self.base);
            base.path_segments_mut()
                .map_err(|()| LookupError {
                    url: shown_base,
                    status: None,
                    reason: "MESSENGER_GRAPH_URL cannot take a path".to_owned(),
                })?
                .pop_if_empty()
                .push(psid);
            base.query_pairs_mut().append_pair("fields", "first_name,last_name,profile_pic,locale,timezone");
            // The URL as the log shows it: the token is there, hidden.
            let shown = {
                let mut url = base.clone();
                url.query_pairs_mut().append_pair("access_token", "-");
                shown_url(&url)
            };
            let failed = |status: Option<u16>, reason: String| LookupError { url: shown.clone(), status, reason };
            // With the token that goes first; once more with the other when Graph refuses it
            // during a rotation (SPEC §1).
            let look_up = |token: &Secret| {
                let mut url = base.clone();
                url.query_pairs_mut().append_pair("access_token", token.expose());
                let sent = self.http.get(url).send();
                let base = &base;
                async move {
                    // The URL carries the token: errors are described without it.
                    let response = sent.await.map_err(|e| http::transport_reason(UPSTREAM, base, &e.without_url()))?;
                    let status = response.status();
                    let answer = http::read_capped(response)
                        .await
                        .map_err(|e| http::transport_reason(UPSTREAM, base, &e.without_url()))?;
                    Ok::<_, String>((status, answer))
                }
            };
            let (status, answer) = self
                .token
                .send(
                    look_up,
                    |(status, answer)| token_refused(*status, answer),
                    |(status, answer)| credential_accepted(*status) && !token_refused(*status, answer),
                )
                .await
                .map_err(|reason| failed(None, reason))?;
            if !status.is_success() {
                let reason = http::reason_from(&answer).unwrap_or_default();
                let reason = format!("{UPSTREAM} answered {status} {reason}").trim_end().to_owned();
                return Err(failed(Some(status.as_u16()), reason));
            }
            let value: Value = serde_json::from_slice(&answer)
                .map_err(|e| failed(Some(status.as_u16()), format!("{UPSTREAM} answer is not JSON: {e}")))?;
            Ok(profile_from(&value))
        })
    }
}

/// Whether Graph refused the access token: 401, 403, or its error code 190 (SPEC §1).
fn token_refused(status: StatusCode, answer: &[u8]) -> bool {
    credential_refused(status)
        || (!status.is_success()
            && serde_json::from_slice::<Value>(answer)
                .ok()
                .and_then(|value| value.pointer("/error/code").and_then(Value::as_i64))
                == Some(INVALID_TOKEN_CODE))
}

fn profile_from(value: &Value) -> ContactProfile {
    let text = |name: &str, max: usize| {
        value
            .get(name)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| truncate(s, max).into_owned())
    };
    ContactProfile {
        first_name: text("first_name", NAME_MAX),
        last_name: text("last_name", NAME_MAX),
        profile_pic: text("profile_pic", 2000),
        locale: text("locale", 20),
        timezone: value
            .get("timezone")
            .and_then(Value::as_number)
            .filter(|n| n.as_f64().is_some_and(|tz| (-24.0..=24.0).contains(&tz)))
            .cloned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn graph_fields_map_to_bonychat_contact_fields() {
        let profile = profile_from(&json!({
            "first_name": "Peter", "last_name": "Chang", "profile_pic": "https://platform-lookaside.example/pic",
            "locale": "en_US", "timezone": -7, "id": "1066835436691078"
        }));
        assert_eq!(
            serde_json::to_value(&profile).unwrap(),
            json!({"firstName": "Peter", "lastName": "Chang", "profilePic": "https://platform-lookaside.example/pic", "locale": "en_US", "timezone": -7})
        );
    }

    #[test]
    fn a_refused_token_is_told_by_its_status_or_by_code_190() {
        let invalid = br#"{"error":{"message":"Invalid OAuth access token.","type":"OAuthException","code":190}}"#;
        assert!(token_refused(StatusCode::BAD_REQUEST, invalid));
        assert!(token_refused(StatusCode::UNAUTHORIZED, b""));
        assert!(token_refused(StatusCode::FORBIDDEN, b"{}"));
        assert!(!token_refused(
            StatusCode::BAD_REQUEST,
            br#"{"error":{"message":"Unsupported get request","code":100}}"#
        ));
        assert!(!token_refused(StatusCode::OK, br#"{"first_name":"Peter","code":190}"#));
        assert!(!token_refused(StatusCode::INTERNAL_SERVER_ERROR, b"oops"));
    }

    #[test]
    fn missing_and_out_of_range_fields_are_left_out() {
        let profile = profile_from(&json!({"first_name": "", "timezone": 99, "last_name": "x".repeat(60)}));
        assert_eq!(profile.first_name, None);
        assert_eq!(profile.timezone, None);
        assert_eq!(profile.last_name.unwrap().chars().count(), NAME_MAX);
    }
}
