//! Property tests of the engine: random sequences of reserve, extend,
//! settle, release, charge, and of the operator's moves (top-up, adjust,
//! pack grants and revocations, refunds, plan changes, credit limits, time
//! zones, limit overrides), and clock advances over several accounts,
//! checked after every step against the invariants of DESIGN.md:
//!
//! - conservation: what each ledger was granted equals the credits the
//!   test made; what ledgers charged equals what the usage records say was
//!   charged, to the unit; what ledgers hold equals what open holds hold;
//! - no source below its floor (money not below minus the credit limit,
//!   or where it stood when the limit was lowered);
//! - an idempotent replay changes nothing and emits nothing;
//! - a refused operation changes nothing.

#![allow(clippy::unwrap_used)]

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;
use tollgate::engine::account::{Account, Reservation};
use tollgate::engine::catalog::Catalog;
use tollgate::engine::ids::{AccountId, LotId, ModelId, PlanId, RequestId, ReservationId, TierId};
use tollgate::engine::limits::{LimitOverrides, LimitSet};
use tollgate::engine::money::Money;
use tollgate::engine::pricing::Usage;
use tollgate::engine::request::{ChargeRequest, ChargeWhat, PackGrant, Pool, ReserveRequest};
use tollgate::engine::source::SourceRef;
use tollgate::engine::{Command, UsageRecord, fixture};

#[derive(Debug, Clone)]
enum Op {
    Reserve {
        acct: usize,
        req: u8,
        model: bool,
        input: u64,
        output: u64,
    },
    Extend {
        acct: usize,
        req: u8,
        max: u64,
    },
    Settle {
        acct: usize,
        req: u8,
        input: u64,
        output: u64,
    },
    Release {
        acct: usize,
        req: u8,
    },
    Charge {
        acct: usize,
        req: u8,
        money: Option<i128>,
        input: u64,
        output: u64,
    },
    TopUp {
        acct: usize,
        op: u8,
        promo: bool,
        amount: i128,
    },
    Adjust {
        acct: usize,
        op: u8,
        amount: i128,
    },
    GrantPack {
        acct: usize,
        id: u8,
        tokens: u64,
        ttl: i64,
        scoped: bool,
    },
    RevokePack {
        acct: usize,
        id: u8,
    },
    Refund {
        acct: usize,
        req: u8,
        half: bool,
    },
    AssignPlan {
        acct: usize,
        plan: usize,
    },
    SetCredit {
        acct: usize,
        amount: i128,
    },
    SetTimeZone {
        acct: usize,
        tz: usize,
    },
    SetLimits {
        acct: usize,
        rpm: u64,
        tpm: u64,
    },
    Advance {
        secs: i64,
    },
    Replay,
}

const PLANS: [&str; 3] = ["payg", "daily", "cash"];
const TIME_ZONES: [&str; 3] = ["Europe/Paris", "Pacific/Kiritimati", "America/St_Johns"];

fn op() -> impl Strategy<Value = Op> {
    let acct = 0..3usize;
    prop_oneof![
        4 => (acct.clone(), 0..10u8, any::<bool>(), 0..3000u64, 0..3000u64)
            .prop_map(|(acct, req, model, input, output)| Op::Reserve { acct, req, model, input, output }),
        1 => (acct.clone(), 0..10u8, 0..6000u64).prop_map(|(acct, req, max)| Op::Extend { acct, req, max }),
        3 => (acct.clone(), 0..10u8, 0..4000u64, 0..6000u64)
            .prop_map(|(acct, req, input, output)| Op::Settle { acct, req, input, output }),
        1 => (acct.clone(), 0..10u8).prop_map(|(acct, req)| Op::Release { acct, req }),
        1 => (acct.clone(), 10..14u8, prop::option::of(1..5_000_000i128), 0..2000u64, 0..2000u64)
            .prop_map(|(acct, req, money, input, output)| Op::Charge { acct, req, money, input, output }),
        2 => (acct.clone(), 0..6u8, any::<bool>(), 1..20_000_000i128)
            .prop_map(|(acct, op, promo, amount)| Op::TopUp { acct, op, promo, amount }),
        1 => (acct.clone(), 0..6u8, -10_000_000..10_000_000i128)
            .prop_map(|(acct, op, amount)| Op::Adjust { acct, op, amount }),
        1 => (acct.clone(), 0..4u8, 1..5000u64, 1..200i64, any::<bool>())
            .prop_map(|(acct, id, tokens, ttl, scoped)| Op::GrantPack { acct, id, tokens, ttl, scoped }),
        1 => (acct.clone(), 0..4u8).prop_map(|(acct, id)| Op::RevokePack { acct, id }),
        1 => (acct.clone(), 0..14u8, any::<bool>()).prop_map(|(acct, req, half)| Op::Refund { acct, req, half }),
        1 => (acct.clone(), 0..3usize).prop_map(|(acct, plan)| Op::AssignPlan { acct, plan }),
        1 => (acct.clone(), 0..3_000_000i128).prop_map(|(acct, amount)| Op::SetCredit { acct, amount }),
        1 => (acct.clone(), 0..3usize).prop_map(|(acct, tz)| Op::SetTimeZone { acct, tz }),
        1 => (acct.clone(), 0..20u64, 0..20_000u64).prop_map(|(acct, rpm, tpm)| Op::SetLimits { acct, rpm, tpm }),
        2 => (1..50i64).prop_map(|secs| Op::Advance { secs }),
        1 => (1..48i64).prop_map(|hours| Op::Advance { secs: hours * 3600 }),
        1 => Just(Op::Replay),
    ]
}

