//! Posting events to BonyChat's Webhook URL with the channel's Bearer token (SPEC §4.3).

use std::time::SystemTime;

use url::Url;

use super::http::{unknown_credential, with_trace_headers};
use super::{BonyChatApi, BoxFuture, SendError, http};
use crate::config::{BonyChatConfig, Secret};
use crate::domain::bonychat::WebhookPost;
use crate::rotation::{Outgoing, SecretUse, credential_accepted, credential_refused};

const UPSTREAM: &str = "BonyChat";

pub struct HttpBonyChat {
    http: reqwest::Client,
    url: Url,
    /// `BONYCHAT_API_TOKEN` and, during a rotation, its previous value (SPEC §1).
    token: Outgoing,
}

impl HttpBonyChat {
    /// `http` is the relay's one BonyChat client, shared by every channel.
    pub fn new(http: reqwest::Client, config: &BonyChatConfig, usage: SecretUse) -> Self {
        Self {
            http,
            url: config.webhook_url.url().clone(),
            token: Outgoing::new(config.api_token.clone(), usage, UPSTREAM),
        }
    }
}

impl BonyChatApi for HttpBonyChat {
    fn post<'a>(&'a self, post: &'a WebhookPost) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async move {
            let body = axum::body::Bytes::from(serde_json::to_vec(post).expect("a webhook post always serializes"));
            let trace = crate::traces::outgoing_trace_headers();
            // With the token that goes first; once more with the other when BonyChat refuses it
            // during a rotation (SPEC §1).
            let send = |token: &Secret| {
                let request = self
                    .http
                    .post(self.url.clone())
                    .bearer_auth(token.expose())
                    .header(reqwest::header::CONTENT_TYPE, "application/json");
                with_trace_headers(request, &trace).body(body.clone()).send()
            };
            let response = self
                .token
                .send(send, |r| credential_refused(r.status()), |r| credential_accepted(r.status()))
                .await
                .map_err(|e| http::transport_error(UPSTREAM, &self.url, &e))?;
            let status = response.status();
            if status.is_success() {
                return Ok(());
            }
            let retry_after = http::retry_after(response.headers(), SystemTime::now());
            let answer = http::read_capped(response).await.unwrap_or_default();
            if status == reqwest::StatusCode::UNAUTHORIZED && self.token.was_taken() {
                return Err(unknown_credential(UPSTREAM, "BONYCHAT_API_TOKEN", status, retry_after, &answer));
            }
            Err(http::classify_failure(UPSTREAM, status, retry_after, &answer))
        })
    }
}
