//! What operators see: the Prometheus metrics moving under a small load,
//! scraped over HTTP. (One test in this binary: the metrics are the
//! process's, and other apps in it would move them too.)

#![allow(clippy::unwrap_used)]

mod support;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use support::{Backend, http_get, reserve, sample, settle};

/// Samples of `page`, by name with labels, read as numbers (0 if absent).
fn read(page: &str, names: &[&str]) -> Vec<f64> {
    names.iter().map(|n| sample(page, n).unwrap_or(0.0)).collect()
}

const RULES: &str = "domain: inference
descriptors:
  - key: api_key
    rate_limit: { unit: minute, requests_per_unit: 2 }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_decisions_holds_records_and_only_listed_accounts() {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("inference.yaml"), RULES).unwrap();
    let extra = format!(
        "[metrics]\naccounts = [\"rich\"]\n\n[rls]\nconfig_dir = \"{}\"\n",
        rules.path().display()
    );
    let mut app = support::spawn_app_on_with(Backend::Memory, &support::with_http(&extra)).await;
    let http = app.http.unwrap();
    let names = [
        r#"tollgate_decisions_total{rpc="reserve",outcome="allowed",reason="none"}"#,
        r#"tollgate_decisions_total{rpc="reserve",outcome="denied",reason="insufficient_funds"}"#,
        r#"tollgate_decisions_total{rpc="reserve",outcome="error",reason="invalid_argument"}"#,
        r#"tollgate_rpc_duration_seconds_count{rpc="settle"}"#,
        r#"tollgate_usage_records_total{kind="settle"}"#,
        r#"tollgate_decisions_total{rpc="should_rate_limit",outcome="denied",reason="over_limit"}"#,
        r#"tollgate_rls_hits_total{domain="inference",key="api_key",outcome="within_limit"}"#,
        r#"tollgate_rls_hits_total{domain="inference",key="api_key",outcome="near_limit"}"#,
        r#"tollgate_rls_hits_total{domain="inference",key="api_key",outcome="over_limit"}"#,
        r#"tollgate_alerts_total{alert="balance_below"}"#,
    ];
    let (status, before) = http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    let before = read(&before, &names);

    // An alert when the rich account has spent anything.
    let alerts = tollgate::proto::SetAlertsRequest {
        account_id: "rich".into(),
        alerts: Some(tollgate::proto::AlertSettings {
            balance_below: vec![support::money("100")],
            ..Default::default()
        }),
        adjustment_id: "alert-any-spend".into(),
        reason: "metrics".into(),
    };
    app.admin.set_alerts(alerts).await.unwrap();
    // Three holds on a rich account, two settled; a denial; a bad request.
    for i in 0..3 {
        let r = app
            .quota
            .reserve(reserve("rich", &format!("r{i}"), 100, 100))
            .await
            .unwrap();
        assert!(!r.into_inner().reservation_id.is_empty());
    }
    for i in 0..2 {
        app.quota
            .settle(settle("rich", &format!("r{i}"), 100, 50))
            .await
            .unwrap();
    }
    let denied = app
        .quota
        .reserve(reserve("poor", "p", 100, 100))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(denied.deny_reason, 0);
    assert!(app.quota.reserve(reserve("", "bad", 1, 1)).await.is_err());
    // Three rate-limit calls against a limit of two.
    let mut rls = RateLimitServiceClient::new(tollgate::transport::channel::connect(&app.quota_url).await.unwrap());
    for _ in 0..3 {
        rls.should_rate_limit(RateLimitRequest {
            domain: "inference".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "api_key".into(),
                    value: "k1".into(),
                }],
                ..Default::default()
            }],
            hits_addend: 0,
        })
        .await
        .unwrap();
    }

    let (_, page) = http_get(http, "/metrics").await;
    let after = read(&page, &names);
    let moved: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(moved, vec![3.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0], "{page}");
    assert_eq!(sample(&page, "tollgate_holds_open"), Some(1.0));
    assert_eq!(sample(&page, "tollgate_ready"), Some(1.0));
    assert!(page.contains("tollgate_build_info{version="));
    // The listed account's money, and no other account anywhere.
    let paid = app.paid("rich").await.parse::<f64>().unwrap();
    let shown = sample(&page, r#"tollgate_account_available{account="rich",source="paid"}"#).unwrap();
    assert!((shown - paid).abs() < 1e-9, "{shown} against {paid}");
    for other in ["poor", "limited", "frozen"] {
        assert!(!page.contains(&format!("\"{other}\"")), "{other} is not listed");
    }
    // Every metric the deployment files may use (deploy/metrics.txt) is
    // exported, with its type.
    let listed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/metrics.txt")).unwrap();
    for line in listed.lines() {
        let (entry, note) = line.split_once('#').unwrap_or((line, ""));
        let mut words = entry.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        // Exported by a Redis-backed sidecar only (tests/journal.rs reads it).
        if note.contains("Redis store") {
            continue;
        }
        let family = if kind == "counter" {
            name.trim_end_matches("_total")
        } else {
            name
        };
        let exported: Vec<&str> = page.lines().filter(|l| l.starts_with("# TYPE")).collect();
        assert!(
            exported.contains(&format!("# TYPE {family} {kind}").as_str()),
            "{name} ({kind}) is not exported: {exported:#?}"
        );
    }
    assert_eq!(http_get(http, "/live").await.0, 200);
    assert_eq!(http_get(http, "/ready").await, (200, "ready\n".into()));
    assert_eq!(http_get(http, "/nothing").await.0, 404);
    app.shutdown().await;
}
