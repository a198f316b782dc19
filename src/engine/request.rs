//! What is asked of an account and what it answers: the requests and
//! outcomes of the operations in `ops.rs`, as plain data.

use std::sync::Arc;

use jiff::Timestamp;

use super::ids::{ApiKeyId, LotId, ModelId, RequestId, ReservationId, TierId, VersionId};
use super::limits::{Exceeded, RateStatus};
use super::money::Money;
use super::pricing::Usage;
use super::record::UsageRecord;
use super::source::Take;

/// A request to reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    /// Caller-chosen, unique per account.
    pub request_id: RequestId,
    /// The caller's API key, if any.
    pub api_key_id: Option<ApiKeyId>,
    /// The model.
    pub model: ModelId,
    /// The service tier.
    pub tier: TierId,
    /// Prompt tokens not served from cache.
    pub input_tokens: u64,
    /// Prompt tokens served from cache.
    pub cached_input_tokens: u64,
    /// Most output tokens wanted.
    pub max_output_tokens: u64,
}

impl ReserveRequest {
    pub(crate) fn prompt(&self) -> Usage {
        Usage {
            input_tokens: self.input_tokens,
            cached_input_tokens: self.cached_input_tokens,
            ..Usage::default()
        }
    }
}

/// Why a request may not proceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No source can pay.
    InsufficientFunds,
    /// A rate limit is exhausted.
    RateLimited(Exceeded),
    /// The account does not exist.
    UnknownAccount,
    /// The account is suspended.
    Suspended,
    /// No price for the model and tier.
    ModelNotPriced,
    /// The plan does not allow the model.
    ModelNotAllowed,
    /// A budget of the API key or its project is used up.
    BudgetExceeded(super::budget::Exhausted),
}

/// An allowed reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    /// Names the reservation.
    pub reservation_id: ReservationId,
    /// Output tokens granted.
    pub granted_output_tokens: u64,
    /// When the hold lapses.
    pub expires_at: Timestamp,
    /// The price version that will price it.
    pub price_version: VersionId,
    /// What is held.
    pub held: Vec<Take>,
    /// Rate-limit figures after admission.
    pub limits: RateStatus,
}

/// The answer to a reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// Go ahead.
    Allowed(Reserved),
    /// Do not.
    Denied {
        /// Why.
        denial: Denial,
        /// Detail for people.
        message: String,
        /// Rate-limit figures now.
        limits: RateStatus,
    },
}

/// The answer to an extend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extended {
    /// Total output tokens granted now.
    pub granted_output_tokens: u64,
    /// The renewed expiry.
    pub expires_at: Timestamp,
    /// What is held now.
    pub held: Vec<Take>,
    /// Why the grant is short of what was asked, if it is.
    pub shortfall: Option<Denial>,
}

/// What a one-shot charge is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeWhat {
    /// Tokens, priced now.
    Usage(Usage),
    /// A fixed positive amount, money sources only.
    Money(Money),
}

/// A one-shot charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    /// Caller-chosen, unique per account.
    pub request_id: RequestId,
    /// The caller's API key, if any.
    pub api_key_id: Option<ApiKeyId>,
    /// The model (required for token charges).
    pub model: Option<ModelId>,
    /// The service tier.
    pub tier: TierId,
    /// What to charge.
    pub what: ChargeWhat,
}

/// The answer to a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// Charged; the record emitted.
    Charged(Arc<UsageRecord>),
    /// Not charged.
    Denied(Denial, String),
}

/// Which money pool a top-up credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Paid money (repays debt first).
    Paid,
    /// A promotional grant, its own lot.
    Promo {
        /// When it expires.
        expires_at: Option<Timestamp>,
        /// Draw priority.
        priority: i32,
    },
}

/// A pack to grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackGrant {
    /// Unique within the account.
    pub pack_id: LotId,
    /// Tokens.
    pub tokens: u64,
    /// Expiry (in the future).
    pub expires_at: Timestamp,
    /// Models it applies to; `None` for all. Ordered, so the change reads
    /// (and fingerprints) the same every time.
    pub models: Option<std::collections::BTreeSet<ModelId>>,
    /// Draw priority.
    pub priority: i32,
}

/// What an account can spend, summed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    /// Allowance tokens left this period.
    pub allowance_tokens: u64,
    /// End of the current period.
    pub period_end: Option<Timestamp>,
    /// Tokens left in open packs.
    pub pack_tokens: u64,
    /// Promotional money left.
    pub promo: Money,
    /// Paid money (negative while the credit line is used).
    pub paid: Money,
    /// The credit limit.
    pub credit_limit: Money,
    /// Owed beyond the credit limit.
    pub debt: Money,
    /// promo + paid + unused credit.
    pub spendable: Money,
    /// Money held by open reservations.
    pub held_money: Money,
    /// Tokens held by open reservations.
    pub held_tokens: u64,
    /// Suspended.
    pub suspended: bool,
    /// Budgets of API keys and projects, with what each counted.
    pub budgets: Vec<BudgetUse>,
    /// Money and allowance tokens charged per hour, over the last hour and
    /// the last day.
    pub burn: super::burn::Rates,
    /// When spendable money runs out at the last hour's rate (the last
    /// day's when the hour was quiet); `None` while nothing burns.
    pub money_runs_out_at: Option<Timestamp>,
    /// When the allowance left runs out, likewise (it may renew first: see
    /// `period_end`).
    pub allowance_runs_out_at: Option<Timestamp>,
}

/// One budget and what it counted in its current window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetUse {
    /// The budget as it applies now.
    pub applying: super::budget::Applying,
    /// What it counted, and when that starts to fall.
    pub counted: super::budget::Counted,
    /// When its room runs out at the rate it counted since its window
    /// began; `None` while it counted nothing.
    pub runs_out_at: Option<Timestamp>,
}
