//! The process signals that stop the relay: SIGTERM (containers) and SIGINT (Ctrl-C).

use tokio::signal;

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
