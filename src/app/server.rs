//! Building and running the app: bind both listeners (port 0 works; the
//! bound addresses are exposed), seed accounts, serve until told to stop,
//! then drain: in-flight calls finish, the sweeper stops, the usage sink
//! is flushed.
//!
//! Why one file: building the app and running it to its end are one
//! sequence (listeners, planes, background tasks, drain) whose order is the
//! point; it splits with the `app/` layout of the tree's reorganisation,
//! not before.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::api::admin::AdminApi;
use crate::api::auth::{Operators, Role};
use crate::api::quota::QuotaApi;
use crate::api::rls::RlsApi;
use crate::clock::{Clock, OffsetClock, SystemClock};
use crate::config::{Settings, StoreKind};
use crate::proto::admin_server::AdminServer;
use crate::proto::quota_server::QuotaServer;
use crate::service::Tollgate;
use crate::store::Store;
use crate::store::leased::RedisStore;
use crate::store::memory::MemoryStore;
use crate::store::redis::Redis;
use crate::transport::conn::Deadline;
use crate::transport::http::Probes;
use crate::usage;
use crate::usage::journal::Journal;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;

/// A listener's TLS: its identity, and the CA client certificates must
/// chain to, required (data plane) or optional (admin: a client may use a
/// bearer token instead). Checked here, at start.
fn server_tls(
    tls: Option<&crate::config::TlsSettings>,
    optional_clients: bool,
) -> anyhow::Result<Option<ServerTlsConfig>> {
    let Some(tls) = tls else {
        return Ok(None);
    };
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, &tls.key));
    if let Some(ca) = &tls.client_ca {
        config = config
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(optional_clients);
    }
    // tonic reads the PEM when it is applied: fail now, not when serving.
    Server::builder()
        .tls_config(config.clone())
        .context("the certificate, key or client CA is not usable")?;
    Ok(Some(config))
}

fn with_tls(builder: Server, tls: Option<ServerTlsConfig>) -> anyhow::Result<Server> {
    Ok(match tls {
        Some(tls) => builder.tls_config(tls)?,
        None => builder,
    })
}

/// The mode of the Unix sockets: the owner and its group may connect
/// (the model server's container shares the group), nobody else,
/// whatever the umask.
pub const SOCKET_MODE: u32 = 0o660;

/// Binds a Unix socket at `path` for `what`, replacing a socket file an
/// earlier run left (it would refuse the bind); any other file there is
/// left alone and the bind refused. The socket is bound in a directory only
/// this user may enter, given [`SOCKET_MODE`], then linked into place
/// (never over a file that appeared meanwhile): it is never reachable with
/// the umask's mode, not even for a moment.
fn bind_unix(
    path: Option<&std::path::PathBuf>,
    what: &str,
) -> anyhow::Result<Option<(tokio::net::UnixListener, std::path::PathBuf)>> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    let Some(path) = path else {
        return Ok(None);
    };
    match std::fs::symlink_metadata(path) {
        Ok(found) if found.file_type().is_socket() => {
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => anyhow::bail!(
            "{what}'s socket path unix:{} holds a file that is not a socket; it is left alone (remove it or \
             choose another path)",
            path.display()
        ),
        Err(_) => {}
    }
    // Short, so the temporary path fits where the final one does.
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    let private = parent
        .unwrap_or(std::path::Path::new("."))
        .join(format!(".tg{}", std::process::id()));
    let binding = private.join("s");
    let _ = std::fs::remove_file(&binding);
    let _ = std::fs::remove_dir(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("creating {} to bind {what}'s socket in", private.display()))?;
    let placed = tokio::net::UnixListener::bind(&binding)
        .with_context(|| format!("binding {what} to unix:{}", binding.display()))
        .and_then(|listener| {
            std::fs::set_permissions(&binding, std::fs::Permissions::from_mode(SOCKET_MODE))
                .and_then(|()| std::fs::hard_link(&binding, path))
                .with_context(|| format!("placing {what}'s socket at unix:{}", path.display()))?;
            Ok(listener)
        });
    let _ = std::fs::remove_file(&binding);
    let _ = std::fs::remove_dir(&private);
    Ok(Some((placed?, path.clone())))
}

