//! The `bonychat-relay` binary itself, started as an operator would: environment variables
//! only (or an env file), stopped with SIGTERM.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::{API_TOKEN, APP_SECRET, CHANNEL_ID, JOINCHAT_SECRET, PSID, StandIn, VERIFY_TOKEN, test_vars};

pub const BINARY: &str = env!("CARGO_BIN_EXE_bonychat-relay");

/// Runs the binary with exactly `vars` and `args` to completion (at most 30 s: a hang fails
/// the test); returns the exit code, standard output and standard error.
pub async fn run_binary(vars: &[(String, String)], args: &[&str]) -> (Option<i32>, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(BINARY).args(args).env_clear().envs(vars.iter().cloned()).kill_on_drop(true).output(),
    )
    .await
    .expect("the binary ends by itself")
    .expect("the binary runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The variables that put the binary's clocks `offset` off (`+8d`, `-1h`: the machine's clock is
/// wrong) by preloading libfaketime, so that the process is the relay itself (the `faketime`
/// wrapper would fork it, and a kill would leave it running); a constant offset changes no
/// duration, so only the wall clock is wrong to the process. A test that calls this is ignored
/// where libfaketime was missing when it was built (`faketime_tests`, build.rs, which looks in
/// the same places); missing now, it fails.
pub fn clock_off_by(offset: &str) -> Vec<(String, String)> {
    const LIBRARIES: [&str; 2] =
        ["/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"];
    let library = LIBRARIES.into_iter().find(|path| std::path::Path::new(path).is_file()).unwrap_or_else(|| {
        panic!(
            "clock tests need libfaketime ({LIBRARIES:?}): apt-get install faketime (built with `faketime_tests`: \
             it was there, or under CI; `touch build.rs` to build again without it and have them ignored)"
        )
    });
    vec![("LD_PRELOAD".into(), library.into()), ("FAKETIME".into(), offset.into())]
}

pub struct RelayProcess {
    child: Child,
    pub addr: String,
    output: Arc<Mutex<Vec<String>>>,
}

impl RelayProcess {
    /// Starts the binary with exactly `vars` (plus `args`) and waits until it listens.
    pub async fn start(vars: &[(String, String)], args: &[&str]) -> Self {
        Self::start_in(None, vars, args).await
    }

    /// [`Self::start`] with `dir` as the working directory (else the tests').
    pub async fn start_in(dir: Option<&std::path::Path>, vars: &[(String, String)], args: &[&str]) -> Self {
        let mut command = Command::new(BINARY);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let mut child = command
            .args(args)
            .env_clear()
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("binary starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (listening_tx, mut listening_rx) = tokio::sync::mpsc::unbounded_channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = Arc::clone(&output);
            let listening_tx = listening_tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(event) = serde_json::from_str::<Value>(&line)
                        && event["message"] == "relay listening"
                    {
                        let _ = listening_tx.send(event["addr"].as_str().unwrap().to_owned());
                    }
                    output.lock().unwrap().push(line);
                }
            });
        }
        // Only the readers hold a sender now: when the process exits without listening, both
        // end and `recv` gives `None` at once, instead of after the timeout.
        drop(listening_tx);
        let addr = tokio::time::timeout(Duration::from_secs(30), listening_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("relay did not start: {:?}", output.lock().unwrap()))
            .unwrap_or_else(|| panic!("relay exited before listening: {:?}", output.lock().unwrap()));
        Self { child, addr, output }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The most memory the process has held so far (its peak resident set), in bytes.
    pub fn peak_memory(&self) -> u64 {
        let pid = self.child.id().expect("the relay runs");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("Linux /proc");
        let kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kib * 1024
    }

    /// SIGKILL: no shutdown, no flush, as a crash or an OOM kill would do.
    pub async fn kill(mut self) {
        self.child.start_kill().expect("the relay can be killed");
        self.child.wait().await.expect("the relay is reaped");
    }

    /// Sends `signal` (`TERM`, `HUP`, `STOP`, `CONT`, …) to the relay.
    pub async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the relay runs").to_string();
        // The shell's builtin `kill`: present wherever /bin/sh is, unlike /usr/bin/kill.
        let sent = Command::new("sh").args(["-c", &format!("kill -{signal} {pid}")]).status().await.unwrap();
        assert!(sent.success(), "kill -{signal} {pid}");
    }

    /// The lines the relay wrote so far, stdout and stderr.
    pub fn output(&self) -> Vec<String> {
        self.output.lock().unwrap().clone()
    }

    /// Sends SIGTERM and returns the exit code.
    pub async fn terminate(mut self) -> (i32, Vec<String>) {
        self.signal("TERM").await;
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap();
        // Let the readers drain what the process wrote last.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let output = self.output.lock().unwrap().clone();
        (status.code().expect("exited, not killed"), output)
    }
}

