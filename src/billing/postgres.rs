//! The billing database: usage records, their charges and the operators'
//! changes, in PostgreSQL, each record once.
//!
//! The tables live in one schema (`tollgate` by default), made and
//! migrated by [`Database::connect`]: `schema_version` says which
//! migrations ran, and a database newer than this build is refused rather
//! than written. Records are keyed by their `record_id`, so a batch
//! written again (a loader that crashed after its commit and before its
//! acknowledgement) adds nothing: the write is the deduplication, and a
//! batch is one transaction, so a crash at any point leaves all of it or
//! none.
//!
//! Money is `numeric(39, 12)`: the engine's pico-units exactly, as a
//! decimal in the currency's unit. A record id already held by a record
//! of another stream entry is not a retry but another record (a request
//! id used again after the idempotency window): it is kept apart in
//! `usage_record_conflicts`, counted and logged, never dropped.

use tokio_postgres::types::ToSql;

use super::rows::{ChargeColumns, Rows};
use super::stream::Delivered;

/// The migrations, in order: migration `n` (from 1) brings a schema at
/// version `n - 1` to `n`. `{s}` is the schema. Never edit one that has
/// shipped; add the next.
const MIGRATIONS: &[&str] = &[
    // 1: records, charges per source and lot, records whose id was taken
    // by another entry's, audit records with what refunds gave back, and
    // what could not be read. Instants are kept twice: `timestamptz` to
    // read (PostgreSQL keeps microseconds) and nanoseconds since the epoch
    // (`*_ns`), exact, which windows and prices are computed on.
    r#"
    CREATE TABLE {s}.usage_records (
        record_id text PRIMARY KEY,
        kind text NOT NULL,
        account_id text NOT NULL,
        request_id text NOT NULL,
        reservation_id text,
        api_key_id text,
        model text,
        service_tier text,
        input_tokens bigint NOT NULL,
        cached_input_tokens bigint NOT NULL,
        cache_write_tokens bigint NOT NULL,
        output_tokens bigint NOT NULL,
        total_money numeric(39, 12) NOT NULL,
        price_version text,
        reserved_at timestamptz NOT NULL,
        settled_at timestamptz NOT NULL,
        reserved_ns bigint NOT NULL,
        settled_ns bigint NOT NULL,
        journal text,
        journal_seq bigint,
        stream text NOT NULL,
        entry_id text NOT NULL,
        loaded_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX usage_records_account_settled ON {s}.usage_records (account_id, settled_ns);
    CREATE INDEX usage_records_settled ON {s}.usage_records (settled_ns);
    CREATE TABLE {s}.usage_record_conflicts (
        record_id text NOT NULL,
        stream text NOT NULL,
        entry_id text NOT NULL,
        record jsonb NOT NULL,
        loaded_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (stream, entry_id, record_id)
    );
    CREATE TABLE {s}.usage_charges (
        record_id text NOT NULL REFERENCES {s}.usage_records ON DELETE CASCADE,
        position integer NOT NULL,
        source text NOT NULL,
        lot text,
        tokens bigint,
        money numeric(39, 12),
        PRIMARY KEY (record_id, position),
        CHECK ((tokens IS NULL) <> (money IS NULL))
    );
    CREATE TABLE {s}.audit_records (
        record_id text PRIMARY KEY,
        account_id text,
        operator text NOT NULL,
        peer text NOT NULL,
        operation text NOT NULL,
        adjustment_id text NOT NULL,
        reason text NOT NULL,
        change text NOT NULL,
        before jsonb NOT NULL,
        after jsonb NOT NULL,
        at timestamptz NOT NULL,
        at_ns bigint NOT NULL,
        stream text NOT NULL,
        entry_id text NOT NULL,
        loaded_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX audit_records_account_at ON {s}.audit_records (account_id, at_ns);
    CREATE TABLE {s}.audit_refunds (
        record_id text NOT NULL REFERENCES {s}.audit_records ON DELETE CASCADE,
        position integer NOT NULL,
        source text NOT NULL,
        lot text,
        tokens bigint,
        money numeric(39, 12),
        PRIMARY KEY (record_id, position),
        CHECK ((tokens IS NULL) <> (money IS NULL))
    );
    CREATE TABLE {s}.unreadable_records (
        stream text NOT NULL,
        entry_id text NOT NULL,
        position integer NOT NULL,
        reason text NOT NULL,
        raw jsonb,
        loaded_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (stream, entry_id, position)
    );
    "#,
    // 2: alerts (thresholds crossed), one row each.
    r#"
    CREATE TABLE {s}.alert_records (
        record_id text PRIMARY KEY,
        account_id text NOT NULL,
        alert text NOT NULL,
        subject text NOT NULL,
        threshold text NOT NULL,
        value text NOT NULL,
        at timestamptz NOT NULL,
        at_ns bigint NOT NULL,
        stream text NOT NULL,
        entry_id text NOT NULL,
        loaded_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX alert_records_account_at ON {s}.alert_records (account_id, at_ns);
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// What went wrong with the billing database.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// PostgreSQL refused, or could not be reached.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The schema name is not a plain identifier.
    #[error("schema {0:?}: expected lower-case letters, digits and _, starting with a letter or _ (not pg_)")]
    SchemaName(String),
    /// No loader has made (or finished migrating) the schema.
    #[error("schema {0} holds no billing tables at this version: run tollgate usage load first")]
    NotLoaded(String),
    /// The database was migrated by a newer build.
    #[error("schema {schema} is at version {found}, newer than this tollgate's {SCHEMA_VERSION}: upgrade tollgate")]
    TooNew {
        /// The schema.
        schema: String,
        /// Its version.
        found: i32,
    },
}

/// What one batch wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Records (usage and audit) new to the database.
    pub loaded: u64,
    /// Records it had already from the same entry (written by an earlier
    /// try of the batch).
    pub repeated: u64,
    /// Records that did not read back, kept by stream entry and position
    /// with the entry's raw fields.
    pub unreadable: u64,
    /// Records whose id another entry's record holds, kept apart.
    pub conflicting: u64,
}

impl std::ops::AddAssign for Written {
    fn add_assign(&mut self, other: Written) {
        self.loaded += other.loaded;
        self.repeated += other.repeated;
        self.unreadable += other.unreadable;
        self.conflicting += other.conflicting;
    }
}

/// A connection to the billing database, its schema migrated.
pub struct Database {
    client: tokio_postgres::Client,
    schema: String,
}

impl Database {
    /// Connects to `url` (a `postgres://` URL or a `key=value` string) and
    /// brings `schema` to [`SCHEMA_VERSION`], creating it if missing. Two
    /// loaders starting at once migrate one after the other.
    pub async fn connect(url: &str, schema: &str) -> Result<Database, DatabaseError> {
        let mut db = Database::connected(url, schema).await?;
        db.migrate().await?;
        Ok(db)
    }

    /// Connects to `url` to read `schema`, which a loader must have made:
    /// nothing is created or migrated.
    pub async fn open(url: &str, schema: &str) -> Result<Database, DatabaseError> {
        let db = Database::connected(url, schema).await?;
        let table = format!("\"{schema}\".schema_version");
        let made: bool = db
            .client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await?
            .get(0);
        let version: i32 = match made {
            true => db
                .client
                .query_one(
                    &sql(schema, "SELECT coalesce(max(version), 0) FROM {s}.schema_version"),
                    &[],
                )
                .await?
                .get(0),
            false => 0,
        };
        match version {
            SCHEMA_VERSION => Ok(db),
            found if found > SCHEMA_VERSION => Err(DatabaseError::TooNew {
                schema: schema.to_owned(),
                found,
            }),
            _ => Err(DatabaseError::NotLoaded(schema.to_owned())),
        }
    }

    /// A connection, its schema name checked.
    async fn connected(url: &str, schema: &str) -> Result<Database, DatabaseError> {
        let valid = schema
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && schema.len() <= 63
            && !schema.starts_with("pg_")
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(DatabaseError::SchemaName(schema.to_owned()));
        }
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "billing database connection closed");
            }
        });
        Ok(Database {
            client,
            schema: schema.to_owned(),
        })
    }

    /// `text` with `{s}` naming its schema, for queries of the tables.
    pub fn sql(&self, text: &str) -> String {
        sql(&self.schema, text)
    }

    /// The client, for queries of the billing database.
    pub fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }

    /// Runs the migrations the schema has not had, each in the transaction
    /// that records it, under a lock on the schema's name.
    async fn migrate(&mut self) -> Result<(), DatabaseError> {
        let Database { client, schema } = self;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&*schema])
            .await?;
        tx.batch_execute(&sql(
            schema,
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.schema_version (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        ))
        .await?;
        let found: i32 = tx
            .query_one(
                &sql(schema, "SELECT coalesce(max(version), 0) FROM {s}.schema_version"),
                &[],
            )
            .await?
            .get(0);
        if found > SCHEMA_VERSION {
            return Err(DatabaseError::TooNew {
                schema: schema.clone(),
                found,
            });
        }
        for (version, migration) in (1..).zip(MIGRATIONS).skip(usize::try_from(found).unwrap_or(0)) {
            tx.batch_execute(&sql(schema, migration)).await?;
            tx.execute(
                &sql(schema, "INSERT INTO {s}.schema_version (version) VALUES ($1)"),
                &[&version],
            )
            .await?;
            tracing::info!(%schema, version, "billing database migrated");
        }
        tx.commit().await?;
        Ok(())
    }

    /// Writes the records of `delivered` in one transaction: usage records
    /// with their charges, audit records with what refunds gave back, a
    /// row for each record that does not read back (with its entry's raw
    /// fields), and each record whose id another entry's record holds. A
    /// record already there from the same entry is left as it is.
    pub async fn write(&mut self, delivered: &[Delivered]) -> Result<Written, DatabaseError> {
        let rows = Rows::of(delivered);
        let Database { client, schema } = self;
        let tx = client.transaction().await?;
        let mut written = Written {
            unreadable: rows.unreadable.stream.len() as u64,
            ..Written::default()
        };
        // The batch rows each insert wrote.
        let mut new = std::collections::HashSet::new();
        if !rows.usage.is_empty() {
            let u = &rows.usage;
            let params: [&(dyn ToSql + Sync); 22] = [
                &u.record_id,
                &u.kind,
                &u.account_id,
                &u.request_id,
                &u.reservation_id,
                &u.api_key_id,
                &u.model,
                &u.service_tier,
                &u.input_tokens,
                &u.cached_input_tokens,
                &u.cache_write_tokens,
                &u.output_tokens,
                &u.total_money,
                &u.price_version,
                &u.reserved_at,
                &u.settled_at,
                &u.reserved_ns,
                &u.settled_ns,
                &u.journal,
                &u.journal_seq,
                &u.stream,
                &u.entry_id,
            ];
            let inserted = tx
                .query(
                    &sql(
                        schema,
                        "INSERT INTO {s}.usage_records (record_id, kind, account_id, request_id,
                             reservation_id, api_key_id, model, service_tier, input_tokens,
                             cached_input_tokens, cache_write_tokens, output_tokens, total_money,
                             price_version, reserved_at, settled_at, reserved_ns, settled_ns, journal,
                             journal_seq, stream, entry_id)
                         SELECT r.record_id, r.kind, r.account_id, r.request_id, r.reservation_id,
                             r.api_key_id, r.model, r.service_tier, r.input_tokens,
                             r.cached_input_tokens, r.cache_write_tokens, r.output_tokens,
                             r.total_money::numeric, r.price_version, r.reserved_at::timestamptz,
                             r.settled_at::timestamptz, r.reserved_ns, r.settled_ns, r.journal,
                             r.journal_seq, r.stream, r.entry_id
                         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $7::text[], $8::text[], $9::int8[], $10::int8[], $11::int8[],
                             $12::int8[], $13::text[], $14::text[], $15::text[], $16::text[],
                             $17::int8[], $18::int8[], $19::text[], $20::int8[], $21::text[],
                             $22::text[])
                             AS r(record_id, kind, account_id, request_id, reservation_id,
                                 api_key_id, model, service_tier, input_tokens, cached_input_tokens,
                                 cache_write_tokens, output_tokens, total_money, price_version,
                                 reserved_at, settled_at, reserved_ns, settled_ns, journal,
                                 journal_seq, stream, entry_id)
                         ON CONFLICT (record_id) DO NOTHING
                         RETURNING record_id, stream, entry_id",
                    ),
                    &params,
                )
                .await?;
            new = written_rows(&inserted, &u.record_id, &u.stream, &u.entry_id);
            // The rest are in the table already: from this very entry (a
            // batch written again after a crash), or from another one (in
            // this batch or before).
            let held: Vec<&String> = (0..u.len())
                .filter(|i| !new.contains(i))
                .map(|i| &u.record_id[i])
                .collect();
            let holders: std::collections::HashMap<String, (String, String)> = tx
                .query(
                    &sql(
                        schema,
                        "SELECT record_id, stream, entry_id FROM {s}.usage_records WHERE record_id = ANY($1)",
                    ),
                    &[&held],
                )
                .await?
                .iter()
                .map(|row| (row.get(0), (row.get(1), row.get(2))))
                .collect();
            let mut conflicts: (Vec<&str>, Vec<&str>, Vec<&str>, Vec<&str>) = Default::default();
            for i in (0..u.len()).filter(|i| !new.contains(i)) {
                let here = (u.stream[i].as_str(), u.entry_id[i].as_str());
                match holders.get(&u.record_id[i]) {
                    Some((stream, entry)) if (stream.as_str(), entry.as_str()) == here => written.repeated += 1,
                    // Another entry's record, or an earlier one of this
                    // batch with the same id.
                    _ => {
                        conflicts.0.push(&u.record_id[i]);
                        conflicts.1.push(here.0);
                        conflicts.2.push(here.1);
                        conflicts.3.push(&u.json[i]);
                    }
                }
            }
            written.loaded += new.len() as u64;
            if !conflicts.0.is_empty() {
                written.conflicting += tx
                    .execute(
                        &sql(
                            schema,
                            "INSERT INTO {s}.usage_record_conflicts (record_id, stream, entry_id, record)
                             SELECT c.record_id, c.stream, c.entry_id, c.record::jsonb
                             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                                 AS c(record_id, stream, entry_id, record)
                             ON CONFLICT DO NOTHING",
                        ),
                        &[&conflicts.0, &conflicts.1, &conflicts.2, &conflicts.3],
                    )
                    .await?;
            }
        }
        // Charges of the records new to the table only: a record there
        // already has its own.
        insert_takes(&tx, schema, "usage_charges", &rows.charges.only(&new)).await?;
        if !rows.audit.is_empty() {
            let a = &rows.audit;
            let params: [&(dyn ToSql + Sync); 14] = [
                &a.record_id,
                &a.account_id,
                &a.operator,
                &a.peer,
                &a.operation,
                &a.adjustment_id,
                &a.reason,
                &a.change,
                &a.before,
                &a.after,
                &a.at,
                &a.at_ns,
                &a.stream,
                &a.entry_id,
            ];
            let inserted = tx
                .query(
                    &sql(
                        schema,
                        "INSERT INTO {s}.audit_records (record_id, account_id, operator, peer,
                             operation, adjustment_id, reason, change, before, after, at, at_ns,
                             stream, entry_id)
                         SELECT a.record_id, a.account_id, a.operator, a.peer, a.operation,
                             a.adjustment_id, a.reason, a.change, a.before::jsonb, a.after::jsonb,
                             a.at::timestamptz, a.at_ns, a.stream, a.entry_id
                         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                             $11::text[], $12::int8[], $13::text[], $14::text[])
                             AS a(record_id, account_id, operator, peer, operation, adjustment_id,
                                 reason, change, before, after, at, at_ns, stream, entry_id)
                         ON CONFLICT (record_id) DO NOTHING
                         RETURNING record_id, stream, entry_id",
                    ),
                    &params,
                )
                .await?;
            let new_audits = written_rows(&inserted, &a.record_id, &a.stream, &a.entry_id);
            written.loaded += new_audits.len() as u64;
            written.repeated += (a.len() - new_audits.len()) as u64;
            insert_takes(&tx, schema, "audit_refunds", &rows.refunds.only(&new_audits)).await?;
        }
        if !rows.alerts.record_id.is_empty() {
            let a = &rows.alerts;
            let params: [&(dyn ToSql + Sync); 10] = [
                &a.record_id,
                &a.account_id,
                &a.alert,
                &a.subject,
                &a.threshold,
                &a.value,
                &a.at,
                &a.at_ns,
                &a.stream,
                &a.entry_id,
            ];
            let inserted = tx
                .query(
                    &sql(
                        schema,
                        "INSERT INTO {s}.alert_records (record_id, account_id, alert, subject,
                             threshold, value, at, at_ns, stream, entry_id)
                         SELECT a.record_id, a.account_id, a.alert, a.subject, a.threshold,
                             a.value, a.at::timestamptz, a.at_ns, a.stream, a.entry_id
                         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $7::text[], $8::int8[], $9::text[], $10::text[])
                             AS a(record_id, account_id, alert, subject, threshold, value, at,
                                 at_ns, stream, entry_id)
                         ON CONFLICT (record_id) DO NOTHING
                         RETURNING record_id",
                    ),
                    &params,
                )
                .await?;
            written.loaded += inserted.len() as u64;
            written.repeated += (a.record_id.len() - inserted.len()) as u64;
        }
        if !rows.unreadable.stream.is_empty() {
            let u = &rows.unreadable;
            tx.execute(
                &sql(
                    schema,
                    "INSERT INTO {s}.unreadable_records (stream, entry_id, position, reason, raw)
                     SELECT u.stream, u.entry_id, u.position, u.reason, u.raw::jsonb
                     FROM unnest($1::text[], $2::text[], $3::int4[], $4::text[], $5::text[])
                         AS u(stream, entry_id, position, reason, raw)
                     ON CONFLICT DO NOTHING",
                ),
                &[&u.stream, &u.entry_id, &u.position, &u.reason, &u.raw],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(written)
    }
}

