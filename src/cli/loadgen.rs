//! The load generator (`tollgate loadgen`) and the empty baseline service
//! it is compared with.
//!
//! The generator drives a running Tollgate's data plane over TCP or a Unix
//! socket through [`crate::client`]: `connections` clients, each on its
//! own connection, loop over a Reserve and its Settle on accounts drawn
//! uniformly, with a hot key or by a Zipf law, for a time or a number of
//! calls. Every
//! call's latency goes into an HDR histogram; the report gives throughput
//! and percentiles, and is written as JSON.
//!
//! The baseline ([`Baseline`]) is the floor Tollgate cannot beat: the same
//! `tollgate.v1.Quota` service on the same stack (tonic, the same listener
//! options) answering every call at once with a response of the same shape
//! and size as Tollgate's, touching no state.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse, rate_limit_response};

use crate::client::{Ask, Client, Options, Reserved};
use crate::proto;
use crate::proto::quota_server::QuotaServer;

/// Calls as measured: one attempt each (a retry would hide an error and
/// count its latency twice), and a deadline no healthy call reaches.
const CALLS: Options = Options {
    deadline: Duration::from_secs(10),
    attempts: 1,
    backoff: Duration::ZERO,
};

/// How accounts are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mix {
    /// Each call picks an account uniformly.
    Uniform,
    /// This share of calls goes to the first account, the rest uniformly.
    Hot(f64),
    /// The account of rank `r` (from 1, in the order given) is picked with
    /// a probability proportional to `1 / r^s`: a few hot tenants and a
    /// long tail of quiet ones, as a real fleet sees them.
    Zipf(f64),
}

/// Draws account indexes for a [`Mix`] over `n` accounts.
#[derive(Debug, Clone)]
pub struct Picker {
    mix: Mix,
    n: usize,
    /// For [`Mix::Zipf`]: the cumulative share of ranks 1..=i, rising to 1.
    cumulative: Arc<[f64]>,
}

impl Picker {
    /// A picker of `mix` over `n` accounts (at least one).
    pub fn new(mix: Mix, n: usize) -> Picker {
        let n = n.max(1);
        let cumulative: Arc<[f64]> = match mix {
            Mix::Zipf(s) => {
                let weights: Vec<f64> = (1..=n).map(|r| (r as f64).powf(-s)).collect();
                let total: f64 = weights.iter().sum();
                weights
                    .iter()
                    .scan(0.0, |sum, w| {
                        *sum += w / total;
                        Some(*sum)
                    })
                    .collect()
            }
            Mix::Uniform | Mix::Hot(_) => Arc::from([]),
        };
        Picker { mix, n, cumulative }
    }

