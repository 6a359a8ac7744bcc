//! The operator console (SPEC §6): pages under `/admin/` to see every channel's queues, find a
//! job by its ids or contact, read its attempts, and send dead letters again.
//!
//! Mounted only with `RELAY_ADMIN_TOKEN` set, like the admin API beside it. Every page needs a
//! session ([`session`]); every form carries the session's CSRF token; every answer carries a
//! strict Content-Security-Policy (no script at all, the relay's own stylesheet only) and is
//! never cached. A page reads the store through the same calls as the admin API, each one page
//! at most, so the console costs the same with a million jobs stored.

mod pages;
mod session;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::{FormRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{Markup, html};
use serde::Deserialize;

/// `2026-12-02 10:15:03 UTC`: the console's times, also `jobs list`'s.
pub(crate) use self::pages::utc;
use self::pages::{Notice, QueueRow};
use self::session::{SESSION_COOKIE, SESSION_LIFETIME, SIGN_IN_COOKIE, Session, Sessions};
use super::AppState;
use crate::auth::BearerToken;
use crate::domain::bonychat::WebhookPost;
use crate::domain::channel::is_channel_name;
use crate::domain::joinchat::SendRequest;
use crate::store::{
    Direction, JobHistory, JobQuery, JobState, JobView, Payload, QueueCounts, StoreError, redrive_all_dead,
};

/// Jobs on one page of a list.
const PAGE_SIZE: usize = 50;
/// Forms are a few short fields.
const FORM_LIMIT: usize = 8 * 1024;
/// How long the sign-in form's own cookie lasts.
const SIGN_IN_FORM_LIFETIME: Duration = Duration::from_secs(3600);

/// The console's routes (merged into the router only when `RELAY_ADMIN_TOKEN` is set).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin", get(|| async { Redirect::to("/admin/") }))
        .route("/admin/", get(overview))
        .route("/admin/sign-in", get(sign_in_form).post(sign_in))
        .route("/admin/sign-out", post(sign_out))
        .route("/admin/dead-letters", get(dead_letters))
        .route("/admin/dead-letters/redrive", post(redrive))
        .route("/admin/search", get(search))
        .route("/admin/job/{id}", get(job))
        .route("/admin/job/{id}/retry", post(retry))
        .route("/admin/console.css", get(stylesheet))
        .layer(Extension(Arc::new(Sessions::default())))
        .layer(DefaultBodyLimit::max(FORM_LIMIT))
        .layer(axum::middleware::map_response(security_headers))
}

type Guard = Extension<Arc<Sessions>>;

/// What every console answer carries: nothing but this origin's stylesheet may load, no
/// script runs, no frame holds the page, no referrer leaks an id, nothing is cached.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let set = |headers: &mut HeaderMap, name: &'static str, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(
        headers,
        "content-security-policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; \
         base-uri 'none'",
    );
    set(headers, "x-frame-options", "DENY");
    set(headers, "referrer-policy", "no-referrer");
    set(headers, "cache-control", "no-store");
    set(headers, "cross-origin-opener-policy", "same-origin");
    set(headers, "cross-origin-resource-policy", "same-origin");
    set(headers, "permissions-policy", "camera=(), microphone=(), geolocation=()");
    response
}

/// The signed-in operator of a request, with the token their session was signed under.
struct Operator {
    session: Session,
}

/// The operator of `headers`, or the answer to give instead: 404 when the console is off (a
/// reload removed the token), to the sign-in page for a page, 403 for a form.
fn operator(
    state: &AppState,
    sessions: &Sessions,
    headers: &HeaderMap,
    page: Option<&str>,
) -> Result<Operator, Box<Response>> {
    let directory = state.channels.current();
    let Some(token) = directory.admin_token() else { return Err(Box::new(not_found())) };
    match sessions.session(token, headers, state.store.now()) {
        Some(session) => Ok(Operator { session }),
        None => Err(Box::new(match page {
            Some(page) => Redirect::to(&format!("/admin/sign-in?next={}", encode_query(page))).into_response(),
            None => refusal(
                StatusCode::FORBIDDEN,
                "Signed out",
                "Your session ended: sign in again, then repeat what you did.",
            ),
        })),
    }
}

/// The operator of a page: extracted before the handler runs, or the answer instead (the
/// sign-in form, to come back to this very page afterwards).
struct SignedIn(Operator);

