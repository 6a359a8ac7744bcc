//! An operator's first day without surprises: the mistakes a new user makes on purpose or by
//! accident (a real env file about to be committed, example values left in, a store URL that
//! means another file than intended, colour codes in a log file) are caught, with a message
//! that says what to do.

use std::path::Path;
use std::process::Command;

/// `.gitignore` as git reads it: in a scratch repository holding only that file, so the answer
/// does not depend on this checkout (or on there being one).
fn ignored_by_gitignore(paths: &[&str]) -> Vec<(String, bool)> {
    let scratch = tempfile::tempdir().unwrap();
    let gitignore = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/.gitignore")).unwrap();
    std::fs::write(scratch.path().join(".gitignore"), gitignore).unwrap();
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(scratch.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", scratch.path())
            .output()
            .expect("git runs (the repository is a git repository: git is needed to work on it)")
    };
    assert!(git(&["init", "-q"]).status.success());
    paths
        .iter()
        .map(|path| {
            let answer = git(&["check-ignore", "-q", "--no-index", path]);
            // 0: ignored, 1: not ignored, anything else: git failed.
            assert!(matches!(answer.status.code(), Some(0 | 1)), "git check-ignore {path}: {answer:?}");
            ((*path).to_owned(), answer.status.success())
        })
        .collect()
}

#[test]
fn local_env_files_are_git_ignored_and_the_documented_ones_are_not() {
    let local = ["config/relay.env", "config/production.env", ".env", ".env.local"];
    let documented = ["config/example.env", "config/sandbox.env", "config/sandbox-channels.env"];
    for documented in documented {
        assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join(documented).is_file(), "{documented} exists");
    }

    let answers = ignored_by_gitignore(&[&local[..], &documented[..]].concat());

    for (path, ignored) in answers {
        let expected = local.contains(&path.as_str());
        assert_eq!(ignored, expected, "{path}: ignored is {ignored}, expected {expected}");
    }
}

const EXAMPLE_ENV: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.env");

/// The variables `config/example.env` leaves for the operator to fill in: a value starting with
/// `change-me`, or a URL on a host reserved for examples.
pub fn example_env_placeholders() -> Vec<String> {
    std::fs::read_to_string(EXAMPLE_ENV)
        .unwrap()
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .filter(|(_, value)| value.starts_with("change-me") || value.contains(".example/"))
        .map(|(name, _)| name.to_owned())
        .collect()
}

/// A value an operator could put in place of `name`'s placeholder.
pub fn made_up(name: &str) -> String {
    match name {
        "JOINCHAT_PAGE_ID" => "100000000000001".to_owned(),
        name if name.ends_with("_URL") => "http://127.0.0.1:9/made-up".to_owned(),
        name => format!("made-up-{}", name.to_ascii_lowercase()),
    }
}

/// `check-config` with `config/example.env`, the environment overriding `vars`.
async fn check_example_env(vars: &[(String, String)]) -> (Option<i32>, String, String) {
    crate::binary::run_binary(vars, &["--env-file", EXAMPLE_ENV, "check-config"]).await
}

#[tokio::test]
async fn the_example_env_file_as_shipped_is_refused_naming_a_placeholder_and_each_one_left_is_named() {
    let placeholders = example_env_placeholders();
    for expected in ["BONYCHAT_API_TOKEN", "JOINCHAT_API_SECRET", "BONYCHAT_WEBHOOK_URL", "BONYCHAT_CHANNEL_ID"] {
        assert!(placeholders.iter().any(|name| name == expected), "{expected} in {placeholders:?}");
    }

    let (code, stdout, stderr) = check_example_env(&[]).await;
    assert_eq!(code, Some(2), "as shipped, the example does not pass: {stdout}{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        placeholders.iter().any(|name| stderr.starts_with(&format!("bonychat-relay: configuration error: {name}: "))),
        "names one of the placeholders: {stderr}"
    );

    for left in &placeholders {
        let filled: Vec<(String, String)> =
            placeholders.iter().filter(|name| *name != left).map(|name| (name.clone(), made_up(name))).collect();
        let (code, _, stderr) = check_example_env(&filled).await;
        assert_eq!(code, Some(2), "{left} left as the example has it: {stderr}");
        assert!(stderr.starts_with(&format!("bonychat-relay: configuration error: {left}: ")), "{stderr}");
        assert!(stderr.contains("placeholder") || stderr.contains("example value"), "{stderr}");
        assert!(!stderr.contains("change-me-"), "the value is not quoted back: {stderr}");
    }

    let every: Vec<(String, String)> = placeholders.iter().map(|name| (name.clone(), made_up(name))).collect();
    let (code, _, stderr) = check_example_env(&every).await;
    assert_eq!(code, Some(0), "every placeholder replaced, it passes: {stderr}");
}

