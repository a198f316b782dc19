//! `tollgate admin ...`: the operator's client of the admin API.
//!
//! Every subcommand is one admin call (two for `set-limit` and
//! `set-budget`, which read the overrides or budgets they edit). It prints an aligned table, or JSON with `--json`,
//! and exits with a code a script can rely on:
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | done |
//! | 1 | anything else (a bug, an unexpected answer) |
//! | 2 | bad input (`INVALID_ARGUMENT`, or the command line) |
//! | 3 | no such account, pack or reservation (`NOT_FOUND`) |
//! | 4 | refused as it stands (`ALREADY_EXISTS`: an adjustment id reused for another change; `FAILED_PRECONDITION`) |
//! | 5 | not allowed (`UNAUTHENTICATED`, `PERMISSION_DENIED`) |
//! | 6 | Tollgate unreachable or unavailable (`UNAVAILABLE`, `DEADLINE_EXCEEDED`) |
//!
//! Why one file: one subcommand per admin call, each a few lines of request
//! and table, all sharing the same output and exit-code rules; split by
//! subcommand they would repeat those rules.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use comfy_table::{Table, presets};
use serde_json::{Value, json};
use tonic::{Code, Status};

use crate::api::auth::{Role, new_token};
use crate::api::convert::price_version_out;
use crate::proto;
use crate::transport::channel::{AdminClient, Bearer};

/// `admin` subcommands.
#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Make a new admin token: prints the token (hand it to the operator;
    /// it is stored nowhere) and the entry to configure (its hash only).
    Token {
        /// Who the token identifies, as audit records will name them.
        #[arg(long)]
        operator: String,
        /// `read` (read-outs) or `write` (everything).
        #[arg(long, default_value = "read")]
        role: Role,
    },
    /// Accounts: show, list, create.
    #[command(subcommand)]
    Accounts(AccountsCmd),
    /// Credit money (paid, or promo with --promo).
    Topup(TopUpArgs),
    /// Add a signed amount to paid money (a correction).
    Adjust(AdjustArgs),
    /// Grant a token pack.
    GrantPack(GrantPackArgs),
    /// Revoke a pack: what is left of it is forfeited.
    RevokePack(RevokePackArgs),
    /// Refund a usage record: what it charged goes back to the sources
    /// and lots it was charged to.
    Refund(RefundArgs),
    /// Move an account to a plan.
    SetPlan(SetPlanArgs),
    /// Set (or clear) one scope of an account's limit overrides.
    SetLimit(SetLimitArgs),
    /// Set (or clear) the budget of an API key or a project, or a
    /// project's keys.
    SetBudget(SetBudgetArgs),
    /// Set an account's own alert thresholds (replacing its plan's), or
    /// go back to its plan's.
    SetAlerts(SetAlertsArgs),
    /// Suspend an account: new spending is denied.
    Suspend(ChangeArgs),
    /// Lift a suspension.
    Resume(ChangeArgs),
    /// Price-book versions.
    #[command(subcommand)]
    Prices(PricesCmd),
    /// Open holds of an account.
    #[command(subcommand)]
    Holds(HoldsCmd),
}