/// The random runs' catalog (`engine::fixture::random_runs`), on which the
/// saved regressions were found: holds lapse after 30 s, so one step's
/// advance can reach a TTL.
fn catalog(charge_in_full: bool) -> Catalog {
    fixture::random_runs(SignedDuration::from_secs(30), charge_in_full)
}

/// What the test itself credited and saw charged, per account.
#[derive(Default)]
struct Books {
    money_credited: i128,
    pack_tokens_credited: i128,
    money_recorded: i128,
    tokens_recorded: i128,
    /// Allowance granted: each period started, at its plan's tokens.
    allowance_granted: i128,
    periods_seen: u64,
    /// Paid money's floor: minus the credit limit, or where it stood when
    /// the limit was lowered below it.
    paid_floor: i128,
    /// The records made, by request id (what a refund names).
    records: std::collections::HashMap<RequestId, UsageRecord>,
}

impl Books {
    /// Counts the periods `a` started since last seen, at its plan's
    /// tokens.
    fn periods(&mut self, a: &Account, catalog: &Catalog) {
        let tokens = catalog.plans[&a.plan].allowance.as_ref().map_or(0, |al| al.tokens);
        self.allowance_granted += i128::from(tokens) * i128::from(a.periods_started - self.periods_seen);
        self.periods_seen = a.periods_started;
    }
}

