//! Records in Redis as earlier versions wrote them, read by this one: a
//! fleet is upgraded one sidecar at a time, so a sidecar reads what the
//! version before it wrote (`tests/fixtures/redis-schema-*`, each stored
//! as that schema's writer wrote it), and refuses what a later schema
//! wrote rather than read it wrong.

#![allow(clippy::unwrap_used)]

mod support;

use support::{Backend, spawn_app_on_with};
use tollgate::proto;
use tonic::Code;

/// Writes the fixture's hash into the app's Redis (under `id`, if given)
/// and indexes it; returns the account id.
fn load(app: &support::TestApp, fixture: &str, id: Option<&str>, drop: &[&str]) -> String {
    let path = format!("{}/tests/fixtures/{fixture}", env!("CARGO_MANIFEST_DIR"));
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut state: serde_json::Value = serde_json::from_str(fixture["fields"]["state"].as_str().unwrap()).unwrap();
    let id = id.map_or_else(|| state["id"].as_str().unwrap().to_owned(), str::to_owned);
    state["id"] = id.clone().into();
    let key = tollgate::store::leased::account_key("tollgate", 1, &id);
    let redis = app.redis.as_ref().unwrap();
    for (field, value) in fixture["fields"].as_object().unwrap() {
        if drop.contains(&field.as_str()) {
            continue;
        }
        let value = match field.as_str() {
            "state" => state.to_string(),
            _ => value.as_str().unwrap().to_owned(),
        };
        redis.cli(&["HSET", &key, field, &value]);
    }
    redis.cli(&["ZADD", "tollgate:{0}:accounts", "0", &id]);
    id
}

async fn balance(app: &mut support::TestApp, id: &str) -> Result<proto::GetBalanceResponse, tonic::Status> {
    let request = proto::GetBalanceRequest { account_id: id.into() };
    app.quota.get_balance(request).await.map(tonic::Response::into_inner)
}

/// Schema 1 as written: every figure reads back, the lease another
/// sidecar holds stays set aside, and the account is served and charged
/// exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_1_account_reads_back_and_is_served() {
    let mut app = spawn_app_on_with(Backend::Redis, support::CONFIG).await;
    let id = load(&app, "redis-schema-1-account.json", None, &[]);
    let read = balance(&mut app, &id).await.unwrap();
    let decimal = |m: Option<proto::Money>| m.unwrap().decimal;
    assert_eq!(decimal(read.paid.clone()), "12.345678901234");
    assert_eq!(decimal(read.promo.clone()), "1.500000000000");
    // 5,000 granted, 950 charged, 350 lent to the other sidecar.
    assert_eq!(read.pack_tokens, 3_700, "{read:?}");
    assert_eq!(read.allowance_tokens, 0, "the month's allowance is used up");
    // A reserve and its settle draw on the pack (the model it covers).
    let held = app
        .quota
        .reserve(support::reserve(&id, "after-upgrade", 100, 100))
        .await
        .unwrap();
    assert_eq!(held.into_inner().decision, proto::Decision::Allow as i32);
    let settled = app
        .quota
        .settle(support::settle(&id, "after-upgrade", 100, 20))
        .await
        .unwrap()
        .into_inner();
    let record = settled.record.unwrap();
    assert_eq!(record.account_id, id);
    let after = balance(&mut app, &id).await.unwrap();
    assert_eq!(after.pack_tokens, 3_700 - 120, "{after:?}");
    assert_eq!(decimal(after.paid), "12.345678901234");
    app.shutdown().await;
}

/// A record written before schemas were numbered (no `s`, and no `i`:
/// before the index flag) reads as schema 1, and joins the index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_without_a_schema_reads_as_schema_1() {
    let mut app = spawn_app_on_with(Backend::Redis, support::CONFIG).await;
    let id = load(&app, "redis-schema-1-account.json", Some("unnumbered"), &["s", "i"]);
    let read = balance(&mut app, &id).await.unwrap();
    assert_eq!(read.pack_tokens, 3_700, "{read:?}");
    app.shutdown().await;
}

/// A record of a later schema is refused, by name, and left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_a_later_schema_is_refused_and_left_alone() {
    let mut app = spawn_app_on_with(Backend::Redis, support::CONFIG).await;
    let id = load(&app, "redis-schema-1-account.json", Some("from-the-future"), &[]);
    let key = tollgate::store::leased::account_key("tollgate", 1, &id);
    let redis = app.redis.clone().unwrap();
    let later = (tollgate::store::leased::SCHEMA + 1).to_string();
    redis.cli(&["HSET", &key, "s", &later]);
    let before = redis.cli(&["HGET", &key, "state"]);
    let refused = balance(&mut app, &id).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains(&format!("schema {later}")), "{refused:?}");
    let reserve = app.quota.reserve(support::reserve(&id, "r", 10, 10)).await;
    assert_eq!(reserve.unwrap_err().code(), Code::Unavailable);
    assert_eq!(
        redis.cli(&["HGET", &key, "state"]),
        before,
        "the record is left as it was"
    );
    app.shutdown().await;
}

/// Schema 2 as written: budgets, what they counted and spent, the burn
/// history, the account's alert thresholds and the one it alerted on all
/// read back; the account is served, counted in its budgets, and does not
/// alert again on a threshold it alerted on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_2_account_reads_back_and_is_served() {
    let mut app = spawn_app_on_with(Backend::Redis, support::CONFIG).await;
    let id = load(&app, "redis-schema-2-account.json", None, &[]);
    let read = balance(&mut app, &id).await.unwrap();
    let decimal = |m: Option<proto::Money>| m.unwrap().decimal;
    let used: Vec<(String, String, u64)> = read
        .budgets
        .iter()
        .map(|u| (u.id.clone(), decimal(u.money_used.clone()), u.tokens_used))
        .collect();
    assert_eq!(
        used,
        [
            ("k1".to_owned(), "0.001400000000".to_owned(), 0),
            ("team".to_owned(), "0.000000000000".to_owned(), 1_100)
        ]
    );
    assert_eq!(read.budgets[1].period, "rolling_30_days");
    assert_eq!(decimal(read.money_burn_last_hour.clone()), "0.001400000000");
    // Served, and counted in the key's budget.
    let r = proto::ReserveRequest {
        api_key_id: "k1".into(),
        ..support::reserve(&id, "after-upgrade", 1000, 500)
    };
    assert_eq!(
        app.quota.reserve(r).await.unwrap().into_inner().decision,
        proto::Decision::Allow as i32
    );
    app.quota
        .settle(support::settle(&id, "after-upgrade", 1000, 100))
        .await
        .unwrap();
    let after = balance(&mut app, &id).await.unwrap();
    assert_eq!(decimal(after.budgets[0].money_used.clone()), "0.002800000000");
    // balance_below 100 was alerted on before the upgrade: not again.
    let detail = support::detail(&mut app.admin, &id).await;
    assert_eq!(detail.alerts.unwrap().budget_used_percent, [10]);
    assert!(
        std::fs::read_to_string(&app.usage_path)
            .unwrap_or_default()
            .lines()
            .all(|l| !l.contains("\"kind\":\"alert\"")),
        "an alert already made is not made again"
    );
    app.shutdown().await;
}
