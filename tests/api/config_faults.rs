//! Configuration and start-up faults, seen as an operator sees them: the compiled binary is
//! started, and each fault must end it quickly with one plain line on stderr naming the culprit.
//!
//! Every run is bounded: by a timeout (a hang fails the test instead of hanging CI) and by a
//! 1 GiB address-space limit (a regression that slurps `/dev/zero` fails instead of eating the
//! machine's memory).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::helpers::{API_TOKEN, test_vars};

use crate::binary::BINARY;
const EXIT_CONFIG: i32 = 2;

/// What the operator sees when the start fails.
struct Failed {
    code: Option<i32>,
    stderr: String,
}

impl Failed {
    /// Asserts the exit code and that stderr is exactly one line mentioning each of `parts`.
    fn assert_one_line(&self, code: i32, parts: &[&str]) {
        assert_eq!(self.code, Some(code), "stderr: {}", self.stderr);
        assert_eq!(self.stderr.lines().count(), 1, "exactly one line on stderr: {:?}", self.stderr);
        assert!(self.stderr.starts_with("bonychat-relay: "), "{}", self.stderr);
        for part in parts {
            assert!(self.stderr.contains(part), "{part:?} missing from {:?}", self.stderr);
        }
    }

    fn assert_hides(&self, secret: &str) {
        assert!(!self.stderr.contains(secret), "{secret} leaked: {}", self.stderr);
    }
}

/// Runs the binary with exactly `vars` and `args` and waits for it to exit, at most 20 s.
async fn run(vars: &[(String, String)], args: &[&str]) -> Failed {
    let child = Command::new("sh")
        .args(["-c", "ulimit -v 1048576 && exec \"$0\" \"$@\"", BINARY])
        .args(args)
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k, v)))
        // Few threads and malloc arenas, so the address-space limit does not depend on how many
        // cores the test machine has (each arena reserves 64 MiB of address space).
        .env("TOKIO_WORKER_THREADS", "2")
        .env("MALLOC_ARENA_MAX", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("binary starts");
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the relay must stop by itself, not hang")
        .unwrap();
    Failed { code: output.status.code(), stderr: String::from_utf8_lossy(&output.stderr).into_owned() }
}

/// The test configuration (which starts) with `name` replaced by `value`, or removed when `None`.
fn vars_with(data: &Path, changes: &[(&str, Option<&str>)]) -> Vec<(String, String)> {
    let mut vars = test_vars("http://127.0.0.1:9/api/send_message", data);
    vars.retain(|(k, _)| !changes.iter().any(|(name, _)| k == name));
    vars.extend(changes.iter().filter_map(|(name, value)| value.map(|v| ((*name).to_owned(), v.to_owned()))));
    vars
}

fn mkfifo(path: &Path) {
    let made = std::process::Command::new("mkfifo").arg(path).status().expect("mkfifo runs");
    assert!(made.success());
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test]
async fn a_secret_file_that_is_a_fifo_stops_the_start_with_one_line_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("api_token");
    mkfifo(&fifo);
    let vars =
        vars_with(dir.path(), &[("BONYCHAT_API_TOKEN", None), ("BONYCHAT_API_TOKEN_FILE", Some(path_str(&fifo)))]);

    let failed = run(&vars, &[]).await;

    failed
        .assert_one_line(EXIT_CONFIG, &[&format!("BONYCHAT_API_TOKEN_FILE: {} is not a regular file", fifo.display())]);
}

#[tokio::test]
async fn a_secret_file_pointing_at_dev_zero_stops_the_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let vars = vars_with(dir.path(), &[("JOINCHAT_API_SECRET", None), ("JOINCHAT_API_SECRET_FILE", Some("/dev/zero"))]);

    let failed = run(&vars, &[]).await;

    failed.assert_one_line(EXIT_CONFIG, &["JOINCHAT_API_SECRET_FILE: /dev/zero is not a regular file"]);
}

#[tokio::test]
async fn a_secret_file_of_10_mib_stops_the_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("app_secret");
    std::fs::write(&big, vec![b'a'; 10 * 1024 * 1024]).unwrap();
    let vars =
        vars_with(dir.path(), &[("MESSENGER_APP_SECRET", None), ("MESSENGER_APP_SECRET_FILE", Some(path_str(&big)))]);

    let failed = run(&vars, &[]).await;

    failed.assert_one_line(EXIT_CONFIG, &["MESSENGER_APP_SECRET_FILE", "is larger than 64 KiB"]);
    failed.assert_hides("aaaa");
}

#[tokio::test]
async fn an_env_file_that_is_dev_zero_stops_the_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let vars = vars_with(dir.path(), &[]);

    let failed = run(&vars, &["--env-file", "/dev/zero"]).await;

    failed.assert_one_line(EXIT_CONFIG, &["--env-file: /dev/zero is not a regular file"]);
}

