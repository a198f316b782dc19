//! Scenario tests of the engine: each states a billing rule and checks it
//! to the unit.
//!
//! Why one file: scenario tests, one billing rule each, sharing one catalog
//! fixture; they read as a list of rules.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

use super::account::Account;
use super::catalog::{Allowance, Catalog, ExpiryPolicy, Plan, SourceClass};
use super::error::EngineError;
use super::ids::{LotId, ModelId, PlanId, RequestId, ReservationId, TierId, VersionId};
use super::limits::{LimitSet, ScopedLimits};
use super::money::Money;
use super::period::{Anchor, PeriodUnit};
use super::pricing::tests::version;
use super::pricing::{PriceBook, PriceVersion, Usage};
use super::record::RecordKind;
use super::request::{
    ChargeOutcome, ChargeRequest, ChargeWhat, Denial, PackGrant, Pool, ReserveOutcome, ReserveRequest, Reserved,
};
use super::source::{SourceRef, Take};

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

const NOW: &str = "2026-03-10T12:00:00Z";

fn plan(id: &str, allowance: Option<Allowance>) -> Plan {
    super::fixture::plan(id, allowance, &SourceClass::DEFAULT_ORDER, ScopedLimits::default())
}

/// The shared catalog (`engine::fixture`): models `m` and `w` (weight
/// 1.5) at input 1000, cached 500, cache write 1000, output 4000
/// pico-units per token; plans `payg`, `pro`, `daily`, `cash`, `limited`,
/// `only-m`.
fn catalog() -> Catalog {
    super::fixture::catalog()
}

/// The shared catalog and an account on `plan` with `picos` of paid money
/// (top-up `t1`).
fn funded(plan: &str, picos: i128) -> (Catalog, Account) {
    let c = catalog();
    let mut a = account(&c, plan);
    top_up(&mut a, &c, "t1", Pool::Paid, picos);
    (c, a)
}

fn account(catalog: &Catalog, plan: &str) -> Account {
    let plan = &catalog.plans[&PlanId::parse(plan).unwrap()];
    Account::open(
        "acct".parse_id(),
        plan,
        TimeZone::get("Europe/Paris").unwrap(),
        None,
        Money::ZERO,
        t(NOW),
    )
    .unwrap()
}

trait ParseId {
    fn parse_id<T: FromId>(&self) -> T;
}
impl ParseId for str {
    fn parse_id<T: FromId>(&self) -> T {
        T::from_id(self)
    }
}
trait FromId {
    fn from_id(s: &str) -> Self;
}
macro_rules! from_id {
    ($($t:ty),*) => {$(impl FromId for $t { fn from_id(s: &str) -> Self { <$t>::parse(s).unwrap() } })*};
}
from_id!(super::ids::AccountId, LotId, RequestId, ReservationId, ModelId);

fn req(id: &str, model: &str, input: u64, output: u64) -> ReserveRequest {
    ReserveRequest {
        request_id: id.parse_id(),
        api_key_id: None,
        model: model.parse_id(),
        tier: TierId::default_tier(),
        input_tokens: input,
        cached_input_tokens: 0,
        max_output_tokens: output,
    }
}

fn allowed(outcome: ReserveOutcome) -> Reserved {
    match outcome {
        ReserveOutcome::Allowed(r) => r,
        ReserveOutcome::Denied { denial, message, .. } => panic!("denied: {denial:?} {message}"),
    }
}

fn denial(outcome: ReserveOutcome) -> Denial {
    match outcome {
        ReserveOutcome::Denied { denial, .. } => denial,
        ReserveOutcome::Allowed(r) => panic!("allowed: {r:?}"),
    }
}

fn top_up(a: &mut Account, c: &Catalog, op: &str, pool: Pool, amount: i128) {
    a.top_up(c, &op.parse_id(), pool, Money::from_picos(amount), t(NOW))
        .unwrap();
}

fn pack(a: &mut Account, c: &Catalog, id: &str, tokens: u64, expires: &str) {
    let grant = PackGrant {
        pack_id: id.parse_id(),
        tokens,
        expires_at: t(expires),
        models: None,
        priority: 0,
    };
    a.grant_pack(c, grant, t(NOW)).unwrap();
}

fn take(source: SourceRef, amount: i128) -> Take {
    Take { source, amount }
}

/// An operator's audit record for `operation` on `account`.
fn audit(account: &Account, operation: &str, adjustment_id: &str) -> super::record::AuditRecord {
    super::record::AuditRecord {
        kind: "audit".into(),
        account_id: Some(account.id.clone()),
        operator: "op".into(),
        peer: String::new(),
        operation: operation.into(),
        adjustment_id: adjustment_id.into(),
        reason: "r".into(),
        change: String::new(),
        at: t(NOW),
        before: Default::default(),
        after: Default::default(),
        refunded: Vec::new(),
    }
}

fn usage(input: u64, output: u64) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        ..Default::default()
    }
}

#[test]
fn draw_down_splits_across_every_source_in_order() {
    let c = catalog();
    let mut a = account(&c, "pro");
    pack(&mut a, &c, "p1", 500, "2026-06-01T00:00:00Z");
    top_up(
        &mut a,
        &c,
        "promo1",
        Pool::Promo {
            expires_at: None,
            priority: 0,
        },
        1_500_000,
    );
    top_up(&mut a, &c, "paid1", Pool::Paid, 300_000);
    a.set_credit_limit(Money::from_picos(1_000_000)).unwrap();
    // 1000 input + 1000 output tokens: allowance 1000 covers the input, the
    // pack 500 output tokens, the other 500 output cost 2,000,000 in money.
    let r = allowed(a.reserve(&c, &req("r1", "m", 1000, 1000), t(NOW)).unwrap());
    assert_eq!(r.granted_output_tokens, 1000);
    let expected = vec![
        take(SourceRef::Allowance { period: 0 }, 1000),
        take(SourceRef::Pack("p1".parse_id()), 500),
        take(SourceRef::Promo("promo1".parse_id()), 1_500_000),
        take(SourceRef::Paid, 300_000),
        take(SourceRef::Credit, 200_000),
    ];
    assert_eq!(r.held, expected);
    let record = a.settle(&c, &r.reservation_id, usage(1000, 1000), t(NOW)).unwrap();
    assert_eq!(record.charges, expected);
    assert_eq!(record.total_money, Money::from_picos(2_000_000));
    let b = a.balance(t(NOW));
    assert_eq!((b.allowance_tokens, b.pack_tokens), (0, 0));
    assert_eq!((b.promo, b.paid), (Money::ZERO, Money::from_picos(-200_000)));
    assert_eq!(b.spendable, Money::from_picos(800_000));
}

#[test]
fn settle_charges_actuals_and_releases_the_rest() {
    let (c, mut a) = funded("payg", 10_000_000);
    let r = allowed(a.reserve(&c, &req("r1", "m", 100, 1000), t(NOW)).unwrap());
    assert_eq!(r.held, vec![take(SourceRef::Paid, 100 * 1000 + 1000 * 4000)]);
    assert_eq!(a.balance(t(NOW)).paid, Money::from_picos(10_000_000 - 4_100_000));
    let record = a.settle(&c, &r.reservation_id, usage(100, 10), t(NOW)).unwrap();
    assert_eq!(record.total_money, Money::from_picos(100_000 + 40_000));
    assert_eq!(a.balance(t(NOW)).paid, Money::from_picos(10_000_000 - 140_000));
    assert_eq!(a.balance(t(NOW)).held_money, Money::ZERO);
    assert_eq!(a.take_records(), vec![record]);
}

#[test]
fn an_idle_account_forgets_its_requests_and_frees_their_state() {
    let mut c = catalog();
    let mut a = account(&c, "payg");
    top_up(&mut a, &c, "t1", Pool::Paid, 10_000_000);
    assert!(a.traffic.is_none(), "no request yet, nothing allocated");
    let r = allowed(a.reserve(&c, &req("r1", "m", 100, 1000), t(NOW)).unwrap());
    a.settle(&c, &r.reservation_id, usage(100, 10), t(NOW)).unwrap();
    let later = t(NOW) + c.idempotency_window + SignedDuration::from_secs(1);
    a.prune(&c, later);
    assert_eq!(a.take_records().len(), 1);
    let kept = a.traffic.as_deref().expect("the recent record is kept for read-outs");
    assert!(kept.requests.is_empty() && kept.reservations.is_empty() && kept.recent.len() == 1);

    c.recent_usage = 0;
    let r = allowed(a.reserve(&c, &req("r2", "m", 100, 1000), later).unwrap());
    a.release(&c, &r.reservation_id, later).unwrap();
    a.traffic_mut().recent.clear();
    a.prune(&c, later + c.idempotency_window + SignedDuration::from_secs(1));
    assert!(a.traffic.is_none(), "everything forgotten, the state is freed");
}

/// A minute after a request closes its answer is let go; for the rest of
/// the idempotency window a fingerprint refuses a retry, or a reuse with
/// other content, with a clear error (never a second charge).
#[test]
fn answers_go_after_a_minute_and_retries_are_refused_for_the_rest_of_the_window() {
    let (c, mut a) = funded("payg", 10_000_000);
    let charge = ChargeRequest {
        request_id: "c1".parse_id(),
        api_key_id: None,
        model: None,
        tier: TierId::default_tier(),
        what: ChargeWhat::Money(Money::from_picos(7)),
    };
    a.charge(&c, &charge, t(NOW)).unwrap();
    let r = allowed(a.reserve(&c, &req("r1", "m", 100, 1000), t(NOW)).unwrap());
    a.settle(&c, &r.reservation_id, usage(100, 10), t(NOW)).unwrap();
    let charged = a.paid.charged();
    let later = t(NOW) + super::account::ANSWERS_KEPT + SignedDuration::from_secs(1);
    a.prune(&c, later);
    let traffic = a.traffic.as_deref().unwrap();
    assert!(traffic.requests.is_empty() && traffic.reservations.is_empty());
    assert_eq!(traffic.spent.len(), 2);
    let no_longer_kept = |e: EngineError| matches!(&e, EngineError::Precondition(m) if m.contains("no longer kept"));
    assert!(no_longer_kept(a.charge(&c, &charge, later).unwrap_err()));
    assert!(no_longer_kept(
        a.reserve(&c, &req("r1", "m", 100, 1000), later).unwrap_err()
    ));
    assert!(no_longer_kept(
        a.settle(&c, &r.reservation_id, usage(100, 10), later).unwrap_err()
    ));
    let other = ChargeRequest {
        what: ChargeWhat::Money(Money::from_picos(8)),
        ..charge.clone()
    };
    assert!(no_longer_kept(a.charge(&c, &other, later).unwrap_err()));
    assert_eq!(a.paid.charged(), charged, "nothing decided again");
    // Past the window (and the quarter of it its time slot may add), the
    // id is new.
    let after = t(NOW) + c.idempotency_window + c.idempotency_window / 4 + SignedDuration::from_secs(61);
    a.prune(&c, after);
    assert!(a.traffic.as_deref().is_none_or(|t| t.spent.is_empty()));
    assert!(matches!(a.charge(&c, &charge, after), Ok(ChargeOutcome::Charged(_))));
}

#[test]
fn grant_shrinks_to_what_funds_cover() {
    let c = catalog();
    let mut a = account(&c, "payg");
    // 100 input cost 100,000; 1,000,000 left buys 225 output tokens (900,000) not 226.
    top_up(&mut a, &c, "t1", Pool::Paid, 1_000_000);
    let r = allowed(a.reserve(&c, &req("r1", "m", 100, 4096), t(NOW)).unwrap());
    assert_eq!(r.granted_output_tokens, 225);
    // Nothing left for even one output token: denied, nothing held.
    assert_eq!(
        denial(a.reserve(&c, &req("r2", "m", 1, 10), t(NOW)).unwrap()),
        Denial::InsufficientFunds
    );
    assert_eq!(a.balance(t(NOW)).held_money, Money::from_picos(100_000 + 225 * 4000));
}

#[test]
fn usage_above_the_hold_goes_to_credit_then_debt_and_top_up_repays_debt_first() {
    let (c, mut a) = funded("payg", 1_000_000);
    a.set_credit_limit(Money::from_picos(400_000)).unwrap();
    let r = allowed(a.reserve(&c, &req("r1", "m", 0, 10), t(NOW)).unwrap());
    // The model ran away: 500 output tokens = 2,000,000.
    let record = a.settle(&c, &r.reservation_id, usage(0, 500), t(NOW)).unwrap();
    assert_eq!(
        record.charges,
        vec![
            take(SourceRef::Paid, 1_000_000),
            take(SourceRef::Credit, 400_000),
            take(SourceRef::Debt, 600_000)
        ]
    );
    let b = a.balance(t(NOW));
    assert_eq!(
        (b.paid, b.debt, b.spendable),
        (Money::from_picos(-400_000), Money::from_picos(600_000), Money::ZERO)
    );
    top_up(&mut a, &c, "t2", Pool::Paid, 1_000_000);
    let b = a.balance(t(NOW));
    assert_eq!((b.paid, b.debt), (Money::ZERO, Money::ZERO));
    assert_eq!(b.spendable, Money::from_picos(400_000));
}

#[test]
fn price_change_between_reserve_and_settle_charges_the_reserve_version() {
    let mut c = catalog();
    let mut a = account(&c, "payg");
    top_up(&mut a, &c, "t1", Pool::Paid, 100_000_000);
    let r = allowed(a.reserve(&c, &req("r1", "m", 10, 10), t(NOW)).unwrap());
    let later = t("2026-03-10T12:00:30Z");
    c.prices
        .publish(version("v2", "2026-03-10T12:00:10Z", 2000, 8000), t(NOW))
        .unwrap();
    let record = a.settle(&c, &r.reservation_id, usage(10, 10), later).unwrap();
    assert_eq!(record.price_version.as_ref().map(|v| v.as_str()), Some("v1"));
    assert_eq!(record.total_money, Money::from_picos(10 * 1000 + 10 * 4000));
    let r2 = allowed(a.reserve(&c, &req("r2", "m", 10, 10), later).unwrap());
    assert_eq!(r2.price_version.as_str(), "v2");
    let record = a.settle(&c, &r2.reservation_id, usage(10, 10), later).unwrap();
    assert_eq!(record.total_money, Money::from_picos(10 * 2000 + 10 * 8000));
}

