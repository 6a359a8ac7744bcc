//! PostgreSQL for the tests: a fresh database on the shared test cluster, or a cluster of a
//! test's own (`DedicatedPostgres`) for a test that restarts its database mid-run.
//!
//! Both come from `scripts/test-postgres`. The shared cluster's URL is in
//! `RELAY_TEST_POSTGRES_URL` (`.ci/run` starts it; locally: `scripts/test-postgres start` and
//! `export RELAY_TEST_POSTGRES_URL=$(scripts/test-postgres url)`). Without it, or without
//! PostgreSQL's binaries for a dedicated cluster, a test prints a `NOTICE` and skips, except
//! under CI (`CI` set), where it fails: CI must not go green on tests that did not run.

use std::path::PathBuf;
use std::process::{Output, Stdio};
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

/// A cluster made by hand with initdb and pg_ctl, as another project (or a person) makes one,
/// not by `scripts/test-postgres`. It runs as the user the script runs its servers as (itself,
/// or `relaytest` under root), so the script could stop it if it tried. Stopped and removed on
/// drop.
struct HandMadeCluster {
    parent: tempfile::TempDir,
    /// Where a `RELAY_TEST_PG_DIR` would point: the cluster is its `data/`, as the script's are.
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
}

impl HandMadeCluster {
    /// `None` (after a NOTICE) when the machine has no PostgreSQL binaries, outside CI.
    fn start() -> Option<Self> {
        let found = std::process::Command::new(SCRIPT).arg("bin").output().expect("scripts/test-postgres runs");
        if found.status.code() == Some(NO_BINARIES) {
            return skip("PostgreSQL (initdb, pg_ctl)", "install PostgreSQL's server package");
        }
        assert!(found.status.success(), "scripts/test-postgres bin: {}", describe(&found));
        let bin = PathBuf::from(String::from_utf8(found.stdout).unwrap().trim());
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("cluster");
        std::fs::create_dir(&dir).unwrap();
        let cluster = Self { parent, dir, port: free_port(), bin };
        if let Some((uid, gid)) = cluster.owner() {
            for path in [cluster.parent.path(), &cluster.dir] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
            }
        }
        let data = cluster.dir.join("data");
        cluster.run(
            cluster.owner_command("initdb").args(["--auth=trust", "--username=owner", "--no-sync", "-D"]).arg(&data),
        );
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1", cluster.port, cluster.dir.display());
        cluster.run(
            cluster
                .owner_command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(cluster.dir.join("server.log"))
                .args(["-o", &options, "-w", "start"]),
        );
        assert!(cluster.runs(), "the hand-made cluster runs");
        Some(cluster)
    }

    /// `relaytest`'s user and group ids when the tests run as root (created as the script does
    /// when it is missing).
    fn owner(&self) -> Option<(u32, u32)> {
        let id = |args: &[&str]| {
            let output = std::process::Command::new("id").args(args).output().expect("id runs");
            String::from_utf8(output.stdout).ok()?.trim().parse::<u32>().ok()
        };
        if id(&["-u"]) != Some(0) {
            return None;
        }
        if id(&["-u", "relaytest"]).is_none() {
            // Another test may be creating it right now: what counts is that it exists after.
            let _ = std::process::Command::new("useradd")
                .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "relaytest"])
                .output();
        }
        Some((id(&["-u", "relaytest"]).expect("the user relaytest"), id(&["-g", "relaytest"]).unwrap()))
    }

    /// One of PostgreSQL's programs, run as the cluster's owner.
    fn owner_command(&self, program: &str) -> std::process::Command {
        let program = self.bin.join(program);
        let mut command = if self.owner().is_some() {
            let mut runuser = std::process::Command::new("runuser");
            runuser.args(["-u", "relaytest", "--"]).arg(program);
            runuser
        } else {
            std::process::Command::new(program)
        };
        command.current_dir("/");
        command
    }

    fn run(&self, command: &mut std::process::Command) {
        let output = command.output().expect("PostgreSQL's program runs");
        assert!(output.status.success(), "{command:?}: {}", describe(&output));
    }

    /// Whether its server runs and accepts connections on its port.
    fn runs(&self) -> bool {
        let status = self.owner_command("pg_ctl").arg("-D").arg(self.dir.join("data")).arg("status").output().unwrap();
        let ready =
            self.owner_command("pg_isready").args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()]).status();
        status.status.success() && ready.is_ok_and(|ready| ready.success())
    }
}

impl Drop for HandMadeCluster {
    fn drop(&mut self) {
        let _ = self
            .owner_command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// `scripts/test-postgres <command>` on the cluster in `dir`, on `port` when given.
fn test_postgres(command: &str, dir: &std::path::Path, port: Option<u16>) -> Output {
    let mut script = std::process::Command::new(SCRIPT);
    script.arg(command).env("RELAY_TEST_PG_DIR", dir).stdin(Stdio::null());
    match port {
        Some(port) => script.env("RELAY_TEST_PG_PORT", port.to_string()),
        None => script.env_remove("RELAY_TEST_PG_PORT"),
    };
    script.output().expect("scripts/test-postgres runs")
}

#[test]
fn the_script_never_adopts_or_stops_a_cluster_it_did_not_make() {
    let Some(foreign) = HandMadeCluster::start() else { return };
    let before = std::fs::read_dir(&foreign.dir).unwrap().count();

    // Its directory, whatever the port: every command is refused, and nothing is done there.
    for port in [Some(foreign.port), None] {
        for command in ["stop", "restart", "crash-restart", "start", "status", "psql"] {
            let output = test_postgres(command, &foreign.dir, port);
            let said = describe(&output);
            assert_eq!(output.status.code(), Some(4), "{command} in the hand-made cluster's directory: {said}");
            assert!(said.contains("was not made by scripts/test-postgres"), "{command}: {said}");
            assert!(foreign.runs(), "the hand-made cluster still runs after the script's {command}");
        }
    }
    assert_eq!(std::fs::read_dir(&foreign.dir).unwrap().count(), before, "nothing was written to its directory");

    // A directory of the script's, on the hand-made cluster's port: the server there is not
    // the script's cluster, so it is neither used nor stopped.
    let mine = tempfile::tempdir().unwrap();
    let dir = mine.path().join("cluster");
    for command in ["start", "crash-restart"] {
        let output = test_postgres(command, &dir, Some(foreign.port));
        let said = describe(&output);
        assert_eq!(output.status.code(), Some(4), "{command} on the hand-made cluster's port: {said}");
        assert!(said.contains("is left alone"), "{command}: {said}");
        assert!(foreign.runs(), "the hand-made cluster still runs after the script's {command} on its port");
    }
    for command in ["stop", "status"] {
        let output = test_postgres(command, &dir, Some(foreign.port));
        assert!(foreign.runs(), "the hand-made cluster still runs after the script's {command} on its port");
        assert!(!describe(&output).contains("stopped"), "{command}: {}", describe(&output));
    }
    assert!(!dir.join("data").exists(), "the script made no cluster it could not start");
}