/// Serves `router` on the Unix socket `unix` (if any) until `stop`, then
/// removes the socket file.
async fn serve_unix(
    unix: Option<(tokio::net::UnixListener, std::path::PathBuf)>,
    places: crate::transport::conn::Places,
    router: tonic::transport::server::Router,
    stop: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let Some((listener, path)) = unix else {
        return Ok(());
    };
    let served = router
        .serve_with_incoming_shutdown(crate::transport::uds::incoming(listener, places), stop)
        .await;
    let _ = std::fs::remove_file(&path);
    served
}

/// The Envoy rate-limit service: its rules (reloaded with the
/// configuration), where they come from, and its settings.
struct Rls {
    in_force: Arc<crate::rls::config::RulesCell>,
    dir: std::path::PathBuf,
}

/// A built app, bound and seeded, not yet serving.
pub struct App {
    quota: TcpListener,
    quota_unix: Option<(tokio::net::UnixListener, std::path::PathBuf)>,
    admin_unix: Option<(tokio::net::UnixListener, std::path::PathBuf)>,
    admin: TcpListener,
    /// The admin side's HTTP endpoint (metrics and probes), if served.
    http: Option<TcpListener>,
    quota_addr: SocketAddr,
    admin_addr: SocketAddr,
    /// What the probes and the metrics read off the app.
    probes: Probes,
    tollgate: Tollgate,
    sweep_interval: Duration,
    shutdown_grace: Duration,
    /// What the drain may take after the grace period.
    shutdown_drain: Duration,
    /// Limits on each plane's connections (TCP and Unix socket together).
    connections: crate::transport::conn::Guard,
    writer: usage::Writer,
    /// The Redis store, whose leases need upkeep while serving and
    /// returning at the end.
    leases: Option<Arc<RedisStore>>,
    /// Who may call the admin API.
    credentials: Arc<Operators>,
    /// The Envoy rate-limit service's rules and settings, if it is served.
    rls: Option<Rls>,
    /// TLS of the data plane's TCP listener and of the admin listener.
    quota_tls: Option<ServerTlsConfig>,
    admin_tls: Option<ServerTlsConfig>,
    /// The configuration file to reload, if any, and how often to look.
    watch: Option<crate::app::reload::Watch>,
    reload_poll: Option<Duration>,
    reloads: Arc<crate::app::reload::Reloads>,
}

impl App {
    /// Binds the listeners, opens the store and the usage sink, seeds the
    /// configured accounts.
    pub async fn build(settings: Settings, clock: Arc<dyn Clock>) -> anyhow::Result<App> {
        App::build_with(settings, Some(clock)).await
    }

    /// Like [`App::build`] on the system clock; on the Redis store the
    /// clock is aligned with Redis `TIME`, one time base for the fleet.
    pub async fn build_on_system_clock(settings: Settings) -> anyhow::Result<App> {
        App::build_with(settings, None).await
    }