    /// The index of the next account.
    pub fn pick(&self, rng: &mut fastrand::Rng) -> usize {
        match self.mix {
            Mix::Hot(share) if rng.f64() < share => 0,
            Mix::Zipf(_) => {
                let u = rng.f64();
                self.cumulative.partition_point(|c| *c <= u).min(self.n - 1)
            }
            _ => rng.usize(..self.n),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `http://HOST:PORT` or `unix:/PATH`.
    pub target: String,
    /// Concurrent clients, one connection each.
    pub connections: usize,
    /// Run this long (unless `calls` ends it first).
    pub duration: Duration,
    /// Stop after this many calls.
    pub calls: Option<u64>,
    /// Accounts to spread calls over.
    pub accounts: Vec<String>,
    /// How.
    pub mix: Mix,
    /// The model named on reserves.
    pub model: String,
    /// Call Envoy's ShouldRateLimit in this domain instead (one descriptor,
    /// `api_key` = the account), rather than Reserve and Settle.
    pub rls_domain: Option<String>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th.
    pub p90: u64,
    /// 99th.
    pub p99: u64,
    /// 99.9th.
    pub p999: u64,
    /// The slowest call.
    pub max: u64,
}

/// What a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// The target.
    pub target: String,
    /// Concurrent clients.
    pub connections: usize,
    /// Calls completed (each Reserve and each Settle is one).
    pub calls: u64,
    /// Calls that failed (a gRPC error; denials are answers, not errors).
    pub errors: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Calls per second.
    pub calls_per_second: f64,
    /// Latency per call, µs.
    pub latency_us: Percentiles,
    /// (latency µs, quantile) points for plotting the distribution.
    pub distribution: Vec<(u64, f64)>,
}

/// Runs `spec` and reports.
pub async fn run(spec: &Spec) -> Result<Report, tonic::transport::Error> {
    let started = Instant::now();
    let until = started + spec.duration;
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let bar = spec.progress.then(|| {
        let bar = indicatif::ProgressBar::new(spec.duration.as_millis() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:40}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let picker = Picker::new(spec.mix, spec.accounts.len());
    // Request ids are new to every run, also of one process against one
    // server: a repeated id would be answered as a retry, not decided.
    let run = fastrand::u64(..);
    let mut tasks = Vec::new();
    for client in 0..spec.connections {
        let channel = crate::transport::channel::connect(&spec.target).await?;
        let mut rls = RateLimitServiceClient::new(channel.clone());
        let quota = Client::new(channel, CALLS);
        let (done, errors, spec) = (Arc::clone(&done), Arc::clone(&errors), spec.clone());
        let picker = picker.clone();
        let seed = 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(client as u64 + 1);
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut histogram = Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable_histogram());
            let mut i = 0u64;
            while Instant::now() < until && spec.calls.is_none_or(|n| done.load(Ordering::Relaxed) < n) {
                i += 1;
                let account = spec.accounts[picker.pick(&mut rng)].clone();
                if let Some(domain) = &spec.rls_domain {
                    let t = Instant::now();
                    if rls.should_rate_limit(rls_request(domain, &account)).await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = histogram.record(t.elapsed().as_micros() as u64);
                    done.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let ask = Ask {
                    account,
                    request_id: format!("lg-{run:016x}-{client}-{i}"),
                    model: spec.model.clone(),
                    input_tokens: 100,
                    max_output_tokens: 100,
                    ..Ask::default()
                };
                let t = Instant::now();
                let reserved = quota.reserve(&ask).await;
                let _ = histogram.record(t.elapsed().as_micros() as u64);
                done.fetch_add(1, Ordering::Relaxed);
                let reservation = match reserved {
                    Ok(Reserved::Granted(reservation)) => reservation,
                    Ok(Reserved::Denied(_)) => continue,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let usage = proto::Usage {
                    input_tokens: 100,
                    output_tokens: 50,
                    ..Default::default()
                };
                let t = Instant::now();
                if reservation.settle(usage).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                let _ = histogram.record(t.elapsed().as_micros() as u64);
                done.fetch_add(1, Ordering::Relaxed);
            }
            histogram
        }));
    }
    let ticker = bar.clone().map(|bar| {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                bar.set_position(started.elapsed().as_millis() as u64);
                bar.set_message(format!("{} calls", done.load(Ordering::Relaxed)));
            }
        })
    });
    let mut all = Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable_histogram());
    for task in tasks {
        if let Ok(h) = task.await {
            let _ = all.add(h);
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let seconds = started.elapsed().as_secs_f64();
    let q = |p| all.value_at_quantile(p);
    Ok(Report {
        target: spec.target.clone(),
        connections: spec.connections,
        calls: all.len(),
        errors: errors.load(Ordering::Relaxed),
        seconds,
        calls_per_second: all.len() as f64 / seconds,
        latency_us: Percentiles {
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: all.max(),
        },
        distribution: [0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0]
            .iter()
            .map(|&p| (q(p), p))
            .collect(),
    })
}

/// A ShouldRateLimit call in `domain` for one descriptor, `api_key` =
/// `account` (over the limit is an answer, not an error).
fn rls_request(domain: &str, account: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_owned(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "api_key".into(),
                value: account.to_owned(),
            }],
            ..Default::default()
        }],
        hits_addend: 1,
    }
}

/// A histogram of 3 significant digits always builds; this is never reached.
fn unreachable_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_max(u64::MAX / 4, 2).unwrap_or_else(|_| std::process::abort())
}

/// The empty service: the same API and response sizes as Tollgate, no work.
#[derive(Debug, Default, Clone, Copy)]
pub struct Baseline;

fn now() -> prost_types::Timestamp {
    crate::api::convert::timestamp_out(jiff::Timestamp::now())
}

fn money(decimal: &str) -> proto::Money {
    let m: crate::engine::Money = decimal.parse().unwrap_or(crate::engine::Money::ZERO);
    crate::api::convert::money_out(m)
}

#[tonic::async_trait]
impl proto::quota_server::Quota for Baseline {
    async fn reserve(
        &self,
        request: Request<proto::ReserveRequest>,
    ) -> Result<Response<proto::ReserveResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(proto::ReserveResponse {
            decision: proto::Decision::Allow as i32,
            granted_output_tokens: r.max_output_tokens,
            reservation_id: r.request_id,
            expires_at: Some(now()),
            rate_limits: Some(proto::RateLimitStatus::default()),
            price_version: "v1".into(),
            held: vec![proto::SourceAmount {
                source: proto::SourceKind::Paid as i32,
                money: Some(money("0.000030000000")),
                ..Default::default()
            }],
            ..Default::default()
        }))
    }

    async fn extend(&self, _: Request<proto::ExtendRequest>) -> Result<Response<proto::ExtendResponse>, Status> {
        Ok(Response::new(proto::ExtendResponse::default()))
    }

    async fn settle(&self, request: Request<proto::SettleRequest>) -> Result<Response<proto::SettleResponse>, Status> {
        let r = request.into_inner();
        let charge = proto::SourceAmount {
            source: proto::SourceKind::Paid as i32,
            money: Some(money("0.000020000000")),
            ..Default::default()
        };
        Ok(Response::new(proto::SettleResponse {
            record: Some(proto::UsageRecord {
                request_id: r.reservation_id.clone(),
                reservation_id: r.reservation_id,
                account_id: r.account_id,
                model: "llama-3.1-8b".into(),
                service_tier: "default".into(),
                usage: r.usage,
                charges: vec![charge],
                total_money: Some(money("0.000020000000")),
                price_version: "v1".into(),
                reserved_at: Some(now()),
                settled_at: Some(now()),
                kind: "settle".into(),
                record_id: "0123456789abcdef0123456789abcdef".into(),
                ..Default::default()
            }),
        }))
    }

    async fn release(&self, _: Request<proto::ReleaseRequest>) -> Result<Response<proto::ReleaseResponse>, Status> {
        Ok(Response::new(proto::ReleaseResponse::default()))
    }

    async fn charge(&self, _: Request<proto::ChargeRequest>) -> Result<Response<proto::ChargeResponse>, Status> {
        Ok(Response::new(proto::ChargeResponse::default()))
    }

    async fn get_balance(
        &self,
        _: Request<proto::GetBalanceRequest>,
    ) -> Result<Response<proto::GetBalanceResponse>, Status> {
        Ok(Response::new(proto::GetBalanceResponse::default()))
    }
}