/// `admin accounts` subcommands.
#[derive(Debug, Subcommand)]
pub enum AccountsCmd {
    /// Show an account: balance, lots, open holds, recent usage.
    Show(AccountArgs),
    /// List account ids, in byte order.
    List {
        /// Where, and how.
        #[command(flatten)]
        endpoint: AdminEndpoint,
        /// Start after this id (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// At most this many (up to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Create an account on a plan.
    Create(CreateArgs),
}

/// `admin prices` subcommands.
#[derive(Debug, Subcommand)]
pub enum PricesCmd {
    /// Every version, oldest first, and which is in force.
    List {
        /// Where, and how.
        #[command(flatten)]
        endpoint: AdminEndpoint,
    },
    /// Publish the versions in a file (`[[prices]]` tables as in the
    /// configuration), in order. A published version cannot be changed,
    /// only superseded by a later one.
    Publish {
        /// Where, and how.
        #[command(flatten)]
        endpoint: AdminEndpoint,
        /// The TOML file.
        #[arg(long)]
        file: PathBuf,
        /// Your id for this change (with `:VERSION` appended for each
        /// version when the file has several): publishing again with it
        /// is answered as the first time.
        #[arg(long = "id")]
        adjustment_id: String,
        /// Why (kept in the audit record).
        #[arg(long)]
        reason: String,
    },
}

/// `admin holds` subcommands.
#[derive(Debug, Subcommand)]
pub enum HoldsCmd {
    /// An account's open holds, soonest expiry first.
    List(AccountArgs),
}

/// Where the admin API is and how to present oneself to it.
#[derive(Debug, Args)]
pub struct AdminEndpoint {
    /// Admin API of a running Tollgate (`http://HOST:PORT` or `unix:/PATH`).
    #[arg(long, env = "TOLLGATE_ADMIN_ADDR", default_value = "http://127.0.0.1:50052")]
    addr: String,
    /// The bearer token (prefer TOLLGATE_ADMIN_TOKEN or --token-file: a
    /// command line is visible to other users of the machine).
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the bearer token from this file.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Trust this CA for the admin listener's certificate (PEM; with an
    /// `https://` address).
    #[arg(long, env = "TOLLGATE_ADMIN_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Present this client certificate (PEM; with --key).
    #[arg(long, env = "TOLLGATE_ADMIN_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "TOLLGATE_ADMIN_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One account.
#[derive(Debug, Args)]
pub struct AccountArgs {
    #[command(flatten)]
    endpoint: AdminEndpoint,
    /// The account.
    account: String,
}

/// A change to one account: its id and reason.
#[derive(Debug, Args)]
pub struct ChangeArgs {
    #[command(flatten)]
    endpoint: AdminEndpoint,
    /// The account.
    account: String,
    /// Your id for this change: repeating the command with it applies
    /// nothing twice.
    #[arg(long = "id")]
    adjustment_id: String,
    /// Why (kept in the audit record).
    #[arg(long)]
    reason: String,
}

/// Options of `admin accounts create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    change: ChangeArgs,
    /// A configured plan.
    #[arg(long)]
    plan: String,
    /// IANA time zone for calendar periods (default UTC).
    #[arg(long, default_value = "")]
    time_zone: String,
    /// How far paid money may go below zero.
    #[arg(long)]
    credit_limit: Option<String>,
}

/// Options of `admin topup`.
#[derive(Debug, Args)]
pub struct TopUpArgs {
    #[command(flatten)]
    change: ChangeArgs,
    /// The amount, e.g. 25 or 0.50.
    #[arg(long)]
    amount: String,
    /// Credit promotional money (drawn before paid money).
    #[arg(long)]
    promo: bool,
}

/// Options of `admin adjust`.
#[derive(Debug, Args)]
pub struct AdjustArgs {
    #[command(flatten)]
    change: ChangeArgs,
    /// The signed amount, e.g. -3.20.
    #[arg(long, allow_hyphen_values = true)]
    amount: String,
}

/// Options of `admin grant-pack`.
#[derive(Debug, Args)]
pub struct GrantPackArgs {
    #[command(flatten)]
    change: ChangeArgs,
    /// The pack's id.
    #[arg(long)]
    pack: String,
    /// Tokens in the pack.
    #[arg(long)]
    tokens: u64,
    /// When it expires (RFC 3339).
    #[arg(long)]
    expires_at: jiff::Timestamp,
    /// Models it applies to (default: every model).
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
}

/// Options of `admin revoke-pack`.
#[derive(Debug, Args)]
pub struct RevokePackArgs {
    #[command(flatten)]
    change: ChangeArgs,
    /// The pack's id.
    #[arg(long)]
    pack: String,
}

/// Options of `admin refund`.
#[derive(Debug, Args)]
pub struct RefundArgs {
    #[command(flatten)]
    change: ChangeArgs,
    /// The usage record, as one JSON line of the usage sink or of
    /// `tollgate usage tail` (`-` for standard input).
    #[arg(long)]
    record: PathBuf,
}

/// Options of `admin set-plan`.
#[derive(Debug, Args)]
pub struct SetPlanArgs {
    #[command(flatten)]
    change: ChangeArgs,
    /// A configured plan.
    #[arg(long)]
    plan: String,
}

/// Options of `admin set-limit`.
#[derive(Debug, Args)]
pub struct SetLimitArgs {
    #[command(flatten)]
    change: ChangeArgs,
    /// Which limits: `account`, `api-key`, `per-model` or `model:NAME`.
    #[arg(long)]
    scope: String,
    /// Requests per minute (0: none).
    #[arg(long, default_value_t = 0)]
    rpm: u64,
    /// Tokens per minute (0: none).
    #[arg(long, default_value_t = 0)]
    tpm: u64,
    /// Requests in flight across the fleet (0: none).
    #[arg(long, default_value_t = 0)]
    concurrent: u64,
    /// Requests in flight through one sidecar (0: none).
    #[arg(long, default_value_t = 0)]
    concurrent_per_sidecar: u64,
    /// Drop the override of this scope (the plan's limits apply again).
    #[arg(long, conflicts_with_all = ["rpm", "tpm", "concurrent", "concurrent_per_sidecar"])]
    clear: bool,
}

/// Options of `admin set-budget`.
#[derive(Debug, Args)]
pub struct SetBudgetArgs {
    #[command(flatten)]
    change: ChangeArgs,
    /// The API key whose budget to set.
    #[arg(long, required_unless_present = "project", conflicts_with = "project")]
    api_key: Option<String>,
    /// The project whose budget (or keys) to set.
    #[arg(long)]
    project: Option<String>,
    /// The project's keys (replace the ones it has).
    #[arg(long, value_delimiter = ',', requires = "project")]
    keys: Option<Vec<String>>,
    /// `month` or `day` (calendar, in the account's time zone), or
    /// `rolling_30_days`.
    #[arg(long, default_value = "month")]
    period: String,
    /// Money per period, e.g. 25 or 0.50.
    #[arg(long)]
    money: Option<String>,
    /// Tokens per period (input of all kinds and output).
    #[arg(long)]
    tokens: Option<u64>,
    /// Drop the budget (a project keeps its keys; one with neither goes).
    #[arg(long, conflicts_with_all = ["money", "tokens"])]
    clear: bool,
}

/// Options of `admin set-alerts`.
#[derive(Debug, Args)]
pub struct SetAlertsArgs {
    #[command(flatten)]
    change: ChangeArgs,
    /// Alert when the money left goes below each amount, e.g. 10,1.
    #[arg(long, value_delimiter = ',')]
    balance_below: Vec<String>,
    /// Percentages of the period's allowance used, e.g. 50,80,100.
    #[arg(long, value_delimiter = ',')]
    allowance_used: Vec<u32>,
    /// Percentages of a pack used.
    #[arg(long, value_delimiter = ',')]
    pack_used: Vec<u32>,
    /// Percentages of a budget counted.
    #[arg(long, value_delimiter = ',')]
    budget_used: Vec<u32>,
    /// Days before a pack with tokens left expires.
    #[arg(long, default_value_t = 0)]
    pack_expiring_days: u32,
    /// When debt begins.
    #[arg(long)]
    debt_started: bool,
    /// Drop the account's own thresholds: its plan's apply again.
    #[arg(long, conflicts_with_all = ["balance_below", "allowance_used", "pack_used", "budget_used", "pack_expiring_days", "debt_started"])]
    plan: bool,
}

/// Runs an `admin` subcommand.
pub async fn run(cmd: AdminCmd) -> anyhow::Result<ExitCode> {
    let outcome = match cmd {
        AdminCmd::Token { operator, role } => return token(&operator, role),
        AdminCmd::Accounts(AccountsCmd::Show(a)) => show(a, false).await,
        AdminCmd::Holds(HoldsCmd::List(a)) => show(a, true).await,
        other => change(other).await,
    };
    Ok(match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Call(status)) => {
            eprintln!("error: {}: {}", code_name(status.code()), status.message());
            ExitCode::from(exit_code(status.code()))
        }
        Err(Failure::Connect(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(6)
        }
    })
}

