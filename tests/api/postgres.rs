//! Placeholder until the Postgres test helpers land.
pub async fn fresh_database() -> Option<String> {
    None
}
