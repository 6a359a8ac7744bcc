//! What every replica runs beside its operations: its clock against the database's, and the
//! `LISTEN` for other replicas' work.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;

use super::CHANNEL;
use crate::store::{Changes, StoreResult, now_millis};

/// How often each replica measures its clock against the database's.
pub(super) const CLOCK_REFRESH: Duration = Duration::from_secs(10);

/// The database's clock minus this machine's, measured across one round trip.
pub(super) async fn measure_offset(pool: &PgPool) -> StoreResult<i64> {
    let before = now_millis();
    let database: i64 =
        sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint").fetch_one(pool).await?;
    let after = now_millis();
    Ok(database - (before + (after - before) / 2))
}

pub(super) async fn keep_clock(pool: PgPool, offset: Arc<AtomicI64>) {
    loop {
        tokio::time::sleep(CLOCK_REFRESH).await;
        if let Ok(measured) = measure_offset(&pool).await {
            offset.store(measured, Ordering::Relaxed);
        }
    }
}

/// The payload of a notification that the outbound queue of `contact` in `channel` moved on.
/// Channel names never hold a `/`, so the first one ends the name whatever the contact id.
pub(super) fn moved_payload(channel: &str, contact: &str) -> String {
    format!("{channel}/{contact}")
}

/// Signals `changes` for every notification of new work. A lost connection may have lost
/// notifications, so a reconnection signals too.
pub(super) async fn listen(mut listener: PgListener, changes: Arc<Changes>) {
    if let Err(e) = listener.listen(CHANNEL).await {
        tracing::warn!(error = %e, "cannot listen for other replicas' work; polling only");
    }
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => {
                changes.signal();
                if let Some((channel, contact)) = notification.payload().split_once('/') {
                    changes.queue_moved(channel, contact);
                }
            }
            // The connection was lost; the next call reconnects and listens again.
            Ok(None) => changes.signal(),
            Err(e) => {
                tracing::debug!(error = %e, "listening for new work failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
