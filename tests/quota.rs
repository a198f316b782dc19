//! The data plane over real gRPC: every RPC and every denial reason.

#![allow(clippy::unwrap_used)]

mod support;

use jiff::SignedDuration;
use support::{Backend, money, reserve, settle, spawn_app_on};
use tollgate::proto;
use tollgate::proto::{Decision, DenyReason, LimitKind, LimitScope, SourceKind};

async fn reserve_settle_charges_actuals_and_writes_one_record(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    let r = app
        .quota
        .reserve(reserve("rich", "req-1", 1000, 500))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, Decision::Allow as i32);
    assert_eq!(
        (
            r.granted_output_tokens,
            r.reservation_id.as_str(),
            r.price_version.as_str()
        ),
        (500, "req-1", "v1")
    );
    // Worst case: 1000 * 1,000,000 + 500 * 4,000,000 pico-units = 0.003.
    assert_eq!(r.held[0].money.as_ref().unwrap().decimal, "0.003000000000");
    assert_eq!(r.expires_at.unwrap().seconds, app.now().as_second() + 60);
    let limits = r.rate_limits.unwrap();
    assert_eq!((limits.requests_limit, limits.tokens_limit), (0, 0));
    assert_eq!(app.paid("rich").await, "99.997000000000");

    let s = app
        .quota
        .settle(settle("rich", "req-1", 1000, 120))
        .await
        .unwrap()
        .into_inner();
    let record = s.record.unwrap();
    assert_eq!(record.total_money.unwrap().decimal, "0.001480000000");
    assert_eq!(record.charges.len(), 1);
    assert_eq!(record.charges[0].source, SourceKind::Paid as i32);
    assert_eq!(app.paid("rich").await, "99.998520000000");

    let records = app.records(1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["request_id"], "req-1");
    assert_eq!(records[0]["total_money"], "0.001480000000");
    assert_eq!(records[0]["price_version"], "v1");
    assert_eq!(records[0]["usage"]["output_tokens"], 120);
    // A retried settle answers the same and writes nothing more.
    let again = app
        .quota
        .settle(settle("rich", "req-1", 1000, 120))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.record.unwrap().total_money.unwrap().decimal, "0.001480000000");
    app.shutdown().await;
}

