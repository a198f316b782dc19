//! The command line: `serve`, `check-config`, and a small client of the
//! Quota API for trying Tollgate by hand (`reserve`, `settle`, `release`,
//! `balance`).
//!
//! `tollgate admin`, `tollgate usage` and `tollgate loadgen` each have
//! their own file, with their subcommands.

pub mod admin;
pub mod loadgen;
pub mod report;
pub mod usage;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::app::server::App;
use crate::client::{Client, ClientError};
use crate::config::{Settings, process_env};
use crate::proto;

/// Tollgate: quota, balance and rate-limit sidecar for LLM inference.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Serve the Quota and Admin gRPC APIs (the built-in demo without --config).
    Serve(ServeArgs),
    /// Validate a configuration file, with the flags `serve` would be given;
    /// print every problem and exit non-zero if any.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
        /// What `serve` would set over the file.
        #[command(flatten)]
        flags: ConfigFlags,
    },
    /// Reserve for a request (client of a running Tollgate).
    Reserve(ReserveArgs),
    /// Settle a reservation with actual usage.
    Settle(SettleArgs),
    /// Release a reservation without charge.
    Release(ReservationArgs),
    /// Show an account's balance.
    Balance(BalanceArgs),
    /// Operate a running Tollgate through its admin API (accounts, money,
    /// packs, plans, limits, prices, holds; tokens).
    #[command(subcommand)]
    Admin(crate::cli::admin::AdminCmd),
    /// Read the usage streams in Redis through a consumer group.
    #[command(subcommand)]
    Usage(usage::UsageCmd),
    /// Drive a running Tollgate (or the baseline) with reserves and settles
    /// and report throughput and latency percentiles (JSON).
    Loadgen(LoadgenArgs),
    /// Serve the empty baseline: Tollgate's Quota API and Envoy's
    /// rate-limit API on the same stack, answering at once without doing
    /// anything (the floor for loadgen).
    Baseline {
        /// TCP address.
        #[arg(long, default_value = "127.0.0.1:50061")]
        listen: SocketAddr,
        /// Also on this Unix socket.
        #[arg(long)]
        listen_unix: Option<PathBuf>,
    },
}

/// Options of `loadgen`.
#[derive(Debug, Args)]
pub struct LoadgenArgs {
    /// `http://HOST:PORT` or `unix:/PATH`.
    #[arg(long, env = "TOLLGATE_ADDR", default_value = "http://127.0.0.1:50051")]
    pub target: String,
    /// Concurrent clients, one connection each.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// How long to run.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Stop after this many calls instead.
    #[arg(long)]
    pub calls: Option<u64>,
    /// Accounts to spread the calls over (comma-separated); `NAME{A..B}`
    /// stands for NAMEA to NAMEB (`tenant-{1..100000}`).
    #[arg(long, value_delimiter = ',', default_value = "demo")]
    pub accounts: Vec<String>,
    /// Send this share of calls (0 to 1) to the first account (hot-key skew).
    #[arg(long, conflicts_with = "zipf")]
    pub hot: Option<f64>,
    /// Pick the account of rank r (in the order given) with a probability
    /// proportional to 1/r^S: a few hot tenants, a long quiet tail (1 is
    /// typical).
    #[arg(long)]
    pub zipf: Option<f64>,
    /// The model on reserves.
    #[arg(long, default_value = "llama-3.1-8b")]
    pub model: String,
    /// Call Envoy's ShouldRateLimit in this domain instead (one descriptor:
    /// api_key = the account).
    #[arg(long)]
    pub rls_domain: Option<String>,
    /// Also write the report to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Options of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML). Without it, the built-in demo is served.
    #[arg(long, env = "TOLLGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// What the command line sets over the file.
    #[command(flatten)]
    pub flags: ConfigFlags,
    /// Admin tokens from this file too (`[[tokens]]` entries with
    /// operator, role and sha256; `tollgate admin token` makes one).
    #[arg(long, value_name = "FILE", env = "TOLLGATE_ADMIN_TOKENS_FILE")]
    pub admin_tokens: Option<PathBuf>,
}

