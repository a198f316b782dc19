//! The journal and the usage stream against real processes: a sidecar
//! killed with SIGKILL again and again under load, restarted on the same
//! journal; every settle it acknowledged reaches the usage stream exactly
//! once, and the account is charged exactly what the stream says.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::fleet::{Sidecar, picos, shared_account, stream_records, write_config};
use support::redis::RedisServer;
use tollgate::proto;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace_seconds = 5

[store.redis]
deadline_ms = 1000

[leases]
ttl_seconds = 3
horizon_ms = 500
idle_return_seconds = 1
report_interval_ms = 200

[journal]
sync = "always"

[plans.payg]

[[prices]]
id = "v1"
effective_at = "2026-01-01T00:00:00Z"
[prices.models.m.tiers.default]
input = "1"
output = "4"

[[accounts]]
id = "shared"
plan = "payg"
paid = "1000"
"#;

/// Reserve+settle loops against `sidecar` until `until`; the request ids of
/// every settle acknowledged go into `acked`. Errors (the sidecar killed)
/// end a loop.
async fn load(sidecar: &Sidecar, round: usize, until: Instant, acked: &Arc<Mutex<HashSet<String>>>) {
    let mut tasks = Vec::new();
    for c in 0..8 {
        let mut quota = sidecar.client().await;
        let acked = Arc::clone(acked);
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                if Instant::now() >= until {
                    return;
                }
                let id = format!("r{round}-c{c}-{i}");
                let Ok(r) = quota.reserve(support::reserve("shared", &id, 100, 100)).await else {
                    return;
                };
                assert_eq!(r.into_inner().decision, proto::Decision::Allow as i32);
                match quota.settle(support::settle("shared", &id, 100, i % 100)).await {
                    Ok(_) => {
                        acked.lock().unwrap().insert(id);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_again_and_again_every_acknowledged_settle_is_in_the_stream_once() {
    let redis = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), CONFIG);
    let journal = dir.path().join("journal");
    let usage = |round: usize| dir.path().join(format!("usage-{round}.jsonl"));
    let acked = Arc::new(Mutex::new(HashSet::new()));
    for round in 0..4 {
        let mut sidecar = Sidecar::spawn_with_journal(&config, &[redis.url()], usage(round), &journal);
        let killer = async {
            tokio::time::sleep(Duration::from_millis(800)).await;
        };
        let until = Instant::now() + Duration::from_secs(60);
        tokio::select! {
            () = load(&sidecar, round, until, &acked) => panic!("the load ended before the crash"),
            () = killer => {}
        }
        // Mid-load: no lease returned, no report sent, the journal as it is.
        sidecar.kill();
    }
    // Once more, to replay what the last crash left, then a clean stop.
    let mut sidecar = Sidecar::spawn_with_journal(&config, &[redis.url()], usage(9), &journal);
    tokio::time::sleep(Duration::from_secs(2)).await;
    sidecar.stop();

    let records = stream_records(&redis.url(), 1).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &records {
        *seen.entry(r["request_id"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    let duplicated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicated.is_empty(), "records in the stream twice: {duplicated:?}");
    let acked = acked.lock().unwrap();
    assert!(acked.len() > 100, "the load ran: {} settles acknowledged", acked.len());
    let missing: Vec<_> = acked.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged settles missing from the stream: {missing:?}"
    );
    let account = shared_account(redis.port, 1, "shared");
    let (paid, debt) = (account.paid, account.debt);
    assert_eq!(
        paid.charged() + debt.charged(),
        picos(&records),
        "the account is charged exactly what the stream records"
    );
    assert!(paid.available() >= 0);
}

/// Found by the simulation (tests/simulation.rs, seeds 3, 6, 27 and 57): a
/// hold that lapsed under `charge_in_full` is charged by the next command
/// on its account, even one that is refused; its record must reach the
/// journal with that command, or a crash before the next one loses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_charged_in_full_during_a_refused_call_survives_a_crash() {
    let redis = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let dir = tempfile::tempdir().unwrap();
    // No sweep to take the record first; holds lapse after a second.
    let config = CONFIG.replace(
        "[plans.payg]",
        "[store]\nsweep_interval_ms = 600000\n\n[holds]\nttl_seconds = 1\non_expiry = \"charge_in_full\"\n\n[plans.payg]",
    );
    let config = write_config(dir.path(), &config);
    let journal = dir.path().join("journal");
    let mut sidecar = Sidecar::spawn_with_journal(&config, &[redis.url()], dir.path().join("usage-0.jsonl"), &journal);
    let mut quota = sidecar.client().await;
    let held = quota
        .reserve(support::reserve("shared", "lapsing", 100, 100))
        .await
        .unwrap();
    assert_eq!(held.into_inner().decision, proto::Decision::Allow as i32);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let refused = quota
        .settle(support::settle("shared", "unknown", 1, 1))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    sidecar.kill();

    // Replayed and sent by the upkeep (within report_interval_ms), not
    // only at shutdown, though the new mirror holds nothing.
    let mut sidecar = Sidecar::spawn_with_journal(&config, &[redis.url()], dir.path().join("usage-1.jsonl"), &journal);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stream_records(&redis.url(), 1)
        .await
        .iter()
        .any(|r| r["request_id"] == "lapsing")
    {
        assert!(
            Instant::now() < deadline,
            "the replayed record never reached the stream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sidecar.stop();
    let records = stream_records(&redis.url(), 1).await;
    let lapsed: Vec<_> = records.iter().filter(|r| r["request_id"] == "lapsing").collect();
    assert_eq!(lapsed.len(), 1, "the lapsed hold's record, once: {records:?}");
    let account = shared_account(redis.port, 1, "shared");
    let (paid, debt) = (account.paid, account.debt);
    assert_eq!(paid.charged() + debt.charged(), picos(&records));
    assert_eq!(
        picos(&records),
        500_000_000,
        "100 in and 100 out at 1 and 4 per million"
    );
}

/// A one-shot charge of `money` for `request_id` on account `shared`.
fn charge(request_id: &str, money: &str) -> proto::ChargeRequest {
    proto::ChargeRequest {
        account_id: "shared".into(),
        request_id: request_id.into(),
        charge: Some(proto::charge_request::Charge::Amount(support::money(money))),
        ..Default::default()
    }
}

/// A sidecar on `redis` named `name`: usage file `DIR/NAME.jsonl`, journal
/// `DIR/jNAME`.
fn spawn_in(dir: &std::path::Path, config: &std::path::Path, redis: &RedisServer, name: &str) -> Sidecar {
    let usage = dir.join(format!("{name}.jsonl"));
    Sidecar::spawn_with_journal(config, &[redis.url()], usage, &dir.join(format!("j{name}")))
}

/// `message` marked as a call its client sends again after an unknown
/// outcome, as gRPC's retry machinery and Tollgate's clients mark it.
fn resent<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(tollgate::api::quota::PREVIOUS_ATTEMPTS, "1".parse().unwrap());
    request
}

/// Waits until the usage stream holds `n` records.
async fn stream_reaches(url: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while stream_records(url, 1).await.len() < n {
        assert!(Instant::now() < deadline, "the stream never reached {n} records");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Retries as a fleet sees them: the same request id sent to a second
/// sidecar, and to a sidecar SIGKILLed and restarted on its journal (which
/// remembers nothing of the first call). Each request id is charged once,
/// the stream holds one record for it, and the balance moves by what the
/// stream says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_charged_once_across_sidecars_and_restarts() {
    let redis = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), CONFIG);
    let (journal_a, journal_b) = (dir.path().join("journal-a"), dir.path().join("journal-b"));
    let mut a = Sidecar::spawn_with_journal(&config, &[redis.url()], dir.path().join("a-0.jsonl"), &journal_a);
    let mut b = Sidecar::spawn_with_journal(&config, &[redis.url()], dir.path().join("b.jsonl"), &journal_b);
    let (mut qa, mut qb) = (a.client().await, b.client().await);

    // The same charge through both sidecars.
    qa.charge(charge("both", "1")).await.unwrap();
    qb.charge(charge("both", "1")).await.unwrap();
    // The same reserve and settle through both.
    for q in [&mut qa, &mut qb] {
        let r = q
            .reserve(support::reserve("shared", "held-twice", 100, 100))
            .await
            .unwrap();
        assert_eq!(r.into_inner().decision, proto::Decision::Allow as i32);
        q.settle(support::settle("shared", "held-twice", 100, 50))
            .await
            .unwrap();
    }
    // A charge acknowledged, the sidecar killed and restarted, the charge again.
    qa.charge(charge("restarted", "2")).await.unwrap();
    a.kill();
    let mut a = Sidecar::spawn_with_journal(&config, &[redis.url()], dir.path().join("a-1.jsonl"), &journal_a);
    a.client().await.charge(charge("restarted", "2")).await.unwrap();
    a.stop();
    b.stop();

    let records = stream_records(&redis.url(), 1).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &records {
        *seen.entry(r["request_id"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    assert_eq!(
        seen,
        HashMap::from([("both".into(), 1), ("held-twice".into(), 1), ("restarted".into(), 1)]),
        "one record per request id: {records:?}"
    );
    let account = shared_account(redis.port, 1, "shared");
    let paid = account.paid;
    // 1 + 2, and 100 in and 50 out at 1 and 4 per million.
    assert_eq!(picos(&records), 3_000_000_000_000 + 300_000_000);
    assert_eq!(paid.charged(), picos(&records), "charged once per request id");
}

/// A settle resent after its record reached Redis, to a sidecar that never
/// held the reservation and to the one that did, killed and restarted
/// meanwhile: both answer as the first call did, the first from the
/// record in the stream (it once said only that the reservation was
/// settled), the second from its journal or the stream. Nothing is charged
/// again; a reservation nobody made is still not found, and a resend of a
/// settle whose record may still be on its way is told to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_resent_elsewhere_or_after_a_restart_is_answered_as_the_first_was() {
    let redis = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), CONFIG);
    let journal = dir.path().join("journal-a");
    let mut a = Sidecar::spawn_with_journal(&config, &[redis.url()], dir.path().join("a-0.jsonl"), &journal);
    let mut b = Sidecar::spawn_with_journal(
        &config,
        &[redis.url()],
        dir.path().join("b.jsonl"),
        &dir.path().join("journal-b"),
    );
    let mut qa = a.client().await;
    qa.reserve(support::reserve("shared", "settled-once", 100, 100))
        .await
        .unwrap();
    let first = qa
        .settle(support::settle("shared", "settled-once", 100, 50))
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stream_records(&redis.url(), 1).await.is_empty() {
        assert!(Instant::now() < deadline, "the record never reached the stream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut qb = b.client().await;
    // Its record is in the stream: answered from it, as the first was.
    let elsewhere = qb
        .settle(support::settle("shared", "settled-once", 100, 50))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(elsewhere.record, first.record, "answered as the first settle was");
    let never = qb
        .settle(support::settle("shared", "never-reserved", 100, 50))
        .await
        .unwrap_err();
    assert_eq!(never.code(), tonic::Code::NotFound, "{never:?}");
    // A resend of a settle b does not hold, whose record is not in the
    // store (it may be on its way from the sidecar that holds it): retry.
    qa.reserve(support::reserve("shared", "held-by-a", 100, 100))
        .await
        .unwrap();
    let unknown = qb
        .settle(resent(support::settle("shared", "held-by-a", 100, 50)))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::Unavailable, "{unknown:?}");
    assert!(unknown.message().contains("not held by this sidecar"), "{unknown:?}");
    qa.settle(support::settle("shared", "held-by-a", 100, 50))
        .await
        .unwrap();
    stream_reaches(&redis.url(), 2).await;

    a.kill();
    let mut a = Sidecar::spawn_with_journal(&config, &[redis.url()], dir.path().join("a-1.jsonl"), &journal);
    match a
        .client()
        .await
        .settle(support::settle("shared", "settled-once", 100, 50))
        .await
    {
        Ok(again) => assert_eq!(again.into_inner().record, first.record, "answered as the first time"),
        Err(again) => {
            assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
            assert!(again.message().contains("settled or charged already"), "{again:?}");
        }
    }
    a.stop();
    b.stop();
    let records = stream_records(&redis.url(), 1).await;
    assert_eq!(records.len(), 2, "each settled once: {records:?}");
    let paid = shared_account(redis.port, 1, "shared").paid;
    assert_eq!(paid.charged(), picos(&records), "charged once");
}

/// Runs `tollgate ARGS` and returns its stdout.
fn tollgate(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env_remove("TOLLGATE_REDIS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_export_and_tail_consume_the_stream_as_a_consumer_group() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), CONFIG);
    let mut sidecar = Sidecar::spawn_with_journal(
        &config,
        &[redis.url()],
        dir.path().join("usage.jsonl"),
        &dir.path().join("journal"),
    );
    let mut admin = sidecar.admin().await;
    let top_up = tonic::Request::new(proto::TopUpRequest {
        account_id: "shared".into(),
        adjustment_id: "invoice-2026-11".into(),
        pool: proto::MoneyPool::Paid as i32,
        amount: Some(support::money("5")),
        reason: "November invoice paid".into(),
        ..Default::default()
    });
    let retry = tonic::Request::new(top_up.get_ref().clone());
    admin.top_up(top_up).await.unwrap();
    // A retried adjustment changes nothing and is not audited twice.
    admin.top_up(retry).await.unwrap();
    let mut quota = sidecar.client().await;
    for i in 0..10u64 {
        let id = format!("e{i}");
        quota.reserve(support::reserve("shared", &id, 100, 100)).await.unwrap();
        quota.settle(support::settle("shared", &id, 100, 10 * i)).await.unwrap();
    }
    sidecar.stop();
    let url = redis.url();
    let window = ["--from", "2000-01-01T00:00:00Z", "--to", "2100-01-01T00:00:00Z"];
    // An export that cannot write its totals (a full disk, a closed pipe)
    // acknowledges nothing: the next run gets every record.
    let failed = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([&["usage", "export", "--redis", &url][..], &window[..]].concat())
        .env_remove("TOLLGATE_REDIS")
        .stdout(std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap())
        .output()
        .unwrap();
    assert!(!failed.status.success(), "writing to /dev/full fails");
    let csv = tollgate(&[&["usage", "export", "--redis", &url][..], &window[..]].concat());
    // 10 × 100 input tokens at 1/M, 0+10+…+90 = 450 output tokens at 4/M.
    assert_eq!(
        csv,
        "account_id,model,records,input_tokens,cached_input_tokens,cache_write_tokens,output_tokens,total_money\n\
         shared,m,10,1000,0,0,450,0.002800000000\n"
    );
    let again = tollgate(&[&["usage", "export", "--redis", &url][..], &window[..]].concat());
    assert_eq!(again.lines().count(), 1, "the group consumed them: only the header");
    let tail = tollgate(&["usage", "tail", "--redis", &url, "--group", "audit", "--max", "11"]);
    let (audits, records): (Vec<serde_json::Value>, Vec<serde_json::Value>) = tail
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .partition(|r| r["kind"] == "audit");
    // The operator's change is on the stream too, with who and why.
    assert_eq!(audits.len(), 1, "{audits:?}");
    let audit = &audits[0];
    assert_eq!(
        (
            audit["operator"].as_str(),
            audit["reason"].as_str(),
            audit["operation"].as_str()
        ),
        (Some("alice@billing"), Some("November invoice paid"), Some("top_up"))
    );
    assert_eq!(audit["adjustment_id"], "invoice-2026-11");
    let ids: HashSet<&str> = records.iter().map(|r| r["record_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 10, "another group reads them all again, once each");
    for r in &records {
        assert_eq!(r["record_id"].as_str().unwrap().len(), 32, "{r}");
        assert!(r["journal"].as_str().unwrap().starts_with("journal-"), "{r}");
        assert!(r["journal_seq"].as_u64().unwrap() > 0, "{r}");
    }
    // Each record is on the stream once, in one encoding: usage records
    // in `pb`, the audit record in `audit`, no field carrying a second
    // copy; and what the stream carries reads back exactly as the usage
    // file wrote it.
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // An entry: its id and its fields, each a name and its bytes.
    type Entry = (String, Vec<(String, Vec<u8>)>);
    let entries: Vec<Entry> = redis::cmd("XRANGE")
        .arg(tollgate::store::leased::stream_key("tollgate", 0))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut fields: Vec<String> = entries
        .iter()
        .flat_map(|(_, fields)| fields.iter().map(|(name, _)| name.clone()))
        .collect();
    fields.sort();
    fields.dedup();
    assert_eq!(fields, ["audit", "count", "pb"]);
    let written: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("usage.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["kind"] != "audit")
        .collect();
    assert_eq!(written.len(), 10);
    for w in &written {
        let streamed = records
            .iter()
            .find(|r| r["request_id"] == w["request_id"])
            .unwrap_or_else(|| panic!("{w} is not on the stream"));
        for (field, value) in w.as_object().unwrap() {
            assert_eq!(&streamed[field], value, "{field} of {w} on the stream: {streamed}");
        }
    }
}

/// Two sidecars on one journal directory would number records alike, and
/// the later ones would be skipped as already applied: the second refuses
/// to start, saying why, and the first serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sidecar_on_a_journal_in_use_refuses_to_start() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), CONFIG);
    let journal = dir.path().join("journal");
    let mut first = Sidecar::spawn_with_journal(&config, &[redis.url()], dir.path().join("a.jsonl"), &journal);
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--journal")
        .arg(&journal)
        .args(["--redis", &redis.url()])
        .env("TOLLGATE_USAGE_PATH", dir.path().join("b.jsonl"))
        .env_remove("TOLLGATE_REDIS")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second sidecar started on a journal in use");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("is in use by another process"), "{err}");
    let mut quota = first.client().await;
    let r = quota
        .reserve(support::reserve("shared", "after", 10, 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, proto::Decision::Allow as i32);
    first.stop();
}

/// A charge resent to another sidecar once the first call's record is in
/// Redis is answered as the first call was: marked as a resend, the second
/// sidecar looks the request up before deciding; unmarked, it does so when
/// it would deny for funds (the first call may have taken them), rather
/// than deny a request that was allowed and billed. Nothing is charged
/// twice. (Before, both were decided again: a second record with other
/// charges and another time, or a denial.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_resent_elsewhere_is_answered_as_the_first_call_was() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), CONFIG);
    let (mut a, mut b) = (
        spawn_in(dir.path(), &config, &redis, "a"),
        spawn_in(dir.path(), &config, &redis, "b"),
    );
    let (mut qa, mut qb) = (a.client().await, b.client().await);
    let some = qa.charge(charge("some", "1")).await.unwrap().into_inner();
    assert_eq!(some.decision, proto::Decision::Allow as i32);
    stream_reaches(&redis.url(), 1).await;
    let again = qb.charge(resent(charge("some", "1"))).await.unwrap().into_inner();
    assert_eq!(again, some, "a marked resend is answered as the first call was");
    // The same call unmarked is decided again there (and charged once).
    let decided = qb.charge(charge("some", "1")).await.unwrap().into_inner();
    assert_eq!(decided.decision, proto::Decision::Allow as i32);
    assert_ne!(decided.record, some.record, "decided again, with its own time");
    // b reports (its record of "some" is found repeated: never charged)
    // and gives back what it holds, so a can take all that is left.
    let balance = proto::GetBalanceRequest {
        account_id: "shared".into(),
    };
    qb.get_balance(balance).await.unwrap();

    let first = qa.charge(charge("everything", "999")).await.unwrap().into_inner();
    assert_eq!(first.decision, proto::Decision::Allow as i32);
    stream_reaches(&redis.url(), 2).await;
    // Unmarked, short of funds: it asks, and answers as the first did.
    let again = qb.charge(charge("everything", "999")).await.unwrap().into_inner();
    assert_eq!(again, first, "not a denial of a request that was charged");
    // The same id for another call is told it was charged already.
    let other = qb.charge(charge("everything", "5")).await.unwrap_err();
    assert_eq!(other.code(), tonic::Code::FailedPrecondition, "{other:?}");
    assert!(other.message().contains("settled or charged already"), "{other:?}");
    // A new request there is denied for funds, as it should be.
    let new = qb.charge(charge("more", "1")).await.unwrap().into_inner();
    assert_eq!(new.decision, proto::Decision::Deny as i32);
    a.stop();
    b.stop();
    let records = stream_records(&redis.url(), 1).await;
    assert_eq!(records.len(), 2, "each request id once: {records:?}");
    let paid = shared_account(redis.port, 1, "shared").paid;
    assert_eq!(paid.charged(), picos(&records));
}

/// The ids of the entries of shard 0's usage stream, oldest first.
async fn entry_ids(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let key = tollgate::store::leased::stream_key("tollgate", 0);
    let reply: redis::Value = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    let redis::Value::Array(entries) = reply else {
        panic!("XRANGE answered {reply:?}")
    };
    entries
        .iter()
        .filter_map(|e| match e {
            redis::Value::Array(parts) => match parts.first() {
                Some(redis::Value::BulkString(id)) => Some(String::from_utf8_lossy(id).into_owned()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Runs one Redis command on `conn`, its answer ignored.
async fn run(conn: &mut redis::aio::MultiplexedConnection, args: &[&str]) {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let _: redis::Value = cmd.query_async(conn).await.unwrap();
}

/// With `store.redis.consumer_groups`, the sidecars trim each usage stream
/// of the entries every named group has acknowledged, and of nothing else:
/// not while a group is missing, not an entry a group read and has not
/// acknowledged, not one a group has not read. (Before, the stream was
/// never trimmed: Redis filled with usage records.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_stream_is_trimmed_of_what_every_consumer_group_acknowledged() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    // Trimmed every ten report intervals: 2 s here.
    let config = CONFIG
        .replace(
            "[store.redis]\n",
            "[store.redis]\nconsumer_groups = [\"billing\", \"audit\"]\ntrim_keep_seconds = 0\n",
        )
        .replace("[server]\n", "[server]\nhttp_listen = \"127.0.0.1:0\"\n");
    let config = write_config(dir.path(), &config);
    let mut sidecar = Sidecar::spawn_with_journal(
        &config,
        &[redis.url()],
        dir.path().join("usage.jsonl"),
        &dir.path().join("journal"),
    );
    let mut quota = sidecar.client().await;
    for i in 0..4 {
        quota.charge(charge(&format!("t{i}"), "1")).await.unwrap();
        // Each its own commit, so its own entry.
        stream_reaches(&redis.url(), i + 1).await;
    }
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let ids = entry_ids(&mut conn).await;
    assert_eq!(ids.len(), 4, "{ids:?}");
    let stream = tollgate::store::leased::stream_key("tollgate", 0);
    let trims = Duration::from_secs(3);
    // billing reads and acknowledges everything; audit does not exist yet.
    run(&mut conn, &["XGROUP", "CREATE", &stream, "billing", "0"]).await;
    run(
        &mut conn,
        &["XREADGROUP", "GROUP", "billing", "b", "STREAMS", &stream, ">"],
    )
    .await;
    run(
        &mut conn,
        &["XACK", &stream, "billing", &ids[0], &ids[1], &ids[2], &ids[3]],
    )
    .await;
    tokio::time::sleep(trims).await;
    assert_eq!(
        entry_ids(&mut conn).await,
        ids,
        "nothing trimmed while a group is missing"
    );
    // audit reads two entries and acknowledges the first only.
    run(&mut conn, &["XGROUP", "CREATE", &stream, "audit", "0"]).await;
    run(
        &mut conn,
        &[
            "XREADGROUP",
            "GROUP",
            "audit",
            "a",
            "COUNT",
            "2",
            "STREAMS",
            &stream,
            ">",
        ],
    )
    .await;
    run(&mut conn, &["XACK", &stream, "audit", &ids[0]]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while entry_ids(&mut conn).await.len() == 4 {
        assert!(Instant::now() < deadline, "never trimmed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(trims).await;
    assert_eq!(
        entry_ids(&mut conn).await,
        ids[1..],
        "only what both groups acknowledged is trimmed"
    );
    // audit acknowledges the second and has not read the rest.
    run(&mut conn, &["XACK", &stream, "audit", &ids[1]]).await;
    tokio::time::sleep(trims).await;
    assert_eq!(entry_ids(&mut conn).await, ids[2..], "never what a group has not read");
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.contains("tollgate_usage_stream_unacknowledged{group=\"audit\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("tollgate_usage_stream_trimmed_total 2"), "{metrics}");
    sidecar.stop();
}

/// Entries younger than `store.redis.trim_keep_seconds` stay, however
/// acknowledged: a resend to another sidecar still reads its first call's
/// record there. (Trimming once removed them as soon as every group had
/// acknowledged them, and such a resend lost its first answer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn young_stream_entries_stay_for_resends_to_read() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = CONFIG.replace(
        "[store.redis]\n",
        "[store.redis]\nconsumer_groups = [\"billing\"]\ntrim_keep_seconds = 600\n",
    );
    let config = write_config(dir.path(), &config);
    let (mut a, mut b) = (
        spawn_in(dir.path(), &config, &redis, "a"),
        spawn_in(dir.path(), &config, &redis, "b"),
    );
    let first = a.client().await.charge(charge("kept", "1")).await.unwrap().into_inner();
    stream_reaches(&redis.url(), 1).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let ids = entry_ids(&mut conn).await;
    let stream = tollgate::store::leased::stream_key("tollgate", 0);
    run(&mut conn, &["XGROUP", "CREATE", &stream, "billing", "0"]).await;
    run(
        &mut conn,
        &["XREADGROUP", "GROUP", "billing", "b", "STREAMS", &stream, ">"],
    )
    .await;
    run(&mut conn, &["XACK", &stream, "billing", &ids[0]]).await;
    // Trims run every ten report intervals (2 s here).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(entry_ids(&mut conn).await, ids, "acknowledged, but young: kept");
    let again = b
        .client()
        .await
        .charge(resent(charge("kept", "1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first, "the resend elsewhere reads the first call's record");
    a.stop();
    b.stop();
}
