//! Placeholder until the Postgres test helpers land.
use sqlx::Connection;

pub async fn fresh_database() -> Option<String> {
    let url = std::env::var("RELAY_TEST_POSTGRES_URL").ok()?;
    let name = format!("relay_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
    Some(format!("{}/{name}", url.rsplit_once('/').unwrap().0))
}
