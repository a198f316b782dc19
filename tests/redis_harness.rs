//! The Redis harness works: servers on free ports, a 3-master cluster with
//! every slot assigned, stopped by PID. (The Redis-backed store's tests
//! build on it.)

#![allow(clippy::unwrap_used)]

mod support;

use support::redis::{RedisCluster, RedisServer, cli};

#[test]
fn servers_start_on_free_ports_and_stop_by_pid() {
    let mut a = RedisServer::start(&[]);
    let b = RedisServer::start(&[]);
    assert_ne!(a.port, b.port);
    assert_ne!(a.port, 6379, "never the shared Redis");
    assert_eq!(cli(a.port, &["SET", "k", "v"]).trim(), "OK");
    assert_eq!(cli(a.port, &["GET", "k"]).trim(), "v");
    assert_eq!(cli(b.port, &["GET", "k"]).trim(), "", "separate servers");
    a.stop();
    assert_ne!(cli(a.port, &["PING"]).trim(), "PONG");
    assert_eq!(cli(b.port, &["PING"]).trim(), "PONG");
}

#[test]
fn a_three_master_cluster_covers_every_slot() {
    let cluster = RedisCluster::start(3);
    let info = cli(cluster.nodes[0].port, &["CLUSTER", "INFO"]);
    assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
    assert!(info.contains("cluster_known_nodes:3"), "{info}");
    // Keys sharing a hash tag live on one node, whichever they are.
    let owner = |key: &str| {
        let slot = cli(cluster.nodes[0].port, &["CLUSTER", "KEYSLOT", key]);
        slot.trim().parse::<u16>().unwrap()
    };
    assert_eq!(owner("tollgate:{acct-1}:balance"), owner("tollgate:{acct-1}:holds"));
    assert_eq!(cluster.urls().len(), 3);
}