#[test]
fn pack_expires_at_the_exact_instant_but_its_holds_stay_chargeable() {
    let c = catalog();
    let mut a = account(&c, "payg");
    pack(&mut a, &c, "p1", 100, "2026-03-10T12:00:10Z");
    let just_before = t("2026-03-10T12:00:09.999999999Z");
    let r = allowed(a.reserve(&c, &req("r1", "m", 10, 50), just_before).unwrap());
    assert_eq!(r.held, vec![take(SourceRef::Pack("p1".parse_id()), 60)]);
    let at = t("2026-03-10T12:00:10Z");
    assert_eq!(
        denial(a.reserve(&c, &req("r2", "m", 1, 1), at).unwrap()),
        Denial::InsufficientFunds
    );
    let record = a.settle(&c, &r.reservation_id, usage(10, 20), at).unwrap();
    assert_eq!(record.charges, vec![take(SourceRef::Pack("p1".parse_id()), 30)]);
    let lot = &a.packs[&"p1".parse_id::<LotId>()].ledger;
    // 40 never held was forfeited at expiry, 30 returned by the hold too.
    assert_eq!(
        (lot.granted(), lot.charged(), lot.held(), lot.forfeited()),
        (100, 30, 0, 70)
    );
}

#[test]
fn packs_draw_by_priority_then_earliest_expiry_and_respect_model_scope() {
    let c = catalog();
    let mut a = account(&c, "payg");
    pack(&mut a, &c, "late", 100, "2026-05-01T00:00:00Z");
    pack(&mut a, &c, "early", 100, "2026-04-01T00:00:00Z");
    let scoped = PackGrant {
        pack_id: "big-only".parse_id(),
        tokens: 100,
        expires_at: t("2026-03-20T00:00:00Z"),
        models: Some(std::collections::BTreeSet::from(["w".parse_id()])),
        priority: 0,
    };
    a.grant_pack(&c, scoped, t(NOW)).unwrap();
    let urgent = PackGrant {
        pack_id: "prio".parse_id(),
        tokens: 10,
        expires_at: t("2026-12-01T00:00:00Z"),
        models: None,
        priority: 5,
    };
    a.grant_pack(&c, urgent, t(NOW)).unwrap();
    let r = allowed(a.reserve(&c, &req("r1", "m", 50, 100), t(NOW)).unwrap());
    assert_eq!(
        r.held,
        vec![
            take(SourceRef::Pack("prio".parse_id()), 10),
            take(SourceRef::Pack("early".parse_id()), 100),
            take(SourceRef::Pack("late".parse_id()), 40),
        ]
    );
}

#[test]
fn weighted_tokens_round_against_the_caller() {
    let c = catalog();
    let mut a = account(&c, "payg");
    pack(&mut a, &c, "p1", 10, "2026-06-01T00:00:00Z");
    // 3 input tokens of `big` (weight 1.5) take ceil(4.5) = 5 pack tokens;
    // the other 5 cover floor(5 / 1.5) = 3 output tokens (4.5 -> 5).
    // The fourth output token is not covered, so money must pay: none.
    let r = allowed(a.reserve(&c, &req("r1", "w", 3, 3), t(NOW)).unwrap());
    assert_eq!(r.held, vec![take(SourceRef::Pack("p1".parse_id()), 10)]);
    assert_eq!(
        denial(a.reserve(&c, &req("r2", "w", 0, 1), t(NOW)).unwrap()),
        Denial::InsufficientFunds
    );
}

#[test]
fn allowance_resets_at_local_month_start_with_capped_rollover() {
    let c = catalog();
    let mut a = account(&c, "pro");
    let r = allowed(a.reserve(&c, &req("r1", "m", 100, 100), t(NOW)).unwrap());
    a.settle(&c, &r.reservation_id, usage(100, 100), t(NOW)).unwrap();
    assert_eq!(a.balance(t(NOW)).allowance_tokens, 800);
    // April starts at 2026-03-31T22:00Z in Paris (summer time).
    assert_eq!(a.balance(t(NOW)).period_end, Some(t("2026-03-31T22:00:00Z")));
    let before = t("2026-03-31T21:59:59Z");
    a.advance(&c, before).unwrap();
    assert_eq!(a.balance(before).allowance_tokens, 800);
    let after = t("2026-03-31T22:00:00Z");
    a.advance(&c, after).unwrap();
    // 800 unused, 300 carried, 500 forfeited, 1000 new.
    assert_eq!(a.balance(after).allowance_tokens, 1300);
    assert_eq!(
        (a.allowance.granted(), a.allowance.forfeited(), a.allowance.charged()),
        (2000, 500, 200)
    );
    // Two idle months later: rollover is capped each time.
    let june = t("2026-06-15T00:00:00Z");
    a.advance(&c, june).unwrap();
    assert_eq!(a.balance(june).allowance_tokens, 1300);
    assert_eq!(a.current_period(), Some(3));
}

#[test]
fn a_hold_across_a_period_reset_is_charged_from_its_period_and_the_rest_forfeited() {
    let c = catalog();
    let mut a = account(&c, "pro");
    let before = t("2026-03-31T21:59:30Z");
    let r = allowed(a.reserve(&c, &req("r1", "m", 100, 500), before).unwrap());
    assert_eq!(r.held, vec![take(SourceRef::Allowance { period: 0 }, 600)]);
    let after = t("2026-03-31T22:00:20Z");
    let record = a.settle(&c, &r.reservation_id, usage(100, 100), after).unwrap();
    assert_eq!(record.charges, vec![take(SourceRef::Allowance { period: 0 }, 200)]);
    // At the reset 400 were free: 300 carried, 100 forfeited; the hold's
    // unused 400 belong to the old period and are forfeited too.
    assert_eq!(a.balance(after).allowance_tokens, 1300);
    assert_eq!(a.allowance.forfeited(), 500);
}

#[test]
fn lapsed_holds_are_released_or_charged_in_full_by_policy() {
    let mut c = catalog();
    let mut a = account(&c, "payg");
    top_up(&mut a, &c, "t1", Pool::Paid, 10_000_000);
    let r = allowed(a.reserve(&c, &req("r1", "m", 10, 10), t(NOW)).unwrap());
    assert_eq!(r.expires_at, t("2026-03-10T12:01:00Z"));
    a.advance(&c, t("2026-03-10T12:00:59Z")).unwrap();
    assert_eq!(a.holds().count(), 1);
    a.advance(&c, r.expires_at).unwrap();
    assert_eq!(a.holds().count(), 0);
    assert_eq!(a.balance(r.expires_at).paid, Money::from_picos(10_000_000));
    assert!(a.take_records().is_empty());
    let err = a.settle(&c, &r.reservation_id, usage(1, 1), r.expires_at).unwrap_err();
    assert!(matches!(err, EngineError::Precondition(_)), "{err}");
    // The reserve replayed says so, rather than send its caller to
    // generate on a hold that is gone.
    let replay = a.reserve(&c, &req("r1", "m", 10, 10), r.expires_at).unwrap_err();
    assert!(
        matches!(&replay, EngineError::Precondition(m) if m.contains("expired")),
        "{replay}"
    );

    c.on_expiry = ExpiryPolicy::ChargeInFull;
    let r = allowed(a.reserve(&c, &req("r2", "m", 10, 10), t(NOW)).unwrap());
    a.advance(&c, r.expires_at).unwrap();
    let records = a.take_records();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].kind, records[0].total_money),
        (RecordKind::Expired, Money::from_picos(50_000))
    );
    assert_eq!(a.balance(r.expires_at).paid, Money::from_picos(10_000_000 - 50_000));
}

#[test]
fn extend_grows_the_grant_within_funds_and_renews_the_ttl() {
    let (c, mut a) = funded("payg", 400_000);
    let r = allowed(a.reserve(&c, &req("r1", "m", 0, 10), t(NOW)).unwrap());
    let later = t("2026-03-10T12:00:50Z");
    let e = a.extend(&c, &r.reservation_id, 50, later).unwrap();
    assert_eq!((e.granted_output_tokens, e.shortfall), (50, None));
    assert_eq!(e.expires_at, t("2026-03-10T12:01:50Z"));
    let e = a.extend(&c, &r.reservation_id, 500, later).unwrap();
    assert_eq!(
        (e.granted_output_tokens, e.shortfall),
        (100, Some(Denial::InsufficientFunds))
    );
    assert_eq!(e.held, vec![take(SourceRef::Paid, 400_000)]);
    // Asking for less than granted changes nothing.
    assert_eq!(
        a.extend(&c, &r.reservation_id, 20, later)
            .unwrap()
            .granted_output_tokens,
        100
    );
}

#[test]
fn every_mutation_is_idempotent_and_reuse_with_other_content_is_refused() {
    let (c, mut a) = funded("payg", 10_000_000);
    top_up(&mut a, &c, "t1", Pool::Paid, 10_000_000);
    assert_eq!(a.balance(t(NOW)).paid, Money::from_picos(10_000_000));
    let err = a
        .top_up(&c, &"t1".parse_id(), Pool::Paid, Money::from_picos(5), t(NOW))
        .unwrap_err();
    assert!(matches!(err, EngineError::Conflict(_)));

    let first = allowed(a.reserve(&c, &req("r1", "m", 10, 10), t(NOW)).unwrap());
    let again = allowed(a.reserve(&c, &req("r1", "m", 10, 10), t(NOW)).unwrap());
    assert_eq!(first, again);
    assert!(matches!(
        a.reserve(&c, &req("r1", "m", 10, 11), t(NOW)),
        Err(EngineError::Conflict(_))
    ));
    let rec = a.settle(&c, &first.reservation_id, usage(5, 5), t(NOW)).unwrap();
    assert_eq!(a.settle(&c, &first.reservation_id, usage(5, 5), t(NOW)).unwrap(), rec);
    assert!(matches!(
        a.settle(&c, &first.reservation_id, usage(5, 6), t(NOW)),
        Err(EngineError::Precondition(_))
    ));
    assert!(matches!(
        a.release(&c, &first.reservation_id, t(NOW)),
        Err(EngineError::Precondition(_))
    ));
    assert_eq!(a.take_records().len(), 1, "one record despite the retry");

    let r2 = allowed(a.reserve(&c, &req("r2", "m", 10, 10), t(NOW)).unwrap());
    let released = a.release(&c, &r2.reservation_id, t(NOW)).unwrap();
    assert_eq!(a.release(&c, &r2.reservation_id, t(NOW)).unwrap(), released);
    assert!(matches!(
        a.settle(&c, &r2.reservation_id, usage(1, 1), t(NOW)),
        Err(EngineError::Precondition(_))
    ));
    assert!(matches!(
        a.settle(&c, &"nope".parse_id(), usage(1, 1), t(NOW)),
        Err(EngineError::NotFound(_))
    ));

    let charge = ChargeRequest {
        request_id: "c1".parse_id(),
        api_key_id: None,
        model: None,
        tier: TierId::default_tier(),
        what: ChargeWhat::Money(Money::from_picos(7)),
    };
    let ChargeOutcome::Charged(rec) = a.charge(&c, &charge, t(NOW)).unwrap() else {
        panic!()
    };
    assert_eq!(a.charge(&c, &charge, t(NOW)).unwrap(), ChargeOutcome::Charged(rec));
    let other = ChargeRequest {
        what: ChargeWhat::Money(Money::from_picos(8)),
        ..charge
    };
    assert!(matches!(a.charge(&c, &other, t(NOW)), Err(EngineError::Conflict(_))));
}

#[test]
fn denials_name_their_reason_and_take_nothing() {
    let (c, mut a) = funded("limited", 10_000_000);
    allowed(a.reserve(&c, &req("r1", "m", 1, 1), t(NOW)).unwrap());
    let paid = a.balance(t(NOW)).paid;
    let ReserveOutcome::Denied {
        denial: Denial::RateLimited(limit),
        ..
    } = a.reserve(&c, &req("r2", "m", 1, 1), t(NOW)).unwrap()
    else {
        panic!("not rate limited")
    };
    assert_eq!(limit.retry_after, Some(std::time::Duration::from_secs(60)));
    assert_eq!(a.balance(t(NOW)).paid, paid);
    assert_eq!(
        denial(a.reserve(&c, &req("r3", "nope", 1, 1), t(NOW)).unwrap()),
        Denial::ModelNotPriced
    );
    let mut batch = req("r4", "m", 1, 1);
    batch.tier = TierId::parse("batch").unwrap();
    assert_eq!(denial(a.reserve(&c, &batch, t(NOW)).unwrap()), Denial::ModelNotPriced);
    a.suspended = true;
    assert_eq!(
        denial(a.reserve(&c, &req("r5", "m", 1, 1), t(NOW)).unwrap()),
        Denial::Suspended
    );

    let mut b = account(&c, "only-m");
    top_up(&mut b, &c, "t1", Pool::Paid, 10_000_000);
    assert_eq!(
        denial(b.reserve(&c, &req("r1", "w", 1, 1), t(NOW)).unwrap()),
        Denial::ModelNotAllowed
    );
    assert!(b.traffic().requests.is_empty() && b.holds().count() == 0);
}

#[test]
fn refused_admin_operations_change_nothing() {
    let (c, mut a) = funded("payg", 1000);
    let before = format!("{:?}", (a.balance(t(NOW)), &a.packs, &a.operations));
    let past = PackGrant {
        pack_id: "p".parse_id(),
        tokens: 5,
        expires_at: t(NOW),
        models: None,
        priority: 0,
    };
    assert!(matches!(
        a.grant_pack(&c, past, t(NOW)),
        Err(EngineError::Invalid {
            field: "expires_at",
            ..
        })
    ));
    assert!(matches!(
        a.adjust(&c, &"a1".parse_id(), Money::from_picos(-1001), t(NOW)),
        Err(EngineError::Precondition(_))
    ));
    assert!(matches!(
        a.top_up(&c, &"t2".parse_id(), Pool::Paid, Money::ZERO, t(NOW)),
        Err(EngineError::Invalid { .. })
    ));
    assert!(matches!(
        a.revoke_pack(&c, &"none".parse_id(), t(NOW)),
        Err(EngineError::NotFound(_))
    ));
    assert!(matches!(
        a.assign_plan(&c, &PlanId::parse("gold").unwrap(), None, t(NOW)),
        Err(EngineError::Invalid { field: "plan", .. })
    ));
    assert_eq!(before, format!("{:?}", (a.balance(t(NOW)), &a.packs, &a.operations)));
}

