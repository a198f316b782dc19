//! `tollgate usage`: reading the usage streams as a billing pipeline does,
//! through a Redis consumer group, acknowledging what was processed
//! (`tollgate usage tail` and `tollgate usage export`).
//!
//! Records are in `PREFIX:{SHARD}:usage` for every shard `0..shards`; each
//! stream entry holds the records one commit applied, each encoded once:
//! `count`, `pb` (the usage records, a `tollgate.v1.UsageRecordBatch`
//! protobuf message) and `audit` (operators' changes, a JSON array);
//! [`entry_records`] reads them back as JSON, each with its `record_id`
//! (derived: the protobuf leaves it out): a consumer that
//! sees an id again (after its own crash, before its `XACK`) has seen the
//! same record.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;

use jiff::Timestamp;

use crate::engine::money::Money;
use crate::store::StoreError;
use crate::store::leased::{entry_records, stream_key};
use crate::store::redis::Redis;

use super::{StreamArgs, UsageCmd};
use crate::config::process_env;

/// One record read from a stream.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The stream it came from.
    pub stream: String,
    /// Its stream entry id (for `XACK`).
    pub entry: String,
    /// The record, as JSON.
    pub record: serde_json::Value,
}

/// A consumer of every shard's stream in one consumer group.
pub struct Consumer {
    redis: Redis,
    streams: Vec<String>,
    group: String,
    name: String,
}

impl Consumer {
    /// Joins (creating if needed) consumer group `group` on every shard
    /// stream, as consumer `name`. A new group starts at the beginning of
    /// each stream.
    pub async fn join(
        redis: Redis,
        prefix: &str,
        shards: u32,
        group: &str,
        name: &str,
    ) -> Result<Consumer, StoreError> {
        let streams: Vec<String> = (0..shards.max(1)).map(|s| stream_key(prefix, s)).collect();
        for stream in &streams {
            let created: Result<redis::Value, StoreError> = redis
                .query(
                    redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(stream)
                        .arg(group)
                        .arg("0")
                        .arg("MKSTREAM"),
                )
                .await;
            match created {
                Ok(_) => {}
                Err(StoreError::Unavailable(m)) if m.contains("BUSYGROUP") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Consumer {
            redis,
            streams,
            group: group.into(),
            name: name.into(),
        })
    }

    /// Reads up to `count` records per stream that the group has not been
    /// given yet (first those given to this consumer and not acknowledged,
    /// after a crash). Waits up to `block` ms for new ones when there are
    /// none (`None`: no wait).
    pub async fn read(&self, count: usize, block: Option<u64>) -> Result<Vec<Delivered>, StoreError> {
        let mut out = Vec::new();
        for stream in &self.streams {
            for from in ["0", ">"] {
                let wait = block.filter(|_| from == ">" && out.is_empty() && self.streams.len() == 1);
                out.extend(self.read_group(stream, from, count, wait).await?);
            }
        }
        if out.is_empty()
            && let Some(ms) = block
            && self.streams.len() > 1
        {
            tokio::time::sleep(std::time::Duration::from_millis(ms.min(1000))).await;
        }
        Ok(out)
    }

    /// Reads everything this consumer may be given now, pending first
    /// (given to it before and not acknowledged: a run that stopped before
    /// its acknowledgement), then what the group has not been given, up to
    /// `count` per call, handing each record to `each`. Acknowledges
    /// nothing: returns what to acknowledge once the records are safely
    /// used (their JSON dropped).
    pub async fn read_through(
        &self,
        count: usize,
        mut each: impl FnMut(&serde_json::Value),
    ) -> Result<Vec<Delivered>, StoreError> {
        let mut all = Vec::new();
        for stream in &self.streams {
            // Pending entries are read from a cursor (re-reading "0" would
            // give the same ones again); new ones from ">" until none.
            let mut from = "0".to_owned();
            loop {
                let batch = self.read_group(stream, &from, count, None).await?;
                if batch.is_empty() {
                    if from == ">" {
                        break;
                    }
                    from = ">".to_owned();
                    continue;
                }
                if from != ">" {
                    from = batch.last().map(|d| d.entry.clone()).unwrap_or_default();
                }
                for mut d in batch {
                    each(&d.record);
                    d.record = serde_json::Value::Null;
                    all.push(d);
                }
            }
        }
        Ok(all)
    }

    /// One `XREADGROUP` of `stream` from `from` (`0` and on: given to this
    /// consumer and not acknowledged; `>`: never given), up to `count`,
    /// waiting up to `block` ms for new ones.
    async fn read_group(
        &self,
        stream: &str,
        from: &str,
        count: usize,
        block: Option<u64>,
    ) -> Result<Vec<Delivered>, StoreError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(count);
        if let Some(ms) = block {
            cmd.arg("BLOCK").arg(ms);
        }
        cmd.arg("STREAMS").arg(stream).arg(from);
        let reply: redis::Value = self.redis.query(&cmd).await?;
        Ok(parse(stream, &reply))
    }

