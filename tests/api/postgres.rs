//! PostgreSQL for the tests: a fresh database on the suite's cluster, or a cluster of a test's
//! own (`DedicatedPostgres`) for a test that restarts or crashes its database mid-run.
//!
//! The suite's cluster is `RELAY_TEST_POSTGRES_URL` when it is set (a server of your own);
//! otherwise the tests start a throwaway one themselves with `scripts/test-postgres hold` (see
//! [`suite_cluster`]). Whether PostgreSQL is at hand is decided when the tests are built
//! (`build.rs`): without it every Postgres test carries `#[ignore]` with the reason, so the run
//! ends with a count of what was skipped and never reports a test that did not run as `ok`.
//! Under CI (`CI` set) they are never ignored: a missing PostgreSQL fails them.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::{Connection, PgConnection};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-postgres");
/// `scripts/test-postgres`'s exit code when the machine has no PostgreSQL binaries.
const NO_BINARIES: i32 = 77;

/// Why a Postgres test that was not ignored cannot run after all, and what to do: under CI
/// (where build.rs never ignores them) PostgreSQL is missing; elsewhere it was there when the
/// tests were built and is gone.
fn missing(needs: &str) -> String {
    let under_ci = std::env::var("CI").is_ok_and(|value| !value.is_empty() && value != "false" && value != "0");
    if under_ci {
        format!(
            "{needs}: under CI every Postgres test runs; install PostgreSQL's server package (apt-get install postgresql)"
        )
    } else {
        format!(
            "{needs}, which were here when the tests were built: install PostgreSQL again, or `touch build.rs` so that \
             the next build ignores these tests"
        )
    }
}

/// A new, empty database on the suite's cluster, and its URL.
pub async fn fresh_database() -> String {
    let server = match std::env::var("RELAY_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => tokio::task::spawn_blocking(suite_cluster).await.unwrap().unwrap_or_else(|failure| panic!("{failure}")),
    };
    create_database(&server).await
}

/// The URL of the cluster the tests start themselves, started on first use in this process.
///
/// The simplest design that is correct with one test process (`cargo test`) and with one per
/// test (`cargo nextest run`): one cluster shared by every test process, in a directory of its
/// own (`RELAY_TEST_PG_DIR`, default `$TMPDIR/bonychat-relay-suite-pg`, on a free port unless
/// `RELAY_TEST_PG_PORT` names one), never the manual default of `scripts/test-postgres`. A
/// cluster per process would cost an initdb and a start per test under nextest. Each process
/// holds a lease: `scripts/test-postgres hold`, a child whose standard input is a pipe this
/// process keeps open until it exits. The script counts the holders with a shared lock (the
/// kernel drops it with the holder, however it ends), starts the cluster for the first one and
/// stops it (and removes it, if a holder made it) a few seconds after the last one left. The
/// process cannot run code when it exits (statics are never dropped, `atexit` needs unsafe
/// code), but the pipe closes then, whether the tests ended, panicked or were killed; the
/// holder is in a process group of its own so that Ctrl-C reaches only the tests and the
/// holder still stops the cluster. A cluster someone started with `scripts/test-postgres start`
/// in that directory is used and left running.
fn suite_cluster() -> Result<String, String> {
    static SUITE: OnceLock<Result<Holder, String>> = OnceLock::new();
    SUITE.get_or_init(hold).as_ref().map(|holder| holder.url.clone()).map_err(Clone::clone)
}

/// The lease on the suite's cluster: its URL, and the pipe whose end tells the holder to leave.
struct Holder {
    url: String,
    _lease: ChildStdin,
    _child: Child,
}