impl axum::extract::FromRequestParts<AppState> for SignedIn {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &AppState) -> Result<Self, Response> {
        let sessions = parts.extensions.get::<Arc<Sessions>>().cloned().expect("the console's layer adds its sessions");
        let page = parts.uri.path_and_query().map_or("/admin/", |page| page.as_str()).to_owned();
        operator(state, &sessions, &parts.headers, Some(&page)).map(SignedIn).map_err(|answer| *answer)
    }
}

fn bad_query() -> Response {
    refusal(StatusCode::BAD_REQUEST, "Bad address", "The page's address has a malformed query.")
}

/// A form's operator, whose CSRF token must be the session's.
fn form_operator(
    state: &AppState,
    sessions: &Sessions,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<Operator, Box<Response>> {
    let operator = operator(state, sessions, headers, None)?;
    if !operator.session.accepts(csrf) {
        tracing::warn!("a console form came without its session's CSRF token; refused");
        return Err(Box::new(csrf_refusal()));
    }
    Ok(operator)
}

fn csrf_refusal() -> Response {
    refusal(
        StatusCode::FORBIDDEN,
        "Form refused",
        "This form did not come from this console's page (its CSRF token is missing or wrong). Reload the page and try again.",
    )
}

fn render(status: StatusCode, markup: Markup) -> Response {
    (status, Html(markup.into_string())).into_response()
}

fn refusal(status: StatusCode, title: &str, text: &str) -> Response {
    render(status, pages::bare(title, html! { p { (text) } p { a href="/admin/" { "Back to the console" } } }))
}

fn not_found() -> Response {
    crate::error::ApiError::NotFound.into_response()
}

fn store_failed(e: &StoreError) -> Response {
    tracing::warn!(error = %e, "a console page could not read the store");
    refusal(StatusCode::SERVICE_UNAVAILABLE, "Store unavailable", &format!("The store did not answer: {e}"))
}

/// `GET /admin/`: every channel's queues, both directions.
async fn overview(State(state): State<AppState>, SignedIn(operator): SignedIn) -> Response {
    let now = state.store.now();
    let counts = match state.store.queue_counts(now).await {
        Ok(counts) => counts,
        Err(e) => return store_failed(&e),
    };
    let directory = state.channels.current();
    let served = |channel: &str| directory.channel(channel).is_some();
    // Every channel served is listed, idle or not; one no longer served only while it has jobs.
    let mut queues: BTreeMap<(String, usize), QueueCounts> = counts
        .into_iter()
        .filter(|(channel, _, c)| served(channel) || c.ready + c.delayed + c.in_flight + c.dead > 0)
        .map(|(channel, direction, counts)| ((channel, direction.index()), counts))
        .collect();
    for name in directory.names().iter() {
        for direction in Direction::ALL {
            queues.entry((name.clone(), direction.index())).or_default();
        }
    }
    let rows: Vec<QueueRow<'_>> = queues
        .iter()
        .map(|((channel, slot), counts)| {
            let direction = Direction::ALL[*slot];
            QueueRow {
                channel,
                direction,
                counts,
                delivered_last_hour: crate::monitoring::delivered_last_hour(channel, direction, now),
            }
        })
        .collect();
    render(StatusCode::OK, pages::page("Queues", &operator.session.csrf(), None, pages::overview(&rows, now)))
}

#[derive(Debug, Deserialize)]
struct DeadQuery {
    channel: Option<String>,
    before: Option<i64>,
    redriven: Option<u64>,
}

/// `GET /admin/dead-letters?channel=…&before=…`: the dead letters, newest first, a page at a time.
async fn dead_letters(
    State(state): State<AppState>,
    SignedIn(operator): SignedIn,
    query: Result<Query<DeadQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else { return bad_query() };
    let channel = query.channel.filter(|channel| !channel.is_empty());
    if channel.as_deref().is_some_and(|name| !is_channel_name(name)) {
        return refusal(StatusCode::BAD_REQUEST, "No such channel", "That is not a channel's name.");
    }
    let now = state.store.now();
    let found = state
        .store
        .find(JobQuery {
            state: Some(JobState::Dead),
            channel: channel.clone(),
            before: query.before,
            limit: PAGE_SIZE + 1,
            ..JobQuery::default()
        })
        .await;
    let counts = state.store.queue_counts(now).await;
    let (mut jobs, counts) = match (found, counts) {
        (Ok(jobs), Ok(counts)) => (jobs, counts),
        (Err(e), _) | (_, Err(e)) => return store_failed(&e),
    };
    let mut dead: BTreeMap<String, u64> =
        state.channels.current().names().iter().map(|name| (name.clone(), 0)).collect();
    for (name, _, counts) in counts {
        *dead.entry(name).or_default() += counts.dead;
    }
    let dead: Vec<(String, u64)> = dead.into_iter().collect();
    let next = next_page(&mut jobs, |before| match &channel {
        Some(channel) => format!("/admin/dead-letters?channel={channel}&before={before}"),
        None => format!("/admin/dead-letters?before={before}"),
    });
    let csrf = operator.session.csrf();
    let notice = query
        .redriven
        .map(|n| Notice::Done(format!("{n} dead letter{} queued again, due now.", if n == 1 { "" } else { "s" })));
    let list = pages::job_list(&jobs, &csrf, now, next);
    let body = pages::dead_letters(&dead, channel.as_deref(), list, &csrf);
    render(StatusCode::OK, pages::page("Dead letters", &csrf, notice.as_ref(), body))
}

/// Keeps the first page of `jobs` (fetched one longer) and says where the next one is.
fn next_page(jobs: &mut Vec<crate::store::Job>, link: impl Fn(i64) -> String) -> Option<String> {
    if jobs.len() <= PAGE_SIZE {
        return None;
    }
    jobs.truncate(PAGE_SIZE);
    jobs.last().map(|last| link(last.id))
}

#[derive(Debug, Deserialize)]
struct RedriveForm {
    #[serde(default)]
    csrf: String,
    channel: String,
}

/// `POST /admin/dead-letters/redrive`: every dead letter of one channel, due now.
async fn redrive(
    State(state): State<AppState>,
    Extension(sessions): Guard,
    headers: HeaderMap,
    form: Result<Form<RedriveForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else { return csrf_refusal() };
    if let Err(answer) = form_operator(&state, &sessions, &headers, &form.csrf) {
        return *answer;
    }
    if !is_channel_name(&form.channel) {
        return refusal(StatusCode::BAD_REQUEST, "No such channel", "That is not a channel's name.");
    }
    match redrive_all_dead(state.store.as_ref(), state.store.now(), Some(&form.channel)).await {
        Ok(redriven) => {
            tracing::info!(redriven, channel = %form.channel, "dead jobs queued again by an operator (console)");
            Redirect::to(&format!("/admin/dead-letters?channel={}&redriven={redriven}", form.channel)).into_response()
        }
        Err(e) => store_failed(&e),
    }
}

#[derive(Debug, Deserialize)]
struct SearchQuery {
    #[serde(default)]
    q: String,
    before: Option<i64>,
}

/// `GET /admin/search?q=…`: jobs by BonyChat `mId`, Messenger `mid` or contact id.
async fn search(
    State(state): State<AppState>,
    SignedIn(operator): SignedIn,
    query: Result<Query<SearchQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else { return bad_query() };
    let csrf = operator.session.csrf();
    let term = query.q.trim();
    if term.is_empty() {
        let body = html! { p { "Type a BonyChat " code { "mId" } ", a Messenger " code { "mid" } " or a contact id in the search box." } };
        return render(StatusCode::OK, pages::page("Search", &csrf, None, body));
    }
    let now = state.store.now();
    let found = state
        .store
        .find(JobQuery {
            search: Some(term.to_owned()),
            before: query.before,
            limit: PAGE_SIZE + 1,
            ..JobQuery::default()
        })
        .await;
    let mut jobs = match found {
        Ok(jobs) => jobs,
        Err(e) => return store_failed(&e),
    };
    let next = next_page(&mut jobs, |before| format!("/admin/search?q={}&before={before}", encode_query(term)));
    let body = pages::search(term, pages::job_list(&jobs, &csrf, now, next));
    render(StatusCode::OK, pages::page("Search", &csrf, None, body))
}

#[derive(Debug, Deserialize)]
struct JobPageQuery {
    retried: Option<u8>,
}

/// `GET /admin/job/{id}`: one job, what it carries and every attempt.
async fn job(
    State(state): State<AppState>,
    SignedIn(operator): SignedIn,
    id: Result<Path<i64>, PathRejection>,
    query: Result<Query<JobPageQuery>, QueryRejection>,
) -> Response {
    let Ok(Path(id)) = id else { return refusal(StatusCode::NOT_FOUND, "No such job", "Job ids are numbers.") };
    let notice =
        query.ok().and_then(|Query(query)| query.retried).map(|_| Notice::Done("Queued again, due now.".into()));
    job_page(&state, &operator, id, StatusCode::OK, notice).await
}

async fn job_page(
    state: &AppState,
    operator: &Operator,
    id: i64,
    status: StatusCode,
    notice: Option<Notice>,
) -> Response {
    let history = match state.store.job_history(id).await {
        Ok(Some(history)) => history,
        Ok(None) => {
            return refusal(
                StatusCode::NOT_FOUND,
                "No such job",
                &format!("There is no job {id} (pruned, or never stored)."),
            );
        }
        Err(e) => return store_failed(&e),
    };
    let received = match JobView::from(&history.job).payload {
        Some(payload) => pages::pretty(&payload),
        None => history.job.payload.as_ref().err().cloned().unwrap_or_default(),
    };
    let translated = translated_requests(state, &history);
    let csrf = operator.session.csrf();
    let body = pages::job(&history, &received, &translated, &csrf, state.store.now());
    render(status, pages::page(&format!("Job {id}"), &csrf, notice.as_ref(), body))
}

/// What the job's attempts send upstream, as its channel is configured now: the JoinChat
/// request of each part (without the pacing `delay` an attempt may add), or the BonyChat post.
fn translated_requests(state: &AppState, history: &JobHistory) -> Vec<String> {
    let job = &history.job;
    let directory = state.channels.current();
    let Some(channel) = directory.channel(&job.channel) else {
        return vec![format!("(channel {} is not served any more)", job.channel)];
    };
    let config = &channel.config;
    let as_json = |bytes: Vec<u8>| {
        serde_json::from_slice::<serde_json::Value>(&bytes).map(|value| pages::pretty(&value)).unwrap_or_default()
    };
    match &job.payload {
        Ok(Payload::Send { recipient, parts }) => parts
            .iter()
            .map(|message| {
                let request = SendRequest {
                    page_id: &config.joinchat.page_id,
                    recipient,
                    message,
                    tag: config.joinchat.message_tag.as_deref(),
                    delay: None,
                };
                as_json(request.to_bytes())
            })
            .collect(),
        Ok(Payload::Event { event }) => {
            let post = WebhookPost {
                channel_id: config.bonychat.channel_id.clone(),
                contact_id: job.contact.clone(),
                events: vec![event.clone()],
                contact: None,
            };
            vec![serde_json::to_value(&post).map(|value| pages::pretty(&value)).unwrap_or_default()]
        }
        Err(reason) => vec![format!("(the stored payload cannot be read: {reason})")],
    }
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /admin/job/{id}/retry`: the job due now, with a fresh retry schedule.
async fn retry(
    State(state): State<AppState>,
    Extension(sessions): Guard,
    headers: HeaderMap,
    id: Result<Path<i64>, PathRejection>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else { return csrf_refusal() };
    let operator = match form_operator(&state, &sessions, &headers, &form.csrf) {
        Ok(operator) => operator,
        Err(answer) => return *answer,
    };
    let Ok(Path(id)) = id else { return refusal(StatusCode::NOT_FOUND, "No such job", "Job ids are numbers.") };
    match state.store.retry(id, state.store.now()).await {
        Ok(_) => {
            tracing::info!(job = id, "job queued again by an operator (console)");
            Redirect::to(&format!("/admin/job/{id}?retried=1")).into_response()
        }
        Err(StoreError::NotFound(_)) => {
            refusal(StatusCode::NOT_FOUND, "No such job", &format!("There is no job {id}."))
        }
        Err(StoreError::Conflict(reason)) => {
            job_page(
                &state,
                &operator,
                id,
                StatusCode::CONFLICT,
                Some(Notice::Failed(format!("Not retried: {reason}."))),
            )
            .await
        }
        Err(e) => store_failed(&e),
    }
}

#[derive(Debug, Deserialize)]
struct SignInQuery {
    next: Option<String>,
}

/// `GET /admin/sign-in`: the form, with a fresh CSRF secret in a cookie of its own.
async fn sign_in_form(
    State(state): State<AppState>,
    Extension(sessions): Guard,
    headers: HeaderMap,
    query: Result<Query<SignInQuery>, QueryRejection>,
) -> Response {
    let directory = state.channels.current();
    let Some(token) = directory.admin_token() else { return not_found() };
    let next = local_page(query.ok().and_then(|Query(query)| query.next).as_deref());
    if sessions.session(token, &headers, state.store.now()).is_some() {
        return Redirect::to(&next).into_response();
    }
    sign_in_page(token, &headers, &next, StatusCode::OK, None)
}

fn sign_in_page(
    token: &BearerToken,
    headers: &HeaderMap,
    next: &str,
    status: StatusCode,
    problem: Option<&str>,
) -> Response {
    let nonce = session::random_nonce();
    let csrf = session::sign_in_csrf(token, &nonce);
    let mut response = render(status, pages::sign_in(&csrf, next, problem));
    let cookie = session::set_cookie(SIGN_IN_COOKIE, &nonce, SIGN_IN_FORM_LIFETIME, session::behind_tls(headers));
    response.headers_mut().append(header::SET_COOKIE, cookie);
    response
}

#[derive(Debug, Deserialize)]
struct SignInForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
    next: Option<String>,
}

/// `POST /admin/sign-in`: the admin token (either live value) starts a session.
async fn sign_in(
    State(state): State<AppState>,
    Extension(sessions): Guard,
    headers: HeaderMap,
    form: Result<Form<SignInForm>, FormRejection>,
) -> Response {
    let directory = state.channels.current();
    let Some(token) = directory.admin_token() else { return not_found() };
    let Ok(Form(form)) = form else { return csrf_refusal() };
    let next = local_page(form.next.as_deref());
    let now = state.store.now();
    if let Some(wait) = sessions.sign_in_wait(now) {
        let seconds = wait.as_secs().max(1);
        let mut response = sign_in_page(
            token,
            &headers,
            &next,
            StatusCode::TOO_MANY_REQUESTS,
            Some(&format!("Too many wrong tokens: wait {seconds} s before trying again.")),
        );
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        return response;
    }
    if !session::sign_in_csrf_accepted(token, &headers, &form.csrf) {
        tracing::warn!("a console sign-in came without its form's CSRF token; refused");
        return sign_in_page(
            token,
            &headers,
            &next,
            StatusCode::FORBIDDEN,
            Some("The sign-in form had expired or did not come from this console: try again."),
        );
    }
    if !token.matches(form.token.trim().as_bytes()) {
        sessions.sign_in_failed(now);
        tracing::warn!("a console sign-in presented a wrong admin token");
        return sign_in_page(token, &headers, &next, StatusCode::UNAUTHORIZED, Some("That is not the admin token."));
    }
    sessions.sign_in_succeeded();
    tracing::info!("an operator signed in to the console");
    let secure = session::behind_tls(&headers);
    let mut response = Redirect::to(&next).into_response();
    let cookies = response.headers_mut();
    cookies.append(
        header::SET_COOKIE,
        session::set_cookie(SESSION_COOKIE, &sessions.issue(token, now), SESSION_LIFETIME, secure),
    );
    cookies.append(header::SET_COOKIE, session::set_cookie(SIGN_IN_COOKIE, "", Duration::ZERO, secure));
    response
}

/// `POST /admin/sign-out`.
async fn sign_out(
    State(state): State<AppState>,
    Extension(sessions): Guard,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else { return csrf_refusal() };
    let operator = match form_operator(&state, &sessions, &headers, &form.csrf) {
        Ok(operator) => operator,
        Err(answer) => return *answer,
    };
    sessions.revoke(&operator.session, state.store.now());
    tracing::info!("an operator signed out of the console");
    let mut response = Redirect::to("/admin/sign-in").into_response();
    let cookie = session::set_cookie(SESSION_COOKIE, "", Duration::ZERO, session::behind_tls(&headers));
    response.headers_mut().append(header::SET_COOKIE, cookie);
    response
}

async fn stylesheet() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], include_str!("console.css")).into_response()
}

/// Where to go after signing in: a console page, never another site (`//host`, `/\host`).
fn local_page(next: Option<&str>) -> String {
    match next {
        Some(next)
            if next.starts_with("/admin/")
                && !next.contains("//")
                && !next.contains('\\')
                && next.chars().all(|c| c.is_ascii_graphic()) =>
        {
            next.to_owned()
        }
        _ => "/admin/".to_owned(),
    }
}

/// Percent-encodes a query value.
fn encode_query(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::local_page;

    #[test]
    fn sign_in_only_leads_back_into_the_console() {
        assert_eq!(local_page(Some("/admin/job/7")), "/admin/job/7");
        for elsewhere in
            ["https://evil.example/", "//evil.example/admin/", "/admin//evil", "/admin/\\evil", "/healthz", ""]
        {
            assert_eq!(local_page(Some(elsewhere)), "/admin/", "{elsewhere}");
        }
        assert_eq!(local_page(None), "/admin/");
    }
}