/// Envoy's rate-limit API, answered as cheaply as an RLS server can: OK
/// for every descriptor, with no limit looked up.
#[tonic::async_trait]
impl RateLimitService for Baseline {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let ok = rate_limit_response::Code::Ok as i32;
        let statuses = request
            .into_inner()
            .descriptors
            .iter()
            .map(|_| rate_limit_response::DescriptorStatus {
                code: ok,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(RateLimitResponse {
            overall_code: ok,
            statuses,
            ..Default::default()
        }))
    }
}

/// What the baseline's drain may take after a shutdown signal.
pub const BASELINE_DRAIN: Duration = Duration::from_secs(10);

/// Serves the empty baseline ([`Baseline`]: the Quota API and Envoy's
/// rate-limit API) on `tcp` (and `unix`) with the same stack and listener
/// options as the data plane, until `stop` completes: the floor the load
/// generator compares Tollgate with, on either API.
pub async fn serve_baseline(
    tcp: TcpListener,
    unix: Option<tokio::net::UnixListener>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let until = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let service = || QuotaServer::new(Baseline);
    let on_tcp = tonic::transport::Server::builder()
        .add_service(service())
        .add_service(RateLimitServiceServer::new(Baseline))
        .serve_with_incoming_shutdown(
            crate::transport::conn::incoming(tcp, crate::transport::conn::Guard::default().places()),
            until(stop_rx.clone()),
        );
    let on_unix = {
        let stop = until(stop_rx);
        async move {
            match unix {
                Some(listener) => {
                    tonic::transport::Server::builder()
                        .add_service(service())
                        .add_service(RateLimitServiceServer::new(Baseline))
                        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), stop)
                        .await
                }
                None => Ok(()),
            }
        }
    };
    let signal = async move {
        stop.await;
        let _ = stop_tx.send(true);
    };
    let (tcp, unix, ()) = tokio::join!(on_tcp, on_unix, signal);
    tcp.context("baseline over TCP")?;
    unix.context("baseline over the Unix socket")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shares of the first ranks over `draws` picks.
    fn shares(mix: Mix, n: usize, draws: usize) -> Vec<f64> {
        let picker = Picker::new(mix, n);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = vec![0usize; n];
        for _ in 0..draws {
            counts[picker.pick(&mut rng)] += 1;
        }
        counts.iter().map(|c| *c as f64 / draws as f64).collect()
    }

    #[test]
    fn zipf_picks_rank_r_in_proportion_to_one_over_r_to_the_s() {
        // s = 1 over 1,000 accounts: rank 1 takes 1 / H(1000) = 13.4 %,
        // rank 2 half that, rank 10 a tenth.
        let harmonic: f64 = (1..=1000).map(|r| 1.0 / f64::from(r)).sum();
        let got = shares(Mix::Zipf(1.0), 1000, 200_000);
        for rank in [1usize, 2, 10, 100] {
            let want = 1.0 / (rank as f64 * harmonic);
            let off = (got[rank - 1] - want).abs() / want;
            assert!(off < 0.1, "rank {rank}: {} against {want}", got[rank - 1]);
        }
        // Every account can come up; none beyond the list.
        let picker = Picker::new(Mix::Zipf(1.0), 3);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut seen = [false; 3];
        for _ in 0..1000 {
            seen[picker.pick(&mut rng)] = true;
        }
        assert_eq!(seen, [true; 3]);
    }

    #[test]
    fn uniform_and_hot_spread_as_before() {
        let uniform = shares(Mix::Uniform, 4, 40_000);
        assert!(uniform.iter().all(|s| (s - 0.25).abs() < 0.02), "{uniform:?}");
        let hot = shares(Mix::Hot(0.9), 4, 40_000);
        assert!((hot[0] - (0.9 + 0.1 / 4.0)).abs() < 0.02, "{hot:?}");
    }
}