pub fn json_logs(vars: &mut Vec<(String, String)>) {
    vars.push(("RELAY_LOG_FORMAT".into(), "json".into()));
    vars.push(("RUST_LOG".into(), "debug".into()));
}

#[tokio::test]
async fn the_binary_relays_a_message_and_exits_cleanly_on_sigterm_without_leaking_secrets() {
    // Arrange
    let joinchat = StandIn::joinchat(JOINCHAT_SECRET).await;
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars(&joinchat.url, data.path());
    json_logs(&mut vars);
    let relay = RelayProcess::start(&vars, &[]).await;
    let http = crate::helpers::http_client();

    // Act
    let answer = http
        .post(relay.url("/message"))
        .bearer_auth(API_TOKEN)
        .json(&json!({"channelId": CHANNEL_ID, "contactId": PSID, "message": {"type": "text", "text": "from the binary"}}))
        .send()
        .await
        .unwrap();
    let refused = http.post(relay.url("/message")).bearer_auth("guessed-token").json(&json!({})).send().await.unwrap();
    let (code, output) = relay.terminate().await;

    // Assert
    assert_eq!(answer.status(), 200);
    assert_eq!(refused.status(), 401);
    let received = joinchat.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].authentic);
    assert_eq!(received[0].json()["message"]["text"], "from the binary");
    assert_eq!(code, 0, "SIGTERM is a clean exit: {output:?}");

    let request_lines: Vec<Value> = output
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["message"] == "request" && event["route"] == "/message")
        .collect();
    assert_eq!(request_lines.len(), 2, "one line per request: {output:?}");
    assert_eq!(request_lines[0]["status"], 200);
    assert!(request_lines[0]["latency_ms"].is_number());
    assert_eq!(request_lines[0]["request_id"].as_str().map(str::len), Some(36), "a request id");
    let all = output.join("\n");
    for secret in [API_TOKEN, JOINCHAT_SECRET, APP_SECRET, VERIFY_TOKEN, "guessed-token"] {
        assert!(!all.contains(secret), "{secret} appeared in the logs");
    }
}

#[tokio::test]
async fn a_missing_variable_stops_the_start_with_one_line_naming_it() {
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars("http://127.0.0.1:9/api/send_message", data.path());
    vars.retain(|(k, _)| k != "JOINCHAT_API_SECRET");

    let output = Command::new(BINARY).env_clear().envs(vars).output().await.unwrap();

    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("JOINCHAT_API_SECRET"), "{stderr}");
}

