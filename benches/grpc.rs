//! One reserve and its settle over real gRPC on loopback, against the app
//! as `tollgate serve` builds it (memory store, usage file in a temp dir);
//! and what the call deadline (`conn::Deadline`) adds to each call, side by
//! side with the same call without it.
//!
//! Run: `cargo bench --bench grpc` (`-- deadline` for the second alone).

#![allow(clippy::unwrap_used, missing_docs)]

mod harness;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::proto;
use tollgate::proto::quota_client::QuotaClient;

/// The demo's prices, no rate limits, a balance that never runs out.
fn grpc(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let settings = harness::settings(["demo"], &dir.path().join("usage.jsonl"));
    let (mut client, stop) = runtime.block_on(async {
        let served = harness::serve(settings).await;
        (QuotaClient::connect(served.url.clone()).await.unwrap(), served)
    });
    let mut i = 0u64;
    c.bench_function("grpc reserve+settle (loopback)", |b| {
        b.iter(|| {
            i += 1;
            let id = format!("bench-{i}");
            runtime.block_on(async {
                let reserve = proto::ReserveRequest {
                    account_id: "demo".into(),
                    model: harness::MODEL.into(),
                    request_id: id.clone(),
                    input_tokens: 10,
                    max_output_tokens: 10,
                    ..Default::default()
                };
                let r = client.reserve(reserve).await.unwrap().into_inner();
                assert_eq!(r.decision, proto::Decision::Allow as i32);
                let usage = proto::Usage {
                    input_tokens: 10,
                    output_tokens: 5,
                    ..Default::default()
                };
                let settle = proto::SettleRequest {
                    account_id: "demo".into(),
                    reservation_id: id,
                    usage: Some(usage),
                };
                client.settle(settle).await.unwrap();
            })
        })
    });
    drop(client);
    runtime.block_on(stop.stop());
}

/// A call answered at once, bare and inside [`Deadline`]: the wrapper's
/// own cost per call (a boxed future and a timer entry).
fn deadline(c: &mut Criterion) {
    use std::convert::Infallible;
    use tollgate::transport::conn::Deadline;
    use tower::ServiceExt;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = tower::service_fn(|_: http::Request<tonic::body::Body>| async {
        Ok::<_, Infallible>(http::Response::new(tonic::body::Body::empty()))
    });
    let request = || http::Request::new(tonic::body::Body::empty());
    let mut group = c.benchmark_group("call deadline");
    group.bench_function("bare", |b| {
        b.iter(|| runtime.block_on(answer.oneshot(request())).unwrap());
    });
    let bounded = Deadline::new(answer, std::time::Duration::from_secs(30));
    group.bench_function("in Deadline", |b| {
        b.iter(|| runtime.block_on(bounded.clone().oneshot(request())).unwrap());
    });
    group.finish();
}

criterion_group!(benches, grpc, deadline);
criterion_main!(benches);