    async fn build_with(settings: Settings, clock: Option<Arc<dyn Clock>>) -> anyhow::Result<App> {
        let quota = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("binding the data plane to {}", settings.listen))?;
        let admin = TcpListener::bind(settings.admin_listen)
            .await
            .with_context(|| format!("binding the control plane to {}", settings.admin_listen))?;
        let http = match settings.http_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the HTTP endpoint to {addr}"))?,
            ),
            None => None,
        };
        let quota_unix = bind_unix(settings.listen_unix.as_ref(), "the data plane")?;
        let admin_unix = bind_unix(settings.admin_listen_unix.as_ref(), "the control plane")?;
        let (store, clock, leases): (Arc<dyn Store>, Arc<dyn Clock>, _) = match settings.store.kind {
            StoreKind::Memory => (
                Arc::new(
                    MemoryStore::new(settings.catalog.clone()).with_max_windows(settings.store.max_rate_limit_windows),
                ),
                clock.unwrap_or_else(|| Arc::new(SystemClock)),
                None,
            ),
            StoreKind::Redis => {
                let redis_settings = &settings.store.redis;
                anyhow::ensure!(
                    !redis_settings.urls.is_empty(),
                    "store.kind is redis but no Redis URL is given (store.redis.urls or --redis URL)"
                );
                let redis = Redis::connect(redis_settings)
                    .await
                    .with_context(|| format!("connecting to Redis at {}", redis_settings.urls.join(", ")))?;
                let (clock, aligned): (Arc<dyn Clock>, _) = match clock {
                    Some(clock) => (clock, None),
                    None => {
                        let aligned = Arc::new(OffsetClock::default());
                        let before = jiff::Timestamp::now();
                        let reference = redis.time().await.context("reading Redis TIME")?;
                        aligned.align(reference, before, jiff::Timestamp::now());
                        tracing::info!(offset = ?aligned.offset(), "clock aligned with Redis TIME");
                        (aligned.clone(), Some(aligned))
                    }
                };
                let journal = Journal::open(settings.journal.clone())
                    .with_context(|| format!("opening the usage journal in {}", settings.journal.dir.display()))?;
                tracing::info!(
                    journal = %journal.0.id(),
                    dir = %settings.journal.dir.display(),
                    replay = journal.1.len(),
                    "usage journal open"
                );
                let store = RedisStore::open(
                    redis,
                    settings.catalog.clone(),
                    Arc::clone(&clock),
                    aligned,
                    Some(journal),
                    settings.store.leases.clone(),
                )
                .await
                .context("opening the Redis store")?;
                (store.clone() as Arc<dyn Store>, clock, Some(store))
            }
        };
        let (sender, writer) = usage::spawn(&settings.usage).await.context("opening the usage sink")?;
        let tollgate = Tollgate::new(store, clock, sender);
        let probes = Probes::new(tollgate.clone(), settings.metrics_accounts.clone());
        for seed in &settings.seed {
            tollgate
                .seed(seed)
                .await
                .with_context(|| format!("seeding account {}", seed.id))?;
        }
        Ok(App {
            quota_addr: quota.local_addr()?,
            admin_addr: admin.local_addr()?,
            quota,
            quota_unix,
            admin_unix,
            admin,
            http,
            probes,
            tollgate,
            sweep_interval: settings.sweep_interval,
            shutdown_grace: settings.shutdown_grace,
            shutdown_drain: settings.shutdown_drain,
            connections: settings.connections,
            writer,
            leases,
            credentials: Arc::new(settings.admin),
            rls: match &settings.rls_config_dir {
                None => None,
                Some(dir) => {
                    let rules = crate::rls::config::Rules::load_dir(dir).map_err(|problems| {
                        anyhow::anyhow!(
                            "the rate-limit rules in {} have {} problem(s):\n  {}",
                            dir.display(),
                            problems.len(),
                            problems.join("\n  ")
                        )
                    })?;
                    tracing::info!(dir = %dir.display(), domains = rules.domains.len(), "Envoy rate-limit rules loaded");
                    let in_force = crate::rls::config::InForce {
                        rules,
                        settings: settings.rls.clone(),
                    };
                    Some(Rls {
                        in_force: Arc::new(std::sync::RwLock::new(Arc::new(in_force))),
                        dir: dir.clone(),
                    })
                }
            },
            quota_tls: server_tls(settings.tls.as_ref(), false).context("server.tls")?,
            admin_tls: server_tls(settings.admin_tls.as_ref(), true).context("admin.tls")?,
            watch: None,
            reload_poll: settings.reload_poll,
            reloads: Arc::default(),
        })
    }

    /// Reloads the catalog from `path` while serving: on SIGHUP, and when
    /// its content changes (`server.reload_poll_ms`); read with `flags`
    /// over it, as at start.
    pub fn watch_config(mut self, path: std::path::PathBuf, flags: crate::config::Overrides) -> App {
        let rules = self.rls.as_ref().map(|r| (r.dir.clone(), Arc::clone(&r.in_force)));
        self.watch = Some(crate::app::reload::Watch {
            loaded: crate::app::reload::snapshot(&path, rules.as_ref().map(|(dir, _)| dir.as_path())),
            flags,
            path,
            rules,
            poll: self.reload_poll,
        });
        self
    }

    /// Reloads applied and refused so far.
    pub fn reloads(&self) -> Arc<crate::app::reload::Reloads> {
        Arc::clone(&self.reloads)
    }

    /// Where the data plane listens.
    pub fn quota_addr(&self) -> SocketAddr {
        self.quota_addr
    }

    /// Where the control plane listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Where the HTTP endpoint (metrics and probes) listens, if it does.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// How long a drain may take before the process is ended regardless
    /// (see [`crate::app::signal::shutdown`]): the grace period for in-flight
    /// calls, then `server.shutdown_drain_seconds`.
    pub fn shutdown_deadline(&self) -> Duration {
        self.shutdown_grace + self.shutdown_drain
    }

    /// What the probes and the metrics read off the app.
    pub fn probes(&self) -> Probes {
        self.probes.clone()
    }

    /// Serves both planes until `shutdown` completes, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        self.run_hurried(shutdown, std::future::pending()).await
    }

    /// [`App::run`], with the grace period for in-flight calls cut short
    /// when `hurry` completes (a second signal): the drain then goes on at
    /// once, leases returned and the usage sink drained as ever.
    pub async fn run_hurried(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        hurry: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let App {
            quota,
            quota_unix,
            admin_unix,
            admin,
            http,
            probes,
            tollgate,
            sweep_interval,
            shutdown_grace,
            connections,
            writer,
            leases,
            credentials,
            watch,
            reloads,
            quota_tls,
            admin_tls,
            rls,
            ..
        } = self;
        let rls = rls.map(|r| {
            Deadline::new(
                RateLimitServiceServer::new(RlsApi::new(tollgate.clone(), r.in_force))
                    .max_decoding_message_size(MAX_RLS_MESSAGE),
                connections.call,
            )
        });
        if credentials.is_empty() {
            tracing::warn!(
                "no admin credentials configured: the admin API refuses every call \
                 (admin.tokens in the config, or --admin-tokens FILE; `tollgate admin token` makes one)"
            );
        }
        let admin_addr = admin.local_addr()?;
        if admin_tls.is_none() && !admin_addr.ip().is_loopback() {
            tracing::warn!(
                listen = %admin_addr,
                "the admin API listens beyond loopback without TLS: its bearer tokens cross the network \
                 in the clear (set admin.tls, or fence the port, as the shipped NetworkPolicy does)"
            );
        }
        // Two planes, each with one budget of places for its listeners.
        reserve_descriptors(2 * connections.max + http.as_ref().map_or(0, |_| crate::transport::http::MAX_CONNECTIONS));
        let (stop, stopped) = watch::channel(false);
        let until_stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // Each listener reports and lists only the services it serves.
        let (quota_health, quota_health_service) = tonic_health::server::health_reporter();
        quota_health.set_serving::<QuotaServer<QuotaApi>>().await;
        let (admin_health, admin_health_service) = tonic_health::server::health_reporter();
        admin_health.set_serving::<AdminServer<AdminApi>>().await;
        // "live": SERVING while the process answers (a liveness probe's
        // service); "" follows readiness (see `health_follows`).
        for reporter in [&quota_health, &admin_health] {
            reporter
                .set_service_status(LIVE, tonic_health::ServingStatus::Serving)
                .await;
        }
        // v1, and v1alpha for older grpcurl releases.
        let quota_name = <QuotaServer<QuotaApi> as NamedService>::NAME;
        let admin_name = <AdminServer<AdminApi> as NamedService>::NAME;
        let (quota_v1, quota_v1alpha) = (
            reflection(quota_name)
                .build_v1()?
                .max_decoding_message_size(MAX_PROBE_MESSAGE),
            reflection(quota_name)
                .build_v1alpha()?
                .max_decoding_message_size(MAX_PROBE_MESSAGE),
        );
        let (admin_v1, admin_v1alpha) = (
            reflection(admin_name)
                .build_v1()?
                .max_decoding_message_size(MAX_PROBE_MESSAGE),
            reflection(admin_name)
                .build_v1alpha()?
                .max_decoding_message_size(MAX_PROBE_MESSAGE),
        );
        let call = connections.call;
        // Health and reflection need no credential: they get the smallest
        // messages, and health calls the call deadline too (a `Watch`
        // answers at once and streams its body past it). Reflection is a
        // stream both ways: each of its streams holds at most a message
        // and a stream window, within the streams a connection may open.
        let (quota_health_service, admin_health_service) = (
            Deadline::new(quota_health_service.max_decoding_message_size(MAX_PROBE_MESSAGE), call),
            Deadline::new(admin_health_service.max_decoding_message_size(MAX_PROBE_MESSAGE), call),
        );
        let quota_places = connections.places();
        let admin_places = connections.places();
        let quota_api = Deadline::new(
            QuotaServer::new(QuotaApi::new(tollgate.clone())).max_decoding_message_size(MAX_QUOTA_MESSAGE),
            call,
        );
        let quota_server = with_tls(builder(), quota_tls)?
            .add_service(quota_health_service.clone())
            .add_service(quota_v1)
            .add_service(quota_v1alpha)
            .add_service(quota_api.clone())
            .add_optional_service(rls.clone())
            .serve_with_incoming_shutdown(
                crate::transport::conn::incoming(quota, quota_places.clone()),
                until_stopped(stopped.clone()),
            );
        // The same data plane on the Unix socket, if configured.
        let quota_unix_server = serve_unix(
            quota_unix,
            quota_places,
            builder()
                .add_service(quota_health_service.clone())
                .add_service(quota_api)
                .add_optional_service(rls),
            until_stopped(stopped.clone()),
        );
        // Callers without a valid credential are refused on their headers,
        // before their request's bytes are read; each call checks its role.
        let known = Arc::clone(&credentials);
        let admin_api = InterceptedService::new(
            Deadline::new(AdminServer::new(AdminApi::new(tollgate.clone(), credentials)), call),
            move |request: tonic::Request<()>| known.authorize(&request, Role::Read).map(|_| request),
        );
        // And the control plane on its own socket, if configured.
        let admin_unix_server = serve_unix(
            admin_unix,
            admin_places.clone(),
            builder()
                .add_service(admin_health_service.clone())
                .add_service(admin_api.clone()),
            until_stopped(stopped.clone()),
        );
        let admin_server = with_tls(builder(), admin_tls)?
            .add_service(admin_health_service)
            .add_service(admin_v1)
            .add_service(admin_v1alpha)
            .add_service(admin_api)
            .serve_with_incoming_shutdown(
                crate::transport::conn::incoming(admin, admin_places),
                until_stopped(stopped.clone()),
            );
        probes.set_serving(true);
        let follower = tokio::spawn(health_follows(
            probes.clone(),
            [quota_health.clone(), admin_health.clone()],
            until_stopped(stopped.clone()),
        ));
        let reloader = watch.map(|watch| {
            tokio::spawn(crate::app::reload::run(
                tollgate.clone(),
                watch,
                reloads,
                until_stopped(stopped.clone()),
            ))
        });
        let sweeper = tokio::spawn(sweep(tollgate, sweep_interval, until_stopped(stopped.clone())));
        // Lease upkeep runs until every call has finished, then returns the leases.
        let (drained, drained_rx) = watch::channel(false);
        let keeper = leases.map(|store| tokio::spawn(store.run(until_stopped(drained_rx.clone()))));
        // Metrics and probes stay up until the calls have drained (they
        // answer "not ready" meanwhile).
        let http_server = http.map(|listener| {
            tokio::spawn(crate::transport::http::serve(
                listener,
                connections.first_bytes,
                probes.clone(),
                until_stopped(drained_rx),
            ))
        });
        let signal = async move {
            shutdown.await;
            probes.set_serving(false);
            tracing::info!("shutting down: finishing in-flight calls");
            quota_health.set_not_serving::<QuotaServer<QuotaApi>>().await;
            admin_health.set_not_serving::<AdminServer<AdminApi>>().await;
            // The overall status too (probes that name no service).
            for reporter in [&quota_health, &admin_health] {
                reporter
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
            }
            let _ = stop.send(true);
        };
        // In-flight calls get `shutdown_grace` to finish (or until `hurry`);
        // then they are dropped so the process exits within a deadline (the
        // usage writer then drains what is queued and refuses the rest).
        let deadline = async move {
            until_stopped(stopped).await;
            tokio::select! {
                () = tokio::time::sleep(shutdown_grace) => tracing::warn!(
                    grace = ?shutdown_grace,
                    "in-flight calls did not finish within the grace period; dropping them"
                ),
                () = hurry => tracing::warn!("in-flight calls dropped at a second signal"),
            }
        };
        let serving = async {
            let (quota, admin, unix, admin_unix) =
                tokio::join!(quota_server, admin_server, quota_unix_server, admin_unix_server);
            (quota.and(unix), admin.and(admin_unix))
        };
        let ((quota_result, admin_result), ()) = tokio::join!(
            async {
                tokio::select! {
                    results = serving => results,
                    () = deadline => (Ok(()), Ok(())),
                }
            },
            signal
        );
        // Every step runs whatever became of the one before: a task that
        // failed or panicked is an error, reported once the leases are
        // returned and the sink drained, never a reason to skip them.
        let mut failed = Failures::default();
        failed.join("sweeper task", sweeper).await;
        failed.join("health task", follower).await;
        if let Some(reloader) = reloader {
            failed.join("reloader task", reloader).await;
        }
        let _ = drained.send(true);
        if let Some(keeper) = keeper {
            failed.join("lease upkeep task", keeper).await;
        }
        if let Some(server) = http_server
            && let Some(served) = failed.join("HTTP endpoint task", server).await
        {
            failed.note(served.context("HTTP endpoint"));
        }
        // Calls that outlived the grace period may still hold senders: the
        // writer stops taking records, drains what is queued and flushes.
        failed.note(writer.finish().await.context("writing usage records"));
        failed.note(quota_result.context("data plane"));
        failed.note(admin_result.context("control plane"));
        failed.into_result()?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// What failed while a run ended: each failure is logged as it is found,
/// and the first is the run's error once every step is done.
#[derive(Default)]
struct Failures(Vec<anyhow::Error>);

impl Failures {
    /// Awaits `task`: its output, or none if it panicked or was cancelled
    /// (noted as a failure of `what`).
    async fn join<T>(&mut self, what: &'static str, task: tokio::task::JoinHandle<T>) -> Option<T> {
        self.note(task.await.context(what))
    }

    /// Keeps `result`'s error, if any.
    fn note<T>(&mut self, result: anyhow::Result<T>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "shutdown goes on after a failure");
                self.0.push(e);
                None
            }
        }
    }

    fn into_result(self) -> anyhow::Result<()> {
        self.0.into_iter().next().map_or(Ok(()), Err)
    }
}