/// The batch rows (indices into the columns) an insert wrote, from what it
/// returned: `record_id`, `stream` and `entry_id` name one row.
fn written_rows(
    returned: &[tokio_postgres::Row],
    ids: &[String],
    streams: &[String],
    entries: &[String],
) -> std::collections::HashSet<usize> {
    let returned: std::collections::HashSet<(String, String, String)> = returned
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    (0..ids.len())
        .filter(|&i| returned.contains(&(ids[i].clone(), streams[i].clone(), entries[i].clone())))
        .collect()
}

/// Writes the rows of `takes` into `table` (`usage_charges` or
/// `audit_refunds`), leaving any there already.
async fn insert_takes(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    table: &str,
    takes: &ChargeColumns,
) -> Result<(), DatabaseError> {
    if takes.record_id.is_empty() {
        return Ok(());
    }
    let t = takes;
    tx.execute(
        &sql(
            schema,
            &format!(
                "INSERT INTO {{s}}.{table} (record_id, position, source, lot, tokens, money)
                 SELECT t.record_id, t.position, t.source, t.lot, t.tokens, t.money::numeric
                 FROM unnest($1::text[], $2::int4[], $3::text[], $4::text[], $5::int8[], $6::text[])
                     AS t(record_id, position, source, lot, tokens, money)
                 ON CONFLICT DO NOTHING"
            ),
        ),
        &[&t.record_id, &t.position, &t.source, &t.lot, &t.tokens, &t.money],
    )
    .await?;
    Ok(())
}

/// `text` with `{s}` naming `schema` (quoted: a name PostgreSQL reserves,
/// such as `user`, is a schema name too).
fn sql(schema: &str, text: &str) -> String {
    text.replace("{s}", &format!("\"{schema}\""))
}
