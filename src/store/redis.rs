//! The connection layer of the Redis-backed store: one Redis or a Redis
//! Cluster behind one handle, with a deadline on every call.
//!
//! - A single Redis is reached through a [`ConnectionManager`]: one
//!   multiplexed connection, re-established in the background with
//!   exponential backoff when it drops.
//! - A cluster is reached through redis-rs' cluster client, seeded with one
//!   or more node URLs; it follows slot moves and reconnects by itself.
//! - Every call is bounded by `deadline` (on top of the client's own
//!   response timeout), so nothing waits on a dead connection: a late call
//!   is [`StoreError::Unavailable`]. Its outcome is unknown (a script may
//!   have run): what is built on this layer must make retries harmless.
//! - Sockets set `TCP_USER_TIMEOUT`, so a connection to a vanished peer is
//!   dropped and re-established instead of timing out call after call.
//! - `rediss://` URLs connect over TLS (rustls), trusting the system's
//!   roots or the certificate authority named in the settings.
//! - Scripts are called by SHA (`EVALSHA`) and loaded again when Redis
//!   answers `NOSCRIPT` (a restarted or flushed server); on a cluster
//!   `SCRIPT LOAD` goes to every primary.
//!
//! The account store built on it (keys, scripts, leases) is the next stage.

use std::path::PathBuf;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::io::tcp::TcpSettings;
use redis::{FromRedisValue, IntoConnectionInfo, Script, TlsCertificates, ToRedisArgs};

use super::StoreError;

/// Where Redis is and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URLs: one for a single Redis, one or more
    /// seed nodes for a cluster.
    pub urls: Vec<String>,
    /// Whether the URLs name Redis Cluster nodes.
    pub cluster: bool,
    /// The most any one call may take, connection attempts included.
    pub deadline: Duration,
    /// For `rediss://`: a PEM file of the certificate authority to trust;
    /// `None` trusts the system's roots.
    pub ca_cert: Option<PathBuf>,
    /// Credentials kept out of the URLs (read by configuration from the
    /// environment or a file); they replace any given in a URL.
    pub credentials: Option<Credentials>,
    /// Replicas that must have a commit before it counts as done (`WAIT`
    /// after each one, within half the deadline); 0: none. Redis
    /// replicates asynchronously: a master that dies before its replicas
    /// have a commit loses it in the failover, and a sidecar that took the
    /// commit as done has already dropped what it sent.
    pub replicas: u32,
}

/// A Redis ACL user and password (`AUTH`); no username means `default`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The ACL user, if not `default`.
    pub username: Option<String>,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    /// Never prints the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A handle on Redis; cheap to clone, shared by every task.
#[derive(Clone)]
pub struct Redis {
    connection: Connection,
    /// Where commits go when they wait for replicas.
    commits: Option<Connection>,
    deadline: Duration,
    replicas: u32,
    subscriber: redis::Client,
}

/// A peer that vanished without closing its sockets (power loss, a
/// failover moving the address) would otherwise keep a connection "open"
/// for the kernel's full retransmission time, about 15 minutes, and a
/// timed-out call does not make the client reconnect. With
/// `TCP_USER_TIMEOUT` the kernel drops a connection whose sent data stays
/// unacknowledged a few deadlines long, and the client reconnects.
fn tcp_settings(deadline: Duration) -> TcpSettings {
    let settings = TcpSettings::default().set_nodelay(true);
    #[cfg(target_os = "linux")]
    let settings = settings.set_user_timeout((deadline * 4).max(Duration::from_secs(2)));
    settings
}

fn unavailable(what: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {what}"))
}