/// Settings the command line sets over the configuration file and the
/// environment (applied by `Settings::parse_with`, before validation).
#[derive(Debug, Args)]
pub struct ConfigFlags {
    /// Data-plane address, overriding server.listen.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Control-plane address, overriding server.admin_listen.
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// Serve metrics (`/metrics`) and probes (`/live`, `/ready`) over HTTP
    /// here, overriding server.http_listen.
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// Use the Redis store at this redis:// or rediss:// URL; repeat the
    /// flag (or separate with commas) to name several Redis Cluster seed
    /// nodes. The password comes from TOLLGATE_REDIS_PASSWORD or
    /// store.redis.password_file, never from the command line.
    #[arg(long = "redis", value_name = "URL", value_delimiter = ',')]
    pub redis: Vec<String>,
    /// The one --redis URL (or TOLLGATE_REDIS URL) is a Redis Cluster node.
    #[arg(long)]
    pub redis_cluster: bool,
    /// The usage journal's directory (Redis store), overriding journal.dir.
    #[arg(long, value_name = "DIR")]
    pub journal: Option<PathBuf>,
    /// Serve Envoy's rate-limit API with the envoyproxy/ratelimit rules
    /// (YAML, one domain per file) in this directory, overriding
    /// rls.config_dir.
    #[arg(long, value_name = "DIR")]
    pub rls_config: Option<PathBuf>,
}

impl ConfigFlags {
    fn overrides(&self) -> crate::config::Overrides {
        crate::config::Overrides {
            listen: self.listen,
            admin_listen: self.admin_listen,
            http_listen: self.http_listen,
            journal: self.journal.clone(),
            rls_config: self.rls_config.clone(),
            redis: self.redis.clone(),
            redis_cluster: self.redis_cluster,
        }
    }
}

/// Where the client connects.
#[derive(Debug, Args)]
pub struct Endpoint {
    /// Data-plane URL of a running Tollgate (`http://HOST:PORT`, or
    /// `unix:/PATH` for its Unix socket).
    #[arg(long, env = "TOLLGATE_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
}

/// Options of `reserve`.
#[derive(Debug, Args)]
pub struct ReserveArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    /// Account to charge.
    #[arg(long)]
    account: String,
    /// Your request id (idempotency key).
    #[arg(long)]
    request_id: String,
    /// Model.
    #[arg(long)]
    model: String,
    /// Service tier (default: "default").
    #[arg(long, default_value = "")]
    tier: String,
    /// API key id, for per-key limits.
    #[arg(long, default_value = "")]
    api_key: String,
    /// Uncached prompt tokens.
    #[arg(long, default_value_t = 0)]
    input: u64,
    /// Cached prompt tokens.
    #[arg(long, default_value_t = 0)]
    cached_input: u64,
    /// Most output tokens wanted.
    #[arg(long)]
    max_output: u64,
}

/// Which reservation, and where its Tollgate is.
#[derive(Debug, Args)]
pub struct ReservationArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    /// Account of the reservation.
    #[arg(long)]
    account: String,
    /// The reservation id from `reserve`.
    #[arg(long)]
    reservation: String,
}

/// Options of `settle`.
#[derive(Debug, Args)]
pub struct SettleArgs {
    #[command(flatten)]
    reservation: ReservationArgs,
    /// Uncached prompt tokens used.
    #[arg(long)]
    input: u64,
    /// Cached prompt tokens used.
    #[arg(long, default_value_t = 0)]
    cached_input: u64,
    /// Prompt tokens written to cache.
    #[arg(long, default_value_t = 0)]
    cache_write: u64,
    /// Output tokens generated.
    #[arg(long)]
    output: u64,
}