    /// Acknowledges processed records.
    pub async fn ack(&self, delivered: &[Delivered]) -> Result<(), StoreError> {
        for stream in &self.streams {
            let ids: Vec<&str> = delivered
                .iter()
                .filter(|d| &d.stream == stream)
                .map(|d| d.entry.as_str())
                .collect();
            if !ids.is_empty() {
                let _: redis::Value = self
                    .redis
                    .query(redis::cmd("XACK").arg(stream).arg(&self.group).arg(ids))
                    .await?;
            }
        }
        Ok(())
    }
}

/// The records in an `XREADGROUP` reply (one stream).
fn parse(stream: &str, reply: &redis::Value) -> Vec<Delivered> {
    let mut out = Vec::new();
    let redis::Value::Array(streams) = reply else {
        return out;
    };
    for s in streams {
        let redis::Value::Array(pair) = s else { continue };
        let Some(redis::Value::Array(entries)) = pair.get(1) else {
            continue;
        };
        for e in entries {
            let Some((id, records)) = entry_records(e) else {
                continue;
            };
            for record in records {
                out.push(Delivered {
                    stream: stream.to_owned(),
                    entry: id.clone(),
                    record,
                });
            }
        }
    }
    out
}

/// Totals of one account and model.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    /// The account.
    pub account_id: String,
    /// The model ("" for money charges without one).
    pub model: String,
    /// Records counted.
    pub records: u64,
    /// Uncached input tokens.
    pub input_tokens: u64,
    /// Cached input tokens.
    pub cached_input_tokens: u64,
    /// Cache-write tokens.
    pub cache_write_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Money charged.
    pub total_money: Money,
}

/// Adds `record` to `totals` if it was settled in `[from, to)` and, with
/// `account`, is that account's. Returns whether it counted.
pub fn tally(
    totals: &mut BTreeMap<(String, String), Totals>,
    record: &serde_json::Value,
    from: Timestamp,
    to: Timestamp,
    account: Option<&str>,
) -> bool {
    let at = record["settled_at"].as_str().and_then(|t| t.parse::<Timestamp>().ok());
    let id = record["account_id"].as_str().unwrap_or_default();
    if at.is_none_or(|at| at < from || at >= to) || account.is_some_and(|a| a != id) {
        return false;
    }
    let model = record["model"].as_str().unwrap_or_default();
    let t = totals
        .entry((id.to_owned(), model.to_owned()))
        .or_insert_with(|| Totals {
            account_id: id.to_owned(),
            model: model.to_owned(),
            ..Totals::default()
        });
    let usage = &record["usage"];
    let n = |k: &str| usage[k].as_u64().unwrap_or(0);
    t.records += 1;
    t.input_tokens += n("input_tokens");
    t.cached_input_tokens += n("cached_input_tokens");
    t.cache_write_tokens += n("cache_write_tokens");
    t.output_tokens += n("output_tokens");
    let money = record["total_money"].as_str().and_then(|m| m.parse::<Money>().ok());
    t.total_money = t
        .total_money
        .checked_add(money.unwrap_or(Money::ZERO))
        .unwrap_or(t.total_money);
    true
}

/// Writes `totals` as CSV (with a header) or JSON Lines.
pub fn write_totals(
    out: &mut impl Write,
    totals: &BTreeMap<(String, String), Totals>,
    csv: bool,
) -> std::io::Result<()> {
    if csv {
        writeln!(
            out,
            "account_id,model,records,input_tokens,cached_input_tokens,cache_write_tokens,output_tokens,total_money"
        )?;
        for t in totals.values() {
            writeln!(
                out,
                "{},{},{},{},{},{},{},{}",
                t.account_id,
                t.model,
                t.records,
                t.input_tokens,
                t.cached_input_tokens,
                t.cache_write_tokens,
                t.output_tokens,
                t.total_money
            )?;
        }
    } else {
        for t in totals.values() {
            writeln!(out, "{}", serde_json::to_string(t).unwrap_or_default())?;
        }
    }
    Ok(())
}

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
        } => {
            let csv = match format.as_str() {
                "csv" => true,
                "jsonl" => false,
                other => anyhow::bail!("--format {other}: expected csv or jsonl"),
            };
            let consumer = consumer(&streams, &group).await?;
            let mut totals = std::collections::BTreeMap::new();
            let mut counted = 0usize;
            let read = consumer
                .read_through(1000, |record| {
                    counted += usize::from(tally(&mut totals, record, from, to, account.as_deref()));
                })
                .await?;
            // Acknowledged only once written and flushed: an export killed
            // or cut off before gives the same records to the next run.
            let mut out = std::io::stdout().lock();
            write_totals(&mut out, &totals, csv)?;
            out.flush()?;
            drop(out);
            consumer.ack(&read).await?;
            eprintln!("{} records consumed, {counted} in range", read.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}
