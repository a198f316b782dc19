//! What tools and operators see from outside: health and reflection on
//! both listeners, the real binary serving, answering its own client,
//! writing a usage record and stopping cleanly on SIGTERM, and
//! `check-config`.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use support::spawn_app;
use tollgate::proto;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn health(url: &str, service: &str) -> Result<i32, tonic::Code> {
    let mut client = HealthClient::new(channel(url).await);
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| s.code())
}

/// Lists services through one version of server reflection (v1 and
/// v1alpha have the same shape in different modules).
macro_rules! list_services {
    ($version:ident, $url:expr) => {{
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(channel($url).await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("not a service list")
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        names
    }};
}

#[tokio::test]
async fn health_and_reflection_on_both_listeners() {
    let app = spawn_app().await;
    let serving = Ok(ServingStatus::Serving as i32);
    assert_eq!(health(&app.quota_url, "").await, serving);
    assert_eq!(health(&app.quota_url, "tollgate.v1.Quota").await, serving);
    assert_eq!(
        health(&app.quota_url, "tollgate.v1.Admin").await,
        Err(tonic::Code::NotFound)
    );
    assert_eq!(health(&app.admin_url, "tollgate.v1.Admin").await, serving);
    assert_eq!(
        health(&app.admin_url, "tollgate.v1.Quota").await,
        Err(tonic::Code::NotFound)
    );
    let common = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    for (url, own) in [
        (&app.quota_url, "tollgate.v1.Quota"),
        (&app.admin_url, "tollgate.v1.Admin"),
    ] {
        let mut expected: Vec<String> = common.iter().map(|s| s.to_string()).chain([own.to_owned()]).collect();
        expected.sort();
        assert_eq!(list_services!(v1, url), expected);
        assert_eq!(list_services!(v1alpha, url), expected);
    }
    app.shutdown().await;
}

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

fn run(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run tollgate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tollgate serve` on the built-in demo in `dir`, on free ports, with a
/// watchdog that kills it after 60 s whatever the test does.
struct Served {
    child: std::process::Child,
    quota: String,
    admin: String,
    /// What it logged after it listened.
    log: std::sync::Arc<std::sync::Mutex<String>>,
    done: std::sync::mpsc::Sender<()>,
    watchdog: std::thread::JoinHandle<()>,
}

impl Served {
    fn start(dir: &std::path::Path, args: &[&str]) -> Served {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .env_remove("TOLLGATE_CONFIG")
            .env_remove("TOLLGATE_ADMIN_TOKENS_FILE")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tollgate serve");
        let pid = child.id().to_string();
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if finished.recv_timeout(std::time::Duration::from_secs(60)).is_err() {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        });
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (quota, admin) = loop {
            let line = lines.next().expect("serve exited before listening").unwrap();
            let field = |name: &str| {
                line.split(name)
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .map(|a| format!("http://{a}"))
            };
            if let (Some(quota), Some(admin)) = (field("quota="), field("admin=")) {
                break (quota, admin);
            }
        };
        // Keep reading, so the server never blocks on a full pipe.
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let kept = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut log = kept.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Served {
            child,
            quota,
            admin,
            log,
            done,
            watchdog,
        }
    }

    /// Its resident memory, in bytes (from /proc).
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    /// Starts it on `config` written to `dir`.
    fn with_config(dir: &std::path::Path, config: &str) -> Served {
        let path = dir.join("tollgate.toml");
        std::fs::write(&path, config).unwrap();
        Served::start(dir, &["--config", path.to_str().unwrap()])
    }

    /// SIGTERM, without waiting.
    fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// SIGTERM, and how it exited.
    fn stop(mut self) -> std::process::ExitStatus {
        self.terminate();
        let status = self.child.wait().unwrap();
        let _ = self.done.send(());
        let _ = self.watchdog.join();
        status
    }
}

#[test]
fn the_binary_serves_the_demo_answers_its_client_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path(), &[]);
    let url = served.quota.clone();
    let (ok, out, err) = run(dir.path(), &["balance", "--addr", &url, "--account", "demo"]);
    assert!(ok, "{err}");
    assert!(out.contains("paid:           10.000000000000"), "{out}");
    let reserve = [
        "reserve",
        "--addr",
        &url,
        "--account",
        "demo",
        "--request-id",
        "req-1",
        "--model",
        "llama-3.1-8b",
        "--input",
        "1200",
        "--max-output",
        "800",
    ];
    let (ok, out, err) = run(dir.path(), &reserve);
    assert!(
        ok && out.contains("decision:       ALLOW") && out.contains("paid 0.000280000000"),
        "{out}{err}"
    );
    let settle = [
        "settle",
        "--addr",
        &url,
        "--account",
        "demo",
        "--reservation",
        "req-1",
        "--input",
        "1200",
        "--output",
        "350",
    ];
    let (ok, out, err) = run(dir.path(), &settle);
    assert!(ok && out.contains("total:          0.000190000000"), "{out}{err}");
    let (_, out, _) = run(dir.path(), &["balance", "--addr", &url, "--account", "demo"]);
    assert!(out.contains("paid:           9.999810000000"), "{out}");
    let (ok, _, err) = run(
        dir.path(),
        &[
            "settle",
            "--addr",
            &url,
            "--account",
            "demo",
            "--reservation",
            "nope",
            "--input",
            "1",
            "--output",
            "1",
        ],
    );
    assert!(!ok && err.contains("NotFound"), "{err}");

    let exit = served.stop();
    assert!(exit.success(), "tollgate exited with {exit}");
    let usage = std::fs::read_to_string(dir.path().join("tollgate-usage.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = usage.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["total_money"], "0.000190000000");
    assert_eq!(records[0]["charges"][0]["source"], "paid");
}

#[test]
fn check_config_accepts_the_example_and_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tollgate.toml");
    let (ok, out, _) = run(dir.path(), &["check-config", example]);
    assert!(ok, "{out}");
    assert!(out.contains("ok (3 plans, 1 price versions, 3 accounts)"), "{out}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[holds]\non_expiry = \"never\"\n[[accounts]]\nid = \"x\"\nplan = \"nope\"\n",
    )
    .unwrap();
    let (ok, _, err) = run(dir.path(), &["check-config", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("2 configuration error(s)"), "{err}");
    assert!(
        err.contains("holds.on_expiry") && err.contains("accounts[0].plan"),
        "{err}"
    );
    let (ok, _, err) = run(dir.path(), &["check-config", "/nonexistent.toml"]);
    assert!(!ok && err.contains("nonexistent"), "{err}");
}

/// A file that names the Redis store and leaves its URLs to the command
/// line is checked, and served, with the flags over it: `check-config`
/// takes `serve`'s flags, and its advice names one it accepts.
#[test]
fn check_config_applies_the_flags_serve_would_be_given() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tollgate.toml")).unwrap();
    let redis = example.replacen("kind = \"memory\"", "kind = \"redis\"", 1);
    assert_ne!(redis, example);
    let path = dir.path().join("redis.toml");
    std::fs::write(&path, redis).unwrap();
    let file = path.to_str().unwrap();
    let (ok, _, err) = run(dir.path(), &["check-config", file]);
    assert!(
        !ok && err.contains("store.redis.urls") && err.contains("--redis URL"),
        "{err}"
    );
    let (ok, out, err) = run(dir.path(), &["check-config", file, "--redis", "redis://127.0.0.1:6390"]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = run(dir.path(), &["check-config", file, "--redis", "http://127.0.0.1:6390"]);
    assert!(
        !ok && err.contains("--redis") && err.contains("must start with redis://"),
        "{err}"
    );
}

#[tokio::test]
async fn the_data_plane_also_listens_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tollgate.sock");
    let admin_socket = dir.path().join("admin.sock");
    let config = format!(
        "{}\n",
        support::CONFIG.replacen(
            "[server]\n",
            &format!(
                "[server]\nmax_connections = 4\nfirst_bytes_timeout_ms = 1500\nlisten_unix = \"{}\"\n\
                 admin_listen_unix = \"{}\"\n",
                socket.display(),
                admin_socket.display()
            ),
            1
        )
    );
    let app = support::spawn_app_with(&config).await;
    let target = format!("unix:{}", socket.display());
    let channel = tollgate::transport::channel::connect(&target).await.unwrap();
    let mut quota = tollgate::proto::quota_client::QuotaClient::new(channel.clone());
    let r = quota
        .reserve(support::reserve("rich", "over-uds", 10, 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, tollgate::proto::Decision::Allow as i32);
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tollgate.v1.Quota".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // The admin API has a socket of its own; the data plane's does not
    // serve it.
    let on_admin_socket = format!("unix:{}", admin_socket.display());
    let mut admin = support::admin_client(&on_admin_socket, Some(support::READ_TOKEN)).await;
    let detail = admin
        .get_account(tollgate::proto::GetAccountRequest {
            account_id: "rich".into(),
        })
        .await
        .unwrap();
    assert_eq!(detail.into_inner().account_id, "rich");
    let mut wrong = support::admin_client(&target, Some(support::READ_TOKEN)).await;
    let refused = wrong
        .get_account(tollgate::proto::GetAccountRequest {
            account_id: "rich".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented);
    // Only the owner and its group may connect, whatever the umask; and
    // connections are capped as on TCP (`server.max_connections`), one cap
    // for the plane's TCP port and socket together.
    for path in [&socket, &admin_socket] {
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions());
        assert_eq!(mode & 0o777, tollgate::app::server::SOCKET_MODE, "{}", path.display());
    }
    let silent = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut silent_tcp = Vec::new();
    for _ in 0..2 {
        let addr = app.quota_url.trim_start_matches("http://");
        silent_tcp.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut over = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut over, &mut [0u8; 64]),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "a connection over the cap is closed at once: {read:?}"
    );
    // A connection that never sends the HTTP/2 preface is closed at
    // `first_bytes_timeout_ms`, as on TCP: it does not keep its place
    // (what the server sent first, its SETTINGS, is read on the way).
    let closed = |mut connection: Box<dyn tokio::io::AsyncRead + Unpin + Send>| async move {
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_to_end(&mut connection, &mut Vec::new()),
        )
        .await;
        assert!(read.is_ok(), "a silent connection is closed: {read:?}");
    };
    closed(Box::new(silent)).await;
    for connection in silent_tcp {
        closed(Box::new(connection)).await;
    }
    let again = tollgate::transport::channel::connect(&target).await.unwrap();
    let r = tollgate::proto::quota_client::QuotaClient::new(again)
        .reserve(support::reserve("rich", "after-the-cap", 10, 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, tollgate::proto::Decision::Allow as i32);
    app.shutdown().await;
    assert!(!socket.exists(), "the socket file is removed at shutdown");
    assert!(!admin_socket.exists(), "so is the admin socket");
}

/// A socket an earlier run left is replaced; any other file at the socket
/// path is left alone and the start refused with a clear error.
#[tokio::test]
async fn a_file_that_is_not_a_socket_is_never_replaced_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.sock");
    std::fs::write(&path, "keep me\n").unwrap();
    let config = support::CONFIG.replacen(
        "[server]\n",
        &format!("[server]\nlisten_unix = \"{}\"\n", path.display()),
        1,
    );
    let (settings, _dir, _) = support::settings(&config);
    let clock = std::sync::Arc::new(tollgate::clock::ManualClock::new(
        "2026-03-10T12:00:00Z".parse().unwrap(),
    ));
    let refused = tollgate::app::server::App::build(settings, clock)
        .await
        .err()
        .expect("refused");
    assert!(format!("{refused:#}").contains("not a socket"), "{refused:#}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me\n");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "nothing else left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_drives_tollgate_and_the_baseline_over_tcp_and_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tollgate.sock");
    let config = support::CONFIG.replacen(
        "[server]\n",
        &format!("[server]\nlisten_unix = \"{}\"\n", socket.display()),
        1,
    );
    let app = support::spawn_app_with(&config).await;
    let baseline_socket = dir.path().join("baseline.sock");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baseline_url = format!("http://{}", tcp.local_addr().unwrap());
    let unix = tokio::net::UnixListener::bind(&baseline_socket).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let baseline = tokio::spawn(tollgate::cli::loadgen::serve_baseline(tcp, Some(unix), async {
        let _ = stopped.await;
    }));
    let mut written = 0;
    for (run, target) in [
        app.quota_url.clone(),
        format!("unix:{}", socket.display()),
        baseline_url.clone(),
        format!("unix:{}", baseline_socket.display()),
    ]
    .into_iter()
    .enumerate()
    {
        let spec = tollgate::cli::loadgen::Spec {
            target: target.clone(),
            connections: 4,
            duration: std::time::Duration::from_secs(30),
            calls: Some(200),
            accounts: vec!["rich".into(), "limited".into()],
            mix: tollgate::cli::loadgen::Mix::Hot(0.9),
            model: "m".into(),
            rls_domain: None,
            progress: false,
        };
        let report = tollgate::cli::loadgen::run(&spec).await.unwrap();
        assert_eq!(report.errors, 0, "{target}");
        assert!(report.calls >= 200, "{target}: {} calls", report.calls);
        let l = report.latency_us;
        assert!(l.p50 <= l.p99 && l.p99 <= l.max, "{target}: {l:?}");
        if run < 2 {
            // Each run makes requests of its own: a second run in the same
            // process is charged anew, not answered as a retry of the first.
            let records = app.records(written + 1).await.len();
            let added = records - written;
            assert!(
                added as u64 * 4 >= report.calls,
                "run {run}: {} calls added only {added} usage records",
                report.calls
            );
            written = records;
        }
    }
    // The baseline answers Envoy's rate-limit API too: the floor there.
    let spec = tollgate::cli::loadgen::Spec {
        target: baseline_url,
        connections: 2,
        duration: std::time::Duration::from_secs(30),
        calls: Some(100),
        accounts: vec!["key-1".into()],
        mix: tollgate::cli::loadgen::Mix::Uniform,
        model: String::new(),
        rls_domain: Some("inference".into()),
        progress: false,
    };
    let report = tollgate::cli::loadgen::run(&spec).await.unwrap();
    assert_eq!(report.errors, 0, "ShouldRateLimit on the baseline");
    assert!(report.calls >= 100, "{} calls", report.calls);
    // The command line, with a Zipf spread over a range of accounts (those
    // that do not exist are denied: answers, not errors).
    let target = app.quota_url.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["loadgen", "--target", &target, "--connections", "2", "--calls", "100"])
            .args([
                "--accounts",
                "rich,limited,tenant-{1..1000}",
                "--zipf",
                "1",
                "--model",
                "m",
                "--quiet",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["calls"].as_u64() >= Some(100), "{report}");
    assert_eq!(report["errors"].as_u64(), Some(0), "{report}");
    let _ = stop.send(());
    baseline.await.unwrap().unwrap();
    app.shutdown().await;
}

/// `tollgate admin ARGS` against `addr`, presenting the token in
/// `token_file` (if any): exit code, stdout, stderr.
fn admin(dir: &std::path::Path, addr: &str, token_file: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    command
        .arg("admin")
        .args(args)
        .current_dir(dir)
        .env("TOLLGATE_ADMIN_ADDR", addr)
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .env_remove("TOLLGATE_ADMIN_TOKEN_FILE");
    if let Some(file) = token_file {
        command.env("TOLLGATE_ADMIN_TOKEN_FILE", file);
    }
    let out = command.output().expect("run tollgate admin");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tollgate admin ARGS` as [`admin`] runs it, which must succeed: what it
/// printed, as JSON.
fn admin_json(dir: &std::path::Path, addr: &str, token_file: Option<&str>, args: &[&str]) -> serde_json::Value {
    let (code, out, err) = admin(dir, addr, token_file, args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("JSON")
}

#[test]
fn the_admin_cli_operates_a_running_tollgate_with_tokens_it_made() {
    let dir = tempfile::tempdir().unwrap();
    // Two tokens made by the CLI: the token on stdout, its entry on stderr.
    let mut entries = String::new();
    for (operator, role, file) in [
        ("ops@example", "write", "write.token"),
        ("auditor", "read", "read.token"),
    ] {
        let (code, token, entry) = admin(dir.path(), "", None, &["token", "--operator", operator, "--role", role]);
        assert_eq!(code, 0, "{entry}");
        assert!(
            token.trim().starts_with("tg_") && !entry.contains(token.trim()),
            "{entry}"
        );
        let path = dir.path().join(file);
        std::fs::write(&path, token.trim()).unwrap();
        // As `umask 077` leaves it: a token file others may read is refused.
        let (code, _, err) = admin(dir.path(), "http://127.0.0.1:1", Some(file), &["accounts", "list"]);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("its group or others may read or change it (mode 644)"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        entries +=
            &entry[entry.find("[[admin.tokens]]").expect("an entry")..].replace("[[admin.tokens]]", "[[tokens]]");
    }
    std::fs::write(dir.path().join("tokens.toml"), &entries).unwrap();
    // Whoever may change the tokens file may let in a token of their own.
    let tokens = dir.path().join("tokens.toml");
    std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    std::fs::write(
        dir.path().join("tokens-check.toml"),
        "[admin]\ntokens_file = \"tokens.toml\"\n",
    )
    .unwrap();
    let (ok, _, err) = run(dir.path(), &["check-config", "tokens-check.toml"]);
    assert!(
        !ok && err.contains("its group or others may change it (mode 666)"),
        "{err}"
    );
    std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let served = Served::start(dir.path(), &["--admin-tokens", "tokens.toml"]);
    let addr = served.admin.clone();
    let (write, read) = (Some("write.token"), Some("read.token"));
    let d = dir.path();
    let top_up = [
        "topup",
        "demo",
        "--id",
        "inv-1",
        "--reason",
        "invoice 1",
        "--amount",
        "5",
        "--json",
    ];
    let detail = admin_json(d, &addr, write, &top_up);
    assert_eq!(detail["balance"]["paid"], "15.000000000000");
    // A retry applies nothing; the same id for another amount is refused.
    let (code, out, _) = admin(d, &addr, write, &top_up);
    assert_eq!(code, 0);
    assert!(out.contains("\"paid\":\"15.000000000000\""), "{out}");
    let mut other = top_up;
    other[7] = "6";
    assert_eq!(admin(d, &addr, write, &other).0, 4);
    // Exit codes a script can rely on.
    assert_eq!(
        admin(d, &addr, write, &["suspend", "ghost", "--id", "s1", "--reason", "r"]).0,
        3
    );
    assert_eq!(admin(d, &addr, None, &["accounts", "show", "demo"]).0, 5);
    assert_eq!(
        admin(d, &addr, read, &["suspend", "demo", "--id", "s1", "--reason", "r"]).0,
        5
    );
    assert_eq!(
        admin(
            d,
            &addr,
            write,
            &["adjust", "demo", "--id", "a1", "--reason", "r", "--amount", "1.2.3"]
        )
        .0,
        2
    );
    assert_eq!(
        admin(d, "http://127.0.0.1:1", write, &["accounts", "show", "demo"]).0,
        6
    );
    // The read role reads: a table by default.
    let (code, out, err) = admin(d, &addr, read, &["accounts", "show", "demo"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().eq(["paid", "15.000000000000"])),
        "{out}"
    );
    let (code, out, _) = admin(d, &addr, read, &["accounts", "list", "--json"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"account_ids\":[") && out.contains("\"demo\""), "{out}");
    // Limits, holds and prices.
    let set_limit = [
        "set-limit",
        "demo",
        "--id",
        "l1",
        "--reason",
        "abuse",
        "--scope",
        "model:llama-3.1-8b",
        "--rpm",
        "60",
    ];
    let (code, _, err) = admin(d, &addr, write, &set_limit);
    assert_eq!(code, 0, "{err}");
    // Budgets: a key's and a project's, edited one at a time.
    let set_budget = |id: &str, rest: &[&str]| {
        let mut args = vec!["set-budget", "demo", "--id", id, "--reason", "cap"];
        args.extend_from_slice(rest);
        admin(d, &addr, write, &args)
    };
    let (code, _, err) = set_budget("b1", &["--api-key", "k1", "--money", "2.50", "--period", "day"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = set_budget("b2", &["--project", "team", "--keys", "k2,k3", "--tokens", "1000"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = set_budget("b3", &["--api-key", "k4", "--tokens", "5", "--period", "week"]);
    assert_eq!(code, 2, "an unknown period is bad input: {err}");
    assert!(err.contains("budgets.api_keys.k4.period"), "{err}");
    let shown = admin_json(d, &addr, read, &["accounts", "show", "demo", "--json"]);
    let budgets = shown["budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 2, "{shown}");
    assert_eq!(
        (
            budgets[0]["id"].as_str(),
            budgets[0]["period"].as_str(),
            budgets[0]["money_limit"].as_str()
        ),
        (Some("k1"), Some("day"), Some("2.500000000000"))
    );
    assert_eq!(
        (budgets[1]["scope"].as_str(), budgets[1]["tokens_limit"].as_u64()),
        (Some("project"), Some(1000))
    );
    assert_eq!(shown["projects"]["team"], serde_json::json!(["k2", "k3"]));
    let (code, out, _) = admin(d, &addr, read, &["accounts", "show", "demo"]);
    assert_eq!(code, 0);
    assert!(
        out.lines().any(|l| l
            .split_whitespace()
            .take(6)
            .eq(["project", "team", "month", "0", "of", "1000"])),
        "{out}"
    );
    let (code, _, err) = set_budget("b4", &["--api-key", "k1", "--clear"]);
    assert_eq!(code, 0, "{err}");
    let shown = admin_json(d, &addr, read, &["accounts", "show", "demo", "--json"]);
    assert_eq!(shown["budgets"].as_array().unwrap().len(), 1, "{shown}");
    let (code, out, _) = admin(d, &addr, read, &["holds", "list", "demo", "--json"]);
    assert_eq!((code, out.trim()), (0, "[]"));
    std::fs::write(
        d.join("prices.toml"),
        "[[prices]]\nid = \"2031-01\"\neffective_at = \"2031-01-01T00:00:00Z\"\n\n\
         [prices.models.\"llama-3.1-8b\".tiers.default]\ninput = \"0.08\"\noutput = \"0.16\"\n",
    )
    .unwrap();
    let publish = [
        "prices",
        "publish",
        "--file",
        "prices.toml",
        "--id",
        "list-2031",
        "--reason",
        "2031 list",
    ];
    let (code, out, err) = admin(d, &addr, write, &publish);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("published 2031-01"), "{out}");
    let list = admin_json(d, &addr, read, &["prices", "list", "--json"]);
    let future = list["prices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["version"] == "2031-01")
        .expect("listed");
    assert_eq!(
        (future["input_per_million"].as_str(), future["in_force"].as_bool()),
        (Some("0.080000000000"), Some(false))
    );
    assert_eq!(admin(d, &addr, write, &publish).0, 0, "a retry is answered again");
    let text = std::fs::read_to_string(d.join("prices.toml")).unwrap();
    std::fs::write(d.join("prices.toml"), text.replace("0.16", "0.20")).unwrap();
    assert_eq!(admin(d, &addr, write, &publish).0, 4, "published versions never change");
    // A charge, then its refund from the record as the usage file has it.
    let quota = served.quota.clone();
    let charge = [
        "reserve",
        "--addr",
        &quota,
        "--account",
        "demo",
        "--request-id",
        "q-1",
        "--model",
        "llama-3.1-8b",
    ];
    let (ok, _, err) = run(d, &[&charge[..], &["--input", "1000", "--max-output", "500"]].concat());
    assert!(ok, "{err}");
    let settle = ["settle", "--addr", &quota, "--account", "demo", "--reservation", "q-1"];
    let (ok, _, err) = run(d, &[&settle[..], &["--input", "1000", "--output", "500"]].concat());
    assert!(ok, "{err}");
    let line = (0..100)
        .find_map(|_| {
            let text = std::fs::read_to_string(d.join("tollgate-usage.jsonl")).unwrap_or_default();
            let found = text.lines().find(|l| l.contains("\"q-1\"")).map(str::to_owned);
            if found.is_none() {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            found
        })
        .expect("the record in the usage file");
    std::fs::write(d.join("record.json"), &line).unwrap();
    let refund = [
        "refund",
        "demo",
        "--record",
        "record.json",
        "--id",
        "ref-q-1",
        "--reason",
        "complaint",
        "--json",
    ];
    let detail = admin_json(d, &addr, write, &refund);
    assert_eq!(
        detail["balance"]["paid"], "15.000000000000",
        "back to before the charge"
    );
    let mut again = refund;
    again[5] = "ref-q-2";
    assert_eq!(admin(d, &addr, write, &again).0, 4, "a record is refunded once");
    let status = served.stop();
    assert!(status.success(), "{status:?}");
}

#[test]
fn sighup_reloads_the_configuration_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tollgate.toml")).unwrap();
    // Polling off: only the signal reloads.
    let config = demo.replacen("reload_poll_ms = 2000\n", "reload_poll_ms = 0\n", 1);
    assert_ne!(config, demo, "the demo sets reload_poll_ms");
    std::fs::write(d.join("tollgate.toml"), &config).unwrap();
    support::write_tokens_file(d);
    std::fs::write(d.join("read.token"), support::READ_TOKEN).unwrap();
    std::fs::set_permissions(
        d.join("read.token"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let served = Served::start(d, &["--config", "tollgate.toml", "--admin-tokens", "admin-tokens.toml"]);
    let versions = || {
        let list = admin_json(d, &served.admin, Some("read.token"), &["prices", "list", "--json"]);
        let mut ids: Vec<String> = list["prices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["version"].as_str().unwrap().to_owned())
            .collect();
        ids.dedup();
        ids
    };
    assert_eq!(versions(), ["2026-01"]);
    let next = format!(
        "{config}\n[[prices]]\nid = \"2031-01\"\neffective_at = \"2031-01-01T00:00:00Z\"\n\
         [prices.models.\"llama-3.1-8b\".tiers.default]\ninput = \"0.08\"\noutput = \"0.16\"\n"
    );
    std::fs::write(d.join("tollgate.toml"), next).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(versions(), ["2026-01"], "no reload without the signal");
    let pid = served.child.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = versions();
        if seen.len() == 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(seen, ["2026-01", "2031-01"]);
    // A price version the file published leaves a trace on the audit log.
    let mut audited = false;
    for _ in 0..100 {
        let log = served.log.lock().unwrap().clone();
        audited = log
            .lines()
            .any(|l| l.contains("price versions published by a reload") && l.contains("2031-01"));
        if audited {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(audited, "{}", served.log.lock().unwrap());
    let status = served.stop();
    assert!(status.success(), "SIGHUP must not stop the server: {status:?}");
    // And the reload is an operator's change like any other: one audit
    // record in the usage sink, with what it changed.
    let usage = std::fs::read_to_string(d.join("tollgate-usage.jsonl")).unwrap();
    let reloads: Vec<serde_json::Value> = usage
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "audit" && r["operation"] == "reload")
        .collect();
    assert_eq!(reloads.len(), 1, "{usage}");
    let reload = &reloads[0];
    assert_eq!(reload["operator"], "configuration file");
    assert_eq!(reload["reason"], "SIGHUP");
    assert!(reload["peer"].as_str().unwrap().ends_with("tollgate.toml"), "{reload}");
    assert_eq!(reload["adjustment_id"].as_str().unwrap().len(), 32, "{reload}");
    assert_eq!(reload["before"]["price_versions"], serde_json::json!(["2026-01"]));
    assert_eq!(
        reload["after"]["price_versions"],
        serde_json::json!(["2026-01", "2031-01"])
    );
    assert_ne!(reload["before"]["configuration"], reload["after"]["configuration"]);
    assert_eq!(reload["before"]["plans"], reload["after"]["plans"], "no plan changed");
}

/// A health Watch on `url` that has seen SERVING.
async fn watching(url: &str) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let mut client = HealthClient::new(channel(url).await);
    let mut watch = client
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    watch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_health_watch_cannot_hold_shutdown_and_a_second_signal_hurries_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tollgate.toml")).unwrap();
    let short = dir.path().join("short-grace.toml");
    std::fs::write(
        &short,
        demo.replace("shutdown_grace_seconds = 20", "shutdown_grace_seconds = 1"),
    )
    .unwrap();
    // An open Watch stream never finishes by itself: the process stops at
    // the end of its grace period all the same, cleanly, and the watcher
    // hears NOT_SERVING first.
    let served = Served::start(dir.path(), &["--config", short.to_str().unwrap()]);
    let mut watch = watching(&served.quota).await;
    let status = tokio::task::spawn_blocking(move || served.stop()).await.unwrap();
    assert!(status.success(), "{status}");
    let mut heard = Vec::new();
    while let Ok(Some(message)) = watch.message().await {
        heard.push(message.status);
    }
    assert!(heard.contains(&(ServingStatus::NotServing as i32)), "{heard:?}");
    // With the default 20 s grace and a Watch open, a second SIGTERM ends
    // the grace period at once, and the drain goes on to a clean stop (the
    // usage sink flushed): it no longer exits on the spot.
    let served = Served::start(dir.path(), &[]);
    let _watch = watching(&served.quota).await;
    let log = std::sync::Arc::clone(&served.log);
    served.terminate();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let status = tokio::task::spawn_blocking(move || served.stop()).await.unwrap();
    assert!(status.success(), "{status}");
    let log = log.lock().unwrap().clone();
    assert!(log.contains("in-flight calls dropped at a second signal"), "{log}");
    assert!(log.contains("stopped"), "{log}");
}

/// An HPACK bomb on both Unix sockets, before any token is checked: a
/// header block that adds one 4,000-octet value to the dynamic table, then
/// refers to it 60,000 times (240 MB once decoded). The connection is
/// refused, the process's resident memory stays within 32 MiB of where it
/// was, and the data plane still answers on its socket.
#[test]
fn an_hpack_bomb_on_the_unix_sockets_is_refused_and_memory_stays_bounded() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (data, admin) = (dir.path().join("quota.sock"), dir.path().join("admin.sock"));
    let sockets = format!(
        "[server]\nlisten_unix = \"{}\"\nadmin_listen_unix = \"{}\"\n",
        data.display(),
        admin.display()
    );
    let served = Served::with_config(dir.path(), &support::CONFIG.replacen("[server]\n", &sockets, 1));
    let rss = || served.rss();
    let before = rss();
    let mut block = vec![0x40, 0x01, b'x', 0x7f, 0xa1, 0x1e];
    block.extend(std::iter::repeat_n(b'a', 4_000));
    block.extend(std::iter::repeat_n(0xbe, 60_000));
    let len = block.len().to_be_bytes();
    let mut bomb = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bomb.extend([0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // an empty SETTINGS frame
    bomb.extend([len[5], len[6], len[7], 0x1, 0x4 | 0x1, 0, 0, 0, 1]); // HEADERS, stream 1
    bomb.extend(&block);
    for socket in [&data, &admin] {
        let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&bomb);
        let mut rest = Vec::new();
        let closed = s.read_to_end(&mut rest);
        assert!(closed.is_ok(), "the connection is closed, not left hanging: {closed:?}");
    }
    let grown = rss().saturating_sub(before);
    eprintln!(
        "resident memory {} MiB before, grown by {} KiB",
        before >> 20,
        grown >> 10
    );
    assert!(grown < 32 << 20, "resident memory grew by {} MiB", grown >> 20);
    let target = format!("unix:{}", data.display());
    let reserve = [
        "reserve",
        "--addr",
        &target,
        "--account",
        "rich",
        "--request-id",
        "after-the-bomb",
        "--model",
        "m",
        "--input",
        "10",
        "--max-output",
        "10",
    ];
    let (ok, out, err) = run(dir.path(), &reserve);
    assert!(ok && out.contains("decision:       ALLOW"), "{out}{err}");
    assert!(served.stop().success());
}

/// Opens `streams` calls of `path` on one connection to `url`, each with a
/// gRPC message announced at `announced` bytes of which `sent` are sent,
/// and never finished. Returns what each was answered (once the server
/// gives up on it), in the order they were answered.
async fn half_sent(
    url: &str,
    path: &str,
    streams: usize,
    announced: u32,
    sent: usize,
) -> tokio::task::JoinHandle<Vec<Option<String>>> {
    let tcp = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut answers = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let request = support::grpc_post(url, path);
        client = client.ready().await.unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        let mut bytes = vec![0u8];
        bytes.extend(announced.to_be_bytes());
        bytes.resize(5 + sent, 0);
        body.reserve_capacity(bytes.len());
        body.send_data(bytes.into(), false).unwrap();
        answers.spawn(async move {
            let _keep_open = body;
            let response = response.await.ok()?;
            let status = response.headers().get("grpc-status").cloned();
            let mut body = response.into_body();
            while body.data().await.is_some() {}
            let trailers = body.trailers().await.ok().flatten();
            status
                .or_else(|| trailers.and_then(|t| t.get("grpc-status").cloned()))
                .map(|v| v.to_str().unwrap().to_owned())
        });
    }
    tokio::spawn(async move { answers.join_all().await })
}

/// Streams that send half a message and stall hold their buffers only
/// until the call deadline (`server.call_timeout_ms`), then are answered
/// DEADLINE_EXCEEDED; meanwhile the process's memory stays within the
/// stated bound per connection (128 streams, each with at most a
/// message's bytes: [`PER_QUOTA_CONNECTION`], [`PER_RLS_CONNECTION`]) and
/// a legitimate call is answered at once. Health checks, which need no
/// credential on either plane, are bounded the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_streams_are_let_go_at_the_call_deadline_and_memory_stays_bounded() {
    const CONNECTIONS: usize = 4;
    const STREAMS: usize = tollgate::app::server::MAX_STREAMS_PER_CONNECTION as usize;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("inference.yaml"),
        "domain: inference\ndescriptors: []\n",
    )
    .unwrap();
    let config = format!(
        "{}\n[rls]\nconfig_dir = \"{}\"\n",
        support::CONFIG.replacen("[server]\n", "[server]\ncall_timeout_ms = 5000\n", 1),
        dir.path().display()
    );
    let served = Served::with_config(dir.path(), &config);
    let started = std::time::Instant::now();
    let settle = || tokio::time::sleep(std::time::Duration::from_millis(500));
    let mut held = Vec::new();
    let mut grown = Vec::new();
    // Health checks need no credential, on either plane.
    const HEALTH: &str = "/grpc.health.v1.Health/Check";
    for (url, path, connections, message) in [
        (
            &served.quota,
            "/tollgate.v1.Quota/Reserve",
            CONNECTIONS,
            tollgate::app::server::MAX_QUOTA_MESSAGE,
        ),
        (
            &served.quota,
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
            1,
            tollgate::app::server::MAX_RLS_MESSAGE,
        ),
        (&served.admin, HEALTH, 1, tollgate::app::server::MAX_PROBE_MESSAGE),
        (&served.quota, HEALTH, 1, tollgate::app::server::MAX_PROBE_MESSAGE),
    ] {
        let before = served.rss();
        for _ in 0..connections {
            held.push(half_sent(url, path, STREAMS, message as u32, message - 1).await);
        }
        settle().await;
        let per_connection = served.rss().saturating_sub(before) / connections as u64;
        eprintln!(
            "{url}{path}: {connections} x {STREAMS} half-sent streams of {message} bytes: resident memory {} \
             MiB before, grown by {} KiB a connection",
            before >> 20,
            per_connection >> 10,
        );
        grown.push(per_connection);
    }
    let mut quota = proto::quota_client::QuotaClient::new(channel(&served.quota).await);
    let allowed = quota
        .reserve(support::reserve("rich", "while-held", 10, 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allowed.decision, proto::Decision::Allow as i32);
    let answered_while_held = started.elapsed();
    let mut answers = Vec::new();
    for streams in held {
        // Each is let go at the deadline (5 s), or never: not waited for
        // past a margin.
        let answered = tokio::time::timeout(std::time::Duration::from_secs(30), streams).await;
        answers.extend(
            answered
                .expect("half-sent calls are let go at the call deadline")
                .unwrap(),
        );
    }
    eprintln!(
        "a reserve answered {answered_while_held:?} in; all let go {:?} in",
        started.elapsed()
    );
    assert!(grown[0] < PER_QUOTA_CONNECTION, "{} KiB a connection", grown[0] >> 10);
    assert!(grown[1] < PER_RLS_CONNECTION, "{} KiB a connection", grown[1] >> 10);
    for health in &grown[2..] {
        assert!(*health < PER_QUOTA_CONNECTION, "{} KiB a connection", health >> 10);
    }
    let deadline_exceeded = (tonic::Code::DeadlineExceeded as i32).to_string();
    assert_eq!(answers.len(), (CONNECTIONS + 3) * STREAMS);
    assert!(
        answers.iter().all(|a| a.as_deref() == Some(deadline_exceeded.as_str())),
        "every stalled call ends DEADLINE_EXCEEDED: {:?}",
        answers
            .iter()
            .find(|a| a.as_deref() != Some(deadline_exceeded.as_str()))
    );
    assert!(served.stop().success());
}

/// What one connection of half-sent `Quota` streams may hold.
const PER_QUOTA_CONNECTION: u64 = 8 << 20;
/// What one connection of half-sent `ShouldRateLimit` streams may hold.
const PER_RLS_CONNECTION: u64 = 24 << 20;

/// Starts `tollgate serve` under `ulimit` (a shell's `ulimit` arguments)
/// with `config`; once it listens, returns its soft open-file limit and
/// what it logged, and stops it.
fn serve_under_ulimit(ulimit: &str, config: &str) -> (u64, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit {ulimit} && exec \"$0\" serve --config \"$1\""))
        .arg(BIN)
        .arg(&path)
        .current_dir(dir.path())
        .env_remove("TOLLGATE_CONFIG")
        .env_remove("TOLLGATE_ADMIN_TOKENS_FILE")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| drop(tx.send(l))));
    let mut log = String::new();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // Everything up to the listening line, and what follows it for a moment.
    while let Ok(line) = rx.recv_timeout(until.saturating_duration_since(std::time::Instant::now())) {
        let listening = line.contains("tollgate listening");
        log.push_str(&line);
        log.push('\n');
        if listening {
            log.extend(
                std::iter::from_fn(|| rx.recv_timeout(std::time::Duration::from_millis(700)).ok()).map(|l| l + "\n"),
            );
            break;
        }
    }
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .parse()
        .unwrap();
    (soft, log)
}

/// An admin API reachable beyond loopback without TLS sends its bearer
/// tokens in the clear: the start says so; on loopback it does not.
#[test]
fn an_admin_listener_beyond_loopback_without_tls_is_warned_of() {
    const WARNING: &str = "the admin API listens beyond loopback without TLS";
    let open = support::CONFIG.replacen("admin_listen = \"127.0.0.1:0\"", "admin_listen = \"0.0.0.0:0\"", 1);
    assert_ne!(open, support::CONFIG);
    let (_, log) = serve_under_ulimit("-Sn 1024", &open);
    assert!(log.contains("tollgate listening") && log.contains(WARNING), "{log}");
    let (_, log) = serve_under_ulimit("-Sn 1024", support::CONFIG);
    assert!(log.contains("tollgate listening") && !log.contains(WARNING), "{log}");
}

/// Clients filling the connection caps must not leave the process without
/// descriptors: the soft open-file limit is raised to what the caps need
/// (up to the hard limit), and a hard limit below it is reported.
#[test]
fn the_open_file_limit_is_raised_to_what_the_connection_caps_need_or_reported() {
    let small = support::CONFIG.replacen("[server]\n", "[server]\nmax_connections = 16\n", 1);
    let (soft, log) = serve_under_ulimit("-Sn 64 && ulimit -Hn 1024", &small);
    assert!(log.contains("tollgate listening"), "{log}");
    // Two planes of 16 (each with its TCP port and sockets), and 256 for
    // everything else.
    assert_eq!(soft, 2 * 16 + 256, "{log}");
    assert!(!log.contains("open-file limit"), "{log}");
    // The default caps (10,000 a listener) do not fit under 1,024.
    let (soft, log) = serve_under_ulimit("-Sn 64 && ulimit -Hn 1024", support::CONFIG);
    assert_eq!(soft, 1024, "raised as far as it goes: {log}");
    assert!(
        log.contains("the open-file limit is below what the connection caps allow"),
        "{log}"
    );
}

/// A flood of one-pico charges (which no request limit counts) grows the
/// process by what the per-account budgets allow (4,096 full answers and
/// 16-byte fingerprints for the rest), not by an answer per call, and
/// legitimate calls are answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_cheap_charges_keeps_memory_within_the_budgets() {
    const CHARGES: usize = 30_000;
    const WORKERS: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let served = Served::with_config(dir.path(), support::CONFIG);
    let quota = proto::quota_client::QuotaClient::new(channel(&served.quota).await);
    let flood = |from: usize, to: usize| {
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..WORKERS {
            let mut quota = quota.clone();
            tasks.spawn(async move {
                for i in (from + worker..to).step_by(WORKERS) {
                    let charge = proto::ChargeRequest {
                        account_id: "rich".into(),
                        request_id: format!("flood-{i}"),
                        charge: Some(proto::charge_request::Charge::Amount(support::money("0.000000000001"))),
                        ..Default::default()
                    };
                    quota.charge(charge).await.unwrap();
                }
            });
        }
        tasks.join_all()
    };
    // The first answers, connections and buffers: not what is measured.
    flood(0, 3_000).await;
    let before = served.rss();
    flood(3_000, 3_000 + CHARGES).await;
    let grown = served.rss().saturating_sub(before);
    let mut legitimate = quota.clone();
    let allowed = legitimate
        .reserve(support::reserve("rich", "after-the-flood", 10, 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allowed.decision, proto::Decision::Allow as i32);
    eprintln!(
        "{CHARGES} one-pico charges: resident memory {} MiB before, grown by {} KiB ({} bytes a charge)",
        before >> 20,
        grown >> 10,
        grown / CHARGES as u64
    );
    // 4,096 answers of about 760 bytes, and 16 bytes for each other id.
    assert!(grown < 8 << 20, "resident memory grew by {} MiB", grown >> 20);
    assert!(served.stop().success());
}

/// lib.rs's module map names every module the crate declares, so the
/// tree can be read from it.
#[test]
fn the_module_map_names_every_module() {
    let lib = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/lib.rs")).unwrap();
    let map: String = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let unnamed: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';'))
        .chain(lib.contains("pub mod proto {").then_some("proto"))
        .filter(|m| !map.contains(&format!("[`{m}`]")))
        .collect();
    assert!(unnamed.is_empty(), "modules missing from lib.rs's map: {unnamed:?}");
}

/// The modules a map (the `//! - [`name`]` lines of `map`) lists, in order.
fn listed(map: &str) -> Vec<String> {
    std::fs::read_to_string(map)
        .unwrap()
        .lines()
        .filter_map(|l| Some(l.strip_prefix("//! - [`")?.split_once('`')?.0.to_owned()))
        .collect()
}

/// The source files of module `module` under `dir`: `module.rs`, or
/// every file under `module/` but its tests.
fn files_of(dir: &std::path::Path, module: &str) -> Vec<std::path::PathBuf> {
    let file = dir.join(format!("{module}.rs"));
    if file.exists() {
        return vec![file];
    }
    let mut files = rust_files(&dir.join(module));
    files.retain(|f| !f.ends_with("tests.rs"));
    files
}

/// Every Rust file under `dir`, at any depth.
fn rust_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for path in entries.map(|e| e.unwrap().path()) {
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// Where a module of `order` (its files under `dir`) names, through one of
/// `prefixes`, a module listed after it.
fn upward_imports(dir: &std::path::Path, order: &[String], prefixes: &[&str]) -> Vec<String> {
    let mut upward = Vec::new();
    for (rank, module) in order.iter().enumerate() {
        for file in files_of(dir, module) {
            let text = std::fs::read_to_string(&file).unwrap();
            // Code only: not the unit tests at the foot, not comments.
            let code = text.split("#[cfg(test)]").next().unwrap();
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for prefix in prefixes {
                    for (i, _) in line.match_indices(prefix) {
                        let named: String = line[i + prefix.len()..]
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        if named != *module && order[rank..].contains(&named) {
                            upward.push(format!("{} -> {named}", file.display()));
                        }
                    }
                }
            }
        }
    }
    upward
}

/// `lib.rs` lists the crate's modules bottom up: none imports from one
/// listed after it, so the layers hold (the engine at the bottom, the
/// command line at the top).
#[test]
fn the_crate_imports_only_from_modules_below_it() {
    let src = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
    let order = listed(&format!("{}/lib.rs", src.display()));
    assert!(order.len() >= 15, "lib.rs lists its modules: {order:?}");
    let upward = upward_imports(src, &order, &["crate::"]);
    assert!(upward.is_empty(), "imports up lib.rs's map: {upward:#?}");
}

/// The engine's map in `engine/mod.rs` lists its modules bottom up: each
/// may import only from those listed above it, so the engine has no cycle
/// and a reader can take the files in that order.
#[test]
fn the_engine_imports_only_from_modules_below_it() {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src/engine"));
    let order = listed(&format!("{}/mod.rs", dir.display()));
    let upward = upward_imports(dir, &order, &["super::", "crate::engine::"]);
    assert!(upward.is_empty(), "imports up the engine's map: {upward:#?}");
    let unlisted: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter_map(|f| Some(f.strip_suffix(".rs")?.to_owned()))
        .filter(|m| !["mod", "tests"].contains(&m.as_str()) && !order.contains(m))
        .collect();
    assert!(
        unlisted.is_empty(),
        "engine modules missing from engine/mod.rs's map: {unlisted:?}"
    );
}

/// The engine's unit tests, the integration and property tests, the
/// simulation and the benches build on one catalog (`engine::fixture`):
/// none writes a catalog of its own.
#[test]
fn tests_and_benches_share_one_catalog_fixture() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("src/engine/tests.rs")];
    for dir in ["tests", "benches"] {
        files.extend(files_of(root, dir));
    }
    let own: Vec<String> = files
        .iter()
        .filter(|f| {
            // A literal: `Catalog {` that no `->` or `impl` precedes.
            let text = std::fs::read_to_string(f).unwrap();
            text.lines()
                .any(|l| l.contains(concat!("Catalog", " {")) && !l.contains("->") && !l.contains("impl"))
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(files.len() > 20, "{files:?}");
    assert!(own.is_empty(), "catalogs written outside engine::fixture: {own:?}");
}

/// A source file over 600 lines says near its top why it is one file.
#[test]
fn every_long_file_says_why_it_is_one() {
    let files = rust_files(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")));
    let silent: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            let head: String = text.lines().take(40).collect::<Vec<_>>().join("\n");
            text.lines().count() > 600 && !head.contains("Why one file")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(files.len() > 50, "{files:?}");
    assert!(silent.is_empty(), "over 600 lines without saying why: {silent:?}");
}

/// The README's project layout names every module of `lib.rs`, in the
/// map's order (bottom up), so the tree and its description stay one.
#[test]
fn the_readme_layout_follows_the_module_map() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let layout = readme
        .split("## Project layout")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let order = listed(&format!("{root}/src/lib.rs"));
    let mut at = Vec::new();
    for module in order.iter().filter(|m| *m != "proto") {
        let named = [format!("- `src/{module}/`"), format!("- `src/{module}.rs`")];
        match named.iter().find_map(|n| layout.find(n.as_str())) {
            Some(position) => at.push((position, module)),
            None => panic!("the README's layout leaves out src/{module}"),
        }
    }
    let mut sorted = at.clone();
    sorted.sort();
    assert_eq!(
        sorted, at,
        "the README's layout lists the modules out of lib.rs's order"
    );
}