/// The JSON log lines of a relay's output with `message`.
pub fn lines_with(output: &[String], message: &str) -> Vec<serde_json::Value> {
    output
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["message"].as_str().is_some_and(|m| m.starts_with(message)))
        .collect()
}

#[tokio::test]
async fn a_relative_sqlite_url_is_shown_as_the_absolute_file_it_opens_and_a_new_empty_store_is_announced() {
    // The operator runs the relay from a directory of their own with example.env's relative URL.
    let workdir = tempfile::tempdir().unwrap();
    let workdir_path = std::fs::canonicalize(workdir.path()).unwrap();
    let mut vars = crate::helpers::test_vars("http://127.0.0.1:9/api/send_message", workdir.path());
    vars.retain(|(name, _)| name != "RELAY_DATABASE_URL");
    vars.push(("RELAY_DATABASE_URL".into(), "sqlite://data/relay.db".into()));
    crate::binary::json_logs(&mut vars);
    let expected = format!("sqlite://{}/data/relay.db", workdir_path.display());

    let first = crate::binary::RelayProcess::start_in(Some(&workdir_path), &vars, &[]).await;
    let (_, first) = first.terminate().await;
    let again = crate::binary::RelayProcess::start_in(Some(&workdir_path), &vars, &[]).await;
    let (_, again) = again.terminate().await;
    let (code, stdout, stderr) = {
        let output = tokio::process::Command::new(crate::binary::BINARY)
            .arg("check-config")
            .current_dir(&workdir_path)
            .env_clear()
            .envs(vars.iter().cloned())
            .output()
            .await
            .unwrap();
        (output.status.code(), String::from_utf8(output.stdout).unwrap(), String::from_utf8(output.stderr).unwrap())
    };

    assert!(workdir_path.join("data/relay.db").is_file());
    let listening = lines_with(&first, "relay listening");
    assert_eq!(listening.len(), 1, "{first:?}");
    assert_eq!(listening[0]["store"], expected.as_str(), "the start line names the file by its absolute path");
    let created = lines_with(&first, "created a new, empty store");
    assert_eq!(created.len(), 1, "{first:?}");
    assert_eq!(created[0]["level"], "WARN");
    assert_eq!(created[0]["store"], expected.as_str());
    assert_eq!(lines_with(&again, "relay listening")[0]["store"], expected.as_str());
    assert!(lines_with(&again, "created a new").is_empty(), "the second start opens the store it made: {again:?}");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.lines().any(|line| line == format!("RELAY_DATABASE_URL={expected}")), "check-config: {stdout}");
}

#[tokio::test]
async fn a_sqlite_url_that_reads_like_another_file_stops_the_start_saying_which_form_to_write() {
    let workdir = tempfile::tempdir().unwrap();
    let mut vars = crate::helpers::test_vars("http://127.0.0.1:9/api/send_message", workdir.path());
    vars.retain(|(name, _)| name != "RELAY_DATABASE_URL");
    vars.push(("RELAY_DATABASE_URL".into(), "sqlite://var/lib/bonychat-relay/relay.db".into()));

    let output = tokio::process::Command::new(crate::binary::BINARY)
        .current_dir(workdir.path())
        .env_clear()
        .envs(vars.iter().cloned())
        .output()
        .await
        .unwrap();

    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("bonychat-relay: configuration error: RELAY_DATABASE_URL: "), "{stderr}");
    assert!(stderr.contains("sqlite:///var/lib/bonychat-relay/relay.db for that file"), "{stderr}");
    assert!(!workdir.path().join("var").exists(), "no store was created under the working directory");
}

/// Pretty logs written to a pipe (a file, journald, a log shipper) carry no colour codes: the
/// escape sequences would garble every line. A start that fails (the port is taken) after a
/// warning (an unknown variable) writes both kinds of lines.
#[tokio::test]
async fn pretty_logs_written_to_a_pipe_carry_no_colour_codes() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut vars = crate::helpers::test_vars("http://127.0.0.1:9/api/send_message", data.path());
    vars.retain(|(name, _)| name != "RELAY_ADDR");
    vars.push(("RELAY_ADDR".into(), taken.local_addr().unwrap().to_string()));
    vars.push(("RELAY_LOG_FORMAT".into(), "pretty".into()));
    vars.push(("RELAY_ADRR".into(), "a typo, warned about".into()));

    let (code, stdout, stderr) = crate::binary::run_binary(&vars, &[]).await;

    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("WARN") && stdout.contains("RELAY_ADRR"), "the warning is logged: {stdout:?}");
    assert!(stdout.contains("ERROR") && stdout.contains("cannot start"), "the failure is logged: {stdout:?}");
    assert!(!stdout.contains('\u{1b}') && !stderr.contains('\u{1b}'), "no escape sequence: {stdout:?} {stderr:?}");
}
