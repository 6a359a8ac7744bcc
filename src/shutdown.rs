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

pub async fn signal() {
    let interrupt = async {
        signal::ctrl_c().await.expect("cannot listen for SIGINT");
    };
    let terminate = async {
        signal::unix::signal(signal::unix::SignalKind::terminate()).expect("cannot listen for SIGTERM").recv().await;
    };
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
