//! What operators see: the Prometheus metrics moving under a small load
//! (scraped over HTTP), the readiness probe and the gRPC health service
//! following a Redis outage.

#![allow(clippy::unwrap_used)]

mod support;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use support::{Backend, http_get, reserve, sample, settle};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The test config, serving the HTTP endpoint on a free port.
fn config(extra: &str) -> String {
    let config = support::CONFIG.replace("[server]\n", "[server]\nhttp_listen = \"127.0.0.1:0\"\n");
    format!("{config}\n{extra}")
}

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
    let mut app = support::spawn_app_on_with(Backend::Memory, &config(&extra)).await;
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
    ];
    let (status, before) = http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    let before = read(&before, &names);

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
    let mut rls = RateLimitServiceClient::new(tollgate::channel::connect(&app.quota_url).await.unwrap());
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
    assert_eq!(moved, vec![3.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0], "{page}");
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
    assert_eq!(http_get(http, "/live").await.0, 200);
    assert_eq!(http_get(http, "/ready").await, (200, "ready\n".into()));
    assert_eq!(http_get(http, "/nothing").await.0, 404);
    app.shutdown().await;
}

async fn health(client: &mut HealthClient<tonic::transport::Channel>, service: &str) -> ServingStatus {
    let answer = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(answer.status).unwrap()
}

/// Polls the health service until `service` reports `status` (up to five
/// seconds: it follows readiness every 250 ms).
async fn health_becomes(client: &mut HealthClient<tonic::transport::Channel>, service: &str, status: ServingStatus) {
    for _ in 0..100 {
        if health(client, service).await == status {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{service:?} never became {status:?}");
}

/// Polls `/ready` until it answers `status` (up to ten seconds).
async fn ready_becomes(http: std::net::SocketAddr, status: u16) -> String {
    for _ in 0..200 {
        let (now, body) = http_get(http, "/ready").await;
        if now == status {
            return body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("/ready never answered {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_redis_outage_and_the_grpc_health_service_agrees() {
    let mut redis = support::redis::RedisServer::start(&[]);
    let (mut settings, dir, usage) = support::settings(&config(""));
    settings.store.use_redis(vec![redis.url()], false);
    let mut app = support::spawn_sidecar(settings, dir, usage).await;
    let http = app.http.unwrap();
    let mut grpc = HealthClient::new(tollgate::channel::connect(&app.admin_url).await.unwrap());
    ready_becomes(http, 200).await;
    assert_eq!(health(&mut grpc, "").await, ServingStatus::Serving);
    app.quota.reserve(reserve("rich", "r1", 10, 10)).await.unwrap();

    // Every plan here fails closed: without Redis the sidecar is not ready,
    // but alive.
    redis.stop();
    let why = ready_becomes(http, 503).await;
    assert!(why.contains("Redis is unreachable"), "{why}");
    assert_eq!(http_get(http, "/live").await.0, 200);
    health_becomes(&mut grpc, "", ServingStatus::NotServing).await;
    assert_eq!(health(&mut grpc, "live").await, ServingStatus::Serving);
    let (_, page) = http_get(http, "/metrics").await;
    let errors: f64 = page
        .lines()
        .filter(|l| l.starts_with("tollgate_redis_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(errors >= 1.0, "{page}");
    assert!(sample(&page, r#"tollgate_redis_call_duration_seconds_count{script="commit"}"#).unwrap() >= 1.0);
    assert_eq!(sample(&page, "tollgate_ready"), Some(0.0));

    redis.restart();
    ready_becomes(http, 200).await;
    health_becomes(&mut grpc, "", ServingStatus::Serving).await;
    app.quota.settle(settle("rich", "r1", 10, 5)).await.unwrap();
    app.shutdown().await;
}