/// Descriptors kept beyond the connections' for everything else: Redis
/// connections, the journal, the usage file, the listeners.
const OTHER_DESCRIPTORS: usize = 256;

/// Raises the soft limit on open files to what `connections` (every
/// listener's cap, summed) and [`OTHER_DESCRIPTORS`] need, up to the hard
/// limit; warns if that is still short, since then clients filling the
/// connection caps could leave the process without descriptors.
fn reserve_descriptors(connections: usize) {
    let needed = (connections + OTHER_DESCRIPTORS) as u64;
    match rlimit::increase_nofile_limit(needed) {
        Ok(limit) if limit >= needed => tracing::debug!(limit, needed, "open files"),
        Ok(limit) => tracing::warn!(
            limit,
            needed,
            "the open-file limit is below what the connection caps allow: clients filling them could \
             leave no descriptor for Redis, the journal or new files (lower server.max_connections, or \
             raise the limit: ulimit -n, LimitNOFILE=)"
        ),
        Err(e) => tracing::warn!(error = %e, needed, "could not read or raise the open-file limit"),
    }
}

/// Streams one connection may have open at once, advertised to every
/// client (HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS): far above what a
/// client multiplexes, low enough that half-sent streams cannot pile up
/// on one connection (without it there was no bound at all).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// The largest data-plane request message (a reserve, settle or charge is
/// a few hundred bytes): a client that announces a larger one is refused
/// (`OUT_OF_RANGE`) before its bytes arrive, and one that sends half of
/// one holds at most this.
pub const MAX_QUOTA_MESSAGE: usize = 16 << 10;

