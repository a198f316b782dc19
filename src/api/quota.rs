//! `tollgate.v1.Quota`: what a model server calls around each generation.

use std::time::Instant;

use tonic::{Request, Response, Status};

use super::convert::{
    DenialOut, budget_use_out, denial_out, id, money, money_out, opt_id, rate_status_out, record_out, takes_out, tier,
    timestamp_out, tokens, usage,
};
use super::status::{invalid, status, unexpected};
use crate::engine::ids::{AccountId, ApiKeyId, ModelId, RequestId, ReservationId};
use crate::engine::limits::RateStatus;
use crate::engine::request::{ChargeOutcome, ChargeWhat, Denial, ReserveOutcome};
use crate::engine::{ChargeRequest, Command, Money, Reply, ReserveRequest};
use crate::proto;
use crate::proto::quota_server::Quota;
use crate::service::Tollgate;
use crate::store::StoreError;
use crate::telemetry::metrics::{code_label, metrics};
use crate::telemetry::note_ids;

/// The data-plane service.
pub struct QuotaApi {
    tollgate: Tollgate,
}

impl QuotaApi {
    /// Serves `tollgate`.
    pub fn new(tollgate: Tollgate) -> QuotaApi {
        QuotaApi { tollgate }
    }
}

fn denied(denial: Denial, message: String, limits: &RateStatus) -> proto::ReserveResponse {
    let out = denial_out(&denial);
    proto::ReserveResponse {
        decision: proto::Decision::Deny as i32,
        deny_reason: out.reason as i32,
        message,
        limit: out.limit,
        retry_after: out.retry_after,
        budget: out.budget,
        rate_limits: Some(rate_status_out(limits)),
        ..Default::default()
    }
}

fn account_and_reservation(account: &str, reservation: &str) -> Result<(AccountId, ReservationId), Status> {
    Ok((
        id("account_id", account, AccountId::parse)?,
        id("reservation_id", reservation, ReservationId::parse)?,
    ))
}

/// The header gRPC's retry machinery sets on a call it sends again (gRFC
/// A6). Clients cannot set `grpc-` headers themselves.
pub const PREVIOUS_RPC_ATTEMPTS: &str = "grpc-previous-rpc-attempts";

/// The header Tollgate's clients set on a call they send again after an
/// unknown outcome: how many attempts came before it.
pub const PREVIOUS_ATTEMPTS: &str = "tollgate-previous-attempts";

/// Whether the client sent `request` again after an unknown outcome.
fn resent<T>(request: &Request<T>) -> bool {
    [PREVIOUS_ATTEMPTS, PREVIOUS_RPC_ATTEMPTS].iter().any(|header| {
        request
            .metadata()
            .get(*header)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .is_some_and(|n| n > 0)
    })
}

impl QuotaApi {
    /// Runs a client's `command`, as a resend if it is one.
    async fn apply(&self, account: &AccountId, command: Command, resent: bool) -> Result<Reply, StoreError> {
        if resent {
            self.tollgate.apply_resent(account, command).await
        } else {
            self.tollgate.apply(account, command).await
        }
    }

    async fn answer_reserve(
        &self,
        request: Request<proto::ReserveRequest>,
    ) -> Result<Response<proto::ReserveResponse>, Status> {
        let resent = resent(&request);
        let r = request.into_inner();
        note_ids(&r.account_id, &r.request_id);
        let account = id("account_id", &r.account_id, AccountId::parse)?;
        let req = ReserveRequest {
            request_id: id("request_id", &r.request_id, RequestId::parse)?,
            api_key_id: opt_id("api_key_id", &r.api_key_id, ApiKeyId::parse)?,
            model: id("model", &r.model, ModelId::parse)?,
            tier: tier(&r.service_tier)?,
            input_tokens: tokens("input_tokens", r.input_tokens)?,
            cached_input_tokens: tokens("cached_input_tokens", r.cached_input_tokens)?,
            max_output_tokens: tokens("max_output_tokens", r.max_output_tokens)?,
        };
        let outcome = match self.apply(&account, Command::Reserve(req), resent).await {
            Ok(Reply::Reserve(outcome)) => outcome,
            Ok(_) => return Err(unexpected("Reserve")),
            Err(StoreError::UnknownAccount(id)) => {
                let message = format!("account {id} does not exist");
                return Ok(Response::new(denied(
                    Denial::UnknownAccount,
                    message,
                    &RateStatus::default(),
                )));
            }
            Err(e) => return Err(status(e)),
        };
        Ok(Response::new(match outcome {
            ReserveOutcome::Denied {
                denial,
                message,
                limits,
            } => denied(denial, message, &limits),
            ReserveOutcome::Allowed(r) => proto::ReserveResponse {
                decision: proto::Decision::Allow as i32,
                granted_output_tokens: r.granted_output_tokens,
                reservation_id: r.reservation_id.to_string(),
                expires_at: Some(timestamp_out(r.expires_at)),
                rate_limits: Some(rate_status_out(&r.limits)),
                price_version: r.price_version.to_string(),
                held: takes_out(&r.held),
                ..Default::default()
            },
        }))
    }

