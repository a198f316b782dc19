//! The billing bridge against real processes: a Redis-backed sidecar
//! writes usage and audit records to the stream, `tollgate usage load`
//! writes them into a real PostgreSQL, each exactly once, through a loader
//! killed mid-transaction, a crash between commit and acknowledgement, and
//! a PostgreSQL restart; `tollgate usage export` writes CloudEvents and
//! acknowledges only what it wrote; statements, re-pricing and
//! reconciliation read the database the loader filled.
//!
//! Why one file: every scenario needs the same real sidecar, Redis and
//! PostgreSQL, and one test binary links once (on two cores a binary more
//! costs a link of the whole crate in every build).

#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::fleet::{Sidecar, picos, stream_records, write_config};
use support::postgres::{Schema, Server, stdout};
use support::redis::{RedisServer, cli};
use tollgate::proto;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace_seconds = 5

[store.redis]
deadline_ms = 1000

[leases]
report_interval_ms = 100

[plans.payg]

[[prices]]
id = "v1"
effective_at = "2026-01-01T00:00:00Z"
[prices.models.m.tiers.default]
input = "1"
output = "4"

[[accounts]]
id = "acme"
plan = "payg"
paid = "1000"
"#;

const GROUP: &str = "tollgate-billing";
const STREAM: &str = "tollgate:{0}:usage";

/// A sidecar of `CONFIG` on its own Redis.
fn started() -> (RedisServer, tempfile::TempDir, Sidecar) {
    let redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), CONFIG);
    let sidecar = Sidecar::spawn(&config, &[redis.url()], dir.path().join("usage.jsonl"));
    (redis, dir, sidecar)
}