/// Why a command did not complete.
enum Failure {
    /// The command line or a file named in it.
    Input(String),
    /// The admin API answered with an error.
    Call(Status),
    /// Tollgate could not be reached.
    Connect(String),
}

impl From<Status> for Failure {
    fn from(status: Status) -> Failure {
        Failure::Call(status)
    }
}

fn exit_code(code: Code) -> u8 {
    match code {
        Code::InvalidArgument | Code::OutOfRange => 2,
        Code::NotFound => 3,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => 4,
        Code::Unauthenticated | Code::PermissionDenied => 5,
        Code::Unavailable | Code::DeadlineExceeded => 6,
        _ => 1,
    }
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
}

fn token(operator: &str, role: Role) -> anyhow::Result<ExitCode> {
    if operator.trim().is_empty() || operator.len() > 128 || operator.chars().any(char::is_control) {
        eprintln!("error: --operator must be 1 to 128 printable characters");
        return Ok(ExitCode::from(2));
    }
    let (token, hash) = new_token().map_err(|e| anyhow::anyhow!("no randomness from the system: {e}"))?;
    println!("{token}");
    eprintln!(
        "The line above is the token: hand it to {operator}; it is stored nowhere.\n\
         Configure its hash (in the config's [admin] section, or a tokens file without the `admin.`):\n\n\
         [[admin.tokens]]\noperator = {operator:?}\nrole = \"{role}\"\nsha256 = \"{hash}\"\n"
    );
    Ok(ExitCode::SUCCESS)
}

/// The token in `path`, refused (as ssh refuses a private key) while the
/// file's group or others may read or write it.
fn read_token_file(path: &std::path::Path) -> Result<String, Failure> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let failed = |e: std::io::Error| Failure::Input(format!("--token-file {}: {e}", path.display()));
    // The mode of the file opened, not of whatever the path names later.
    let mut file = std::fs::File::open(path).map_err(failed)?;
    let mode = file.metadata().map_err(failed)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(Failure::Input(format!(
            "--token-file {}: its group or others may read or change it (mode {:o}); chmod 600 {0} \
             (a Kubernetes secret: defaultMode 0400)",
            path.display(),
            mode & 0o777
        )));
    }
    let mut token = String::new();
    file.read_to_string(&mut token).map_err(failed)?;
    Ok(token.trim().to_owned())
}

