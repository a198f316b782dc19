//! The usage streams read as a billing pipeline reads them: through a
//! Redis consumer group, acknowledging only what was safely used.
//!
//! Records are in `PREFIX:{SHARD}:usage` for every shard `0..shards`; each
//! stream entry holds the records one commit applied, each encoded once:
//! `count`, `pb` (the usage records, a `tollgate.v1.UsageRecordBatch`
//! protobuf message) and `audit` (operators' changes, a JSON array);
//! [`entry_records`] reads them back as JSON, each with its `record_id`
//! (derived: the protobuf leaves it out): a consumer that
//! sees an id again (after its own crash, before its `XACK`) has seen the
//! same record.

use crate::store::StoreError;
use crate::store::leased::{entry_fields_hex, entry_records, stream_key};
use crate::store::redis::Redis;

/// One record read from a stream.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The stream it came from.
    pub stream: String,
    /// Its stream entry id (for `XACK`).
    pub entry: String,
    /// The record, as JSON (null if it does not read back).
    pub record: serde_json::Value,
    /// For a record that does not read back, the entry as Redis holds it:
    /// each field's bytes in hex, by name; none if the entry is gone from
    /// the stream (trimmed or deleted while it was pending).
    pub raw: Option<serde_json::Value>,
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
    /// its acknowledgement, or an entry it left for later), then what the
    /// group has not been given, up to `count` per call, handing each
    /// record to `use_record`, which says whether it used it. Acknowledges
    /// nothing: returns the entries all of whose records were used, to
    /// acknowledge once what used them is safely written (their JSON
    /// dropped). An entry with a record left unused stays pending for this
    /// consumer: the next run is given it again.
    pub async fn read_through(
        &self,
        count: usize,
        mut use_record: impl FnMut(&serde_json::Value) -> bool,
    ) -> Result<Vec<Delivered>, StoreError> {
        let mut used = Vec::new();
        for stream in &self.streams {
            let mut left = std::collections::HashSet::new();
            let mut read = Vec::new();
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
                    if !use_record(&d.record) {
                        left.insert(d.entry.clone());
                    }
                    d.record = serde_json::Value::Null;
                    read.push(d);
                }
            }
            used.extend(read.into_iter().filter(|d| !left.contains(&d.entry)));
        }
        Ok(used)
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

    /// Entries of every shard's stream this group has not acknowledged:
    /// those given to a consumer and not acknowledged yet, and those not
    /// given yet (`XINFO GROUPS`: `pending` + `lag`), counted as the
    /// sidecars' trim counts them (a lag Redis cannot tell counts 0).
    pub async fn backlog(&self) -> Result<u64, StoreError> {
        let mut total = 0u64;
        for stream in &self.streams {
            let groups: redis::Value = self.redis.query(redis::cmd("XINFO").arg("GROUPS").arg(stream)).await?;
            let redis::Value::Array(groups) = groups else { continue };
            for group in &groups {
                let field = |name: &str| -> Option<&redis::Value> {
                    match group {
                        redis::Value::Array(kv) => kv
                            .chunks(2)
                            .find(|kv| matches!(&kv[0], redis::Value::BulkString(k) if k == name.as_bytes()))
                            .and_then(|kv| kv.get(1)),
                        redis::Value::Map(kv) => kv
                            .iter()
                            .find(|(k, _)| matches!(k, redis::Value::BulkString(k) if k == name.as_bytes()))
                            .map(|(_, v)| v),
                        _ => None,
                    }
                };
                let is_ours = matches!(field("name"), Some(redis::Value::BulkString(n)) if n == self.group.as_bytes());
                if !is_ours {
                    continue;
                }
                let int = |v: Option<&redis::Value>| match v {
                    Some(redis::Value::Int(n)) => u64::try_from(*n).ok(),
                    _ => None,
                };
                total += int(field("pending")).unwrap_or(0) + int(field("lag")).unwrap_or(0);
            }
        }
        Ok(total)
    }

    /// Takes over what other consumers of the group were given and have
    /// not acknowledged for `idle` or longer (`XAUTOCLAIM`): a consumer
    /// that crashed and came back under another name, or never came back,
    /// strands nothing. The claimed entries become this consumer's pending
    /// ones, read first by [`Consumer::read`]. Returns how many.
    pub async fn claim(&self, idle: std::time::Duration) -> Result<u64, StoreError> {
        let mut claimed = 0u64;
        for stream in &self.streams {
            let mut cursor = "0-0".to_owned();
            loop {
                let reply: redis::Value = self
                    .redis
                    .query(
                        redis::cmd("XAUTOCLAIM")
                            .arg(stream)
                            .arg(&self.group)
                            .arg(&self.name)
                            .arg(u64::try_from(idle.as_millis()).unwrap_or(u64::MAX))
                            .arg(&cursor)
                            .arg("COUNT")
                            .arg(1000)
                            .arg("JUSTID"),
                    )
                    .await?;
                let redis::Value::Array(parts) = reply else { break };
                if let Some(redis::Value::Array(ids)) = parts.get(1) {
                    claimed += ids.len() as u64;
                }
                cursor = match parts.first() {
                    Some(redis::Value::BulkString(next)) => String::from_utf8_lossy(next).into_owned(),
                    Some(redis::Value::SimpleString(next)) => next.clone(),
                    _ => break,
                };
                if cursor == "0-0" {
                    break;
                }
            }
        }
        Ok(claimed)
    }

    /// Its consumer group.
    pub fn group(&self) -> &str {
        &self.group
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
            let raw = records
                .iter()
                .any(serde_json::Value::is_null)
                .then(|| entry_fields_hex(e))
                .flatten();
            for record in records {
                out.push(Delivered {
                    stream: stream.to_owned(),
                    entry: id.clone(),
                    raw: record.is_null().then(|| raw.clone()).flatten(),
                    record,
                });
            }
        }
    }
    out
}
