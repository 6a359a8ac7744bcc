//! PostgreSQL for the tests: a fresh database on the shared test cluster, or a cluster of a
//! test's own (`DedicatedPostgres`) for a test that restarts its database mid-run.
//!
//! Both come from `scripts/test-postgres`. The shared cluster's URL is in
//! `RELAY_TEST_POSTGRES_URL` (`.ci/run` starts it; locally: `scripts/test-postgres start` and
//! `export RELAY_TEST_POSTGRES_URL=$(scripts/test-postgres url)`). Without it, or without
//! PostgreSQL's binaries for a dedicated cluster, a test prints a `NOTICE` and skips, except
//! under CI (`CI` set), where it fails: CI must not go green on tests that did not run.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use sqlx::{Connection, PgConnection};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-postgres");
/// `scripts/test-postgres`'s exit code when the machine has no PostgreSQL binaries.
const NO_BINARIES: i32 = 77;

/// Whether this run is CI's, where a test that cannot run must fail instead of skipping.
fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| !value.is_empty() && value != "false" && value != "0")
}

/// Skips (prints a NOTICE, returns `None`) outside CI; fails under CI.
fn skip<T>(why: &str, how: &str) -> Option<T> {
    assert!(!under_ci(), "Postgres tests need {why}: {how}");
    eprintln!("NOTICE: {why} is missing, skipping this Postgres test ({how})");
    None
}

/// A new, empty database on the shared test cluster (`RELAY_TEST_POSTGRES_URL`), and its URL;
/// `None` (after a NOTICE) when there is no cluster, outside CI.
pub async fn fresh_database() -> Option<String> {
    match std::env::var("RELAY_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(create_database(&url).await),
        _ => skip("RELAY_TEST_POSTGRES_URL", "run scripts/test-postgres start"),
    }
}