    async fn answer_extend(
        &self,
        request: Request<proto::ExtendRequest>,
    ) -> Result<Response<proto::ExtendResponse>, Status> {
        let r = request.into_inner();
        note_ids(&r.account_id, &r.reservation_id);
        let (account, reservation) = account_and_reservation(&r.account_id, &r.reservation_id)?;
        let max_output_tokens = tokens("max_output_tokens", r.max_output_tokens)?;
        let command = Command::Extend {
            reservation,
            max_output_tokens,
        };
        let Reply::Extend(e) = self.tollgate.apply(&account, command).await.map_err(status)? else {
            return Err(unexpected("Extend"));
        };
        let (decision, out) = match &e.shortfall {
            None => (proto::Decision::Allow, DenialOut::default()),
            Some(denial) => (proto::Decision::Deny, denial_out(denial)),
        };
        Ok(Response::new(proto::ExtendResponse {
            decision: decision as i32,
            deny_reason: out.reason as i32,
            granted_output_tokens: e.granted_output_tokens,
            expires_at: Some(timestamp_out(e.expires_at)),
            held: takes_out(&e.held),
            budget: out.budget,
        }))
    }

    async fn answer_settle(
        &self,
        request: Request<proto::SettleRequest>,
    ) -> Result<Response<proto::SettleResponse>, Status> {
        let resent = resent(&request);
        let r = request.into_inner();
        note_ids(&r.account_id, &r.reservation_id);
        let (account, reservation) = account_and_reservation(&r.account_id, &r.reservation_id)?;
        let usage = usage("usage", r.usage.as_ref())?;
        let Reply::Settle(record) = self
            .apply(&account, Command::Settle { reservation, usage }, resent)
            .await
            .map_err(status)?
        else {
            return Err(unexpected("Settle"));
        };
        Ok(Response::new(proto::SettleResponse {
            record: Some(record_out(&record)),
        }))
    }

    async fn answer_release(
        &self,
        request: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseResponse>, Status> {
        let resent = resent(&request);
        let r = request.into_inner();
        note_ids(&r.account_id, &r.reservation_id);
        let (account, reservation) = account_and_reservation(&r.account_id, &r.reservation_id)?;
        let Reply::Release(released) = self
            .apply(&account, Command::Release(reservation), resent)
            .await
            .map_err(status)?
        else {
            return Err(unexpected("Release"));
        };
        Ok(Response::new(proto::ReleaseResponse {
            released: takes_out(&released),
        }))
    }

    async fn answer_charge(
        &self,
        request: Request<proto::ChargeRequest>,
    ) -> Result<Response<proto::ChargeResponse>, Status> {
        let resent = resent(&request);
        let r = request.into_inner();
        note_ids(&r.account_id, &r.request_id);
        let account = id("account_id", &r.account_id, AccountId::parse)?;
        let what = match &r.charge {
            None => return Err(invalid("charge", "one of usage or amount is required")),
            Some(proto::charge_request::Charge::Usage(u)) => ChargeWhat::Usage(usage("usage", Some(u))?),
            Some(proto::charge_request::Charge::Amount(m)) => {
                let amount = money("amount", Some(m))?;
                if !amount.is_positive() {
                    return Err(invalid("amount", "must be greater than zero"));
                }
                ChargeWhat::Money(amount)
            }
        };
        let model = opt_id("model", &r.model, ModelId::parse)?;
        if matches!(what, ChargeWhat::Usage(_)) && model.is_none() {
            return Err(invalid("model", "is required when charging usage"));
        }
        let req = ChargeRequest {
            request_id: id("request_id", &r.request_id, RequestId::parse)?,
            api_key_id: opt_id("api_key_id", &r.api_key_id, ApiKeyId::parse)?,
            model,
            tier: tier(&r.service_tier)?,
            what,
        };
        let Reply::Charge(outcome) = self
            .apply(&account, Command::Charge(req), resent)
            .await
            .map_err(status)?
        else {
            return Err(unexpected("Charge"));
        };
        Ok(Response::new(match outcome {
            ChargeOutcome::Charged(record) => proto::ChargeResponse {
                decision: proto::Decision::Allow as i32,
                record: Some(record_out(&record)),
                ..Default::default()
            },
            ChargeOutcome::Denied(denial, message) => proto::ChargeResponse {
                decision: proto::Decision::Deny as i32,
                deny_reason: denial_out(&denial).reason as i32,
                message,
                record: None,
            },
        }))
    }

    async fn answer_get_balance(
        &self,
        request: Request<proto::GetBalanceRequest>,
    ) -> Result<Response<proto::GetBalanceResponse>, Status> {
        let r = request.into_inner();
        note_ids(&r.account_id, "");
        let account = id("account_id", &r.account_id, AccountId::parse)?;
        let Reply::Balance(b) = self.tollgate.apply(&account, Command::Balance).await.map_err(status)? else {
            return Err(unexpected("GetBalance"));
        };
        Ok(Response::new(balance_out(&account, &b)))
    }
}

/// Runs `answer` of `rpc` and counts it in the metrics: its outcome,
/// reason and time. (Not a tower layer: the outcome and the reason are in
/// the decoded answer, which a layer sees only as encoded bytes.)
async fn observed<T: Decided>(
    rpc: &'static str,
    answer: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    let started = Instant::now();
    let answer = answer.await;
    let (outcome, reason) = match &answer {
        Ok(response) => match response.get_ref().denial() {
            None => ("allowed", "none"),
            Some(reason) => ("denied", reason_label(reason)),
        },
        Err(status) => ("error", code_label(status.code())),
    };
    metrics().decided(rpc, outcome, reason, started);
    answer
}

/// A denial reason's metric label.
fn reason_label(reason: proto::DenyReason) -> &'static str {
    match reason {
        proto::DenyReason::Unspecified => "unspecified",
        proto::DenyReason::InsufficientFunds => "insufficient_funds",
        proto::DenyReason::RateLimited => "rate_limited",
        proto::DenyReason::UnknownAccount => "unknown_account",
        proto::DenyReason::AccountSuspended => "account_suspended",
        proto::DenyReason::ModelNotPriced => "model_not_priced",
        proto::DenyReason::ModelNotAllowed => "model_not_allowed",
        proto::DenyReason::BudgetExceeded => "budget_exceeded",
    }
}