/// An operator's promotional credit to `acme`, less than a request costs.
async fn welcome(sidecar: &Sidecar) {
    let mut admin = sidecar.admin().await;
    admin
        .top_up(proto::TopUpRequest {
            account_id: "acme".into(),
            adjustment_id: "welcome".into(),
            pool: proto::MoneyPool::Promo as i32,
            amount: Some(support::money("0.000001")),
            reason: "welcome credit".into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// A sidecar on its own Redis that has settled `n` requests on `acme`
/// (after an operator's promotional top-up, so that records draw on two
/// sources), then stopped: every record is on the stream.
async fn settled(n: u64) -> (RedisServer, tempfile::TempDir, Vec<serde_json::Value>) {
    let (redis, dir, mut sidecar) = started();
    welcome(&sidecar).await;
    settle(&sidecar, 0..n).await;
    sidecar.stop();
    let records = stream_records(&redis.url(), 1).await;
    assert_eq!(records.len() as u64, n);
    (redis, dir, records)
}

/// Reserves and settles requests `ids` on `acme` through `sidecar`.
async fn settle(sidecar: &Sidecar, ids: std::ops::Range<u64>) {
    let mut quota = sidecar.client().await;
    for i in ids {
        let id = format!("r{i}");
        quota
            .reserve(support::reserve("acme", &id, 100 + i, 100))
            .await
            .unwrap();
        quota
            .settle(support::settle("acme", &id, 100 + i, i % 50))
            .await
            .unwrap();
    }
}

/// `tollgate usage load` of `redis` into `schema`, with `extra` flags.
fn loader(redis: &str, schema: &Schema, extra: &[&str]) -> Command {
    let mut command = support::postgres::usage("load", schema, &["--redis", redis, "--consumer", "loader-1"]);
    command.args(extra);
    command
}

/// Runs a loader to the end of what there is, and returns its summary.
fn load_once(redis: &str, schema: &Schema) -> String {
    let out = loader(redis, schema, &["--once"]).output().unwrap();
    summary(&out)
}

fn summary(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "loader failed: {stderr}");
    stderr.lines().last().unwrap_or_default().to_owned()
}

/// The database holds each of `records` once, with charges that add up to
/// its total to the pico-unit, and the totals add up to the stream's.
async fn holds_each_once(schema: &Schema, records: &[serde_json::Value]) {
    let count = schema.value("SELECT count(*) FROM {s}.usage_records").await;
    assert_eq!(count.as_deref(), Some(records.len().to_string().as_str()));
    for r in records {
        let id = r["record_id"].as_str().unwrap();
        let row = schema
            .value(&format!(
                "SELECT total_money || ' ' || input_tokens || ' ' || output_tokens FROM {{s}}.usage_records \
                 WHERE record_id = '{id}'"
            ))
            .await
            .unwrap_or_else(|| panic!("record {id} not loaded"));
        let usage = &r["usage"];
        assert_eq!(
            row,
            format!(
                "{} {} {}",
                r["total_money"].as_str().unwrap(),
                usage["input_tokens"],
                usage["output_tokens"]
            )
        );
    }
    // Charges add up to each record's money, to the pico-unit.
    let mismatched = schema
        .value(
            "SELECT count(*) FROM {s}.usage_records r WHERE r.total_money <> \
             (SELECT coalesce(sum(money), 0) FROM {s}.usage_charges c WHERE c.record_id = r.record_id)",
        )
        .await;
    assert_eq!(mismatched.as_deref(), Some("0"));
    let total = schema
        .value("SELECT sum(total_money) FROM {s}.usage_records")
        .await
        .unwrap();
    assert_eq!(
        total.parse::<tollgate::engine::Money>().unwrap().picos(),
        picos(records),
        "the database's total is the stream's"
    );
}

/// What the loader's group has not acknowledged, per `XPENDING`.
fn pending(redis: &RedisServer) -> String {
    cli(redis.port, &["XPENDING", STREAM, GROUP])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loader_writes_each_record_once_and_acknowledges_after_commit() {
    let (redis, _dir, records) = settled(20).await;
    let schema = Schema::new().await;
    let first = load_once(&redis.url(), &schema);
    assert_eq!(
        first,
        "21 records loaded, 0 there already, 0 unreadable, 0 conflicting; transactions: 1"
    );
    holds_each_once(&schema, &records).await;
    assert_eq!(pending(&redis), "0", "everything committed is acknowledged");
    assert_eq!(
        schema
            .value("SELECT max(version) FROM {s}.schema_version")
            .await
            .as_deref(),
        Some("2")
    );
    // Charges are kept per source: the promotional credit ran out first.
    let sources = schema
        .value("SELECT string_agg(DISTINCT source, ',' ORDER BY source) FROM {s}.usage_charges")
        .await;
    assert_eq!(sources.as_deref(), Some("paid,promo"));
    // The operator's change, with who and why.
    let audit = schema
        .value("SELECT operator || ' ' || operation || ' ' || adjustment_id || ' ' || reason FROM {s}.audit_records")
        .await;
    assert_eq!(audit.as_deref(), Some("alice@billing top_up welcome welcome credit"));

    // Nothing new: nothing written.
    assert_eq!(
        load_once(&redis.url(), &schema),
        "0 records loaded, 0 there already, 0 unreadable, 0 conflicting; transactions: 0"
    );

    // A loader that committed and crashed before its acknowledgement: the
    // entries are its, delivered and pending, and their records are in the
    // database. Run again, it writes none twice and acknowledges them.
    cli(redis.port, &["XGROUP", "SETID", STREAM, GROUP, "0"]);
    cli(
        redis.port,
        &[
            "XREADGROUP",
            "GROUP",
            GROUP,
            "loader-1",
            "COUNT",
            "1000",
            "STREAMS",
            STREAM,
            ">",
        ],
    );
    assert_ne!(pending(&redis), "0");
    assert_eq!(
        load_once(&redis.url(), &schema),
        "0 records loaded, 21 there already, 0 unreadable, 0 conflicting; transactions: 1"
    );
    holds_each_once(&schema, &records).await;
    assert_eq!(pending(&redis), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_killed_mid_transaction_loses_and_duplicates_nothing() {
    let (redis, _dir, records) = settled(30).await;
    let schema = Schema::new().await;
    // The tables exist once a loader has run; hold the records' table so
    // that the next loader's transaction waits inside its first insert.
    assert!(load_once(&redis.url(), &schema).starts_with("31 records loaded"));
    let client = schema.client().await;
    client
        .batch_execute(&format!(
            "TRUNCATE {0}.usage_records CASCADE; TRUNCATE {0}.audit_records CASCADE",
            schema.name
        ))
        .await
        .unwrap();
    cli(redis.port, &["XGROUP", "SETID", STREAM, GROUP, "0"]);
    let mut holder = schema.client().await;
    let lock = holder.transaction().await.unwrap();
    lock.batch_execute(&format!(
        "LOCK TABLE {}.usage_records IN ACCESS EXCLUSIVE MODE",
        schema.name
    ))
    .await
    .unwrap();
    let mut running = loader(&redis.url(), &schema, &[])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the loader's insert waits on the lock: mid-transaction.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO%'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if waiting > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the loader never reached its insert");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill(&mut running);
    lock.rollback().await.unwrap();
    // Nothing of the killed transaction is in the database, and the batch
    // is still the loader's, unacknowledged.
    assert_eq!(
        schema.value("SELECT count(*) FROM {s}.usage_records").await.as_deref(),
        Some("0")
    );
    assert_ne!(pending(&redis), "0");
    assert_eq!(
        load_once(&redis.url(), &schema),
        "31 records loaded, 0 there already, 0 unreadable, 0 conflicting; transactions: 1"
    );
    holds_each_once(&schema, &records).await;
    assert_eq!(pending(&redis), "0");
}

fn kill(child: &mut Child) {
    Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loader_waits_out_a_postgres_restart() {
    let postgres = Server::start();
    let schema = Schema::on(&postgres.url()).await;
    let (redis, _dir, mut sidecar) = started();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let running = loader(&redis.url(), &schema, &["--metrics-listen", &metrics.to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    settle(&sidecar, 0..10).await;
    until(&schema, 10).await;
    postgres.crash();
    settle(&sidecar, 10..25).await;
    // The loader tries, fails, and waits; the records wait in the stream.
    let deadline = Instant::now() + Duration::from_secs(20);
    while support::sample(
        &support::http_get(metrics, "/metrics").await.1,
        "tollgate_loader_errors_total{stage=\"postgres\"}",
    )
    .is_none_or(|n| n < 1.0)
    {
        assert!(Instant::now() < deadline, "the loader never saw PostgreSQL gone");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    postgres.resume();
    until(&schema, 25).await;
    sidecar.stop();
    let records = stream_records(&redis.url(), 1).await;
    holds_each_once(&schema, &records).await;
    let page = support::http_get(metrics, "/metrics").await.1;
    assert_eq!(
        support::sample(&page, "tollgate_loader_records_total{result=\"loaded\"}"),
        Some(25.0),
        "{page}"
    );
    // Stopped by SIGTERM, it finishes and says what it did.
    Command::new("kill")
        .args(["-TERM", &running.id().to_string()])
        .status()
        .unwrap();
    let out = running.wait_with_output().unwrap();
    assert!(summary(&out).starts_with("25 records loaded"), "{}", summary(&out));
    assert_eq!(pending(&redis), "0");
}

/// Waits until the database holds `n` usage records.
async fn until(schema: &Schema, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let client = tokio_postgres::connect(&schema.url, tokio_postgres::NoTls).await;
        if let Ok((client, connection)) = client {
            tokio::spawn(connection);
            let count = client
                .query_one(&format!("SELECT count(*) FROM {}.usage_records", schema.name), &[])
                .await
                .map(|row| row.get::<_, i64>(0));
            if count.as_ref().is_ok_and(|&c| c as usize >= n) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the loader did not load {n} records");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_export_writes_one_event_a_record_and_acknowledges_only_those() {
    let (redis, _dir, records) = settled(5).await;
    let url = redis.url();
    let export_as = |format: &str, from: &str, to: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["usage", "export", "--redis", &url, "--format", format])
            .args(["--from", from, "--to", to, "--source", "tollgate/test"])
            .env_remove("TOLLGATE_REDIS")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let export = |from: &str, to: &str| export_as("cloudevents", from, to);
    // Windows that hold none of them: nothing written, nothing taken (a
    // totals export used to take every record it read, in range or not).
    assert!(export_as("jsonl", "2000-01-01T00:00:00Z", "2001-01-01T00:00:00Z").is_empty());
    assert!(export("2000-01-01T00:00:00Z", "2001-01-01T00:00:00Z").is_empty());
    let events = export("2000-01-01T00:00:00Z", "2100-01-01T00:00:00Z");
    assert_eq!(events.len(), records.len(), "the earlier export left them for this one");
    for (event, record) in events.iter().zip(&records) {
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["type"], "tollgate.usage");
        assert_eq!(event["source"], "tollgate/test");
        assert_eq!(event["id"], record["record_id"]);
        assert_eq!(event["subject"], "acme");
        assert_eq!(event["time"], record["settled_at"]);
        let data = &event["data"];
        assert_eq!(data["model"], "m");
        assert_eq!(data["service_tier"], "default");
        assert_eq!(data["input_tokens"], record["usage"]["input_tokens"]);
        assert_eq!(data["output_tokens"], record["usage"]["output_tokens"]);
        assert_eq!(data["total_money"], record["total_money"]);
    }
    assert!(
        export("2000-01-01T00:00:00Z", "2100-01-01T00:00:00Z").is_empty(),
        "each once"
    );
}

/// `tollgate usage statement ARGS` against `schema`, and its stdout.
fn statement(schema: &Schema, args: &[&str]) -> String {
    stdout(&mut support::postgres::usage("statement", schema, args))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_reconciles_to_the_pico_unit_with_the_store() {
    let (redis, _dir, mut sidecar) = started();
    // An account opened through the admin API: its whole history is in
    // the audit trail.
    let mut admin = sidecar.admin().await;
    admin
        .create_account(proto::CreateAccountRequest {
            account_id: "beta".into(),
            plan: "payg".into(),
            adjustment_id: "open-beta".into(),
            reason: "signed up".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    for (pool, amount, id) in [
        (proto::MoneyPool::Paid, "2", "invoice-1"),
        (proto::MoneyPool::Promo, "0.000003", "welcome"),
    ] {
        admin
            .top_up(proto::TopUpRequest {
                account_id: "beta".into(),
                adjustment_id: id.into(),
                pool: pool as i32,
                amount: Some(support::money(amount)),
                reason: id.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut quota = sidecar.client().await;
    for i in 0..12u64 {
        let id = format!("b{i}");
        quota
            .reserve(support::reserve("beta", &id, 1000 + i, 500))
            .await
            .unwrap();
        quota
            .settle(support::settle("beta", &id, 1000 + i, 7 * i))
            .await
            .unwrap();
    }
    sidecar.stop();
    let schema = Schema::new().await;
    assert!(load_once(&redis.url(), &schema).starts_with("15 records loaded"));
    let records: Vec<_> = stream_records(&redis.url(), 1).await;
    let month = jiff::Timestamp::now().strftime("%Y-%m").to_string();
    let st: serde_json::Value =
        serde_json::from_str(&statement(&schema, &["--account", "beta", "--month", &month, "--json"])).unwrap();
    let money = |v: &serde_json::Value| v.as_str().unwrap().parse::<tollgate::engine::Money>().unwrap().picos();
    assert_eq!(money(&st["opening"]), 0, "opened this month");
    assert_eq!(st["warnings"], serde_json::json!([]), "opened through the admin API");
    assert_eq!(money(&st["changes_total"]), 2_000_003_000_000);
    assert_eq!(money(&st["charges_total"]), picos(&records));
    assert_eq!(money(&st["closing"]), 2_000_003_000_000 - picos(&records));
    // The closing balance is the store's, to the pico-unit.
    let store = support::fleet::shared_account(redis.port, 1, "beta").balance(jiff::Timestamp::now());
    let in_store = store.paid.picos() + store.promo.picos() - store.debt.picos();
    assert_eq!(money(&st["closing"]), in_store, "{st}");
    // Usage by model and tier, every token counted.
    let usage = &st["usage"][0];
    assert_eq!(
        (usage["model"].as_str(), usage["records"].as_u64()),
        (Some("m"), Some(12))
    );
    let input: u64 = records
        .iter()
        .map(|r| r["usage"]["input_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(usage["input_tokens"].as_u64(), Some(input));
    // The promotion paid first, all of it; paid money the rest.
    let sources: Vec<(&str, i128)> = st["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["source"].as_str().unwrap(), money(&s["money"])))
        .collect();
    assert_eq!(
        sources,
        [("promo", 3_000_000), ("paid", picos(&records) - 3_000_000)],
        "{st}"
    );
    let changes: Vec<&str> = st["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["adjustment_id"].as_str().unwrap())
        .collect();
    assert_eq!(changes, ["open-beta", "invoice-1", "welcome"]);
    // The next month opens where this one closed.
    let next = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .first_of_month()
        .unwrap()
        .checked_add(jiff::Span::new().months(1))
        .unwrap()
        .strftime("%Y-%m")
        .to_string();
    let csv = statement(&schema, &["--account", "beta", "--month", &next, "--csv"]);
    let closing = tollgate::engine::Money::from_picos(money(&st["closing"]));
    assert!(
        csv.contains(&format!("balance,opening,,,,,,,,,,,,{closing}\n")),
        "{csv}"
    );
    assert!(
        csv.contains(&format!("balance,closing,,,,,,,,,,,,{closing}\n")),
        "{csv}"
    );
    assert!(!csv.contains("usage,"), "nothing used next month: {csv}");
    // The tables say the same.
    let table = statement(&schema, &["--account", "beta", "--month", &month]);
    assert!(table.contains(&closing.to_string()), "{table}");
    // Given the price list the records were charged at, each model and
    // tier's money is split by token kind, to the pico-unit: 1 and 4 per
    // million tokens are 10^6 and 4 × 10^6 pico-units a token.
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("prices.toml");
    std::fs::write(&list, draft("v1", "m", "1", "4").replace("2027-01-01", "2026-01-01")).unwrap();
    let list = list.to_str().unwrap();
    let split: serde_json::Value = serde_json::from_str(&statement(
        &schema,
        &["--account", "beta", "--month", &month, "--json", "--prices", list],
    ))
    .unwrap();
    let by_kind = &split["usage"][0]["money_by_kind"];
    let output: u64 = records
        .iter()
        .map(|r| r["usage"]["output_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(money(&by_kind["input"]), i128::from(input) * 1_000_000, "{split}");
    assert_eq!(money(&by_kind["output"]), i128::from(output) * 4_000_000, "{split}");
    assert_eq!(money(&by_kind["input"]) + money(&by_kind["output"]), picos(&records));
    let table = statement(&schema, &["--account", "beta", "--month", &month, "--prices", list]);
    assert!(table.contains("OUTPUT $"), "{table}");
    // Another list is refused: it does not give what was charged.
    std::fs::write(
        dir.path().join("wrong.toml"),
        draft("v1", "m", "2", "4").replace("2027-01-01", "2026-01-01"),
    )
    .unwrap();
    let wrong = support::postgres::usage("statement", &schema, &["--account", "beta", "--month", &month])
        .arg("--prices")
        .arg(dir.path().join("wrong.toml"))
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("not the list it was charged at"),
        "{wrong:?}"
    );
    // An account seeded from the configuration has no opening record, and
    // its statement says so.
    let seeded = statement(&schema, &["--account", "acme", "--month", &month]);
    assert!(seeded.contains("Note: no create_account record"), "{seeded}");
}

/// `tollgate usage reprice` of everything loaded into `schema` under the
/// draft `prices` (TOML), and its stdout.
fn reprice(schema: &Schema, prices: &str, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let draft = dir.path().join("draft.toml");
    std::fs::write(&draft, prices).unwrap();
    let window = ["--from", "2000-01-01T00:00:00Z", "--to", "2100-01-01T00:00:00Z"];
    let mut command = support::postgres::usage("reprice", schema, &window);
    command.arg("--prices").arg(&draft).args(extra);
    stdout(&mut command)
}

fn draft(id: &str, model: &str, input: &str, output: &str) -> String {
    format!(
        "[[prices]]\nid = \"{id}\"\neffective_at = \"2027-01-01T00:00:00Z\"\n\
         [prices.models.{model}.tiers.default]\ninput = \"{input}\"\noutput = \"{output}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprice_prices_recorded_usage_again_with_the_engines_own_code() {
    let (redis, _dir, mut sidecar) = started();
    // A pack pays the first requests' tokens, in part for one of them:
    // the records mix token and money sources.
    let mut admin = sidecar.admin().await;
    admin
        .grant_pack(proto::GrantPackRequest {
            account_id: "acme".into(),
            pack_id: "starter".into(),
            tokens: 1000,
            expires_at: Some(prost_types::Timestamp {
                seconds: 4_102_444_800,
                nanos: 0,
            }),
            reason: "starter pack".into(),
            adjustment_id: "starter".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    settle(&sidecar, 0..16).await;
    sidecar.stop();
    let records = stream_records(&redis.url(), 1).await;
    let schema = Schema::new().await;
    assert!(load_once(&redis.url(), &schema).starts_with("17 records loaded"));
    let sources = schema
        .value("SELECT string_agg(DISTINCT source, ',' ORDER BY source) FROM {s}.usage_charges")
        .await;
    assert_eq!(sources.as_deref(), Some("pack,paid"));
    let money = |v: &serde_json::Value| v.as_str().unwrap().parse::<tollgate::engine::Money>().unwrap().picos();
    let run = |prices: String| {
        let out = reprice(&schema, &prices, &["--json"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    // The prices the records were charged at give every charge back, to
    // the pico-unit, the pack's part included.
    let same = run(draft("v2", "m", "1", "4"));
    assert_eq!(money(&same["charged"]), picos(&records));
    assert_eq!(money(&same["repriced"]), picos(&records), "{same}");
    assert_eq!(money(&same["delta"]), 0);
    // Half the prices: half of every money part, exactly; the pack's
    // tokens are tokens still.
    let half = run(draft("v3", "m", "0.5", "2"));
    assert_eq!(money(&half["repriced"]) * 2, picos(&records), "{half}");
    assert_eq!(money(&half["delta"]), -picos(&records) / 2);
    let acme = &half["accounts"][0];
    assert_eq!(
        (acme["account_id"].as_str(), acme["records"].as_u64()),
        (Some("acme"), Some(16))
    );
    // A draft without the model prices none of it, and says so.
    let other = run(draft("v4", "other", "1", "1"));
    assert_eq!(money(&other["charged"]), 0);
    assert_eq!(other["unpriced"][0]["records"].as_u64(), Some(16), "{other}");
    // The table and the CSV say the same.
    let csv = reprice(&schema, &draft("v3", "m", "0.5", "2"), &["--csv"]);
    let delta = tollgate::engine::Money::from_picos(-picos(&records) / 2);
    assert!(csv.lines().last().unwrap().ends_with(&format!(",{delta}")), "{csv}");
    let table = reprice(&schema, &draft("v3", "m", "0.5", "2"), &[]);
    assert!(table.contains(&delta.to_string()) && table.contains("acme"), "{table}");
    // A draft that would not publish is refused with its problems.
    let bad = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["usage", "reprice", "--postgres", &schema.url, "--schema", &schema.name])
        .args([
            "--prices",
            "/dev/null",
            "--from",
            "2000-01-01T00:00:00Z",
            "--to",
            "2100-01-01T00:00:00Z",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not a valid price list"),
        "{bad:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_no_difference_on_a_healthy_store_and_every_unit_of_one() {
    let (redis, _dir, mut sidecar) = started();
    welcome(&sidecar).await;
    settle(&sidecar, 0..10).await;
    let mut admin = sidecar.admin().await;
    // One more, refunded in full: the database keeps what the refund gave
    // back, as the store's ledgers do.
    let mut quota = sidecar.client().await;
    quota
        .reserve(support::reserve("acme", "refunded", 2000, 100))
        .await
        .unwrap();
    let record = quota
        .settle(support::settle("acme", "refunded", 2000, 100))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    let refund = proto::RefundRequest {
        account_id: "acme".into(),
        request_id: "refunded".into(),
        kind: "settle".into(),
        charges: record.charges.clone(),
        reason: "outage credit".into(),
        adjustment_id: "refund-1".into(),
        settled_at: record.settled_at,
    };
    // The shared account has the charge once the sidecar reports it
    // (within a report interval); until then the refund is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(status) = admin.refund(refund.clone()).await {
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(Instant::now() < deadline, "the charge never reached Redis: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sidecar.stop();
    let schema = Schema::new().await;
    let url = redis.url();
    assert!(load_once(&url, &schema).starts_with("13 records loaded"));
    let refunded = schema.value("SELECT sum(money) FROM {s}.audit_refunds").await.unwrap();
    assert_eq!(
        refunded.parse::<tollgate::engine::Money>().unwrap().picos(),
        tollgate::wire::money("total_money", record.total_money.as_ref())
            .unwrap()
            .picos()
    );
    let reconcile = || {
        support::postgres::usage("reconcile", &schema, &["--redis", &url])
            .output()
            .unwrap()
    };
    let healthy = reconcile();
    assert!(healthy.status.success());
    assert_eq!(
        String::from_utf8_lossy(&healthy.stdout),
        "1 accounts compared, 0 differences\n"
    );
    // One paid charge lost from the database: found, to the pico-unit.
    let lost: String = schema
        .client()
        .await
        .query_one(
            &format!(
                "WITH gone AS (DELETE FROM {0}.usage_charges WHERE (record_id, position) IN \
                 (SELECT record_id, position FROM {0}.usage_charges WHERE source = 'paid' LIMIT 1) \
                 RETURNING money) SELECT money::text FROM gone",
                schema.name
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let found = reconcile();
    assert_eq!(found.status.code(), Some(1), "a difference fails the run");
    let json = support::postgres::usage("reconcile", &schema, &["--redis", &url, "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let differences = report["differences"].as_array().unwrap();
    assert_eq!(differences.len(), 1, "{report}");
    let d = &differences[0];
    assert_eq!(
        (d["account_id"].as_str(), d["ledger"].as_str()),
        (Some("acme"), Some("paid"))
    );
    assert_eq!(
        d["difference"]
            .as_str()
            .unwrap()
            .parse::<tollgate::engine::Money>()
            .unwrap(),
        lost.parse::<tollgate::engine::Money>().unwrap(),
        "{report}"
    );
}

/// A stream entry's fields, names and values as bytes.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// The fields of every entry of the first shard's stream, as Redis holds
/// them.
async fn entries(redis: &RedisServer) -> Vec<(String, Fields)> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let reply: Vec<(String, Fields)> = redis::cmd("XRANGE")
        .arg(STREAM)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    reply
}

/// Appends an entry of `fields` to the first shard's stream.
async fn append(redis: &RedisServer, fields: &[(Vec<u8>, Vec<u8>)]) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut xadd = redis::cmd("XADD");
    xadd.arg(STREAM).arg("*");
    for (name, value) in fields {
        xadd.arg(name).arg(value);
    }
    let _: String = xadd.query_async(&mut conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_that_do_not_read_or_repeat_an_id_are_kept_apart_not_lost() {
    let (redis, _dir, records) = settled(6).await;
    // An entry that does not decode, and a copy of a real entry (its
    // records' ids are taken: another record, not a retry).
    append(
        &redis,
        &[
            (b"count".to_vec(), b"1".to_vec()),
            (b"pb".to_vec(), b"\xff\x00 not a batch".to_vec()),
        ],
    )
    .await;
    let copied = entries(&redis)
        .await
        .into_iter()
        .find(|(_, fields)| fields.iter().any(|(name, value)| name == b"pb" && !value.is_empty()))
        .unwrap();
    let count = &copied.1.iter().find(|(n, _)| n == b"count").unwrap().1;
    let in_copy: i64 = std::str::from_utf8(count).unwrap().parse().unwrap();
    append(&redis, &copied.1).await;
    let schema = Schema::new().await;
    let summary = load_once(&redis.url(), &schema);
    assert_eq!(
        summary,
        format!("7 records loaded, 0 there already, 1 unreadable, {in_copy} conflicting; transactions: 1")
    );
    holds_each_once(&schema, &records).await;
    // The bad entry's bytes are kept, in hex, field by field.
    let raw = schema.value("SELECT raw->>'pb' FROM {s}.unreadable_records").await;
    assert_eq!(raw.as_deref(), Some("ff00206e6f742061206261746368"));
    let reason = schema.value("SELECT reason FROM {s}.unreadable_records").await;
    assert_eq!(reason.as_deref(), Some("the entry does not decode"));
    // The copy's records are kept apart, whole; none is dropped.
    let kept = schema
        .value("SELECT count(*) FROM {s}.usage_record_conflicts WHERE record ? 'usage'")
        .await;
    assert_eq!(kept, Some(in_copy.to_string()));
    assert_eq!(pending(&redis), "0", "all of it is in the database: acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_back_under_another_name_takes_over_what_the_old_one_left() {
    let (redis, _dir, records) = settled(8).await;
    // A loader named after a pod that is gone was given every entry and
    // acknowledged none.
    cli(redis.port, &["XGROUP", "CREATE", STREAM, GROUP, "0", "MKSTREAM"]);
    cli(
        redis.port,
        &[
            "XREADGROUP",
            "GROUP",
            GROUP,
            "old-pod",
            "COUNT",
            "1000",
            "STREAMS",
            STREAM,
            ">",
        ],
    );
    assert_ne!(pending(&redis), "0");
    let schema = Schema::new().await;
    let out = loader(&redis.url(), &schema, &["--once", "--claim-after-seconds", "0"])
        .output()
        .unwrap();
    assert_eq!(
        summary(&out),
        "9 records loaded, 0 there already, 0 unreadable, 0 conflicting; transactions: 1"
    );
    holds_each_once(&schema, &records).await;
    assert_eq!(pending(&redis), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_an_entry_that_does_not_read_rather_than_dropping_it() {
    let (redis, _dir, records) = settled(2).await;
    append(
        &redis,
        &[
            (b"count".to_vec(), b"1".to_vec()),
            (b"pb".to_vec(), b"\x01\x02".to_vec()),
        ],
    )
    .await;
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["usage", "tail", "--redis", &redis.url(), "--max", "4"])
        .env_remove("TOLLGATE_REDIS")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let usage: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == "settle").collect();
    assert_eq!(usage.len(), records.len());
    // Acknowledged, so printed: where it was and its bytes.
    let unreadable = lines.iter().find(|l| l["kind"] == "unreadable").expect("printed");
    assert_eq!(unreadable["stream"], STREAM);
    assert_eq!(unreadable["raw"]["pb"], "0102");
}
