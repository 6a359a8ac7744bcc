//! What the operator reads when something fails says what to do: the start line, upstream
//! refusals, webhook signatures, a database that refuses connections, TLS spoken to plain HTTP.
//! Read as the operator reads them: the compiled binary's log lines and its stderr.

use crate::binary::{RelayProcess, json_logs};
use crate::first_day::lines_with;
use crate::helpers::test_vars;

fn with(vars: &mut Vec<(String, String)>, name: &str, value: &str) {
    vars.retain(|(k, _)| k != name);
    vars.push((name.to_owned(), value.to_owned()));
}

#[tokio::test]
async fn the_start_line_says_the_version_and_which_store_it_opened() {
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars("http://127.0.0.1:9/api/send_message", data.path());
    json_logs(&mut vars);

    let relay = RelayProcess::start(&vars, &[]).await;
    let (_, output) = relay.terminate().await;

    let listening = lines_with(&output, "relay listening");
    assert_eq!(listening.len(), 1, "{output:?}");
    assert_eq!(listening[0]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(listening[0]["store"], format!("sqlite://{}/relay.db", data.path().display()));
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn the_start_line_shows_a_postgres_store_without_its_password() {
    let url = crate::postgres::fresh_database().await;
    let mut parsed = url::Url::parse(&url).unwrap();
    parsed.set_password(Some("pa55word-not-shown")).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars("http://127.0.0.1:9/api/send_message", data.path());
    with(&mut vars, "RELAY_DATABASE_URL", &format!("{parsed}?sslmode=disable&application_name=x"));
    json_logs(&mut vars);

    let relay = RelayProcess::start(&vars, &[]).await;
    let (_, output) = relay.terminate().await;

    let listening = lines_with(&output, "relay listening");
    let mut expected = url::Url::parse(&url).unwrap();
    expected.set_query(Some("sslmode=disable&application_name=x"));
    assert_eq!(listening[0]["store"], expected.as_str(), "{output:?}");
    assert!(!output.join("\n").contains("pa55word-not-shown"), "{output:?}");
}
