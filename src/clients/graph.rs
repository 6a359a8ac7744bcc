//! Contact profiles from the Graph API (SPEC §4.3, last paragraph).

use serde_json::Value;
use url::Url;

use super::{BoxFuture, ProfileLookup, http};
use crate::config::Secret;
use crate::domain::bonychat::ContactProfile;
use crate::domain::text::truncate;

/// BonyChat's limit for `firstName` and `lastName`.
const NAME_MAX: usize = 50;

pub struct GraphProfiles {
    http: reqwest::Client,
    base: Url,
    token: Secret,
}

impl GraphProfiles {
    /// `http` is the relay's one Graph client, shared by every channel.
    pub fn new(http: reqwest::Client, base: Url, token: Secret) -> Self {
        Self { http, base, token }
    }
}

impl ProfileLookup for GraphProfiles {
    fn profile<'a>(&'a self, psid: &'a str) -> BoxFuture<'a, Result<ContactProfile, String>> {
        Box::pin(async move {
            let mut url = self.base.clone();
            url.path_segments_mut()
                .map_err(|()| "MESSENGER_GRAPH_URL cannot take a path".to_owned())?
                .pop_if_empty()
                .push(psid);
            url.query_pairs_mut()
                .append_pair("fields", "first_name,last_name,profile_pic,locale,timezone")
                .append_pair("access_token", self.token.expose());
            // The URL carries the token: errors are described without it.
            let response = self.http.get(url).send().await.map_err(|e| e.without_url().to_string())?;
            let status = response.status();
            let answer = http::read_capped(response).await.map_err(|e| e.without_url().to_string())?;
            if !status.is_success() {
                let reason = http::reason_from(&answer).unwrap_or_default();
                return Err(format!("Graph API answered {status} {reason}").trim_end().to_owned());
            }
            let value: Value =
                serde_json::from_slice(&answer).map_err(|e| format!("Graph API answer is not JSON: {e}"))?;
            Ok(profile_from(&value))
        })
    }
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
    fn missing_and_out_of_range_fields_are_left_out() {
        let profile = profile_from(&json!({"first_name": "", "timezone": 99, "last_name": "x".repeat(60)}));
        assert_eq!(profile.first_name, None);
        assert_eq!(profile.timezone, None);
        assert_eq!(profile.last_name.unwrap().chars().count(), NAME_MAX);
    }
}
