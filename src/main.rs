//! The `bonychat-relay` binary: serves (the default), and the operator's tools beside it:
//! `check-config`, `simulate messenger`, `healthcheck` and `jobs …` on the store. The commands
//! themselves are the library's [`bonychat_relay::cli`]; this reads the arguments and
//! `--env-file`, and answers with the command's exit code.
//!
//! Run with `bonychat-relay --env-file config/sandbox.env` to try it without any account, or
//! `--env-file config/example.env` (edited) in production.

use std::process::ExitCode;

use bonychat_relay::cli::simulate::SimulateCommand;
use bonychat_relay::cli::{self, Cli, Command, check_config, healthcheck, jobs, serve, simulate};
use bonychat_relay::config::Env;
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Cli::parse();
    let mut env = Env::from_process();
    if let Some(path) = &args.env_file {
        env = match env.with_env_file(path) {
            Ok(env) => env,
            // Docker reserves exit code 2 in health checks.
            Err(e) if matches!(args.command, Some(Command::Healthcheck { .. })) => {
                eprintln!("unhealthy: {e}");
                return ExitCode::FAILURE;
            }
            Err(e) => return cli::config_error(&e),
        };
    }
    match args.command.unwrap_or(Command::Serve) {
        Command::Serve => serve::run(&env).await,
        Command::Jobs { action } => jobs::run(&env, action).await,
        Command::CheckConfig => check_config::run(&env),
        Command::Simulate { upstream: SimulateCommand::Messenger(args) } => simulate::messenger(&env, args).await,
        Command::Healthcheck { url } => healthcheck::run(url, &env).await,
    }
}
