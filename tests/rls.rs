//! Envoy's rate-limit API over real gRPC, with rules in envoyproxy/ratelimit's
//! format: matching, counting, windows (on the manual clock), the response
//! fields, shadow modes, and sidecars sharing Redis counting together.

#![allow(clippy::unwrap_used)]

mod support;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use jiff::SignedDuration;
use support::{Backend, TestApp, descriptor, rls_app as app};

const RULES: &str = "domain: inference
descriptors:
  - key: api_key
    rate_limit: { unit: minute, requests_per_unit: 3, name: per_key }
    descriptors:
      - key: model
        value: llama-3.1-70b
        rate_limit: { unit: minute, requests_per_unit: 1 }
      - key: model
        value: llama-*-8b
        share_threshold: true
        rate_limit: { unit: minute, requests_per_unit: 2 }
  - key: api_key
    value: vip
    rate_limit: { unlimited: true }
  - key: tokens
    rate_limit: { unit: hour, requests_per_unit: 1000 }
  - key: premium
    rate_limit: { unit: minute, requests_per_unit: 100, replaces: [{ name: per_key }] }
  - key: path
    value: /v1/chat
    shadow_mode: true
    rate_limit: { unit: second, requests_per_unit: 1 }
";

fn request(descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "inference".into(),
        descriptors,
        hits_addend: 0,
    }
}

async fn ask(client: &mut RateLimitServiceClient<tonic::transport::Channel>, r: RateLimitRequest) -> RateLimitResponse {
    client.should_rate_limit(r).await.unwrap().into_inner()
}

/// (code, remaining) of each descriptor.
fn codes(r: &RateLimitResponse) -> Vec<(i32, u32)> {
    r.statuses.iter().map(|s| (s.code, s.limit_remaining)).collect()
}

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

async fn limits_count_per_descriptor_and_reset_with_their_window(backend: Backend) {
    let (app, mut rls, _dir) = app(backend, RULES, "").await;
    let key = |k: &str| descriptor(&[("api_key", k)]);
    for remaining in [2, 1, 0] {
        let r = ask(&mut rls, request(vec![key("k1")])).await;
        assert_eq!((r.overall_code, codes(&r)), (OK, vec![(OK, remaining)]));
        let status = &r.statuses[0];
        let limit = status.current_limit.as_ref().unwrap();
        assert_eq!((limit.requests_per_unit, limit.name.as_str()), (3, "per_key"));
        assert_eq!(
            status.duration_until_reset.as_ref().unwrap().seconds,
            60,
            "the manual clock sits on a minute"
        );
    }
    let r = ask(&mut rls, request(vec![key("k1")])).await;
    assert_eq!((r.overall_code, codes(&r)), (OVER, vec![(OVER, 0)]));
    // Another key has its own counter; the next window starts afresh.
    assert_eq!(ask(&mut rls, request(vec![key("k2")])).await.overall_code, OK);
    app.advance(SignedDuration::from_secs(60));
    let r = ask(&mut rls, request(vec![key("k1")])).await;
    assert_eq!(codes(&r), vec![(OK, 2)]);
}

