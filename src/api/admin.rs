//! `tollgate.v1.Admin`: accounts, money, packs, plans, limits, budgets,
//! alerts and prices, for the callers an operator's token or certificate
//! admits (`auth.rs`).
//!
//! Why one file: one handler per admin RPC, each a few lines that validate
//! through `convert.rs` and hand one command to the service; split, the
//! handlers would only repeat the same `mutate` and `detail` around them.

use tonic::{Request, Response, Status};

use std::sync::Arc;

use super::auth::{Operators, Role};
use super::convert::{
    alerts_in, alerts_out, budgets_in, budgets_out, id, ledger_figures, limit_set, money, money_out, opt_id,
    overrides_out, price_version_out, reason, record_out, take_in, takes_out, timestamp, timestamp_out,
};
use super::quota::balance_out;
use super::status::{invalid, status, unexpected};
use crate::engine::budget::Budgets;
use crate::engine::hash::{Map, Set};
use crate::engine::ids::{AccountId, LotId, ModelId, PlanId, RequestId, TierId, VersionId};
use crate::engine::limits::LimitOverrides;
use crate::engine::period::Anchor;
use crate::engine::period::parse_time_zone;
use crate::engine::pricing::price_per_token;
use crate::engine::pricing::{ModelPrices, PriceVersion, PriceWindow, TierPrices, TokenPrices};
use crate::engine::record::{AuditRecord, RecordKind};
use crate::engine::request::{PackGrant, Pool};
use crate::engine::source::SourceRef;
use crate::engine::{Command, Ledger, Reply, Snapshot};
use crate::proto;
use crate::proto::admin_server::Admin;
use crate::service::Tollgate;

/// The control-plane service.
pub struct AdminApi {
    tollgate: Tollgate,
    credentials: Arc<Operators>,
}

impl AdminApi {
    /// Serves `tollgate` to the callers `credentials` allow.
    pub fn new(tollgate: Tollgate, credentials: Arc<Operators>) -> AdminApi {
        AdminApi { tollgate, credentials }
    }

    /// The caller of `request` if they may make a call that needs `role`;
    /// decided before anything in the request is looked at.
    fn caller<T>(&self, request: &Request<T>, role: Role) -> Result<Caller, Status> {
        let principal = self.credentials.authorize(request, role)?;
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        Ok(Caller {
            operator: principal.operator,
            peer,
        })
    }

    async fn detail(&self, account: &AccountId) -> Result<Response<proto::AccountDetail>, Status> {
        let Reply::Snapshot(s) = self.tollgate.apply(account, Command::Snapshot).await.map_err(status)? else {
            return Err(unexpected("GetAccount"));
        };
        Ok(Response::new(detail_out(&s)))
    }

    /// Applies an operator's change with its audit record (on the usage
    /// stream and sink), and logs it on the `audit` target.
    async fn mutate(
        &self,
        caller: Caller,
        account: &AccountId,
        command: Command,
        why: Adjustment,
    ) -> Result<Response<proto::AccountDetail>, Status> {
        let operation = command.name();
        let audit = caller.audit(Some(account), operation, why, format!("{command:?}"));
        let logged = audit.clone();
        self.tollgate
            .apply_admin(account, command, audit)
            .await
            .map_err(status)?;
        log_change(&logged, "admin change applied");
        self.detail(account).await
    }
}

/// Logs an operator's change on the `audit` target: who, from where, on
/// what, under which id, why, and the change in full (a field each, so a
/// reason cannot pass for another line).
fn log_change(audit: &AuditRecord, message: &'static str) {
    tracing::info!(
        target: "audit",
        operator = %audit.operator,
        peer = %audit.peer,
        account = audit.account_id.as_ref().map(|a| a.as_str()),
        operation = %audit.operation,
        adjustment = %audit.adjustment_id,
        reason = %audit.reason,
        change = %audit.change,
        "{message}"
    );
}

/// An operator's change's id and reason, both required.
struct Adjustment {
    id: LotId,
    reason: String,
}

