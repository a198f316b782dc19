use std::path::PathBuf;
use std::time::Duration;

use jiff::SignedDuration;

use crate::engine::catalog::OutagePolicy;
use crate::engine::ids::PlanId;
use crate::usage::UsageSinkConfig;

use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn the_demo_is_valid() {
    let s = Settings::parse(DEMO, &no_env).unwrap();
    assert_eq!(s.seed.len(), 3);
    assert_eq!(s.catalog.plans.len(), 3);
    assert_eq!(s.catalog.prices.versions().len(), 1);
}

/// Cluster seed URLs on the command line default the shards to 16,
/// but never replace a number the file gives.
#[test]
fn redis_urls_from_the_command_line_keep_configured_shards() {
    let mut by_kind = Settings::parse(DEMO, &no_env).unwrap();
    by_kind
        .store
        .use_redis(vec!["redis://a".into(), "redis://b".into()], false);
    assert_eq!(by_kind.store.leases.shards, 16);
    let text = DEMO
        .replace("\nshards = 0\n", "\nshards = 1\n")
        .replace("\nreplicas = 0\n", "\nreplicas = 1\n");
    let mut configured = Settings::parse(&text, &no_env).unwrap();
    configured
        .store
        .use_redis(vec!["redis://a".into(), "redis://b".into()], false);
    assert_eq!(configured.store.leases.shards, 1);
    assert_eq!(configured.store.redis.replicas, 1);
}

/// The command line's `--redis` is applied before validation: a file
/// that names the Redis store without URLs is valid with it, as with
/// TOLLGATE_REDIS, and flags win over the file and the environment.
#[test]
fn flags_are_applied_before_validation_and_win() {
    let text = DEMO.replacen("kind = \"memory\"", "kind = \"redis\"", 1);
    assert_ne!(text, DEMO);
    let errors = Settings::parse(&text, &no_env).unwrap_err().0;
    assert_eq!(errors[0].path, "store.redis.urls", "{errors:?}");
    let flags = Overrides {
        redis: vec!["redis://a:6379".into()],
        journal: Some(PathBuf::from("/flag")),
        listen: Some("127.0.0.1:7".parse().unwrap()),
        ..Overrides::default()
    };
    let env = |k: &str| (k == "TOLLGATE_JOURNAL").then(|| "/env".to_owned());
    let s = Settings::parse_with(&text, &env, &flags).unwrap();
    assert_eq!(s.store.kind, StoreKind::Redis);
    assert_eq!(s.store.redis.urls, ["redis://a:6379"]);
    assert_eq!(s.journal.dir, PathBuf::from("/flag"), "flag over environment");
    assert_eq!(s.listen, "127.0.0.1:7".parse().unwrap());
    let s = Settings::parse_with(
        &text,
        &env,
        &Overrides {
            journal: None,
            ..flags.clone()
        },
    )
    .unwrap();
    assert_eq!(s.journal.dir, PathBuf::from("/env"), "environment over file");
    // Two URLs are Cluster seeds: the shards follow unless configured.
    let cluster = Overrides {
        redis: vec!["redis://a".into(), "redis://b".into()],
        ..Overrides::default()
    };
    let s = Settings::parse_with(DEMO, &no_env, &cluster).unwrap();
    assert!(s.store.redis.cluster);
    assert_eq!(s.store.leases.shards, 16);
    let bad = Overrides {
        redis: vec!["http://a".into()],
        ..Overrides::default()
    };
    let errors = Settings::parse_with(DEMO, &no_env, &bad).unwrap_err().0;
    assert_eq!(errors[0].path, "--redis", "{errors:?}");
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let text = r#"
        [server]
        listen = "nowhere"
        [holds]
        on_expiry = "forget"
        idempotency_window_seconds = 0
        [plans.p]
        draw_order = ["paid", "packs"]
        [plans.p.limits.models.m]
        tokens_per_minute = 2000000000000
        [plans.p.allowance]
        tokens = 0
        period = "fortnight"
        [[prices]]
        id = "v1"
        effective_at = "2026-01-01T00:00:00Z"
        [prices.models.m.tiers.default]
        input = "0.0000001"
        output = "abc"
        [[accounts]]
        id = "a b"
        plan = "missing"
        time_zone = "Mars/Olympus"
        [[admin.certificates]]
        common_name = "alice"
        uri = "spiffe://example.org/alice"
        role = "read"
        [[admin.certificates]]
        role = "read"
        [[admin.certificates]]
        dns_name = " "
        role = "read"
    "#;
    let errors = Settings::parse(text, &no_env).unwrap_err().0;
    let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
    for expected in [
        "server.listen",
        "holds.on_expiry",
        "holds.idempotency_window_seconds",
        "plans.p.allowance.period",
        "plans.p.allowance.tokens",
        "plans.p.draw_order",
        "plans.p.limits.models.m",
        "prices[0].models.m.tiers.default.input",
        "prices[0].models.m.tiers.default.output",
        "accounts[0].id",
        "accounts[0].plan",
        "accounts[0].time_zone",
        "admin.certificates[0]",
        "admin.certificates[1]",
        "admin.certificates[2].dns_name",
    ] {
        assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
    }
}

