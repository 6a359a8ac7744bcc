//! The process signals that stop the relay: SIGTERM (containers) and SIGINT (Ctrl-C); and
//! SIGHUP, which must not.

use tokio::signal;

/// SIGHUP is what operators and tools (`systemctl reload`, `kill -HUP`, a closed terminal) send to
/// make a daemon reload; its default action ends the process at once, with no drain. Until the
/// relay can reload, a SIGHUP is logged and changes nothing. Installed before the store opens,
/// so one arriving during the start does not end it either.
pub fn ignore_hangups() -> std::io::Result<()> {
    let mut hangups = signal::unix::signal(signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP received; reloading is not supported yet, nothing changed");
        }
    });
    Ok(())
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
