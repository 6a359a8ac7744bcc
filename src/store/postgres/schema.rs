//! The schema: its migrations, run by one replica at a time, and the version check of the
//! operator's tools.

use sqlx::{AssertSqlSafe, PgPool};

use crate::store::{StoreError, StoreResult};

pub(super) const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/postgres/0001_init.sql"),
    include_str!("../../../migrations/postgres/0002_watermarks_and_depth.sql"),
    include_str!("../../../migrations/postgres/0003_channels.sql"),
    include_str!("../../../migrations/postgres/0004_send_rates.sql"),
    include_str!("../../../migrations/postgres/0005_lighter_intake_count.sql"),
    include_str!("../../../migrations/postgres/0006_console.sql"),
    include_str!("../../../migrations/postgres/0007_traces.sql"),
];

/// Held while migrating, so that replicas starting together migrate one after the other.
pub(super) const MIGRATION_LOCK: i64 = 0x626f_6e79_6368_6174;

pub(super) async fn migrate(pool: &PgPool) -> StoreResult<()> {
    migrate_to(pool, MIGRATIONS.len()).await
}

/// Applies the migrations up to schema version `target`, one replica at a time.
pub(super) async fn migrate_to(pool: &PgPool, target: usize) -> StoreResult<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATION_LOCK).execute(&mut *tx).await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS relay_schema (version INTEGER NOT NULL)").execute(&mut *tx).await?;
    let version: i32 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM relay_schema").fetch_one(&mut *tx).await?;
    let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    if version > known {
        return Err(StoreError::SchemaTooNew { found: version.into(), known: known.into() });
    }
    let pending = MIGRATIONS.iter().take(target);
    for (number, migration) in (1..).zip(pending).skip(usize::try_from(version).unwrap_or(0)) {
        sqlx::raw_sql(AssertSqlSafe(*migration)).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO relay_schema (version) VALUES ($1)").bind(number).execute(&mut *tx).await?;
        tracing::info!(version = number, "database schema migrated");
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn check_version(pool: &PgPool) -> StoreResult<()> {
    let version: Option<i32> = sqlx::query_scalar("SELECT MAX(version) FROM relay_schema")
        .fetch_one(pool)
        .await
        .map_err(|e| StoreError::Unavailable(format!("no relay store in this database ({e}); a relay creates it")))?;
    let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    match version {
        Some(version) if version == known => Ok(()),
        Some(version) if version > known => {
            Err(StoreError::SchemaTooNew { found: version.into(), known: known.into() })
        }
        other => Err(StoreError::Unavailable(format!(
            "the store has schema version {}, this bonychat-relay expects {known}; start the matching relay once first",
            other.unwrap_or(0)
        ))),
    }
}