fn hold() -> Result<Holder, String> {
    let dir = match std::env::var_os("RELAY_TEST_PG_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => std::env::temp_dir().join("bonychat-relay-suite-pg"),
    };
    let mut child = std::process::Command::new(SCRIPT)
        .arg("hold")
        .env("RELAY_TEST_PG_DIR", &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{SCRIPT} hold: {e}"))?;
    let mut url = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut url).map_err(|e| format!("{SCRIPT} hold: {e}"))?;
    // The holder closes its standard error once it has printed the URL, or when it fails.
    let mut messages = String::new();
    child.stderr.take().unwrap().read_to_string(&mut messages).ok();
    if !url.starts_with("postgres://") {
        let status = child.wait().map_err(|e| format!("{SCRIPT} hold: {e}"))?;
        let why =
            format!("the Postgres tests' cluster did not start (scripts/test-postgres hold in {})", dir.display());
        let why = if status.code() == Some(NO_BINARIES) {
            missing(&format!("{why}: they need PostgreSQL's binaries (initdb, pg_ctl) or RELAY_TEST_POSTGRES_URL"))
        } else {
            format!("{why}: {status}")
        };
        return Err(format!("{why}\n{messages}"));
    }
    if !messages.is_empty() {
        eprintln!("{messages}");
    }
    Ok(Holder { url: url.trim().to_owned(), _lease: child.stdin.take().unwrap(), _child: child })
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
    /// Starts a cluster in a new directory. Its tests are ignored where the machine has no
    /// PostgreSQL binaries (`cfg(postgres_clusters)`, from build.rs).
    pub async fn start() -> Self {
        let found = tokio::process::Command::new(SCRIPT).arg("bin").output().await.expect("scripts/test-postgres runs");
        assert!(
            found.status.code() != Some(NO_BINARIES),
            "{}",
            missing("a cluster of a test's own needs PostgreSQL's binaries (initdb, pg_ctl)")
        );
        assert!(found.status.success(), "scripts/test-postgres bin: {}", describe(&found));
        let dir = std::env::temp_dir().join(format!("bonychat-relay-pg-{}", uuid::Uuid::new_v4().simple()));
        // The free port may be taken again before the server binds it: then try another one.
        let mut failures = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let postgres = Self { dir: dir.clone(), port };
            let output = postgres.script("start").await;
            if output.status.success() {
                return postgres;
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

    /// Creates the login role `role` with `password`, which this cluster then asks for (it
    /// trusts every other role, as the script sets it up): for tests of a password the database
    /// refuses.
    pub async fn require_password(&self, role: &str, password: &str) {
        let mut connection = connect(&self.url("postgres")).await;
        sqlx::query(sqlx::AssertSqlSafe(format!(r#"CREATE ROLE "{role}" LOGIN PASSWORD '{password}'"#)))
            .execute(&mut connection)
            .await
            .unwrap();
        let hba = self.dir.join("data/pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).unwrap();
        // The first matching line applies: this one goes before the script's trust lines.
        std::fs::write(&hba, format!("host all {role} 127.0.0.1/32 scram-sha-256\n{rules}")).unwrap();
        sqlx::query("SELECT pg_reload_conf()").execute(&mut connection).await.unwrap();
        connection.close().await.ok();
        // The reload is asynchronous: wait until the server asks the role for its password.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let url = format!("postgres://{role}:not-{password}@127.0.0.1:{}/postgres", self.port);
        while PgConnection::connect(&url).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "the cluster never asked {role} for a password");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn a_fresh_database_answers() {
    let url = fresh_database().await;

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
#[cfg_attr(
    not(postgres_clusters),
    ignore = "no PostgreSQL binaries (initdb, pg_ctl) for a cluster of its own: install postgresql (see README)"
)]
async fn a_dedicated_postgres_starts_restarts_and_goes_away() {
    let postgres = DedicatedPostgres::start().await;
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
    fn start() -> Self {
        let found = std::process::Command::new(SCRIPT).arg("bin").output().expect("scripts/test-postgres runs");
        assert!(found.status.code() != Some(NO_BINARIES), "{}", missing("this test needs PostgreSQL's binaries"));
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
        cluster
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
    script.arg(command).env("RELAY_TEST_PG_DIR", dir).env("RELAY_TEST_PG_LINGER", "0").stdin(Stdio::null());
    match port {
        Some(port) => script.env("RELAY_TEST_PG_PORT", port.to_string()),
        None => script.env_remove("RELAY_TEST_PG_PORT"),
    };
    script.output().expect("scripts/test-postgres runs")
}

#[test]
#[cfg_attr(
    not(postgres_clusters),
    ignore = "no PostgreSQL binaries (initdb, pg_ctl) for a cluster of its own: install postgresql (see README)"
)]
fn the_script_never_adopts_or_stops_a_cluster_it_did_not_make() {
    let foreign = HandMadeCluster::start();
    let before = std::fs::read_dir(&foreign.dir).unwrap().count();

    // Its directory, whatever the port: every command is refused, and nothing is done there.
    for port in [Some(foreign.port), None] {
        for command in ["stop", "restart", "crash-restart", "start", "hold", "status", "psql"] {
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
    for command in ["start", "crash-restart", "hold"] {
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