fn command(op: &Op, now: Timestamp, books: &[Books]) -> Option<(usize, Command)> {
    let rid = |req: &u8| RequestId::parse(&format!("r{req}")).unwrap();
    let resv = |req: &u8| ReservationId::parse(&format!("r{req}")).unwrap();
    let lot = |prefix: &str, id: &u8| LotId::parse(&format!("{prefix}{id}")).unwrap();
    Some(match op {
        Op::Reserve {
            acct,
            req,
            model,
            input,
            output,
        } => (
            *acct,
            Command::Reserve(ReserveRequest {
                request_id: rid(req),
                api_key_id: None,
                model: ModelId::parse(if *model { "w" } else { "m" }).unwrap(),
                tier: TierId::default_tier(),
                input_tokens: *input,
                cached_input_tokens: input / 3,
                max_output_tokens: *output,
            }),
        ),
        Op::Extend { acct, req, max } => (
            *acct,
            Command::Extend {
                reservation: resv(req),
                max_output_tokens: *max,
            },
        ),
        Op::Settle {
            acct,
            req,
            input,
            output,
        } => {
            let usage = Usage {
                input_tokens: *input,
                cached_input_tokens: 7,
                cache_write_tokens: 3,
                output_tokens: *output,
            };
            (
                *acct,
                Command::Settle {
                    reservation: resv(req),
                    usage,
                },
            )
        }
        Op::Release { acct, req } => (*acct, Command::Release(resv(req))),
        Op::Charge {
            acct,
            req,
            money,
            input,
            output,
        } => {
            let what = match money {
                Some(m) => ChargeWhat::Money(Money::from_picos(*m)),
                None => ChargeWhat::Usage(Usage {
                    input_tokens: *input,
                    output_tokens: *output,
                    ..Default::default()
                }),
            };
            let model = Some(ModelId::parse("m").unwrap());
            (
                *acct,
                Command::Charge(ChargeRequest {
                    request_id: rid(req),
                    api_key_id: None,
                    model,
                    tier: TierId::default_tier(),
                    what,
                }),
            )
        }
        Op::TopUp {
            acct,
            op,
            promo,
            amount,
        } => {
            let pool = if *promo {
                Pool::Promo {
                    expires_at: Some(now + SignedDuration::from_secs(90)),
                    priority: 0,
                }
            } else {
                Pool::Paid
            };
            (
                *acct,
                Command::TopUp {
                    operation_id: lot(if *promo { "promo" } else { "top" }, op),
                    pool,
                    amount: Money::from_picos(*amount),
                },
            )
        }
        Op::Adjust { acct, op, amount } => (
            *acct,
            Command::Adjust {
                operation_id: lot("adj", op),
                amount: Money::from_picos(*amount),
            },
        ),
        Op::GrantPack {
            acct,
            id,
            tokens,
            ttl,
            scoped,
        } => (
            *acct,
            Command::GrantPack(PackGrant {
                pack_id: lot("pack", id),
                tokens: *tokens,
                expires_at: now + SignedDuration::from_secs(*ttl),
                models: scoped.then(|| std::iter::once(ModelId::parse("w").unwrap()).collect()),
                priority: i32::from(*id % 2),
            }),
        ),
        Op::RevokePack { acct, id } => (*acct, Command::RevokePack(lot("pack", id))),
        Op::Refund { acct, req, half } => {
            // A record the account made (or, if none, one it never made).
            let request = RequestId::parse(&format!("r{req}")).unwrap();
            let (kind, charges, settled_at, recorded) = match books[*acct].records.get(&request) {
                Some(r) => (r.kind, r.charges.clone(), r.settled_at, Some(true)),
                None => (
                    tollgate::engine::record::RecordKind::Charge,
                    vec![tollgate::engine::source::Take {
                        source: SourceRef::Paid,
                        amount: 1,
                    }],
                    now,
                    Some(false),
                ),
            };
            let charges = charges
                .into_iter()
                .map(|t| tollgate::engine::source::Take {
                    amount: if *half { (t.amount + 1) / 2 } else { t.amount },
                    ..t
                })
                .collect();
            (
                *acct,
                Command::Refund {
                    request_id: request,
                    kind,
                    charges,
                    settled_at,
                    recorded,
                },
            )
        }
        Op::AssignPlan { acct, plan } => (
            *acct,
            Command::AssignPlan {
                plan: PlanId::parse(PLANS[*plan]).unwrap(),
                anchor: None,
            },
        ),
        Op::SetCredit { acct, amount } => (
            *acct,
            Command::Update {
                time_zone: None,
                credit_limit: Some(Money::from_picos(*amount)),
            },
        ),
        Op::SetTimeZone { acct, tz } => (
            *acct,
            Command::Update {
                time_zone: Some(TimeZone::get(TIME_ZONES[*tz]).unwrap()),
                credit_limit: None,
            },
        ),
        Op::SetLimits { acct, rpm, tpm } => (
            *acct,
            Command::SetOverrides(LimitOverrides {
                account: Some(LimitSet {
                    requests_per_minute: *rpm,
                    tokens_per_minute: *tpm,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        Op::Advance { .. } | Op::Replay => return None,
    })
}

/// The operator's changes that only an adjustment id makes idempotent.
fn audited(command: &Command) -> bool {
    matches!(
        command,
        Command::Refund { .. } | Command::AssignPlan { .. } | Command::Update { .. } | Command::SetOverrides(_)
    )
}

/// `command` on `a`, an operator's change as the admin API applies it
/// (under adjustment id `adjustment`).
fn apply(
    a: &mut Account,
    catalog: &Catalog,
    command: Command,
    now: Timestamp,
    adjustment: u64,
) -> Result<tollgate::engine::Reply, tollgate::engine::EngineError> {
    if !audited(&command) {
        return a.apply(catalog, command, now);
    }
    let audit = tollgate::engine::record::AuditRecord {
        kind: "audit".into(),
        account_id: Some(a.id.clone()),
        operator: "properties".into(),
        peer: "test".into(),
        operation: command.name().into(),
        adjustment_id: format!("adj-{adjustment}"),
        reason: "a property test".into(),
        change: String::new(),
        before: Default::default(),
        after: Default::default(),
        refunded: Vec::new(),
        at: now,
    };
    a.apply_audited(catalog, command, now, &audit).map(|(reply, _)| reply)
}

/// Everything a refused or replayed operation must leave alone.
fn state(a: &Account) -> String {
    let mut holds: Vec<_> = a.holds().map(|h| format!("{h:?}")).collect();
    holds.sort();
    format!(
        "{:?} {:?} {:?} {:?} {:?} {holds:?} {} {} {}",
        a.allowance,
        a.paid,
        a.debt,
        a.packs,
        a.promos,
        a.traffic().reservations.len(),
        a.traffic().requests.len(),
        a.operations.len()
    )
}

fn record(books: &mut Books, r: &UsageRecord) {
    books.records.insert(r.request_id.clone(), r.clone());
    let money: i128 = r
        .charges
        .iter()
        .filter(|t| !t.source.is_tokens())
        .map(|t| t.amount)
        .sum();
    assert_eq!(
        Money::from_picos(money),
        r.total_money,
        "record total is the sum of its money takes"
    );
    assert!(r.charges.iter().all(|t| t.amount > 0));
    books.money_recorded += money;
    books.tokens_recorded += r
        .charges
        .iter()
        .filter(|t| t.source.is_tokens())
        .map(|t| t.amount)
        .sum::<i128>();
}

fn check(a: &Account, books: &Books, catalog: &Catalog) {
    let lots = || a.packs.values().chain(a.promos.values()).map(|l| &l.ledger);
    for l in lots().chain([&a.allowance, &a.paid, &a.debt]) {
        assert!(l.held() >= 0 && l.charged() >= 0 && l.forfeited() >= 0, "{l:?}");
    }
    for l in lots().chain([&a.allowance]) {
        assert!(l.available() >= 0, "token or promo source below zero: {l:?}");
    }
    assert!(
        a.paid.available() >= books.paid_floor,
        "paid below minus the credit limit (or where it stood when the limit was lowered): {:?}, floor {}",
        a.paid,
        books.paid_floor
    );
    assert!(
        a.debt.available() <= 0,
        "debt repaid beyond what was owed: {:?}",
        a.debt
    );

    // The expiry index lists exactly the open holds.
    let open: std::collections::BTreeSet<_> = a
        .traffic()
        .reservations
        .iter()
        .filter_map(|(id, r)| match r {
            Reservation::Open(h) => Some((h.expires_at, id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(&open, &a.traffic().expiries, "expiry index out of step with open holds");

    // Held by ledgers = held by open holds, per unit.
    let (mut hold_tokens, mut hold_money) = (0, 0);
    for t in a.holds().flat_map(|h| &h.takes) {
        assert!(!matches!(t.source, SourceRef::Debt), "debt is never held");
        if t.source.is_tokens() {
            hold_tokens += t.amount
        } else {
            hold_money += t.amount
        }
    }
    let money_ledgers = || a.promos.values().map(|l| l.ledger).chain([a.paid, a.debt]);
    let token_ledgers = || a.packs.values().map(|l| l.ledger).chain([a.allowance]);
    assert_eq!(token_ledgers().map(|l| l.held()).sum::<i128>(), hold_tokens);
    assert_eq!(money_ledgers().map(|l| l.held()).sum::<i128>(), hold_money);

    // Granted = credited.
    assert_eq!(
        money_ledgers().map(|l| l.granted()).sum::<i128>(),
        books.money_credited,
        "money granted vs credited"
    );
    assert_eq!(
        a.packs.values().map(|l| l.ledger.granted()).sum::<i128>(),
        books.pack_tokens_credited
    );
    if let Some(period) = a.current_period() {
        assert_eq!(
            period + 1,
            a.periods_started,
            "periods are numbered from 0, never again"
        );
    }
    let _ = catalog;
    assert_eq!(
        a.allowance.granted(),
        books.allowance_granted,
        "one allowance per period started, at its plan's tokens"
    );
    // Charged = recorded, to the unit.
    assert_eq!(
        money_ledgers().map(|l| l.charged()).sum::<i128>(),
        books.money_recorded,
        "money charged vs records"
    );
    assert_eq!(
        token_ledgers().map(|l| l.charged()).sum::<i128>(),
        books.tokens_recorded,
        "tokens charged vs records"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_after_every_step(ops in prop::collection::vec(op(), 1..80), charge_in_full in any::<bool>()) {
        let catalog = catalog(charge_in_full);
        let mut now: Timestamp = "2026-03-29T00:30:00Z".parse().unwrap();
        let plans = PLANS;
        let credit = [Money::from_picos(2_000_000), Money::ZERO, Money::from_picos(500_000)];
        let mut accounts: Vec<Account> = (0..3)
            .map(|i| {
                let plan = &catalog.plans[&PlanId::parse(plans[i]).unwrap()];
                let tz = TimeZone::get("Europe/Paris").unwrap();
                Account::open(AccountId::parse(&format!("a{i}")).unwrap(), plan, tz, None, credit[i], now).unwrap()
            })
            .collect();
        let mut books: Vec<Books> = credit
            .iter()
            .map(|c| Books {
                paid_floor: -c.picos(),
                ..Books::default()
            })
            .collect();
        for (a, b) in accounts.iter().zip(books.iter_mut()) {
            b.periods(a, &catalog);
        }
        let mut last: Option<Op> = None;
        // Operators' changes go through `apply_audited` under an
        // adjustment id, as the admin API sends them: a replay reuses it.
        let mut adjustments = 0u64;
        for op in ops {
            if let Op::Advance { secs } = op {
                now += SignedDuration::from_secs(secs);
            }
            let op = match op {
                Op::Replay => match &last { Some(prev) => prev.clone(), None => continue },
                other => other,
            };
            let replaying = matches!(&last, Some(prev) if format!("{prev:?}") == format!("{op:?}"));
            if !replaying {
                adjustments += 1;
            }
            for (a, b) in accounts.iter_mut().zip(books.iter_mut()) {
                a.advance(&catalog, now).unwrap();
                for r in a.take_records() {
                    record(b, &r);
                }
                b.periods(a, &catalog);
            }
            let Some((i, cmd)) = command(&op, now, &books) else {
                last = Some(op);
                continue;
            };
            let before = state(&accounts[i]);
            let reply = apply(&mut accounts[i], &catalog, cmd.clone(), now, adjustments);
            let records = accounts[i].take_records();
            match &reply {
                Err(_) => prop_assert_eq!(&before, &state(&accounts[i]), "a refused {:?} changed state", op),
                Ok(_) if replaying => {
                    prop_assert_eq!(&before, &state(&accounts[i]), "a replayed {:?} changed state", op);
                    prop_assert!(records.is_empty(), "a replay emitted records");
                }
                Ok(_) => match &cmd {
                    Command::TopUp { amount, .. } | Command::Adjust { amount, .. } => books[i].money_credited += amount.picos(),
                    Command::GrantPack(g) => books[i].pack_tokens_credited += i128::from(g.tokens),
                    // What a refund gives back is no longer charged.
                    Command::Refund { charges, .. } => {
                        for t in charges {
                            if t.source.is_tokens() {
                                books[i].tokens_recorded -= t.amount;
                            } else {
                                books[i].money_recorded -= t.amount;
                            }
                        }
                    }
                    Command::Update { credit_limit: Some(limit), .. } => {
                        books[i].paid_floor = (-limit.picos()).min(accounts[i].paid.available());
                    }
                    _ => {}
                },
            }
            for r in &records {
                record(&mut books[i], r);
            }
            books[i].periods(&accounts[i], &catalog);
            // Replaying once more must answer the same and change nothing.
            if reply.is_ok() {
                let snapshot = state(&accounts[i]);
                let again = apply(&mut accounts[i], &catalog, cmd.clone(), now, adjustments);
                if !audited(&cmd) {
                    prop_assert_eq!(format!("{reply:?}"), format!("{again:?}"));
                }
                prop_assert_eq!(&snapshot, &state(&accounts[i]));
                prop_assert!(accounts[i].take_records().is_empty());
            }
            for (a, b) in accounts.iter().zip(&books) {
                check(a, b, &catalog);
            }
            last = Some(op);
        }
    }
}