/// Connects to the server of `server_url`, creates `relay_test_<uuid>` and returns `server_url`
/// with its path replaced by the new database.
async fn create_database(server_url: &str) -> String {
    let mut url = url::Url::parse(server_url).unwrap_or_else(|e| panic!("{server_url} is not a URL: {e}"));
    let name = format!("relay_test_{}", uuid::Uuid::new_v4().simple());
    let mut connection = connect(server_url).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
        .execute(&mut connection)
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on {server_url}: {e}"));
    connection.close().await.ok();
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// One connection to `url`, retried for a few seconds (a cluster may be coming back up).
pub async fn connect(url: &str) -> PgConnection {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match PgConnection::connect(url).await {
            Ok(connection) => return connection,
            Err(e) if tokio::time::Instant::now() >= deadline => panic!("cannot connect to {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A PostgreSQL cluster of one test's own, on a free port, stopped and removed on drop. It is
/// durable (fsync and synchronous commits on), so a test may crash it.
pub struct DedicatedPostgres {
    dir: PathBuf,
    port: u16,
}

impl DedicatedPostgres {
    /// Starts a cluster in a new directory; `None` (after a NOTICE) when the machine has no
    /// PostgreSQL binaries, outside CI.
    pub async fn start() -> Option<Self> {
        let found = tokio::process::Command::new(SCRIPT).arg("bin").output().await.expect("scripts/test-postgres runs");
        if found.status.code() == Some(NO_BINARIES) {
            return skip("PostgreSQL (initdb, pg_ctl)", "install PostgreSQL's server package");
        }
        assert!(found.status.success(), "scripts/test-postgres bin: {}", describe(&found));
        let dir = std::env::temp_dir().join(format!("bonychat-relay-pg-{}", uuid::Uuid::new_v4().simple()));
        // The free port may be taken again before the server binds it: then try another one.
        let mut failures = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let postgres = Self { dir: dir.clone(), port };
            let output = postgres.script("start").await;
            if output.status.success() {
                return Some(postgres);
            }
            failures.push(describe(&output));
            // Dropping `postgres` stops whatever started and removes the directory.
        }
        panic!("a dedicated PostgreSQL did not start: {failures:#?}");
    }

    /// The URL of `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://relay@127.0.0.1:{}/{database}", self.port)
    }

    /// A new, empty database on this cluster, and its URL.
    pub async fn fresh_database(&self) -> String {
        create_database(&self.url("postgres")).await
    }

    /// Restarts the server (fast shutdown, then start): every connection to it is cut.
    pub async fn restart(&self) {
        self.must("restart").await;
    }

    /// Stops the server (fast shutdown): the database is away until [`Self::start_again`].
    pub async fn stop(&self) {
        self.must("stop").await;
    }

    pub async fn start_again(&self) {
        self.must("start").await;
    }

    /// Kills the server without a shutdown (`pg_ctl stop -m immediate`), then starts it again.
    pub async fn crash_restart(&self) {
        self.must("crash-restart").await;
    }

    /// Runs `scripts/test-postgres <command>` on this cluster; the test fails if it fails.
    async fn must(&self, command: &str) {
        let output = self.script(command).await;
        assert!(output.status.success(), "scripts/test-postgres {command}: {}", describe(&output));
    }

    async fn script(&self, command: &str) -> Output {
        tokio::time::timeout(Duration::from_secs(120), self.command(command).output())
            .await
            .unwrap_or_else(|_| panic!("scripts/test-postgres {command} hangs"))
            .expect("scripts/test-postgres runs")
    }

    fn command(&self, command: &str) -> tokio::process::Command {
        let mut script = tokio::process::Command::new(SCRIPT);
        script
            .arg(command)
            .env("RELAY_TEST_PG_DIR", &self.dir)
            .env("RELAY_TEST_PG_PORT", self.port.to_string())
            .env("RELAY_TEST_PG_DURABLE", "1");
        script.kill_on_drop(true);
        script
    }
}

impl Drop for DedicatedPostgres {
    fn drop(&mut self) {
        let stopped = std::process::Command::new(SCRIPT)
            .arg("stop")
            .env("RELAY_TEST_PG_DIR", &self.dir)
            .env("RELAY_TEST_PG_PORT", self.port.to_string())
            .output();
        if let Ok(output) = &stopped
            && !output.status.success()
        {
            eprintln!("scripts/test-postgres stop: {}", describe(output));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().unwrap().port()
}

fn describe(output: &Output) -> String {
    format!("{}\n{}{}", output.status, String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

async fn select_one(url: &str) -> i32 {
    let mut connection = connect(url).await;
    let one = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&mut connection).await.expect("SELECT 1");
    connection.close().await.ok();
    one
}

#[tokio::test]
async fn a_fresh_database_answers() {
    let Some(url) = fresh_database().await else { return };

    assert!(url.contains("/relay_test_"), "{url}");
    assert_eq!(select_one(&url).await, 1);
    let mut connection = connect(&url).await;
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(tables, 0, "a fresh database is empty");
}

#[tokio::test]
async fn a_dedicated_postgres_starts_restarts_and_goes_away() {
    let Some(postgres) = DedicatedPostgres::start().await else { return };
    let url = postgres.fresh_database().await;
    let mut connection = connect(&url).await;
    sqlx::query("CREATE TABLE kept (n int)").execute(&mut connection).await.unwrap();
    sqlx::query("INSERT INTO kept VALUES (1)").execute(&mut connection).await.unwrap();

    postgres.restart().await;

    assert!(
        sqlx::query("SELECT 1").execute(&mut connection).await.is_err(),
        "a restart cuts the connections that were open"
    );
    let mut connection = connect(&url).await;
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM kept").fetch_one(&mut connection).await.unwrap();
    assert_eq!(kept, 1, "committed rows survive the restart");
    postgres.crash_restart().await;
    assert_eq!(select_one(&url).await, 1);

    let dir = postgres.dir.clone();
    drop(postgres);
    assert!(!dir.exists(), "the cluster's directory is removed");
    assert!(PgConnection::connect(&url).await.is_err(), "the cluster is stopped");
}
