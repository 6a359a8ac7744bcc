//! Real faults under a running relay (SPEC §5): the database file removed or replaced, a full
//! disk, a frozen disk, a second relay on the same file, the `jobs` command line beside it.
//! Every 200 must mean "on disk and delivered later"; everything else must never be delivered.
//!
//! The full and frozen disks need root (tmpfs and loop mounts, `fsfreeze`), as on CI; built by
//! another user those tests are ignored, with the reason (`root_tests`, build.rs).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::binary::{RelayProcess, run_binary};
use crate::helpers::{PSID, StandIn, TestApp, assert_error, spawn_app_with, test_vars, text, webhook_message};

fn database_url(dir: &Path) -> String {
    format!("sqlite://{}/relay.db", dir.display())
}

async fn readyz(app: &TestApp) -> u16 {
    // A relay stuck on its disk must fail the test, not hang it.
    app.http.get(app.url("/readyz")).timeout(Duration::from_secs(10)).send().await.unwrap().status().as_u16()
}

/// The texts JoinChat accepted, in order.
fn texts_sent(joinchat: &StandIn) -> Vec<String> {
    joinchat.bodies().iter().map(|body| body["message"]["text"].as_str().unwrap_or_default().to_owned()).collect()
}

async fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program).args(args).output().await.map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// A mounted filesystem of the test's own, unmounted (thawed first) when dropped.
struct Mount {
    dir: tempfile::TempDir,
    _image: Option<tempfile::TempDir>,
}

impl Mount {
    /// A tmpfs of `size` (e.g. `8m`), or why it cannot be had here.
    async fn tmpfs(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        run("mount", &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir.path().to_str().unwrap()]).await?;
        Ok(Self { dir, _image: None })
    }

    /// A fresh ext4 filesystem on a loop device (it can be frozen), or why it cannot be had here.
    async fn ext4() -> Result<Self, String> {
        let image_dir = tempfile::tempdir().unwrap();
        let image = image_dir.path().join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(64 * 1024 * 1024).unwrap();
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]).await?;
        let dir = tempfile::tempdir().unwrap();
        run("mount", &["-o", "loop", image.to_str().unwrap(), dir.path().to_str().unwrap()]).await?;
        Ok(Self { dir, _image: Some(image_dir) })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let path = self.dir.path().to_str().unwrap().to_owned();
        let _ = std::process::Command::new("fsfreeze").args(["-u", &path]).stderr(Stdio::null()).status();
        let _ = std::process::Command::new("umount").args(["-l", &path]).status();
    }
}

/// Whether this process runs as root (the effective uid of `/proc/self/status`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status.lines().any(|line| line.strip_prefix("Uid:").and_then(|ids| ids.split_whitespace().nth(1)) == Some("0"))
    })
}

/// The mount a test needs. It is ignored unless built as root (`root_tests`): run as root, a
/// mount that fails is a failure, never a silent pass, and so is a run as another user.
async fn mounted(test: &str, mount: impl std::future::Future<Output = Result<Mount, String>>) -> Mount {
    assert!(
        is_root(),
        "{test}: it needs root for its mounts but runs as another user (built with `root_tests`: as root, or under CI): \
         run the tests as root, or `touch build.rs` and build them again as this user (outside CI) to have it ignored"
    );
    mount.await.unwrap_or_else(|why| panic!("{test}: as root the mount must work: {why}"))
}

#[tokio::test]
async fn a_database_removed_or_replaced_under_the_relay_stops_all_acknowledgements_until_restarted() {
    for fault in ["removed", "replaced"] {
        let app = spawn_app_with(&[]).await;
        let (status, _) = app.send(PSID, text("before")).await;
        assert_eq!(status, 200);
        app.joinchat.wait_for(1).await;

        let db = app.data_dir.path().join("relay.db");
        match fault {
            "removed" => std::fs::remove_file(&db).unwrap(),
            _ => {
                // As a restore or a remount would: another file now sits at the path.
                let copy = app.data_dir.path().join("copy.db");
                std::fs::copy(&db, &copy).unwrap();
                std::fs::rename(&copy, &db).unwrap();
            }
        }

        for attempt in 0..3 {
            let (status, body) = app.send(PSID, text(&format!("after {fault} #{attempt}"))).await;
            assert_error(status, &body, 503, "store_unavailable");
            let webhook =
                app.post_webhook(webhook_message("1066835436691078", &format!("m.{fault}.{attempt}"), "hi")).await;
            let webhook_status = webhook.status();
            assert_eq!(webhook.headers()["retry-after"], "5", "Meta is told to come back");
            assert_error(webhook_status, &webhook.json().await.unwrap(), 503, "store_unavailable");
            assert_eq!(readyz(&app).await, 503, "not ready with the database {fault}");
        }
        if fault == "removed" {
            // A new empty file at the path is not the store the relay had: still not ready.
            std::fs::write(&db, b"").unwrap();
            assert_eq!(readyz(&app).await, 503);
        }

        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(texts_sent(&app.joinchat), ["before"], "nothing answered 503 was sent ({fault})");
        assert!(app.bonychat.received().is_empty());
    }
}

