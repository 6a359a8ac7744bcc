//! The writer's memory across restarts: the queues are read again from the queued jobs at each
//! start; the pacing horizons and echo marks still in use are saved at a clean stop and read
//! back at the next start, and after a crash rebuilt from the outbound jobs of the last
//! minutes, erring on the side of spacing sends and recognising echoes.

use std::time::Duration;

use rusqlite::{Connection, params};

use super::memory::{Horizon, Queues, Recent, mark_digest};
use crate::store::{Direction, ECHO_WINDOW, Payload, decode_payload};

/// The longest gap a channel may set between two sends to a contact (SPEC §3.4: an hour),
/// plus the longest `delay` of a send: how long a rebuilt horizon is kept.
const LONGEST_HORIZON: Duration = Duration::from_secs(3600 + 10);

/// Outbound jobs a rebuild after a crash reads at most, newest first: enough for 10 minutes
/// of more than 300 sends a second.
const REBUILD_JOBS: i64 = 200_000;

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The queues as the queued jobs have them, with `previous`'s leases and reservations on the
/// jobs still queued.
pub(super) fn rebuild_queues(conn: &Connection, previous: &Queues) -> rusqlite::Result<Queues> {
    let mut queued = conn.prepare_cached(
        "SELECT id, channel, direction, contact, next_attempt_at FROM jobs WHERE state = 'queued' ORDER BY id",
    )?;
    let rows = queued.query_map([], |row| {
        let direction: String = row.get(2)?;
        Ok((row.get(0)?, row.get(1)?, direction, row.get(3)?, row.get(4)?))
    })?;
    let mut jobs = Vec::new();
    for row in rows {
        let (id, channel, direction, contact, next_attempt_at): (i64, String, String, String, i64) = row?;
        // A direction this relay does not know cannot be claimed; the job stays as it is.
        if let Some(direction) = Direction::parse(&direction) {
            jobs.push((id, channel, direction, contact, next_attempt_at));
        }
    }
    Ok(previous.rebuilt(jobs))
}

/// Reads back what the last stop saved, or rebuilds it after a crash, and empties the saved
/// tables: what this process saves at its own stop replaces it.
pub(super) fn restore(conn: &Connection, recent: &mut Recent, now: i64) -> rusqlite::Result<()> {
    let clean: bool = conn.prepare("SELECT 1 FROM clean_stop")?.exists([])?;
    let mut horizons = conn.prepare("SELECT channel, contact, effective_at, forget_at FROM saved_horizons")?;
    for row in horizons.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))? {
        let (channel, contact, effective_at, forget_at): (String, String, i64, i64) = row?;
        recent.raise_horizon(&channel, &contact, Horizon { effective_at, forget_at });
    }
    let mut marks = conn.prepare("SELECT digest, expires_at FROM saved_echo_marks ORDER BY expires_at")?;
    for row in marks.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))? {
        let (digest, expires_at): (Vec<u8>, i64) = row?;
        if let Ok(digest) = <[u8; 16]>::try_from(digest.as_slice()) {
            recent.add_mark(u128::from_le_bytes(digest), expires_at);
        }
    }
    // Written one per send by relays before schema 8.
    let mut legacy = conn.prepare("SELECT channel, contact, fingerprint, expires_at FROM echo_marks ORDER BY id")?;
    for row in legacy.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))? {
        let (channel, contact, fingerprint, expires_at): (String, String, String, i64) = row?;
        recent.add_mark(mark_digest(&channel, &contact, &fingerprint), expires_at);
    }
    if !clean {
        rebuild_after_crash(conn, recent, now)?;
    }
    conn.execute_batch(
        "DELETE FROM saved_horizons; DELETE FROM saved_echo_marks; DELETE FROM echo_marks; DELETE FROM clean_stop;",
    )
}

/// After a crash, the horizons and echo marks of the outbound jobs sent in the last
/// [`ECHO_WINDOW`]: each job's horizon as written with its outcome, and a mark for every part
/// it had sent, expiring a window after its outcome. Marks whose echo had come already are made
/// again (a human agent's identical message in that window would be taken for one), and a send
/// still waiting for JoinChat's answer at the crash is not known (its job is sent again).
fn rebuild_after_crash(conn: &Connection, recent: &mut Recent, now: i64) -> rusqlite::Result<()> {
    let since = now.saturating_sub(millis(ECHO_WINDOW));
    let mut sent = conn.prepare(
        "SELECT channel, contact, payload, progress, effective_at, updated_at FROM jobs \
         WHERE state IN ('delivered', 'rejected', 'dropped') AND updated_at >= ?1 AND direction = 'outbound' \
         UNION ALL \
         SELECT channel, contact, payload, progress, effective_at, updated_at FROM jobs \
         WHERE state = 'queued' AND direction = 'outbound' AND progress > 0 \
         ORDER BY updated_at DESC LIMIT ?2",
    )?;
    type Sent = (String, String, String, u32, Option<i64>, i64);
    let newest_first: Vec<Sent> = sent
        .query_map(params![since, REBUILD_JOBS], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut rebuilt = (0_u64, 0_u64);
    // Oldest first, as the marks were made: the oldest are the first to go.
    for (channel, contact, payload, progress, effective_at, updated_at) in newest_first.into_iter().rev() {
        if let Some(effective_at) = effective_at {
            let forget_at = effective_at.saturating_add(millis(LONGEST_HORIZON));
            recent.raise_horizon(&channel, &contact, Horizon { effective_at, forget_at });
            rebuilt.0 += 1;
        }
        if let Ok(Payload::Send { parts, .. }) = decode_payload(&payload) {
            let expires_at = updated_at.saturating_add(millis(ECHO_WINDOW));
            for part in parts.iter().take(usize::try_from(progress).unwrap_or(usize::MAX)) {
                if let Some(fingerprint) = part.echo_fingerprint() {
                    recent.add_mark(mark_digest(&channel, &contact, &fingerprint), expires_at);
                    rebuilt.1 += 1;
                }
            }
        }
    }
    tracing::info!(
        horizons = rebuilt.0,
        echo_marks = rebuilt.1,
        "the last stop was not clean: pacing and echo records rebuilt from the last sends"
    );
    Ok(())
}

/// Saves the horizons and echo marks still in use at `now`, and notes the stop as clean.
pub(super) fn save(conn: &Connection, recent: &mut Recent, now: i64) -> rusqlite::Result<()> {
    recent.forget_before(now);
    let mut horizon = conn.prepare(
        "INSERT INTO saved_horizons (channel, contact, effective_at, forget_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (channel, contact) DO UPDATE SET effective_at = excluded.effective_at, forget_at = excluded.forget_at",
    )?;
    for (channel, contact, kept) in recent.horizons() {
        horizon.execute(params![channel, contact, kept.effective_at, kept.forget_at])?;
    }
    let mut mark = conn.prepare("INSERT INTO saved_echo_marks (digest, expires_at) VALUES (?1, ?2)")?;
    for (digest, expires_at) in recent.marks() {
        mark.execute(params![digest.to_le_bytes().as_slice(), expires_at])?;
    }
    conn.execute(
        "INSERT INTO clean_stop (id, stopped_at) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET stopped_at = excluded.stopped_at",
        [now],
    )?;
    Ok(())
}