async fn depth_wildcards_unlimited_and_unmatched_descriptors(backend: Backend) {
    let (_app, mut rls, _dir) = app(backend, RULES, "").await;
    let model = |m: &str| descriptor(&[("api_key", "k1"), ("model", m)]);
    // Exact value at depth 2.
    let r = ask(&mut rls, request(vec![model("llama-3.1-70b")])).await;
    assert_eq!(codes(&r), vec![(OK, 0)]);
    assert_eq!(
        ask(&mut rls, request(vec![model("llama-3.1-70b")])).await.overall_code,
        OVER
    );
    // A shared wildcard: two models, one counter of 2.
    assert_eq!(
        codes(&ask(&mut rls, request(vec![model("llama-3.1-8b")])).await),
        vec![(OK, 1)]
    );
    assert_eq!(
        codes(&ask(&mut rls, request(vec![model("llama-3.2-8b")])).await),
        vec![(OK, 0)]
    );
    assert_eq!(
        codes(&ask(&mut rls, request(vec![model("llama-3.3-8b")])).await),
        vec![(OVER, 0)]
    );
    // No rule at depth 2 for this model: nothing limits it (the depth-1
    // key rule applies only to one-entry descriptors).
    let r = ask(&mut rls, request(vec![model("mistral")])).await;
    assert_eq!((r.statuses[0].code, r.statuses[0].current_limit.is_none()), (OK, true));
    // Unlimited: OK with the largest remaining, never counted.
    let r = ask(&mut rls, request(vec![descriptor(&[("api_key", "vip")])])).await;
    assert_eq!(codes(&r), vec![(OK, u32::MAX)]);
    // An unknown domain limits nothing.
    let mut unknown = request(vec![descriptor(&[("api_key", "k1")])]);
    unknown.domain = "other".into();
    assert_eq!(codes(&ask(&mut rls, unknown).await), vec![(OK, 0)]);
    // An empty domain or descriptor list is an error.
    let empty = rls.should_rate_limit(request(vec![])).await.unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
}

async fn hits_addend_replaces_shadow_mode_and_many_descriptors(backend: Backend) {
    let (_app, mut rls, _dir) = app(backend, RULES, "").await;
    let tokens = descriptor(&[("tokens", "acct-1")]);
    // A request-level hits_addend counts tokens (as Envoy AI Gateway sends
    // them after a response).
    let mut r = request(vec![tokens.clone()]);
    r.hits_addend = 900;
    assert_eq!(codes(&ask(&mut rls, r.clone()).await), vec![(OK, 100)]);
    // The descriptor's own wins; 0 only checks.
    let mut own = tokens.clone();
    own.hits_addend = Some(UInt64Value { value: 0 });
    r.descriptors = vec![own];
    assert_eq!(codes(&ask(&mut rls, r.clone()).await), vec![(OK, 100)]);
    let mut big = tokens.clone();
    big.hits_addend = Some(UInt64Value { value: 101 });
    r.descriptors = vec![big];
    assert_eq!(codes(&ask(&mut rls, r).await), vec![(OVER, 0)]);
    // An outsized count is over the limit, not an error, and the counter
    // still answers afterwards.
    let mut huge = descriptor(&[("tokens", "acct-2")]);
    huge.hits_addend = Some(UInt64Value { value: u64::MAX });
    for _ in 0..2 {
        let r = request(vec![huge.clone()]);
        assert_eq!(codes(&ask(&mut rls, r).await), vec![(OVER, 0)]);
    }
    // Several descriptors: over if any is; statuses in request order.
    let both = request(vec![descriptor(&[("api_key", "vip")]), tokens.clone()]);
    let answer = ask(&mut rls, both).await;
    assert_eq!(
        (answer.overall_code, codes(&answer)),
        (OVER, vec![(OK, u32::MAX), (OVER, 0)])
    );
    // A premium descriptor replaces the per-key limit of the same request.
    for _ in 0..5 {
        let r = ask(
            &mut rls,
            request(vec![
                descriptor(&[("api_key", "k9")]),
                descriptor(&[("premium", "yes")]),
            ]),
        )
        .await;
        assert_eq!(r.overall_code, OK);
        assert!(r.statuses[0].current_limit.is_none(), "replaced");
    }
    // Shadow mode: over the limit, yet OK.
    let chat = || request(vec![descriptor(&[("path", "/v1/chat")])]);
    ask(&mut rls, chat()).await;
    let r = ask(&mut rls, chat()).await;
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![(OK, 0)]));
    assert_eq!(per_unit(&r), vec![Some(1)], "the shadowed rule matched");
}

/// The requests_per_unit of each descriptor's limit, if it has one.
fn per_unit(r: &RateLimitResponse) -> Vec<Option<u32>> {
    r.statuses
        .iter()
        .map(|s| s.current_limit.as_ref().map(|l| l.requests_per_unit))
        .collect()
}

