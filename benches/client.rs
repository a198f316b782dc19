//! What `tollgate::client` costs per call: the same reserve-then-settle
//! loop made with the raw generated stub, with the raw stub under a tokio
//! deadline, and through the client (typed `Ask`, `Reservation`, deadline),
//! against the empty baseline service in the same process, at 1 and 16
//! connections, in alternating turns of 2 s after a warm-up turn.
//! Prints calls/s and latency percentiles, and each ratio to the raw stub.
//!
//! Run: `cargo bench --bench client`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use tollgate::client::{Ask, Client, Options, Reserved};
use tollgate::proto;
use tollgate::proto::quota_client::QuotaClient;
use tonic::transport::Channel;

/// One attempt, as `loadgen` makes calls.
const CALLS: Options = Options {
    deadline: Duration::from_secs(10),
    attempts: 1,
    backoff: Duration::ZERO,
};
const TURNS: usize = 6;
const TURN: Duration = Duration::from_secs(2);

#[derive(Clone, Copy)]
enum Way {
    Raw,
    RawWithDeadline,
    Client,
}

const WAYS: [(Way, &str); 3] = [
    (Way::Raw, "raw stub"),
    (Way::RawWithDeadline, "raw stub + deadline"),
    (Way::Client, "tollgate::client"),
];

fn reserve(id: &str) -> proto::ReserveRequest {
    proto::ReserveRequest {
        account_id: "a".into(),
        model: "m".into(),
        request_id: id.into(),
        input_tokens: 100,
        max_output_tokens: 100,
        ..Default::default()
    }
}

fn settle(id: String) -> proto::SettleRequest {
    proto::SettleRequest {
        account_id: "a".into(),
        reservation_id: id,
        usage: Some(usage()),
    }
}

fn usage() -> proto::Usage {
    proto::Usage {
        input_tokens: 100,
        output_tokens: 50,
        ..Default::default()
    }
}

/// Reserve then settle until `until`; each call's latency in ns.
async fn drive(way: Way, channel: Channel, until: Instant, tag: String) -> Vec<u64> {
    let mut raw = QuotaClient::new(channel.clone());
    let client = Client::new(channel, CALLS);
    let deadline = CALLS.deadline;
    let mut latencies = Vec::new();
    let mut i = 0u64;
    while Instant::now() < until {
        i += 1;
        let id = format!("{tag}-{i}");
        let t = Instant::now();
        match way {
            Way::Raw => {
                raw.reserve(reserve(&id)).await.unwrap();
                latencies.push(t.elapsed().as_nanos() as u64);
                let t = Instant::now();
                raw.settle(settle(id)).await.unwrap();
                latencies.push(t.elapsed().as_nanos() as u64);
            }
            Way::RawWithDeadline => {
                tokio::time::timeout(deadline, raw.reserve(reserve(&id)))
                    .await
                    .unwrap()
                    .unwrap();
                latencies.push(t.elapsed().as_nanos() as u64);
                let t = Instant::now();
                tokio::time::timeout(deadline, raw.settle(settle(id)))
                    .await
                    .unwrap()
                    .unwrap();
                latencies.push(t.elapsed().as_nanos() as u64);
            }
            Way::Client => {
                let ask = Ask {
                    account: "a".into(),
                    request_id: id,
                    model: "m".into(),
                    input_tokens: 100,
                    max_output_tokens: 100,
                    ..Ask::default()
                };
                let Reserved::Granted(reservation) = client.reserve(&ask).await.unwrap() else {
                    panic!("the baseline allows everything")
                };
                latencies.push(t.elapsed().as_nanos() as u64);
                let t = Instant::now();
                reservation.settle(usage()).await.unwrap();
                latencies.push(t.elapsed().as_nanos() as u64);
            }
        }
    }
    latencies
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}", tcp.local_addr().unwrap());
    tokio::spawn(tollgate::cli::loadgen::serve_baseline(
        tcp,
        None,
        std::future::pending(),
    ));
    for connections in [1usize, 16] {
        let mut channels = Vec::new();
        for _ in 0..connections {
            channels.push(tollgate::transport::channel::connect(&target).await.unwrap());
        }
        let mut measured: Vec<(u64, f64, Vec<u64>)> = WAYS.iter().map(|_| (0, 0.0, Vec::new())).collect();
        for turn in 0..=TURNS {
            for (k, (way, _)) in WAYS.iter().enumerate() {
                let (started, until) = (Instant::now(), Instant::now() + TURN);
                let tasks: Vec<_> = channels
                    .iter()
                    .enumerate()
                    .map(|(n, c)| tokio::spawn(drive(*way, c.clone(), until, format!("{k}-{turn}-{n}"))))
                    .collect();
                let mut latencies = Vec::new();
                for task in tasks {
                    latencies.extend(task.await.unwrap());
                }
                if turn > 0 {
                    let m = &mut measured[k];
                    m.0 += latencies.len() as u64;
                    m.1 += started.elapsed().as_secs_f64();
                    m.2.extend(latencies);
                }
            }
        }
        let mut figures = Vec::new();
        for ((_, name), (calls, seconds, latencies)) in WAYS.iter().zip(&mut measured) {
            latencies.sort_unstable();
            let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
            let rate = *calls as f64 / *seconds;
            figures.push((rate, at(0.5), at(0.99)));
            let (raw_rate, raw_p50, raw_p99) = figures[0];
            println!(
                "{connections:>2} connections, {name:<20} {rate:>8.0} calls/s ({:.3}), p50 {:>7.1} µs ({:.3}), p99 {:>7.1} µs ({:.3})",
                rate / raw_rate,
                at(0.5),
                at(0.5) / raw_p50,
                at(0.99),
                at(0.99) / raw_p99,
            );
        }
    }
}
