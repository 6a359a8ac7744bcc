//! Tells the tests what they need is at hand (PostgreSQL, a browser, root, libfaketime, the
//! README's tools), when they are built: libtest (and nextest) can skip a test only by its
//! `#[ignore]` attribute, never at run time, and a test that returned early would be reported
//! `ok` without having run. So each such test carries
//! `#[cfg_attr(not(<cfg>), ignore = "<why, and what to install>")]` and the run ends with
//! `N ignored`. What a test still checks at run time (the tools gone since the build, a mount
//! refused) fails it loudly, saying what is missing.
//!
//! - `postgres_clusters`: PostgreSQL's binaries (initdb, pg_ctl) are here, found as
//!   `scripts/test-postgres bin` finds them: the tests can start clusters themselves.
//! - `postgres_tests`: that, or `RELAY_TEST_POSTGRES_URL` names a server to use.
//!
//! - `browser_tests`: `chromedriver` is on PATH (Debian's `chromium-driver`): the console's
//!   browser test can drive a headless Chromium.
//! - `root_tests`: the build runs as root (effective uid 0): the full and frozen disk tests can
//!   mount a tmpfs and a loop device and `fsfreeze` it (tests/api/store_faults.rs).
//! - `faketime_tests`: libfaketime's library is where `clock_off_by` (tests/api/binary.rs) looks
//!   for it (Debian's `faketime`): the clock tests can start a relay whose clock is wrong.
//! - `readme_tests`: `bash`, `curl` and `openssl` are on PATH: the README's Quick start can be
//!   followed command by command (tests/api/readme.rs).
//!
//! Under CI (`CI` set, not `false` or `0`) all are always on, so that a CI machine without
//! PostgreSQL (or root, libfaketime, curl, …) fails those tests loudly instead of ignoring them;
//! `.ci/run` installs what they need. Nothing here fails a
//! build: a release build needs no PostgreSQL (and the container image's build has no build.rs,
//! only `src/`). The relay itself never reads these cfgs.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(postgres_tests)");
    println!("cargo::rustc-check-cfg=cfg(postgres_clusters)");
    println!("cargo::rustc-check-cfg=cfg(browser_tests)");
    println!("cargo::rustc-check-cfg=cfg(root_tests)");
    println!("cargo::rustc-check-cfg=cfg(faketime_tests)");
    println!("cargo::rustc-check-cfg=cfg(readme_tests)");
    println!("cargo::rerun-if-env-changed=RELAY_TEST_PG_LIBDIR");
    println!("cargo::rerun-if-changed=scripts/test-postgres");
    // Where PostgreSQL appears when it is installed: Debian's per-version directories and the
    // directories of PATH (a directory is watched with everything in it). Only those that exist:
    // cargo runs a build script again on every build while a path it watches is missing.
    let libdir = std::env::var("RELAY_TEST_PG_LIBDIR").unwrap_or_else(|_| "/usr/lib/postgresql".into());
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::iter::once(libdir.into()).chain(std::env::split_paths(&path)) {
        if dir.is_absolute() && dir.is_dir() {
            println!("cargo::rerun-if-changed={}", dir.display());
        }
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-postgres");
    let binaries = match Command::new(&script).arg("bin").output() {
        Ok(output) if output.status.success() || output.status.code() == Some(77) => output.status.success(),
        Ok(output) => {
            let said = String::from_utf8_lossy(&output.stderr);
            println!("cargo::warning=scripts/test-postgres bin failed ({}): {}", output.status, said.trim());
            println!("cargo::warning=the Postgres tests are ignored");
            false
        }
        Err(e) => {
            println!("cargo::warning=cannot run {}: {e}; the Postgres tests are ignored", script.display());
            false
        }
    };
    // With the binaries here both cfgs are on whatever it says: it is watched only without them,
    // so that setting or changing RELAY_TEST_POSTGRES_URL does not rebuild the crate.
    if !binaries {
        println!("cargo::rerun-if-env-changed=RELAY_TEST_POSTGRES_URL");
    }
    let url = std::env::var("RELAY_TEST_POSTGRES_URL").is_ok_and(|url| !url.is_empty());
    let on_path = |program: &str| std::env::split_paths(&path).any(|dir| dir.join(program).is_file());
    let chromedriver = on_path("chromedriver");
    let root = is_root();
    let faketime = libfaketime();
    let readme_tools = ["bash", "curl", "openssl"].into_iter().all(on_path);
    // CI turns on only what is off: it is watched only then, like RELAY_TEST_POSTGRES_URL.
    if !(binaries && chromedriver && root && faketime && readme_tools) {
        println!("cargo::rerun-if-env-changed=CI");
    }
    let ci = std::env::var("CI").is_ok_and(|value| !value.is_empty() && value != "false" && value != "0");
    for (cfg, on) in [
        ("postgres_clusters", binaries),
        ("postgres_tests", binaries || url),
        ("browser_tests", chromedriver),
        ("root_tests", root),
        ("faketime_tests", faketime),
        ("readme_tests", readme_tools),
    ] {
        if on || ci {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}

/// Whether the build runs as root: the effective uid (the second of `Uid:`) of
/// `/proc/self/status`, as tests/api/store_faults.rs checks it again when the tests run. No file
/// tells a build that the user changed: USER (which `sudo` and `su` set) is watched instead.
fn is_root() -> bool {
    println!("cargo::rerun-if-env-changed=USER");
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status.lines().any(|line| line.strip_prefix("Uid:").and_then(|ids| ids.split_whitespace().nth(1)) == Some("0"))
    })
}

/// Whether libfaketime is installed where `clock_off_by` (tests/api/binary.rs) looks for it.
/// Watched: its directory when there, else the directory that directory appears in, when that
/// exists (Debian's `faketime` also puts `faketime` on PATH, which is watched above).
fn libfaketime() -> bool {
    let mut found = false;
    for library in LIBFAKETIME {
        let library = Path::new(library);
        let dir = library.parent().unwrap();
        if let Some(watched) = [dir, dir.parent().unwrap()].into_iter().find(|dir| dir.is_dir()) {
            println!("cargo::rerun-if-changed={}", watched.display());
        }
        found |= library.is_file();
    }
    found
}

/// The same list as `clock_off_by`'s in tests/api/binary.rs.
const LIBFAKETIME: [&str; 2] =
    ["/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"];
