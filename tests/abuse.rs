//! Hostile clients over real gRPC: oversized messages, malformed protobuf
//! and invalid UTF-8 on the wire, huge descriptor lists, floods of distinct
//! accounts and rate-limit keys, many idle connections and a client that
//! never speaks. Each gets a clear error or is shed; the server goes on
//! serving, changes nothing for bad input, and keeps its memory bounded
//! (idle state is let go of, and counted).

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use jiff::SignedDuration;
use prost::bytes::{Buf, BufMut};
use support::{Backend, descriptor, http_get, rls_app, rls_app_on, sample, spawn_app_on_with, with_http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate::proto;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Held by each test that reads gauges off `/metrics`: the registry is
/// the process's, and a scrape sets the gauges from its own app.
static SCRAPES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bytes as they are, both ways: whatever a client puts on the wire.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// `quota` still allows a small reserve on `rich` (under request `id`).
async fn serves(quota: &mut proto::quota_client::QuotaClient<tonic::transport::Channel>, id: &str) {
    let r = quota.reserve(support::reserve("rich", id, 10, 10)).await.unwrap();
    assert_eq!(r.into_inner().decision, proto::Decision::Allow as i32);
}

/// Calls `path` with `body` as the request message's bytes.
async fn raw_call(url: &str, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let channel = tollgate::transport::channel::connect(url).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        Raw,
    )
    .await
    .map(tonic::Response::into_inner)
}

