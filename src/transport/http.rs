//! The admin side's plain-HTTP endpoint (`server.http_listen`): Prometheus
//! `/metrics`, and `/live` and `/ready` for Kubernetes probes. The gRPC
//! health service reports the same readiness ([`Probes::ready`]).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::engine::ids::AccountId;
use crate::engine::{Command, Reply};
use crate::service::Tollgate;
use crate::telemetry::metrics::{AccountSource, currency_units, metrics};

/// What the probes and the metrics read off a running app.
#[derive(Clone)]
pub struct Probes {
    tollgate: Tollgate,
    /// Set once the listeners serve, cleared at the shutdown signal.
    serving: Arc<AtomicBool>,
    /// Accounts whose balances the metrics show.
    accounts: Arc<[AccountId]>,
}

impl Probes {
    /// Probes of `tollgate`, showing the balances of `accounts`; not ready
    /// until [`set_serving`](Self::set_serving).
    pub fn new(tollgate: Tollgate, accounts: Vec<AccountId>) -> Probes {
        Probes {
            tollgate,
            serving: Arc::new(AtomicBool::new(false)),
            accounts: accounts.into(),
        }
    }

    /// Marks the app serving (listeners up) or not (shutting down).
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Relaxed);
    }

    /// Ready to take traffic, or why not: the configuration is loaded and
    /// the listeners serve, the journal is replayed, and the store is
    /// reachable or a failure policy admits without it.
    pub fn ready(&self) -> Result<(), String> {
        if !self.serving.load(Ordering::Relaxed) {
            return Err("not serving: starting or shutting down".into());
        }
        match self.tollgate.health().unready {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// The metrics in Prometheus's text format, with the gauges read off
    /// the app now.
    pub async fn metrics_text(&self) -> String {
        let m = metrics();
        let health = self.tollgate.health();
        m.holds_open.set(gauge(health.holds_open));
        m.accounts_cached.set(gauge(health.accounts_cached));
        m.rate_limit_windows.set(gauge(health.rate_limit_windows));
        if let Some(journal) = &health.journal {
            m.journal_pending_records.set(gauge(journal.pending));
            m.journal_bytes.set(gauge(journal.bytes));
            m.journal_lag.set(journal.lag.as_secs_f64());
        }
        m.ready.set(i64::from(self.ready().is_ok()));
        for account in self.accounts.iter() {
            let Ok(Reply::Balance(b)) = self.tollgate.apply(account, Command::Balance).await else {
                continue;
            };
            let sources = [
                ("allowance", b.allowance_tokens as f64),
                ("packs", b.pack_tokens as f64),
                ("promo", currency_units(b.promo)),
                ("paid", currency_units(b.paid)),
                ("spendable", currency_units(b.spendable)),
            ];
            for (source, value) in sources {
                m.account_available
                    .get_or_create(&AccountSource {
                        account: account.to_string(),
                        source,
                    })
                    .set(value);
            }
        }
        m.render()
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Connections the endpoint serves at once: scrapers and probes need a
/// handful; more would let a caller take the process's file descriptors
/// from the data plane.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves the endpoint on `listener` until `stop` completes: at most
/// [`MAX_CONNECTIONS`] open, each closed if its opening bytes do not
/// arrive within `first_bytes` (as the gRPC listeners' are,
/// `crate::transport::conn`), and read from for no longer than that either: a
/// request whose headers never end cannot keep its place (a scraper
/// whose keep-alive outlives it simply connects again).
pub async fn serve(
    listener: TcpListener,
    first_bytes: std::time::Duration,
    probes: Probes,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/live", get(live))
        .route("/ready", get(ready))
        .with_state(probes);
    serve_guarded(listener, first_bytes, app, stop).await
}

/// Serves `/metrics` (the registry as it stands) and `/live` for a process
/// that is not a sidecar (`tollgate usage load`), guarded as [`serve`] is.
pub async fn serve_metrics(
    listener: TcpListener,
    first_bytes: std::time::Duration,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(|| async { openmetrics(metrics().render()) }))
        .route("/live", get(live));
    serve_guarded(listener, first_bytes, app, stop).await
}

async fn serve_guarded(
    listener: TcpListener,
    first_bytes: std::time::Duration,
    app: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let guard = crate::transport::conn::Guard {
        max: MAX_CONNECTIONS,
        first_bytes,
        ..crate::transport::conn::Guard::default()
    };
    let listener = Guarded {
        incoming: crate::transport::conn::incoming(listener, guard.places()),
        local,
        lifetime: first_bytes,
    };
    axum::serve(listener, app).with_graceful_shutdown(stop).await
}

/// The endpoint's connections, let in by [`crate::transport::conn::incoming`].
struct Guarded {
    incoming: tokio_stream::wrappers::ReceiverStream<std::io::Result<crate::transport::conn::Guarded>>,
    local: std::net::SocketAddr,
    /// How long one connection is read from.
    lifetime: std::time::Duration,
}

impl axum::serve::Listener for Guarded {
    type Io = Expiring;
    type Addr = Option<std::net::SocketAddr>;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(connection)) => {
                    let peer = tonic::transport::server::Connected::connect_info(&connection).remote_addr();
                    let deadline = Box::pin(tokio::time::sleep(self.lifetime));
                    return (Expiring { connection, deadline }, peer);
                }
                // Refused or failed connections are logged by `incoming`.
                Some(Err(_)) => {}
                // The listener is gone: nothing more will come.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Some(self.local))
    }
}

async fn metrics_page(State(probes): State<Probes>) -> impl IntoResponse {
    openmetrics(probes.metrics_text().await)
}

fn openmetrics(text: String) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

/// Alive while the process answers at all.
async fn live() -> &'static str {
    "live\n"
}

async fn ready(State(probes): State<Probes>) -> (StatusCode, String) {
    match probes.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

/// A connection whose reads fail once its lifetime is over.
struct Expiring {
    connection: crate::transport::conn::Guarded,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl tokio::io::AsyncRead for Expiring {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
        }
        std::pin::Pin::new(&mut self.connection).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Expiring {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.connection).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.connection).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.connection).poll_shutdown(cx)
    }
}
