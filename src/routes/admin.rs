//! `/admin/*` (SPEC §6): dead letters and redrive, behind `RELAY_ADMIN_TOKEN`.
//!
//! Without a token configured the admin API does not exist: every path answers 404, exactly
//! like an unknown route, so its presence is not advertised.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use crate::domain::channel::is_channel_name;
use crate::error::ApiError;
use crate::store::{JobState, JobView, LIST_LIMIT_MAX, StoreError, redrive_all_dead};

const DEFAULT_LIMIT: usize = 100;

pub struct AdminCaller;

impl FromRequestParts<AppState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if !state.admin_enabled {
            return Err(ApiError::NotFound);
        }
        match state.channels.current().admin_token() {
            None => Err(ApiError::NotFound),
            Some(token) if token.is_presented_in(&parts.headers) => Ok(Self),
            Some(_) => Err(ApiError::Unauthorized),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    channel: Option<String>,
    limit: Option<usize>,
}

/// The channel a query names, `None` for every channel (no `channel`, or an empty one, as an
/// empty form field sends); 400 naming `channel` for a name no channel can have.
fn channel_filter(channel: Option<&str>) -> Result<Option<&str>, ApiError> {
    match channel {
        None | Some("") => Ok(None),
        Some(name) if is_channel_name(name) => Ok(Some(name)),
        Some(_) => Err(ApiError::InvalidRequest(
            "channel: must be a channel's name, 1 to 32 of a-z, 0-9 and -, starting with a letter or digit".into(),
        )),
    }
}

/// `GET /admin/jobs?state=dead&channel=shoes&limit=100`: jobs, newest first.
pub async fn list_jobs(
    _: AdminCaller,
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidRequest(format!("query: {}", e.body_text())))?;
    let job_state = match query.state.as_deref() {
        None | Some("" | "all") => None,
        Some(raw) => Some(JobState::parse(raw).ok_or_else(|| {
            let states: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::InvalidRequest(format!("state: must be one of {}", states.join(", ")))
        })?),
    };
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=LIST_LIMIT_MAX).contains(&limit) {
        return Err(ApiError::InvalidRequest(format!("limit: must be between 1 and {LIST_LIMIT_MAX}")));
    }
    let channel = channel_filter(query.channel.as_deref())?;
    let jobs = state.store.list(job_state, channel, limit).await.map_err(ApiError::Store)?;
    let jobs: Vec<JobView> = jobs.iter().map(JobView::from).collect();
    Ok(Json(json!({ "jobs": jobs })))
}

/// `POST /admin/jobs/{id}/retry`: makes one dead or queued job due now, with a fresh retry
/// schedule; 409 with the reason for any other state.
pub async fn retry_job(
    _: AdminCaller,
    State(state): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(id) = id.map_err(|_| ApiError::NoSuchJob("no such job".into()))?;
    // The store's clock: a replica whose own clock is off must not delay what it makes due.
    let job = state.store.retry(id, state.store.now()).await.map_err(|e| match e {
        StoreError::NotFound(id) => ApiError::NoSuchJob(format!("no job {id}")),
        StoreError::Conflict(reason) => ApiError::Conflict(reason),
        other => ApiError::Store(other),
    })?;
    tracing::info!(job = id, "job queued again by an operator");
    Ok(Json(json!({ "job": JobView::from(&job) })))
}

#[derive(Debug, Deserialize)]
pub struct RedriveQuery {
    channel: Option<String>,
}

/// `POST /admin/dead/redrive?channel=shoes`: makes every dead job (of that channel) due now.
pub async fn redrive_dead(
    _: AdminCaller,
    State(state): State<AppState>,
    query: Result<Query<RedriveQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidRequest(format!("query: {}", e.body_text())))?;
    let channel = channel_filter(query.channel.as_deref())?;
    let redriven = redrive_all_dead(state.store.as_ref(), state.store.now(), channel).await.map_err(ApiError::Store)?;
    tracing::info!(redriven, channel = channel.unwrap_or("(all)"), "dead jobs queued again by an operator");
    Ok(Json(json!({ "redriven": redriven })))
}
