//! The console's pages, rendered on the server (maud escapes every value). No script, no asset
//! from another origin: one stylesheet, served by the relay itself.

use maud::{DOCTYPE, Markup, html};

use crate::store::{AttemptRecord, Direction, Job, JobHistory, JobState, QueueCounts};

/// What a page says above its content after an action.
pub enum Notice {
    Done(String),
    Failed(String),
}

/// The frame of every signed-in page: the navigation, the search box, and sign-out.
pub fn page(title: &str, csrf: &str, notice: Option<&Notice>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header {
                    nav {
                        a href="/admin/" { "Overview" }
                        a href="/admin/dead-letters" { "Dead letters" }
                        form.search method="get" action="/admin/search" {
                            input type="search" name="q" placeholder="mId, mid or contact" aria-label="Search by mId, mid or contact";
                            button type="submit" { "Search" }
                        }
                        form.sign-out method="post" action="/admin/sign-out" {
                            input type="hidden" name="csrf" value=(csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    @match notice {
                        Some(Notice::Done(text)) => p.notice.done role="status" { (text) },
                        Some(Notice::Failed(text)) => p.notice.failed role="alert" { (text) },
                        None => {},
                    }
                    (body)
                }
            }
        }
    }
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · bonychat-relay" }
            link rel="stylesheet" href="/admin/console.css";
        }
    }
}

/// A page outside a session: sign-in and refusals.
pub fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body.bare { main { h1 { (title) } (body) } }
        }
    }
}

