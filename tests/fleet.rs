//! Several real Tollgate processes share accounts through one Redis or a
//! Redis Cluster: no source goes below its floor, every unit is accounted
//! for once the fleet is quiescent, and the usage records add up to what
//! Redis charged — with all sidecars healthy, with one crashing, and
//! through a Redis outage.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::fleet::{FLEET, Sidecar, fleet, fleet_with, load, quiescent, recorded, shared_account, write_config};
use support::redis::{RedisCluster, RedisServer};
use tollgate::engine::Money;

/// What `FLEET` credits the shared account (0.5), in pico-units.
const PAID: i128 = 500_000_000_000;

async fn three_sidecars_drain_one_account(urls: Vec<String>, port: u16, shards: u32) {
    let dir = tempfile::tempdir().unwrap();
    let mut sidecars = fleet(3, dir.path(), &urls);
    let stop = Arc::new(AtomicBool::new(false));
    let mut allowed = 0;
    for task in load(&sidecars, 40, &stop).await {
        let (a, unavailable) = task.await.unwrap();
        assert_eq!(unavailable, 0, "Redis is up: nothing is unavailable");
        allowed += a;
    }
    assert!(allowed > 500, "the fleet served the account: {allowed}");
    for sidecar in &mut sidecars {
        sidecar.stop();
    }
    let paid = quiescent(port, shards, PAID);
    let in_records = recorded(&sidecars);
    assert_eq!(in_records, paid.charged(), "the records add up to what Redis charged");
    assert_eq!(
        paid.granted() - paid.available(),
        paid.charged(),
        "and to the balance change"
    );
    // Drained: less than one request's worst case (0.0005) per sidecar is left.
    assert!(paid.available() < 3 * 500_000_000, "left {}", paid.available());
    // The billing database, loaded from the streams, agrees with Redis.
    support::postgres::loaded_and_reconciled(&urls, shards).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_on_one_redis_drain_one_account_exactly() {
    let redis = RedisServer::start(&[]);
    three_sidecars_drain_one_account(vec![redis.url()], redis.port, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_on_a_redis_cluster_drain_one_account_exactly() {
    let cluster = RedisCluster::start(3);
    three_sidecars_drain_one_account(cluster.urls(), cluster.nodes[0].port, 16).await;
}

/// Three sidecars drive one API key to its money budget: between them
/// they never let it spend past the budget, they get to within a request
/// of it, and once every lease is back the budget counts exactly what the
/// key's usage records charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_drive_one_key_to_its_budget_and_never_past_it() {
    use tollgate::proto;
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let mut sidecars = fleet(3, dir.path(), &[redis.url()]);
    // 0.1 a month on key k1 (the account holds 0.5): 200 worst cases of
    // 100 input and 100 output tokens.
    const CAP: i128 = 100_000_000_000;
    let mut admin = support::admin_client(&sidecars[0].admin_url, Some(support::WRITE_TOKEN)).await;
    let budget = proto::Budget {
        period: "month".into(),
        money: Some(support::money("0.1")),
        tokens: 0,
    };
    admin
        .set_budgets(proto::SetBudgetsRequest {
            account_id: "shared".into(),
            budgets: Some(proto::Budgets {
                api_keys: [("k1".to_owned(), budget)].into(),
                ..Default::default()
            }),
            adjustment_id: "cap-k1".into(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (s, sidecar) in sidecars.iter().enumerate() {
        for c in 0..8 {
            let (quota, stop) = (sidecar.client().await, Arc::clone(&stop));
            let until = proto::DenyReason::BudgetExceeded;
            tasks.push(tokio::spawn(async move {
                support::fleet::drain_as(quota, ("shared", "k1"), s * 1000 + c, stop, until).await
            }));
        }
    }
    let mut allowed = 0;
    for task in tasks {
        let (a, unavailable) = task.await.unwrap();
        assert_eq!(unavailable, 0);
        allowed += a;
    }
    assert!(allowed > 200, "the fleet served the key: {allowed}");
    for sidecar in &mut sidecars {
        sidecar.stop();
    }
    let spent: i128 = support::fleet::picos(&sidecars.iter().flat_map(Sidecar::records).collect::<Vec<_>>());
    assert!(spent <= CAP, "the key spent {spent} under a budget of {CAP}");
    assert!(spent > CAP - 3 * 500_000_000, "stopped short of the budget: {spent}");
    let account = shared_account(redis.port, 1, "shared");
    let now = jiff::Timestamp::now();
    let counted = &account.balance(now).budgets[0].counted;
    assert_eq!(counted.used.money, spent, "the budget counts what the records charged");
    let paid = quiescent(redis.port, 1, PAID);
    assert_eq!(paid.charged(), spent, "and Redis charged the same");
}

/// Three sidecars spend one account past two alert thresholds while one
/// of them is SIGKILLed mid-load: each threshold is alerted exactly once
/// on the usage stream (the commit that crosses it writes it, whichever
/// sidecar makes that commit), and no usage file holds one twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_threshold_alerts_once_across_three_sidecars_and_a_sigkill() {
    use tollgate::proto;
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let mut sidecars = fleet(3, dir.path(), &[redis.url()]);
    let mut admin = support::admin_client(&sidecars[0].admin_url, Some(support::WRITE_TOKEN)).await;
    admin
        .set_alerts(proto::SetAlertsRequest {
            account_id: "shared".into(),
            alerts: Some(proto::AlertSettings {
                balance_below: ["0.45", "0.3", "0.2"].map(support::money).to_vec(),
                ..Default::default()
            }),
            adjustment_id: "alerts-1".into(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    // The survivors' clients run until the account is drained; the killed
    // sidecar's until then.
    let (never, survivors_done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let mut survivors = Vec::new();
    let mut doomed = Vec::new();
    for (s, sidecar) in sidecars.iter().enumerate() {
        for c in 0..8 {
            let quota = sidecar.client().await;
            let stop = Arc::clone(if s == 2 { &survivors_done } else { &never });
            let task = tokio::spawn(async move { support::fleet::drain(quota, "shared", s * 1000 + c, stop).await });
            if s == 2 {
                doomed.push(task)
            } else {
                survivors.push(task)
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    sidecars[2].kill();
    for task in survivors {
        task.await.unwrap();
    }
    survivors_done.store(true, Ordering::Relaxed);
    for task in doomed {
        task.await.unwrap();
    }
    for sidecar in &mut sidecars[..2] {
        sidecar.stop();
    }
    let streamed = support::fleet::stream_records(&redis.url(), 1).await;
    let alerts: Vec<&serde_json::Value> = streamed.iter().filter(|r| r["kind"] == "alert").collect();
    let thresholds: Vec<&str> = alerts.iter().map(|a| a["threshold"].as_str().unwrap()).collect();
    // Money left only falls here: every threshold above what is left at
    // the end was crossed, once.
    let paid = shared_account(redis.port, 1, "shared").paid;
    let left = paid.available() + paid.held();
    let crossed: Vec<&str> = [
        ("0.450000000000", 450),
        ("0.300000000000", 300),
        ("0.200000000000", 200),
    ]
    .into_iter()
    .filter(|(_, milli)| left < milli * 1_000_000_000)
    .map(|(t, _)| t)
    .collect();
    assert!(
        crossed.len() >= 2,
        "the load spent past two thresholds at least: {left} left"
    );
    assert_eq!(thresholds, crossed, "{alerts:?}");
    let mut in_files: Vec<String> = sidecars
        .iter()
        .flat_map(Sidecar::alerts)
        .map(|a| a["threshold"].as_str().unwrap().to_owned())
        .collect();
    let all = in_files.len();
    in_files.sort();
    in_files.dedup();
    assert_eq!(all, in_files.len(), "an alert written twice: {in_files:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_sidecars_lease_is_set_aside_until_it_restarts_on_its_journal() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    // Holds lapse after a second.
    let config = FLEET.replace("[plans.payg]", "[holds]\nttl_seconds = 1\n\n[plans.payg]");
    let mut sidecars = fleet_with(3, dir.path(), &[redis.url()], &config);
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&sidecars, 20, &stop).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Mid-load, no lease returned, nothing flushed.
    sidecars[0].kill();
    let lent_at_crash: i128 = shared_account(redis.port, 1, "shared").paid.held();
    assert!(lent_at_crash > 0, "the fleet held slices when one crashed");
    // The others go on; the crashed one's lease lapses 3 s after its last
    // sync, and what it held is set aside: records made under it may
    // still come (from its journal), within the idempotency window.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    for sidecar in &mut sidecars[1..] {
        sidecar.stop();
    }
    let account = shared_account(redis.port, 1, "shared");
    let lapsed: Vec<_> = account
        .leases()
        .values()
        // A lease starts at epoch 1; each lapse adds one.
        .filter(|l| l.epoch > 1)
        .collect();
    assert_eq!(
        lapsed.len(),
        1,
        "exactly the crashed sidecar's lease lapsed: {account:?}"
    );
    assert!(
        account.paid.held() > 0,
        "what the crashed sidecar held is set aside, not lent again: {account:?}"
    );
    // Restarted on its journal, it reports what the journal holds and takes
    // back what its predecessor's lease held, at its first sync.
    sidecars[0] = Sidecar::spawn(
        &write_config(dir.path(), &config),
        &[redis.url()],
        dir.path().join("usage-0.jsonl"),
    );
    let mut quota = sidecars[0].client().await;
    let reserve = tollgate::proto::ReserveRequest {
        account_id: "shared".into(),
        model: "m".into(),
        request_id: "after-the-restart".into(),
        input_tokens: 1,
        max_output_tokens: 1,
        ..Default::default()
    };
    let reserved = quota.reserve(reserve).await.unwrap().into_inner();
    if !reserved.reservation_id.is_empty() {
        let release = tollgate::proto::ReleaseRequest {
            account_id: "shared".into(),
            reservation_id: reserved.reservation_id,
        };
        quota.release(release).await.unwrap();
    }
    sidecars[0].stop();
    let paid = quiescent(redis.port, 1, PAID);
    let survivors = recorded(&sidecars[1..]);
    assert!(survivors <= paid.charged(), "every record of a survivor was charged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_go_on_from_leases_through_a_redis_outage_then_fail_closed() {
    // Persistent, so a restart keeps what was committed.
    let mut redis = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let dir = tempfile::tempdir().unwrap();
    let mut sidecars = fleet(3, dir.path(), &[redis.url()]);
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&sidecars, 8, &stop).await;
    // Steady state: every sidecar holds a slice.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let account = shared_account(redis.port, 1, "shared");
        let holding = account.leases().values().filter(|l| !l.held.is_empty()).count();
        if holding == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sidecars never all held slices"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = count_allowed(&sidecars).await;
    redis.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = count_allowed(&sidecars).await;
    redis.restart();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut unavailable = 0;
    for task in tasks {
        unavailable += task.await.unwrap().1;
    }
    assert!(during > before, "decisions continued from leases while Redis was down");
    assert!(unavailable > 0, "once the slices ran dry, the plan failed closed");
    for sidecar in &mut sidecars {
        sidecar.stop();
    }
    let paid = quiescent(redis.port, 1, PAID);
    let in_records = recorded(&sidecars);
    assert_eq!(in_records, paid.charged(), "every settle reached Redis exactly once");
    // And the usage stream has every record once, the journal having held
    // them through the outage.
    support::fleet::stream_holds_each_record_once(&sidecars, &redis.url()).await;
}

/// Usage records written so far by every sidecar.
async fn count_allowed(sidecars: &[Sidecar]) -> usize {
    sidecars
        .iter()
        .map(|s| {
            std::fs::read_to_string(&s.usage_path)
                .unwrap_or_default()
                .lines()
                .count()
        })
        .sum()
}

/// One plan per failure policy.
const POLICIES: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace_seconds = 5

[store.redis]
deadline_ms = 1000

[leases]
ttl_seconds = 30
report_interval_ms = 200

[plans.closed]
[plans.open]
on_store_outage = "open"
[plans.allowance]
on_store_outage = "allowance"
outage_allowance = "0.002"

[[prices]]
id = "v1"
effective_at = "2026-01-01T00:00:00Z"
[prices.models.m.tiers.default]
input = "1"
output = "4"

[[accounts]]
id = "closed"
plan = "closed"
paid = "1"

[[accounts]]
id = "open"
plan = "open"
paid = "1"

[[accounts]]
id = "allowance"
plan = "allowance"
paid = "1"
"#;

/// Reserves and settles (0.0005 each) on `account` until the first
/// UNAVAILABLE or `most` allowed; returns how many were allowed.
async fn until_refused(sidecar: &Sidecar, account: &str, most: u32) -> u32 {
    let mut quota = sidecar.client().await;
    for i in 0..most {
        let id = format!("{account}-{i}");
        let reserve = support::reserve(account, &id, 100, 100);
        match quota.reserve(reserve).await {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!(
                    r.decision,
                    tollgate::proto::Decision::Allow as i32,
                    "{account}: {}",
                    r.message
                );
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
                return i;
            }
        }
        quota.settle(support::settle(account, &id, 100, 100)).await.unwrap();
    }
    most
}

/// Money the records of `account` drew from `source`.
fn drawn(sidecar: &Sidecar, account: &str, source: &str) -> i128 {
    sidecar
        .records()
        .iter()
        .filter(|r| r["account_id"] == account)
        .flat_map(|r| r["charges"].as_array().unwrap().clone())
        .filter(|c| c["source"] == source)
        .map(|c| c["money"].as_str().unwrap().parse::<Money>().unwrap().picos())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_plan_fails_closed_open_or_within_its_allowance_while_redis_is_down() {
    let mut redis = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), POLICIES);
    let mut sidecar = Sidecar::spawn(&config, &[redis.url()], dir.path().join("usage.jsonl"));
    for account in ["closed", "open", "allowance"] {
        assert_eq!(until_refused(&sidecar, account, 1).await, 1, "Redis is up");
    }
    redis.stop();
    // What each mirror still holds is small (one request's need), then:
    let closed = until_refused(&sidecar, "closed", 50).await;
    let open = until_refused(&sidecar, "open", 50).await;
    let allowance = until_refused(&sidecar, "allowance", 50).await;
    assert!(closed < 50, "closed refuses once the slice is dry");
    assert_eq!(open, 50, "open admits everything, as debt");
    assert!(allowance < 50, "the allowance runs out");
    redis.restart();
    sidecar.stop();
    let debt = |account: &str| shared_account(redis.port, 1, account).debt;
    assert_eq!(debt("closed").charged(), 0, "a closed plan never owes");
    assert_eq!(debt("open").charged(), drawn(&sidecar, "open", "debt"));
    assert!(debt("open").charged() > 0);
    assert_eq!(debt("allowance").charged(), drawn(&sidecar, "allowance", "debt"));
    assert!(
        (1..=2_000_000_000).contains(&debt("allowance").charged()),
        "owed within the 0.002 allowance: {:?}",
        debt("allowance")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_at_one_sidecar_reach_the_others() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let sidecars = fleet(2, dir.path(), &[redis.url()]);
    let (mut a, mut b) = (sidecars[0].admin().await, sidecars[1].client().await);
    let reserve = |id: &str| support::reserve("shared", id, 100, 100);
    assert_eq!(
        b.reserve(reserve("r1")).await.unwrap().into_inner().decision,
        tollgate::proto::Decision::Allow as i32
    );
    a.suspend(tollgate::proto::SuspendRequest {
        account_id: "shared".into(),
        adjustment_id: "suspend-1".into(),
        reason: "fraud review".into(),
    })
    .await
    .unwrap();
    let mut seen = false;
    for i in 0..500 {
        let r = b.reserve(reserve(&format!("s{i}"))).await.unwrap().into_inner();
        if r.deny_reason == tollgate::proto::DenyReason::AccountSuspended as i32 {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "the other sidecar saw the suspension");
    a.resume(tollgate::proto::ResumeRequest {
        account_id: "shared".into(),
        adjustment_id: "resume-2".into(),
        reason: "cleared".into(),
    })
    .await
    .unwrap();

    // A price version published at one sidecar prices the other's reserves
    // from its effective time.
    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_millis(1500);
    let version = support::price_version("v2", at, "2", "8");
    let publish = tollgate::proto::PublishPriceVersionRequest {
        version: Some(version),
        adjustment_id: "list-2".into(),
        reason: "new prices".into(),
    };
    a.publish_price_version(publish.clone()).await.unwrap();
    // A retry through the other sidecar, before it has seen the version:
    // answered as the first call was, not refused as a duplicate.
    let mut b_admin = sidecars[1].admin().await;
    let again = b_admin.publish_price_version(publish).await.unwrap().into_inner();
    assert_eq!(again.versions, vec!["v1", "v2"]);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let mut priced = None;
    for i in 0..500 {
        let r = b.reserve(reserve(&format!("p{i}"))).await.unwrap().into_inner();
        if r.decision == tollgate::proto::Decision::Allow as i32 && r.price_version == "v2" {
            priced = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = priced.expect("the other sidecar prices with v2");
    let held = r
        .held
        .iter()
        .map(|t| t.money.clone().unwrap().decimal.parse::<Money>().unwrap())
        .try_fold(Money::ZERO, |sum, m| sum.checked_add(m))
        .unwrap();
    assert_eq!(held.to_string(), "0.001000000000", "100 × 2/M + 100 × 8/M");
}

/// A gateway in front of the fleet: a call whose outcome it did not see
/// goes again, with the same request id, to another sidecar; some calls
/// acknowledged go again anyway (a reply lost on the way back); one
/// sidecar is SIGKILLed mid-load and restarted on its journal, and the
/// calls it had acknowledged are sent to it again. Every request id is
/// charged once: the stream holds one record per id acknowledged, and
/// Redis charged exactly what those records say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_resent_to_other_sidecars_and_across_a_kill_are_charged_once() {
    const CLIENTS: usize = 9;
    const CALLS: usize = 30;
    let redis = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let dir = tempfile::tempdir().unwrap();
    // Holds lapse after a second; the killed process's lease comes back at
    // its restart's first sync of the account.
    let config = FLEET.replace("[plans.payg]", "[holds]\nttl_seconds = 1\n\n[plans.payg]");
    let config = write_config(dir.path(), &config);
    let journal = |i: usize| dir.path().join(format!("journal-{i}"));
    let mut sidecars: Vec<Sidecar> = (0..3)
        .map(|i| {
            let usage = dir.path().join(format!("usage-{i}.jsonl"));
            Sidecar::spawn_with_journal(&config, &[redis.url()], usage, &journal(i))
        })
        .collect();
    let urls = Arc::new(std::sync::RwLock::new(
        sidecars.iter().map(|s| s.quota_url.clone()).collect::<Vec<_>>(),
    ));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (urls, calls) = (Arc::clone(&urls), Arc::clone(&calls));
        clients.push(tokio::spawn(async move {
            // Request ids acknowledged, with the sidecar that acknowledged.
            let mut acknowledged = Vec::new();
            for i in 0..CALLS {
                let id = format!("g{client}-{i}");
                let first = (client + i) % 3;
                let (by, _) = send_until_acknowledged(&urls, &id, first, false).await;
                if i % 4 == 0 {
                    // The reply was lost on its way: sent again elsewhere.
                    send_until_acknowledged(&urls, &id, (by + 1) % 3, true).await;
                }
                acknowledged.push((id, by));
                calls.fetch_add(1, Ordering::Relaxed);
            }
            acknowledged
        }));
    }
    // Mid-load, sidecar 0 is killed and started again on its journal.
    while calls.load(Ordering::Relaxed) < CLIENTS * CALLS / 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sidecars[0].kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let usage = dir.path().join("usage-0-restarted.jsonl");
    sidecars[0] = Sidecar::spawn_with_journal(&config, &[redis.url()], usage, &journal(0));
    urls.write().unwrap()[0] = sidecars[0].quota_url.clone();
    let mut acknowledged = Vec::new();
    for task in clients {
        acknowledged.extend(task.await.unwrap());
    }
    // What sidecar 0 acknowledged, before the kill or after, sent to it again.
    for (id, _) in acknowledged.iter().filter(|(_, by)| *by == 0) {
        send_until_acknowledged(&urls, id, 0, true).await;
    }
    // Once every record is in Redis, each call resent to a sidecar that did
    // not acknowledge it is answered as the first: the record in the stream.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut answers = std::collections::HashMap::new();
    for (id, by) in &acknowledged {
        let (_, record) = send_until_acknowledged(&urls, id, (by + 2) % 3, true).await;
        answers.insert(id.clone(), record);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for sidecar in &mut sidecars {
        sidecar.stop();
    }

    let records = support::fleet::stream_records(&redis.url(), 1).await;
    let mut in_stream: Vec<&str> = records.iter().map(|r| r["request_id"].as_str().unwrap()).collect();
    in_stream.sort_unstable();
    let mut expected: Vec<&str> = acknowledged.iter().map(|(id, _)| id.as_str()).collect();
    expected.sort_unstable();
    assert_eq!(
        in_stream, expected,
        "one record per request id acknowledged, none twice"
    );
    for record in &records {
        let id = record["request_id"].as_str().unwrap();
        let settled: jiff::Timestamp = record["settled_at"].as_str().unwrap().parse().unwrap();
        let answered = answers[id].settled_at.as_ref().unwrap();
        assert_eq!(
            (answered.seconds, answered.nanos),
            (settled.as_second(), settled.subsec_nanosecond()),
            "{id}: a resend elsewhere is answered with the record in the stream"
        );
    }
    let paid = quiescent(redis.port, 1, PAID);
    assert_eq!(
        paid.charged(),
        support::fleet::picos(&records),
        "Redis charged what the records say, to the unit"
    );
    assert_eq!(
        paid.charged(),
        expected.len() as i128 * 1_000_000_000,
        "each charge once"
    );
}

/// Sends a charge of 0.001 under `id`, first to sidecar `first`, then to
/// the next one after each failure (a sidecar gone, a call timed out),
/// until one acknowledges it; returns which did, and its record. Every
/// attempt after the first, and the first if `resend`, is marked as a
/// resend, as Tollgate's clients mark them.
async fn send_until_acknowledged(
    urls: &std::sync::RwLock<Vec<String>>,
    id: &str,
    first: usize,
    resend: bool,
) -> (usize, tollgate::proto::UsageRecord) {
    for attempt in 0..60 {
        let s = (first + attempt) % 3;
        let url = urls.read().unwrap()[s].clone();
        let charge = tollgate::proto::ChargeRequest {
            account_id: "shared".into(),
            request_id: id.into(),
            charge: Some(tollgate::proto::charge_request::Charge::Amount(support::money("0.001"))),
            ..Default::default()
        };
        let mut request = tonic::Request::new(charge);
        if resend || attempt > 0 {
            let previous = (attempt + usize::from(resend)).to_string().parse().unwrap();
            request
                .metadata_mut()
                .insert(tollgate::api::quota::PREVIOUS_ATTEMPTS, previous);
        }
        let call = async {
            let mut quota = tollgate::proto::quota_client::QuotaClient::connect(url).await.ok()?;
            quota.charge(request).await.ok()
        };
        if let Ok(Some(answer)) = tokio::time::timeout(Duration::from_secs(2), call).await {
            let answer = answer.into_inner();
            assert_eq!(
                answer.decision,
                tollgate::proto::Decision::Allow as i32,
                "{id}: the balance covers every charge"
            );
            return (s, answer.record.expect("an allowed charge has its record"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{id}: no sidecar acknowledged it in 60 attempts");
}

/// A sidecar that gave an account back reads it afresh at its next use:
/// by then another sidecar has likely changed it, and a commit on the
/// version it kept would be refused (a script call, the whole state sent
/// for nothing, then the call again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_given_back_is_read_afresh_at_its_next_use() {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let sidecars = fleet(2, dir.path(), &[redis.url()]);
    let entries = || {
        redis
            .cli(&["XLEN", "tollgate:{0}:usage"])
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let serve = async |sidecar: &Sidecar, id: &str| {
        let mut client = sidecar.client().await;
        let held = client
            .reserve(support::reserve("shared", id, 10, 10))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(held.decision, tollgate::proto::Decision::Allow as i32, "{held:?}");
        client.settle(support::settle("shared", id, 10, 5)).await.unwrap();
    };
    // Each serves once and reports (giving back what is left: the account
    // is not in use there).
    for (i, sidecar) in sidecars.iter().enumerate() {
        serve(sidecar, &format!("r{i}")).await;
        for _ in 0..250 {
            if entries() > i as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(entries(), i as u64 + 1, "sidecar {i}'s report");
    }
    let calls =
        |name: &str, stats: &[(String, u64)]| stats.iter().filter(|(c, _)| c == name).map(|(_, n)| n).sum::<u64>();
    let before = redis.commandstats();
    let mut client = sidecars[0].client().await;
    let held = client
        .reserve(support::reserve("shared", "again", 10, 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.decision, tollgate::proto::Decision::Allow as i32, "{held:?}");
    let after = redis.commandstats();
    let scripts = calls("evalsha", &after) - calls("evalsha", &before);
    // Every commit reads the version (HGET); a refused one the state too.
    let refused = calls("hget", &after) - calls("hget", &before) - scripts;
    assert!(scripts >= 1, "the reserve borrowed");
    assert_eq!(refused, 0, "commits refused for a stale version");
}
