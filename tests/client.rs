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
    // A retried reserve (the same request id) is the same reservation.
    let again = client.reserve(&ask("rich", "one")).await;
    assert!(matches!(again, Ok(Reserved::Granted(_)) | Err(ClientError::Status(_))));
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