#[tokio::test]
async fn an_env_file_that_is_a_fifo_stops_the_start_with_one_line_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("relay.env");
    mkfifo(&fifo);
    let vars = vars_with(dir.path(), &[]);

    let failed = run(&vars, &["--env-file", path_str(&fifo)]).await;

    failed.assert_one_line(EXIT_CONFIG, &[&format!("--env-file: {} is not a regular file", fifo.display())]);
}

#[tokio::test]
async fn a_secret_with_an_embedded_newline_stops_the_start_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let vars = vars_with(dir.path(), &[("MESSENGER_VERIFY_TOKEN", Some("first-half\nsecond-half"))]);

    let failed = run(&vars, &[]).await;

    failed.assert_one_line(EXIT_CONFIG, &["MESSENGER_VERIFY_TOKEN", "control character"]);
    failed.assert_hides("first-half");
    failed.assert_hides("second-half");
}

#[tokio::test]
async fn a_secret_file_of_two_lines_stops_the_start_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("joinchat_secret");
    std::fs::write(&file, "first-half\nsecond-half\n").unwrap();
    let vars =
        vars_with(dir.path(), &[("JOINCHAT_API_SECRET", None), ("JOINCHAT_API_SECRET_FILE", Some(path_str(&file)))]);

    let failed = run(&vars, &[]).await;

    failed.assert_one_line(EXIT_CONFIG, &["JOINCHAT_API_SECRET_FILE", "control character"]);
    failed.assert_hides("first-half");
    failed.assert_hides("second-half");
}

/// A secret with a space around it never authenticates (BonyChat sends the token without it):
/// refused at start like a blank one, instead of a relay that answers 401 to everyone.
#[tokio::test]
async fn a_secret_with_a_leading_or_trailing_space_stops_the_start_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    for value in [format!("{API_TOKEN} "), format!(" {API_TOKEN}")] {
        let vars = vars_with(dir.path(), &[("BONYCHAT_API_TOKEN", Some(&value))]);

        let failed = run(&vars, &[]).await;

        failed.assert_one_line(EXIT_CONFIG, &["BONYCHAT_API_TOKEN: starts or ends with whitespace"]);
        failed.assert_hides(API_TOKEN);
    }
}

/// In a secret file, the one line break `echo value > file` writes is not part of the secret;
/// any other whitespace around it is refused, naming the `_FILE` variable.
#[tokio::test]
async fn a_secret_file_with_whitespace_besides_its_final_line_break_stops_the_start_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app_secret");
    for content in ["app-secret-value \n", " app-secret-value\n", "app-secret-value \r\n"] {
        std::fs::write(&file, content).unwrap();
        let vars = vars_with(
            dir.path(),
            &[("MESSENGER_APP_SECRET", None), ("MESSENGER_APP_SECRET_FILE", Some(path_str(&file)))],
        );

        let failed = run(&vars, &[]).await;

        failed.assert_one_line(EXIT_CONFIG, &["MESSENGER_APP_SECRET_FILE: starts or ends with whitespace"]);
        failed.assert_hides("app-secret-value");
    }
}

#[tokio::test]
async fn a_blank_variable_stops_the_start_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let vars = vars_with(dir.path(), &[("BONYCHAT_CHANNEL_ID", Some("   "))]);

    let failed = run(&vars, &[]).await;

    failed.assert_one_line(EXIT_CONFIG, &["BONYCHAT_CHANNEL_ID: is blank"]);
}

#[tokio::test]
async fn an_admin_token_equal_to_the_api_token_stops_the_start_without_echoing_either() {
    let dir = tempfile::tempdir().unwrap();
    let vars = vars_with(dir.path(), &[("RELAY_ADMIN_TOKEN", Some(API_TOKEN))]);

    let failed = run(&vars, &[]).await;

    failed.assert_one_line(EXIT_CONFIG, &["RELAY_ADMIN_TOKEN: must differ from BONYCHAT_API_TOKEN"]);
    failed.assert_hides(API_TOKEN);
}

#[tokio::test]
async fn a_malformed_url_with_credentials_is_named_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let vars = vars_with(dir.path(), &[("BONYCHAT_WEBHOOK_URL", Some("ftp://user:pa55word@bonychat.example/x"))]);

    let failed = run(&vars, &[]).await;

    failed.assert_one_line(EXIT_CONFIG, &["BONYCHAT_WEBHOOK_URL", "***@bonychat.example"]);
    failed.assert_hides("pa55word");
}

#[tokio::test]
async fn a_retry_delay_past_seven_days_stops_the_start_instead_of_overflowing_later() {
    let dir = tempfile::tempdir().unwrap();
    // About 584 million years: parses into a u64 of milliseconds, overflows any clock arithmetic.
    let vars = vars_with(dir.path(), &[("RELAY_RETRY_JOINCHAT", Some("1s,213503982334d"))]);

    let failed = run(&vars, &[]).await;

    failed.assert_one_line(EXIT_CONFIG, &["RELAY_RETRY_JOINCHAT", "7d maximum"]);
}