/// Options of `balance`.
#[derive(Debug, Args)]
pub struct BalanceArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    /// Account to read.
    #[arg(long)]
    account: String,
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Serve(args) => serve(args).await,
        Cmd::Usage(cmd) => crate::cli::usage::run(cmd).await,
        Cmd::Admin(cmd) => crate::cli::admin::run(cmd).await,
        Cmd::Loadgen(args) => loadgen(args).await,
        Cmd::Baseline { listen, listen_unix } => {
            let tcp = tokio::net::TcpListener::bind(listen).await?;
            let unix = listen_unix
                .as_ref()
                .map(tokio::net::UnixListener::bind)
                .transpose()
                .context("binding the Unix socket")?;
            // Listening for signals before saying so: a signal from then on
            // drains rather than kills.
            let (stop, _) = crate::app::signal::shutdown(crate::cli::loadgen::BASELINE_DRAIN);
            tracing::info!(%listen, unix = ?listen_unix, "baseline listening");
            crate::cli::loadgen::serve_baseline(tcp, unix, stop).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::CheckConfig { file, flags } => Ok(match Settings::load(Some(&file), &process_env, &flags.overrides()) {
            Ok(s) => {
                println!(
                    "{}: ok ({} plans, {} price versions, {} accounts)",
                    file.display(),
                    s.catalog.plans.len(),
                    s.catalog.prices.versions().len(),
                    s.seed.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprint!("{}: {errors}", file.display());
                ExitCode::FAILURE
            }
        }),
        Cmd::Reserve(a) => {
            client(&a.endpoint, |c| async move {
                let r = c
                    .reserve_request(proto::ReserveRequest {
                        account_id: a.account,
                        api_key_id: a.api_key,
                        model: a.model,
                        service_tier: a.tier,
                        request_id: a.request_id,
                        input_tokens: a.input,
                        cached_input_tokens: a.cached_input,
                        max_output_tokens: a.max_output,
                    })
                    .await?;
                Ok(show_reserve(&r))
            })
            .await
        }
        Cmd::Settle(a) => {
            client(&a.reservation.endpoint, |c| async move {
                let usage = proto::Usage {
                    input_tokens: a.input,
                    cached_input_tokens: a.cached_input,
                    cache_write_tokens: a.cache_write,
                    output_tokens: a.output,
                };
                let r = c
                    .settle_request(proto::SettleRequest {
                        account_id: a.reservation.account,
                        reservation_id: a.reservation.reservation,
                        usage: Some(usage),
                    })
                    .await?;
                Ok(r.record.as_ref().map(show_record).unwrap_or_default())
            })
            .await
        }
        Cmd::Release(a) => {
            client(&a.endpoint, |c| async move {
                let request = proto::ReleaseRequest {
                    account_id: a.account,
                    reservation_id: a.reservation,
                };
                let r = c.release_request(request).await?;
                Ok(format!("released: {}", show_amounts(&r.released)))
            })
            .await
        }
        Cmd::Balance(a) => {
            client(&a.endpoint, |c| async move {
                let r = c.balance(&a.account).await?;
                Ok(show_balance(&r))
            })
            .await
        }
    }
}

/// The most accounts `loadgen --accounts` may name, ranges included.
const MAX_LOADGEN_ACCOUNTS: u64 = 10_000_000;

/// `--accounts` with each `NAME{A..B}` replaced by NAMEA, ..., NAMEB.
fn expand_accounts(given: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for item in given {
        let Some((name, range)) = item.strip_suffix('}').and_then(|rest| rest.rsplit_once('{')) else {
            out.push(item.clone());
            continue;
        };
        let (from, to) = range
            .split_once("..")
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
            .filter(|(a, b)| a <= b)
            .with_context(|| format!("--accounts {item}: a range is NAME{{A..B}} with A <= B"))?;
        let count = (to - from).checked_add(1).and_then(|n| n.checked_add(out.len() as u64));
        anyhow::ensure!(
            count.is_some_and(|n| n <= MAX_LOADGEN_ACCOUNTS),
            "--accounts: at most {MAX_LOADGEN_ACCOUNTS} accounts"
        );
        out.extend((from..=to).map(|i| format!("{name}{i}")));
    }
    Ok(out)
}

