//! `tollgate usage`: the usage streams through a consumer group
//! (`tail`, `export`) and into the billing database (`load`); the work is
//! in [`crate::billing`], this is the command line around it.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::admin::table;
use super::report::{print_repricing, print_statement};
use crate::billing::export::{Window, cloudevent, is_not_usage, tally, write_totals};
use crate::billing::loader::{LoadSettings, load};
use crate::billing::postgres::Database;
use crate::billing::reconcile::reconcile;
use crate::billing::reprice::{reprice, write_csv as write_repricing_csv};
use crate::billing::statement::{month_bounds, statement, write_csv};
use crate::billing::stream::Consumer;
use crate::config::process_env;

/// `usage` subcommands.
#[derive(Debug, Subcommand)]
pub enum UsageCmd {
    /// Print new usage records as JSON lines as they arrive, acknowledging
    /// each once printed (one that does not read back is printed as
    /// `{"kind": "unreadable", "stream", "entry_id", "raw"}`, its fields'
    /// bytes in hex).
    Tail {
        /// Where the streams are.
        #[command(flatten)]
        streams: StreamArgs,
        /// Consumer group.
        #[arg(long, default_value = "tollgate-tail")]
        group: String,
        /// Stop after this many records.
        #[arg(long)]
        max: Option<u64>,
    },
    /// Consume what the group has not seen yet and print what was settled
    /// in [from, to): totals per account and model (CSV or JSON lines), or
    /// each usage record as a CloudEvents 1.0 event (JSON lines). Only
    /// entries wholly written are acknowledged: one with a record outside
    /// the window (or of another account) stays for a later export.
    Export {
        /// Where the streams are.
        #[command(flatten)]
        streams: StreamArgs,
        /// Consumer group (a new group reads the streams from their
        /// beginning).
        #[arg(long, default_value = "tollgate-export")]
        group: String,
        /// Records settled at or after this instant (RFC 3339).
        #[arg(long)]
        from: jiff::Timestamp,
        /// Records settled before this instant (RFC 3339).
        #[arg(long)]
        to: jiff::Timestamp,
        /// Only this account.
        #[arg(long)]
        account: Option<String>,
        /// What to write.
        #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
        format: ExportFormat,
        /// The events' `source` (CloudEvents).
        #[arg(long, default_value = "tollgate")]
        source: String,
    },
    /// Load every usage and audit record into PostgreSQL, each exactly
    /// once: a batch is acknowledged in the stream only once its
    /// transaction committed. Makes and migrates the tables. Runs until
    /// stopped (SIGINT, SIGTERM), or with --once until nothing is left.
    Load {
        /// Where the streams are.
        #[command(flatten)]
        streams: StreamArgs,
        /// Consumer group (list it in store.redis.consumer_groups, so
        /// that the streams are trimmed only past what it loaded).
        #[arg(long, default_value = "tollgate-billing")]
        group: String,
        /// The billing database: postgres://USER@HOST:PORT/DATABASE (or
        /// a key=value connection string).
        #[arg(long, value_name = "URL", env = "TOLLGATE_POSTGRES")]
        postgres: String,
        /// The schema the tables are in (made if missing).
        #[arg(long, default_value = "tollgate")]
        schema: String,
        /// Stream entries per shard and transaction, at most, of each kind:
        /// those given before and not acknowledged, and new ones.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch: u32,
        /// Stop once nothing is left to load.
        #[arg(long)]
        once: bool,
        /// Take over entries another consumer of the group was given and
        /// has not acknowledged for this long (a loader that crashed and
        /// came back under another name).
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        claim_after_seconds: u64,
        /// Serve Prometheus metrics (records loaded, failures, the group's
        /// backlog) on http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// One account's statement for a month, from the billing database:
    /// usage and charges by model and tier, what each source paid, the
    /// operators' changes, and opening and closing money balances.
    Statement {
        /// The billing database (as for `load`).
        #[arg(long, value_name = "URL", env = "TOLLGATE_POSTGRES")]
        postgres: String,
        /// The schema the tables are in.
        #[arg(long, default_value = "tollgate")]
        schema: String,
        /// The account.
        #[arg(long)]
        account: String,
        /// The month.
        #[arg(long, value_name = "YYYY-MM")]
        month: String,
        /// The time zone the month is counted in (IANA).
        #[arg(long, default_value = "UTC")]
        time_zone: String,
        /// The price list the records were charged at (`[[prices]]`
        /// tables): money is then split by token kind too.
        #[arg(long, value_name = "FILE")]
        prices: Option<std::path::PathBuf>,
        /// JSON instead of tables.
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// CSV instead of tables.
        #[arg(long)]
        csv: bool,
    },
    /// Price the usage recorded in [from, to) again under a draft price
    /// version (`[[prices]]` tables, as `admin prices publish` reads
    /// them), by the engine's own code, and report the revenue change per
    /// model and tier and per account, largest first. Nothing is written.
    Reprice {
        /// The billing database (as for `load`).
        #[arg(long, value_name = "URL", env = "TOLLGATE_POSTGRES")]
        postgres: String,
        /// The schema the tables are in.
        #[arg(long, default_value = "tollgate")]
        schema: String,
        /// The draft (TOML).
        #[arg(long, value_name = "FILE")]
        prices: std::path::PathBuf,
        /// The version of the file to price with (needed when it holds
        /// several).
        #[arg(long)]
        version: Option<String>,
        /// Records settled at or after this instant (RFC 3339).
        #[arg(long)]
        from: jiff::Timestamp,
        /// Records settled before this instant (RFC 3339).
        #[arg(long)]
        to: jiff::Timestamp,
        /// Accounts shown in the table, largest changes first (JSON and
        /// CSV have all).
        #[arg(long, default_value_t = 20)]
        top: usize,
        /// JSON instead of tables.
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// CSV instead of tables.
        #[arg(long)]
        csv: bool,
    },
    /// Compare, per account and ledger, what the billing database's
    /// records charged less what its refunds gave back with what the Redis
    /// store says was charged; print every difference, to the unit. Exits
    /// with 1 if there is any. Run it once the loader has caught up: until
    /// then the store is ahead.
    Reconcile {
        /// Where the Redis store is (its streams' options: the prefix and
        /// shards are the store's).
        #[command(flatten)]
        streams: StreamArgs,
        /// The billing database (as for `load`).
        #[arg(long, value_name = "URL", env = "TOLLGATE_POSTGRES")]
        postgres: String,
        /// The schema the tables are in.
        #[arg(long, default_value = "tollgate")]
        schema: String,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// What `tollgate usage export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// Totals per account and model, with a header.
    Csv,
    /// Totals per account and model, one JSON object a line.
    Jsonl,
    /// One CloudEvents 1.0 event a usage record, one a line.
    Cloudevents,
}

/// Where the usage streams are.
#[derive(Debug, Args)]
pub struct StreamArgs {
    /// Redis URL; repeat (or separate with commas) for Redis Cluster seed
    /// nodes. Credentials: TOLLGATE_REDIS_USERNAME, TOLLGATE_REDIS_PASSWORD.
    #[arg(
        long = "redis",
        value_name = "URL",
        env = "TOLLGATE_REDIS",
        value_delimiter = ',',
        required = true
    )]
    pub redis: Vec<String>,
    /// The one URL is a Redis Cluster node.
    #[arg(long, env = "TOLLGATE_REDIS_CLUSTER")]
    pub redis_cluster: bool,
    /// Key prefix (store.redis.key_prefix).
    #[arg(long, default_value = "tollgate")]
    pub prefix: String,
    /// Logical shards (store.redis.shards; default 1, or 16 on a cluster).
    #[arg(long)]
    pub shards: Option<u32>,
    /// This consumer's name in the group (default: the host name).
    #[arg(long)]
    pub consumer: Option<String>,
}