/// Replaces `file` at once (a reload never sees it half written).
fn replace(file: &std::path::Path, text: &str) {
    let next = file.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, file).unwrap();
}

async fn global_shadow_mode_and_response_headers(backend: Backend) {
    let (_app, mut rls, _dir) = app(backend, RULES, "shadow_mode = true\nresponse_headers = true\n").await;
    let key = || request(vec![descriptor(&[("api_key", "k1")]), descriptor(&[("tokens", "t")])]);
    for _ in 0..3 {
        ask(&mut rls, key()).await;
    }
    let r = ask(&mut rls, key()).await;
    // Per descriptor the truth; overall OK.
    assert_eq!((r.overall_code, r.statuses[0].code), (OK, OVER));
    let headers: Vec<(String, String)> = r
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    assert_eq!(
        headers,
        [
            ("x-ratelimit-limit".to_owned(), "3".to_owned()),
            ("x-ratelimit-remaining".to_owned(), "0".to_owned()),
            ("x-ratelimit-reset".to_owned(), "60".to_owned()),
        ]
    );
}

async fn a_charging_descriptor_charges_and_checks_a_tollgate_account(backend: Backend) {
    let (mut app, mut rls, _dir) = app(backend, RULES, "").await;
    let charge = |account: &str, request: &str| {
        descriptor(&[
            ("tollgate_account", account),
            ("tollgate_model", "m"),
            ("tollgate_tokens", "output"),
            ("tollgate_request", request),
        ])
    };
    let paid = |b: &tollgate::proto::GetBalanceResponse| b.paid.clone().unwrap().decimal;
    let before = paid(&app.balance("rich").await);
    // 1,000 output tokens at 4 per million: 0.004, charged once however
    // often Envoy retries.
    for _ in 0..2 {
        let mut r = request(vec![charge("rich", "resp-1")]);
        r.hits_addend = 1000;
        assert_eq!(codes(&ask(&mut rls, r).await), vec![(OK, 0)]);
    }
    assert_eq!(before, "100.000000000000");
    assert_eq!(paid(&app.balance("rich").await), "99.996000000000");
    // No hits: a check that the account can spend.
    let check = |account: &str| request(vec![charge(account, "pre")]);
    assert_eq!(ask(&mut rls, check("rich")).await.overall_code, OK);
    for refused in ["poor", "frozen", "nobody"] {
        assert_eq!(ask(&mut rls, check(refused)).await.overall_code, OVER, "{refused}");
    }
    // A charge needs its model.
    let no_model = request(vec![descriptor(&[("tollgate_account", "rich")])]);
    let refused = rls.should_rate_limit(no_model).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
}

async fn envoys_own_limit_for_a_descriptor_replaces_the_rules(backend: Backend) {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
    let (_app, mut rls, _dir) = app(backend, RULES, "").await;
    let with_limit = |pairs: &[(&str, &str)], unit: i32| {
        let mut d = descriptor(pairs);
        d.limit = Some(RateLimitOverride {
            requests_per_unit: 1,
            unit,
        });
        request(vec![d])
    };
    // No rule for this key: the override alone limits it. A rule for
    // api_key allows 3: the override's 1 wins.
    for pairs in [&[("anything", "x")][..], &[("api_key", "k1")][..]] {
        let first = ask(&mut rls, with_limit(pairs, 2)).await;
        assert_eq!(
            (codes(&first), per_unit(&first)),
            (vec![(OK, 0)], vec![Some(1)]),
            "{pairs:?}"
        );
        assert_eq!(
            codes(&ask(&mut rls, with_limit(pairs, 2)).await),
            vec![(OVER, 0)],
            "{pairs:?}"
        );
    }
    // Bad input changes nothing: with one descriptor unreadable, the others
    // are not counted either.
    let mut mixed = with_limit(&[("a", "b")], 0);
    mixed.descriptors.insert(0, descriptor(&[("api_key", "k2")]));
    mixed.descriptors.push(descriptor(&[("tollgate_account", "rich")]));
    let refused = rls.should_rate_limit(mixed).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let after = ask(&mut rls, request(vec![descriptor(&[("api_key", "k2")])])).await;
    assert_eq!(codes(&after), vec![(OK, 2)], "the refused call counted nothing");
}