/// Allowance a hold still holds when its period ends rolls over as unused
/// allowance would, once the hold gives it back (within the cap), and
/// whether the account was looked at between the two events or only after
/// both changes nothing: events apply in time order, each at its instant.
#[test]
fn allowance_held_at_a_period_end_rolls_over_whenever_the_account_is_seen() {
    let c = catalog();
    let end = account(&c, "pro").subscription.as_ref().unwrap().window.end;
    let at = |secs: i64| end + SignedDuration::from_secs(secs);
    let mut seen_between = account(&c, "pro");
    let mut seen_after = account(&c, "pro");
    for a in [&mut seen_between, &mut seen_after] {
        // 900 of the 1,000 tokens held 30 s before the end; the hold lapses
        // 30 s after it (a 60 s TTL), released.
        let r = allowed(a.reserve(&c, &req("r1", "m", 0, 900), at(-30)).unwrap());
        assert_eq!(r.held, vec![take(SourceRef::Allowance { period: 0 }, 900)]);
    }
    seen_between.advance(&c, at(10)).unwrap();
    assert_eq!(seen_between.balance(at(10)).allowance_tokens, 1000 + 100);
    for a in [&mut seen_between, &mut seen_after] {
        a.advance(&c, at(60)).unwrap();
        // 100 unused at the end and 900 given back after: 300 carried (the
        // cap), the rest forfeited.
        assert_eq!(a.balance(at(60)).allowance_tokens, 1000 + 300);
        let l = &a.allowance;
        assert_eq!(l.forfeited(), 700);
    }
    assert_eq!(
        seen_between
            .traffic()
            .reservations
            .get(&"r1".parse_id::<ReservationId>()),
        seen_after.traffic().reservations.get(&"r1".parse_id::<ReservationId>())
    );
}

/// A hold charged in full when it lapses is recorded at its expiry, not
/// when the account happened to be seen.
#[test]
fn a_lapse_is_recorded_at_the_holds_expiry() {
    let mut c = catalog();
    c.on_expiry = ExpiryPolicy::ChargeInFull;
    let mut a = account(&c, "payg");
    top_up(&mut a, &c, "t1", Pool::Paid, 10_000_000);
    let r = allowed(a.reserve(&c, &req("r1", "m", 10, 10), t(NOW)).unwrap());
    a.advance(&c, r.expires_at + SignedDuration::from_hours(3)).unwrap();
    let records = a.take_records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].settled_at, r.expires_at);
}

#[test]
fn period_numbers_never_repeat_across_plan_changes() {
    let c = catalog();
    let mut a = account(&c, "pro");
    let r = allowed(a.reserve(&c, &req("r1", "m", 10, 20), t(NOW)).unwrap());
    assert_eq!(r.held, vec![take(SourceRef::Allowance { period: 0 }, 30)]);
    a.assign_plan(&c, &PlanId::parse("payg").unwrap(), None, t(NOW))
        .unwrap();
    a.assign_plan(&c, &PlanId::parse("pro").unwrap(), None, t(NOW)).unwrap();
    assert_eq!(a.current_period(), Some(1));
    // The old period's hold is not the new period's: released, it is forfeited.
    a.release(&c, &r.reservation_id, t(NOW)).unwrap();
    assert_eq!(a.balance(t(NOW)).allowance_tokens, 1000);
    assert_eq!((a.allowance.granted(), a.allowance.forfeited()), (2000, 1000));
}

/// A plan change that narrows the draw order leaves open holds
/// chargeable: a hold taken on paid money still pays, after the new
/// plan's own sources, never debt, when the new plan draws on the
/// allowance only.
#[test]
fn holds_stay_chargeable_when_the_draw_order_narrows() {
    let mut c = catalog();
    let mut narrow = plan(
        "allowance-only",
        Some(Allowance {
            tokens: 10,
            period: PeriodUnit::Month,
            anchor: Anchor::Calendar,
            rollover_cap: 0,
        }),
    );
    narrow.draw_order = vec![SourceClass::Allowance];
    c.plans.insert(narrow.id.clone(), narrow);
    let mut a = account(&c, "payg");
    top_up(&mut a, &c, "t1", Pool::Paid, 1_000_000);
    let r = allowed(a.reserve(&c, &req("r1", "m", 0, 100), t(NOW)).unwrap());
    assert_eq!(r.held, vec![take(SourceRef::Paid, 400_000)]);
    a.assign_plan(&c, &PlanId::parse("allowance-only").unwrap(), None, t(NOW))
        .unwrap();
    let period = a.current_period().unwrap();
    // The new plan's order first (its 10 tokens), then what the hold held.
    let record = a.settle(&c, &r.reservation_id, usage(0, 50), t(NOW)).unwrap();
    assert_eq!(
        record.charges,
        vec![
            take(SourceRef::Allowance { period }, 10),
            take(SourceRef::Paid, 160_000)
        ]
    );
    let b = a.balance(t(NOW));
    assert_eq!((b.paid, b.debt), (Money::from_picos(840_000), Money::ZERO));
}

#[test]
fn a_hold_on_a_closed_lot_is_used_before_open_lots() {
    let c = catalog();
    let mut a = account(&c, "payg");
    let soon = Pool::Promo {
        expires_at: Some(t("2026-03-10T12:00:30Z")),
        priority: 0,
    };
    top_up(&mut a, &c, "p1", soon, 40_000);
    let r = allowed(a.reserve(&c, &req("r1", "m", 0, 10), t(NOW)).unwrap());
    assert_eq!(r.held, vec![take(SourceRef::Promo("p1".parse_id()), 40_000)]);
    top_up(
        &mut a,
        &c,
        "p2",
        Pool::Promo {
            expires_at: None,
            priority: 10,
        },
        40_000,
    );
    let later = t("2026-03-10T12:00:40Z");
    let record = a.settle(&c, &r.reservation_id, usage(0, 10), later).unwrap();
    assert_eq!(record.charges, vec![take(SourceRef::Promo("p1".parse_id()), 40_000)]);
    assert_eq!(a.balance(later).promo, Money::from_picos(40_000));
}

#[test]
fn admin_retries_answer_as_the_first_call_did() {
    let c = catalog();
    let mut a = account(&c, "payg");
    let expiring = Pool::Promo {
        expires_at: Some(t("2026-03-10T13:00:00Z")),
        priority: 0,
    };
    top_up(&mut a, &c, "promo", expiring, 5);
    let grant = PackGrant {
        pack_id: "pk".parse_id(),
        tokens: 5,
        expires_at: t("2026-03-10T13:00:00Z"),
        models: None,
        priority: 0,
    };
    a.grant_pack(&c, grant.clone(), t(NOW)).unwrap();
    let later = t("2026-03-10T15:00:00Z");
    // Both expiries are in the past now; the retries still succeed, once.
    a.top_up(&c, &"promo".parse_id(), expiring, Money::from_picos(5), later)
        .unwrap();
    a.grant_pack(&c, grant, later).unwrap();
    assert_eq!(a.promos.len() + a.packs.len(), 2);
    // Operation ids and pack ids do not collide.
    top_up(&mut a, &c, "pack_id", Pool::Paid, 5);
    let same_name = PackGrant {
        pack_id: "promo".parse_id(),
        tokens: 5,
        expires_at: t("2026-04-01T00:00:00Z"),
        models: None,
        priority: 0,
    };
    a.grant_pack(&c, same_name, t(NOW)).unwrap();
    // A debit retried after the balance changed is still a replay.
    a.adjust(&c, &"d1".parse_id(), Money::from_picos(-5), t(NOW)).unwrap();
    a.adjust(&c, &"d2".parse_id(), Money::from_picos(-0), t(NOW))
        .unwrap_err();
    a.adjust(&c, &"d1".parse_id(), Money::from_picos(-5), t(NOW)).unwrap();
    assert_eq!(a.balance(t(NOW)).paid, Money::ZERO);
    assert!(matches!(
        a.adjust(&c, &"d1".parse_id(), Money::from_picos(-6), t(NOW)),
        Err(EngineError::Conflict(_))
    ));
}

#[test]
fn named_model_limits_replace_the_per_model_default_and_overrides_win() {
    let mut c = catalog();
    let pro = c.plans.get_mut(&PlanId::parse("pro").unwrap()).unwrap();
    pro.limits.per_model = LimitSet {
        concurrent_requests: 2,
        ..Default::default()
    };
    pro.limits.models.insert(
        "w".parse_id(),
        LimitSet {
            concurrent_requests: 1,
            ..Default::default()
        },
    );
    let mut a = account(&c, "pro");
    top_up(&mut a, &c, "t1", Pool::Paid, 10_000_000);
    allowed(a.reserve(&c, &req("b1", "w", 1, 1), t(NOW)).unwrap());
    assert!(matches!(
        denial(a.reserve(&c, &req("b2", "w", 1, 1), t(NOW)).unwrap()),
        Denial::RateLimited(_)
    ));
    allowed(a.reserve(&c, &req("m1", "m", 1, 1), t(NOW)).unwrap());
    allowed(a.reserve(&c, &req("m2", "m", 1, 1), t(NOW)).unwrap());
    assert!(matches!(
        denial(a.reserve(&c, &req("m3", "m", 1, 1), t(NOW)).unwrap()),
        Denial::RateLimited(_)
    ));
    a.set_overrides(super::limits::LimitOverrides {
        per_model: Some(LimitSet {
            concurrent_requests: 5,
            ..Default::default()
        }),
        ..Default::default()
    });
    allowed(a.reserve(&c, &req("b2", "w", 1, 1), t(NOW)).unwrap());
    // The account's limit for the named model is the most specific of all.
    a.set_overrides(super::limits::LimitOverrides {
        per_model: Some(LimitSet {
            concurrent_requests: 5,
            ..Default::default()
        }),
        models: [(
            "w".parse_id(),
            LimitSet {
                concurrent_requests: 2,
                ..Default::default()
            },
        )]
        .into(),
        ..Default::default()
    });
    assert!(matches!(
        denial(a.reserve(&c, &req("b3", "w", 1, 1), t(NOW)).unwrap()),
        Denial::RateLimited(_)
    ));
    allowed(a.reserve(&c, &req("m3", "m", 1, 1), t(NOW)).unwrap());
}

#[test]
fn a_token_limit_set_after_a_reserve_is_not_refunded_by_its_settle() {
    let (c, mut a) = funded("payg", 10_000_000);
    a.set_overrides(super::limits::LimitOverrides {
        account: Some(LimitSet {
            requests_per_minute: 100,
            ..Default::default()
        }),
        ..Default::default()
    });
    // Admitted under requests-per-minute only: its tokens were not counted.
    let first = allowed(a.reserve(&c, &req("r1", "m", 100, 100), t(NOW)).unwrap());
    a.set_overrides(super::limits::LimitOverrides {
        account: Some(LimitSet {
            requests_per_minute: 100,
            tokens_per_minute: 1000,
            ..Default::default()
        }),
        ..Default::default()
    });
    let second = allowed(a.reserve(&c, &req("r2", "m", 300, 300), t(NOW)).unwrap());
    assert_eq!(second.limits.tokens.remaining, 400);
    a.settle(&c, &first.reservation_id, usage(10, 10), t(NOW)).unwrap();
    let third = allowed(a.reserve(&c, &req("r3", "m", 100, 100), t(NOW)).unwrap());
    assert_eq!(
        third.limits.tokens.remaining, 200,
        "the second request's 600 tokens still count"
    );
}

/// A sidecar as the store drives one: the command runs on the mirror; when
/// the mirror is short, one sync with the shared account, then the command
/// again as the last word.
struct Sidecar {
    producer: super::ids::ProducerId,
    seq: u64,
    mirror: Account,
    /// Its journal's id, named on its syncs (none by default).
    journal_id: Option<super::ids::ProducerId>,
}

impl Sidecar {
    fn new(name: &str, shared: &Account) -> Sidecar {
        Sidecar {
            producer: super::ids::ProducerId::parse(name).unwrap(),
            seq: 0,
            mirror: Account::mirror_of(shared),
            journal_id: None,
        }
    }

    fn sync(
        &mut self,
        shared: &mut Account,
        c: &Catalog,
        short: super::role::Short,
        close: bool,
        now: Timestamp,
    ) -> super::role::Granted {
        self.sync_records(shared, c, short, close, (Vec::new(), &[]), now)
            .granted
    }

    /// The records made since the last call, journaled as the store
    /// journals them: the mirror's charges since ride on the first.
    fn journal(&mut self, numbered: &mut u64) -> Vec<super::role::Journaled> {
        let mut entries: Vec<super::role::Journaled> = self
            .mirror
            .take_records()
            .into_iter()
            .map(|record| {
                *numbered += 1;
                super::role::Journaled {
                    journal: self.producer.clone(),
                    seq: *numbered,
                    record: (*record).clone(),
                    leased: Vec::new(),
                    unleased: Vec::new(),
                    producer: self.producer.clone(),
                    epoch: self.mirror.mirror().unwrap().epoch,
                }
            })
            .collect();
        let log = self.mirror.mirror_mut().unwrap();
        if let Some(first) = entries.first_mut() {
            first.leased = std::mem::take(&mut log.charged);
            first.unleased = std::mem::take(&mut log.unleased);
        }
        entries
    }

    /// One sync carrying `records`, of which `repeated` (journal, number)
    /// were found already recorded by the store.
    fn sync_records(
        &mut self,
        shared: &mut Account,
        c: &Catalog,
        short: super::role::Short,
        close: bool,
        (records, repeated): (Vec<super::role::Journaled>, &[(super::ids::ProducerId, u64)]),
        now: Timestamp,
    ) -> super::role::Synced {
        let report = self.mirror.report(close, close);
        self.seq += 1;
        let need_permits = short.need_permits();
        let sync = super::role::Sync {
            producer: self.producer.clone(),
            seq: self.seq,
            epoch: self.mirror.mirror().unwrap().epoch,
            charged: report.charged,
            unleased: report.unleased,
            returned: report.returned,
            unbacked: Some(report.unbacked),
            permits_back: report.permits_back,
            records,
            want: Vec::new(),
            need: short.need,
            need_permits,
            want_permits: short.permits,
            ttl: SignedDuration::from_secs(30),
            close,
            journal: self.journal_id.clone(),
        };
        let synced = shared.sync(c, &sync, repeated, now).unwrap();
        self.mirror.refresh_mirror(shared);
        self.mirror.accept(&synced.granted);
        self.mirror.mirror_mut().unwrap().decide_until =
            Some(synced.granted.expires_at - SignedDuration::from_secs(10));
        synced
    }