#[tokio::test]
async fn a_metrics_port_already_in_use_stops_the_start_with_one_plain_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let vars = vars_with(dir.path(), &[("RELAY_METRICS_ADDR", Some(&addr))]);

    let failed = run(&vars, &[]).await;

    failed
        .assert_one_line(1, &[&format!("bonychat-relay: cannot start: RELAY_METRICS_ADDR: cannot listen on {addr}: ")]);
}

#[tokio::test]
async fn a_port_already_in_use_stops_the_start_with_one_plain_line_in_every_log_format() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for format in ["pretty", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let vars = vars_with(dir.path(), &[("RELAY_ADDR", Some(&addr)), ("RELAY_LOG_FORMAT", Some(format))]);

        let failed = run(&vars, &[]).await;

        failed.assert_one_line(1, &[&format!("bonychat-relay: cannot start: RELAY_ADDR: cannot listen on {addr}: ")]);
    }
}

#[tokio::test]
async fn a_store_that_cannot_be_opened_stops_the_start_with_one_plain_line() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the database's directory should be.
    let blocker = dir.path().join("not-a-directory");
    std::fs::write(&blocker, "").unwrap();
    let url = format!("sqlite://{}/relay.db", blocker.display());
    let vars = vars_with(dir.path(), &[("RELAY_DATABASE_URL", Some(&url)), ("RELAY_LOG_FORMAT", Some("json"))]);

    let failed = run(&vars, &[]).await;

    failed.assert_one_line(1, &["bonychat-relay: cannot start: RELAY_DATABASE_URL: "]);
}

/// `sslmode` in the URL is honoured: a database that offers no TLS is refused when the URL
/// requires it (the test cluster has none), with one line and no password.
#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn a_postgres_url_requiring_tls_refuses_a_database_without_it() {
    let url = crate::postgres::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let with_password = url.replacen("postgres://relay@", "postgres://relay:pa55word@", 1);
    let required = format!("{with_password}?sslmode=require");
    let vars = vars_with(dir.path(), &[("RELAY_DATABASE_URL", Some(&required))]);

    let failed = run(&vars, &[]).await;

    failed.assert_one_line(1, &["RELAY_DATABASE_URL: ", "cannot connect to the database"]);
    assert!(failed.stderr.to_lowercase().contains("tls"), "{}", failed.stderr);
    failed.assert_hides("pa55word");
}

/// The store as a relay opens it, at `url`.
fn store_config(url: &str) -> bonychat_relay::config::StoreConfig {
    let env = bonychat_relay::config::Env::from_pairs([("RELAY_DATABASE_URL", url)]);
    bonychat_relay::config::StoreConfig::from_env(&env).unwrap()
}

/// A downgrade gone wrong: the store was migrated by a newer relay (its `user_version` is past
/// what this binary knows). Both the relay and `jobs` refuse it with one line naming both
/// versions, exit 2 like any refused start, and leave the file as it was.
#[tokio::test]
async fn a_sqlite_store_migrated_by_a_newer_relay_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("relay.db");
    let url = format!("sqlite://{}", db.display());
    drop(bonychat_relay::store::open(&store_config(&url)).await.expect("this relay's store"));
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let known: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0)).unwrap();
    let newer = known + 1;
    conn.pragma_update(None, "user_version", newer).unwrap();
    drop(conn);
    let vars = vars_with(dir.path(), &[]);

    let relay = run(&vars, &[]).await;
    let jobs = run(&vars, &["jobs", "list"]).await;

    let found = format!("schema version {newer}, newer than the {known} this bonychat-relay knows");
    relay.assert_one_line(EXIT_CONFIG, &["cannot start: RELAY_DATABASE_URL: ", &found, "run that newer relay"]);
    jobs.assert_one_line(EXIT_CONFIG, &["RELAY_DATABASE_URL: ", &found, "run that newer relay"]);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0)).unwrap();
    assert_eq!(version, newer, "the newer relay's store is left alone");
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn a_postgres_store_migrated_by_a_newer_relay_is_refused_with_exit_2() {
    let url = crate::postgres::fresh_database().await;
    drop(bonychat_relay::store::open(&store_config(&url)).await.expect("this relay's store"));
    let mut connection = crate::postgres::connect(&url).await;
    let known: i32 =
        sqlx::query_scalar("SELECT MAX(version) FROM relay_schema").fetch_one(&mut connection).await.unwrap();
    let newer = known + 1;
    sqlx::query("INSERT INTO relay_schema (version) VALUES ($1)").bind(newer).execute(&mut connection).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vars = vars_with(dir.path(), &[("RELAY_DATABASE_URL", Some(&url))]);

    let relay = run(&vars, &[]).await;
    let jobs = run(&vars, &["jobs", "list"]).await;

    let found = format!("schema version {newer}, newer than the {known} this bonychat-relay knows");
    relay.assert_one_line(EXIT_CONFIG, &["cannot start: RELAY_DATABASE_URL: ", &found, "run that newer relay"]);
    jobs.assert_one_line(EXIT_CONFIG, &["RELAY_DATABASE_URL: ", &found, "run that newer relay"]);
}