#[test]
fn syntax_and_unknown_fields_name_the_line() {
    let errors = Settings::parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n", &no_env)
        .unwrap_err()
        .0;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].path, "line 3");
    assert!(errors[0].message.contains("lisen"), "{}", errors[0].message);
}

#[test]
fn environment_overrides_deployment_values() {
    let env = |k: &str| match k {
        "TOLLGATE_USAGE_SINK" => Some("stdout".to_owned()),
        "TOLLGATE_HOLD_TTL_SECONDS" => Some("30".to_owned()),
        _ => None,
    };
    let s = Settings::parse(DEMO, &env).unwrap();
    assert_eq!(s.usage, UsageSinkConfig::Stdout);
    assert_eq!(s.catalog.hold_ttl, SignedDuration::from_secs(30));
    let bad = |k: &str| (k == "TOLLGATE_HOLD_TTL_SECONDS").then(|| "soon".to_owned());
    assert_eq!(
        Settings::parse(DEMO, &bad).unwrap_err().0[0].path,
        "TOLLGATE_HOLD_TTL_SECONDS"
    );
}

#[test]
fn redis_store_settings_with_credentials_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("password");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let text = format!(
        r#"
        [store]
        kind = "redis"
        [store.redis]
        urls = ["rediss://10.0.0.1:6379", "rediss://10.0.0.2:6379"]
        cluster = true
        username = "tollgate"
        password_file = "{}"
        max_clock_skew_ms = 500
        [leases]
        ttl_seconds = 12
        [plans.p]
        on_store_outage = "allowance"
        outage_allowance = "2.50"
        "#,
        secret.display()
    );
    let s = Settings::parse(&text, &no_env).unwrap();
    assert_eq!(s.store.kind, StoreKind::Redis);
    assert!(s.store.redis.cluster);
    let credentials = s.store.redis.credentials.clone().unwrap();
    assert_eq!(credentials.username.as_deref(), Some("tollgate"));
    assert_eq!(
        credentials.password, "s3cret",
        "the trailing newline of a mounted secret is dropped"
    );
    assert!(!format!("{:?}", s.store).contains("s3cret"), "never printed");
    assert_eq!(s.store.leases.ttl, Duration::from_secs(12));
    assert_eq!(s.store.leases.max_clock_skew, Some(Duration::from_millis(500)));
    let plan = &s.catalog.plans[&PlanId::parse("p").unwrap()];
    assert_eq!(plan.on_store_outage, OutagePolicy::Allowance("2.50".parse().unwrap()));
    let env = |k: &str| (k == "TOLLGATE_REDIS_PASSWORD").then(|| "from-env".to_owned());
    let s = Settings::parse(&text, &env).unwrap();
    assert_eq!(s.store.redis.credentials.unwrap().password, "from-env");
}

#[test]
fn bad_store_settings_name_their_fields() {
    let text = r#"
        [store]
        kind = "etcd"
        [store.redis]
        urls = ["http://localhost:6379"]
        deadline_ms = 0
        username = "u"
        password_file = "/nonexistent/password"
        key_prefix = "{x}"
        [leases]
        ttl_seconds = 1
        report_interval_ms = 0
        [plans.a]
        on_store_outage = "maybe"
        [plans.b]
        on_store_outage = "allowance"
        [plans.c]
        outage_allowance = "1"
    "#;
    let errors = Settings::parse(text, &no_env).unwrap_err().0;
    let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
    for expected in [
        "store.kind",
        "store.redis.urls[0]",
        "store.redis.deadline_ms",
        "store.redis.password_file",
        "store.redis.key_prefix",
        "leases.ttl_seconds",
        "leases.report_interval_ms",
        "plans.a.on_store_outage",
        "plans.b.outage_allowance",
        "plans.c.outage_allowance",
    ] {
        assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
    }
    let no_urls = "[store]\nkind = \"redis\"\n";
    let errors = Settings::parse(no_urls, &no_env).unwrap_err().0;
    assert_eq!(errors[0].path, "store.redis.urls");
}

