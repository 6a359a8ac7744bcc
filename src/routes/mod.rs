//! The HTTP surface: routes, shared state and the middleware every request goes through,
//! the stand-ins of `RELAY_SANDBOX` ([`sandbox`]) included.

mod admin;
pub(crate) mod console;
mod health;
pub mod limits;
mod message;
pub mod sandbox;
mod webhooks;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::ServiceBuilderExt;
use tower_http::catch_panic::CatchPanicLayer;

use crate::config::Config;
use crate::delivery::Worker;
use crate::delivery::channels::Live;
use crate::error::ApiError;
use crate::store::Store;
use crate::telemetry;
use crate::traces::{self, Traces};

/// SPEC §3.1: BonyChat's `/message` bodies are at most 64 KiB.
pub const MESSAGE_BODY_LIMIT: usize = 64 * 1024;
/// SPEC §4.2: Messenger webhook bodies are at most 1 MiB.
pub const WEBHOOK_BODY_LIMIT: usize = 1024 * 1024;

/// What every handler can reach. Cloned for every request, so it is one `Arc`.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    /// The configuration at start; the channels in effect are [`Self::channels`].
    pub config: Config,
    /// The channels and apps served now, replaced on `SIGHUP`.
    pub channels: Arc<Live>,
    /// Whether `/admin/*` exists (`RELAY_ADMIN_TOKEN` set at start); the token it takes is the
    /// directory's, which follows its file on reload.
    pub admin_enabled: bool,
    pub store: Arc<dyn Store>,
    /// Takes the first attempt of each `/message` request's job.
    pub worker: Arc<Worker>,
    /// Cancelled when the relay starts shutting down: readiness turns 503 at once.
    pub shutdown: CancellationToken,
    /// The server spans of the routes that store work, and the context their jobs keep.
    pub traces: Traces,
}

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The whole router. `request_timeout` bounds each request of the routes that store nothing, so
/// that graceful shutdown cannot be held up forever by a stuck client. The two routes that store
/// work have no overall deadline: one that fired while the store committed would answer an
/// error for stored work (SPEC §5). Their body read has its own deadline ([`limits::BodyReader`]), the
/// store bounds its own wait, and `/message` waits at most `RELAY_SEND_WAIT_MS` after that.
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let timeout = || middleware::from_fn_with_state(request_timeout, timeout);
    let stores_work = Router::new()
        .route("/message", post(message::post_default_message))
        .route("/channels/{channel}/message", post(message::post_channel_message))
        .route(
            "/webhooks/messenger",
            get(webhooks::verify_default_subscription).layer(timeout()).post(webhooks::receive_default_events),
        )
        .route(
            "/webhooks/messenger/{app}",
            get(webhooks::verify_app_subscription).layer(timeout()).post(webhooks::receive_app_events),
        )
        .route_layer(middleware::from_fn_with_state(state.traces.clone(), traces::receive));

    // Mounted only when asked for: otherwise `/sandbox/*` falls through to 404 like any path.
    let sandbox = if state.config.server.sandbox { sandbox::router(&state.config) } else { Router::new() };
    // Likewise `/admin/*` without a token: mounted, its paths would answer 405 to other methods
    // and so tell that they exist.
    let admin = if state.admin_enabled {
        Router::new()
            .route("/admin/jobs", get(admin::list_jobs))
            .route("/admin/jobs/{id}/retry", post(admin::retry_job))
            .route("/admin/dead/redrive", post(admin::redrive_dead))
            .merge(console::router())
    } else {
        Router::new()
    };
    let bounded = Router::new()
        .merge(sandbox)
        .merge(admin)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .fallback(|| async { ApiError::NotFound })
        .layer(timeout());

    let body_reader = limits::BodyReader::new(&state.config.server.limits);
    Router::new()
        .merge(stores_work)
        .merge(bounded)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // Outermost first: every answer gets `nosniff`, a caller's request id is checked before
        // it is kept, the id exists before the request is logged, and the log line sees the
        // final status, including refused heads, timeouts and panics turned into errors.
        .layer(
            ServiceBuilder::new()
                .map_response(no_sniff)
                .map_request(telemetry::drop_unfit_request_id)
                .set_x_request_id(telemetry::MakeRequestId)
                .propagate_x_request_id()
                .layer(middleware::from_fn(telemetry::log_request))
                .layer(middleware::from_fn(limits::head_limits))
                .layer(CatchPanicLayer::custom(panic_response))
                .layer(Extension(body_reader)),
        )
        .with_state(state)
}