    /// Reserves `id` (10 input and at most 10 output tokens of `m`),
    /// which must be allowed.
    fn reserve(&mut self, shared: &mut Account, c: &Catalog, id: &str, now: Timestamp) -> Reserved {
        match self.apply(shared, c, Command::Reserve(req(id, "m", 10, 10)), now) {
            Reply::Reserve(outcome) => allowed(outcome),
            other => panic!("a reserve answered {other:?}"),
        }
    }

    fn apply(&mut self, shared: &mut Account, c: &Catalog, command: Command, now: Timestamp) -> Reply {
        match self.mirror.apply(c, command.clone(), now) {
            Err(EngineError::Short(short)) => {
                self.sync(shared, c, *short, false, now);
                self.mirror.mirror_mut().unwrap().last_word = true;
                let reply = self.mirror.apply(c, command, now);
                self.mirror.mirror_mut().unwrap().last_word = false;
                reply.unwrap()
            }
            other => other.unwrap(),
        }
    }
}

use super::command::{Command, Reply};

/// A report from `producer` (number `seq`, at lease `epoch`) of what it
/// `charged`, asking for `want`, and nothing else.
fn asking(producer: &str, seq: u64, epoch: u64, charged: Vec<Take>, want: Vec<(SourceRef, i128)>) -> super::role::Sync {
    super::role::Sync {
        producer: super::ids::ProducerId::parse(producer).unwrap(),
        seq,
        epoch,
        charged,
        unleased: Vec::new(),
        returned: Vec::new(),
        unbacked: Some(Vec::new()),
        permits_back: Vec::new(),
        records: Vec::new(),
        want,
        need: None,
        want_permits: Vec::new(),
        need_permits: Vec::new(),
        ttl: SignedDuration::from_secs(30),
        close: false,
        journal: None,
    }
}

fn no_short() -> super::role::Short {
    super::role::Short {
        need: None,
        permits: Vec::new(),
        least: Vec::new(),
    }
}

/// A reserve no funds can cover, even at its least (the prompt and one
/// output token), is denied without parking the balance in the sidecar
/// that asked: another sidecar's small reserve is still allowed, as on a
/// stand-alone account. One that the shared funds and the asking mirror's
/// slices cover together still borrows.
#[test]
fn an_oversized_reserve_borrows_nothing_and_parks_nothing() {
    let (c, mut shared) = funded("payg", 300_000);
    let (mut a, mut b) = (Sidecar::new("a", &shared), Sidecar::new("b", &shared));
    let now = t(NOW);
    // 500 input tokens alone cost 500,000.
    let big = a.apply(&mut shared, &c, Command::Reserve(req("big", "m", 500, 100)), now);
    assert!(
        matches!(
            big,
            Reply::Reserve(ReserveOutcome::Denied {
                denial: Denial::InsufficientFunds,
                ..
            })
        ),
        "{big:?}"
    );
    assert_eq!(a.mirror.paid.available(), 0, "nothing was lent for it");
    let small = b.apply(&mut shared, &c, Command::Reserve(req("small", "m", 10, 10)), now);
    let Reply::Reserve(ReserveOutcome::Allowed(r)) = small else {
        panic!("another sidecar's small reserve is allowed: {small:?}")
    };
    assert_eq!(r.granted_output_tokens, 10);
    // b now holds a slice of 50,000; a reserve b cannot fund alone whose
    // least (100,000 + 4,000) the shared 250,000 covers is lent for.
    let partial = b.apply(&mut shared, &c, Command::Reserve(req("partial", "m", 100, 100)), now);
    let Reply::Reserve(ReserveOutcome::Allowed(p)) = partial else {
        panic!("{partial:?}")
    };
    assert_eq!(p.granted_output_tokens, 37, "(250,000 - 100,000) / 4,000");
}

/// A reserve beyond what the tokens-per-minute bucket can admit at once is
/// refused without taking the bucket's tokens into one sidecar: another
/// sidecar's small reserve is still admitted.
#[test]
fn a_reserve_over_the_token_limit_parks_no_permits() {
    let (c, mut shared) = funded("payg", 100_000_000);
    shared.set_overrides(super::limits::LimitOverrides {
        account: Some(LimitSet {
            tokens_per_minute: 1000,
            ..Default::default()
        }),
        ..Default::default()
    });
    let (mut a, mut b) = (Sidecar::new("a", &shared), Sidecar::new("b", &shared));
    let now = t(NOW);
    let big = a.apply(&mut shared, &c, Command::Reserve(req("big", "m", 600, 900)), now);
    assert!(
        matches!(
            big,
            Reply::Reserve(ReserveOutcome::Denied {
                denial: Denial::RateLimited(_),
                ..
            })
        ),
        "{big:?}"
    );
    let small = b.apply(&mut shared, &c, Command::Reserve(req("small", "m", 100, 100)), now);
    assert!(
        matches!(small, Reply::Reserve(ReserveOutcome::Allowed(_))),
        "another sidecar's small reserve is admitted: {small:?}"
    );
}

/// Allowance lent to a sidecar that vanished comes back when its lease's
/// set-aside ends, in its own period, and rolls over with it, however many
/// periods pass before the shared account is next touched.
#[test]
fn lent_allowance_of_a_vanished_sidecar_rolls_over_in_time_order() {
    let mut c = catalog();
    let mut generous = plan(
        "generous",
        Some(Allowance {
            tokens: 1000,
            period: PeriodUnit::Month,
            anchor: Anchor::Calendar,
            rollover_cap: 5000,
        }),
    );
    generous.draw_order = SourceClass::DEFAULT_ORDER.to_vec();
    c.plans.insert(generous.id.clone(), generous);
    let mut shared = account(&c, "generous");
    let mut a = Sidecar::new("a", &shared);
    let now = t(NOW);
    let reply = a.apply(&mut shared, &c, Command::Reserve(req("r1", "m", 0, 900)), now);
    assert!(matches!(reply, Reply::Reserve(ReserveOutcome::Allowed(_))), "{reply:?}");
    assert_eq!(shared.balance(now).allowance_tokens, 100, "900 lent to a");
    // a is never heard of again; the account is next touched two period
    // ends later. Its 900 came back a minute or so after the reserve.
    let end = shared.subscription.as_ref().unwrap().window.end;
    let later = end + SignedDuration::from_hours(24 * 40);
    shared.advance(&c, later).unwrap();
    assert_eq!(shared.current_period(), Some(2));
    assert_eq!(
        shared.balance(later).allowance_tokens,
        3000,
        "1,000 carried into period 1, 2,000 into period 2, with its own 1,000"
    );
}

/// The same request decided by two sidecars (a retry sent to another one):
/// the store finds the second record's request id already recorded, and the
/// shared account applies it as a repeat, giving its charges back, even
/// when it shares its batch (and the batch's charges) with a new record.
#[test]
fn a_repeated_request_is_charged_once_and_its_batch_mate_in_full() {
    let (c, mut shared) = funded("payg", 1_000_000);
    let mut sidecars = [Sidecar::new("a", &shared), Sidecar::new("b", &shared)];
    let now = t(NOW);
    let charge = |id: &str, picos: i128| {
        Command::Charge(ChargeRequest {
            request_id: id.parse_id(),
            api_key_id: None,
            model: None,
            tier: TierId::default_tier(),
            what: ChargeWhat::Money(Money::from_picos(picos)),
        })
    };
    let mut numbered = [0, 0];
    let [a, b] = &mut sidecars;
    a.apply(&mut shared, &c, charge("retried", 7_000), now);
    let first = a.journal(&mut numbered[0]);
    let synced = a.sync_records(&mut shared, &c, no_short(), false, (first, &[]), now);
    assert_eq!(synced.applied.len(), 1);
    // b decides the retry again, and a new request beside it: one batch.
    b.apply(&mut shared, &c, charge("retried", 7_000), now);
    let mut batch = b.journal(&mut numbered[1]);
    b.apply(&mut shared, &c, charge("new", 5_000), now);
    let mut mate = b.journal(&mut numbered[1]);
    // As a sweep batches records: the batch's charges ride on its first.
    super::source::merge(&mut batch[0].leased, std::mem::take(&mut mate[0].leased));
    batch.extend(mate);
    assert_eq!(batch[0].leased, vec![take(SourceRef::Paid, 12_000)]);
    let repeat = [(batch[0].journal.clone(), batch[0].seq)];
    let synced = b.sync_records(&mut shared, &c, no_short(), false, (batch.clone(), &repeat), now);
    assert_eq!(synced.duplicates, vec![batch[0].clone()]);
    assert_eq!(synced.applied, vec![batch[1].clone()]);
    assert_eq!(shared.paid.charged(), 12_000, "7 000 once and 5 000");
    for car in &mut sidecars {
        car.sync(&mut shared, &c, no_short(), true, now);
    }
    assert_eq!(shared.paid.held(), 0);
    assert_eq!(shared.paid.charged(), 12_000);
    assert_eq!(shared.paid.available(), 1_000_000 - 12_000);
}

/// A sidecar cut off from the store decides as the last word (the store
/// contended, or an extend under a closed failure policy). Once its lease
/// has expired, the shared account may have taken its slices back and lent
/// them again: they are spent nowhere any more, and only the outage
/// allowance (none here) may be drawn on.
#[test]
fn a_mirror_past_its_leases_expiry_never_spends_its_slices_as_the_last_word() {
    let (c, mut shared) = funded("payg", 1_000_000);
    let mut a = Sidecar::new("a", &shared);
    let mut b = Sidecar::new("b", &shared);
    let now = t(NOW);
    let reserve = |id: &str| Command::Reserve(req(id, "m", 10, 10));
    let Reply::Reserve(ReserveOutcome::Allowed(r)) = a.apply(&mut shared, &c, reserve("a1"), now) else {
        panic!("a borrows a slice")
    };
    let settle = Command::Settle {
        reservation: r.reservation_id,
        usage: usage(1, 1),
    };
    a.apply(&mut shared, &c, settle, now);
    a.sync(&mut shared, &c, no_short(), false, now);
    assert!(a.mirror.paid.available() > 0, "a has a slice left");
    // a's lease expires; b takes everything there is.
    let later = now + SignedDuration::from_secs(31);
    for i in 0.. {
        let Reply::Reserve(ReserveOutcome::Allowed(r)) = b.apply(&mut shared, &c, reserve(&format!("b{i}")), later)
        else {
            break;
        };
        let settle = Command::Settle {
            reservation: r.reservation_id,
            usage: usage(10, r.granted_output_tokens),
        };
        b.apply(&mut shared, &c, settle, later);
    }
    // a, still cut off, is asked to decide as the last word.
    a.mirror.mirror_mut().unwrap().last_word = true;
    let reply = a
        .mirror
        .apply(&c, Command::Reserve(req("a2", "m", 1, 1)), later)
        .unwrap();
    a.mirror.mirror_mut().unwrap().last_word = false;
    assert!(
        matches!(reply, Reply::Reserve(ReserveOutcome::Denied { .. })),
        "decided from a slice that lapsed: {reply:?}"
    );
    for car in [&mut a, &mut b] {
        car.sync(&mut shared, &c, no_short(), true, later);
    }
    assert_eq!(shared.debt.charged(), 0, "no debt on a plan without credit");
    assert!(shared.paid.available() >= 0);
    assert_eq!(shared.paid.held(), 0);
}

/// Reserves and settles on `car` at `now` until the account runs dry;
/// returns what was charged.
fn drain(car: &mut Sidecar, shared: &mut Account, c: &Catalog, tag: &str, now: Timestamp) -> i128 {
    let mut charged = 0;
    for i in 0.. {
        let reserve = Command::Reserve(req(&format!("{tag}{i}"), "m", 10, 10));
        let Reply::Reserve(ReserveOutcome::Allowed(r)) = car.apply(shared, c, reserve, now) else {
            return charged;
        };
        let settle = Command::Settle {
            reservation: r.reservation_id,
            usage: usage(10, r.granted_output_tokens),
        };
        let Reply::Settle(record) = car.apply(shared, c, settle, now) else {
            panic!("a settle answers its record")
        };
        charged += record.total_money.picos();
    }
    unreachable!()
}

/// A sidecar cut off past its lease's expiry settles a hold it made under
/// the lease, and reports when it is back. What the lease held was kept
/// held meanwhile (for the hold TTL past the expiry), so the charge is
/// covered and nothing of it went to another sidecar.
#[test]
fn charges_reported_after_a_lapse_are_covered_by_what_the_lease_held() {
    let (c, mut shared) = funded("payg", 1_000_000);
    let mut a = Sidecar::new("a", &shared);
    let mut b = Sidecar::new("b", &shared);
    let now = t(NOW);
    let r = a.reserve(&mut shared, &c, "a1", now);
    let later = now + SignedDuration::from_secs(31);
    let drained = drain(&mut b, &mut shared, &c, "b", later);
    let settle = Command::Settle {
        reservation: r.reservation_id,
        usage: usage(10, 10),
    };
    let Reply::Settle(record) = a.mirror.apply(&c, settle, later).unwrap() else {
        panic!("a settle answers its record")
    };
    assert!(a.sync(&mut shared, &c, no_short(), false, later).lapsed);
    assert_eq!(shared.debt.charged(), 0, "no debt on a plan without credit");
    assert_eq!(shared.paid.charged(), drained + record.total_money.picos());
    for car in [&mut a, &mut b] {
        car.sync(&mut shared, &c, no_short(), true, later);
    }
    assert_eq!(shared.paid.held(), 0);
    assert_eq!(shared.paid.available(), 1_000_000 - shared.paid.charged());
}

