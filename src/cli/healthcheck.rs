//! `healthcheck`: a container's health probe, answered by the relay's own readiness.

use std::process::ExitCode;
use std::time::Duration;

use super::{local_base_url, root_cause};
use crate::config::Env;

/// Docker and compose wait at most their own timeout (30 s by default) for a health check;
/// a probe that gives up sooner reports why instead of being killed silently.
const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Probes `url` (by default the local relay's `/readyz`): 0 on a 200, 1 on anything else.
pub async fn run(url: Option<String>, env: &Env) -> ExitCode {
    // Docker reserves exit code 2 in health checks, so every failure, a bad URL included, is 1.
    let unhealthy = |reason: &str| {
        eprintln!("unhealthy: {reason}");
        ExitCode::FAILURE
    };
    let url = match url {
        Some(url) => url,
        None => match local_base_url(env) {
            Ok(base) => format!("{base}/readyz"),
            Err(e) => return unhealthy(&e.to_string()),
        },
    };
    // Refused before connecting: the relay's own port serves plain HTTP, and that port is what
    // a container health check is about (a TLS proxy in front of it has health of its own).
    match url::Url::parse(&url) {
        Ok(parsed) if parsed.scheme() == "http" => {}
        Ok(parsed) => {
            return unhealthy(&format!(
                "{url}: only http:// is supported, not {}:// (the health check probes the relay's own port, which serves plain HTTP)",
                parsed.scheme()
            ));
        }
        Err(e) => return unhealthy(&format!("{url} is not a URL ({e}); give an http:// URL")),
    }
    let client = match crate::clients::http::client(HEALTHCHECK_TIMEOUT, HEALTHCHECK_TIMEOUT) {
        Ok(client) => client,
        Err(e) => return unhealthy(&format!("cannot build the HTTP client: {e}")),
    };
    match client.get(&url).send().await {
        Ok(response) if response.status() == reqwest::StatusCode::OK => {
            println!("healthy: {url} answered 200");
            ExitCode::SUCCESS
        }
        Ok(response) => unhealthy(&format!("{url} answered {}", response.status().as_u16())),
        Err(e) => unhealthy(&format!("{url}: {}", root_cause(&e))),
    }
}