/// No answer of the public port may be sniffed into another type by a browser: the handshake
/// echoes `hub.challenge`, caller input, as `text/plain`, and errors quote what callers sent.
fn no_sniff(mut response: Response) -> Response {
    response.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

async fn timeout(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::RequestTimeout.into_response(),
    }
}

fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    ApiError::Internal(format!("handler panicked: {detail}")).into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::StatusCode;
    use tower::ServiceExt;

    use super::*;
    use crate::config::Env;

    const TOKEN: &str = "bonychat-api-token";

    async fn state(dir: &std::path::Path) -> AppState {
        let database_url = format!("sqlite://{}/relay.db", dir.display());
        let env = Env::from_pairs([
            ("BONYCHAT_CHANNEL_ID", "channel"),
            ("BONYCHAT_API_TOKEN", TOKEN),
            ("BONYCHAT_WEBHOOK_URL", "http://127.0.0.1:9/hook"),
            ("JOINCHAT_PAGE_ID", "510249619162304"),
            ("JOINCHAT_API_SECRET", "joinchat-secret"),
            ("MESSENGER_APP_SECRET", "app-secret"),
            ("MESSENGER_VERIFY_TOKEN", "verify-token"),
            ("RELAY_DATABASE_URL", &database_url),
            ("RELAY_SEND_WAIT_MS", "300"),
            // Nothing listens: the first attempt fails at once, the job stays queued.
            ("JOINCHAT_API_URL", "http://127.0.0.1:9/send"),
        ]);
        let config = Config::from_env(&env).unwrap();
        let store = crate::store::open(&config.store).await.unwrap();
        let channels = Arc::new(Live::new(
            &config.channels,
            None,
            crate::delivery::channels::Clients::new(&config.upstreams).unwrap(),
            Arc::clone(&store),
        ));
        AppState::new(Shared {
            admin_enabled: false,
            worker: Arc::new(crate::startup::worker(&config, Arc::clone(&store), Arc::clone(&channels))),
            channels,
            store,
            shutdown: CancellationToken::new(),
            traces: Traces::off(),
            config,
        })
    }

    /// SPEC §5: a request timeout firing after the store wrote the job would answer an error for
    /// stored work. `/message` waits for its first attempt, here longer than the request
    /// timeout, and must still answer 200 for the job it stored.
    #[tokio::test]
    async fn the_request_timeout_never_cuts_off_a_message_it_stored() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        let store = Arc::clone(&state.store);
        let app = router(state, Duration::from_millis(50));
        let body =
            r#"{"channelId": "channel", "contactId": "1066835436691078", "message": {"type": "text", "text": "hi"}}"#;
        let request = Request::post("/message")
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();

        let answer = app.clone().oneshot(request).await.unwrap();

        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(store.list(None, None, 10).await.unwrap().len(), 1);
        let probe = app.oneshot(Request::get("/healthz").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(probe.status(), StatusCode::OK, "other routes keep their timeout, and answer well within it");
    }

    /// Readiness turns 503 the moment shutdown begins, before in-flight work is done, so a load
    /// balancer stops sending first. (From outside the window is too short to hit: the listener
    /// closes at the same moment.)
    #[tokio::test]
    async fn readiness_turns_503_once_shutdown_begins() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        let shutdown = state.shutdown.clone();
        let app = router(state, Duration::from_secs(5));
        let readyz = || Request::get("/readyz").body(Body::empty()).unwrap();

        let before = app.clone().oneshot(readyz()).await.unwrap();
        shutdown.cancel();
        let after = app.oneshot(readyz()).await.unwrap();

        assert_eq!(before.status(), StatusCode::OK);
        assert_eq!(after.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(after.into_body(), 1024).await.unwrap();
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["status"], "shutting_down");
    }
}
