//! The benchmark's ceiling: a bare axum server that answers every POST with 200 at once.
//!
//! It stands for "the fastest `/message` could possibly be" and doubles as an instant JoinChat
//! while the relay is measured. Run with `cargo run --release --example bench_ceiling -- 127.0.0.1:18081`;
//! `-- 127.0.0.1:18081 503` makes it a JoinChat that is down (503 at once to every send). It
//! also takes OTLP trace exports at `/v1/traces`, for the relay measured with traces on.

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:18081".into());
    let send_status = std::env::args()
        .nth(2)
        .map(|status| StatusCode::from_bytes(status.as_bytes()).expect("an HTTP status code"))
        .unwrap_or(StatusCode::OK);
    let sent = if send_status.is_success() { r#"{"success":true}"# } else { r#"{"success":false}"# };
    let app = Router::new()
        .route("/message", post(|| async { r#"{"mId":"0199b6d3c5e47a1c9f0e2b8d4a6c1e3f"}"# }))
        .route("/api/send_message", post(move || async move { (send_status, sent) }))
        // An OTLP collector that takes every export (bench/harness.sh with traces on).
        .route("/v1/traces", post(|| async { StatusCode::OK }));
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("address is free");
    axum::serve(listener, app).await.expect("server runs");
}