#[tokio::test]
#[cfg_attr(not(root_tests), ignore = "needs root to mount a tmpfs: build and run the tests as root (as CI does)")]
async fn a_full_disk_answers_503_and_readiness_follows_the_disk_back() {
    let test = "a_full_disk_answers_503_and_readiness_follows_the_disk_back";
    let mount = mounted(test, Mount::tmpfs("8m")).await;
    let app = spawn_app_with(&[("RELAY_DATABASE_URL", &database_url(mount.path()))]).await;
    let (status, _) = app.send(PSID, text("before")).await;
    assert_eq!(status, 200);

    // Fill the disk to the last byte.
    let filler = mount.path().join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0_u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let one = [0_u8; 1];
        while file.write_all(&one).is_ok() {}
    }

    let mut refused = Vec::new();
    for i in 0..5 {
        let message = format!("while full #{i}");
        let (status, body) = app.send(PSID, text(&message)).await;
        match status.as_u16() {
            503 => {
                assert_error(status, &body, 503, "store_unavailable");
                refused.push(message);
            }
            other => panic!("a full disk answered {other}: {body}"),
        }
    }
    assert_eq!(readyz(&app).await, 503, "a disk that cannot write is not ready");

    std::fs::remove_file(&filler).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while readyz(&app).await != 200 {
        assert!(tokio::time::Instant::now() < deadline, "ready again once the disk has room");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = app.send(PSID, text("after")).await;
    assert_eq!(status, 200);
    app.settle().await;

    assert_eq!(texts_sent(&app.joinchat), ["before", "after"], "refused: {refused:?}");
    drop(app);
    drop(mount);
}