async fn extend_release_charge_and_balance(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    app.quota.reserve(reserve("rich", "stream", 0, 10)).await.unwrap();
    let e = app
        .quota
        .extend(proto::ExtendRequest {
            account_id: "rich".into(),
            reservation_id: "stream".into(),
            max_output_tokens: 100,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((e.decision, e.granted_output_tokens), (Decision::Allow as i32, 100));
    assert_eq!(app.balance("rich").await.held_money.unwrap().decimal, "0.000400000000");

    let released = app
        .quota
        .release(proto::ReleaseRequest {
            account_id: "rich".into(),
            reservation_id: "stream".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.released[0].money.as_ref().unwrap().decimal, "0.000400000000");
    assert_eq!(app.paid("rich").await, "100.000000000000");

    let c = app
        .quota
        .charge(proto::ChargeRequest {
            account_id: "rich".into(),
            request_id: "embed-1".into(),
            model: "m".into(),
            charge: Some(proto::charge_request::Charge::Usage(proto::Usage {
                input_tokens: 500,
                ..Default::default()
            })),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.decision, Decision::Allow as i32);
    assert_eq!(c.record.unwrap().total_money.unwrap().decimal, "0.000500000000");
    let fixed = app
        .quota
        .charge(proto::ChargeRequest {
            account_id: "rich".into(),
            request_id: "fixed-1".into(),
            charge: Some(proto::charge_request::Charge::Amount(money("0.25"))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fixed.record.unwrap().kind, "charge");
    let b = app.balance("rich").await;
    assert_eq!(b.paid.unwrap().decimal, "99.749500000000");
    assert_eq!(b.spendable.unwrap().decimal, "99.749500000000");
    assert_eq!(app.records(2).await.len(), 2);
    app.shutdown().await;
}

async fn denied(app: &mut support::TestApp, req: proto::ReserveRequest) -> proto::ReserveResponse {
    let r = app
        .quota
        .reserve(req)
        .await
        .expect("a denial is a normal response")
        .into_inner();
    assert_eq!(r.decision, Decision::Deny as i32, "{r:?}");
    assert!(r.reservation_id.is_empty() && r.held.is_empty());
    r
}

async fn every_denial_reason(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    let r = denied(&mut app, reserve("poor", "a", 10, 10)).await;
    assert_eq!(r.deny_reason, DenyReason::InsufficientFunds as i32);

    let r = denied(&mut app, reserve("nobody", "a", 10, 10)).await;
    assert_eq!(r.deny_reason, DenyReason::UnknownAccount as i32);

    let r = denied(&mut app, reserve("frozen", "a", 10, 10)).await;
    assert_eq!(r.deny_reason, DenyReason::AccountSuspended as i32);

    let mut unpriced = reserve("rich", "a", 10, 10);
    unpriced.model = "gpt-unknown".into();
    assert_eq!(
        denied(&mut app, unpriced).await.deny_reason,
        DenyReason::ModelNotPriced as i32
    );
    let mut batch = reserve("rich", "b", 10, 10);
    batch.service_tier = "batch".into();
    assert_eq!(
        denied(&mut app, batch).await.deny_reason,
        DenyReason::ModelNotPriced as i32
    );

    let mut other = reserve("pro", "a", 10, 10);
    other.model = "other".into();
    assert_eq!(
        denied(&mut app, other).await.deny_reason,
        DenyReason::ModelNotAllowed as i32
    );

    // Concurrency per model: 1 in flight.
    let ok = app
        .quota
        .reserve(reserve("limited", "c1", 1, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.decision, Decision::Allow as i32);
    let r = denied(&mut app, reserve("limited", "c2", 1, 1)).await;
    let limit = r.limit.unwrap();
    assert_eq!(
        (r.deny_reason, limit.scope, limit.kind, limit.limit),
        (
            DenyReason::RateLimited as i32,
            LimitScope::Model as i32,
            LimitKind::ConcurrentRequests as i32,
            1
        )
    );
    app.quota.settle(settle("limited", "c1", 1, 1)).await.unwrap();
    // 2 requests per minute: c1 and c3 pass, c4 waits 30 s.
    assert_eq!(
        app.quota
            .reserve(reserve("limited", "c3", 1, 1))
            .await
            .unwrap()
            .into_inner()
            .decision,
        Decision::Allow as i32
    );
    app.quota.settle(settle("limited", "c3", 1, 1)).await.unwrap();
    let r = denied(&mut app, reserve("limited", "c4", 1, 1)).await;
    assert_eq!(r.limit.unwrap().kind, LimitKind::RequestsPerMinute as i32);
    assert_eq!(r.retry_after.unwrap().seconds, 30);
    assert_eq!(r.rate_limits.unwrap().requests_remaining, 0);
    app.advance(SignedDuration::from_secs(30));
    assert_eq!(
        app.quota
            .reserve(reserve("limited", "c4", 1, 1))
            .await
            .unwrap()
            .into_inner()
            .decision,
        Decision::Allow as i32
    );

    // Denied requests took nothing.
    assert_eq!(app.paid("poor").await, "0.000000000000");
    assert_eq!(app.paid("frozen").await, "100.000000000000");
    assert_eq!(app.paid("rich").await, "100.000000000000");
    app.shutdown().await;
}

async fn short_funds_shrink_the_grant_and_allowance_is_drawn_first(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    app.admin
        .top_up(proto::TopUpRequest {
            account_id: "poor".into(),
            adjustment_id: "t1".into(),
            pool: proto::MoneyPool::Paid as i32,
            amount: Some(money("0.0001")),
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // 10 input = 0.00001; 0.00009 left buys 22 output tokens (0.000088).
    let r = app
        .quota
        .reserve(reserve("poor", "a", 10, 1000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.decision, r.granted_output_tokens), (Decision::Allow as i32, 22));

    let r = app
        .quota
        .reserve(reserve("pro", "p1", 600, 600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.granted_output_tokens, 400, "1000 allowance tokens, no money");
    assert_eq!(
        (r.held[0].source, r.held[0].tokens, r.held[0].lot_id.as_str()),
        (SourceKind::Allowance as i32, 1000, "period:0")
    );
    app.shutdown().await;
}

async fn lapsed_holds_are_swept_and_settling_them_is_refused(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    app.quota.reserve(reserve("rich", "late", 10, 10)).await.unwrap();
    app.advance(SignedDuration::from_secs(61));
    // The sweeper runs every 20 ms of real time; wait for it to return the hold.
    for _ in 0..200 {
        if app.balance("rich").await.held_money.unwrap().decimal == "0.000000000000" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(app.paid("rich").await, "100.000000000000");
    let err = app.quota.settle(settle("rich", "late", 10, 10)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("expired"), "{}", err.message());
    app.shutdown().await;
}

/// A reserve by key `key`.
fn by_key(key: &str, id: &str, input: u64, max_output: u64) -> proto::ReserveRequest {
    proto::ReserveRequest {
        api_key_id: key.into(),
        ..reserve("rich", id, input, max_output)
    }
}

/// Budgets are set through the admin API (idempotent, audited, checked),
/// cap grants, count actual spend, and deny with a reason that names the
/// budget and its reset; GetBalance shows what each counted.
async fn budgets_cap_keys_and_projects_and_deny_naming_themselves(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    let budget = |period: &str, money_cap: Option<&str>, tokens: u64| proto::Budget {
        period: period.into(),
        money: money_cap.map(money),
        tokens,
    };
    let budgets = proto::Budgets {
        api_keys: [("k1".to_owned(), budget("month", Some("0.001"), 0))].into(),
        projects: [(
            "team".to_owned(),
            proto::Project {
                api_key_ids: vec!["k2".into(), "k3".into()],
                budget: Some(budget("day", None, 500)),
            },
        )]
        .into(),
    };
    let set = |adjustment: &str, budgets: proto::Budgets| proto::SetBudgetsRequest {
        account_id: "rich".into(),
        budgets: Some(budgets),
        adjustment_id: adjustment.into(),
        reason: "finance asked".into(),
    };
    // Refused whole: a key in two projects, an unknown period.
    let mut twice = budgets.clone();
    twice.projects.insert(
        "other".into(),
        proto::Project {
            api_key_ids: vec!["k2".into()],
            budget: None,
        },
    );
    let mut weekly = budgets.clone();
    weekly.api_keys.insert("k9".into(), budget("week", None, 5));
    for bad in [twice, weekly] {
        let e = app.admin.set_budgets(set("bad", bad)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    }
    let detail = app
        .admin
        .set_budgets(set("b1", budgets.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(detail.budgets.as_ref(), Some(&budgets));
    app.admin.set_budgets(set("b1", budgets.clone())).await.unwrap();
    let mut other = budgets.clone();
    other.api_keys.clear();
    let reused = app.admin.set_budgets(set("b1", other)).await.unwrap_err();
    assert_eq!(reused.code(), tonic::Code::AlreadyExists);
    let audit = &app.audits(1).await[0];
    assert_eq!(
        (audit["operation"].as_str(), audit["adjustment_id"].as_str()),
        (Some("set_budgets"), Some("b1"))
    );
    assert_eq!(audit["after"]["budgets"]["keys"]["k1"]["money"], "0.001000000000");

    // k1: 0.001 a month. 100 input and 100 output tokens cost at most
    // 0.0005; settled at 50 output tokens, 0.0003.
    let r1 = app
        .quota
        .reserve(by_key("k1", "r1", 100, 100))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r1.decision, r1.granted_output_tokens), (Decision::Allow as i32, 100));
    app.quota.settle(settle("rich", "r1", 100, 50)).await.unwrap();
    // 0.0007 left: the prompt's 0.0001 and 150 output tokens.
    let r2 = app
        .quota
        .reserve(by_key("k1", "r2", 100, 1000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r2.decision, r2.granted_output_tokens), (Decision::Allow as i32, 150));
    let r3 = app
        .quota
        .reserve(by_key("k1", "r3", 10, 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r3.decision, r3.deny_reason),
        (Decision::Deny as i32, DenyReason::BudgetExceeded as i32),
        "{r3:?}"
    );
    let next_month = {
        let today = app.now().to_zoned(jiff::tz::TimeZone::UTC).date();
        let first = today.first_of_month().checked_add(jiff::ToSpan::month(1)).unwrap();
        first.to_zoned(jiff::tz::TimeZone::UTC).unwrap().timestamp()
    };
    let b = r3.budget.clone().expect("the budget that denied");
    assert_eq!(
        (b.scope, b.id.as_str(), b.period.as_str(), b.tokens_limit),
        (proto::BudgetScope::ApiKey as i32, "k1", "month", 0)
    );
    assert_eq!(b.money_limit.unwrap().decimal, "0.001000000000");
    assert_eq!(b.resets_at.unwrap().seconds, next_month.as_second());
    assert!(r3.message.contains("budget of 0.001"), "{}", r3.message);
    let headers = tollgate::client::budget_headers(r3.budget.as_ref().unwrap());
    assert!(
        headers.contains(&("x-budget-limit-money", "0.001000000000".to_owned())),
        "{headers:?}"
    );
    assert!(
        headers.contains(&("x-budget-reset", next_month.to_string())),
        "{headers:?}"
    );
    // Other keys and requests without a key are not limited by it.
    let free = app
        .quota
        .reserve(reserve("rich", "free", 10, 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(free.decision, Decision::Allow as i32);

    // team: 500 tokens a day over k2 and k3.
    let t1 = app
        .quota
        .reserve(by_key("k2", "t1", 100, 300))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t1.granted_output_tokens, 300);
    let t2 = app
        .quota
        .reserve(by_key("k3", "t2", 50, 100))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t2.granted_output_tokens, 50, "the project's last 100 tokens");
    let t3 = app.quota.reserve(by_key("k2", "t3", 1, 1)).await.unwrap().into_inner();
    let b = t3.budget.expect("denied by the project's budget");
    assert_eq!(
        (b.scope, b.id.as_str(), b.tokens_limit),
        (proto::BudgetScope::Project as i32, "team", 500)
    );

    // What each budget counted: k1 its settle and r2's hold, team its holds.
    let balance = app.balance("rich").await;
    let used: Vec<(String, String, u64)> = balance
        .budgets
        .iter()
        .map(|u| (u.id.clone(), u.money_used.clone().unwrap().decimal, u.tokens_used))
        .collect();
    assert_eq!(
        used,
        [
            ("k1".to_owned(), "0.001000000000".to_owned(), 0),
            ("team".to_owned(), "0.000000000000".to_owned(), 500)
        ]
    );
    // Released, r2's room comes back.
    app.quota
        .release(proto::ReleaseRequest {
            account_id: "rich".into(),
            reservation_id: "r2".into(),
        })
        .await
        .unwrap();
    let r4 = app
        .quota
        .reserve(by_key("k1", "r4", 10, 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r4.decision, Decision::Allow as i32, "{r4:?}");
    app.shutdown().await;
}

/// A steady load for three hours: one request a minute of 100 input and
/// 50 output tokens (0.0003). GetBalance then reads 0.018 an hour over the
/// last hour and 0.00225 an hour over the day (three hours of it), and
/// the runway of the money left at the hour's rate. Stated tolerance: one
/// request's charge in the hour's figure (the hour read mid-minute holds
/// one record more or less), so the runway within 1/60 of the exact one.
async fn runway_follows_a_steady_load(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    let cost: i128 = 300_000_000; // 0.0003
    for i in 0..180 {
        let id = format!("steady-{i}");
        let r = app
            .quota
            .reserve(reserve("rich", &id, 100, 100))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.decision, Decision::Allow as i32, "{r:?}");
        app.quota.settle(settle("rich", &id, 100, 50)).await.unwrap();
        app.advance(SignedDuration::from_secs(60));
    }
    let b = app.balance("rich").await;
    let picos = |m: Option<proto::Money>| m.unwrap().decimal.parse::<tollgate::engine::Money>().unwrap().picos();
    let hour = picos(b.money_burn_last_hour.clone());
    assert!((hour - 60 * cost).abs() <= cost, "last hour: {hour}");
    assert_eq!(
        picos(b.money_burn_last_day.clone()),
        180 * cost / 24,
        "the day: three hours of it"
    );
    let spendable = picos(b.spendable.clone());
    let now = app.now().as_second();
    let exact = now as f64 + spendable as f64 * 3600.0 / (60 * cost) as f64;
    let runs_out = b.money_runs_out_at.unwrap().seconds as f64;
    let off = (runs_out - exact).abs() / (exact - now as f64);
    assert!(off <= 1.0 / 60.0, "runway {runs_out} against {exact}: off by {off}");
    assert!(b.allowance_runs_out_at.is_none(), "no allowance on payg");
    // Quiet for a day: nothing burns, no runway.
    app.advance(SignedDuration::from_hours(25));
    let b = app.balance("rich").await;
    assert_eq!(picos(b.money_burn_last_day), 0);
    assert!(b.money_runs_out_at.is_none());
    app.shutdown().await;
}

/// Alert thresholds set through the admin API: a crossing reaches the
/// usage file once however much more is spent, and again only after a
/// top-up re-armed it and it was crossed anew. (On Redis the crossing is
/// seen when a report reaches the shared account: reading the balance
/// makes the sidecar report.)
async fn alerts_reach_the_sink_once_per_crossing(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    let alerts = proto::AlertSettings {
        balance_below: vec![money("99.999")],
        debt_started: true,
        ..Default::default()
    };
    let set = proto::SetAlertsRequest {
        account_id: "rich".into(),
        alerts: Some(alerts.clone()),
        adjustment_id: "a1".into(),
        reason: "notify finance".into(),
    };
    let detail = app.admin.set_alerts(set).await.unwrap().into_inner();
    assert_eq!(detail.alerts, Some(alerts));
    let bad = proto::SetAlertsRequest {
        account_id: "rich".into(),
        alerts: Some(proto::AlertSettings {
            pack_used_percent: vec![150],
            ..Default::default()
        }),
        adjustment_id: "a2".into(),
        reason: "typo".into(),
    };
    let e = app.admin.set_alerts(bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("pack_used"), "{}", e.message());
    // 0.00148 a request: the first one crosses 99.999, the next do not.
    for i in 0..3 {
        let id = format!("spend-{i}");
        app.quota.reserve(reserve("rich", &id, 1000, 500)).await.unwrap();
        app.quota.settle(settle("rich", &id, 1000, 120)).await.unwrap();
        app.balance("rich").await;
    }
    let first = app.alerts(1).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(
        (
            first[0]["alert"].as_str(),
            first[0]["threshold"].as_str(),
            first[0]["value"].as_str()
        ),
        (Some("balance_below"), Some("99.999000000000"), Some("99.998520000000"))
    );
    // Re-armed by a top-up, crossed again by a charge.
    app.admin
        .top_up(support::paid_top_up("rich", "t9", "1", "refill"))
        .await
        .unwrap();
    app.balance("rich").await;
    let charge = proto::ChargeRequest {
        account_id: "rich".into(),
        request_id: "big".into(),
        charge: Some(proto::charge_request::Charge::Amount(money("1.01"))),
        ..Default::default()
    };
    app.quota.charge(charge).await.unwrap();
    app.balance("rich").await;
    let both = app.alerts(2).await;
    assert_eq!(both.len(), 2, "{both:?}");
    assert_eq!(
        (both[0]["seq"].as_u64(), both[1]["seq"].as_u64()),
        (Some(1), Some(2)),
        "{both:?}"
    );
    let audits = app.audits(2).await;
    assert!(audits.iter().any(|a| a["operation"] == "set_alerts"), "{audits:?}");
    app.shutdown().await;
}

on_both_stores!(
    reserve_settle_charges_actuals_and_writes_one_record,
    alerts_reach_the_sink_once_per_crossing,
    runway_follows_a_steady_load,
    budgets_cap_keys_and_projects_and_deny_naming_themselves,
    extend_release_charge_and_balance,
    every_denial_reason,
    short_funds_shrink_the_grant_and_allowance_is_drawn_first,
    lapsed_holds_are_swept_and_settling_them_is_refused,
);