async fn connect(endpoint: &AdminEndpoint) -> Result<AdminClient, Failure> {
    let token = match (&endpoint.token, &endpoint.token_file) {
        (Some(t), _) => Some(t.trim().to_owned()),
        (None, Some(path)) => Some(read_token_file(path)?),
        (None, None) => None,
    };
    let bearer = match token {
        Some(t) => Bearer::new(&t).map_err(|_| Failure::Input("the token is not valid header text".into()))?,
        None => Bearer::default(),
    };
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| Failure::Input(format!("--{flag} {}: {e}", path.display())))
    };
    let tls = if endpoint.addr.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &endpoint.ca_cert {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read("ca-cert", ca)?));
        }
        if let (Some(cert), Some(key)) = (&endpoint.cert, &endpoint.key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read("cert", cert)?,
                read("key", key)?,
            ));
        }
        Some(tls)
    } else {
        None
    };
    let channel = crate::transport::channel::connect_with(&endpoint.addr, tls)
        .await
        .map_err(|e| Failure::Connect(format!("connecting to {}: {}", endpoint.addr, causes(&e))))?;
    Ok(crate::transport::channel::admin_client(channel, bearer))
}

/// An error with its causes, outermost first ("transport error: ...").
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

fn money(flag: &str, text: &str) -> Result<proto::Money, Failure> {
    let amount: crate::engine::Money = text
        .trim()
        .parse()
        .map_err(|e| Failure::Input(format!("{flag} {text}: {e}")))?;
    Ok(crate::api::convert::money_out(amount))
}

async fn show(a: AccountArgs, holds_only: bool) -> Result<(), Failure> {
    let mut client = connect(&a.endpoint).await?;
    let detail = client
        .get_account(proto::GetAccountRequest { account_id: a.account })
        .await?
        .into_inner();
    if holds_only {
        print_holds(&detail.holds, a.endpoint.json);
    } else {
        print_detail(&detail, a.endpoint.json);
    }
    Ok(())
}

