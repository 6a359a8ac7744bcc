//! The relay's own ceilings: `POST /message` doing everything the relay does except storing.
//!
//! - `handler`: checks the Bearer token, parses and validates the body (`OutboundRequest::parse`),
//!   builds the job and its JoinChat parts as the relay does (`new_outbound_job`, `translate`),
//!   serializes each `send_message` body and computes its `x-joinchat-signature`, then answers
//!   200 `{"mId": …}` at once. It also serves `POST /webhooks/messenger`: the signature check and
//!   the envelope parse of the relay, then 200.
//! - `forwarder`: the same, but each part is sent to JoinChat (`JOINCHAT_API_URL`) with the
//!   relay's client (`HttpJoinChat`, which serializes and signs), and the answer waits for it.
//!
//! Nothing is stored. The configuration comes from the relay's variables (`Config::from_env`).
//! Run with `cargo run --release --example bench_bare -- handler 127.0.0.1:18084`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bonychat_relay::auth::BearerToken;
use bonychat_relay::clients::JoinChatApi;
use bonychat_relay::clients::joinchat::HttpJoinChat;
use bonychat_relay::config::{Config, Env};
use bonychat_relay::delivery::new_outbound_job;
use bonychat_relay::domain::inbound::parse_envelope;
use bonychat_relay::domain::joinchat::SendRequest;
use bonychat_relay::domain::outbound::OutboundRequest;
use bonychat_relay::rotation::{SecretName, SecretUse};
use bonychat_relay::signing::{HubSignature, joinchat_signature};
use bonychat_relay::store::{DEFAULT_CHANNEL, now_millis};

struct Bare {
    config: Config,
    token: BearerToken,
    hub: HubSignature,
    /// `Some` in `forwarder` mode.
    joinchat: Option<HttpJoinChat>,
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "handler".into());
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18084".into());
    let config = Config::from_env(&Env::from_process()).expect("the relay's variables are set");
    let joinchat = match mode.as_str() {
        "handler" => None,
        "forwarder" => Some(HttpJoinChat::new(
            bonychat_relay::clients::http::client(
                config.upstreams.joinchat_connect_timeout,
                config.upstreams.joinchat_timeout,
            )
            .expect("HTTP client builds"),
            &config.channels.channels[DEFAULT_CHANNEL].joinchat,
            SecretUse::new(SecretName::JoinChatApiSecret, DEFAULT_CHANNEL),
        )),
        other => panic!("unknown mode {other}: handler or forwarder"),
    };
    let bare = Arc::new(Bare {
        // Counted as the relay counts them: the rotation counter is part of a check's cost.
        token: BearerToken::new(
            &config.channels.channels[DEFAULT_CHANNEL].bonychat.api_token,
            Some(SecretUse::new(SecretName::BonyChatApiToken, DEFAULT_CHANNEL)),
        ),
        hub: HubSignature::new(
            config.channels.apps["default"].app_secret.clone(),
            Some(SecretUse::new(SecretName::MessengerAppSecret, "default")),
        ),
        joinchat,
        config,
    });
    let app =
        Router::new().route("/message", post(message)).route("/webhooks/messenger", post(webhook)).with_state(bare);
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("address is free");
    axum::serve(listener, app).await.expect("server runs");
}

async fn message(State(bare): State<Arc<Bare>>, headers: HeaderMap, body: Bytes) -> Response {
    if !bare.token.is_presented_in(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let request =
        match OutboundRequest::parse(&body, &bare.config.channels.channels[DEFAULT_CHANNEL].bonychat.channel_id) {
            Ok(request) => request,
            Err(e) => return (StatusCode::BAD_REQUEST, format!("{e:?}")).into_response(),
        };
    let joinchat = &bare.config.channels.channels[DEFAULT_CHANNEL].joinchat;
    let job = new_outbound_job(DEFAULT_CHANNEL, u64::MAX, &request, joinchat.recipient_field, now_millis());
    for message in &job.parts {
        let send = SendRequest {
            page_id: &joinchat.page_id,
            recipient: &job.recipient,
            message,
            tag: joinchat.message_tag.as_deref(),
            delay: None,
        };
        match &bare.joinchat {
            None => {
                let bytes = send.to_bytes();
                std::hint::black_box(joinchat_signature(joinchat.api_secret.current.expose().as_bytes(), &bytes));
            }
            Some(api) => {
                if let Err(e) = api.send(&send).await {
                    return (StatusCode::BAD_GATEWAY, e.to_string()).into_response();
                }
            }
        }
    }
    axum::Json(serde_json::json!({ "mId": job.m_id })).into_response()
}

async fn webhook(State(bare): State<Arc<Bare>>, headers: HeaderMap, body: Bytes) -> Response {
    let signature = headers.get("x-hub-signature-256").map(|v| v.as_bytes());
    let Ok(verified) = bare.hub.verify(signature, body) else {
        return StatusCode::FORBIDDEN.into_response();
    };
    match parse_envelope(&verified, &bare.config.channels.channels[DEFAULT_CHANNEL].joinchat.page_id, now_millis()) {
        Ok(envelope) => axum::Json(serde_json::json!({ "received": envelope.events.len() })).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.0).into_response(),
    }
}
