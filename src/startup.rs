//! Building the relay from its configuration and running it until shutdown.
//!
//! [`Application::build`] opens the store and binds the listener, so tests can ask for port 0
//! and read the real address; [`Application::run_until_stopped`] takes the shutdown signal as
//! a parameter, so tests can stop the relay without sending the process a signal.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DatabaseUrl, Reloaded, ServerLimits};
use crate::delivery::channels::{Clients, Live};
use crate::delivery::{Retries, RetrySchedule, Worker};
use crate::monitoring;
use crate::routes::{AppState, Shared, router};
use crate::server;
use crate::store::{self, Store, StoreError};
use crate::traces::Traces;

/// Bounds each request of the routes that store nothing (probes, the handshake, the admin
/// API), so a stuck one cannot hold up a shutdown; `/message` and the webhook bound their own
/// phases (body read, store admission, `RELAY_SEND_WAIT_MS`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the last spans may take to reach the collector at shutdown.
const TRACES_FLUSH_WAIT: Duration = Duration::from_secs(5);
/// How often delivered jobs past their retention are deleted.
const PRUNE_INTERVAL: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("RELAY_ADDR: cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("RELAY_METRICS_ADDR: cannot listen on {addr}: {source}")]
    MetricsBind { addr: SocketAddr, source: io::Error },
    #[error("RELAY_DATABASE_URL: {0}")]
    Store(StoreError),
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT: {0}")]
    Traces(String),
}

impl StartupError {
    /// Whether the start was refused rather than failed: the store was migrated by a newer
    /// relay, which no retry of this one can change.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Store(StoreError::SchemaTooNew { .. }))
    }
}

pub struct Application {
    reloader: Reloader,
    listener: TcpListener,
    metrics: TcpListener,
    router: Router,
    store: Arc<dyn Store>,
    worker: Arc<Worker>,
    shutdown: CancellationToken,
    grace: Duration,
    retention: Duration,
    limits: ServerLimits,
    /// Which store was opened, as the start log line shows it ([`DatabaseUrl::shown`]).
    store_shown: String,
    traces: Traces,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        // Before anything records: the facade drops what arrives before a recorder is installed.
        monitoring::handle();
        let store_shown = config.store.database_url.shown();
        // A SQLite file missing before the start is created empty: said out loud, since a
        // relative path run from another directory (or a typo) lands there too, and the queued
        // jobs would seem gone.
        let new_file = match &config.store.database_url {
            DatabaseUrl::Sqlite(path) => !path.exists(),
            DatabaseUrl::Postgres(_) => false,
        };
        let store = store::open(&config.store).await.map_err(StartupError::Store)?;
        if new_file {
            tracing::warn!(
                store = %store_shown,
                "created a new, empty store: expected on the first start with this RELAY_DATABASE_URL; otherwise it \
                 names another file than before (a relative sqlite:// path is relative to the working directory)"
            );
        }

        let clients = Clients::new(&config.upstreams)?;
        let channels =
            Arc::new(Live::new(&config.channels, config.server.admin_token.as_ref(), clients, Arc::clone(&store)));
        let traces = Traces::start(config.telemetry.traces.as_ref()).map_err(StartupError::Traces)?;
        let worker = Arc::new(worker(&config, Arc::clone(&store), Arc::clone(&channels)).with_traces(traces.clone()));