/// A hold whose lease lapsed is extended while its sidecar, back from the
/// cut, reports it: what was set aside for it stays past the lease's
/// expiry plus a hold TTL, so its settle is still covered. (The extend
/// releases the hold's takes and holds them again; that release once ended
/// the hold's unbacked status, and its settle went to debt.)
#[test]
fn funds_set_aside_for_an_extended_hold_last_while_its_sidecar_reports_it() {
    let (c, mut shared) = funded("payg", 1_000_000);
    let mut a = Sidecar::new("a", &shared);
    let mut b = Sidecar::new("b", &shared);
    let now = t(NOW);
    let r = a.reserve(&mut shared, &c, "a1", now);
    let at = |s: i64| now + SignedDuration::from_secs(s);
    assert!(a.sync(&mut shared, &c, no_short(), false, at(31)).lapsed);
    // Extended from its own takes (the stream goes on), then reported.
    let extend = Command::Extend {
        reservation: r.reservation_id.clone(),
        max_output_tokens: 10,
    };
    a.mirror.mirror_mut().unwrap().last_word = true;
    a.mirror.apply(&c, extend, at(55)).unwrap();
    a.mirror.mirror_mut().unwrap().last_word = false;
    a.sync(&mut shared, &c, no_short(), false, at(55));
    // Past the lease's expiry plus a hold TTL (90 s), b takes all there is.
    let drained = drain(&mut b, &mut shared, &c, "b", at(100));
    assert_eq!(drained, 1_000_000 - 50_000, "all but what the extended hold needs");
    let settle = Command::Settle {
        reservation: r.reservation_id,
        usage: usage(10, 10),
    };
    a.mirror.apply(&c, settle, at(100)).unwrap();
    a.sync(&mut shared, &c, no_short(), true, at(100));
    assert_eq!(shared.debt.charged(), 0, "no debt on a plan without credit");
    assert_eq!(shared.paid.charged(), 1_000_000);
}

/// A sidecar that never comes back: what its lapsed lease held is lent
/// again once no record made under it can arrive within the idempotency
/// window (a hold TTL and the window past the lease's expiry).
#[test]
fn a_vanished_sidecars_lease_comes_back_once_its_records_can_no_longer_arrive() {
    let (c, mut shared) = funded("payg", 1_000_000);
    let mut a = Sidecar::new("a", &shared);
    let mut b = Sidecar::new("b", &shared);
    let now = t(NOW);
    a.apply(&mut shared, &c, Command::Reserve(req("a1", "m", 10, 10)), now);
    let held = shared.paid.held();
    assert!(held > 0);
    let first = drain(&mut b, &mut shared, &c, "b", now + SignedDuration::from_secs(31));
    assert_eq!(first, 1_000_000 - held, "all but what a's lease held");
    let expiry = now + SignedDuration::from_secs(30);
    let still = drain(
        &mut b,
        &mut shared,
        &c,
        "c",
        expiry + c.hold_ttl + SignedDuration::from_secs(1),
    );
    assert_eq!(still, 0, "a may still report what it charged under the lease");
    let after = expiry + c.hold_ttl + c.idempotency_window;
    let second = drain(&mut b, &mut shared, &c, "d", after);
    assert_eq!(first + second, 1_000_000, "then that too");
}

/// A sidecar cut off past its lease's expiry and a hold TTL settles a hold
/// it made under the lease, and reports when it is back, within the
/// idempotency window. What the lease held stayed set aside, so the charge
/// finds it. It was once lent again after a hold TTL, and the late charge
/// went to debt on a plan without credit.
#[test]
fn charges_reported_late_within_the_window_are_covered_by_what_their_lease_set_aside() {
    let (c, mut shared) = funded("payg", 1_000_000);
    let mut a = Sidecar::new("a", &shared);
    let mut b = Sidecar::new("b", &shared);
    let now = t(NOW);
    let at = |s: i64| now + SignedDuration::from_secs(s);
    let r = a.reserve(&mut shared, &c, "a1", now);
    // Cut off, a settles within the hold's TTL; it cannot report.
    let settle = Command::Settle {
        reservation: r.reservation_id,
        usage: usage(10, 10),
    };
    a.mirror.apply(&c, settle, at(50)).unwrap();
    // Past the lease's expiry and a hold TTL, b takes what it can.
    let drained = drain(
        &mut b,
        &mut shared,
        &c,
        "b",
        at(30) + c.hold_ttl + SignedDuration::from_secs(1),
    );
    assert_eq!(drained, 1_000_000 - 50_000, "all but what a's lease held");
    // a is back ten minutes later.
    a.sync(&mut shared, &c, no_short(), true, at(600));
    assert_eq!(shared.debt.charged(), 0, "no debt on a plan without credit");
    assert_eq!(shared.paid.charged(), 1_000_000);
    assert_eq!(shared.paid.held(), 0);
}

/// A sidecar killed and restarted on its journal reports what its
/// predecessor journaled; what the predecessor's lease held, set aside or
/// not, comes back with that report rather than after the window.
#[test]
fn a_sidecar_restarted_on_its_journal_takes_back_its_predecessors_lease() {
    let (c, mut shared) = funded("payg", 1_000_000);
    let journal = super::ids::ProducerId::parse("journal-1").unwrap();
    let mut a = Sidecar::new("a", &shared);
    a.journal_id = Some(journal.clone());
    let mut b = Sidecar::new("b", &shared);
    let now = t(NOW);
    let at = |s: i64| now + SignedDuration::from_secs(s);
    let r = a.reserve(&mut shared, &c, "a1", now);
    let settle = Command::Settle {
        reservation: r.reservation_id,
        usage: usage(10, 4),
    };
    a.mirror.apply(&c, settle, at(1)).unwrap();
    let records = a.journal(&mut 0);
    // a is killed; its lease lapses, what it held is set aside.
    b.sync(&mut shared, &c, no_short(), false, at(31));
    assert_eq!(shared.paid.held(), 50_000, "a's slice is set aside");
    // Restarted on the same journal, under a new producer id.
    let mut again = Sidecar::new("a-again", &shared);
    again.journal_id = Some(journal);
    let synced = again.sync_records(&mut shared, &c, no_short(), false, (records, &[]), at(40));
    assert_eq!(synced.applied.len(), 1, "the journaled settle is applied");
    assert_eq!(shared.paid.held(), 0, "the predecessor's lease holds nothing now");
    assert_eq!(shared.debt.charged(), 0);
    assert_eq!(shared.paid.available() + shared.paid.charged(), 1_000_000);
    assert!(
        shared.paid.charged() > 0 && shared.paid.charged() < 50_000,
        "the settle, not the hold"
    );
}

#[test]
fn sidecars_on_leases_drain_an_account_exactly_and_never_below_zero() {
    let (c, mut shared) = funded("payg", 1_000_000);
    let mut sidecars = [Sidecar::new("a", &shared), Sidecar::new("b", &shared)];
    let now = t(NOW);
    let (mut charged, mut denied) = (0i128, 0);
    for i in 0..60 {
        let car = &mut sidecars[i % 2];
        let id = format!("r{i}");
        let reserved = car.apply(&mut shared, &c, Command::Reserve(req(&id, "m", 10, 10)), now);
        match reserved {
            Reply::Reserve(ReserveOutcome::Allowed(r)) => {
                let settle = Command::Settle {
                    reservation: r.reservation_id,
                    usage: usage(10, r.granted_output_tokens.min(5)),
                };
                let Reply::Settle(record) = car.apply(&mut shared, &c, settle, now) else {
                    panic!("settle answers a record")
                };
                charged += record.total_money.picos();
            }
            Reply::Reserve(ReserveOutcome::Denied { .. }) => denied += 1,
            other => panic!("unexpected {other:?}"),
        }
        assert!(shared.paid.available() >= 0, "never below zero");
    }
    assert!(denied > 0, "the account ran dry");
    for car in &mut sidecars {
        car.sync(&mut shared, &c, no_short(), true, now);
    }
    // What is left is less than one request's worst case per sidecar: a
    // short mirror gives its slice back and asks for exactly its need.
    assert!(shared.paid.available() < 2 * 50_000, "left {}", shared.paid.available());
    assert_eq!(shared.paid.held(), 0, "nothing lent after both left");
    assert_eq!(shared.paid.charged(), charged, "every charge reported exactly once");
    assert_eq!(shared.paid.available(), 1_000_000 - charged);
}

#[test]
fn a_repeated_report_changes_nothing_and_a_lapsed_lease_comes_back() {
    let (c, mut shared) = funded("payg", 1_000_000);
    let now = t(NOW);
    let producer = super::ids::ProducerId::parse("a").unwrap();
    let ask = |seq, epoch, charged: Vec<Take>| asking("a", seq, epoch, charged, vec![(SourceRef::Paid, 400_000)]);
    // A first lease: epoch 1 (a mirror that never held one is at 0).
    let first = shared.sync(&c, &ask(1, 0, vec![]), &[], now).unwrap().granted;
    assert!(!first.lapsed);
    assert_eq!(first.epoch, 1);
    assert_eq!(
        first.takes,
        vec![take(SourceRef::Paid, 250_000)],
        "a quarter of what is left"
    );
    assert_eq!(
        shared.sync(&c, &ask(1, 0, vec![]), &[], now).unwrap().granted,
        first,
        "a retry gets the first answer"
    );
    assert_eq!(shared.paid.held(), 250_000, "and lends nothing twice");
    let second = shared
        .sync(&c, &ask(2, 1, vec![take(SourceRef::Paid, 100_000)]), &[], now)
        .unwrap();
    assert_eq!(
        second.granted.takes,
        vec![take(SourceRef::Paid, 187_500)],
        "(1_000_000 - 150_000 held - 100_000 charged) / 4"
    );
    shared
        .sync(&c, &ask(2, 1, vec![take(SourceRef::Paid, 100_000)]), &[], now)
        .unwrap();
    assert_eq!(shared.paid.charged(), 100_000, "a repeated report is applied once");
    assert!(
        shared.sync(&c, &ask(1, 1, vec![]), &[], now).is_err(),
        "an older report is refused"
    );
    // The sidecar goes silent: at the expiry what was lent is set aside,
    // lent to nobody.
    let later = now + SignedDuration::from_secs(30);
    shared.apply(&c, Command::Balance, later).unwrap();
    assert_eq!(shared.paid.held(), 337_500);
    assert_eq!(shared.leases()[&producer].epoch, 2);
    // A report from before the lapse still counts its charges, out of what
    // was set aside.
    let late = shared
        .sync(&c, &ask(3, 1, vec![take(SourceRef::Paid, 50_000)]), &[], later)
        .unwrap();
    assert!(late.granted.lapsed);
    assert_eq!(shared.paid.charged(), 150_000);
    assert_eq!(
        shared.leases()[&producer].lapsed[0].held,
        vec![take(SourceRef::Paid, 287_500)]
    );
    // A hold TTL and the idempotency window after each lease's expiry (no
    // record made under it can arrive later), the rest comes back.
    let lent_late = late.granted.takes[0].amount;
    let kept = c.hold_ttl + c.idempotency_window;
    shared.apply(&c, Command::Balance, later + kept).unwrap();
    assert_eq!(
        shared.paid.held(),
        lent_late,
        "the new lease's slice, set aside in its turn"
    );
    shared
        .apply(&c, Command::Balance, later + SignedDuration::from_secs(30) + kept)
        .unwrap();
    assert_eq!(shared.paid.held(), 0);
    assert_eq!(
        shared.paid.available() + shared.paid.held() + shared.paid.charged(),
        1_000_000
    );
}

#[test]
fn per_sidecar_concurrency_is_counted_locally_and_fleet_concurrency_is_leased() {
    let mut c = catalog();
    let plan = c.plans.get_mut(&PlanId::parse("limited").unwrap()).unwrap();
    plan.limits.account = LimitSet {
        concurrent_requests: 3,
        concurrent_requests_per_sidecar: 2,
        ..Default::default()
    };
    let mut shared = account(&c, "limited");
    top_up(&mut shared, &c, "t1", Pool::Paid, 10_000_000);
    let now = t(NOW);
    let (mut a, mut b) = (Sidecar::new("a", &shared), Sidecar::new("b", &shared));
    let outcome = |reply: Reply| match reply {
        Reply::Reserve(o) => o,
        other => panic!("unexpected {other:?}"),
    };
    for id in ["a1", "a2"] {
        allowed(outcome(a.apply(
            &mut shared,
            &c,
            Command::Reserve(req(id, "m", 1, 1)),
            now,
        )));
    }
    let ReserveOutcome::Denied { message, .. } =
        outcome(a.apply(&mut shared, &c, Command::Reserve(req("a3", "m", 1, 1)), now))
    else {
        panic!("a third request through one sidecar")
    };
    assert_eq!(message, "per-sidecar concurrent-requests limit of 2 on the account");
    allowed(outcome(b.apply(
        &mut shared,
        &c,
        Command::Reserve(req("b1", "m", 1, 1)),
        now,
    )));
    let ReserveOutcome::Denied { message, .. } =
        outcome(b.apply(&mut shared, &c, Command::Reserve(req("b2", "m", 1, 1)), now))
    else {
        panic!("a fourth request in the fleet")
    };
    assert_eq!(message, "concurrent-requests limit of 3 on the account");
}

#[test]
fn a_shared_account_survives_its_json_form_exactly() {
    let (c, mut shared) = funded("pro", 123_456_789_012_345);
    pack(&mut shared, &c, "p1", 500, "2026-06-01T00:00:00Z");
    let mut car = Sidecar::new("a", &shared);
    car.apply(&mut shared, &c, Command::Reserve(req("r1", "m", 10, 10)), t(NOW));
    let json = serde_json::to_value(&shared).unwrap();
    let back: Account = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(serde_json::to_value(&back).unwrap(), json, "a fixed point");
    assert_eq!(back.paid, shared.paid);
    assert_eq!(back.allowance, shared.allowance);
    assert_eq!(back.packs, shared.packs);
    assert_eq!(back.subscription, shared.subscription);
    assert_eq!(back.leases(), shared.leases());
    assert_eq!(back.buckets, shared.buckets);
    assert_eq!(back.time_zone.iana_name(), Some("Europe/Paris"));
    assert!(!back.leases().is_empty());
}

