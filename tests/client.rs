//! `tollgate::client` against the real gRPC server, over TCP and a Unix
//! socket: a reservation settled with its counts, one dropped unsettled
//! (released), a denial with its reason, an extend, and the deadline and
//! retries of a call to a server that never answers.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use tollgate::client::{Ask, Client, ClientError, Options, Reserved};
use tollgate::proto;

fn ask(account: &str, id: &str) -> Ask {
    Ask {
        account: account.into(),
        request_id: id.into(),
        model: "m".into(),
        input_tokens: 100,
        max_output_tokens: 100,
        ..Ask::default()
    }
}

async fn held(client: &Client, account: &str) -> String {
    client.balance(account).await.unwrap().held_money.unwrap().decimal
}

async fn a_request_cycle(client: &Client) {
    // Reserve, extend, settle: one record with the counts.
    let Reserved::Granted(mut reservation) = client.reserve(&ask("rich", "one")).await.unwrap() else {
        panic!("rich is allowed")
    };
    assert_eq!(reservation.granted_output_tokens(), 100);
    assert_eq!(reservation.extend(300).await.unwrap(), 300);
    let usage = proto::Usage {
        input_tokens: 100,
        output_tokens: 250,
        ..Default::default()
    };
    let record = reservation.settle(usage).await.unwrap();
    assert_eq!(record.request_id, "one");
    assert_eq!(record.usage.unwrap().output_tokens, 250);
    assert_eq!(held(client, "rich").await, "0.000000000000");

    // Dropped unsettled (a handler that failed, a client gone): released.
    let Reserved::Granted(reservation) = client.reserve(&ask("rich", "two")).await.unwrap() else {
        panic!("rich is allowed")
    };
    assert_ne!(held(client, "rich").await, "0.000000000000");
    drop(reservation);
    let deadline = Instant::now() + Duration::from_secs(5);
    while held(client, "rich").await != "0.000000000000" {
        assert!(Instant::now() < deadline, "the dropped reservation was never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A denial carries its reason.
    let Reserved::Denied(denial) = client.reserve(&ask("poor", "three")).await.unwrap() else {
        panic!("poor has nothing")
    };
    assert_eq!(denial.reason, proto::DenyReason::InsufficientFunds);
    assert_eq!(denial.retry_after, None);
}

#[tokio::test]
async fn a_reservation_settles_or_is_released_over_tcp_and_a_unix_socket() {
    let app = support::spawn_app().await;
    let tcp = Client::connect(&app.quota_url, Options::default()).await.unwrap();
    a_request_cycle(&tcp).await;

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tollgate.sock");
    let config = support::CONFIG.replace(
        "[server]\n",
        &format!("[server]\nlisten_unix = \"{}\"\n", socket.display()),
    );
    let _app = support::spawn_app_with(&config).await;
    let unix = Client::connect(&format!("unix:{}", socket.display()), Options::default())
        .await
        .unwrap();
    a_request_cycle(&unix).await;
}

#[tokio::test]
async fn a_silent_server_costs_each_attempt_its_deadline_then_fails() {
    // Accepts connections and answers nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let options = Options {
        deadline: Duration::from_millis(100),
        attempts: 3,
        backoff: Duration::from_millis(10),
    };
    let client = Client::new(channel, options);
    let started = Instant::now();
    let failed = client.reserve(&ask("rich", "r")).await.unwrap_err();
    let ClientError::Status(status) = failed else {
        panic!("a status")
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    // Three attempts, each waited out, and the pauses between.
    assert!(
        started.elapsed() >= Duration::from_millis(330),
        "{:?}",
        started.elapsed()
    );
    silent.abort();
}

/// A model server's request handler as the README's "Integrate your
/// inference server" writes it (with this test's model, and the headers
/// of a denial as its reply).
async fn handle(
    target: &str,
    account: String,
    request_id: String,
    prompt_tokens: u64,
) -> Result<Vec<(&'static str, String)>, Box<dyn std::error::Error>> {
    let tg = Client::connect(target, Options::default()).await?;
    let ask = Ask {
        account,
        request_id,
        model: "m".into(),
        input_tokens: prompt_tokens,
        max_output_tokens: 1024,
        ..Ask::default()
    };
    match tg.reserve(&ask).await? {
        Reserved::Granted(r) => {
            let usage = generate(prompt_tokens, r.granted_output_tokens()).await?; // dropped: released
            r.settle(usage).await?;
        }
        Reserved::Denied(denied) => return Ok(denied.headers()),
    }
    Ok(Vec::new())
}

/// The model: 7 tokens out, 10 of the prompt from its cache.
async fn generate(prompt_tokens: u64, max_tokens: u64) -> Result<proto::Usage, std::io::Error> {
    assert_eq!(max_tokens, 1024);
    Ok(proto::Usage {
        input_tokens: prompt_tokens - 10,
        cached_input_tokens: 10,
        output_tokens: 7,
        ..proto::Usage::default()
    })
}

#[tokio::test]
async fn the_readme_handler_settles_and_answers_a_rate_limit_with_its_headers() {
    let app = support::spawn_app().await;
    let target = &app.quota_url;
    assert!(
        handle(target, "rich".into(), "h-1".into(), 30)
            .await
            .unwrap()
            .is_empty()
    );
    let record = app
        .quota
        .clone()
        .get_balance(proto::GetBalanceRequest {
            account_id: "rich".into(),
        })
        .await
        .unwrap();
    // 20 x 1 + 10 x 0.5 + 7 x 4 per million.
    assert_eq!(record.into_inner().paid.unwrap().decimal, "99.999947000000");

    for id in ["h-2", "h-3"] {
        assert!(
            handle(target, "limited".into(), id.into(), 30)
                .await
                .unwrap()
                .is_empty()
        );
    }
    let headers = handle(target, "limited".into(), "h-4".into(), 30).await.unwrap();
    let named = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
    assert_eq!(named("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(named("x-ratelimit-remaining-requests"), Some("0"));
    let after: u64 = named("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&after), "{headers:?}");
    assert!(named("retry-after-ms").is_some(), "{headers:?}");
}

#[tokio::test]
async fn a_reserve_whose_caller_goes_away_in_flight_is_released_once_it_lands() {
    let app = support::spawn_app().await;
    let client = Client::connect(&app.quota_url, Options::default()).await.unwrap();
    // The caller's future is dropped after its first poll: the reserve is
    // on its way, its answer will find nobody.
    let gone = tokio::time::timeout(Duration::ZERO, client.reserve(&ask("rich", "abandoned"))).await;
    assert!(gone.is_err(), "answered within no time at all");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // It landed (a replay of the request id gives its first answer)...
        let replay = client
            .reserve_request(proto::ReserveRequest {
                account_id: "rich".into(),
                model: "m".into(),
                request_id: "abandoned".into(),
                input_tokens: 100,
                max_output_tokens: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(replay.decision, proto::Decision::Allow as i32);
        // ...and was released: nothing held, nothing left to settle.
        if held(&client, "rich").await == "0.000000000000" {
            let settle = proto::SettleRequest {
                account_id: "rich".into(),
                reservation_id: replay.reservation_id,
                usage: Some(proto::Usage {
                    input_tokens: 100,
                    output_tokens: 1,
                    ..Default::default()
                }),
            };
            let ClientError::Status(status) = client.settle_request(settle).await.unwrap_err() else {
                panic!("a status")
            };
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the abandoned reservation is still held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
