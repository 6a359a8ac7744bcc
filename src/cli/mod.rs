//! The `bonychat-relay` command line: its arguments, and each command's work. The binary
//! (`main.rs`) only parses the arguments, reads `--env-file` and hands over to one of these:
//!
//! - [`serve`]: run the relay (the default);
//! - the operator's tools beside it: [`check_config`], [`simulate`] (`simulate messenger`),
//!   [`healthcheck`] and [`jobs`] (`jobs list|retry|redrive` on the store).
//!
//! Each returns the process's exit code: 0 on success, 1 on a failure trying again may mend,
//! and [`EXIT_REFUSED`] for a configuration or store it cannot run with (except `healthcheck`,
//! which answers only 0 or 1: Docker reserves 2).

pub mod check_config;
pub mod healthcheck;
pub mod jobs;
pub mod serve;
pub mod simulate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use self::jobs::JobsCommand;
use self::simulate::SimulateCommand;
use crate::config::{ConfigError, Env};

#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    /// Read variables from this file first; variables set in the environment win.
    #[arg(long, value_name = "PATH", global = true)]
    pub env_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the relay (the default).
    Serve,
    /// Inspect and replay the store's jobs (needs only RELAY_DATABASE_URL); works beside a
    /// running relay, on an existing store only.
    Jobs {
        #[command(subcommand)]
        action: JobsCommand,
    },
    /// Validate the environment as a start would and print the configuration in effect, secrets
    /// redacted; exit 2 on an error. Opens no store and binds no port.
    CheckConfig,
    /// Play an upstream against a running relay (the sandbox or a real deployment).
    Simulate {
        #[command(subcommand)]
        upstream: SimulateCommand,
    },
    /// Exit 0 when URL answers 200, 1 otherwise (for container health checks). Needs no
    /// other variable; URL defaults to /readyz at the address RELAY_ADDR names (from the
    /// environment or --env-file), on the loopback when that is a wildcard address.
    Healthcheck {
        /// An http:// URL; default http://<RELAY_ADDR, a wildcard address (0.0.0.0, ::) as the
        /// loopback (127.0.0.1, ::1), else 127.0.0.1:8080>/readyz.
        url: Option<String>,
    },
}

/// Exit code for a start the relay refuses: a configuration it cannot start with, or a store a
/// newer relay migrated. Unlike 1 (a port taken, a database away), trying again will not help.
pub const EXIT_REFUSED: u8 = 2;

/// A configuration the command cannot run with: one line on stderr, and [`EXIT_REFUSED`].
pub fn config_error(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("bonychat-relay: configuration error: {error}");
    ExitCode::from(EXIT_REFUSED)
}

/// The relay's own base URL on this machine, from `RELAY_ADDR` (default port 8080): the
/// loopback when it listens on every interface, else the address it listens on.
fn local_base_url(env: &Env) -> Result<String, ConfigError> {
    let addr = env.parsed("RELAY_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)), |raw| {
        raw.parse::<SocketAddr>().map_err(|_| format!("`{raw}` is not an address such as 0.0.0.0:8080"))
    })?;
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    Ok(format!("http://{}", SocketAddr::new(ip, addr.port())))
}

/// reqwest's own message is only "error sending request": the cause is at the bottom.
fn root_cause(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}