#[test]
fn a_shared_account_is_stored_without_its_defaults() {
    let (c, mut shared) = funded("payg", 1_000_000_000_000_000);
    // Nothing at its default is written: no empty ledgers, maps or lots.
    assert_eq!(
        serde_json::to_string(&shared).unwrap(),
        r#"{"id":"acct","plan":"payg","time_zone":"Europe/Paris","paid":{"granted":1000000000000000},"operations":[["operation_id t1","top_up|Paid|1000.000000000000"]]}"#
    );
    // One sidecar's lease on it, with its answer kept for retries.
    let mut car = Sidecar::new("a", &shared);
    car.apply(&mut shared, &c, Command::Reserve(req("r1", "m", 10, 10)), t(NOW));
    let json = serde_json::to_string(&shared).unwrap();
    assert!(json.len() <= 600, "{} bytes: {json}", json.len());
    let back: Account = serde_json::from_str(&json).unwrap();
    assert_eq!(serde_json::to_string(&back).unwrap(), json, "a fixed point");
}

#[test]
fn a_shared_account_written_with_every_field_reads_the_same() {
    // As builds that wrote every field stored a used account (a fixture
    // taken from Redis): it reads as the account it was.
    let stored = r#"{"id":"tenant-1","plan":"payg","time_zone":"UTC","anchor":null,"suspended":false,"credit_limit":"0.000000000000","subscription":null,"allowance":{"granted":0,"held":0,"charged":0,"forfeited":0},"periods_started":0,"packs":{},"promos":{},"paid":{"granted":1000000000000000,"held":60142993599,"charged":267000000000,"forfeited":0},"debt":{"granted":0,"held":0,"charged":0,"forfeited":0},"operations":[["operation_id seed:paid","top_up|Paid|1000.000000000000"]],"buckets":{"map":[]},"overrides":null,"leases":{"13688-1796541591125-1246995825":{"held":[{"source":"paid","money":"0.060142993599"}],"permits":[],"expires_at":"2026-12-06T07:20:39.925294868Z","seq":9125,"epoch":1,"last":{"takes":[],"permits":[],"expires_at":"2026-12-06T07:20:39.925294868Z","epoch":1,"lapsed":false,"written_off":0,"retry_after_ms":null},"journal":"journal-1796541591121-761f2147"}},"journals":{"journal-1796541591121-761f2147":8691}}"#;
    let read: Account = serde_json::from_str(stored).unwrap();
    assert_eq!(
        read.paid.available(),
        1_000_000_000_000_000 - 60_142_993_599 - 267_000_000_000
    );
    let lease = read.leases().values().next().unwrap();
    assert_eq!((lease.seq, lease.epoch, lease.held.len()), (9125, 1, 1));
    let written = serde_json::to_string(&read).unwrap();
    assert_eq!(
        written,
        r#"{"id":"tenant-1","plan":"payg","time_zone":"UTC","paid":{"granted":1000000000000000,"held":60142993599,"charged":267000000000},"operations":[["operation_id seed:paid","top_up|Paid|1000.000000000000"]],"leases":{"13688-1796541591125-1246995825":{"held":[{"source":"paid","money":"0.060142993599"}],"expires_at":"2026-12-06T07:20:39.925294868Z","seq":9125,"epoch":1,"last":{"expires_at":"2026-12-06T07:20:39.925294868Z","epoch":1},"journal":"journal-1796541591121-761f2147"}},"journals":{"journal-1796541591121-761f2147":8691}}"#
    );
    let again: Account = serde_json::from_str(&written).unwrap();
    assert_eq!(serde_json::to_string(&again).unwrap(), written);
    assert_eq!(again.leases(), read.leases());
}

#[test]
fn a_hold_that_outlives_its_lapsed_lease_is_charged_from_what_was_set_aside_never_from_the_new_lease() {
    let (c, mut shared) = funded("payg", 1_000_000);
    let mut car = Sidecar::new("a", &shared);
    let now = t(NOW);
    let reserved = car.apply(&mut shared, &c, Command::Reserve(req("r1", "m", 10, 10)), now);
    assert!(matches!(reserved, Reply::Reserve(ReserveOutcome::Allowed(_))));
    assert_eq!(shared.paid.held(), 50_000, "exactly the need was lent");
    // Cut off longer than the lease: the shared account sets the slice
    // aside, lent to nobody, for the hold TTL.
    let later = now + SignedDuration::from_secs(31);
    shared.apply(&c, Command::Balance, later).unwrap();
    assert_eq!(shared.paid.held(), 50_000);
    assert!(shared.leases()[&car.producer].held.is_empty());
    // The sidecar is back and borrows for a new request under a new epoch.
    let reserved = car.apply(&mut shared, &c, Command::Reserve(req("r2", "m", 10, 10)), later);
    assert!(matches!(reserved, Reply::Reserve(ReserveOutcome::Allowed(_))));
    assert_eq!(shared.paid.held(), 100_000, "r2's backing, and r1's set aside");
    // r1 settles: its charge comes out of what was set aside, r2's backing
    // stays whole.
    let settle = Command::Settle {
        reservation: "r1".parse_id(),
        usage: usage(10, 5),
    };
    car.apply(&mut shared, &c, settle, later);
    car.sync(&mut shared, &c, no_short(), false, later);
    assert_eq!(shared.paid.charged(), 30_000);
    assert_eq!(shared.debt.charged(), 0);
    let lease = &shared.leases()[&car.producer];
    assert_eq!(
        lease.held,
        vec![take(SourceRef::Paid, 50_000)],
        "r2's backing is untouched"
    );
    assert!(
        lease.lapsed.is_empty(),
        "r1's release came back: the sidecar holds nothing unbacked any more"
    );
    assert_eq!(shared.paid.held(), 50_000);
    let m = &car.mirror;
    assert_eq!(m.paid.available(), 0, "what r1 released was not backed: gone");
    car.sync(&mut shared, &c, no_short(), true, later);
    assert_eq!(shared.paid.held(), 0);
    assert_eq!(shared.paid.available(), 1_000_000 - 30_000);
}

/// A lease that lapsed is forgotten by the shared account once the
/// idempotency window has passed (at once with a window of zero), by
/// whichever sidecar syncs next. Its own sidecar, back after a cut, must
/// still learn that it lapsed: its slices were taken back and may have been
/// lent again. It was once given a new lease at its old epoch and went on
/// deciding from slices it no longer had.
#[test]
fn a_lease_forgotten_after_its_lapse_is_still_lapsed_for_its_sidecar() {
    let mut c = catalog();
    c.idempotency_window = SignedDuration::ZERO;
    let mut shared = account(&c, "payg");
    top_up(&mut shared, &c, "t1", Pool::Paid, 1_000_000);
    let (mut a, mut b) = (Sidecar::new("a", &shared), Sidecar::new("b", &shared));
    let now = t(NOW);
    let reserved = a.apply(&mut shared, &c, Command::Reserve(req("r1", "m", 10, 10)), now);
    let Reply::Reserve(ReserveOutcome::Allowed(r1)) = reserved else {
        panic!("r1 is allowed: {reserved:?}")
    };
    assert_eq!(shared.paid.held(), 50_000, "exactly the need was lent to a");
    // a is cut off longer than its lease. Its request fails: the hold goes
    // back to a's slice, which a believes it still holds.
    let later = now + SignedDuration::from_secs(31);
    a.apply(&mut shared, &c, Command::Release(r1.reservation_id), later);
    assert_eq!(a.mirror.paid.available(), 50_000);
    // b syncs meanwhile: a's lease lapses, what it held is set aside for a
    // hold TTL, then taken back, and the lease, holding nothing, forgotten.
    b.sync(&mut shared, &c, no_short(), false, later);
    assert_eq!(shared.paid.held(), 50_000, "a's slice is set aside");
    let gone = now + SignedDuration::from_secs(31) + c.hold_ttl;
    b.sync(&mut shared, &c, no_short(), false, gone);
    assert_eq!(shared.paid.held(), 0, "a's slice was taken back");
    assert!(!shared.leases().contains_key(&a.producer), "and a's lease forgotten");
    // a is back: it must drop the slice, not go on deciding from it.
    let later = gone;
    let granted = a.sync(&mut shared, &c, no_short(), false, later);
    assert!(granted.lapsed, "a is told its lease lapsed");
    assert_eq!(a.mirror.paid.available(), 0, "a decides from nothing it lost");
    assert_eq!(shared.paid.held(), 0);
    assert_eq!(shared.paid.available(), 1_000_000, "nothing was charged");
    // A sidecar that never held a lease is not told of a lapse.
    let mut fresh = Sidecar::new("c", &shared);
    assert!(!fresh.sync(&mut shared, &c, no_short(), false, later).lapsed);
}

/// A sidecar drops an idle mirror and makes it anew at the next request
/// (epoch 0) while its lease lives on: it is not told of a lapse, and what
/// the lease still holds, unknown to the new mirror, is taken back rather
/// than stranded.
#[test]
fn a_mirror_made_anew_is_not_lapsed_and_strands_nothing() {
    let (c, mut shared) = funded("payg", 1_000_000);
    let mut a = Sidecar::new("a", &shared);
    let now = t(NOW);
    let reserved = a.apply(&mut shared, &c, Command::Reserve(req("r1", "m", 10, 10)), now);
    assert!(matches!(reserved, Reply::Reserve(ReserveOutcome::Allowed(_))));
    assert_eq!(shared.paid.held(), 50_000);
    // Same producer, report numbers going on, a mirror that knows nothing.
    let mut again = Sidecar::new("a", &shared);
    again.seq = a.seq;
    let granted = again.sync(&mut shared, &c, no_short(), false, now);
    assert!(!granted.lapsed, "a new mirror is not a lapsed one");
    assert_eq!(granted.epoch, shared.leases()[&again.producer].epoch);
    assert_eq!(shared.paid.held(), 0, "what the old mirror held came back");
    assert_eq!(shared.paid.available(), 1_000_000);
}

#[test]
fn a_reload_takes_plans_and_new_versions_and_refuses_what_would_rewrite_history() {
    let current = catalog();
    let mut next = catalog();
    next.hold_ttl = SignedDuration::from_mins(5);
    // v1 as it is in force (with the `big` model): unchanged, so accepted.
    let v1 = current.prices.get(&VersionId::parse("v1").unwrap()).unwrap();
    let v2 = version("v2", "2026-04-01T00:00:00Z", 500, 2000);
    next.prices = PriceBook::new(vec![PriceVersion::clone(v1), v2.clone()]).unwrap();
    let reloaded = current.reloaded(next.clone(), t(NOW)).unwrap();
    assert_eq!(reloaded.hold_ttl, SignedDuration::from_mins(5));
    let ids: Vec<String> = reloaded.prices.versions().iter().map(|v| v.id.to_string()).collect();
    assert_eq!(ids, ["v1", "v2"]);

    // Dropping a plan, editing a version, or adding one in the past: each
    // named, nothing taken.
    let mut bad = next.clone();
    bad.plans.remove(&PlanId::parse("pro").unwrap());
    let edited = version("v1", "2026-01-01T00:00:00Z", 999, 4000);
    let past = version("v0", "2026-03-01T00:00:00Z", 1, 1);
    bad.prices = PriceBook::new(vec![edited, past]).unwrap();
    let problems = current.reloaded(bad, t(NOW)).unwrap_err();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems[0].contains("plans.pro"), "{problems:?}");
    assert!(
        problems.iter().any(|p| p.contains("v1") && p.contains("never edited")),
        "{problems:?}"
    );
    assert!(problems.iter().any(|p| p.contains("v0")), "{problems:?}");
}

#[test]
fn a_refund_repays_debt_first_and_debt_repaid_since_goes_back_to_paid() {
    use super::record::RecordKind;
    let (c, mut a) = funded("payg", 1_000_000);
    let r = allowed(a.reserve(&c, &req("r1", "m", 0, 10), t(NOW)).unwrap());
    // 2,000,000 charged: 1,000,000 paid, 1,000,000 debt.
    let record = a.settle(&c, &r.reservation_id, usage(0, 500), t(NOW)).unwrap();
    assert_eq!(
        record.charges,
        vec![take(SourceRef::Paid, 1_000_000), take(SourceRef::Debt, 1_000_000)]
    );
    // A top-up repays the debt; then the whole record is refunded.
    top_up(&mut a, &c, "t2", Pool::Paid, 1_000_000);
    let request = RequestId::parse("r1").unwrap();
    let made = (t(NOW), Some(true));
    a.refund(&c, &request, RecordKind::Settle, &record.charges, made, t(NOW))
        .unwrap();
    let b = a.balance(t(NOW));
    assert_eq!(
        (b.paid, b.debt),
        (Money::from_picos(2_000_000), Money::ZERO),
        "all of it spendable again"
    );
    // Once per request, whatever kind the caller names.
    let again = a.refund(
        &c,
        &request,
        RecordKind::Charge,
        &[take(SourceRef::Paid, 1)],
        made,
        t(NOW),
    );
    assert!(matches!(again, Err(EngineError::Conflict(_))), "{again:?}");

    // Owing debt, a refunded paid charge repays it first.
    let mut d = account(&c, "payg");
    top_up(&mut d, &c, "t1", Pool::Paid, 1_000_000);
    let r = allowed(d.reserve(&c, &req("r2", "m", 0, 10), t(NOW)).unwrap());
    d.settle(&c, &r.reservation_id, usage(0, 500), t(NOW)).unwrap();
    let request = RequestId::parse("r2").unwrap();
    d.refund(
        &c,
        &request,
        RecordKind::Settle,
        &[take(SourceRef::Paid, 400_000)],
        made,
        t(NOW),
    )
    .unwrap();
    let b = d.balance(t(NOW));
    assert_eq!((b.paid, b.debt), (Money::ZERO, Money::from_picos(600_000)));
}

