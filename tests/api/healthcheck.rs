//! `bonychat-relay healthcheck`, run as a container runtime runs it: the binary alone, with
//! no configuration in its environment.

use std::process::Output;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::process::Command;

use crate::helpers::spawn_app;

use crate::binary::BINARY;

/// The binary with an empty environment plus `vars`. Async, so the relay under test keeps
/// being served by this test's runtime meanwhile.
async fn healthcheck(args: &[&str], vars: &[(&str, &str)]) -> Output {
    Command::new(BINARY)
        .arg("healthcheck")
        .args(args)
        .env_clear()
        .envs(vars.iter().copied())
        .kill_on_drop(true)
        .output()
        .await
        .expect("binary runs")
}

fn describe(output: &Output) -> String {
    format!(
        "status {:?}, stdout {:?}, stderr {:?}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A server on a free loopback port whose every path answers `status`.
async fn answering(status: StatusCode) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(get(move || async move { (status, "{}") }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/readyz")
}

#[tokio::test]
async fn a_ready_relay_passes() {
    let app = spawn_app().await;
    let output = healthcheck(&[&app.url("/readyz")], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.lines().count(), 1, "one short line: {stdout:?}");
}

#[tokio::test]
async fn without_a_url_it_probes_readyz_at_the_port_of_relay_addr() {
    let app = spawn_app().await;
    // As in a container: the relay listens on the wildcard address, the probe goes to loopback.
    let relay_addr = format!("0.0.0.0:{}", app.addr.port());
    let output = healthcheck(&[], &[("RELAY_ADDR", &relay_addr)]).await;
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("/readyz"), "{}", describe(&output));
}

#[tokio::test]
async fn a_closed_port_fails() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let output = healthcheck(&[&format!("http://127.0.0.1:{port}/readyz")], &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "one short line: {stderr:?}");
    assert!(stderr.starts_with("unhealthy:"), "{stderr:?}");
}

#[tokio::test]
async fn a_503_fails() {
    let url = answering(StatusCode::SERVICE_UNAVAILABLE).await;
    let output = healthcheck(&[&url], &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("503"), "{}", describe(&output));
}

#[tokio::test]
async fn a_relay_that_does_not_answer_fails_within_the_timeout() {
    // Accepts the connection (the kernel does, from the backlog) but never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/readyz", listener.local_addr().unwrap());
    let started = Instant::now();
    let output = healthcheck(&[&url], &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    drop(listener);
}

#[tokio::test]
async fn a_url_it_cannot_probe_fails_with_exit_1() {
    for url in ["not a url", "https://127.0.0.1:9/readyz"] {
        let output = healthcheck(&[url], &[]).await;
        assert_eq!(output.status.code(), Some(1), "{url}: {}", describe(&output));
    }
    let output = healthcheck(&["--env-file", "/nonexistent/relay.env"], &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let output = healthcheck(&[], &[("RELAY_ADDR", "8080")]).await;
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("RELAY_ADDR"), "{}", describe(&output));
}

/// Only plain HTTP is probed: an https:// URL (or any other scheme) is refused at once, with one
/// line saying so, and nothing is even connected to.
#[tokio::test]
async fn an_https_url_is_refused_at_once_without_connecting() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/readyz", listener.local_addr().unwrap());

    let output = healthcheck(&[&url], &[]).await;
    let connected = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await.is_ok();

    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "one short line: {stderr:?}");
    assert!(stderr.starts_with(&format!("unhealthy: {url}: only http:// is supported, not https://")), "{stderr:?}");
    assert!(!connected, "the probe connected to an https:// URL it cannot speak to");
}

/// Without a URL, the probe goes where the relay is configured to listen, read from `--env-file`
/// as the relay reads it: an address of its own (here 127.0.0.2, where 127.0.0.1 answers
/// nothing on that port), or the loopback of the family of a wildcard address.
#[tokio::test]
async fn without_a_url_it_probes_the_address_relay_addr_names_in_the_env_file() {
    let dir = tempfile::tempdir().unwrap();
    for (listen, configured, probed) in [
        ("127.0.0.2:0", "127.0.0.2:{port}", "http://127.0.0.2:{port}/readyz"),
        ("[::1]:0", "[::]:{port}", "http://[::1]:{port}/readyz"),
        ("127.0.0.1:0", "0.0.0.0:{port}", "http://127.0.0.1:{port}/readyz"),
    ] {
        let app = crate::helpers::spawn_app_with(&[("RELAY_ADDR", listen)]).await;
        let port = app.addr.port().to_string();
        let env_file = dir.path().join("relay.env");
        std::fs::write(
            &env_file,
            format!("# the relay's own file\nRELAY_ADDR={}\n", configured.replace("{port}", &port)),
        )
        .unwrap();

        let output = healthcheck(&["--env-file", env_file.to_str().unwrap()], &[]).await;

        assert_eq!(output.status.code(), Some(0), "{listen}: {}", describe(&output));
        let expected = format!("healthy: {} answered 200\n", probed.replace("{port}", &port));
        assert_eq!(String::from_utf8_lossy(&output.stdout), expected, "{listen}");
        app.stop().await;
    }
}
