//! `check-config`: the configuration a start would take, printed, or why it would refuse.

use std::process::ExitCode;

use super::config_error;
use crate::config::{Config, Env};

/// Validates exactly as a start would, then stops short of opening the store or binding.
pub fn run(env: &Env) -> ExitCode {
    let config = match Config::from_env(env) {
        Ok(config) => config,
        Err(e) => return config_error(&e),
    };
    for (name, value) in config.effective() {
        println!("{name}={value}");
    }
    // On stderr, so stdout stays a list of NAME=value lines a script can read.
    for warning in &config.warnings {
        eprintln!("bonychat-relay: warning: {warning}");
    }
    ExitCode::SUCCESS
}