/// The largest health-check or reflection request message (a service or
/// symbol name): these answer callers without a credential.
pub const MAX_PROBE_MESSAGE: usize = 4 << 10;

/// The largest Envoy rate-limit request message (Envoy sends a handful of
/// short descriptors).
pub const MAX_RLS_MESSAGE: usize = 64 << 10;

/// Request bytes one stream may have in flight unread (HTTP/2's initial
/// window): at least any data-plane message, far below hyper's 1 MiB.
const STREAM_WINDOW: u32 = 64 << 10;

/// Every gRPC server's stack: the RPC span, a bound on the streams of one
/// connection and on the bytes each may have in flight, and HTTP/2
/// keepalive pings so a peer that vanished without closing is dropped.
fn builder() -> Server {
    Server::builder()
        .trace_fn(crate::telemetry::grpc_span)
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}

/// A server-reflection builder listing `service` with health and reflection.
fn reflection(service: &str) -> tonic_reflection::server::Builder<'static> {
    [
        service,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    .into_iter()
    .fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
        |b, name| b.with_service_name(name),
    )
}

/// Lapses holds every `interval` until `stop` completes, then sweeps once
/// more.
async fn sweep(tollgate: Tollgate, interval: Duration, stop: impl Future<Output = ()>) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        let stopping = tokio::select! {
            () = &mut stop => true,
            _ = ticks.tick() => false,
        };
        // Outside the select: a sweep, once started, runs to the end so the
        // records it takes from accounts always reach the sink.
        if let Err(e) = tollgate.sweep().await {
            tracing::warn!(error = %e, "sweep failed");
        }
        if stopping {
            // That was the last sweep: records waiting in outboxes are now
            // in the sink's queue, which the writer drains next.
            return;
        }
    }
}