impl Redis {
    /// Connects, within the deadline.
    pub async fn connect(settings: &RedisSettings) -> Result<Redis, StoreError> {
        let deadline = settings.deadline;
        let certificates = match &settings.ca_cert {
            None => None,
            Some(path) => {
                let pem = tokio::fs::read(path)
                    .await
                    .map_err(|e| unavailable(format!("reading {}: {e}", path.display())))?;
                Some(TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                })
            }
        };
        // One plain client on the first URL: the connection of a single
        // Redis, and the subscriber to change announcements (on a cluster,
        // PUBLISH reaches every node, so any one node will do).
        let plain = || -> redis::RedisResult<redis::Client> {
            let url = settings
                .urls
                .first()
                .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Client, "no Redis URL given")))?;
            let mut info = url
                .as_str()
                .into_connection_info()?
                .set_tcp_settings(tcp_settings(deadline));
            if let Some(credentials) = &settings.credentials {
                let mut redis = info.redis_settings().clone().set_password(&credentials.password);
                if let Some(user) = &credentials.username {
                    redis = redis.set_username(user);
                }
                info = info.set_redis_settings(redis);
            }
            match certificates.clone() {
                Some(certificates) => redis::Client::build_with_tls(info, certificates),
                None => redis::Client::open(info),
            }
        };
        let subscriber = plain().map_err(unavailable)?;
        let connect = || async {
            if settings.cluster {
                let mut builder = ClusterClientBuilder::new(settings.urls.clone());
                if let Some(credentials) = &settings.credentials {
                    builder = builder.password(&credentials.password);
                    if let Some(user) = &credentials.username {
                        builder = builder.username(user);
                    }
                }
                if let Some(certificates) = certificates.clone() {
                    builder = builder.certs(certificates);
                }
                let client = builder
                    .tcp_settings(tcp_settings(deadline))
                    .connection_timeout(deadline)
                    .response_timeout(deadline)
                    .build()?;
                Ok(Connection::Cluster(client.get_async_connection().await?))
            } else {
                if settings.urls.len() != 1 {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "a single Redis takes exactly one URL",
                    )));
                }
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(deadline))
                    .set_response_timeout(Some(deadline))
                    .set_number_of_retries(3)
                    .set_max_delay(Duration::from_secs(2));
                Ok(Connection::Single(
                    ConnectionManager::new_with_config(plain()?, config).await?,
                ))
            }
        };
        let late = |_| unavailable(format!("no connection within {deadline:?}"));
        let connection = tokio::time::timeout(deadline, connect())
            .await
            .map_err(late)?
            .map_err(unavailable)?;
        // Commits that wait for replicas go on a connection of their own:
        // Redis answers nothing else on a connection while its WAIT waits.
        let commits = match settings.replicas {
            0 => None,
            _ => Some(
                tokio::time::timeout(deadline, connect())
                    .await
                    .map_err(late)?
                    .map_err(unavailable)?,
            ),
        };
        Ok(Redis {
            connection,
            commits,
            deadline,
            replicas: settings.replicas,
            subscriber,
        })
    }

    /// Subscribes to `channel` on a connection of its own; the stream ends
    /// when that connection drops (the caller subscribes again).
    pub async fn subscribe(&self, channel: &str) -> Result<redis::aio::PubSubStream, StoreError> {
        let subscribe = async {
            let mut pubsub = self.subscriber.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok(pubsub.into_on_message())
        };
        self.bounded("subscribe", subscribe).await
    }

    /// Runs `script` (named `name` in the metrics) with `keys` and `args`
    /// (a value or a tuple, each element one argument) by SHA, loading it
    /// on `NOSCRIPT`.
    pub async fn invoke<T: FromRedisValue>(
        &self,
        name: &'static str,
        script: &Script,
        keys: &[&str],
        args: impl ToRedisArgs,
    ) -> Result<T, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        invocation.arg(args);
        let call = async {
            match self.connection.clone() {
                Connection::Single(mut c) => invocation.invoke_async(&mut c).await,
                Connection::Cluster(mut c) => invocation.invoke_async(&mut c).await,
            }
        };
        self.bounded(name, call).await
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, StoreError> {
        let call = async {
            match self.connection.clone() {
                Connection::Single(mut c) => command.query_async(&mut c).await,
                Connection::Cluster(mut c) => command.query_async(&mut c).await,
            }
        };
        self.bounded(command_name(command), call).await
    }

    /// Runs `script` like [`Redis::invoke`], for a write that must
    /// survive a failover: with `replicas` configured, the script and a
    /// `WAIT` for that many replicas go in one pipeline, on one connection
    /// to the master of `keys[0]` (`WAIT` counts that connection's own
    /// writes; sent apart, a reconnection between the two could confirm
    /// nothing at all). A write not confirmed in time has an unknown fate:
    /// `Unavailable`, and the caller sends it again (its writes are
    /// idempotent).
    pub async fn invoke_durable(
        &self,
        name: &'static str,
        script: &Script,
        keys: &[&str],
        args: impl ToRedisArgs,
    ) -> Result<redis::Value, StoreError> {
        let Some(commits) = &self.commits else {
            return self.invoke(name, script, keys, args).await;
        };
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        invocation.arg(args);
        let timeout = u64::try_from((self.deadline / 2).as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut pipe = redis::pipe();
        // Loaded each time: the pipeline cannot answer NOSCRIPT by loading.
        pipe.load_script(script)
            .invoke_script(&invocation)
            .cmd("WAIT")
            .arg(self.replicas)
            .arg(timeout);
        let call = async {
            let answers: Vec<redis::Value> = match commits.clone() {
                Connection::Single(mut c) => pipe.query_async(&mut c).await?,
                Connection::Cluster(mut c) => {
                    let master = Route::with_key(keys.first().copied().unwrap_or_default(), SlotAddr::Master);
                    c.route_pipeline(pipe, 0, 3, SingleNodeRoutingInfo::SpecificNode(master))
                        .await?
                }
            };
            match <[redis::Value; 3]>::try_from(answers) {
                Ok([_, answer, acked]) => Ok((answer, redis::from_redis_value::<u64>(acked)?)),
                Err(other) => Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "a commit pipeline answered",
                    format!("{other:?}"),
                ))),
            }
        };
        let (answer, acked) = self.bounded(name, call).await?;
        if acked < u64::from(self.replicas) {
            return Err(unavailable(format!(
                "a commit reached {acked} of {} replicas within {timeout} ms; its outcome is unknown",
                self.replicas
            )));
        }
        Ok(answer)
    }

    /// Redis's clock (`TIME`): one time base for every sidecar, for expiries
    /// and period resets.
    pub async fn time(&self) -> Result<jiff::Timestamp, StoreError> {
        let (seconds, micros): (i64, i64) = self.query(&redis::cmd("TIME")).await?;
        let nanos = micros.checked_mul(1000).and_then(|n| i32::try_from(n).ok());
        nanos
            .and_then(|n| jiff::Timestamp::new(seconds, n).ok())
            .ok_or_else(|| unavailable(format!("TIME answered {seconds} s {micros} us")))
    }

    /// Runs `call` (`name` in the metrics) within the deadline, timed.
    async fn bounded<T>(
        &self,
        name: &'static str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(self.deadline, call)
            .await
            .map_err(|_| unavailable(format!("no answer within {:?}", self.deadline)))
            .and_then(|r| r.map_err(unavailable));
        crate::telemetry::metrics::metrics().redis_call(name, started.elapsed(), result.is_err());
        result
    }
}

/// A command's name for the metrics (a fixed set: label values stay
/// bounded).
fn command_name(command: &redis::Cmd) -> &'static str {
    let Some(redis::Arg::Simple(name)) = command.args_iter().next() else {
        return "other";
    };
    const KNOWN: [&str; 13] = [
        "PING",
        "WAIT",
        "TIME",
        "HMGET",
        "HGET",
        "ZRANGE",
        "XADD",
        "XREADGROUP",
        "XACK",
        "XGROUP",
        "XAUTOCLAIM",
        "XPENDING",
        "XRANGE",
    ];
    KNOWN
        .iter()
        .find(|k| k.as_bytes().eq_ignore_ascii_case(name))
        .copied()
        .unwrap_or("other")
}