fn adjustment(id_text: &str, why: &str) -> Result<Adjustment, Status> {
    Ok(Adjustment {
        id: id("adjustment_id", id_text, LotId::parse)?,
        reason: reason(why)?,
    })
}

/// Who called: the operator their credential names, and the peer address.
struct Caller {
    operator: String,
    peer: String,
}

impl Caller {
    /// The audit record of this caller's `change` (the `operation`), on
    /// `account` if it is on one; its instant is set where it is applied.
    fn audit(self, account: Option<&AccountId>, operation: &str, why: Adjustment, change: String) -> AuditRecord {
        AuditRecord {
            kind: "audit".into(),
            account_id: account.cloned(),
            operator: self.operator,
            peer: self.peer,
            operation: operation.into(),
            adjustment_id: why.id.to_string(),
            reason: why.reason,
            change,
            ..AuditRecord::default()
        }
    }
}

fn account_id(text: &str) -> Result<AccountId, Status> {
    id("account_id", text, AccountId::parse)
}

fn anchor(value: i32) -> Result<Option<Anchor>, Status> {
    match proto::PeriodAnchor::try_from(value) {
        Ok(proto::PeriodAnchor::Unspecified) => Ok(None),
        Ok(proto::PeriodAnchor::Calendar) => Ok(Some(Anchor::Calendar)),
        Ok(proto::PeriodAnchor::Anniversary) => Ok(Some(Anchor::Anniversary)),
        Err(_) => Err(invalid("anchor", format!("unknown value {value}"))),
    }
}

fn lot_out(source: proto::SourceKind, lot_id: String, ledger: &Ledger, tokens: bool) -> proto::Lot {
    let [granted, available, held, charged, forfeited] = ledger_figures(ledger, tokens);
    proto::Lot {
        source: source as i32,
        lot_id,
        tokens,
        granted,
        available,
        held,
        charged,
        forfeited,
        ..Default::default()
    }
}

fn detail_out(s: &Snapshot) -> proto::AccountDetail {
    let a = &s.account;
    let mut lots = Vec::new();
    if let Some(period) = a.current_period() {
        let source = SourceRef::Allowance { period };
        lots.push(lot_out(
            proto::SourceKind::Allowance,
            source.lot().unwrap_or_default(),
            &a.allowance,
            true,
        ));
    }
    for (id, lot, is_pack) in &s.lots {
        let kind = if *is_pack {
            proto::SourceKind::Pack
        } else {
            proto::SourceKind::Promo
        };
        let mut out = lot_out(kind, id.to_string(), &lot.ledger, *is_pack);
        out.expires_at = lot.expires_at.map(timestamp_out);
        let mut models: Vec<String> = lot.models.iter().flatten().map(ToString::to_string).collect();
        models.sort();
        out.models = models;
        out.priority = lot.priority;
        lots.push(out);
    }
    lots.push(lot_out(proto::SourceKind::Paid, String::new(), &a.paid, false));
    lots.push(lot_out(proto::SourceKind::Debt, String::new(), &a.debt, false));
    proto::AccountDetail {
        account_id: a.id.to_string(),
        plan: a.plan.to_string(),
        time_zone: a.time_zone.iana_name().unwrap_or("UTC").to_owned(),
        suspended: a.suspended,
        credit_limit: Some(money_out(a.credit_limit)),
        period_start: s.period.map(|w| timestamp_out(w.start)),
        period_end: s.period.map(|w| timestamp_out(w.end)),
        lots,
        holds: s
            .holds
            .iter()
            .map(|(id, h)| proto::Hold {
                reservation_id: id.to_string(),
                request_id: h.request_id.to_string(),
                model: h.model.to_string(),
                api_key_id: h.api_key_id.as_ref().map(ToString::to_string).unwrap_or_default(),
                granted_output_tokens: h.granted_output,
                held: takes_out(&h.takes),
                expires_at: Some(timestamp_out(h.expires_at)),
            })
            .collect(),
        recent_usage: a.traffic().recent.iter().map(|r| record_out(r)).collect(),
        balance: Some(balance_out(&a.id, &s.balance)),
        overrides: Some(overrides_out(a.overrides())),
        budgets: Some(budgets_out(a.budgets.as_deref().unwrap_or(&Budgets::default()))),
        alerts: a.alert_overrides.as_deref().map(alerts_out),
    }
}

