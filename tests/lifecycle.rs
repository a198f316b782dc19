//! The process's life as an operator sees it: readiness (the HTTP probe
//! and the gRPC health service) following a Redis outage, and a sidecar
//! stopped with SIGTERM under load. (A Python grpcio client on the Unix
//! socket is tested by `tests/python.rs`, through the Python package.)

#![allow(clippy::unwrap_used)]

mod support;

use support::{http_get, reserve, sample, settle};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

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
    let (mut settings, dir, usage) = support::settings(&support::with_http(""));
    settings.store.use_redis(vec![redis.url()], false);
    let mut app = support::spawn_sidecar(settings, dir, usage).await;
    let http = app.http.unwrap();
    let mut grpc = HealthClient::new(tollgate::transport::channel::connect(&app.admin_url).await.unwrap());
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

/// Reserve then settle on the shared account until the sidecar goes away
/// (or the account runs dry): the request ids whose settle was
/// acknowledged, and whether the sidecar went away.
async fn settle_until_gone(
    mut quota: tollgate::proto::quota_client::QuotaClient<tonic::transport::Channel>,
    client: usize,
) -> (Vec<String>, bool) {
    use tollgate::proto;
    let mut acknowledged = Vec::new();
    for i in 0u64.. {
        let id = format!("t{client}-{i}");
        let reserve = proto::ReserveRequest {
            account_id: "shared".into(),
            model: "m".into(),
            request_id: id.clone(),
            input_tokens: 100,
            max_output_tokens: 100,
            ..Default::default()
        };
        let Ok(r) = quota.reserve(reserve).await else {
            return (acknowledged, true);
        };
        if r.into_inner().decision == proto::Decision::Deny as i32 {
            return (acknowledged, false);
        }
        let settle = proto::SettleRequest {
            account_id: "shared".into(),
            reservation_id: id.clone(),
            usage: Some(proto::Usage {
                input_tokens: 100,
                output_tokens: 10 + i % 50,
                ..Default::default()
            }),
        };
        if quota.settle(settle).await.is_err() {
            return (acknowledged, true);
        }
        acknowledged.push(id);
    }
    (acknowledged, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_keeps_every_acknowledged_settle_and_returns_the_lease() {
    let redis = support::redis::RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    // Enough money that the load cannot run it dry before the SIGTERM
    // (about 1,400 settles in 1.5 s here; this pays for about 200,000).
    let config = support::fleet::FLEET.replace(r#"paid = "0.5""#, r#"paid = "50""#);
    let mut sidecars = support::fleet::fleet_with(1, dir.path(), &[redis.url()], &config);
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..16 {
        clients.spawn(settle_until_gone(sidecars[0].client().await, c));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    // SIGTERM mid-load; the sidecar must exit cleanly (stop asserts it).
    let sidecar = sidecars.pop().unwrap();
    let sidecar = tokio::task::spawn_blocking(move || {
        let mut sidecar = sidecar;
        sidecar.stop();
        sidecar
    })
    .await
    .unwrap();
    let (mut acknowledged, mut cut) = (Vec::new(), 0);
    while let Some(done) = clients.join_next().await {
        let (ids, gone) = done.unwrap();
        acknowledged.extend(ids);
        cut += usize::from(gone);
    }
    assert!(acknowledged.len() > 50, "the load ran: {}", acknowledged.len());
    assert!(cut > 0, "the shutdown came mid-load, not after the account ran dry");
    // Every acknowledged settle is in the usage file and the Redis stream,
    // once; nothing is in them twice.
    let ids = |records: Vec<serde_json::Value>| {
        let mut ids: Vec<String> = records
            .iter()
            .map(|r| r["request_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    let written = ids(sidecar.records());
    let streamed = ids(support::fleet::stream_records(&redis.url(), 1).await);
    assert_eq!(written, streamed, "the stream holds exactly what the sidecar wrote");
    let mut deduplicated = written.clone();
    deduplicated.dedup();
    assert_eq!(deduplicated, written, "no record twice");
    for id in &acknowledged {
        assert!(written.binary_search(id).is_ok(), "acknowledged settle {id} lost");
    }
    // The lease came back: nothing lent, and Redis charged what the records say.
    let account = support::fleet::shared_account(redis.port, 1, "shared");
    for (producer, lease) in account.leases() {
        assert!(lease.held.is_empty(), "lease of {producer} still holds");
    }
    let paid = account.paid;
    assert_eq!(
        sidecar.charged().picos(),
        paid.charged(),
        "Redis charged what the records say"
    );
}

/// Set in a child process of the tests below: which stuck process to be.
const STUCK_CHILD: &str = "TOLLGATE_TEST_STUCK_CHILD";

/// The child: listens for signals with `deadline` as `tollgate serve`
/// does, deadlocks both runtime workers (two locks taken in opposite
/// orders, as the memory store once did), says so on stdout, and at the
/// signal begins a drain that waits for them forever.
fn be_stuck(deadline: std::time::Duration) {
    use std::sync::{Arc, Barrier, Mutex};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let (stop, _) = tollgate::app::signal::shutdown(deadline);
        let (a, b) = (Arc::new(Mutex::new(())), Arc::new(Mutex::new(())));
        let both_hold_one = Arc::new(Barrier::new(2));
        let (holds, held) = std::sync::mpsc::channel();
        let stuck = |first: Arc<Mutex<()>>, second: Arc<Mutex<()>>| {
            let (barrier, holds) = (Arc::clone(&both_hold_one), holds.clone());
            let worker = tokio::spawn(async move {
                let _one = first.lock().unwrap();
                holds.send(()).unwrap();
                barrier.wait();
                let _two = second.lock().unwrap();
            });
            // The next task must find this worker blocked, and go to the other.
            tokio::task::block_in_place(|| held.recv().unwrap());
            worker
        };
        let workers = [stuck(Arc::clone(&a), Arc::clone(&b)), stuck(b, a)];
        println!("child: stuck");
        stop.await;
        println!("child: draining");
        for worker in workers {
            let _ = worker.await;
        }
    });
    unreachable!("the drain waited for deadlocked workers");
}

/// Runs this test binary's `test` as a stuck child, sends it `signals`
/// signals (1 or 3) once it is stuck, and returns its exit status. Gives
/// the child 30 s for each step, then kills it and fails.
fn signal_stuck_child(test: &str, signals: usize) -> std::process::ExitStatus {
    use std::io::BufRead;
    use std::time::{Duration, Instant};
    const STEP: Duration = Duration::from_secs(30);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(STUCK_CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let (said, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if said.send(line).is_err() {
                return;
            }
        }
    });
    let fail = |mut child: std::process::Child, why: &str| -> ! {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{why}");
    };
    let said = |awaited: &str, give_up: Instant| loop {
        match lines.recv_timeout(give_up.saturating_duration_since(Instant::now())) {
            // (libtest may print its test's name on the same line, unended.)
            Ok(line) if line.ends_with(awaited) => return true,
            Ok(_) => {}
            // Timed out, or the child closed its output (it died).
            Err(_) => return false,
        }
    };
    // Signals of one kind are not queued: the first is sent once the child
    // is stuck, the second once it is draining, and the third, which the
    // stuck child cannot tell of, is of the other kind.
    let steps = [("child: stuck", "-TERM"), ("child: draining", "-TERM"), ("", "-INT")];
    for (awaited, signal) in steps.into_iter().take(signals) {
        if !awaited.is_empty() && !said(awaited, Instant::now() + STEP) {
            fail(child, &format!("the child never said {awaited:?}"));
        }
        let sent = std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status();
        if !sent.is_ok_and(|s| s.success()) {
            fail(child, &format!("kill {signal} failed"));
        }
    }
    let give_up = Instant::now() + STEP;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > give_up {
            fail(child, "a process whose workers are stuck ignored SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_ends_a_process_whose_workers_are_stuck_at_the_deadline() {
    if std::env::var_os(STUCK_CHILD).is_some() {
        be_stuck(std::time::Duration::from_millis(500));
    }
    let status = signal_stuck_child("sigterm_ends_a_process_whose_workers_are_stuck_at_the_deadline", 1);
    assert_eq!(status.code(), Some(tollgate::app::signal::DEADLINE_EXIT), "{status}");
}

/// A second signal only hurries the drain (which a stuck process never
/// finishes); a third ends the process at once.
#[test]
fn a_third_signal_ends_a_stuck_process_at_once() {
    if std::env::var_os(STUCK_CHILD).is_some() {
        // A deadline the test would not wait out.
        be_stuck(std::time::Duration::from_secs(3600));
    }
    let status = signal_stuck_child("a_third_signal_ends_a_stuck_process_at_once", 3);
    assert_eq!(
        status.code(),
        Some(tollgate::app::signal::THIRD_SIGNAL_EXIT),
        "{status}"
    );
}
