//! Probes: `/healthz` says the process answers, `/readyz` that it should get traffic.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when the store answers; not ready once shutdown began, so load balancers stop sending
/// before the listener closes.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "shutting_down"})));
    }
    let pinged = tokio::time::timeout(std::time::Duration::from_secs(2), state.store.ping()).await;
    crate::monitoring::store_writable(matches!(pinged, Ok(Ok(()))));
    match pinged {
        Ok(Ok(())) => (StatusCode::OK, Json(json!({"status": "ready"}))),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "store not answering");
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "store_unavailable"})))
        }
        Err(_) => {
            tracing::warn!(error = "no answer within 2 s", "store not answering");
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "store_unavailable"})))
        }
    }
}