fn token_prices(field: &str, p: Option<&proto::TokenPrices>) -> Result<TokenPrices, Status> {
    let p = p.ok_or_else(|| invalid(field, "is required"))?;
    let one = |name: &str, m: Option<&proto::Money>| {
        let path = format!("{field}.{name}");
        let per_million = money(&path, m)?;
        price_per_token(per_million).map_err(|e| invalid(&path, e))
    };
    Ok(TokenPrices {
        input: one("input_per_million", p.input_per_million.as_ref())?,
        cached_input: one("cached_input_per_million", p.cached_input_per_million.as_ref())?,
        cache_write: one("cache_write_per_million", p.cache_write_per_million.as_ref())?,
        output: one("output_per_million", p.output_per_million.as_ref())?,
    })
}

fn price_version(v: Option<&proto::PriceVersion>) -> Result<PriceVersion, Status> {
    let v = v.ok_or_else(|| invalid("version", "is required"))?;
    let mut models = Map::default();
    for (i, m) in v.models.iter().enumerate() {
        let path = format!("version.models[{i}]");
        let model = id(&format!("{path}.model"), &m.model, ModelId::parse)?;
        // 0 means one for one; the bound is checked with the version below.
        let weight_milli = match m.token_weight_milli {
            0 => 1000,
            w => w,
        };
        let mut tiers = Map::default();
        for (j, t) in m.tiers.iter().enumerate() {
            let tpath = format!("{path}.tiers[{j}]");
            let tier = id(&format!("{tpath}.service_tier"), &t.service_tier, TierId::parse)?;
            let base = token_prices(&format!("{tpath}.prices"), t.prices.as_ref())?;
            let mut context_tiers = Vec::new();
            for (k, c) in t.context_tiers.iter().enumerate() {
                let prices = token_prices(&format!("{tpath}.context_tiers[{k}].prices"), c.prices.as_ref())?;
                context_tiers.push((c.min_prompt_tokens, prices));
            }
            if tiers.insert(tier.clone(), TierPrices { base, context_tiers }).is_some() {
                return Err(invalid(&tpath, format!("service tier {tier} appears twice")));
            }
        }
        if models
            .insert(model.clone(), ModelPrices { weight_milli, tiers })
            .is_some()
        {
            return Err(invalid(&path, format!("model {model} appears twice")));
        }
    }
    let mut windows = Vec::new();
    for (i, w) in v.windows.iter().enumerate() {
        let path = format!("version.windows[{i}]");
        let time_zone = parse_time_zone(&w.time_zone).map_err(|e| invalid(&format!("{path}.time_zone"), e))?;
        let models: Set<ModelId> = w
            .models
            .iter()
            .map(|m| id(&format!("{path}.models"), m, ModelId::parse))
            .collect::<Result<_, _>>()?;
        if w.price_percent > 1000 {
            return Err(invalid(&format!("{path}.price_percent"), "must be at most 1000"));
        }
        windows.push(PriceWindow {
            name: w.name.clone(),
            start_minute: w.start_minute,
            end_minute: w.end_minute,
            time_zone,
            price_percent: w.price_percent,
            models: (!models.is_empty()).then_some(models),
        });
    }
    let version = PriceVersion {
        id: id("version.id", &v.id, VersionId::parse)?,
        effective_at: timestamp("version.effective_at", v.effective_at.as_ref())?,
        models,
        windows,
    };
    let problems = version.problems();
    if !problems.is_empty() {
        return Err(invalid("version", problems.join("; ")));
    }
    Ok(version)
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn create_account(
        &self,
        request: Request<proto::CreateAccountRequest>,
    ) -> Result<Response<proto::AccountDetail>, Status> {
        let caller = self.caller(&request, Role::Write)?;
        let r = request.into_inner();
        let account = account_id(&r.account_id)?;
        let why = adjustment(&r.adjustment_id, &r.reason)?;
        let plan = id("plan", &r.plan, PlanId::parse)?;
        let time_zone = parse_time_zone(&r.time_zone).map_err(|e| invalid("time_zone", e))?;
        let credit_limit = match &r.credit_limit {
            None => crate::engine::Money::ZERO,
            Some(m) => money("credit_limit", Some(m))?,
        };
        let anchor = anchor(r.anchor)?;
        let command = format!(
            "CreateAccount {{ plan: {plan}, time_zone: {time_zone:?}, anchor: {anchor:?}, credit_limit: {credit_limit} }}"
        );
        let audit = caller.audit(Some(&account), "create_account", why, command);
        let logged = audit.clone();
        self.tollgate
            .open_account(account.clone(), &plan, time_zone, anchor, credit_limit, Some(audit))
            .await
            .map_err(status)?;
        log_change(&logged, "account created");
        self.detail(&account).await
    }

    async fn update_account(
        &self,
        request: Request<proto::UpdateAccountRequest>,
    ) -> Result<Response<proto::AccountDetail>, Status> {
        let caller = self.caller(&request, Role::Write)?;
        let r = request.into_inner();
        let account = account_id(&r.account_id)?;
        let why = adjustment(&r.adjustment_id, &r.reason)?;
        let time_zone = match &r.time_zone {
            None => None,
            Some(tz) => Some(parse_time_zone(tz).map_err(|e| invalid("time_zone", e))?),
        };
        let credit_limit = match &r.credit_limit {
            None => None,
            Some(m) => Some(money("credit_limit", Some(m))?),
        };
        self.mutate(
            caller,
            &account,
            Command::Update {
                time_zone,
                credit_limit,
            },
            why,
        )
        .await
    }

    async fn top_up(&self, request: Request<proto::TopUpRequest>) -> Result<Response<proto::AccountDetail>, Status> {
        let caller = self.caller(&request, Role::Write)?;
        let r = request.into_inner();
        let account = account_id(&r.account_id)?;
        let why = adjustment(&r.adjustment_id, &r.reason)?;
        let amount = money("amount", r.amount.as_ref())?;
        let pool = match proto::MoneyPool::try_from(r.pool) {
            Ok(proto::MoneyPool::Paid) => {
                if r.expires_at.is_some() {
                    return Err(invalid("expires_at", "applies to promo top-ups only"));
                }
                Pool::Paid
            }
            Ok(proto::MoneyPool::Promo) => Pool::Promo {
                expires_at: r
                    .expires_at
                    .as_ref()
                    .map(|t| timestamp("expires_at", Some(t)))
                    .transpose()?,
                priority: r.priority,
            },
            Ok(proto::MoneyPool::Unspecified) => {
                return Err(invalid("pool", "is required (PAID or PROMO)"));
            }
            Err(_) => return Err(invalid("pool", format!("unknown value {}", r.pool))),
        };
        self.mutate(
            caller,
            &account,
            Command::TopUp {
                operation_id: why.id.clone(),
                pool,
                amount,
            },
            why,
        )
        .await
    }

    async fn adjust_money(
        &self,
        request: Request<proto::AdjustMoneyRequest>,
    ) -> Result<Response<proto::AccountDetail>, Status> {
        let caller = self.caller(&request, Role::Write)?;
        let r = request.into_inner();
        let account = account_id(&r.account_id)?;
        let why = adjustment(&r.adjustment_id, &r.reason)?;
        let amount = money("amount", r.amount.as_ref())?;
        let operation_id = why.id.clone();
        self.mutate(caller, &account, Command::Adjust { operation_id, amount }, why)
            .await
    }

    async fn grant_pack(
        &self,
        request: Request<proto::GrantPackRequest>,
    ) -> Result<Response<proto::AccountDetail>, Status> {
        let caller = self.caller(&request, Role::Write)?;
        let r = request.into_inner();
        let account = account_id(&r.account_id)?;
        let why = adjustment(&r.adjustment_id, &r.reason)?;
        let models: std::collections::BTreeSet<ModelId> = r
            .models
            .iter()
            .map(|m| id("models", m, ModelId::parse))
            .collect::<Result<_, _>>()?;
        let grant = PackGrant {
            pack_id: id("pack_id", &r.pack_id, LotId::parse)?,
            tokens: r.tokens,
            expires_at: timestamp("expires_at", r.expires_at.as_ref())?,
            models: (!models.is_empty()).then_some(models),
            priority: r.priority,
        };
        self.mutate(caller, &account, Command::GrantPack(grant), why).await
    }

    async fn revoke_pack(
        &self,
        request: Request<proto::RevokePackRequest>,
    ) -> Result<Response<proto::AccountDetail>, Status> {
        let caller = self.caller(&request, Role::Write)?;
        let r = request.into_inner();
        let account = account_id(&r.account_id)?;
        let pack = id("pack_id", &r.pack_id, LotId::parse)?;
        let why = adjustment(&r.adjustment_id, &r.reason)?;
        self.mutate(caller, &account, Command::RevokePack(pack), why).await
    }

    async fn assign_plan(
        &self,
        request: Request<proto::AssignPlanRequest>,
    ) -> Result<Response<proto::AccountDetail>, Status> {
        let caller = self.caller(&request, Role::Write)?;
        let r = request.into_inner();
        let account = account_id(&r.account_id)?;
        let plan = id("plan", &r.plan, PlanId::parse)?;
        let anchor = anchor(r.anchor)?;
        let why = adjustment(&r.adjustment_id, &r.reason)?;
        self.mutate(caller, &account, Command::AssignPlan { plan, anchor }, why)
            .await
    }

    async fn set_limit_overrides(
        &self,
        request: Request<proto::SetLimitOverridesRequest>,
    ) -> Result<Response<proto::AccountDetail>, Status> {
        let caller = self.caller(&request, Role::Write)?;
        let r = request.into_inner();
        let account = account_id(&r.account_id)?;
        let why = adjustment(&r.adjustment_id, &r.reason)?;
        let o = r.overrides.unwrap_or_default();
        let set = |field: &str, l: &Option<proto::LimitSet>| l.as_ref().map(|l| limit_set(field, l)).transpose();
        let overrides = LimitOverrides {
            account: set("overrides.account", &o.account)?,
            api_key: set("overrides.api_key", &o.api_key)?,
            per_model: set("overrides.per_model", &o.per_model)?,
            models: o
                .models
                .iter()
                .map(|(name, l)| {
                    let field = format!("overrides.models.{name}");
                    Ok((id(&field, name, ModelId::parse)?, limit_set(&field, l)?))
                })
                .collect::<Result<_, Status>>()?,
        };
        self.mutate(caller, &account, Command::SetOverrides(overrides), why)
            .await
    }

    async fn set_budgets(
        &self,
        request: Request<proto::SetBudgetsRequest>,
    ) -> Result<Response<proto::AccountDetail>, Status> {
        let caller = self.caller(&request, Role::Write)?;
        let r = request.into_inner();
        let account = account_id(&r.account_id)?;
        let why = adjustment(&r.adjustment_id, &r.reason)?;
        let budgets = budgets_in(&r.budgets.unwrap_or_default())?;
        budgets.check().map_err(|m| invalid("budgets", m))?;
        self.mutate(caller, &account, Command::SetBudgets(budgets), why).await
    }

    async fn set_alerts(
        &self,
        request: Request<proto::SetAlertsRequest>,
    ) -> Result<Response<proto::AccountDetail>, Status> {
        let caller = self.caller(&request, Role::Write)?;
        let r = request.into_inner();
        let account = account_id(&r.account_id)?;
        let why = adjustment(&r.adjustment_id, &r.reason)?;
        let alerts = r.alerts.as_ref().map(alerts_in).transpose()?;
        if let Some(a) = &alerts {
            crate::engine::alert::check(a).map_err(|e| status(e.into()))?;
        }
        self.mutate(caller, &account, Command::SetAlerts(alerts), why).await
    }

    async fn refund(&self, request: Request<proto::RefundRequest>) -> Result<Response<proto::AccountDetail>, Status> {
        let caller = self.caller(&request, Role::Write)?;
        let r = request.into_inner();
        let account = account_id(&r.account_id)?;
        let why = adjustment(&r.adjustment_id, &r.reason)?;
        let request_id = id("request_id", &r.request_id, RequestId::parse)?;
        let kind: RecordKind = r.kind.parse().map_err(|e: String| invalid("kind", e))?;
        let charges = r
            .charges
            .iter()
            .enumerate()
            .map(|(i, c)| take_in(&format!("charges[{i}]"), c))
            .collect::<Result<Vec<_>, _>>()?;
        let settled_at = timestamp("settled_at", r.settled_at.as_ref())?;
        let command = Command::Refund {
            request_id,
            kind,
            charges,
            settled_at,
            recorded: None,
        };
        self.mutate(caller, &account, command, why).await
    }

    async fn suspend(&self, request: Request<proto::SuspendRequest>) -> Result<Response<proto::AccountDetail>, Status> {
        let caller = self.caller(&request, Role::Write)?;
        let r = request.into_inner();
        let account = account_id(&r.account_id)?;
        let why = adjustment(&r.adjustment_id, &r.reason)?;
        self.mutate(caller, &account, Command::SetSuspended(true), why).await
    }

    async fn resume(&self, request: Request<proto::ResumeRequest>) -> Result<Response<proto::AccountDetail>, Status> {
        let caller = self.caller(&request, Role::Write)?;
        let r = request.into_inner();
        let account = account_id(&r.account_id)?;
        let why = adjustment(&r.adjustment_id, &r.reason)?;
        self.mutate(caller, &account, Command::SetSuspended(false), why).await
    }

    async fn publish_price_version(
        &self,
        request: Request<proto::PublishPriceVersionRequest>,
    ) -> Result<Response<proto::PublishPriceVersionResponse>, Status> {
        let caller = self.caller(&request, Role::Write)?;
        let r = request.into_inner();
        let why = adjustment(&r.adjustment_id, &r.reason)?;
        let version = price_version(r.version.as_ref())?;
        let id = version.id.to_string();
        let audit = caller.audit(None, "publish_price_version", why, format!("{version:?}"));
        let published = self.tollgate.publish(version, audit).await.map_err(status)?;
        if let Some(audit) = &published.audit {
            log_change(audit, "price version published");
        }
        let versions = published.versions;
        Ok(Response::new(proto::PublishPriceVersionResponse {
            id,
            versions: versions.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn get_account(
        &self,
        request: Request<proto::GetAccountRequest>,
    ) -> Result<Response<proto::AccountDetail>, Status> {
        self.caller(&request, Role::Read)?;
        let account = account_id(&request.into_inner().account_id)?;
        self.detail(&account).await
    }

    async fn list_accounts(
        &self,
        request: Request<proto::ListAccountsRequest>,
    ) -> Result<Response<proto::ListAccountsResponse>, Status> {
        self.caller(&request, Role::Read)?;
        let r = request.into_inner();
        let after = opt_id("after", &r.after, AccountId::parse)?;
        let limit = match r.limit {
            0 => 100,
            n @ 1..=1000 => n as usize,
            n => return Err(invalid("limit", format!("must be at most 1000, got {n}"))),
        };
        let ids = self
            .tollgate
            .list_accounts(after.as_ref(), limit)
            .await
            .map_err(status)?;
        let next_after = if ids.len() == limit {
            ids.last().map(ToString::to_string).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(proto::ListAccountsResponse {
            account_ids: ids.iter().map(ToString::to_string).collect(),
            next_after,
        }))
    }

    async fn list_price_versions(
        &self,
        request: Request<proto::ListPriceVersionsRequest>,
    ) -> Result<Response<proto::ListPriceVersionsResponse>, Status> {
        self.caller(&request, Role::Read)?;
        let catalog = self.tollgate.catalog();
        let in_force = catalog.prices.in_force(self.tollgate.now());
        Ok(Response::new(proto::ListPriceVersionsResponse {
            versions: catalog.prices.versions().iter().map(|v| price_version_out(v)).collect(),
            in_force: in_force.map(|v| v.id.to_string()).unwrap_or_default(),
        }))
    }
}
