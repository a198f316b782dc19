//! Commits: one script (`lua/commit.lua`) writes an account's new state
//! if its version is still the one read, with the records it applied
//! added to the usage stream and their request ids checked, in one step.

use std::sync::atomic::Ordering;
use std::time::Duration;

use jiff::Timestamp;

use super::RedisStore;
use super::keys::{SCHEMA, Seen, readable, shard_of};
use crate::engine::alert::AlertRecord;
use crate::engine::ids::{AccountId, ProducerId};
use crate::engine::record::{AuditRecord, hex, request_fingerprint};
use crate::engine::role::Journaled;
use crate::engine::{Account, Catalog, Command, EngineError};
use crate::store::{Applied, Store, StoreError};

/// The records of one commit as its usage stream entry carries them, each
/// encoded once, straight into the entry's fields: the usage records as a
/// protobuf `UsageRecordBatch` (`pb`, with where each was journaled), the
/// rare audit records as a JSON array (`audit`). With them, the
/// fingerprints of the usage records' request ids, checked and remembered
/// by the commit.
#[derive(Default)]
pub(super) struct StreamEntry {
    count: usize,
    pb: Vec<u8>,
    audit: Vec<u8>,
    fingerprints: Vec<u8>,
}

/// The id and records of one usage stream entry as Redis answers it
/// (`[id, [field, value, ...]]`, from `XRANGE` or `XREADGROUP`), each as
/// JSON the way the usage file writes it plus `record_id` (and, for usage
/// records, `journal` and `journal_seq`): the usage records of its `pb`
/// field, then the audit records of its `audit` field. An entry written
/// before records were encoded once holds them all in a `json` field,
/// read as it is. An entry without readable records (trimmed away, or not
/// Tollgate's) gives a single null, so a consumer still acknowledges it;
/// so does a record that does not read back, in its place.
pub fn entry_records(entry: &redis::Value) -> Option<(String, Vec<serde_json::Value>)> {
    let bytes = value_bytes;
    let redis::Value::Array(parts) = entry else { return None };
    let id = String::from_utf8_lossy(&parts.first().and_then(bytes)?).into_owned();
    let fields = match parts.get(1) {
        Some(redis::Value::Array(fields)) => fields.as_slice(),
        _ => &[],
    };
    let field = |name: &str| {
        fields
            .chunks(2)
            .find(|kv| kv.first().and_then(bytes).as_deref() == Some(name.as_bytes()))
            .and_then(|kv| kv.get(1).and_then(bytes))
    };
    let json_array = |text: Vec<u8>| match serde_json::from_slice::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Array(records)) => records,
        _ => vec![serde_json::Value::Null],
    };
    let mut records = Vec::new();
    if let Some(json) = field("json") {
        records = json_array(json);
    } else {
        if let Some(pb) = field("pb").filter(|pb| !pb.is_empty()) {
            match <crate::proto::UsageRecordBatch as prost::Message>::decode(pb.as_slice()) {
                Ok(batch) => records.extend(batch.records.iter().map(usage_json)),
                Err(_) => records.push(serde_json::Value::Null),
            }
        }
        if let Some(audit) = field("audit") {
            records.extend(json_array(audit));
        }
    }
    if records.is_empty() {
        records.push(serde_json::Value::Null);
    }
    Some((id, records))
}

/// A stream entry's fields as Redis holds them, each value's bytes in hex,
/// by name (for a record that does not read back: kept, not dropped);
/// none if the entry has no fields (gone from the stream while pending).
pub fn entry_fields_hex(entry: &redis::Value) -> Option<serde_json::Value> {
    let redis::Value::Array(parts) = entry else { return None };
    let Some(redis::Value::Array(fields)) = parts.get(1) else {
        return None;
    };
    let map: serde_json::Map<String, serde_json::Value> = fields
        .chunks(2)
        .map(|kv| {
            let name = value_bytes(&kv[0]).map(|n| String::from_utf8_lossy(&n).into_owned());
            let value = kv.get(1).and_then(value_bytes).map(|v| hex(&v));
            (
                name.unwrap_or_default(),
                serde_json::Value::String(value.unwrap_or_default()),
            )
        })
        .collect();
    Some(serde_json::Value::Object(map))
}