/// Every allowance period is one ledger: a refund that names several
/// periods gives back at most what the allowance was charged in all.
#[test]
fn a_refund_across_allowance_periods_gives_back_at_most_what_was_charged() {
    use super::record::RecordKind;
    let c = catalog();
    let mut a = account(&c, "pro");
    let r = allowed(a.reserve(&c, &req("r1", "m", 0, 100), t(NOW)).unwrap());
    let record = a.settle(&c, &r.reservation_id, usage(0, 100), t(NOW)).unwrap();
    let [
        Take {
            source: SourceRef::Allowance { period },
            amount: 100,
        },
    ] = record.charges.as_slice()
    else {
        panic!("the allowance pays: {:?}", record.charges)
    };
    let request = RequestId::parse("r1").unwrap();
    let made = (t(NOW), Some(true));
    let twice = [
        take(SourceRef::Allowance { period: *period }, 100),
        take(SourceRef::Allowance { period: period + 1 }, 100),
    ];
    let refused = a.refund(&c, &request, RecordKind::Settle, &twice, made, t(NOW));
    assert!(matches!(refused, Err(EngineError::Precondition(_))), "{refused:?}");
    assert_eq!(a.allowance.charged(), 100, "nothing given back");
    a.refund(&c, &request, RecordKind::Settle, &record.charges, made, t(NOW))
        .unwrap();
    assert_eq!(a.allowance.charged(), 0);
}

/// A refund names a record: one settled within the idempotency window
/// must be one the store found, or it never existed. An older one cannot
/// be checked (each source still gives back at most what it was charged).
#[test]
fn a_refund_of_a_record_never_made_within_the_window_is_refused() {
    use super::record::RecordKind;
    let (c, mut a) = funded("payg", 1_000_000);
    let r = allowed(a.reserve(&c, &req("r1", "m", 0, 10), t(NOW)).unwrap());
    a.settle(&c, &r.reservation_id, usage(0, 100), t(NOW)).unwrap();
    let made_up = RequestId::parse("never-made").unwrap();
    let charges = [take(SourceRef::Paid, 1)];
    let refused = a.refund(
        &c,
        &made_up,
        RecordKind::Charge,
        &charges,
        (t(NOW), Some(false)),
        t(NOW),
    );
    assert!(
        matches!(&refused, Err(EngineError::NotFound(m)) if m.contains("within the idempotency window")),
        "{refused:?}"
    );
    let future = t(NOW) + SignedDuration::from_hours(1);
    let refused = a.refund(&c, &made_up, RecordKind::Charge, &charges, (future, None), t(NOW));
    assert!(
        matches!(
            &refused,
            Err(EngineError::Invalid {
                field: "settled_at",
                ..
            })
        ),
        "{refused:?}"
    );
    assert_eq!(a.paid.charged(), 400_000, "nothing given back");
    let long_ago = t(NOW) - c.idempotency_window - SignedDuration::from_secs(1);
    a.refund(
        &c,
        &made_up,
        RecordKind::Charge,
        &charges,
        (long_ago, Some(false)),
        t(NOW),
    )
    .unwrap();
    assert!(a.made_record(&RequestId::parse("r1").unwrap()) && !a.made_record(&made_up));
}

/// Only a request that made a record is one a refund may name: an open or
/// released hold made none, a settle, a charge and a lapse charged in full
/// did. The answer says so for a minute, the fingerprint after that.
#[test]
fn a_request_made_a_record_only_once_it_was_charged() {
    let mut c = catalog();
    c.on_expiry = ExpiryPolicy::ChargeInFull;
    let mut a = account(&c, "payg");
    top_up(&mut a, &c, "t1", Pool::Paid, 10_000_000);
    let id = |s: &str| RequestId::parse(s).unwrap();
    let open = allowed(a.reserve(&c, &req("open", "m", 0, 10), t(NOW)).unwrap());
    let released = allowed(a.reserve(&c, &req("released", "m", 0, 10), t(NOW)).unwrap());
    a.release(&c, &released.reservation_id, t(NOW)).unwrap();
    let settled = allowed(a.reserve(&c, &req("settled", "m", 0, 10), t(NOW)).unwrap());
    a.settle(&c, &settled.reservation_id, usage(0, 5), t(NOW)).unwrap();
    assert!(!a.made_record(&id("open")), "an open hold made no record");
    assert!(!a.made_record(&id("released")));
    assert!(a.made_record(&id("settled")));
    // The open hold lapses, charged in full; every answer is let go.
    let lapsed = open.expires_at + SignedDuration::from_secs(1);
    a.advance(&c, lapsed).unwrap();
    assert!(a.made_record(&id("open")), "charged in full at its TTL");
    let later = lapsed + super::account::ANSWERS_KEPT + SignedDuration::from_secs(1);
    a.prune(&c, later);
    assert!(a.traffic().requests.is_empty(), "only fingerprints are left");
    assert!(a.made_record(&id("open")) && a.made_record(&id("settled")));
    assert!(!a.made_record(&id("released")) && !a.made_record(&id("never")));
}

/// A refund retried under its adjustment id is the same change whatever
/// the store found about its record the second time.
#[test]
fn a_retried_refund_is_the_same_change_whatever_the_store_found() {
    use super::command::{Command, Reply};
    let (c, mut a) = funded("payg", 1_000_000);
    let r = allowed(a.reserve(&c, &req("r1", "m", 0, 10), t(NOW)).unwrap());
    a.settle(&c, &r.reservation_id, usage(0, 100), t(NOW)).unwrap();
    let refund_at = |settled_at, recorded| Command::Refund {
        request_id: RequestId::parse("r1").unwrap(),
        kind: RecordKind::Settle,
        charges: vec![take(SourceRef::Paid, 1_000)],
        settled_at,
        recorded,
    };
    let refund = |recorded| refund_at(t(NOW), recorded);
    let audit = audit(&a, "refund", "refund-1");
    let before = a.paid.charged();
    let (_, first) = a.apply_audited(&c, refund(Some(true)), t(NOW), &audit).unwrap();
    // The audit record says what was given back, as records list charges:
    // what `charged` went down by (the billing database reconciles on it).
    let first = first.unwrap();
    assert_eq!(first.refunded, vec![take(SourceRef::Paid, 1_000)]);
    assert_eq!(before - a.paid.charged(), 1_000);
    let charged = a.paid.charged();
    let again = a.apply_audited(&c, refund(None), t(NOW), &audit);
    assert!(matches!(again, Ok((Reply::Done, None))), "{again:?}");
    assert_eq!(a.paid.charged(), charged, "given back once");
    // Only a change the operator did not ask for the first time conflicts.
    let other = refund_at(t(NOW) - SignedDuration::from_secs(1), Some(true));
    assert!(matches!(
        a.apply_audited(&c, other, t(NOW), &audit),
        Err(EngineError::Conflict(_))
    ));
}

/// Past [`super::account::MAX_ANSWERS`] closed requests, exactly the
/// oldest go (by when they closed, then by id), down to half, and never
/// the request just answered: also when a flood closes them all in the
/// same instant.
#[test]
fn bounding_answers_lets_go_of_exactly_the_oldest_and_never_the_current() {
    use super::account::MAX_ANSWERS;
    let c = catalog();
    for spread in [false, true] {
        let mut a = account(&c, "payg");
        top_up(&mut a, &c, "t1", Pool::Paid, 10_000_000_000);
        let charge = |i: usize| ChargeRequest {
            request_id: format!("c{i:05}").parse_id(),
            api_key_id: None,
            model: None,
            tier: TierId::default_tier(),
            what: ChargeWhat::Money(Money::from_picos(1)),
        };
        let at = |i: usize| match spread {
            true => t(NOW) + SignedDuration::from_millis(i as i64),
            false => t(NOW),
        };
        let mut last = None;
        for i in 0..=MAX_ANSWERS {
            last = Some(a.charge(&c, &charge(i), at(i)).unwrap());
        }
        let kept = &a.traffic().requests;
        assert_eq!(kept.len(), MAX_ANSWERS / 2 + 1, "spread {spread}");
        for i in 0..MAX_ANSWERS / 2 {
            assert!(!kept.contains_key(&charge(i).request_id), "c{i} is among the oldest");
        }
        assert_eq!(a.traffic().spent.len(), MAX_ANSWERS / 2);
        // The newest, and the request just answered, still get their answer.
        let now = at(MAX_ANSWERS);
        assert_eq!(a.charge(&c, &charge(MAX_ANSWERS), now).unwrap(), last.unwrap());
        assert!(a.charge(&c, &charge(MAX_ANSWERS / 2), now).is_ok());
        let gone = a.charge(&c, &charge(0), now).unwrap_err();
        assert!(matches!(&gone, EngineError::Precondition(m) if m.contains("no longer kept")));
    }
}

/// A caller that reserves and never settles cannot hold memory without
/// bound: past [`super::account::MAX_OPEN_HOLDS`] open holds a reserve is
/// refused until some close.
#[test]
fn open_holds_are_capped_per_account() {
    use super::account::MAX_OPEN_HOLDS;
    let (c, mut a) = funded("payg", 10_000_000_000);
    let mut first = None;
    for i in 0..MAX_OPEN_HOLDS {
        let r = allowed(a.reserve(&c, &req(&format!("r{i}"), "m", 0, 1), t(NOW)).unwrap());
        first.get_or_insert(r);
    }
    let refused = a.reserve(&c, &req("one-more", "m", 0, 1), t(NOW)).unwrap_err();
    assert!(
        matches!(&refused, EngineError::Exhausted(m) if m.contains("holds open")),
        "{refused:?}"
    );
    a.release(&c, &first.unwrap().reservation_id, t(NOW)).unwrap();
    allowed(a.reserve(&c, &req("one-more", "m", 0, 1), t(NOW)).unwrap());
}

#[test]
fn a_retried_pack_grant_is_the_same_change_whatever_order_its_models_came_in() {
    use super::command::Command;
    let c = catalog();
    let mut a = account(&c, "payg");
    let grant = |models: [&str; 3]| {
        Command::GrantPack(PackGrant {
            pack_id: LotId::parse("p1").unwrap(),
            tokens: 10,
            expires_at: t("2026-04-01T00:00:00Z"),
            models: Some(models.iter().map(|m| ModelId::parse(m).unwrap()).collect()),
            priority: 0,
        })
    };
    let audit = audit(&a, "grant_pack", "order-1");
    let (_, first) = a.apply_audited(&c, grant(["m", "w", "other"]), t(NOW), &audit).unwrap();
    assert!(first.is_some());
    let (_, again) = a.apply_audited(&c, grant(["other", "m", "w"]), t(NOW), &audit).unwrap();
    assert!(again.is_none(), "a retry, not another change");
}

/// An account's role is its type. A stand-alone account becomes shared at
/// its first sync, and what is stored reads back shared. A mirror lends
/// nothing: a sync sent to one is refused and changes nothing (before,
/// one was applied, lending from whatever the mirror held).
#[test]
fn roles_are_types_and_a_mirror_never_lends() {
    use super::role::Role;
    let (c, mut shared) = funded("payg", 1_000_000);
    let now = t(NOW);
    assert_eq!(shared.role, Role::Standalone);
    let mut car = Sidecar::new("a", &shared);
    assert!(car.mirror.is_mirror() && car.mirror.leases().is_empty());
    car.reserve(&mut shared, &c, "r1", now);
    assert!(matches!(shared.role, Role::Shared(_)), "shared from its first sync");

    let ask = asking("b", 1, 0, Vec::new(), vec![(SourceRef::Paid, 1_000)]);
    let before = car.mirror.paid;
    let refused = car.mirror.sync(&c, &ask, &[], now).unwrap_err();
    assert!(matches!(refused, EngineError::Precondition(_)), "{refused:?}");
    assert_eq!(car.mirror.paid, before, "nothing lent");
    assert!(car.mirror.is_mirror() && car.mirror.leases().is_empty());

    let stored: Account = serde_json::from_value(serde_json::to_value(&shared).unwrap()).unwrap();
    assert!(matches!(stored.role, Role::Shared(_)));
    assert_eq!(stored.leases(), shared.leases());
    let json = serde_json::to_value(&car.mirror).unwrap();
    assert!(json.get("leases").is_none() && json.get("journals").is_none(), "{json}");
}

// ---- budgets ----

use super::budget::{Budget, BudgetPeriod, Budgets, Project};
use super::limits::Scope;

/// A budget on `key` of `money` pico-units and/or `tokens` per `period`.
fn key_budget(key: &str, period: BudgetPeriod, money: Option<i128>, tokens: Option<u64>) -> Budgets {
    let mut b = Budgets::default();
    b.keys.insert(
        super::ids::ApiKeyId::parse(key).unwrap(),
        Budget {
            period,
            money: money.map(Money::from_picos),
            tokens,
        },
    );
    b
}

fn by_key(id: &str, key: &str, input: u64, output: u64) -> ReserveRequest {
    ReserveRequest {
        api_key_id: Some(super::ids::ApiKeyId::parse(key).unwrap()),
        ..req(id, "m", input, output)
    }
}

fn exhausted(outcome: ReserveOutcome) -> super::budget::Exhausted {
    match denial(outcome) {
        Denial::BudgetExceeded(e) => e,
        other => panic!("denied for {other:?}, not a budget"),
    }
}

/// A key's money budget shrinks a grant to what it has room for, counts
/// what a settle actually spent, and then denies naming the budget and
/// its reset (the next month in the account's time zone); a release gives
/// the room back, and other keys are not limited by it.
#[test]
fn a_key_budget_caps_grants_counts_actual_spend_and_denies_naming_itself() {
    let (c, mut a) = funded("payg", 100_000_000_000);
    let now = t(NOW);
    let budgets = key_budget("k1", BudgetPeriod::Month, Some(100_000), None);
    a.apply(&c, Command::SetBudgets(budgets), now).unwrap();
    // 10 input and 10 output tokens of `m` cost at most 50,000.
    let r1 = allowed(a.reserve(&c, &by_key("r1", "k1", 10, 10), now).unwrap());
    assert_eq!(r1.granted_output_tokens, 10);
    a.settle(&c, &"r1".parse_id(), usage(10, 5), now).unwrap();
    // 30,000 spent: 70,000 left, room for 15 output tokens after the prompt.
    let r2 = allowed(a.reserve(&c, &by_key("r2", "k1", 10, 100), now).unwrap());
    assert_eq!(r2.granted_output_tokens, 15);
    let e = exhausted(a.reserve(&c, &by_key("r3", "k1", 10, 10), now).unwrap());
    assert_eq!(
        (e.scope, &*e.id, e.money, e.limit),
        (Scope::KeyBudget, "k1", true, 100_000)
    );
    assert_eq!(e.resets_at, t("2026-03-31T22:00:00Z"), "April 1st, midnight in Paris");
    assert!(a.balance(now).budgets[0].counted.used.money == 100_000);
    // Another key and no key at all are not limited by k1's budget.
    allowed(a.reserve(&c, &by_key("other", "k2", 10, 100), now).unwrap());
    allowed(a.reserve(&c, &req("none", "m", 10, 100), now).unwrap());
    a.release(&c, &"r2".parse_id(), now).unwrap();
    allowed(a.reserve(&c, &by_key("r3", "k1", 10, 10), now).unwrap());
    // A new month starts afresh.
    let april = t("2026-04-01T00:00:00Z");
    let e = a.reserve(&c, &by_key("r4", "k1", 10, 10), april).unwrap();
    assert_eq!(allowed(e).granted_output_tokens, 10);
}

