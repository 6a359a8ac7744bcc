//! Building the relay from its configuration and running it until shutdown.
//!
//! [`Application::build`] binds the listener, so tests can ask for port 0 and read the real
//! address; [`Application::run_until_stopped`] takes the shutdown signal as a parameter, so
//! tests can stop the relay without sending the process a signal.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{BearerToken, SecretDigest};
use crate::clients::bonychat::HttpBonyChat;
use crate::clients::graph::GraphProfiles;
use crate::clients::joinchat::HttpJoinChat;
use crate::config::Config;
use crate::delivery::{EchoLedger, ImmediateDelivery, InboundForwarder, OutboundSender, Profiles};
use crate::routes::{AppState, router};
use crate::signing::HubSignature;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("RELAY_ADDR: cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
}

pub struct Application {
    listener: TcpListener,
    router: Router,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    grace: Duration,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let echoes = Arc::new(EchoLedger::default());

        let joinchat = HttpJoinChat::new(&config.joinchat)?;
        let sender = OutboundSender::new(Arc::new(joinchat), &config.joinchat, Arc::clone(&echoes));
        let profiles = match &config.messenger.page_access_token {
            Some(token) => {
                let graph = GraphProfiles::new(&config.messenger, token.clone())?;
                Some(Profiles::new(
                    Arc::new(graph),
                    config.messenger.graph_timeout,
                ))
            }
            None => None,
        };
        let inbound = InboundForwarder::new(
            Arc::new(HttpBonyChat::new(&config.bonychat)?),
            config.bonychat.channel_id.clone(),
            profiles,
            echoes,
            tasks.clone(),
        );

        // Long enough for the slowest synchronous delivery (three attempts and the waits
        // between them), so the deadline only ever cuts off a stuck client.
        let request_timeout = config.joinchat.request_timeout * 3 + Duration::from_secs(10);
        let state = AppState {
            bonychat_token: Arc::new(BearerToken::new(&config.bonychat.api_token)),
            outbound: ImmediateDelivery::new(sender, tasks.clone()),
            hub_signature: Arc::new(HubSignature::new(config.messenger.app_secret.clone())),
            verify_token: Arc::new(SecretDigest::new(&config.messenger.verify_token)),
            inbound: Arc::new(inbound),
            shutdown: shutdown.clone(),
            config: Arc::new(config),
        };
        let addr = state.config.server.addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        Ok(Self {
            listener,
            router: router(state.clone(), request_timeout),
            tasks,
            grace: state.config.server.shutdown_grace,
            shutdown,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `stop` is cancelled, then stops accepting, lets in-flight requests and
    /// deliveries finish within the grace period, and returns.
    pub async fn run_until_stopped(self, stop: CancellationToken) -> io::Result<()> {
        let Self {
            listener,
            router,
            tasks,
            shutdown,
            grace,
        } = self;
        tracing::info!(addr = %listener.local_addr()?, "relay listening");

        let draining = shutdown.clone();
        let mut server = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(draining.cancelled_owned())
                .await
        });
        tokio::select! {
            result = &mut server => return result.unwrap_or_else(|e| Err(io::Error::other(e))),
            () = stop.cancelled() => {}
        }

        tracing::info!(
            grace_secs = grace.as_secs(),
            "shutting down: no new requests, finishing in-flight work"
        );
        shutdown.cancel();
        tasks.close();
        let drained = tokio::time::timeout(grace, async {
            let served = (&mut server).await;
            tasks.wait().await;
            served
        })
        .await;
        match drained {
            Ok(served) => served.unwrap_or_else(|e| Err(io::Error::other(e)))?,
            Err(_) => {
                tracing::warn!(
                    unfinished_deliveries = tasks.len(),
                    "grace period over; stopping anyway"
                );
                server.abort();
            }
        }
        tracing::info!("relay stopped");
        Ok(())
    }
}