async fn quota_descriptors_make_a_request_over_only_together(backend: Backend) {
    let rules = "domain: inference\n\
        descriptors:\n\
        \x20 - key: quota\n\
        \x20   quota_mode: true\n\
        \x20   rate_limit: { unit: hour, requests_per_unit: 1 }\n";
    let (_app, mut rls, _dir) = app(backend, rules, "").await;
    let quota = |v: &str| descriptor(&[("quota", v)]);
    ask(&mut rls, request(vec![quota("a")])).await;
    // One quota of two is spent: reported over, the request is not.
    let r = ask(&mut rls, request(vec![quota("a"), quota("b")])).await;
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![(OVER, 0), (OK, 0)]));
    // Every quota spent: over.
    let r = ask(&mut rls, request(vec![quota("a"), quota("b")])).await;
    assert_eq!((r.overall_code, codes(&r)), (OVER, vec![(OVER, 0), (OVER, 0)]));
}

on_both_stores!(
    quota_descriptors_make_a_request_over_only_together,
    envoys_own_limit_for_a_descriptor_replaces_the_rules,
    a_charging_descriptor_charges_and_checks_a_tollgate_account,
    limits_count_per_descriptor_and_reset_with_their_window,
    depth_wildcards_unlimited_and_unmatched_descriptors,
    hits_addend_replaces_shadow_mode_and_many_descriptors,
    global_shadow_mode_and_response_headers,
);