#[tokio::test]
async fn a_malformed_variable_stops_the_start_without_echoing_secrets() {
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars("http://127.0.0.1:9/api/send_message", data.path());
    vars.retain(|(k, _)| k != "RELAY_DATABASE_URL");
    vars.push(("RELAY_DATABASE_URL".into(), "mysql://relay:hunter2@db/relay".into()));

    let output = Command::new(BINARY).env_clear().envs(vars).output().await.unwrap();

    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("RELAY_DATABASE_URL"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[tokio::test]
async fn the_example_env_file_starts_the_relay_once_its_placeholders_are_replaced() {
    // The README's run command, with the environment overriding the listen address and every
    // placeholder (as filled in by the operator; as shipped, the file is refused: first_day.rs).
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.env");
    let data = tempfile::tempdir().unwrap();
    let mut vars = vec![
        ("RELAY_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("RELAY_METRICS_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("RELAY_DATABASE_URL".to_owned(), format!("sqlite://{}/relay.db", data.path().display())),
    ];
    let placeholders = crate::first_day::example_env_placeholders();
    assert!(placeholders.len() >= 7, "the example's placeholders: {placeholders:?}");
    vars.extend(placeholders.iter().map(|name| (name.clone(), crate::first_day::made_up(name))));
    json_logs(&mut vars);
    let relay = RelayProcess::start(&vars, &["--env-file", example]).await;

    let health = crate::helpers::http_client().get(relay.url("/healthz")).send().await.unwrap();
    let unauthorized = crate::helpers::http_client().post(relay.url("/message")).json(&json!({})).send().await.unwrap();
    let (code, _) = relay.terminate().await;

    assert_eq!(health.status(), 200);
    assert_eq!(unauthorized.status(), 401);
    assert_eq!(code, 0);
}

#[tokio::test]
async fn secrets_can_come_from_files() {
    let joinchat = StandIn::joinchat(JOINCHAT_SECRET).await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("joinchat_secret");
    std::fs::write(&secret_file, format!("{JOINCHAT_SECRET}\n")).unwrap();
    let mut vars = test_vars(&joinchat.url, dir.path());
    vars.retain(|(k, _)| k != "JOINCHAT_API_SECRET");
    vars.push(("JOINCHAT_API_SECRET_FILE".into(), secret_file.to_str().unwrap().into()));
    json_logs(&mut vars);
    let relay = RelayProcess::start(&vars, &[]).await;

    let answer = crate::helpers::http_client()
        .post(relay.url("/message"))
        .bearer_auth(API_TOKEN)
        .json(&json!({"channelId": CHANNEL_ID, "contactId": PSID, "message": {"type": "text", "text": "signed with a file secret"}}))
        .send()
        .await
        .unwrap();
    relay.terminate().await;

    assert_eq!(answer.status(), 200);
    assert!(joinchat.received()[0].authentic);
}

/// SIGHUP (a reload request, a closed terminal) used to end the relay at once, without a drain.
/// It reloads the channels now: the relay keeps serving, says so once per signal, counts it, and
/// still stops cleanly on SIGTERM afterwards.
#[tokio::test]
async fn sighup_reloads_and_sigterm_still_stops_the_relay_cleanly() {
    // Arrange
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars("http://127.0.0.1:9/api/send_message", data.path());
    json_logs(&mut vars);
    let relay = RelayProcess::start(&vars, &[]).await;
    let http = crate::helpers::http_client();

    // Act: two hang-ups, the second once the first was handled (the kernel merges a signal sent
    // while the same one is still pending).
    let logged = |relay: &RelayProcess| {
        relay.output().iter().filter(|line| line.contains("SIGHUP: configuration reloaded")).count()
    };
    for sent in 1..=2 {
        relay.signal("HUP").await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while logged(&relay) < sent && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let health = http.get(relay.url("/healthz")).send().await;
    let (code, output) = relay.terminate().await;

    // Assert
    assert_eq!(health.expect("the relay still serves after SIGHUP").status(), 200);
    let hangups: Vec<Value> = output
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["message"].as_str().is_some_and(|m| m.starts_with("SIGHUP: configuration")))
        .collect();
    assert_eq!(hangups.len(), 2, "one line per SIGHUP: {output:?}");
    assert_eq!(hangups[0]["level"], "INFO");
    assert_eq!(code, 0, "SIGTERM after SIGHUP is still a clean exit: {output:?}");
}