/// A project's token budget counts every key of the project, one-shot
/// charges included (counted without a check: the work is done), and
/// starts afresh the next day.
#[test]
fn a_project_budget_counts_every_key_and_resets_with_the_day() {
    let (c, mut a) = funded("payg", 100_000_000_000);
    let now = t(NOW);
    let mut budgets = Budgets::default();
    budgets.projects.insert(
        super::ids::ProjectId::parse("research").unwrap(),
        Project {
            keys: ["k1", "k2"]
                .iter()
                .map(|k| super::ids::ApiKeyId::parse(k).unwrap())
                .collect(),
            budget: Some(Budget {
                period: BudgetPeriod::Day,
                money: None,
                tokens: Some(100),
            }),
        },
    );
    a.apply(&c, Command::SetBudgets(budgets), now).unwrap();
    allowed(a.reserve(&c, &by_key("a", "k1", 10, 40), now).unwrap());
    allowed(a.reserve(&c, &by_key("b", "k2", 10, 30), now).unwrap());
    let charge = ChargeRequest {
        request_id: "c".parse_id(),
        api_key_id: Some(super::ids::ApiKeyId::parse("k2").unwrap()),
        model: Some("m".parse_id()),
        tier: TierId::default_tier(),
        what: ChargeWhat::Usage(usage(5, 5)),
    };
    assert!(matches!(a.charge(&c, &charge, now).unwrap(), ChargeOutcome::Charged(_)));
    // 50 + 40 + 10 counted: nothing left, not even for a prompt.
    let e = exhausted(a.reserve(&c, &by_key("d", "k1", 1, 1), now).unwrap());
    assert_eq!(
        (e.scope, &*e.id, e.money, e.limit),
        (Scope::ProjectBudget, "research", false, 100)
    );
    assert_eq!(e.resets_at, t("2026-03-10T23:00:00Z"), "midnight in Paris");
    let next_day = t("2026-03-10T23:00:00Z");
    allowed(a.reserve(&c, &by_key("d", "k1", 1, 1), next_day).unwrap());
}

/// Sidecars lent slices of a budget never admit more than it allows
/// between them, and a budget-short reserve is denied as the budget's.
#[test]
fn sidecars_never_admit_more_than_a_budget_between_them() {
    let (c, mut shared) = funded("payg", 100_000_000_000);
    let now = t(NOW);
    let budgets = key_budget("k1", BudgetPeriod::Rolling30Days, None, Some(1_000));
    shared.apply(&c, Command::SetBudgets(budgets), now).unwrap();
    let mut sidecars = [
        Sidecar::new("a", &shared),
        Sidecar::new("b", &shared),
        Sidecar::new("c", &shared),
    ];
    let (mut admitted, mut denied) = (0u64, 0);
    for i in 0..200 {
        let side = &mut sidecars[i % 3];
        let command = Command::Reserve(by_key(&format!("r{i}"), "k1", 10, 10));
        match side.apply(&mut shared, &c, command, now) {
            Reply::Reserve(ReserveOutcome::Allowed(r)) => admitted += 10 + r.granted_output_tokens,
            Reply::Reserve(ReserveOutcome::Denied {
                denial: Denial::BudgetExceeded(e),
                ..
            }) => {
                assert_eq!((&*e.id, e.limit), ("k1", 1_000));
                denied += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(admitted <= 1_000, "admitted {admitted} tokens under a budget of 1,000");
    assert!(admitted >= 900, "only {admitted} admitted: slices stranded");
    assert!(denied > 0);
}

// ---- alerts ----

use super::alert::AlertSettings;

fn alert_keys(alerts: &[super::alert::AlertRecord]) -> Vec<String> {
    alerts.iter().map(|a| a.key.clone()).collect()
}

/// Each threshold crossed alerts once; it alerts again only once it has
/// stopped holding (a top-up) and is crossed anew; a new allowance period
/// has thresholds of its own; debt alerts when it begins.
#[test]
fn alerts_fire_once_per_crossing_and_rearm_when_the_level_clears() {
    let c = catalog();
    let mut a = account(&c, "pro");
    top_up(&mut a, &c, "t1", Pool::Paid, 100_000);
    let now = t(NOW);
    let settings = AlertSettings {
        balance_below: vec![Money::from_picos(50_000)],
        allowance_used: vec![50, 80],
        debt_started: true,
        ..AlertSettings::default()
    };
    a.apply(&c, Command::SetAlerts(Some(settings)), now).unwrap();
    assert!(a.alerts_due(&c, now).is_empty(), "nothing crossed yet");
    // The pro plan grants 1,000 allowance tokens a month: 600 used.
    allowed(a.reserve(&c, &req("r1", "m", 100, 500), now).unwrap());
    a.settle(&c, &"r1".parse_id(), usage(100, 500), now).unwrap();
    assert_eq!(alert_keys(&a.alerts_due(&c, now)), ["allowance_used:period:0:50"]);
    assert!(a.alerts_due(&c, now).is_empty(), "once");
    allowed(a.reserve(&c, &req("r2", "m", 100, 200), now).unwrap());
    a.settle(&c, &"r2".parse_id(), usage(100, 200), now).unwrap();
    assert_eq!(alert_keys(&a.alerts_due(&c, now)), ["allowance_used:period:0:80"]);
    // Money: 100,000 paid; 60,000 spent leaves 40,000, below 50,000.
    let charge = |id: &str, picos: i128| ChargeRequest {
        request_id: id.parse_id(),
        api_key_id: None,
        model: None,
        tier: TierId::default_tier(),
        what: ChargeWhat::Money(Money::from_picos(picos)),
    };
    a.charge(&c, &charge("c1", 60_000), now).unwrap();
    let due = a.alerts_due(&c, now);
    assert_eq!(alert_keys(&due), ["balance_below:0.000000050000"]);
    assert_eq!(
        (due[0].alert.as_str(), due[0].value.as_str()),
        ("balance_below", "0.000000040000")
    );
    a.charge(&c, &charge("c2", 10_000), now).unwrap();
    assert!(a.alerts_due(&c, now).is_empty(), "still below: not again");
    // A top-up re-arms it; crossing again alerts again, under a new id.
    top_up(&mut a, &c, "t2", Pool::Paid, 100_000);
    assert!(a.alerts_due(&c, now).is_empty());
    a.charge(&c, &charge("c3", 100_000), now).unwrap();
    let again = a.alerts_due(&c, t("2026-03-10T12:00:01Z"));
    assert_eq!(alert_keys(&again), ["balance_below:0.000000050000"]);
    assert_ne!(again[0].id(), due[0].id());
    // Usage past every source: debt begins.
    allowed(a.reserve(&c, &req("r3", "m", 10, 10), now).unwrap());
    a.settle(&c, &"r3".parse_id(), usage(1_000, 1_000), now).unwrap();
    assert!(alert_keys(&a.alerts_due(&c, now)).contains(&"debt_started:0".to_owned()));
    // The next month's allowance has thresholds of its own, armed.
    let april = t("2026-04-01T00:00:00Z");
    let keys = alert_keys(&a.alerts_due(&c, april));
    assert!(!keys.iter().any(|k| k.starts_with("allowance_used")), "{keys:?}");
}

/// A mirror never alerts: what it sees are slices; the shared account
/// alerts, once, when the sync brings the spending in.
#[test]
fn only_the_shared_account_alerts() {
    let (c, mut shared) = funded("payg", 100_000);
    let now = t(NOW);
    let settings = AlertSettings {
        balance_below: vec![Money::from_picos(90_000)],
        ..AlertSettings::default()
    };
    shared.apply(&c, Command::SetAlerts(Some(settings)), now).unwrap();
    let mut side = Sidecar::new("a", &shared);
    side.reserve(&mut shared, &c, "r1", now);
    side.apply(
        &mut shared,
        &c,
        Command::Settle {
            reservation: "r1".parse_id(),
            usage: usage(10, 10),
        },
        now,
    );
    assert!(side.mirror.alerts_due(&c, now).is_empty(), "a mirror never alerts");
    side.sync(&mut shared, &c, no_short(), false, now);
    assert_eq!(
        alert_keys(&shared.alerts_due(&c, now)),
        ["balance_below:0.000000090000"]
    );
}

/// A sidecar that gave back every permit of a budget (a balance read, an
/// idle give-back) and let go of the empty bucket still reports what its
/// open hold gives back at settle: nothing stays counted that was not
/// spent.
#[test]
fn a_settle_after_the_permits_went_back_still_corrects_the_budget() {
    let (c, mut shared) = funded("payg", 100_000_000_000);
    let now = t(NOW);
    let budgets = key_budget("k1", BudgetPeriod::Month, None, Some(1_000));
    shared.apply(&c, Command::SetBudgets(budgets), now).unwrap();
    let mut side = Sidecar::new("a", &shared);
    let reserved = side.apply(&mut shared, &c, Command::Reserve(by_key("r1", "k1", 10, 90)), now);
    assert!(
        matches!(reserved, Reply::Reserve(ReserveOutcome::Allowed(_))),
        "{reserved:?}"
    );
    // Everything unused goes back; the bucket, holding nothing, is let go.
    side.sync_records(&mut shared, &c, no_short(), false, (Vec::new(), &[]), now);
    let report = side.mirror.report(true, true);
    assert!(
        report.permits_back.iter().any(|(k, _)| k.scope == Scope::KeyBudget),
        "{report:?}"
    );
    side.mirror.buckets.prune(now);
    side.apply(
        &mut shared,
        &c,
        Command::Settle {
            reservation: "r1".parse_id(),
            usage: usage(10, 10),
        },
        now,
    );
    let back = side.mirror.report(true, true).permits_back;
    let budget = back
        .iter()
        .find(|(k, _)| k.scope == Scope::KeyBudget)
        .map(|(_, p)| p.tokens);
    assert_eq!(budget, Some(80), "the 80 tokens the hold did not use go back: {back:?}");
}

/// An extend on a rolling budget is checked against the window as it
/// stands now, not the one its hold was admitted in.
#[test]
fn an_extend_on_a_rolling_budget_sees_todays_window() {
    let (c, mut a) = funded("payg", 100_000_000_000);
    let budgets = key_budget("k1", BudgetPeriod::Rolling30Days, None, Some(100));
    a.apply(&c, Command::SetBudgets(budgets), t("2026-02-01T12:00:00Z"))
        .unwrap();
    // 50 tokens on day D-29 (February 9th), then a hold of 10 late on day D.
    allowed(
        a.reserve(&c, &by_key("old", "k1", 25, 25), t("2026-02-09T12:00:00Z"))
            .unwrap(),
    );
    a.settle(&c, &"old".parse_id(), usage(25, 25), t("2026-02-09T12:00:00Z"))
        .unwrap();
    let day_d = t("2026-03-10T22:59:40Z"); // 23:59:40 in Paris
    let hold = a.reserve(&c, &by_key("h", "k1", 5, 5), day_d).unwrap();
    assert_eq!(allowed(hold).granted_output_tokens, 5);
    // On D+1 the 50 of D-29 are out: 90 left, and a reserve takes them.
    let next = t("2026-03-10T23:00:10Z"); // just past midnight in Paris
    assert_eq!(
        allowed(a.reserve(&c, &by_key("new", "k1", 45, 45), next).unwrap()).granted_output_tokens,
        45
    );
    let e = a.extend(&c, &"h".parse_id(), 45, next).unwrap();
    assert_eq!(e.granted_output_tokens, 5, "nothing left in today's window");
    assert!(matches!(e.shortfall, Some(Denial::BudgetExceeded(_))), "{e:?}");
}

/// A budget alert follows what was spent, not what holds and slices
/// count: a reserve's worst case alerts nothing, a settle past the
/// threshold alerts once, and holds coming and going do not repeat it.
#[test]
fn a_budget_alert_follows_spend_once() {
    let (c, mut a) = funded("payg", 100_000_000_000);
    let now = t(NOW);
    a.apply(
        &c,
        Command::SetBudgets(key_budget("k1", BudgetPeriod::Month, None, Some(1_000))),
        now,
    )
    .unwrap();
    let settings = AlertSettings {
        budget_used: vec![50],
        ..AlertSettings::default()
    };
    a.apply(&c, Command::SetAlerts(Some(settings)), now).unwrap();
    allowed(a.reserve(&c, &by_key("r1", "k1", 100, 600), now).unwrap());
    assert!(a.alerts_due(&c, now).is_empty(), "a worst case of 70% is not spend");
    a.settle(&c, &"r1".parse_id(), usage(100, 300), now).unwrap();
    assert!(a.alerts_due(&c, now).is_empty(), "40% spent");
    allowed(a.reserve(&c, &by_key("r2", "k1", 100, 100), now).unwrap());
    a.settle(&c, &"r2".parse_id(), usage(100, 50), now).unwrap();
    let due = a.alerts_due(&c, now);
    assert_eq!(alert_keys(&due), ["budget_used:k1#2026-03:tokens:50"]);
    for i in 0..3 {
        let id = format!("again-{i}");
        allowed(a.reserve(&c, &by_key(&id, "k1", 10, 100), now).unwrap());
        a.release(&c, &id.parse_id(), now).unwrap();
        assert!(a.alerts_due(&c, now).is_empty(), "not again");
    }
    let twice = AlertSettings {
        pack_used: vec![80, 80],
        ..AlertSettings::default()
    };
    assert!(a.apply(&c, Command::SetAlerts(Some(twice)), now).is_err());
}