/// Two sidecars on `redis` serving `config`, both on the system clock as
/// in production (one window for both), with a rate-limit client each.
async fn two_sidecars(
    redis: &support::redis::RedisServer,
    config: &str,
) -> (Vec<TestApp>, Vec<RateLimitServiceClient<tonic::transport::Channel>>) {
    let mut sidecars = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (mut settings, dir, usage) = support::settings(config);
        settings.store.use_redis(vec![redis.url()], false);
        let sidecar = support::spawn_sidecar(settings, dir, usage).await;
        clients.push(RateLimitServiceClient::new(
            tollgate::transport::channel::connect(&sidecar.quota_url).await.unwrap(),
        ));
        sidecars.push(sidecar);
    }
    (sidecars, clients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_sharing_redis_count_one_window_together() {
    let redis = support::redis::RedisServer::start(&[]);
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("inference.yaml"), RULES).unwrap();
    let config = format!(
        "{}\n[rls]\nconfig_dir = \"{}\"\n",
        support::CONFIG,
        rules.path().display()
    );
    let (_sidecars, mut clients) = two_sidecars(&redis, &config).await;
    // 400 tokens a call against 1,000 an hour: two calls pass, wherever
    // they land.
    let mut request = request(vec![descriptor(&[("tokens", "shared")])]);
    request.hits_addend = 400;
    let mut allowed = 0;
    for i in 0..6 {
        if ask(&mut clients[i % 2], request.clone()).await.overall_code == OK {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 2, "one window of 1,000 tokens across both sidecars");
}

/// Calls of the script that counts rate-limit windows, per Redis.
fn window_trips(redis: &support::redis::RedisServer) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

/// The count of the one open window in `redis`.
fn window_count(redis: &support::redis::RedisServer) -> u64 {
    let keys = redis.cli(&["KEYS", "tollgate:rls:*"]);
    let key = keys.lines().next().expect("a window is open");
    redis.cli(&["GET", key]).trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_count_from_hits_taken_ahead_and_give_back_what_idles() {
    let redis = support::redis::RedisServer::start(&[]);
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("inference.yaml"),
        "domain: inference\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: hour, requests_per_unit: 300 }\n",
    )
    .unwrap();
    let config = format!(
        "{}\n[leases]\nidle_return_seconds = 1\n\n[rls]\nconfig_dir = \"{}\"\n",
        support::CONFIG,
        rules.path().display()
    );
    let (_sidecars, mut clients) = two_sidecars(&redis, &config).await;
    let call = request(vec![descriptor(&[("api_key", "k")])]);
    // One sidecar's burn: its count stays exact, most calls are counted
    // from hits it took ahead, and the shared count holds them.
    let before = window_trips(&redis);
    for used in 1..=100u32 {
        let r = ask(&mut clients[0], call.clone()).await;
        assert_eq!(codes(&r), vec![(OK, 300 - used)]);
    }
    let trips = window_trips(&redis) - before;
    assert!(trips < 50, "100 calls took {trips} trips to Redis");
    assert!(window_count(&redis) > 100, "hits are held ahead of use");
    // Idle for a second, it gives them back.
    for _ in 0..100 {
        if window_count(&redis) == 100 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(window_count(&redis), 100, "what idled came back");
    // Both, concurrently: exactly the rest of the limit is allowed.
    let mut calls = tokio::task::JoinSet::new();
    for task in 0..8 {
        let mut client = clients[task % 2].clone();
        let call = call.clone();
        calls.spawn(async move {
            let mut allowed = 0;
            for _ in 0..100 {
                allowed += u32::from(ask(&mut client, call.clone()).await.overall_code == OK);
            }
            allowed
        });
    }
    let mut allowed = 0;
    while let Some(n) = calls.join_next().await {
        allowed += n.unwrap();
    }
    assert_eq!(allowed, 200, "the window's 300, less the 100 counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_reload_with_the_configuration_and_a_broken_file_changes_nothing() {
    let rules = tempfile::tempdir().unwrap();
    let file = rules.path().join("inference.yaml");
    std::fs::write(&file, RULES).unwrap();
    let config = format!(
        "{}\n[rls]\nconfig_dir = \"{}\"\n",
        support::CONFIG.replace("[server]\n", "[server]\nreload_poll_ms = 20\n"),
        rules.path().display()
    );
    let (app, path, reloads) = support::spawn_app_watching(&config).await;
    let mut rls = RateLimitServiceClient::new(tollgate::transport::channel::connect(&app.quota_url).await.unwrap());
    let key = |k: &str| request(vec![descriptor(&[("api_key", k)])]);
    assert_eq!(codes(&ask(&mut rls, key("a")).await), vec![(OK, 2)]);
    // A tighter limit, in force once reloaded.
    replace(
        &file,
        &RULES.replace(
            "requests_per_unit: 3, name: per_key",
            "requests_per_unit: 1, name: per_key",
        ),
    );
    support::reached(&reloads.applied, 1).await;
    let first = ask(&mut rls, key("b")).await;
    assert_eq!((codes(&first), per_unit(&first)), (vec![(OK, 0)], vec![Some(1)]));
    assert_eq!(codes(&ask(&mut rls, key("b")).await), vec![(OVER, 0)]);
    // A broken rules file is refused whole; the rules in force stay.
    replace(
        &file,
        "domain: inference\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: fortnight }\n",
    );
    support::reached(&reloads.refused, 1).await;
    let c = ask(&mut rls, key("c")).await;
    assert_eq!((codes(&c), per_unit(&c)), (vec![(OK, 0)], vec![Some(1)]));
    assert_eq!(codes(&ask(&mut rls, key("c")).await), vec![(OVER, 0)]);
    // The [rls] settings reload too: global shadow mode, from now on. (The
    // configuration first: with the rules still broken it is refused, so
    // the second reload applied has both.)
    replace(&path, &config.replace("[rls]\n", "[rls]\nshadow_mode = true\n"));
    replace(
        &file,
        &RULES.replace(
            "requests_per_unit: 3, name: per_key",
            "requests_per_unit: 1, name: per_key",
        ),
    );
    support::reached(&reloads.applied, 2).await;
    let shadowed = ask(&mut rls, key("c")).await;
    assert_eq!((shadowed.overall_code, codes(&shadowed)), (OK, vec![(OVER, 0)]));
}
