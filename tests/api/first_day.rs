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
