//! Why no connection to the database could be had, in the database's own words.
//!
//! sqlx's pool retries a refused connection until its acquire timeout, then says only "pool
//! timed out while waiting for an open connection": whether the server is down, refuses the
//! password, or every connection was busy is lost, and that is what the operator needs to know.
//! So when the pool gives up, one connection is tried directly: its error is the reason shown;
//! its success means the pool's connections were all busy (or the database just came back).
//! The answer is shared for a second, so a burst of failing requests costs one such connection.

use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use tokio::time::Instant;

use super::super::{StoreError, StoreResult};

/// What a pool timeout becomes when a sqlx error is converted ([`StoreError::from`]), until
/// [`Diagnosis::explain`] replaces it with the reason. It should never reach the operator, but
/// says what it can if it does.
pub(super) const NO_CONNECTION: &str = "no connection to the database within RELAY_DATABASE_CONNECT_TIMEOUT_MS";

/// How long one diagnosis is given to everyone who asks.
const SHARED_FOR: Duration = Duration::from_secs(1);

pub(super) struct Diagnosis {
    options: PgConnectOptions,
    pool_size: u32,
    connect_timeout: Duration,
    last: tokio::sync::Mutex<Option<(Instant, String)>>,
}

impl Diagnosis {
    pub(super) fn new(options: PgConnectOptions, pool_size: u32, connect_timeout: Duration) -> Self {
        Self { options, pool_size, connect_timeout, last: tokio::sync::Mutex::new(None) }
    }

    /// `result`, with a pool timeout replaced by why no connection could be had.
    pub(super) async fn explain<T>(&self, pool: &PgPool, result: StoreResult<T>) -> StoreResult<T> {
        match result {
            Err(StoreError::Unavailable(reason)) if reason == NO_CONNECTION => {
                Err(StoreError::Unavailable(self.why(pool, self.connect_timeout, self.connect_timeout).await))
            }
            other => other,
        }
    }

    /// Why `pool` gave no connection within `waited`, found by connecting once directly, for at
    /// most `limit`.
    pub(super) async fn why(&self, pool: &PgPool, waited: Duration, limit: Duration) -> String {
        let mut last = self.last.lock().await;
        if let Some((at, why)) = last.as_ref()
            && at.elapsed() < SHARED_FOR
        {
            return why.clone();
        }
        let pool_was_full = pool.size() >= self.pool_size;
        let why = match tokio::time::timeout(limit, PgConnection::connect_with(&self.options)).await {
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
                if pool_was_full {
                    format!(
                        "no free connection within {} ms: all {} connections of RELAY_DATABASE_POOL_SIZE were busy \
                         (the database accepts more: raise it, or look for slow statements)",
                        waited.as_millis(),
                        self.pool_size
                    )
                } else {
                    format!(
                        "the database took no connection within {} ms, though it accepts one now (was it \
                         restarting?)",
                        waited.as_millis()
                    )
                }
            }
            Ok(Err(e)) => connect_failure(&self.options, &e),
            Err(_) => format!(
                "cannot connect to the database {}: no answer within {} ms (is the host up and reachable, or does a \
                 firewall drop the packets?)",
                target(&self.options),
                limit.as_millis()
            ),
        };
        *last = Some((Instant::now(), why.clone()));
        why
    }
}

/// Why connecting with `options` failed, as the database (or the network) said it: "password
/// authentication failed for user …", "database … does not exist", "Connection refused".
pub(super) fn connect_failure(options: &PgConnectOptions, error: &sqlx::Error) -> String {
    let said = match error {
        sqlx::Error::Database(e) => e.message().to_owned(),
        sqlx::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("{e}: nothing listens there (is PostgreSQL up, on that host and port?)")
        }
        sqlx::Error::Io(e) => e.to_string(),
        sqlx::Error::Tls(e) => format!("TLS: {e} (see sslmode in the URL)"),
        other => other.to_string(),
    };
    format!("cannot connect to the database {}: {said}", target(options))
}

/// `relay at db.internal:5432 as relay`: which database, where, as whom; never the password.
fn target(options: &PgConnectOptions) -> String {
    let database = options.get_database().unwrap_or(options.get_username());
    format!("{database} at {}:{} as {}", options.get_host(), options.get_port(), options.get_username())
}
