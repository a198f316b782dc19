//! The Redis connection layer against real servers: scripts by SHA with a
//! reload on NOSCRIPT, a single Redis and a 3-master cluster, a deadline on
//! every call when Redis is gone, and reconnection when it is back.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::redis::{RedisCluster, RedisServer, cli, start_tls};
use tollgate::store::StoreError;
use tollgate::store::redis::{Credentials, Redis, RedisSettings};

fn settings(urls: Vec<String>, cluster: bool) -> RedisSettings {
    RedisSettings {
        urls,
        cluster,
        deadline: Duration::from_millis(500),
        ca_cert: None,
        credentials: None,
        replicas: 0,
    }
}

fn incr() -> redis::Script {
    redis::Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])")
}

#[tokio::test]
async fn scripts_run_by_sha_and_reload_after_a_flush() {
    let server = RedisServer::start(&[]);
    let redis = Redis::connect(&settings(vec![server.url()], false)).await.unwrap();
    let script = incr();
    assert_eq!(redis.invoke::<i64>("test", &script, &["{a}:n"], 5).await.unwrap(), 5);
    assert!(cli(server.port, &["SCRIPT", "EXISTS", script.get_hash()]).contains('1'));
    assert_eq!(cli(server.port, &["SCRIPT", "FLUSH"]).trim(), "OK");
    assert_eq!(redis.invoke::<i64>("test", &script, &["{a}:n"], 5).await.unwrap(), 10);
    let pong: String = redis.query(&redis::cmd("PING")).await.unwrap();
    assert_eq!(pong, "PONG");
    // Same machine: Redis's clock and ours agree to well within a minute.
    let skew = redis.time().await.unwrap().duration_since(jiff::Timestamp::now());
    assert!(skew.abs() < jiff::SignedDuration::from_secs(60), "{skew:?}");
}

#[tokio::test]
async fn a_cluster_routes_each_account_to_its_slot() {
    let cluster = RedisCluster::start(3);
    let redis = Redis::connect(&settings(cluster.urls(), true)).await.unwrap();
    let script = incr();
    // Enough hash tags to land on every master.
    for i in 0..30 {
        let key = format!("{{acct-{i}}}:n");
        assert_eq!(redis.invoke::<i64>("test", &script, &[&key], i).await.unwrap(), i);
    }
    let counts: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|n| cli(n.port, &["DBSIZE"]).trim().parse().unwrap())
        .collect();
    assert!(counts.iter().all(|c| *c > 0), "keys on every master: {counts:?}");
    for node in &cluster.nodes {
        cli(node.port, &["SCRIPT", "FLUSH"]);
    }
    assert_eq!(
        redis.invoke::<i64>("test", &script, &["{acct-1}:n"], 1).await.unwrap(),
        2
    );
}

#[tokio::test]
async fn calls_fail_fast_while_redis_is_down_and_recover_when_it_is_back() {
    let mut server = RedisServer::start(&[]);
    let redis = Redis::connect(&settings(vec![server.url()], false)).await.unwrap();
    let script = incr();
    assert_eq!(redis.invoke::<i64>("test", &script, &["{a}:n"], 1).await.unwrap(), 1);
    server.stop();
    let err = redis.invoke::<i64>("test", &script, &["{a}:n"], 1).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    server.restart();
    // The manager reconnects in the background; a few calls may still fail.
    let mut answer = None;
    for _ in 0..50 {
        if let Ok(n) = redis.invoke::<i64>("test", &script, &["{a}:n"], 1).await {
            answer = Some(n);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answer, Some(1), "reconnected to the restarted (empty) server");
}

#[tokio::test]
async fn nothing_listening_or_nothing_answering_is_unavailable_not_a_hang() {
    // Port 1: nothing listens, the connection is refused.
    let refused = settings(vec!["redis://127.0.0.1:1".into()], false);
    assert!(matches!(
        Redis::connect(&refused).await,
        Err(StoreError::Unavailable(_))
    ));
    // A socket that accepts connections but never answers: the deadline.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://127.0.0.1:{}", silent.local_addr().unwrap().port());
    assert!(matches!(
        Redis::connect(&settings(vec![url], false)).await,
        Err(StoreError::Unavailable(_))
    ));
    let two = settings(vec!["redis://127.0.0.1:1".into(), "redis://127.0.0.1:2".into()], false);
    assert!(matches!(Redis::connect(&two).await, Err(StoreError::Unavailable(_))));
}

#[tokio::test]
async fn rediss_urls_connect_over_tls_to_a_trusted_authority_only() {
    let (_server, tls) = start_tls();
    let trusted = RedisSettings {
        ca_cert: Some(tls.ca.clone()),
        ..settings(vec![tls.url()], false)
    };
    let redis = Redis::connect(&trusted).await.unwrap();
    assert_eq!(redis.invoke::<i64>("test", &incr(), &["{tls}:n"], 7).await.unwrap(), 7);
    // The system's roots do not include the test authority.
    let untrusted = settings(vec![tls.url()], false);
    assert!(matches!(
        Redis::connect(&untrusted).await,
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test]
async fn credentials_from_settings_authenticate() {
    let server = RedisServer::start(&["--requirepass", "s3cret"]);
    let anonymous = settings(vec![server.url()], false);
    let err = match Redis::connect(&anonymous).await {
        Err(e) => e,
        Ok(redis) => redis
            .invoke::<i64>("test", &incr(), &["{auth}:n"], 1)
            .await
            .unwrap_err(),
    };
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    let password = Credentials {
        username: None,
        password: "s3cret".into(),
    };
    assert!(!format!("{password:?}").contains("s3cret"), "never printed");
    let with = RedisSettings {
        credentials: Some(password),
        ..settings(vec![server.url()], false)
    };
    let redis = Redis::connect(&with).await.unwrap();
    assert_eq!(redis.invoke::<i64>("test", &incr(), &["{auth}:n"], 1).await.unwrap(), 1);
}