async fn consumer(streams: &StreamArgs, group: &str) -> anyhow::Result<Consumer> {
    let (redis, shards) = connect(streams).await?;
    // A stable default name: a consumer restarted after a crash gets back
    // what it was given and had not acknowledged.
    let name = streams
        .consumer
        .clone()
        .unwrap_or_else(|| process_env("HOSTNAME").unwrap_or_else(|| "tollgate".into()));
    Ok(Consumer::join(redis, &streams.prefix, shards, group, &name).await?)
}

/// Redis, and the number of logical shards, as `streams` name them.
async fn connect(streams: &StreamArgs) -> anyhow::Result<(crate::store::redis::Redis, u32)> {
    let cluster = streams.redis_cluster || streams.redis.len() > 1;
    let settings = crate::store::redis::RedisSettings {
        urls: streams.redis.clone(),
        cluster,
        deadline: std::time::Duration::from_secs(10),
        ca_cert: None,
        replicas: 0,
        credentials: crate::config::redis_credentials(&process_env),
    };
    let redis = crate::store::redis::Redis::connect(&settings)
        .await
        .with_context(|| format!("connecting to {}", streams.redis.join(", ")))?;
    Ok((redis, crate::config::shards(streams.shards.unwrap_or(0), cluster)))
}

/// Runs `tollgate usage`.
pub async fn run(cmd: UsageCmd) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    match cmd {
        UsageCmd::Tail { streams, group, max } => {
            let consumer = consumer(&streams, &group).await?;
            let mut printed = 0u64;
            let stdout = std::io::stdout();
            loop {
                let batch = consumer.read(100, Some(2000)).await?;
                let mut out = stdout.lock();
                for d in &batch {
                    if d.record.is_null() {
                        // Acknowledged once printed, so printed whole:
                        // where it was and its bytes.
                        let unreadable = serde_json::json!({
                            "kind": "unreadable",
                            "stream": d.stream,
                            "entry_id": d.entry,
                            "raw": d.raw,
                        });
                        writeln!(out, "{unreadable}")?;
                    } else {
                        writeln!(out, "{}", d.record)?;
                    }
                }
                out.flush()?;
                drop(out);
                consumer.ack(&batch).await?;
                printed += batch.len() as u64;
                if max.is_some_and(|m| printed >= m) {
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        UsageCmd::Export {
            streams,
            group,
            from,
            to,
            account,
            format,
            source,
        } => {
            let window = Window { from, to, account };
            let consumer = consumer(&streams, &group).await?;
            let mut totals = std::collections::BTreeMap::new();
            let mut events = Vec::new();
            let (mut exported, mut left) = (0usize, 0usize);
            let used = consumer
                .read_through(1000, |record| {
                    // Audit records and alerts are no usage export's (the
                    // loader's): passing them over loses nothing.
                    let used = is_not_usage(record)
                        || match format {
                            ExportFormat::Cloudevents => {
                                let event = cloudevent(record, &source).filter(|_| window.holds(record));
                                let written = event.is_some();
                                events.extend(event);
                                written
                            }
                            ExportFormat::Csv | ExportFormat::Jsonl => tally(&mut totals, record, &window),
                        };
                    exported += usize::from(used && !is_not_usage(record));
                    left += usize::from(!used);
                    used
                })
                .await?;
            // Acknowledged only once written and flushed: an export killed
            // or cut off before gives the same records to the next run.
            let mut out = std::io::stdout().lock();
            match format {
                ExportFormat::Cloudevents => {
                    for event in &events {
                        writeln!(out, "{event}")?;
                    }
                }
                ExportFormat::Csv => write_totals(&mut out, &totals, true)?,
                ExportFormat::Jsonl => write_totals(&mut out, &totals, false)?,
            }
            out.flush()?;
            drop(out);
            consumer.ack(&used).await?;
            eprintln!("{exported} records exported; {left} left for a later export (outside the window or unreadable)");
            Ok(ExitCode::SUCCESS)
        }
        UsageCmd::Load {
            streams,
            group,
            postgres,
            schema,
            batch,
            once,
            claim_after_seconds,
            metrics_listen,
        } => {
            let consumer = consumer(&streams, &group).await?;
            if let Some(addr) = metrics_listen {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                tracing::info!(%addr, "loader metrics listening");
                tokio::spawn(crate::transport::http::serve_metrics(
                    listener,
                    std::time::Duration::from_secs(10),
                    std::future::pending(),
                ));
            }
            let settings = LoadSettings {
                url: postgres,
                schema,
                batch: batch as usize,
                once,
                retry: std::time::Duration::from_secs(1),
                claim_after: std::time::Duration::from_secs(claim_after_seconds),
            };
            let (stop, _) = crate::app::signal::shutdown(LOADER_DEADLINE);
            let loaded = load(&consumer, &settings, stop).await?;
            let w = loaded.written;
            eprintln!(
                "{} records loaded, {} there already, {} unreadable, {} conflicting; transactions: {}",
                w.loaded, w.repeated, w.unreadable, w.conflicting, loaded.batches
            );
            Ok(ExitCode::SUCCESS)
        }
        UsageCmd::Statement {
            postgres,
            schema,
            account,
            month,
            time_zone,
            prices,
            json,
            csv,
        } => {
            let tz = jiff::tz::TimeZone::get(&time_zone).with_context(|| format!("--time-zone {time_zone}"))?;
            month_bounds(&month, &tz)?;
            let db = Database::open(&postgres, &schema).await?;
            let prices = prices.as_deref().map(price_list).transpose()?;
            let st = statement(&db, &account, &month, &tz, prices.as_deref()).await?;
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&st)?)?;
            } else if csv {
                write_csv(&mut out, &st)?;
            } else {
                print_statement(&mut out, &st)?;
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        UsageCmd::Reprice {
            postgres,
            schema,
            prices,
            version,
            from,
            to,
            top,
            json,
            csv,
        } => {
            let versions = price_list(&prices)?;
            let draft = match (version, versions.as_slice()) {
                (None, [only]) => only.clone(),
                (Some(id), _) => versions
                    .iter()
                    .find(|v| v.id.as_str() == id)
                    .cloned()
                    .with_context(|| format!("--version {id}: not in {}", prices.display()))?,
                (None, _) => anyhow::bail!(
                    "{} holds {} versions ({}): name one with --version",
                    prices.display(),
                    versions.len(),
                    versions.iter().map(|v| v.id.to_string()).collect::<Vec<_>>().join(", ")
                ),
            };
            let db = Database::open(&postgres, &schema).await?;
            let r = reprice(&db, &draft, from, to).await?;
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
            } else if csv {
                write_repricing_csv(&mut out, &r)?;
            } else {
                print_repricing(&mut out, &r, top)?;
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        UsageCmd::Reconcile {
            streams,
            postgres,
            schema,
            json,
        } => {
            let db = Database::open(&postgres, &schema).await?;
            let (redis, shards) = connect(&streams).await?;
            let r = reconcile(&db, &redis, &streams.prefix, shards).await?;
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
            } else {
                let mut t = table(&["account", "ledger", "lot", "unit", "database", "store", "difference"]);
                for d in &r.differences {
                    t.add_row(vec![
                        d.account_id.clone(),
                        d.ledger.clone(),
                        d.lot.clone(),
                        d.unit.to_owned(),
                        d.database.clone(),
                        d.store.clone(),
                        d.difference.clone(),
                    ]);
                }
                if !r.differences.is_empty() {
                    writeln!(out, "{t}")?;
                }
                writeln!(
                    out,
                    "{} accounts compared, {} differences",
                    r.accounts,
                    r.differences.len()
                )?;
            }
            out.flush()?;
            Ok(if r.differences.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// The price versions in `path` (`[[prices]]` tables), read and checked as
/// `tollgate admin prices publish` reads them.
fn price_list(path: &std::path::Path) -> anyhow::Result<Vec<crate::engine::pricing::PriceVersion>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    crate::config::parse_price_versions(&text)
        .map_err(|e| anyhow::anyhow!("{}: not a valid price list:\n{e}", path.display()))
}

/// How long a stopping loader has to finish its batch (a transaction and
/// an acknowledgement) before it is ended; what it has not acknowledged
/// is loaded again, once, by the next run.
const LOADER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);
