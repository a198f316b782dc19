//! Real processes under real faults: a fleet of Tollgate sidecars under
//! load while the link to Redis turns slow, lossy and stalled (through a
//! TCP fault proxy), and while a Redis Cluster master is killed and its
//! replica promoted. After each, the shared account is quiescent and
//! consistent, and every record the sidecars made is in the usage stream
//! exactly once, adding up to what Redis charged.
//!
//! Redis killed and restarted mid-load is `tests/fleet.rs`
//! (`decisions_go_on_from_leases_through_a_redis_outage_then_fail_closed`);
//! sidecars killed again and again is `tests/journal.rs`.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::faults::{FaultProxy, Faults};
use support::fleet::{FLEET, Sidecar, fleet_with, load, picos, quiescent, stream_holds_each_record_once};
use support::redis::{RedisCluster, RedisServer};

/// Ten units: enough that the load outlasts every fault.
const PAID: i128 = 10_000_000_000_000;

fn config(redis: &str) -> String {
    FLEET
        .replace(
            "[store.redis]\ndeadline_ms = 1000",
            &format!("[store.redis]\ndeadline_ms = 1000\n{redis}"),
        )
        .replace("paid = \"0.5\"", "paid = \"10\"")
}

/// Stops the load, then the sidecars (leases returned), and checks the
/// shared account and the stream read from `port` / `url`.
async fn settle_and_check(
    mut sidecars: Vec<Sidecar>,
    stop: &AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<(u64, u64)>>,
    port: u16,
    url: &str,
) -> (u64, u64) {
    stop.store(true, Ordering::Relaxed);
    let (mut allowed, mut unavailable) = (0, 0);
    for task in tasks {
        let (a, u) = task.await.unwrap();
        allowed += a;
        unavailable += u;
    }
    for sidecar in &mut sidecars {
        sidecar.stop();
    }
    let paid = quiescent(port, 1, PAID);
    let streamed = stream_holds_each_record_once(&sidecars, url).await;
    assert_eq!(
        paid.charged(),
        picos(&streamed),
        "Redis charged what the stream records"
    );
    eprintln!(
        "{} records in the stream, each once, adding up to what Redis charged",
        streamed.len()
    );
    (allowed, unavailable)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_lossy_stalling_link_to_redis_loses_and_duplicates_nothing() {
    let redis = RedisServer::start(&[]);
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port))).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecars = fleet_with(3, dir.path(), &[proxy.url()], &config(""));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&sidecars, 6, &stop).await;
    let ms = Duration::from_millis;
    let phases = [
        (
            Faults {
                latency: ms(20),
                ..Faults::default()
            },
            ms(1500),
        ),
        (
            Faults {
                drop_every: 25,
                ..Faults::default()
            },
            ms(1500),
        ),
        // Calls time out with their outcome unknown: sent, maybe run,
        // answer never seen.
        (
            Faults {
                stall: true,
                ..Faults::default()
            },
            ms(1500),
        ),
        (
            Faults {
                refuse: true,
                ..Faults::default()
            },
            ms(1000),
        ),
        (
            Faults {
                latency: ms(5),
                drop_every: 60,
                ..Faults::default()
            },
            ms(1500),
        ),
        (Faults::default(), ms(1500)),
    ];
    for (faults, lasting) in phases {
        proxy.set(faults);
        if faults.refuse {
            // Every connection cut: reconnections are refused.
            proxy.drop_all();
        }
        tokio::time::sleep(lasting).await;
    }
    let (allowed, _) = settle_and_check(sidecars, &stop, tasks, redis.port, &redis.url()).await;
    assert!(allowed > 100, "the fleet served through the faults: {allowed}");
    let stats = proxy.stats();
    assert!(
        stats.dropped > 0 && stats.stalls > 0 && stats.delayed_chunks > 0 && stats.refused > 0,
        "every fault happened: {stats:?}"
    );
    eprintln!("fault proxy: {stats:?}, {allowed} reserves allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_killed_mid_load_fails_over_and_loses_nothing() {
    let mut cluster = RedisCluster::start_with_replicas(3);
    let dir = tempfile::tempdir().unwrap();
    let sidecars = fleet_with(2, dir.path(), &cluster.urls(), &config("shards = 1\nreplicas = 1"));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&sidecars, 6, &stop).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let key = tollgate::store::leased::account_key("tollgate", 1, "shared");
    // The replica falls behind (stopped, its link cut), the master takes
    // commits it never copies, then dies. Without `replicas = 1` those
    // commits, acknowledged, vanish in the failover with the records they
    // carried (this test fails: records missing from the stream); with
    // it, each waits for the replica, is resent unconfirmed, and lands
    // once on the promoted master.
    let killed = cluster.wait_for_promotion(&key, Duration::from_secs(5));
    let replica = cluster.replica_of(killed);
    cluster.signal(replica, "STOP");
    support::redis::cli(killed, &["CLIENT", "KILL", "TYPE", "replica"]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    cluster.kill(killed);
    cluster.signal(replica, "CONT");
    let promoted = cluster.wait_for_promotion(&key, Duration::from_secs(20));
    assert_eq!(promoted, replica);
    // Back as a replica of the new master: commits are confirmed again.
    cluster.restart_node(killed);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let url = format!("redis://127.0.0.1:{promoted}");
    let (allowed, unavailable) = settle_and_check(sidecars, &stop, tasks, promoted, &url).await;
    assert!(allowed > 100, "the fleet served through the failover: {allowed}");
    eprintln!("failover {killed} -> {promoted}: {allowed} reserves allowed, {unavailable} calls unavailable");
}