/// The gRPC health service's name for liveness: SERVING while the process
/// answers at all.
pub const LIVE: &str = "live";

/// Keeps the overall status ("") of each health reporter in step with
/// readiness, until `stop`.
async fn health_follows(
    probes: Probes,
    reporters: [tonic_health::server::HealthReporter; 2],
    stop: impl Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    // The reporters start out SERVING.
    let mut was: Option<Result<(), String>> = Some(Ok(()));
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = tick.tick() => {}
        }
        let ready = probes.ready();
        if was.as_ref() == Some(&ready) {
            continue;
        }
        let status = match &ready {
            Ok(()) => tonic_health::ServingStatus::Serving,
            Err(why) => {
                tracing::warn!(why = %why, "not ready");
                tonic_health::ServingStatus::NotServing
            }
        };
        if ready.is_ok() && was.is_some() {
            tracing::info!("ready again");
        }
        for reporter in &reporters {
            reporter.set_service_status("", status).await;
        }
        was = Some(ready);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A background task that panicked is one failure among the steps of
    /// an ending, not a return from it: the steps after it (returning
    /// leases, draining the sink) still run, and the run still fails.
    #[tokio::test]
    async fn a_panicked_task_is_a_failure_and_the_steps_after_it_still_run() {
        let mut failed = Failures::default();
        let panicked = tokio::spawn(async { panic!("a bug in the sweeper") });
        assert!(failed.join("sweeper task", panicked).await.is_none());
        let after = failed.join("lease upkeep task", tokio::spawn(async { "leases returned" }));
        assert_eq!(after.await, Some("leases returned"));
        assert_eq!(
            failed.note(Ok::<_, anyhow::Error>("sink drained")),
            Some("sink drained")
        );
        let e = failed.into_result().unwrap_err();
        assert!(format!("{e:#}").contains("sweeper task"), "{e:#}");
    }
}