async fn change(cmd: AdminCmd) -> Result<(), Failure> {
    let detail = match cmd {
        AdminCmd::Accounts(AccountsCmd::Create(a)) => {
            let c = a.change;
            let mut client = connect(&c.endpoint).await?;
            let r = proto::CreateAccountRequest {
                account_id: c.account,
                plan: a.plan,
                time_zone: a.time_zone,
                credit_limit: a
                    .credit_limit
                    .as_deref()
                    .map(|m| money("--credit-limit", m))
                    .transpose()?,
                anchor: 0,
                adjustment_id: c.adjustment_id,
                reason: c.reason,
            };
            (client.create_account(r).await?.into_inner(), c.endpoint.json)
        }
        AdminCmd::Topup(a) => {
            let c = a.change;
            let mut client = connect(&c.endpoint).await?;
            let pool = if a.promo {
                proto::MoneyPool::Promo
            } else {
                proto::MoneyPool::Paid
            };
            let r = proto::TopUpRequest {
                account_id: c.account,
                adjustment_id: c.adjustment_id,
                pool: pool as i32,
                amount: Some(money("--amount", &a.amount)?),
                reason: c.reason,
                ..Default::default()
            };
            (client.top_up(r).await?.into_inner(), c.endpoint.json)
        }
        AdminCmd::Adjust(a) => {
            let c = a.change;
            let mut client = connect(&c.endpoint).await?;
            let r = proto::AdjustMoneyRequest {
                account_id: c.account,
                adjustment_id: c.adjustment_id,
                amount: Some(money("--amount", &a.amount)?),
                reason: c.reason,
            };
            (client.adjust_money(r).await?.into_inner(), c.endpoint.json)
        }
        AdminCmd::GrantPack(a) => {
            let c = a.change;
            let mut client = connect(&c.endpoint).await?;
            let r = proto::GrantPackRequest {
                account_id: c.account,
                pack_id: a.pack,
                tokens: a.tokens,
                expires_at: Some(crate::api::convert::timestamp_out(a.expires_at)),
                models: a.models,
                priority: 0,
                reason: c.reason,
                adjustment_id: c.adjustment_id,
            };
            (client.grant_pack(r).await?.into_inner(), c.endpoint.json)
        }
        AdminCmd::RevokePack(a) => {
            let c = a.change;
            let mut client = connect(&c.endpoint).await?;
            let r = proto::RevokePackRequest {
                account_id: c.account,
                pack_id: a.pack,
                reason: c.reason,
                adjustment_id: c.adjustment_id,
            };
            (client.revoke_pack(r).await?.into_inner(), c.endpoint.json)
        }
        AdminCmd::SetPlan(a) => {
            let c = a.change;
            let mut client = connect(&c.endpoint).await?;
            let r = proto::AssignPlanRequest {
                account_id: c.account,
                plan: a.plan,
                adjustment_id: c.adjustment_id,
                reason: c.reason,
                ..Default::default()
            };
            (client.assign_plan(r).await?.into_inner(), c.endpoint.json)
        }
        AdminCmd::SetLimit(a) => set_limit(a).await?,
        AdminCmd::SetBudget(a) => set_budget(a).await?,
        AdminCmd::SetAlerts(a) => {
            let c = a.change;
            let alerts = (!a.plan)
                .then(|| -> Result<proto::AlertSettings, Failure> {
                    Ok(proto::AlertSettings {
                        balance_below: a
                            .balance_below
                            .iter()
                            .map(|m| money("--balance-below", m))
                            .collect::<Result<_, _>>()?,
                        allowance_used_percent: a.allowance_used,
                        pack_used_percent: a.pack_used,
                        budget_used_percent: a.budget_used,
                        pack_expiring_days: a.pack_expiring_days,
                        debt_started: a.debt_started,
                    })
                })
                .transpose()?;
            let mut client = connect(&c.endpoint).await?;
            let r = proto::SetAlertsRequest {
                account_id: c.account,
                alerts,
                adjustment_id: c.adjustment_id,
                reason: c.reason,
            };
            (client.set_alerts(r).await?.into_inner(), c.endpoint.json)
        }
        AdminCmd::Refund(a) => {
            let c = a.change;
            let text = if a.record.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&a.record)
            }
            .map_err(|e| Failure::Input(format!("--record {}: {e}", a.record.display())))?;
            let record: crate::engine::UsageRecord = serde_json::from_str(text.trim())
                .map_err(|e| Failure::Input(format!("--record {}: not a usage record: {e}", a.record.display())))?;
            if record.account_id.as_str() != c.account {
                return Err(Failure::Input(format!(
                    "the record charged account {}, not {}",
                    record.account_id, c.account
                )));
            }
            let mut client = connect(&c.endpoint).await?;
            let r = proto::RefundRequest {
                account_id: c.account,
                request_id: record.request_id.to_string(),
                kind: record.kind.as_str().to_owned(),
                charges: crate::api::convert::takes_out(&record.charges),
                reason: c.reason,
                adjustment_id: c.adjustment_id,
                settled_at: Some(crate::api::convert::timestamp_out(record.settled_at)),
            };
            (client.refund(r).await?.into_inner(), c.endpoint.json)
        }
        AdminCmd::Suspend(c) => {
            let mut client = connect(&c.endpoint).await?;
            let r = proto::SuspendRequest {
                account_id: c.account,
                reason: c.reason,
                adjustment_id: c.adjustment_id,
            };
            (client.suspend(r).await?.into_inner(), c.endpoint.json)
        }
        AdminCmd::Resume(c) => {
            let mut client = connect(&c.endpoint).await?;
            let r = proto::ResumeRequest {
                account_id: c.account,
                reason: c.reason,
                adjustment_id: c.adjustment_id,
            };
            (client.resume(r).await?.into_inner(), c.endpoint.json)
        }
        AdminCmd::Accounts(AccountsCmd::List { endpoint, after, limit }) => {
            let mut client = connect(&endpoint).await?;
            let page = client
                .list_accounts(proto::ListAccountsRequest {
                    after: after.unwrap_or_default(),
                    limit,
                })
                .await?
                .into_inner();
            if endpoint.json {
                println!(
                    "{}",
                    json!({ "account_ids": page.account_ids, "next_after": page.next_after })
                );
            } else {
                let mut t = table(&["account"]);
                for id in &page.account_ids {
                    t.add_row([id]);
                }
                println!("{t}");
                if !page.next_after.is_empty() {
                    eprintln!("more: --after {}", page.next_after);
                }
            }
            return Ok(());
        }
        AdminCmd::Prices(PricesCmd::List { endpoint }) => {
            let mut client = connect(&endpoint).await?;
            let list = client
                .list_price_versions(proto::ListPriceVersionsRequest {})
                .await?
                .into_inner();
            print_prices(&list, endpoint.json);
            return Ok(());
        }
        AdminCmd::Prices(PricesCmd::Publish {
            endpoint,
            file,
            adjustment_id,
            reason,
        }) => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| Failure::Input(format!("{}: {e}", file.display())))?;
            let versions = crate::config::parse_price_versions(&text)
                .map_err(|e| Failure::Input(format!("{}: {}", file.display(), e.to_string().trim_end())))?;
            let mut client = connect(&endpoint).await?;
            let mut published = Vec::new();
            for version in &versions {
                let r = proto::PublishPriceVersionRequest {
                    version: Some(price_version_out(version)),
                    adjustment_id: match versions.len() {
                        1 => adjustment_id.clone(),
                        _ => format!("{adjustment_id}:{}", version.id),
                    },
                    reason: reason.clone(),
                };
                published = client.publish_price_version(r).await?.into_inner().versions;
                if !endpoint.json {
                    println!("published {}", version.id);
                }
            }
            if endpoint.json {
                println!("{}", json!({ "versions": published }));
            }
            return Ok(());
        }
        AdminCmd::Token { .. } | AdminCmd::Accounts(AccountsCmd::Show(_)) | AdminCmd::Holds(_) => return Ok(()),
    };
    print_detail(&detail.0, detail.1);
    Ok(())
}

