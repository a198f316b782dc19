//! The loader: the usage streams into the billing database, every record
//! exactly once.
//!
//! One loop: read a batch through the consumer group (first what this
//! consumer was given before and never acknowledged), write it in one
//! transaction, and acknowledge it only once that transaction committed.
//! A crash before the commit leaves the batch unacknowledged: the next run
//! is given it again. A crash between the commit and the acknowledgement
//! gives it again too, and the database, keyed by record id, adds nothing
//! the second time. While PostgreSQL or Redis is down the loader waits
//! and tries the same batch again; it never skips one.

use std::time::Duration;

use crate::telemetry::metrics::{ConsumerGroup, LoaderResult, LoaderStage, metrics};

use super::postgres::{Database, DatabaseError, Written};
use super::stream::{Consumer, Delivered};

/// How the loader runs.
#[derive(Debug, Clone)]
pub struct LoadSettings {
    /// The billing database (a `postgres://` URL or a `key=value` string).
    pub url: String,
    /// The schema its tables are in.
    pub schema: String,
    /// Stream entries per stream and transaction, at most.
    pub batch: usize,
    /// Stop once nothing is left to load (else: wait for more).
    pub once: bool,
    /// The wait before trying again after a failure.
    pub retry: Duration,
    /// Entries another consumer of the group was given and has not
    /// acknowledged for this long are taken over (a loader that crashed
    /// and came back under another name strands nothing).
    pub claim_after: Duration,
}

/// What a run loaded.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// Transactions committed.
    pub batches: u64,
    /// What they wrote.
    pub written: Written,
}

/// Loads until `stop` completes (or, with `once`, until nothing is left).
/// A batch whose transaction committed is acknowledged before the loader
/// stops; one that did not stays for the next run. Fails only on what
/// waiting will not mend: a database migrated by a newer build, or a
/// schema name PostgreSQL cannot have.
pub async fn load(
    consumer: &Consumer,
    settings: &LoadSettings,
    stop: impl Future<Output = ()>,
) -> Result<Loaded, DatabaseError> {
    let mut stop = std::pin::pin!(stop);
    let mut db: Option<Database> = None;
    let mut loaded = Loaded::default();
    let block = settings.retry.as_millis().clamp(1, 2000) as u64;
    // Claimed at the start and then every half `claim_after`.
    let mut last_claim: Option<std::time::Instant> = None;
    loop {
        if last_claim.is_none_or(|at| at.elapsed() >= settings.claim_after / 2) {
            match consumer.claim(settings.claim_after).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(entries = n, "took over entries another loader left unacknowledged"),
                Err(e) => failed("redis", &e),
            }
            last_claim = Some(std::time::Instant::now());
        }
        let read = tokio::select! {
            () = &mut stop => return Ok(loaded),
            read = consumer.read(settings.batch, (!settings.once).then_some(block)) => read,
        };
        let delivered = match read {
            Ok(delivered) => delivered,
            Err(e) => {
                failed("redis", &e);
                if wait(&mut stop, settings.retry).await {
                    return Ok(loaded);
                }
                continue;
            }
        };
        note_backlog(consumer).await;
        if delivered.is_empty() {
            if settings.once {
                return Ok(loaded);
            }
            continue;
        }
        let written = loop {
            match write(&mut db, settings, &delivered).await {
                Ok(written) => break written,
                Err(e @ (DatabaseError::TooNew { .. } | DatabaseError::SchemaName(_))) => return Err(e),
                Err(e) => {
                    // The connection may be gone (a restart): make another.
                    db = None;
                    failed("postgres", &e);
                    if wait(&mut stop, settings.retry).await {
                        return Ok(loaded);
                    }
                }
            }
        };
        // Committed: acknowledge, however long Redis takes to answer, so
        // that a stop now does not give the batch again.
        while let Err(e) = consumer.ack(&delivered).await {
            failed("redis", &e);
            tokio::time::sleep(settings.retry).await;
        }
        loaded.batches += 1;
        loaded.written += written;
        let m = metrics();
        m.loader_batches.inc();
        for (result, n) in [
            ("loaded", written.loaded),
            ("repeated", written.repeated),
            ("unreadable", written.unreadable),
            ("conflicting", written.conflicting),
        ] {
            m.loader_records.get_or_create(&LoaderResult { result }).inc_by(n);
        }
        if written.unreadable > 0 {
            tracing::error!(
                records = written.unreadable,
                "usage records that do not read back: their entries' fields are kept in unreadable_records"
            );
        }
        if written.conflicting > 0 {
            tracing::error!(
                records = written.conflicting,
                "usage records whose id another entry's record holds (a request id used again?): kept in \
                 usage_record_conflicts"
            );
        }
    }
}

/// Writes `delivered`, connecting (and migrating) first if need be.
async fn write(
    db: &mut Option<Database>,
    settings: &LoadSettings,
    delivered: &[Delivered],
) -> Result<Written, DatabaseError> {
    let mut connected = match db.take() {
        Some(connected) => connected,
        None => Database::connect(&settings.url, &settings.schema).await?,
    };
    let written = connected.write(delivered).await;
    *db = Some(connected);
    written
}

/// Counts and logs a failure at `stage`.
fn failed(stage: &'static str, error: &dyn std::fmt::Display) {
    tracing::warn!(stage, error = %error, "loader waits and tries again");
    metrics().loader_errors.get_or_create(&LoaderStage { stage }).inc();
}

/// Publishes what the loader's group has not acknowledged yet, as the
/// sidecars do for the groups they trim for (left as it was if Redis
/// cannot say).
async fn note_backlog(consumer: &Consumer) {
    if let Ok(n) = consumer.backlog().await {
        metrics()
            .usage_stream_unacknowledged
            .get_or_create(&ConsumerGroup {
                group: consumer.group().to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// Waits `pause`, or less if `stop` completes first: then true.
async fn wait(stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>, pause: Duration) -> bool {
    tokio::select! {
        () = stop.as_mut() => true,
        () = tokio::time::sleep(pause) => false,
    }
}