async fn balance(app: &mut support::TestApp, account: &str) -> proto::GetBalanceResponse {
    app.quota
        .get_balance(proto::GetBalanceRequest {
            account_id: account.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_server_goes_on() {
    let mut app = spawn_app_on_with(Backend::Memory, support::CONFIG).await;
    let huge = "x".repeat(5 << 20);
    let refused = app
        .quota
        .reserve(support::reserve("rich", &huge, 10, 10))
        .await
        .unwrap_err();
    // tonic's code for a message over the data plane's 16 KiB limit.
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(refused.message().contains("too large"), "{refused:?}");
    // Within the limit, a long id is refused for what it is.
    let long = "x".repeat(10_000);
    let refused = app
        .quota
        .reserve(support::reserve("rich", &long, 10, 10))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    serves(&mut app.quota, "after").await;
}

#[tokio::test]
async fn malformed_protobuf_and_invalid_utf8_are_refused_and_change_nothing() {
    let mut app = spawn_app_on_with(Backend::Memory, support::CONFIG).await;
    let before = balance(&mut app, "rich").await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a truncated varint", vec![0x20, 0xff]),
        ("a length beyond the message", vec![0x0a, 0x7f, b'r']),
        ("a wrong wire type", vec![0x0d, 0, 0, 0, 0]),
        (
            "invalid UTF-8 in the account id",
            vec![0x0a, 0x04, b'r', 0xff, 0xfe, b'h'],
        ),
        ("groups nested past the decoder's limit", [0x7b].repeat(200)),
        ("an unterminated group", vec![0x7b, 0x08, 0x01]),
    ];
    for (what, body) in cases {
        let refused = raw_call(&app.quota_url, "/tollgate.v1.Quota/Reserve", body)
            .await
            .unwrap_err();
        // gRPC's code for a request that cannot be parsed.
        assert_eq!(refused.code(), Code::Internal, "{what}: {refused:?}");
        assert!(refused.message().contains("decode"), "{what}: {refused:?}");
    }
    // Valid protobuf for an unknown field only is an empty request:
    // refused for what it lacks.
    let refused = raw_call(&app.quota_url, "/tollgate.v1.Quota/Reserve", vec![0xf8, 0x07, 0x01])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(balance(&mut app, "rich").await, before, "nothing changed");
    serves(&mut app.quota, "after").await;
}

const RULES: &str = "domain: inference
descriptors:
  - key: user
    rate_limit: { unit: second, requests_per_unit: 100 }
";

#[tokio::test]
async fn huge_descriptor_lists_are_refused_before_anything_is_counted() {
    let (_app, mut rls, _dir) = rls_app(Backend::Memory, RULES, "").await;
    let request = |descriptors| envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest {
        domain: "inference".into(),
        descriptors,
        hits_addend: 0,
    };
    let many = (0..1_000).map(|i| descriptor(&[("user", &format!("u{i}"))])).collect();
    let mut wide = descriptor(&[]);
    wide.entries = (0..1000).flat_map(|_| descriptor(&[("user", "a")]).entries).collect();
    let wide = vec![wide];
    let long = vec![descriptor(&[("user", &"v".repeat(2_000))])];
    for (what, descriptors, mentions) in [
        ("1,000 descriptors", many, "descriptors"),
        ("1,000 entries", wide, "descriptors[0].entries"),
        ("a 2 kB value", long, "descriptors[0].entries[0]"),
    ] {
        let refused = rls.should_rate_limit(request(descriptors)).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{what}: {refused:?}");
        assert!(refused.message().starts_with(mentions), "{what}: {refused:?}");
    }
    let mut long_domain = request(vec![descriptor(&[("user", "u0")])]);
    long_domain.domain = "d".repeat(2_000);
    let refused = rls.should_rate_limit(long_domain).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().starts_with("domain"), "{refused:?}");
    // Nothing was counted: the first hit of u0 finds the whole limit.
    let answer = rls
        .should_rate_limit(request(vec![descriptor(&[("user", "u0")])]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.statuses[0].limit_remaining, 99);
}

#[tokio::test]
async fn a_flood_of_distinct_rate_limit_keys_stays_bounded_and_is_let_go_of() {
    let _alone = SCRAPES.lock().await;
    let base = with_http("").replace(
        "[store]\nsweep_interval_ms = 20\n",
        "[store]\nsweep_interval_ms = 20\nmax_rate_limit_windows = 1000\n",
    );
    let (app, mut rls, _dir) = rls_app_on(Backend::Memory, &base, RULES, "").await;
    let clock = app.clock.clone().unwrap();
    let http = app.http.unwrap();
    let (mut answered, mut shed) = (0u64, 0u64);
    for round in 0..40 {
        let descriptors = (0..250)
            .map(|i| descriptor(&[("user", &format!("r{round}-u{i}"))]))
            .collect();
        let request = envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest {
            domain: "inference".into(),
            descriptors,
            hits_addend: 0,
        };
        match rls.should_rate_limit(request).await {
            Ok(_) => answered += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(status.message().contains("windows are open"), "{status:?}");
                shed += 1;
            }
        }
        let (_, page) = http_get(http, "/metrics").await;
        let open = sample(&page, "tollgate_rate_limit_windows").unwrap();
        assert!(open <= 1000.0, "at most the configured windows are open: {open}");
        // Every sixth round (1,500 windows asked for), a second passes:
        // those windows end.
        if round % 6 == 5 {
            clock.advance(SignedDuration::from_secs(2));
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }
    let (_, page) = http_get(http, "/metrics").await;
    let evicted = sample(&page, "tollgate_evicted_total{state=\"rate_limit_window\"}").unwrap();
    assert!(answered > 0 && shed > 0, "answered {answered}, shed {shed}");
    assert!(
        evicted >= 5000.0,
        "ended windows were let go of (1,000 a second): {evicted}"
    );
}

/// Descriptors with Envoy's own limit and a new key name each: their hits
/// are counted under one metric label, not one series per name (before,
/// each name became a `key` label of `tollgate_rls_hits_total`, for ever).
#[tokio::test]
async fn limit_overrides_with_ever_new_keys_add_no_metric_series() {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
    let _alone = SCRAPES.lock().await;
    let (app, mut rls, _dir) = rls_app_on(Backend::Memory, &with_http(""), RULES, "").await;
    let http = app.http.unwrap();
    for round in 0..20 {
        let descriptors = (0..16)
            .map(|i| {
                let mut d = descriptor(&[(&format!("k{round}-{i}"), "v")]);
                d.limit = Some(RateLimitOverride {
                    requests_per_unit: 1000,
                    unit: 2, // MINUTE
                });
                d
            })
            .collect();
        let request = envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest {
            domain: "inference".into(),
            descriptors,
            hits_addend: 0,
        };
        rls.should_rate_limit(request).await.unwrap();
    }
    let (_, after) = http_get(http, "/metrics").await;
    let named: Vec<&str> = after
        .lines()
        .filter(|l| l.starts_with("tollgate_rls_hits_total{") && l.contains("key=\"k"))
        .collect();
    assert!(named.is_empty(), "series named after the caller's keys: {named:?}");
    assert!(after.contains("key=\"(limit override)\""), "the hits are counted");
}

/// Year-long windows of Envoy's own limits, each under a new key, cannot
/// pin the window table: they have a budget of their own
/// (`rls.max_override_windows`), and past it only new override windows
/// are refused, while the rules' windows for new callers keep being
/// counted (before, the overrides filled the table and every new caller
/// was UNAVAILABLE until restart).
#[tokio::test]
async fn override_windows_cannot_crowd_out_the_rules_windows() {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
    let base = support::CONFIG.replace(
        "[store]\nsweep_interval_ms = 20\n",
        "[store]\nsweep_interval_ms = 20\nmax_rate_limit_windows = 100\n",
    );
    let (_app, mut rls, _dir) = rls_app_on(Backend::Memory, &base, RULES, "max_override_windows = 50\n").await;
    let request = |descriptors| envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest {
        domain: "inference".into(),
        descriptors,
        hits_addend: 0,
    };
    let (mut answered, mut refused) = (0, 0);
    for round in 0..15 {
        let descriptors = (0..10)
            .map(|i| {
                let mut d = descriptor(&[("user", &format!("flood-{round}-{i}"))]);
                d.limit = Some(RateLimitOverride {
                    requests_per_unit: 1_000_000,
                    unit: 6, // YEAR
                });
                d
            })
            .collect();
        match rls.should_rate_limit(request(descriptors)).await {
            Ok(_) => answered += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(status.message().contains("rls.max_override_windows"), "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((answered, refused), (5, 10), "50 override windows, then none");
    for i in 0..40 {
        let answer = rls
            .should_rate_limit(request(vec![descriptor(&[("user", &format!("new-caller-{i}"))])]))
            .await
            .unwrap_or_else(|e| panic!("new caller {i} refused: {e:?}"))
            .into_inner();
        assert_eq!(answer.statuses[0].limit_remaining, 99, "new caller {i}");
    }
}

/// Both planes advertise a bound on the streams of one connection
/// (without it a client could hold any number of half-sent streams open
/// on one connection, before any token is checked), and a connection at
/// the bound is still served.
#[tokio::test]
async fn every_plane_bounds_the_streams_of_one_connection() {
    let app = support::spawn_app().await;
    for url in [&app.quota_url, &app.admin_url] {
        let address = url.trim_start_matches("http://");
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
        let mut connection = Box::pin(connection);
        // The server's SETTINGS arrive with the first exchange.
        let request = support::grpc_post(url, "/grpc.health.v1.Health/Check");
        client = client.ready().await.unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        body.send_data(vec![0u8, 0, 0, 0, 0].into(), true).unwrap();
        let response = tokio::select! {
            r = response => r.unwrap(),
            _ = &mut connection => panic!("the connection ended"),
        };
        assert_eq!(response.status(), 200);
        assert_eq!(
            connection.max_concurrent_send_streams(),
            tollgate::app::server::MAX_STREAMS_PER_CONNECTION as usize,
            "{url}"
        );
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_distinct_unknown_accounts_leaves_no_state() {
    let _alone = SCRAPES.lock().await;
    for backend in [Backend::Memory, Backend::Redis] {
        let mut app = spawn_app_on_with(backend, &with_http("")).await;
        let http = app.http.unwrap();
        let (_, page) = http_get(http, "/metrics").await;
        let cached = sample(&page, "tollgate_accounts_cached").unwrap();
        for i in 0..2000 {
            let denied = app
                .quota
                .reserve(support::reserve(&format!("nobody-{i}"), &format!("r{i}"), 10, 10))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(denied.deny_reason, proto::DenyReason::UnknownAccount as i32);
        }
        let (_, page) = http_get(http, "/metrics").await;
        assert_eq!(
            sample(&page, "tollgate_accounts_cached").unwrap(),
            cached,
            "{backend:?}: unknown accounts are not kept"
        );
    }
}

/// A sidecar on Redis keeps, for each account it serves, a mirror, a lock
/// and the account's last record as read or written. A flood of distinct
/// accounts, each served once, is let go of once they idle: none of it
/// stays for an account nobody uses (it stayed, lock and record, for
/// every account ever served).
#[tokio::test]
async fn a_flood_of_distinct_accounts_is_let_go_of_once_they_idle() {
    const ACCOUNTS: usize = 200;
    let _alone = SCRAPES.lock().await;
    let accounts: String = (0..ACCOUNTS)
        .map(|i| format!("[[accounts]]\nid = \"tenant-{i}\"\nplan = \"payg\"\npaid = \"10\"\n\n"))
        .collect();
    let mut app = spawn_app_on_with(Backend::Redis, &with_http(&accounts)).await;
    let http = app.http.unwrap();
    let cached = async || {
        let (_, page) = http_get(http, "/metrics").await;
        sample(&page, "tollgate_accounts_cached").unwrap()
    };
    let before = cached().await;
    for i in 0..ACCOUNTS {
        let account = format!("tenant-{i}");
        let held = app
            .quota
            .reserve(support::reserve(&account, &format!("r{i}"), 10, 10))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(held.decision, proto::Decision::Allow as i32, "{account}: {held:?}");
        app.quota
            .settle(support::settle(&account, &held.reservation_id, 10, 5))
            .await
            .unwrap();
    }
    assert_eq!(cached().await, before + ACCOUNTS as f64, "each account served is held");
    // Reported (and what is left given back), then idle past the minute
    // their answers are kept for retries: forgotten. The upkeep ticks
    // every 100 ms, a full sweep comes every 1.2 s.
    let clock = app.clock.clone().unwrap();
    clock.advance(SignedDuration::from_secs(2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    clock.advance(SignedDuration::from_mins(2));
    let mut left = cached().await;
    for _ in 0..100 {
        if left == before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = cached().await;
    }
    assert_eq!(left, before, "accounts still held after they idled");
    app.shutdown().await;
}

/// Whether the server closes `s` within `limit` (reading what it sends
/// meanwhile: its HTTP/2 settings).
async fn closed_within(mut s: tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    tokio::time::timeout(limit, async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    })
    .await
    .is_ok()
}

/// The data-plane address of `app`.
fn address(app: &support::TestApp) -> std::net::SocketAddr {
    app.quota_url.trim_start_matches("http://").parse().unwrap()
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once_and_served_once_below_it() {
    let _alone = SCRAPES.lock().await;
    let config = with_http("").replace(
        "[server]\n",
        "[server]\nmax_connections = 40\nfirst_bytes_timeout_ms = 60000\n",
    );
    let mut app = spawn_app_on_with(Backend::Memory, &config).await;
    let (_, page) = http_get(app.http.unwrap(), "/metrics").await;
    let refused_before = sample(&page, "tollgate_connections_refused_total").unwrap();
    // The app's own client holds one place; 39 silent clients the rest.
    let mut silent = Vec::new();
    for _ in 0..39 {
        silent.push(tokio::net::TcpStream::connect(address(&app)).await.unwrap());
    }
    // Time to be accepted: the next ones are over the cap.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..10 {
        let s = tokio::net::TcpStream::connect(address(&app)).await.unwrap();
        assert!(
            closed_within(s, Duration::from_secs(2)).await,
            "a connection over the cap is closed at once"
        );
    }
    let (_, page) = http_get(app.http.unwrap(), "/metrics").await;
    let refused = sample(&page, "tollgate_connections_refused_total").unwrap() - refused_before;
    assert!(refused >= 10.0, "each is counted: {refused}");
    // The connection being served was not disturbed; places freed are
    // taken again.
    serves(&mut app.quota, "during").await;
    silent.truncate(20);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut another = proto::quota_client::QuotaClient::connect(app.quota_url.clone())
        .await
        .unwrap();
    serves(&mut another, "after").await;
    drop(silent);
}

/// Half-sent requests on the HTTP endpoint (headers that never end): at
/// most `http::MAX_CONNECTIONS` are let in, the rest closed at once, and
/// those let in are closed after the first-bytes timeout; the probes
/// answer again, and the data plane answers throughout (before, 2,000 of
/// them stayed open past 70 s and took the data plane's descriptors).
#[tokio::test]
async fn half_sent_requests_cannot_hold_the_http_endpoint() {
    let _alone = SCRAPES.lock().await;
    let config = with_http("").replace("[server]\n", "[server]\nfirst_bytes_timeout_ms = 400\n");
    let mut app = spawn_app_on_with(Backend::Memory, &config).await;
    let http = app.http.unwrap();
    let mut held = Vec::new();
    for _ in 0..tollgate::transport::http::MAX_CONNECTIONS + 20 {
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: tollgate\r\nX-Never-Ends: ")
            .await
            .unwrap();
        held.push(s);
    }
    serves(&mut app.quota, "while-held").await;
    let over = held.split_off(tollgate::transport::http::MAX_CONNECTIONS);
    for s in over {
        assert!(
            closed_within(s, Duration::from_secs(2)).await,
            "over the bound: closed at once"
        );
    }
    for s in held {
        assert!(
            closed_within(s, Duration::from_secs(5)).await,
            "a request whose headers never end is closed"
        );
    }
    let (status, _) = http_get(http, "/live").await;
    assert_eq!(status, 200);
    serves(&mut app.quota, "after").await;
}

#[tokio::test]
async fn silent_and_trickling_connections_are_closed_and_service_goes_on() {
    let config = support::CONFIG.replace("[server]\n", "[server]\nfirst_bytes_timeout_ms = 500\n");
    let mut app = spawn_app_on_with(Backend::Memory, &config).await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(tokio::net::TcpStream::connect(address(&app)).await.unwrap());
    }
    // The HTTP/2 preface a byte every 100 ms: 2.4 s for what must take 0.5 s.
    let trickle = tokio::spawn({
        let addr = address(&app);
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            for b in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
                if s.write_all(&[*b]).await.is_err() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            closed_within(s, Duration::from_secs(10)).await
        }
    });
    for s in silent {
        assert!(
            closed_within(s, Duration::from_secs(10)).await,
            "a silent connection is closed"
        );
    }
    assert!(trickle.await.unwrap(), "a trickling connection is closed");
    // A client that speaks is served as before.
    serves(&mut app.quota, "after").await;
}

/// Charges of one pico-unit pass every request limit, so a caller could
/// make an account remember ids (and their answers) as fast as it can
/// send them. Full answers are kept for the 4,096 latest closed requests
/// only; beyond `holds.max_request_ids` ids remembered, new requests are
/// refused (`RESOURCE_EXHAUSTED`) and nothing is charged for them, while
/// other accounts go on being served and no charge is ever made twice.
#[tokio::test]
async fn a_flood_of_cheap_charges_is_bounded_per_account() {
    const BUDGET: usize = 5_000;
    let config = support::CONFIG.replacen("[holds]\n", &format!("[holds]\nmax_request_ids = {BUDGET}\n"), 1);
    for backend in [Backend::Memory, Backend::Redis] {
        let mut app = spawn_app_on_with(backend, &config).await;
        let paid = |b: &proto::GetBalanceResponse| b.paid.clone().unwrap().decimal;
        let before = paid(&balance(&mut app, "rich").await);
        let charge = |id: String| proto::ChargeRequest {
            account_id: "rich".into(),
            request_id: id,
            charge: Some(proto::charge_request::Charge::Amount(support::money("0.000000000001"))),
            ..Default::default()
        };
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..8 {
            let (mut quota, charge) = (app.quota.clone(), charge);
            tasks.spawn(async move {
                for i in (worker..BUDGET).step_by(8) {
                    let done = quota.charge(charge(format!("c{i}"))).await.unwrap().into_inner();
                    assert!(done.record.is_some(), "c{i}: {done:?}");
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let refused = app.quota.charge(charge("one-too-many".into())).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{backend:?}: {refused:?}");
        assert!(refused.message().contains("holds.max_request_ids"), "{refused:?}");
        // The latest answers are kept; the oldest were let go early, and
        // their retries are refused rather than charged again.
        let last = format!("c{}", BUDGET - 1);
        let again = app.quota.charge(charge(last.clone())).await.unwrap().into_inner();
        assert_eq!(again.record.unwrap().request_id, last, "{backend:?}");
        let first = app.quota.charge(charge("c0".into())).await.unwrap_err();
        assert_eq!(first.code(), Code::FailedPrecondition, "{backend:?}: {first:?}");
        assert!(first.message().contains("no longer kept"), "{first:?}");
        let after = balance(&mut app, "rich").await;
        let picos = |decimal: String| decimal.parse::<tollgate::engine::Money>().unwrap().picos();
        let charged = picos(before.clone()) - picos(paid(&after));
        assert_eq!(charged, BUDGET as i128, "{backend:?}: each charged once");
        // Another account is not held back by this one's budget.
        let other = proto::ChargeRequest {
            account_id: "limited".into(),
            ..charge("elsewhere".into())
        };
        assert!(
            app.quota.charge(other).await.unwrap().into_inner().record.is_some(),
            "{backend:?}"
        );
        app.shutdown().await;
    }
}