        let shutdown = CancellationToken::new();
        let state = AppState::new(Shared {
            admin_enabled: config.server.admin_token.is_some(),
            channels: Arc::clone(&channels),
            store: Arc::clone(&store),
            worker: Arc::clone(&worker),
            shutdown: shutdown.clone(),
            traces: traces.clone(),
            config,
        });
        let addr = state.config.server.addr;
        let listener = TcpListener::bind(addr).await.map_err(|source| StartupError::Bind { addr, source })?;
        let addr = state.config.telemetry.metrics_addr;
        let metrics = TcpListener::bind(addr).await.map_err(|source| StartupError::MetricsBind { addr, source })?;
        Ok(Self {
            reloader: Reloader { config: Arc::new(state.config.clone()), channels },
            listener,
            metrics,
            router: router(state.clone(), REQUEST_TIMEOUT),
            store,
            worker,
            grace: state.config.server.shutdown_grace,
            retention: state.config.store.retention,
            limits: state.config.server.limits.clone(),
            store_shown,
            shutdown,
            traces,
        })
    }

    /// What `SIGHUP` calls: re-reads the channels and puts them in effect when valid.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// The store, for tools and tests that inspect jobs.
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Where `GET /metrics` is served (`RELAY_METRICS_ADDR`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics.local_addr().expect("a bound listener has an address")
    }

    /// Serves and delivers until `stop` is cancelled; then stops accepting requests and
    /// claiming jobs, lets in-flight requests and attempts finish within the grace period,
    /// hands the rest back to the store for the next start, and returns.
    pub async fn run_until_stopped(self, stop: CancellationToken) -> io::Result<()> {
        let Self {
            reloader: _,
            listener,
            metrics,
            router,
            store,
            worker,
            shutdown,
            grace,
            retention,
            limits,
            store_shown,
            traces,
        } = self;
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            addr = %listener.local_addr()?,
            metrics_addr = %metrics.local_addr()?,
            store = %store_shown,
            "relay listening"
        );
        let metrics = tokio::spawn(server::serve(
            metrics,
            monitoring::router(Arc::downgrade(&store)),
            server::ConnectionLimits::metrics(&limits),
            CancellationToken::new(),
        ));

        let limits = server::ConnectionLimits::public(&limits);
        let mut server = tokio::spawn(server::serve(listener, router, limits, shutdown.clone()));
        let attempts = worker.attempts().clone();
        let dispatcher = tokio::spawn(Arc::clone(&worker).run(shutdown.clone()));
        let pruner = tokio::spawn(prune_forever(Arc::clone(&store), retention));

        tokio::select! {
            result = &mut server => {
                worker.abort();
                pruner.abort();
                metrics.abort();
                return result.unwrap_or_else(|e| Err(io::Error::other(e)));
            }
            () = stop.cancelled() => {}
        }

        tracing::info!(
            grace_secs = grace.as_secs(),
            "shutting down: no new requests or claims, finishing in-flight work"
        );
        shutdown.cancel();
        pruner.abort();
        metrics.abort();
        let _ = pruner.await;
        let _ = dispatcher.await;
        attempts.close();
        let drained = tokio::time::timeout(grace, async {
            let served = (&mut server).await;
            attempts.wait().await;
            served
        })
        .await;
        match drained {
            Ok(served) => served.unwrap_or_else(|e| Err(io::Error::other(e)))?,
            Err(_) => {
                tracing::warn!(unfinished_attempts = attempts.len(), "grace period over; stopping the rest");
                worker.abort();
                server.abort();
                attempts.wait().await;
            }
        }
        match store.release(worker.owner()).await {
            Ok(0) => {}
            Ok(released) => tracing::info!(jobs = released, "unfinished jobs handed back for the next start"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand unfinished jobs back; their leases will run out");
            }
        }
        if let Err(e) = store.close().await {
            tracing::warn!(error = %e, "cannot save the pacing and echo records; the next start rebuilds them");
        }
        traces.flush(TRACES_FLUSH_WAIT).await;
        tracing::info!("relay stopped");
        Ok(())
    }
}

/// Reloads the channels file and every secret file (SPEC §7).
#[derive(Clone)]
pub struct Reloader {
    config: Arc<Config>,
    channels: Arc<Live>,
}

impl Reloader {
    /// A valid configuration takes over for everything that starts from now on; an invalid one
    /// changes nothing and is logged with the reason. Either way the reloads counter tells.
    pub fn reload(&self) {
        match self.config.reload() {
            Ok(Reloaded { channels, admin_token, warnings }) => {
                for warning in &warnings {
                    tracing::warn!("{warning}");
                }
                let changes = self.channels.replace(&channels, admin_token.as_ref());
                crate::monitoring::config_reload("applied");
                tracing::info!(
                    channels = changes.added.len() + changes.kept,
                    added = ?changes.added,
                    removed = ?changes.removed,
                    "SIGHUP: configuration reloaded"
                );
                if !changes.removed.is_empty() {
                    tracing::warn!(
                        removed = ?changes.removed,
                        "channels removed: they answer 404 and their stored jobs stay queued until they return"
                    );
                }
            }
            Err(e) => {
                crate::monitoring::config_reload("refused");
                tracing::error!(reason = %e, "SIGHUP: configuration refused; the running one stays in effect");
            }
        }
    }
}

/// The workers for `config`, delivering from `store` for `channels`.
pub(crate) fn worker(config: &Config, store: Arc<dyn Store>, channels: Arc<Live>) -> Worker {
    Worker::new(
        store,
        channels,
        Retries {
            joinchat: RetrySchedule::new(config.delivery.retry_joinchat.clone()),
            bonychat: RetrySchedule::new(config.delivery.retry_bonychat.clone()),
        },
        config.delivery.lease,
    )
}

async fn prune_forever(store: Arc<dyn Store>, retention: Duration) {
    loop {
        // The store's clock: on a shared store, a replica whose own clock runs ahead must not
        // delete the history (and the receipts it carries) of every replica.
        let now = store.now();
        let before = now.saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        match store::prune_all(store.as_ref(), before, now).await {
            Ok(0) => {}
            Ok(pruned) => {
                tracing::info!(jobs = pruned, "delivered jobs past their retention deleted");
            }
            Err(e) => tracing::warn!(error = %e, "cannot prune delivered jobs"),
        }
        tokio::time::sleep(PRUNE_INTERVAL).await;
    }
}
