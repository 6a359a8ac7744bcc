//! Posting events to BonyChat's Webhook URL with the channel's Bearer token (SPEC §4.3).

use std::time::SystemTime;

use url::Url;

use super::{BonyChatApi, BoxFuture, SendError, http};
use crate::config::{BonyChatConfig, Secret};
use crate::domain::bonychat::WebhookPost;

const UPSTREAM: &str = "BonyChat";

pub struct HttpBonyChat {
    http: reqwest::Client,
    url: Url,
    token: Secret,
}

impl HttpBonyChat {
    /// `http` is the relay's one BonyChat client, shared by every channel.
    pub fn new(http: reqwest::Client, config: &BonyChatConfig) -> Self {
        Self { http, url: config.webhook_url.url().clone(), token: config.api_token.clone() }
    }
}

impl BonyChatApi for HttpBonyChat {
    fn post<'a>(&'a self, post: &'a WebhookPost) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async move {
            let response = self
                .http
                .post(self.url.clone())
                .bearer_auth(self.token.expose())
                .json(post)
                .send()
                .await
                .map_err(|e| http::transport_error(UPSTREAM, &e))?;
            let status = response.status();
            if status.is_success() {
                return Ok(());
            }
            let retry_after = http::retry_after(response.headers(), SystemTime::now());
            let answer = http::read_capped(response).await.unwrap_or_default();
            Err(http::classify_failure(UPSTREAM, status, retry_after, &answer))
        })
    }
}