async fn loadgen(args: LoadgenArgs) -> anyhow::Result<ExitCode> {
    let accounts = expand_accounts(&args.accounts)?;
    anyhow::ensure!(!accounts.is_empty(), "--accounts: name at least one");
    anyhow::ensure!(args.connections > 0, "--connections: at least 1");
    let mix = match (args.hot, args.zipf) {
        (None, None) => crate::cli::loadgen::Mix::Uniform,
        (Some(share), _) if (0.0..=1.0).contains(&share) => crate::cli::loadgen::Mix::Hot(share),
        (Some(share), _) => anyhow::bail!("--hot {share}: a share between 0 and 1"),
        (None, Some(s)) if s > 0.0 && s <= 10.0 => crate::cli::loadgen::Mix::Zipf(s),
        (None, Some(s)) => anyhow::bail!("--zipf {s}: an exponent above 0, at most 10"),
    };
    let spec = crate::cli::loadgen::Spec {
        target: args.target,
        connections: args.connections,
        duration: std::time::Duration::try_from_secs_f64(args.seconds).context("--seconds")?,
        calls: args.calls,
        accounts,
        mix,
        model: args.model,
        rls_domain: args.rls_domain,
        progress: !args.quiet,
    };
    let report = crate::cli::loadgen::run(&spec)
        .await
        .with_context(|| format!("connecting to {}", spec.target))?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = args.json {
        std::fs::write(&path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{json}");
    Ok(if report.errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let flags = args.flags.overrides();
    let mut settings = match Settings::load(args.config.as_deref(), &process_env, &flags) {
        Ok(s) => s,
        Err(errors) => {
            eprint!("{errors}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if args.config.is_none() {
        tracing::info!("no --config given: serving the built-in demo (examples/tollgate.toml)");
    }
    if let Some(path) = &args.admin_tokens {
        match crate::config::read_admin_tokens(path) {
            Ok(tokens) => settings.admin.extend(tokens),
            Err(errors) => {
                eprint!("{errors}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    let mut app = App::build_on_system_clock(settings).await?;
    if let Some(path) = args.config {
        // Reloads read the file with the same flags over it.
        app = app.watch_config(path, flags);
    }
    // Listening for signals before saying so: a signal from then on drains
    // rather than kills.
    let (stop, hurry) = crate::app::signal::shutdown(app.shutdown_deadline());
    tracing::info!(quota = %app.quota_addr(), admin = %app.admin_addr(), http = ?app.http_addr(), "tollgate listening");
    app.run_hurried(stop, hurry).await?;
    Ok(ExitCode::SUCCESS)
}

async fn client<F, Fut>(endpoint: &Endpoint, call: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<String, ClientError>>,
{
    // A person waits longer than a model server would.
    let options = crate::client::Options {
        deadline: std::time::Duration::from_secs(5),
        ..crate::client::Options::default()
    };
    let client = Client::connect(&endpoint.addr, options).await?;
    match call(client).await {
        Ok(text) => {
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Status(status)) => {
            eprintln!("error: {:?}: {}", status.code(), status.message());
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}

fn decimal(m: Option<&proto::Money>) -> &str {
    m.map_or("0", |m| m.decimal.as_str())
}

fn show_amounts(amounts: &[proto::SourceAmount]) -> String {
    let parts: Vec<String> = amounts
        .iter()
        .map(|a| {
            let source = proto::SourceKind::try_from(a.source).map_or("?", |s| s.as_str_name());
            let source = source.trim_start_matches("SOURCE_KIND_").to_lowercase();
            let lot = if a.lot_id.is_empty() {
                String::new()
            } else {
                format!("[{}]", a.lot_id)
            };
            match &a.money {
                Some(m) => format!("{source}{lot} {}", m.decimal),
                None => format!("{source}{lot} {} tokens", a.tokens),
            }
        })
        .collect();
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", ")
    }
}

fn show_time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| jiff::Timestamp::new(t.seconds, t.nanos).ok())
        .map_or_else(|| "-".into(), |t| t.to_string())
}

fn show_reserve(r: &proto::ReserveResponse) -> String {
    let decision = proto::Decision::try_from(r.decision).map_or("?", |d| d.as_str_name());
    let mut out = format!("decision:       {}\n", decision.trim_start_matches("DECISION_"));
    if r.decision != proto::Decision::Allow as i32 {
        let reason = proto::DenyReason::try_from(r.deny_reason).map_or("?", |d| d.as_str_name());
        out += &format!(
            "reason:         {} ({})\n",
            reason.trim_start_matches("DENY_REASON_"),
            r.message
        );
    } else {
        out += &format!("reservation_id: {}\n", r.reservation_id);
        out += &format!("granted_output: {} tokens\n", r.granted_output_tokens);
        out += &format!("held:           {}\n", show_amounts(&r.held));
        out += &format!("expires_at:     {}\n", show_time(r.expires_at.as_ref()));
        out += &format!("price_version:  {}\n", r.price_version);
    }
    if let Some(l) = &r.rate_limits {
        out += &format!(
            "rate limits:    requests {}/{}, tokens {}/{} remaining",
            l.requests_remaining, l.requests_limit, l.tokens_remaining, l.tokens_limit
        );
    }
    out
}

fn show_record(r: &proto::UsageRecord) -> String {
    let u = r.usage.unwrap_or_default();
    format!(
        "request_id:     {}\nmodel:          {} ({})\nusage:          input {}, cached {}, cache write {}, output {}\n\
         charged:        {}\ntotal:          {}\nprice_version:  {}",
        r.request_id,
        r.model,
        r.service_tier,
        u.input_tokens,
        u.cached_input_tokens,
        u.cache_write_tokens,
        u.output_tokens,
        show_amounts(&r.charges),
        decimal(r.total_money.as_ref()),
        r.price_version
    )
}

fn show_balance(b: &proto::GetBalanceResponse) -> String {
    format!(
        "account:        {}{}\nallowance:      {} tokens (period ends {})\npacks:          {} tokens\n\
         promo:          {}\npaid:           {}\ncredit limit:   {}\ndebt:           {}\nspendable:      {}\n\
         held:           {} money, {} tokens",
        b.account_id,
        if b.suspended { " (suspended)" } else { "" },
        b.allowance_tokens,
        show_time(b.period_end.as_ref()),
        b.pack_tokens,
        decimal(b.promo.as_ref()),
        decimal(b.paid.as_ref()),
        decimal(b.credit_limit.as_ref()),
        decimal(b.debt.as_ref()),
        decimal(b.spendable.as_ref()),
        decimal(b.held_money.as_ref()),
        b.held_tokens
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ranges_expand_in_order_and_bad_ones_are_named() {
        let given = ["demo".to_owned(), "tenant-{1..3}".to_owned(), "x{0..0}".to_owned()];
        assert_eq!(
            expand_accounts(&given).unwrap(),
            ["demo", "tenant-1", "tenant-2", "tenant-3", "x0"]
        );
        for bad in ["t{3..1}", "t{a..b}", "t{1..}"] {
            let error = expand_accounts(&[bad.to_owned()]).unwrap_err().to_string();
            assert!(error.contains(bad), "{error}");
        }
        let huge = expand_accounts(&["t{1..99999999}".to_owned()]).unwrap_err().to_string();
        assert!(huge.contains("at most"), "{huge}");
    }
}
