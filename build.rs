//! Tells the tests whether PostgreSQL is at hand, when they are built: libtest (and nextest)
//! can skip a test only by its `#[ignore]` attribute, never at run time, and a Postgres test
//! that returned early would be reported `ok` without having run. So each Postgres test carries
//! `#[cfg_attr(not(postgres_tests), ignore = "<why>")]` and the run ends with `N ignored`.
//!
//! - `postgres_clusters`: PostgreSQL's binaries (initdb, pg_ctl) are here, found as
//!   `scripts/test-postgres bin` finds them: the tests can start clusters themselves.
//! - `postgres_tests`: that, or `RELAY_TEST_POSTGRES_URL` names a server to use.
//!
//! - `browser_tests`: `chromedriver` is on PATH (Debian's `chromium-driver`): the console's
//!   browser test can drive a headless Chromium.
//!
//! Under CI (`CI` set, not `false` or `0`) all are always on, so that a CI machine without
//! PostgreSQL fails its Postgres tests loudly instead of ignoring them. Nothing here fails a
//! build: a release build needs no PostgreSQL (and the container image's build has no build.rs,
//! only `src/`). The relay itself never reads these cfgs.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(postgres_tests)");
    println!("cargo::rustc-check-cfg=cfg(postgres_clusters)");
    println!("cargo::rustc-check-cfg=cfg(browser_tests)");
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
    // With the binaries here both cfgs are on whatever these say: they are watched only without
    // them, so that setting or changing RELAY_TEST_POSTGRES_URL does not rebuild the crate.
    if !binaries {
        println!("cargo::rerun-if-env-changed=RELAY_TEST_POSTGRES_URL");
        println!("cargo::rerun-if-env-changed=CI");
    }
    let url = std::env::var("RELAY_TEST_POSTGRES_URL").is_ok_and(|url| !url.is_empty());
    let ci = std::env::var("CI").is_ok_and(|value| !value.is_empty() && value != "false" && value != "0");
    if binaries || ci {
        println!("cargo::rustc-cfg=postgres_clusters");
    }
    if binaries || url || ci {
        println!("cargo::rustc-cfg=postgres_tests");
    }
    let chromedriver = std::env::split_paths(&path).any(|dir| dir.join("chromedriver").is_file());
    if chromedriver || ci {
        println!("cargo::rustc-cfg=browser_tests");
    }
}
