//! The command line: `serve`, `check-config`, and a small client of the
//! Quota API for trying Tollgate by hand (`reserve`, `settle`, `release`,
//! `balance`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::clock::SystemClock;
use crate::config::Settings;
use crate::proto;
use crate::proto::quota_client::QuotaClient;
use crate::server::App;

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
    /// Validate a configuration file; print every problem and exit non-zero if any.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// Reserve for a request (client of a running Tollgate).
    Reserve(ReserveArgs),
    /// Settle a reservation with actual usage.
    Settle(SettleArgs),
    /// Release a reservation without charge.
    Release(ReleaseArgs),
    /// Show an account's balance.
    Balance(BalanceArgs),
}

/// Options of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML). Without it, the built-in demo is served.
    #[arg(long, env = "TOLLGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data-plane address, overriding server.listen.
    #[arg(long, env = "TOLLGATE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Control-plane address, overriding server.admin_listen.
    #[arg(long, env = "TOLLGATE_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
}

/// Where the client connects.
#[derive(Debug, Args)]
pub struct Endpoint {
    /// Data-plane URL of a running Tollgate.
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

/// Options of `settle`.
#[derive(Debug, Args)]
pub struct SettleArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    /// Account of the reservation.
    #[arg(long)]
    account: String,
    /// The reservation id from `reserve`.
    #[arg(long)]
    reservation: String,
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

/// Options of `release`.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    /// Account of the reservation.
    #[arg(long)]
    account: String,
    /// The reservation id from `reserve`.
    #[arg(long)]
    reservation: String,
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

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Serve(args) => serve(args).await,
        Cmd::CheckConfig { file } => Ok(match Settings::load(Some(&file), &env) {
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
        Cmd::Reserve(a) => client(&a.endpoint, |mut c| async move {
            let r = c
                .reserve(proto::ReserveRequest {
                    account_id: a.account,
                    api_key_id: a.api_key,
                    model: a.model,
                    service_tier: a.tier,
                    request_id: a.request_id,
                    input_tokens: a.input,
                    cached_input_tokens: a.cached_input,
                    max_output_tokens: a.max_output,
                })
                .await?
                .into_inner();
            Ok(format!("{r:#?}"))
        })
        .await,
        Cmd::Settle(a) => client(&a.endpoint, |mut c| async move {
            let usage = proto::Usage {
                input_tokens: a.input,
                cached_input_tokens: a.cached_input,
                cache_write_tokens: a.cache_write,
                output_tokens: a.output,
            };
            let r = c
                .settle(proto::SettleRequest { account_id: a.account, reservation_id: a.reservation, usage: Some(usage) })
                .await?
                .into_inner();
            Ok(format!("{r:#?}"))
        })
        .await,
        Cmd::Release(a) => client(&a.endpoint, |mut c| async move {
            let r = c
                .release(proto::ReleaseRequest { account_id: a.account, reservation_id: a.reservation })
                .await?
                .into_inner();
            Ok(format!("{r:#?}"))
        })
        .await,
        Cmd::Balance(a) => client(&a.endpoint, |mut c| async move {
            let r = c.get_balance(proto::GetBalanceRequest { account_id: a.account }).await?.into_inner();
            Ok(format!("{r:#?}"))
        })
        .await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut settings = match Settings::load(args.config.as_deref(), &env) {
        Ok(s) => s,
        Err(errors) => {
            eprint!("{errors}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if args.config.is_none() {
        tracing::info!("no --config given: serving the built-in demo (examples/tollgate.toml); state is in memory only");
    }
    if let Some(addr) = args.listen {
        settings.listen = addr;
    }
    if let Some(addr) = args.admin_listen {
        settings.admin_listen = addr;
    }
    let app = App::build(settings, Arc::new(SystemClock)).await?;
    tracing::info!(quota = %app.quota_addr(), admin = %app.admin_addr(), "tollgate listening");
    app.run(crate::signal::shutdown()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn client<F, Fut>(endpoint: &Endpoint, call: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(QuotaClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<String, tonic::Status>>,
{
    let client = QuotaClient::connect(endpoint.addr.clone())
        .await
        .with_context(|| format!("connecting to {}", endpoint.addr))?;
    match call(client).await {
        Ok(text) => {
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Err(status) => {
            eprintln!("error: {:?}: {}", status.code(), status.message());
            Ok(ExitCode::FAILURE)
        }
    }
}