#[tokio::test]
#[cfg_attr(
    not(root_tests),
    ignore = "needs root to mount an ext4 image on a loop device and fsfreeze it: build and run the tests as root (as CI does)"
)]
async fn a_frozen_disk_refuses_new_work_in_seconds_and_never_delivers_what_it_refused() {
    let test = "a_frozen_disk_refuses_new_work_in_seconds_and_never_delivers_what_it_refused";
    let mount = mounted(test, Mount::ext4()).await;
    let path = mount.path().to_str().unwrap().to_owned();
    let app = spawn_app_with(&[("RELAY_DATABASE_URL", &database_url(mount.path()))]).await;
    let (status, _) = app.send(PSID, text("before")).await;
    assert_eq!(status, 200);

    run("fsfreeze", &["-f", &path]).await.expect("fsfreeze works on an ext4 loop mount");
    let started = tokio::time::Instant::now();
    let send = |i: usize| {
        let (http, url) = (app.http.clone(), app.url("/message"));
        tokio::spawn(async move {
            let message = format!("during the stall #{i}");
            let body = json!({"channelId": crate::helpers::CHANNEL_ID, "contactId": format!("contact{i}"), "message": text(&message)});
            let sent_at = tokio::time::Instant::now();
            let response = http
                .post(url)
                .bearer_auth(crate::helpers::API_TOKEN)
                .json(&body)
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .unwrap();
            let status = response.status();
            (message, status, response.json::<Value>().await.unwrap_or(Value::Null), sent_at.elapsed())
        })
    };
    // The first write may be taken into the commit that the frozen disk holds: it must then be
    // answered with that commit's outcome once the disk thaws, never with an early error.
    let first = send(0);
    let deadline = started + Duration::from_secs(10);
    while readyz(&app).await != 503 {
        assert!(tokio::time::Instant::now() < deadline, "a stalled disk is not ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A commit is stuck now: what arrives next waits behind it and is refused in seconds.
    let queued_behind: Vec<_> = (1..4).map(send).collect();
    let mut accepted = vec!["before".to_owned()];
    for send in queued_behind {
        let (message, status, body, took) = send.await.unwrap();
        assert_error(status, &body, 503, "store_unavailable");
        // The 5 s admission deadline, not the stall (which lasts until the thaw below).
        assert!(
            took >= Duration::from_millis(4500) && took < Duration::from_secs(10),
            "refused after the admission deadline, not after the stall: {took:?} ({message})"
        );
    }
    run("fsfreeze", &["-u", &path]).await.unwrap();
    let (message, status, body, _) = first.await.unwrap();
    match status {
        StatusCode::OK => accepted.push(message),
        StatusCode::SERVICE_UNAVAILABLE => {
            assert_error(status, &body, 503, "store_unavailable");
        }
        other => panic!("a caller was answered {other} ({body}): work it may see delivered later"),
    }
    app.settle().await;

    let mut sent = texts_sent(&app.joinchat);
    sent.sort();
    accepted.sort();
    assert_eq!(sent, accepted, "exactly what was acknowledged is delivered");
    assert_eq!(readyz(&app).await, 200);
    drop(app);
    drop(mount);
}

#[tokio::test]
async fn a_second_relay_on_the_same_store_refuses_to_start_and_the_first_keeps_serving() {
    let joinchat = StandIn::joinchat(crate::helpers::JOINCHAT_SECRET).await;
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars(&joinchat.url, data.path());
    vars.push(("RELAY_LOG_FORMAT".into(), "json".into()));
    let first = RelayProcess::start(&vars, &[]).await;

    let (code, stdout, stderr) = run_binary(&vars, &[]).await;

    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("in use by another relay"), "a clear reason: {stdout} {stderr}");
    let http = crate::helpers::http_client();
    assert_eq!(http.get(first.url("/readyz")).send().await.unwrap().status(), 200);
    let body = json!({"channelId": crate::helpers::CHANNEL_ID, "contactId": PSID, "message": text("still here")});
    let response =
        http.post(first.url("/message")).bearer_auth(crate::helpers::API_TOKEN).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    joinchat.wait_for(1).await;
    first.kill().await;
}

#[tokio::test]
async fn the_jobs_command_refuses_a_store_that_does_not_exist_and_creates_nothing() {
    let data = tempfile::tempdir().unwrap();
    let missing: PathBuf = data.path().join("nowhere/relay.db");
    let vars = vec![("RELAY_DATABASE_URL".to_owned(), format!("sqlite://{}", missing.display()))];

    let (code, _, stderr) = run_binary(&vars, &["jobs", "list"]).await;

    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no store at"), "{stderr}");
    assert!(!missing.exists() && !data.path().join("nowhere").exists(), "nothing created");
}

#[tokio::test]
async fn the_jobs_command_works_beside_a_running_relay_and_says_which_store_it_opened() {
    let joinchat = StandIn::joinchat(crate::helpers::JOINCHAT_SECRET).await;
    // JoinChat refuses everything at first: the message is dead-lettered.
    for _ in 0..4 {
        joinchat.script([crate::helpers::Reply::status(502, "")]);
    }
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars(&joinchat.url, data.path());
    vars.push(("RELAY_LOG_FORMAT".into(), "json".into()));
    let relay = RelayProcess::start(&vars, &[]).await;
    let http = crate::helpers::http_client();
    let body = json!({"channelId": crate::helpers::CHANNEL_ID, "contactId": PSID, "message": text("retry me")});
    let response = http.post(relay.url("/message")).bearer_auth(crate::helpers::API_TOKEN).json(&body).send().await;
    assert_eq!(response.unwrap().status(), 200);
    joinchat.wait_for(4).await;

    let store_vars: Vec<(String, String)> = vars.iter().filter(|(k, _)| k == "RELAY_DATABASE_URL").cloned().collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let dead = loop {
        let (code, stdout, stderr) = run_binary(&store_vars, &["jobs", "list", "--state", "dead", "--json"]).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stderr.contains(&format!("store: sqlite://{}", data.path().join("relay.db").display())), "{stderr}");
        if let Some(line) = stdout.lines().next() {
            break serde_json::from_str::<Value>(line).unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "the job is dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dead["state"], "dead");
    assert_eq!(dead["payload"]["messages"][0]["text"], "retry me");

    let (code, stdout, stderr) = run_binary(&store_vars, &["jobs", "redrive"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), "1 dead job(s) queued again");

    let received = joinchat.wait_for(5).await;
    assert_eq!(received[4].json()["message"]["text"], "retry me", "the running relay delivers the redriven job");
    relay.kill().await;
}

#[tokio::test]
async fn a_second_relay_reaching_the_same_store_by_another_path_is_refused_too() {
    use bonychat_relay::config::{DatabaseUrl, PostgresOptions, StoreConfig};
    use bonychat_relay::store::{self, IntakeCaps};
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("volume");
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, dir.path().join("mounted-here")).unwrap();
    let config = |path: PathBuf| StoreConfig {
        database_url: DatabaseUrl::Sqlite(path),
        retention: Duration::from_secs(86_400),
        intake: IntakeCaps::DEFAULT,
        postgres: PostgresOptions::DEFAULT,
    };
    let _first = store::open(&config(real.join("relay.db"))).await.expect("the first relay opens the store");

    for other in [dir.path().join("mounted-here/relay.db"), real.join("../volume/./relay.db")] {
        let second = store::open(&config(other.clone())).await.err();
        let reason = second.map(|e| e.to_string()).unwrap_or_default();
        assert!(reason.contains("in use by another relay"), "{}: {reason}", other.display());
    }
}
