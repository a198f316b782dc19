//! `tollgate usage`: the usage streams through a consumer group
//! (`tail`, `export`) and into the billing database (`load`); the work is
//! in [`crate::billing`], this is the command line around it.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;

use super::admin::table;
use super::{ExportFormat, StreamArgs, UsageCmd};
use crate::billing::export::{Window, cloudevent, is_audit, tally, write_totals};
use crate::billing::loader::{LoadSettings, load};
use crate::billing::postgres::Database;
use crate::billing::reprice::{Mover, Repricing, reprice, write_csv as write_repricing_csv};
use crate::billing::statement::{Statement, month_bounds, statement, write_csv};
use crate::billing::stream::Consumer;
use crate::config::process_env;

async fn consumer(streams: &StreamArgs, group: &str) -> anyhow::Result<Consumer> {
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
    let shards = crate::config::shards(streams.shards.unwrap_or(0), cluster);
    // A stable default name: a consumer restarted after a crash gets back
    // what it was given and had not acknowledged.
    let name = streams
        .consumer
        .clone()
        .unwrap_or_else(|| process_env("HOSTNAME").unwrap_or_else(|| "tollgate".into()));
    Ok(Consumer::join(redis, &streams.prefix, shards, group, &name).await?)
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
                for d in batch.iter().filter(|d| !d.record.is_null()) {
                    writeln!(out, "{}", d.record)?;
                }
                out.flush()?;
                drop(out);
                consumer.ack(&batch).await?;
                printed += batch.iter().filter(|d| !d.record.is_null()).count() as u64;
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
                    // Audit records are no usage export's (the loader's):
                    // passing them over loses nothing.
                    let used = is_audit(record)
                        || match format {
                            ExportFormat::Cloudevents => {
                                let event = cloudevent(record, &source).filter(|_| window.holds(record));
                                events.extend(event);
                                window.holds(record)
                            }
                            ExportFormat::Csv | ExportFormat::Jsonl => tally(&mut totals, record, &window),
                        };
                    exported += usize::from(used && !is_audit(record));
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
            };
            let (stop, _) = crate::app::signal::shutdown(LOADER_DEADLINE);
            let loaded = load(&consumer, &settings, stop).await?;
            let w = loaded.written;
            eprintln!(
                "{} records loaded, {} there already, {} unreadable; transactions: {}",
                w.loaded, w.repeated, w.unreadable, loaded.batches
            );
            Ok(ExitCode::SUCCESS)
        }
        UsageCmd::Statement {
            postgres,
            schema,
            account,
            month,
            time_zone,
            json,
            csv,
        } => {
            let tz = jiff::tz::TimeZone::get(&time_zone).with_context(|| format!("--time-zone {time_zone}"))?;
            month_bounds(&month, &tz)?;
            let db = Database::open(&postgres, &schema).await?;
            let st = statement(db.client(), db.schema(), &account, &month, &tz).await?;
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
            let text = std::fs::read_to_string(&prices).with_context(|| format!("reading {}", prices.display()))?;
            let versions = crate::config::parse_price_versions(&text)
                .map_err(|e| anyhow::anyhow!("{}: the draft is not a valid price list:\n{e}", prices.display()))?;
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
            let r = reprice(db.client(), db.schema(), &draft, from, to).await?;
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
    }
}

/// A re-pricing as tables.
fn print_repricing(out: &mut impl Write, r: &Repricing, top: usize) -> std::io::Result<()> {
    writeln!(
        out,
        "Usage settled from {} to {}, priced again at draft {}",
        r.from, r.to, r.version
    )?;
    writeln!(out)?;
    let movers = |rows: &[Mover], with_account: bool| {
        let mut header = vec!["model", "tier", "records", "charged", "draft", "change"];
        if with_account {
            header.insert(0, "account");
        }
        let mut t = table(&header);
        for m in rows {
            let mut row = vec![
                m.model.clone(),
                m.service_tier.clone(),
                m.records.to_string(),
                m.charged.to_string(),
                m.repriced.to_string(),
                m.delta.to_string(),
            ];
            if with_account {
                row.insert(0, m.account_id.clone());
            }
            t.add_row(row);
        }
        t
    };
    writeln!(out, "{}", movers(&r.models, false))?;
    writeln!(out)?;
    let shown = r.accounts.len().min(top);
    writeln!(out, "{}", movers(&r.accounts[..shown], true))?;
    if shown < r.accounts.len() {
        writeln!(out, "... and {} more (--top, --json, --csv)", r.accounts.len() - shown)?;
    }
    if !r.unpriced.is_empty() {
        writeln!(out)?;
        writeln!(out, "Not priced by the draft (left out of the figures):")?;
        writeln!(out, "{}", movers(&r.unpriced, false))?;
    }
    writeln!(out)?;
    let mut total = table(&["", "money"]);
    for (name, amount) in [("charged", r.charged), ("draft", r.repriced), ("change", r.delta)] {
        total.add_row(vec![name.to_owned(), amount.to_string()]);
    }
    writeln!(out, "{total}")
}

/// A statement as tables.
fn print_statement(out: &mut impl Write, st: &Statement) -> std::io::Result<()> {
    writeln!(
        out,
        "Statement of {} for {} ({} to {})",
        st.account_id, st.month, st.from, st.to
    )?;
    writeln!(out)?;
    let mut usage = table(&[
        "model",
        "tier",
        "records",
        "input",
        "cached input",
        "cache write",
        "output",
        "charged",
    ]);
    for u in &st.usage {
        usage.add_row(vec![
            u.model.clone(),
            u.service_tier.clone(),
            u.records.to_string(),
            u.input_tokens.to_string(),
            u.cached_input_tokens.to_string(),
            u.cache_write_tokens.to_string(),
            u.output_tokens.to_string(),
            u.money.to_string(),
        ]);
    }
    writeln!(out, "{usage}")?;
    writeln!(out)?;
    let mut sources = table(&["source", "lot", "tokens", "money"]);
    for s in &st.sources {
        sources.add_row(vec![
            s.source.clone(),
            s.lot.clone(),
            s.tokens.map(|t| t.to_string()).unwrap_or_default(),
            s.money.map(|m| m.to_string()).unwrap_or_default(),
        ]);
    }
    writeln!(out, "{sources}")?;
    writeln!(out)?;
    let mut changes = table(&["at", "operation", "adjustment", "operator", "reason", "money"]);
    for c in &st.changes {
        changes.add_row(vec![
            c.at.to_string(),
            c.operation.clone(),
            c.adjustment_id.clone(),
            c.operator.clone(),
            c.reason.clone(),
            c.money.to_string(),
        ]);
    }
    writeln!(out, "{changes}")?;
    writeln!(out)?;
    let mut balances = table(&["balance", "money"]);
    for (name, amount) in [
        ("opening", st.opening),
        ("+ changes", st.changes_total),
        ("- charges", st.charges_total),
        ("closing", st.closing),
    ] {
        balances.add_row(vec![name.to_owned(), amount.to_string()]);
    }
    writeln!(out, "{balances}")
}

/// How long a stopping loader has to finish its batch (a transaction and
/// an acknowledgement) before it is ended; what it has not acknowledged
/// is loaded again, once, by the next run.
const LOADER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);