/// A client for `c`'s change and the account as it stands, for a change
/// that replaces a whole part of it (overrides, budgets) with an edit.
async fn edit(c: &ChangeArgs) -> Result<(AdminClient, proto::AccountDetail), Failure> {
    let mut client = connect(&c.endpoint).await?;
    let current = client
        .get_account(proto::GetAccountRequest {
            account_id: c.account.clone(),
        })
        .await?
        .into_inner();
    Ok((client, current))
}

async fn set_limit(a: SetLimitArgs) -> Result<(proto::AccountDetail, bool), Failure> {
    let c = a.change;
    let (mut client, current) = edit(&c).await?;
    // The call replaces every override: start from the account's own.
    let mut overrides = current.overrides.unwrap_or_default();
    let set = (!a.clear).then_some(proto::LimitSet {
        requests_per_minute: a.rpm,
        tokens_per_minute: a.tpm,
        concurrent_requests: a.concurrent,
        concurrent_requests_per_sidecar: a.concurrent_per_sidecar,
        ..Default::default()
    });
    match a.scope.as_str() {
        "account" => overrides.account = set,
        "api-key" => overrides.api_key = set,
        "per-model" => overrides.per_model = set,
        other => match other.strip_prefix("model:") {
            Some(model) if !model.is_empty() => {
                match set {
                    Some(set) => overrides.models.insert(model.to_owned(), set),
                    None => overrides.models.remove(model),
                };
            }
            _ => {
                return Err(Failure::Input(format!(
                    "--scope {other}: expected account, api-key, per-model or model:NAME"
                )));
            }
        },
    }
    let r = proto::SetLimitOverridesRequest {
        account_id: c.account,
        overrides: Some(overrides),
        adjustment_id: c.adjustment_id,
        reason: c.reason,
    };
    Ok((client.set_limit_overrides(r).await?.into_inner(), c.endpoint.json))
}

async fn set_budget(a: SetBudgetArgs) -> Result<(proto::AccountDetail, bool), Failure> {
    let c = a.change;
    let budget = match (a.money.as_deref(), a.tokens) {
        _ if a.clear => None,
        (None, None) if a.keys.is_some() => None,
        (None, None) => return Err(Failure::Input("give --money, --tokens or both (or --clear)".into())),
        (money_text, tokens) => Some(proto::Budget {
            period: a.period.clone(),
            money: money_text.map(|m| money("--money", m)).transpose()?,
            tokens: tokens.unwrap_or(0),
        }),
    };
    let (mut client, current) = edit(&c).await?;
    // The call replaces every budget: start from the account's own.
    let mut budgets = current.budgets.unwrap_or_default();
    match (a.api_key, a.project) {
        (Some(key), _) => match budget {
            Some(b) => {
                budgets.api_keys.insert(key, b);
            }
            None => {
                budgets.api_keys.remove(&key);
            }
        },
        (None, Some(project)) => {
            let entry = budgets.projects.entry(project.clone()).or_default();
            if let Some(keys) = a.keys {
                entry.api_key_ids = keys;
            }
            if budget.is_some() || a.clear {
                entry.budget = budget;
            }
            if entry.budget.is_none() && entry.api_key_ids.is_empty() {
                budgets.projects.remove(&project);
            }
        }
        (None, None) => return Err(Failure::Input("give --api-key or --project".into())),
    }
    let r = proto::SetBudgetsRequest {
        account_id: c.account,
        budgets: Some(budgets),
        adjustment_id: c.adjustment_id,
        reason: c.reason,
    };
    Ok((client.set_budgets(r).await?.into_inner(), c.endpoint.json))
}

fn budget_scope(scope: i32) -> &'static str {
    match proto::BudgetScope::try_from(scope) {
        Ok(proto::BudgetScope::Project) => "project",
        _ => "api key",
    }
}

/// Each budget's use, as `admin accounts show` prints it.
fn budget_rows(b: &proto::GetBalanceResponse) -> Vec<[String; 7]> {
    b.budgets
        .iter()
        .map(|u| {
            let money = u
                .money_limit
                .as_ref()
                .map(|limit| format!("{} of {}", decimal(u.money_used.as_ref()), limit.decimal));
            let tokens = (u.tokens_limit > 0).then(|| format!("{} of {}", u.tokens_used, u.tokens_limit));
            [
                budget_scope(u.scope).to_owned(),
                u.id.clone(),
                u.period.clone(),
                money.unwrap_or_default(),
                tokens.unwrap_or_default(),
                time(u.resets_at.as_ref()),
                time(u.runs_out_at.as_ref()),
            ]
        })
        .collect()
}