#[test]
fn consumer_groups_are_named_once_each_and_plainly() {
    let good = "[store.redis]\nconsumer_groups = [\"billing\", \"audit\"]\n";
    let s = Settings::parse(good, &no_env).unwrap();
    assert_eq!(s.store.leases.consumer_groups, ["billing", "audit"]);
    let bad = "[store.redis]\nconsumer_groups = [\"billing\", \"\", \"two words\", \"billing\"]\n";
    let errors = Settings::parse(bad, &no_env).unwrap_err().0;
    let messages: Vec<_> = errors
        .iter()
        .filter(|e| e.path == "store.redis.consumer_groups")
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(messages.len(), 3, "{errors:?}");
    assert!(messages[2].contains("named twice"), "{messages:?}");
}

/// Each variable in [`VARIABLES`] is laid over the file, and the flags over
/// it: one order for every setting, decided in `sources.rs`.
#[test]
fn every_variable_beats_the_file_and_loses_to_the_flags() {
    let text = DEMO.replacen("listen = \"127.0.0.1:50051\"", "listen = \"127.0.0.1:1\"", 1);
    assert_ne!(text, DEMO, "the demo sets server.listen");
    let env = |k: &str| match k {
        "TOLLGATE_LISTEN" => Some("127.0.0.1:2".to_owned()),
        "TOLLGATE_ADMIN_LISTEN" => Some("127.0.0.1:3".to_owned()),
        "TOLLGATE_HTTP_LISTEN" => Some("127.0.0.1:4".to_owned()),
        "TOLLGATE_RLS_CONFIG" => Some(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/rls").to_owned()),
        "TOLLGATE_REDIS" => Some("redis://127.0.0.1:5, redis://127.0.0.1:6".to_owned()),
        "TOLLGATE_REDIS_USERNAME" => Some("sidecar".to_owned()),
        "TOLLGATE_REDIS_PASSWORD" => Some("secret".to_owned()),
        _ => None,
    };
    let s = Settings::parse(&text, &env).unwrap();
    assert_eq!(s.listen, "127.0.0.1:2".parse().unwrap());
    assert_eq!(s.admin_listen, "127.0.0.1:3".parse().unwrap());
    assert_eq!(s.http_listen, Some("127.0.0.1:4".parse().unwrap()));
    assert!(s.rls_config_dir.is_some());
    assert_eq!(s.store.kind, StoreKind::Redis);
    assert_eq!(s.store.redis.urls, ["redis://127.0.0.1:5", "redis://127.0.0.1:6"]);
    assert!(s.store.redis.cluster, "two seed URLs are a cluster");
    let credentials = s.store.redis.credentials.as_ref().unwrap();
    assert_eq!(
        (credentials.username.as_deref(), credentials.password.as_str()),
        (Some("sidecar"), "secret")
    );

    let flags = Overrides {
        listen: Some("127.0.0.1:7".parse().unwrap()),
        redis: vec!["redis://127.0.0.1:8".into()],
        ..Overrides::default()
    };
    let s = Settings::parse_with(&text, &env, &flags).unwrap();
    assert_eq!(s.listen, "127.0.0.1:7".parse().unwrap());
    assert_eq!(
        s.admin_listen,
        "127.0.0.1:3".parse().unwrap(),
        "no flag: the variable stands"
    );
    assert_eq!(s.store.redis.urls, ["redis://127.0.0.1:8"]);

    let bad = |k: &str| match k {
        "TOLLGATE_REDIS" => Some("localhost:6379".to_owned()),
        "TOLLGATE_REDIS_CLUSTER" => Some("maybe".to_owned()),
        _ => None,
    };
    let errors = Settings::parse(DEMO, &bad).unwrap_err().0;
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["TOLLGATE_REDIS_CLUSTER", "TOLLGATE_REDIS"], "{errors:?}");
}

/// The README's tables of variables name every one Tollgate reads.
#[test]
fn the_readme_lists_every_variable() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let missing: Vec<&str> = VARIABLES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !readme.lines().any(|l| l.starts_with(&format!("| `{name}`"))))
        .collect();
    assert!(missing.is_empty(), "variables missing from the README: {missing:?}");
}