/// The bytes of a string reply.
fn value_bytes(v: &redis::Value) -> Option<Vec<u8>> {
    match v {
        redis::Value::BulkString(b) => Some(b.clone()),
        redis::Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

/// A usage record of the stream's protobuf as JSON (null if it does not
/// read back).
fn usage_json(pb: &crate::proto::UsageRecord) -> serde_json::Value {
    let Ok(record) = crate::wire::record_in(pb) else {
        return serde_json::Value::Null;
    };
    serde_json::to_value(Tagged {
        record: &record,
        record_id: record.id(),
        journal: Some(pb.journal.as_str()),
        journal_seq: Some(pb.journal_seq),
    })
    .unwrap_or_default()
}

/// A record with the fields the stream adds to it.
#[derive(serde::Serialize)]
struct Tagged<'a, R> {
    #[serde(flatten)]
    record: &'a R,
    record_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    journal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    journal_seq: Option<u64>,
}

impl StreamEntry {
    /// Adds a journaled usage record.
    fn record(&mut self, entry: &Journaled) -> Result<(), StoreError> {
        // Without its record id: readers derive it (`usage_json`).
        let mut pb = crate::wire::record_fields(&entry.record);
        pb.journal = entry.journal.to_string();
        pb.journal_seq = entry.seq;
        // `records` is field 1 of the batch: its tag, then the message,
        // length-delimited; a batch is these, one after the other.
        self.pb.push(0x0a);
        prost::Message::encode_length_delimited(&pb, &mut self.pb).map_err(|e| corrupt("a usage record", e))?;
        self.fingerprints
            .extend_from_slice(&request_fingerprint(&entry.record.account_id, &entry.record.request_id));
        self.count += 1;
        Ok(())
    }

    /// Adds an operator's change.
    fn audit(&mut self, audit: &AuditRecord) -> Result<(), StoreError> {
        self.json(audit, audit.id(), "an audit record")
    }

    /// Adds an alert (with the audit records: both are rare, and JSON).
    fn alert(&mut self, alert: &AlertRecord) -> Result<(), StoreError> {
        self.json(alert, alert.id(), "an alert")
    }

    fn json(&mut self, record: &impl serde::Serialize, record_id: String, what: &str) -> Result<(), StoreError> {
        self.audit.push(if self.audit.is_empty() { b'[' } else { b',' });
        let tagged = Tagged {
            record,
            record_id,
            journal: None,
            journal_seq: None,
        };
        serde_json::to_writer(&mut self.audit, &tagged).map_err(|e| corrupt(what, e))?;
        self.count += 1;
        Ok(())
    }

    /// The entry's audit records as a JSON array (empty: none).
    fn audit_array(&self) -> Vec<u8> {
        let mut json = self.audit.clone();
        if !json.is_empty() {
            json.push(b']');
        }
        json
    }
}

/// How a commit ended.
pub(super) enum Commit {
    Done(u64),
    Moved(u64, String),
    /// These usage records (by position) are of request ids committed
    /// already: nothing was written.
    Repeated(Vec<usize>),
}

/// Most attempts of one change against concurrent writers. A lost race
/// answers the current state, so the next attempt starts from it at once;
/// after [`EAGER_ATTEMPTS`] lost races in a row a writer steps aside for a
/// random moment (up to 2 ms) and reads afresh, so a slow writer is not
/// starved by faster ones.
pub(super) const MAX_ATTEMPTS: u32 = 64;

pub(super) const EAGER_ATTEMPTS: u32 = 8;

pub(super) fn corrupt(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: record {key} is unreadable: {e}"))
}

impl RedisStore {
    // One argument per argument of the script it calls.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn write(
        &self,
        keys: &[&str],
        version: u64,
        state: &str,
        at: Timestamp,
        announce: Option<&str>,
        records: &StreamEntry,
        indexed_as: Option<&str>,
        seen: Option<&Seen>,
    ) -> Result<Commit, StoreError> {
        self.check_up()?;
        let skew = self.settings.max_clock_skew.map_or(0, |d| d.as_millis());
        let channel = announce.map(|_| self.changes_channel()).unwrap_or_default();
        let mut args: Vec<Vec<u8>> = vec![
            version.to_string().into_bytes(),
            state.as_bytes().to_vec(),
            at.as_millisecond().to_string().into_bytes(),
            skew.to_string().into_bytes(),
            channel.into_bytes(),
            announce.unwrap_or("").as_bytes().to_vec(),
            records.count.to_string().into_bytes(),
        ];
        args.push(records.audit_array());
        args.push(records.pb.clone());
        args.push(indexed_as.unwrap_or("").as_bytes().to_vec());
        let mut keys = keys.to_vec();
        match seen.filter(|_| !records.fingerprints.is_empty()) {
            Some(seen) => {
                keys.push(&seen.answers[0]);
                keys.extend(seen.keys.iter().map(String::as_str));
                args.push(records.fingerprints.clone());
                args.push(seen.until_ms.to_string().into_bytes());
                args.push(seen.answers_until_ms.to_string().into_bytes());
            }
            None => args.extend([Vec::new(), b"0".to_vec(), b"0".to_vec()]),
        }
        args.push(SCHEMA.to_string().into_bytes());
        let answer = self.note(self.redis.invoke_durable("commit", &self.commit, &keys, args).await)?;
        let answer: Vec<redis::Value> = redis::from_redis_value(answer)
            .map_err(|e| StoreError::Unavailable(format!("redis: commit answered {e}")))?;
        let int = |v: Option<&redis::Value>| match v {
            Some(redis::Value::Int(n)) => u64::try_from(*n).ok(),
            _ => None,
        };
        match (int(answer.first()), int(answer.get(1)), answer.get(2)) {
            (Some(1), Some(v), None) => Ok(Commit::Done(v)),
            (Some(0), Some(v), Some(redis::Value::BulkString(state))) => {
                let schema = match answer.get(3) {
                    Some(redis::Value::BulkString(s)) => Some(String::from_utf8_lossy(s).into_owned()),
                    _ => None,
                };
                readable(keys[0], schema.as_deref())?;
                Ok(Commit::Moved(v, String::from_utf8_lossy(state).into_owned()))
            }
            (Some(2), Some(_), Some(redis::Value::Array(found))) => Ok(Commit::Repeated(
                found
                    .iter()
                    .filter_map(|i| int(Some(i)))
                    .filter_map(|i| usize::try_from(i).ok()?.checked_sub(1))
                    .collect(),
            )),
            _ => Err(StoreError::Unavailable(format!("redis: commit answered {answer:?}"))),
        }
    }

    /// Reads the record at `key` (or takes `cache`), runs `change` on it and
    /// commits, with the usage records and the audit record `change` gives
    /// added to the usage stream in the same step; again from the newer
    /// state while other writers win. An `announce`d change (an operator's)
    /// is announced to the other sidecars.
    ///
    /// The commit also checks the usage records' request ids against those
    /// committed in the idempotency window, and remembers them: records of
    /// ids already committed come back to `change`, as repeats (journal,
    /// number), and it runs again on the same state.
    pub(super) async fn update<T>(
        &self,
        id: &AccountId,
        cache: &mut Option<(u64, String)>,
        announce: bool,
        mut change: impl FnMut(
            &mut Account,
            &Catalog,
            &[(ProducerId, u64)],
            Timestamp,
        ) -> Result<(T, Vec<Journaled>, Option<AuditRecord>), EngineError>,
    ) -> Result<(T, Account), StoreError> {
        let key = &self.account_key(id);
        let stream = &self.stream_key(id);
        let index = &self.index_key(shard_of(self.settings.shards, id.as_str()));
        let missing = || StoreError::UnknownAccount(id.clone());
        let announce = announce.then_some(id.as_str());
        let mut repeated: Vec<(ProducerId, u64)> = Vec::new();
        for attempt in 0..MAX_ATTEMPTS {
            if attempt >= EAGER_ATTEMPTS {
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..2000))).await;
                *cache = None;
            }
            let (version, json) = match cache.take() {
                Some(c) => c,
                None => self.read(key).await?.ok_or_else(missing)?,
            };
            if version == 0 || json.is_empty() {
                return Err(missing());
            }
            let mut account: Account = serde_json::from_str(&json).map_err(|e| corrupt(key, e))?;
            let catalog = self.catalog();
            let now = self.clock.now();
            let (out, records, audit) = match change(&mut account, &catalog, &repeated, now) {
                Ok(out) => out,
                Err(e) => {
                    *cache = Some((version, json));
                    return Err(e.into());
                }
            };
            // Thresholds crossed by this change alert in this commit: it
            // keeps them as alerted, so once it lands no other writes them.
            let alerts = account.alerts_due(&catalog, now);
            let state = serde_json::to_string(&account).map_err(|e| corrupt(key, e))?;
            let mut items = StreamEntry::default();
            for record in &records {
                items.record(record)?;
            }
            if let Some(audit) = &audit {
                items.audit(audit)?;
            }
            for alert in &alerts {
                items.alert(alert)?;
            }
            let seen = self.seen(id, catalog.idempotency_window, now);
            match self
                .write(
                    &[key, stream, index],
                    version,
                    &state,
                    now,
                    announce,
                    &items,
                    Some(id.as_str()),
                    Some(&seen),
                )
                .await?
            {
                Commit::Done(v) => {
                    *cache = Some((v, state));
                    self.alerts.push(alerts);
                    return Ok((out, account));
                }
                Commit::Moved(v, state) => {
                    self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                    *cache = (v > 0).then_some((v, state));
                }
                Commit::Repeated(found) => {
                    repeated.extend(
                        found
                            .iter()
                            .filter_map(|i| records.get(*i))
                            .map(|r| (r.journal.clone(), r.seq)),
                    );
                    *cache = Some((version, json));
                }
            }
        }
        Err(StoreError::Busy(format!(
            "redis: {key} changed under every one of {MAX_ATTEMPTS} attempts"
        )))
    }

    /// The shared account `id` as stored (version and JSON: what a gate
    /// keeps for the next commit) and as read; none if there is no such
    /// account.
    pub(super) async fn read_account(&self, id: &AccountId) -> Result<Option<((u64, String), Account)>, StoreError> {
        let key = self.account_key(id);
        let Some((version, json)) = self.read(&key).await? else {
            return Ok(None);
        };
        let account = serde_json::from_str(&json).map_err(|e| corrupt(&key, e))?;
        Ok(Some(((version, json), account)))
    }

    pub(super) async fn shared(&self, id: &AccountId) -> Result<Account, StoreError> {
        let (_, account) = self
            .read_account(id)
            .await?
            .ok_or_else(|| StoreError::UnknownAccount(id.clone()))?;
        Ok(account)
    }

    /// Writes a new account, with the audit record of an operator's
    /// creation (if any) on its shard's usage stream in the same step.
    pub(super) async fn write_new(&self, account: Account, audit: Option<&AuditRecord>) -> Result<(), StoreError> {
        let key = self.account_key(&account.id);
        let stream = self.stream_key(&account.id);
        let index = self.index_key(shard_of(self.settings.shards, account.id.as_str()));
        let state = serde_json::to_string(&account).map_err(|e| corrupt(&key, e))?;
        let mut entry = StreamEntry::default();
        if let Some(audit) = audit {
            entry.audit(audit)?;
        }
        match self
            .write(
                &[&key, &stream, &index],
                0,
                &state,
                self.clock.now(),
                Some(account.id.as_str()),
                &entry,
                Some(account.id.as_str()),
                None,
            )
            .await?
        {
            Commit::Done(_) => Ok(()),
            // No records here, so never repeats.
            Commit::Moved(..) | Commit::Repeated(_) => Err(StoreError::AccountExists(account.id)),
        }
    }

    /// An operator's change: one commit on the shared account, announced,
    /// with its audit record (completed by the engine; none for a retried
    /// adjustment, or for seeding) added to the shard's usage stream in the
    /// same step.
    pub(super) async fn admin(
        &self,
        id: &AccountId,
        command: Command,
        audit: Option<&AuditRecord>,
    ) -> Result<(Applied, Option<AuditRecord>), StoreError> {
        let ((reply, record), shared) = self
            .update(id, &mut None, true, |account, catalog, _, now| {
                let (reply, record) = match audit {
                    Some(audit) => account.apply_audited(catalog, command.clone(), now, audit)?,
                    None => (account.apply(catalog, command.clone(), now)?, None),
                };
                Ok(((reply, record.clone()), Vec::new(), record))
            })
            .await?;
        if let Some(mut local) = self.mirrors.get_mut(id) {
            local.refresh(&shared);
        }
        let applied = Applied {
            reply,
            records: Vec::new(),
        };
        Ok((applied, record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::UsageRecord;
    use crate::engine::ids::{ApiKeyId, LotId, ModelId, RequestId, ReservationId, TierId, VersionId};
    use crate::engine::money::Money;
    use crate::engine::pricing::Usage;
    use crate::engine::record::RecordKind;
    use crate::engine::source::{SourceRef, Take};

    /// A stream entry as `XRANGE` answers it.
    fn entry(fields: &[(&str, &[u8])]) -> redis::Value {
        let bulk = |b: &[u8]| redis::Value::BulkString(b.to_vec());
        redis::Value::Array(vec![
            bulk(b"1764422400000-0"),
            redis::Value::Array(fields.iter().flat_map(|(k, v)| [bulk(k.as_bytes()), bulk(v)]).collect()),
        ])
    }

    /// A settle drawing on every kind of source, at instants with
    /// nanoseconds, with money that is not a whole number of units.
    fn settle() -> Journaled {
        let take = |source, amount| Take { source, amount };
        let record = UsageRecord {
            kind: RecordKind::Settle,
            request_id: RequestId::parse("req-7").unwrap(),
            reservation_id: Some(ReservationId::parse("req-7").unwrap()),
            account_id: AccountId::parse("acme").unwrap(),
            api_key_id: Some(ApiKeyId::parse("key-1").unwrap()),
            model: Some(ModelId::parse("llama-3.1-70b").unwrap()),
            service_tier: Some(TierId::parse("priority").unwrap()),
            usage: Usage {
                input_tokens: 1_200,
                cached_input_tokens: 800,
                cache_write_tokens: 5,
                output_tokens: 431,
            },
            charges: vec![
                take(SourceRef::Allowance { period: 3 }, 900),
                take(SourceRef::Pack(LotId::parse("pack-9").unwrap()), 1_000),
                take(SourceRef::Promo(LotId::parse("welcome").unwrap()), 1),
                take(SourceRef::Paid, 123_456_789_012_345),
                take(SourceRef::Credit, 7),
                take(SourceRef::Debt, 2),
            ],
            total_money: Money::from_picos(123_456_789_012_355),
            price_version: Some(VersionId::parse("v2026-11").unwrap()),
            reserved_at: "2026-11-30T23:59:59.123456789Z".parse().unwrap(),
            settled_at: "2026-12-01T00:00:01.000000001Z".parse().unwrap(),
        };
        Journaled {
            journal: ProducerId::parse("journal-a").unwrap(),
            seq: 42,
            record,
            leased: Vec::new(),
            unleased: Vec::new(),
            producer: ProducerId::parse("sidecar-a").unwrap(),
            epoch: 1,
        }
    }

    fn audit() -> AuditRecord {
        AuditRecord {
            kind: "audit".into(),
            account_id: Some(AccountId::parse("acme").unwrap()),
            operator: "alice".into(),
            peer: "127.0.0.1:1".into(),
            operation: "top_up".into(),
            adjustment_id: "inv-1".into(),
            reason: "invoice paid".into(),
            change: "{}".into(),
            before: serde_json::Map::new(),
            after: serde_json::Map::new(),
            refunded: Vec::new(),
            at: "2026-12-01T00:00:00Z".parse().unwrap(),
        }
    }

    #[test]
    fn records_read_back_from_their_one_encoding_exactly_as_written() {
        let written = settle();
        let mut stream = StreamEntry::default();
        stream.record(&written).unwrap();
        stream.audit(&audit()).unwrap();
        let (id, records) = entry_records(&entry(&[
            ("count", b"2"),
            ("pb", &stream.pb),
            ("audit", &stream.audit_array()),
        ]))
        .unwrap();
        assert_eq!(id, "1764422400000-0");
        assert_eq!(records.len(), 2);
        let read: UsageRecord = serde_json::from_value(records[0].clone()).unwrap();
        assert_eq!(read, written.record);
        assert_eq!(records[0]["record_id"], written.record.id());
        // Derived, not stored: the stream carries no record id.
        let batch = <crate::proto::UsageRecordBatch as prost::Message>::decode(stream.pb.as_slice()).unwrap();
        assert_eq!(batch.records[0].record_id, "", "derived, so left out");
        assert_eq!(batch.records[0].request_id, written.record.request_id.as_str());
        assert_eq!(records[0]["journal"], "journal-a");
        assert_eq!(records[0]["journal_seq"], 42);
        let read: AuditRecord = serde_json::from_value(records[1].clone()).unwrap();
        assert_eq!(read, audit());
        assert_eq!(records[1]["record_id"], audit().id());
    }

    #[test]
    fn entries_of_earlier_versions_read_as_they_were_written() {
        // An entry as versions that wrote every record twice wrote it: the
        // JSON array is what they meant consumers to read.
        let json = br#"[{"kind":"charge","request_id":"r1","account_id":"acme","record_id":"ab"},{"kind":"audit","operator":"bob"}]"#;
        let (_, records) = entry_records(&entry(&[("count", b"2"), ("json", json), ("pb", b"")])).unwrap();
        let expected: Vec<serde_json::Value> = serde_json::from_slice(json).unwrap();
        assert_eq!(records, expected);
    }

    #[test]
    fn an_entry_that_does_not_read_back_still_gives_something_to_acknowledge() {
        for fields in [
            &[("count", &b"1"[..]), ("pb", &b"\x0a\xff\x01junk"[..])][..],
            &[("other", &b"x"[..])][..],
        ] {
            let (_, records) = entry_records(&entry(fields)).unwrap();
            assert_eq!(records, [serde_json::Value::Null]);
        }
    }
}