/// An answer that may be a denial.
trait Decided {
    /// The reason, if it denies.
    fn denial(&self) -> Option<proto::DenyReason> {
        None
    }
}

/// Reads a denial from a `decision` and `deny_reason` pair.
fn denial_of(decision: i32, deny_reason: i32) -> Option<proto::DenyReason> {
    (decision == proto::Decision::Deny as i32)
        .then(|| proto::DenyReason::try_from(deny_reason).unwrap_or(proto::DenyReason::Unspecified))
}

impl Decided for proto::ReserveResponse {
    fn denial(&self) -> Option<proto::DenyReason> {
        denial_of(self.decision, self.deny_reason)
    }
}

impl Decided for proto::ExtendResponse {
    fn denial(&self) -> Option<proto::DenyReason> {
        denial_of(self.decision, self.deny_reason)
    }
}

impl Decided for proto::ChargeResponse {
    fn denial(&self) -> Option<proto::DenyReason> {
        denial_of(self.decision, self.deny_reason)
    }
}

impl Decided for proto::SettleResponse {}
impl Decided for proto::ReleaseResponse {}
impl Decided for proto::GetBalanceResponse {}

/// Each RPC answered by its `answer_` method, counted in the metrics.
#[tonic::async_trait]
impl Quota for QuotaApi {
    async fn reserve(
        &self,
        request: Request<proto::ReserveRequest>,
    ) -> Result<Response<proto::ReserveResponse>, Status> {
        observed("reserve", self.answer_reserve(request)).await
    }

    async fn extend(&self, request: Request<proto::ExtendRequest>) -> Result<Response<proto::ExtendResponse>, Status> {
        observed("extend", self.answer_extend(request)).await
    }

    async fn settle(&self, request: Request<proto::SettleRequest>) -> Result<Response<proto::SettleResponse>, Status> {
        observed("settle", self.answer_settle(request)).await
    }

    async fn release(
        &self,
        request: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseResponse>, Status> {
        observed("release", self.answer_release(request)).await
    }

    async fn charge(&self, request: Request<proto::ChargeRequest>) -> Result<Response<proto::ChargeResponse>, Status> {
        observed("charge", self.answer_charge(request)).await
    }

    async fn get_balance(
        &self,
        request: Request<proto::GetBalanceRequest>,
    ) -> Result<Response<proto::GetBalanceResponse>, Status> {
        observed("balance", self.answer_get_balance(request)).await
    }
}

/// A balance for the wire.
pub fn balance_out(account: &AccountId, b: &crate::engine::request::Balance) -> proto::GetBalanceResponse {
    proto::GetBalanceResponse {
        account_id: account.to_string(),
        allowance_tokens: b.allowance_tokens,
        period_end: b.period_end.map(timestamp_out),
        pack_tokens: b.pack_tokens,
        promo: Some(money_out(b.promo)),
        paid: Some(money_out(b.paid)),
        credit_limit: Some(money_out(b.credit_limit)),
        debt: Some(money_out(b.debt)),
        spendable: Some(money_out(b.spendable)),
        held_money: Some(money_out(b.held_money)),
        held_tokens: b.held_tokens,
        suspended: b.suspended,
        budgets: b.budgets.iter().map(budget_use_out).collect(),
        money_burn_last_hour: Some(money_out(Money::from_picos(b.burn.money_last_hour))),
        money_burn_last_day: Some(money_out(Money::from_picos(b.burn.money_last_day))),
        allowance_burn_last_hour: u64::try_from(b.burn.tokens_last_hour).unwrap_or(0),
        allowance_burn_last_day: u64::try_from(b.burn.tokens_last_day).unwrap_or(0),
        money_runs_out_at: b.money_runs_out_at.map(timestamp_out),
        allowance_runs_out_at: b.allowance_runs_out_at.map(timestamp_out),
    }
}
