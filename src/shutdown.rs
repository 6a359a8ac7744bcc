//! The process signals that stop the relay: SIGTERM (containers) and SIGINT (Ctrl-C); and
//! SIGHUP, which reloads the channels instead (see [`crate::startup::Reloader`]).

use tokio::signal;

/// SIGHUP is what operators and tools (`systemctl reload`, `kill -HUP`) send to make a daemon
/// reload; its default action ends the process at once, with no drain. Listening replaces that
/// action: installed before the store opens, so one arriving during the start does not end it
/// (it is kept, and the reload happens as soon as the relay serves).
pub fn hangups() -> std::io::Result<signal::unix::Signal> {
    signal::unix::signal(signal::unix::SignalKind::hangup())
}

/// Listens for SIGTERM and SIGINT from this call on (not from the first poll: a signal sent as
/// soon as the relay says it listens must drain it, not kill it), and resolves on the first.
pub fn stops() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut interrupt = signal::unix::signal(signal::unix::SignalKind::interrupt())?;
    let mut terminate = signal::unix::signal(signal::unix::SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    })
}