pub fn sign_in(csrf: &str, next: &str, problem: Option<&str>) -> Markup {
    bare(
        "Sign in",
        html! {
            @if let Some(problem) = problem { p.notice.failed role="alert" { (problem) } }
            form.sign-in method="post" action="/admin/sign-in" {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="next" value=(next);
                label for="token" { "Admin token (" code { "RELAY_ADMIN_TOKEN" } ")" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// One row of the overview: a channel's queue in one direction.
pub struct QueueRow<'a> {
    pub channel: &'a str,
    pub direction: Direction,
    pub counts: &'a QueueCounts,
    pub delivered_last_hour: u64,
}

pub fn overview(rows: &[QueueRow<'_>], now: i64) -> Markup {
    html! {
        table.overview {
            thead { tr {
                th { "Channel" } th { "Direction" } th.n { "Queued" } th.n { "In flight" } th.n { "Delayed" }
                th.n { "Dead" } th { "Oldest queued" } th.n { "Delivered, last hour" }
            } }
            tbody {
                @for row in rows {
                    @let c = row.counts;
                    tr {
                        td { (row.channel) }
                        td { (row.direction.as_str()) }
                        td.n { (c.ready + c.delayed + c.in_flight) }
                        td.n { (c.in_flight) }
                        td.n { (c.delayed) }
                        td.n {
                            @if c.dead > 0 {
                                a.dead href={ "/admin/dead-letters?channel=" (row.channel) } { (c.dead) }
                            } @else { "0" }
                        }
                        td { @match c.oldest_queued_at { Some(at) => (age(at, now)), None => "—" } }
                        td.n { (row.delivered_last_hour) }
                    }
                }
            }
        }
        p.hint { "Delivered in the last hour counts this replica's deliveries since it started." }
    }
}

/// A list of jobs with, for dead ones, their reason and a retry button.
pub fn job_list(jobs: &[Job], csrf: &str, now: i64, next_page: Option<String>) -> Markup {
    html! {
        @if jobs.is_empty() {
            p.empty { "Nothing here." }
        } @else {
            table.jobs {
                thead { tr {
                    th.n { "Job" } th { "Channel" } th { "Direction" } th { "Contact" } th { "mId / mid" }
                    th { "State" } th.n { "Attempts" } th { "Last change" } th { "Reason" } th {}
                } }
                tbody {
                    @for job in jobs {
                        tr {
                            td.n { a href={ "/admin/job/" (job.id) } { (job.id) } }
                            td { (job.channel) }
                            td { (job.direction.as_str()) }
                            td { code { (job.contact) } }
                            td { code { (job.m_id) } }
                            td { span class={ "state " (job.state.as_str()) } { (state_label(job)) } }
                            td.n { (job.attempts) }
                            td { (age(job.updated_at, now)) }
                            td.reason { (job.last_error.as_deref().unwrap_or("")) }
                            td {
                                @if matches!(job.state, JobState::Dead) {
                                    (retry_button(job.id, csrf))
                                }
                            }
                        }
                    }
                }
            }
            @if let Some(next) = next_page { p.pages { a rel="next" href=(next) { "Older →" } } }
        }
    }
}

pub fn retry_button(id: i64, csrf: &str) -> Markup {
    html! {
        form.inline method="post" action={ "/admin/job/" (id) "/retry" } {
            input type="hidden" name="csrf" value=(csrf);
            button type="submit" { "Retry" }
        }
    }
}

/// The dead letters of one channel or all, with "Redrive all" for each channel that has some.
pub fn dead_letters(channels: &[(String, u64)], shown: Option<&str>, list: Markup, csrf: &str) -> Markup {
    html! {
        form.filter method="get" action="/admin/dead-letters" {
            label for="channel" { "Channel" }
            select #channel name="channel" {
                option value="" selected[shown.is_none()] { "every channel" }
                @for (channel, _) in channels {
                    option value=(channel) selected[shown == Some(channel.as_str())] { (channel) }
                }
            }
            button type="submit" { "Show" }
        }
        div.redrive {
            @for (channel, dead) in channels {
                @if *dead > 0 && shown.is_none_or(|shown| shown == channel) {
                    form.inline method="post" action="/admin/dead-letters/redrive" {
                        input type="hidden" name="csrf" value=(csrf);
                        input type="hidden" name="channel" value=(channel);
                        button type="submit" { "Redrive all " (dead) " of " (channel) }
                    }
                }
            }
        }
        (list)
    }
}

pub fn search(query: &str, list: Markup) -> Markup {
    html! {
        p { "Jobs whose BonyChat " code { "mId" } ", Messenger " code { "mid" } " or contact id is "
            code { (query) } ", newest first." }
        (list)
    }
}

/// A job's page: what it is, what was received, what goes upstream, and every attempt.
pub fn job(history: &JobHistory, received: &str, translated: &[String], csrf: &str, now: i64) -> Markup {
    let job = &history.job;
    html! {
        dl.facts {
            dt { "State" } dd { span class={ "state " (job.state.as_str()) } { (state_label(job)) } }
            dt { "Channel" } dd { (job.channel) }
            dt { "Direction" } dd { (job.direction.as_str()) @if job.direction == Direction::Outbound { " (BonyChat → JoinChat)" } @else { " (Messenger → BonyChat)" } }
            dt { "Contact" } dd { code { (job.contact) } }
            dt { @if job.direction == Direction::Outbound { "BonyChat mId" } @else { "Messenger mid" } } dd { code { (job.m_id) } }
            dt { "Accepted" } dd { (utc(job.created_at)) " (" (age(job.created_at, now)) ")" }
            dt { "Last change" } dd { (utc(job.updated_at)) }
            dt { "Attempts" } dd { (job.attempts) }
            @if job.direction == Direction::Outbound { dt { "Parts sent" } dd { (job.progress) " of " (translated.len()) } }
            @if job.state == JobState::Queued {
                dt { "Next attempt" } dd { (utc(job.next_attempt_at)) }
            }
            @if let Some(error) = &job.last_error { dt { "Last error" } dd.reason { (error) } }
            // What to look the job up by in a trace viewer (SPEC §6): its attempts are spans of it.
            @if let Some(trace_id) = job.trace_context.as_deref().and_then(|trace_context| trace_context.get(3..35)) {
                dt { "Trace" } dd { code { (trace_id) } }
            }
        }
        @if matches!(job.state, JobState::Dead | JobState::Queued) && !job.in_flight {
            (retry_button(job.id, csrf))
        }
        h2 { "Attempts" }
        (attempts(history, now))
        h2 { "Received" }
        pre.payload { (received) }
        h2 { @if job.direction == Direction::Outbound { "JoinChat requests" } @else { "BonyChat webhook post" } }
        @for (i, request) in translated.iter().enumerate() {
            @if translated.len() > 1 { h3 { "Part " (i + 1) } }
            pre.payload { (request) }
        }
    }
}

fn attempts(history: &JobHistory, now: i64) -> Markup {
    let job = &history.job;
    // The delivering attempt is the job itself (only failures are kept as attempts).
    let delivered = (job.state == JobState::Delivered).then(|| AttemptRecord {
        attempt: job.attempts,
        at: job.updated_at,
        outcome: "delivered".into(),
        status: None,
        error: String::new(),
    });
    let shown: Vec<&AttemptRecord> = history.attempts.iter().chain(delivered.as_ref()).collect();
    html! {
        @if shown.is_empty() {
            p.empty { @if job.in_flight { "The first attempt is under way." } @else { "No attempt yet." } }
        } @else {
            @if history.attempts.len() >= crate::store::ATTEMPTS_KEPT { p.hint { "Only the latest attempts are kept." } }
            table.attempts {
                thead { tr { th.n { "#" } th { "Ended" } th { "Outcome" } th.n { "Upstream status" } th { "Error" } } }
                tbody {
                    @for attempt in shown {
                        tr {
                            td.n { @if attempt.outcome == "requeued" { "—" } @else { (attempt.attempt) } }
                            td { (utc(attempt.at)) " (" (age(attempt.at, now)) ")" }
                            td { span class={ "outcome " (attempt.outcome) } { (attempt.outcome) } }
                            td.n { @match attempt.status { Some(status) => (status), None => @if attempt.outcome == "delivered" { "2xx" } @else { "—" } } }
                            td.reason { (attempt.error) }
                        }
                    }
                }
            }
        }
    }
}

fn state_label(job: &Job) -> &'static str {
    match (job.state, job.in_flight) {
        (JobState::Queued, true) => "in flight",
        (state, _) => state.as_str(),
    }
}

/// `2026-12-02 10:15:03 UTC`.
pub fn utc(ms: i64) -> String {
    let seconds = ms.div_euclid(1000);
    let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", of_day / 3600, of_day % 3600 / 60, of_day % 60)
}

/// How long ago `ms` was, roughly: `4 s ago`, `12 min ago`, `3 h ago`, `2 d ago`.
pub fn age(ms: i64, now: i64) -> String {
    let seconds = (now - ms).max(0) / 1000;
    match seconds {
        0..60 => format!("{seconds} s ago"),
        60..3600 => format!("{} min ago", seconds / 60),
        3600..86_400 => format!("{} h ago", seconds / 3600),
        _ => format!("{} d ago", seconds / 86_400),
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Pretty JSON, as a page shows a payload.
pub fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc_dates_and_ages() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_796_208_903_000), "2026-12-02 10:55:03 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(age(1_000, 5_000), "4 s ago");
        assert_eq!(age(0, 12 * 60_000), "12 min ago");
        assert_eq!(age(0, 3 * 3_600_000 + 5), "3 h ago");
        assert_eq!(age(0, 2 * 86_400_000), "2 d ago");
        assert_eq!(age(5_000, 1_000), "0 s ago", "a clock behind reads as now");
    }

    #[test]
    fn values_are_escaped() {
        let markup = search("<script>alert(1)</script>", html! {}).into_string();
        assert!(!markup.contains("<script>"), "{markup}");
        assert!(markup.contains("&lt;script&gt;"), "{markup}");
    }
}