fn decimal(m: Option<&proto::Money>) -> String {
    m.map_or_else(|| "0".into(), |m| m.decimal.clone())
}

fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| jiff::Timestamp::new(t.seconds, t.nanos).ok())
        .map_or_else(String::new, |t| t.to_string())
}

fn source(kind: i32) -> String {
    proto::SourceKind::try_from(kind)
        .map_or("?", |s| s.as_str_name())
        .trim_start_matches("SOURCE_KIND_")
        .to_lowercase()
}

fn amounts(held: &[proto::SourceAmount]) -> String {
    held.iter()
        .map(|a| {
            let lot = if a.lot_id.is_empty() {
                String::new()
            } else {
                format!("[{}]", a.lot_id)
            };
            match &a.money {
                Some(m) => format!("{}{lot} {}", source(a.source), m.decimal),
                None => format!("{}{lot} {} tokens", source(a.source), a.tokens),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A borderless table with upper-case headers, as every listing prints.
pub(super) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    t.set_header(header.iter().map(|h| h.to_uppercase()));
    t
}

fn detail_json(d: &proto::AccountDetail) -> Value {
    let b = d.balance.clone().unwrap_or_default();
    json!({
        "account_id": d.account_id,
        "plan": d.plan,
        "time_zone": d.time_zone,
        "suspended": d.suspended,
        "credit_limit": decimal(d.credit_limit.as_ref()),
        "period_start": time(d.period_start.as_ref()),
        "period_end": time(d.period_end.as_ref()),
        "balance": {
            "allowance_tokens": b.allowance_tokens,
            "pack_tokens": b.pack_tokens,
            "promo": decimal(b.promo.as_ref()),
            "paid": decimal(b.paid.as_ref()),
            "debt": decimal(b.debt.as_ref()),
            "spendable": decimal(b.spendable.as_ref()),
            "held_money": decimal(b.held_money.as_ref()),
            "held_tokens": b.held_tokens,
            "money_burn_last_hour": decimal(b.money_burn_last_hour.as_ref()),
            "money_burn_last_day": decimal(b.money_burn_last_day.as_ref()),
            "allowance_burn_last_hour": b.allowance_burn_last_hour,
            "allowance_burn_last_day": b.allowance_burn_last_day,
            "money_runs_out_at": time(b.money_runs_out_at.as_ref()),
            "allowance_runs_out_at": time(b.allowance_runs_out_at.as_ref()),
        },
        "lots": d.lots.iter().map(|l| json!({
            "source": source(l.source),
            "lot_id": l.lot_id,
            "tokens": l.tokens,
            "granted": l.granted,
            "available": l.available,
            "held": l.held,
            "charged": l.charged,
            "forfeited": l.forfeited,
            "expires_at": time(l.expires_at.as_ref()),
            "models": l.models,
        })).collect::<Vec<_>>(),
        "holds": d.holds.iter().map(hold_json).collect::<Vec<_>>(),
        "budgets": b.budgets.iter().map(|u| json!({
            "scope": budget_scope(u.scope),
            "id": u.id,
            "period": u.period,
            "money_limit": u.money_limit.as_ref().map(|m| m.decimal.clone()),
            "money_used": decimal(u.money_used.as_ref()),
            "money_spent": decimal(u.money_spent.as_ref()),
            "tokens_spent": u.tokens_spent,
            "tokens_limit": u.tokens_limit,
            "tokens_used": u.tokens_used,
            "resets_at": time(u.resets_at.as_ref()),
            "runs_out_at": time(u.runs_out_at.as_ref()),
        })).collect::<Vec<_>>(),
        "projects": d.budgets.as_ref().map(|b| b.projects.iter().map(|(id, p)| {
            (id.clone(), json!(p.api_key_ids))
        }).collect::<serde_json::Map<_, _>>()).unwrap_or_default(),
        "recent_usage": d.recent_usage.iter().map(|r| json!({
            "kind": r.kind,
            "request_id": r.request_id,
            "model": r.model,
            "total_money": decimal(r.total_money.as_ref()),
            "charges": amounts(&r.charges),
            "settled_at": time(r.settled_at.as_ref()),
        })).collect::<Vec<_>>(),
    })
}

fn print_detail(d: &proto::AccountDetail, as_json: bool) {
    if as_json {
        println!("{}", detail_json(d));
        return;
    }
    let b = d.balance.clone().unwrap_or_default();
    let mut t = table(&["field", "value"]);
    let status = if d.suspended { "suspended" } else { "active" };
    for (k, v) in [
        ("account", d.account_id.clone()),
        ("plan", d.plan.clone()),
        ("status", status.to_owned()),
        ("time zone", d.time_zone.clone()),
        ("paid", decimal(b.paid.as_ref())),
        ("promo", decimal(b.promo.as_ref())),
        ("credit limit", decimal(d.credit_limit.as_ref())),
        ("debt", decimal(b.debt.as_ref())),
        ("spendable", decimal(b.spendable.as_ref())),
        ("allowance tokens", b.allowance_tokens.to_string()),
        ("pack tokens", b.pack_tokens.to_string()),
        ("held money", decimal(b.held_money.as_ref())),
        ("held tokens", b.held_tokens.to_string()),
        ("period end", time(d.period_end.as_ref())),
        ("money burn, last hour", decimal(b.money_burn_last_hour.as_ref())),
        (
            "money burn, per hour over the day",
            decimal(b.money_burn_last_day.as_ref()),
        ),
        ("money runs out", time(b.money_runs_out_at.as_ref())),
        ("allowance burn, last hour", b.allowance_burn_last_hour.to_string()),
        ("allowance runs out", time(b.allowance_runs_out_at.as_ref())),
    ] {
        t.add_row([k.to_owned(), v]);
    }
    println!("{t}");
    if !d.lots.is_empty() {
        let mut t = table(&["source", "lot", "available", "held", "charged", "forfeited", "expires"]);
        for l in &d.lots {
            t.add_row([
                source(l.source),
                l.lot_id.clone(),
                l.available.clone(),
                l.held.clone(),
                l.charged.clone(),
                l.forfeited.clone(),
                time(l.expires_at.as_ref()),
            ]);
        }
        println!("\n{t}");
    }
    let budgets = budget_rows(&b);
    if !budgets.is_empty() {
        let mut t = table(&[
            "budget",
            "id",
            "period",
            "money used",
            "tokens used",
            "resets",
            "runs out",
        ]);
        for row in budgets {
            t.add_row(row);
        }
        println!("\n{t}");
    }
    if !d.holds.is_empty() {
        println!();
        print_holds(&d.holds, false);
    }
}

fn hold_json(h: &proto::Hold) -> Value {
    json!({
        "reservation_id": h.reservation_id,
        "request_id": h.request_id,
        "model": h.model,
        "api_key_id": h.api_key_id,
        "granted_output_tokens": h.granted_output_tokens,
        "held": amounts(&h.held),
        "expires_at": time(h.expires_at.as_ref()),
    })
}

fn print_holds(holds: &[proto::Hold], as_json: bool) {
    if as_json {
        println!("{}", Value::Array(holds.iter().map(hold_json).collect()));
        return;
    }
    let mut t = table(&["reservation", "model", "output tokens", "held", "expires"]);
    for h in holds {
        t.add_row([
            h.reservation_id.clone(),
            h.model.clone(),
            h.granted_output_tokens.to_string(),
            amounts(&h.held),
            time(h.expires_at.as_ref()),
        ]);
    }
    println!("{t}");
}

fn print_prices(list: &proto::ListPriceVersionsResponse, as_json: bool) {
    let rows = list.versions.iter().flat_map(|v| {
        v.models.iter().flat_map(move |m| {
            m.tiers.iter().map(move |t| {
                let p = t.prices.clone().unwrap_or_default();
                (v, m, t, p)
            })
        })
    });
    if as_json {
        let versions: Vec<Value> = rows
            .map(|(v, m, t, p)| {
                json!({
                    "version": v.id,
                    "effective_at": time(v.effective_at.as_ref()),
                    "in_force": v.id == list.in_force,
                    "model": m.model,
                    "service_tier": t.service_tier,
                    "input_per_million": decimal(p.input_per_million.as_ref()),
                    "cached_input_per_million": decimal(p.cached_input_per_million.as_ref()),
                    "cache_write_per_million": decimal(p.cache_write_per_million.as_ref()),
                    "output_per_million": decimal(p.output_per_million.as_ref()),
                })
            })
            .collect();
        println!("{}", json!({ "in_force": list.in_force, "prices": versions }));
        return;
    }
    let mut t = table(&[
        "version",
        "effective",
        "",
        "model",
        "tier",
        "input/M",
        "cached/M",
        "output/M",
    ]);
    for (v, m, tier, p) in rows {
        t.add_row([
            v.id.clone(),
            time(v.effective_at.as_ref()),
            if v.id == list.in_force {
                "in force".into()
            } else {
                String::new()
            },
            m.model.clone(),
            tier.service_tier.clone(),
            decimal(p.input_per_million.as_ref()),
            decimal(p.cached_input_per_million.as_ref()),
            decimal(p.output_per_million.as_ref()),
        ]);
    }
    println!("{t}");
}
