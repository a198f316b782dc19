//! The control plane over real gRPC: every Admin RPC.

#![allow(clippy::unwrap_used)]

mod support;

use jiff::SignedDuration;
use support::{Backend, money, price_version, prices, reserve, settle, spawn_app_on};
use tollgate::api::convert::timestamp_out;
use tollgate::proto;
use tollgate::proto::{Decision, DenyReason, SourceKind};
use tonic::Code;

async fn accounts_money_packs_plans_limits_and_status(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    let created = app
        .admin
        .create_account(proto::CreateAccountRequest {
            account_id: "acme".into(),
            plan: "payg".into(),
            time_zone: "America/New_York".into(),
            credit_limit: Some(money("1.5")),
            adjustment_id: "signup-1".into(),
            reason: "signed up".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (created.plan.as_str(), created.time_zone.as_str()),
        ("payg", "America/New_York")
    );
    // A retry of the creation answers as the first did; another creation
    // of the same id is refused, whatever its adjustment id.
    let create = |adjustment: &str, tz: &str| proto::CreateAccountRequest {
        account_id: "acme".into(),
        plan: "payg".into(),
        time_zone: tz.into(),
        credit_limit: Some(money("1.5")),
        adjustment_id: adjustment.into(),
        reason: "signed up".into(),
        ..Default::default()
    };
    let retried = app
        .admin
        .create_account(create("signup-1", "America/New_York"))
        .await
        .unwrap();
    assert_eq!(retried.into_inner().account_id, "acme");
    for (adjustment, tz) in [("signup-1", "UTC"), ("signup-2", "America/New_York")] {
        let again = app.admin.create_account(create(adjustment, tz)).await.unwrap_err();
        assert_eq!(again.code(), Code::AlreadyExists, "{adjustment} {tz}");
    }
    let opened = &app.audits(1).await[0];
    assert_eq!(
        (opened["operation"].as_str(), opened["adjustment_id"].as_str()),
        (Some("create_account"), Some("signup-1"))
    );
    assert_eq!(opened["after"]["plan"], "payg");
    assert_eq!(opened["after"]["credit_limit"], "1.500000000000");

    let top_up = |op: &str, pool: proto::MoneyPool, amount: &str| proto::TopUpRequest {
        account_id: "acme".into(),
        adjustment_id: op.into(),
        pool: pool as i32,
        amount: Some(money(amount)),
        reason: "invoice 42".into(),
        ..Default::default()
    };
    app.admin
        .top_up(top_up("t1", proto::MoneyPool::Paid, "10"))
        .await
        .unwrap();
    // Every applied change leaves an audit record in the usage sink.
    let audit = &app.audits(2).await[1];
    assert_eq!(
        (
            audit["operator"].as_str(),
            audit["operation"].as_str(),
            audit["adjustment_id"].as_str(),
            audit["reason"].as_str()
        ),
        (Some("alice@billing"), Some("top_up"), Some("t1"), Some("invoice 42"))
    );
    // A retry credits once.
    app.admin
        .top_up(top_up("t1", proto::MoneyPool::Paid, "10"))
        .await
        .unwrap();
    assert_eq!(
        app.admin
            .top_up(top_up("t1", proto::MoneyPool::Paid, "11"))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    let d = app
        .admin
        .top_up(top_up("promo-1", proto::MoneyPool::Promo, "2"))
        .await
        .unwrap()
        .into_inner();
    let b = d.balance.unwrap();
    assert_eq!(
        (b.paid.unwrap().decimal, b.promo.unwrap().decimal),
        ("10.000000000000".into(), "2.000000000000".into())
    );
    assert_eq!(b.spendable.unwrap().decimal, "13.500000000000");

    let d = app
        .admin
        .adjust_money(proto::AdjustMoneyRequest {
            account_id: "acme".into(),
            adjustment_id: "refund-1".into(),
            amount: Some(money("-0.5")),
            reason: "goodwill reversal".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.balance.unwrap().paid.unwrap().decimal, "9.500000000000");
    let too_much = app
        .admin
        .adjust_money(proto::AdjustMoneyRequest {
            account_id: "acme".into(),
            adjustment_id: "refund-2".into(),
            amount: Some(money("-11.000000000001")),
            reason: "too much".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(too_much.code(), Code::FailedPrecondition);

    let expires = app.now().checked_add(SignedDuration::from_hours(24)).unwrap();
    let d = app
        .admin
        .grant_pack(proto::GrantPackRequest {
            account_id: "acme".into(),
            adjustment_id: "grantpack-7".into(),
            pack_id: "pack-1".into(),
            tokens: 1000,
            expires_at: Some(timestamp_out(expires)),
            models: vec!["m".into()],
            reason: "bought".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.balance.unwrap().pack_tokens, 1000);
    let r = app
        .quota
        .reserve(reserve("acme", "r1", 100, 100))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.held[0].source, r.held[0].tokens), (SourceKind::Pack as i32, 200));
    let d = app
        .admin
        .revoke_pack(proto::RevokePackRequest {
            account_id: "acme".into(),
            adjustment_id: "revokepack-8".into(),
            pack_id: "pack-1".into(),
            reason: "refunded".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let pack = d.lots.iter().find(|l| l.lot_id == "pack-1").unwrap();
    assert_eq!(
        (pack.available.as_str(), pack.held.as_str(), pack.forfeited.as_str()),
        ("0", "200", "800")
    );
    assert_eq!(d.holds.len(), 1);
    // The hold made before the revocation is still charged from the pack.
    let s = app
        .quota
        .settle(settle("acme", "r1", 100, 50))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.record.unwrap().charges[0].tokens, 150);

    let d = app
        .admin
        .assign_plan(proto::AssignPlanRequest {
            account_id: "acme".into(),
            adjustment_id: "assignplan-9".into(),
            reason: "test".into(),
            plan: "pro".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.plan, "pro");
    assert_eq!(d.balance.unwrap().allowance_tokens, 1000);
    assert!(d.period_end.is_some());

    let overrides = proto::LimitOverrides {
        account: Some(proto::LimitSet {
            requests_per_minute: 1,
            ..Default::default()
        }),
        models: [(
            "m".to_owned(),
            proto::LimitSet {
                concurrent_requests: 3,
                ..Default::default()
            },
        )]
        .into(),
        ..Default::default()
    };
    let request = proto::SetLimitOverridesRequest {
        account_id: "acme".into(),
        adjustment_id: "setlimitoverrides-10".into(),
        reason: "test".into(),
        overrides: Some(overrides.clone()),
    };
    let d = app.admin.set_limit_overrides(request).await.unwrap().into_inner();
    assert_eq!(d.overrides, Some(overrides));
    assert_eq!(
        app.quota
            .reserve(reserve("acme", "r2", 1, 1))
            .await
            .unwrap()
            .into_inner()
            .decision,
        Decision::Allow as i32
    );
    let r = app
        .quota
        .reserve(reserve("acme", "r3", 1, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deny_reason, DenyReason::RateLimited as i32);

    app.admin
        .suspend(proto::SuspendRequest {
            account_id: "acme".into(),
            adjustment_id: "suspend-11".into(),
            reason: "fraud check".into(),
        })
        .await
        .unwrap();
    app.advance(SignedDuration::from_secs(120));
    let r = app
        .quota
        .reserve(reserve("acme", "r4", 1, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deny_reason, DenyReason::AccountSuspended as i32);
    let d = app
        .admin
        .resume(proto::ResumeRequest {
            account_id: "acme".into(),
            adjustment_id: "resume-12".into(),
            reason: "cleared".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!d.suspended);
    assert_eq!(
        app.quota
            .reserve(reserve("acme", "r4", 1, 1))
            .await
            .unwrap()
            .into_inner()
            .decision,
        Decision::Allow as i32
    );

    let d = app
        .admin
        .update_account(proto::UpdateAccountRequest {
            account_id: "acme".into(),
            adjustment_id: "updateaccount-13".into(),
            reason: "test".into(),
            time_zone: Some("Asia/Tokyo".into()),
            credit_limit: Some(money("0")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (d.time_zone.as_str(), d.credit_limit.unwrap().decimal.as_str()),
        ("Asia/Tokyo", "0.000000000000")
    );
    app.shutdown().await;
}

async fn published_prices_apply_from_their_effective_time_and_never_retroactively(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    let at = app.now().checked_add(SignedDuration::from_secs(10)).unwrap();
    let version = price_version("v2", at, "2", "8");
    let publish = |version: &proto::PriceVersion| proto::PublishPriceVersionRequest {
        version: Some(version.clone()),
        adjustment_id: "list-2026-03".into(),
        reason: "March price list".into(),
    };
    let published = app
        .admin
        .publish_price_version(publish(&version))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.versions, vec!["v1", "v2"]);
    // Audited like every operator change: who, from where, under which
    // id, why, and the version in full; on no account.
    let audit = &app.audits(1).await[0];
    assert_eq!(
        (
            audit["operation"].as_str(),
            audit["operator"].as_str(),
            audit["adjustment_id"].as_str(),
            audit["reason"].as_str()
        ),
        (
            Some("publish_price_version"),
            Some("alice@billing"),
            Some("list-2026-03"),
            Some("March price list")
        ),
        "{audit}"
    );
    assert!(
        audit["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{audit}"
    );
    assert!(audit["change"].as_str().is_some_and(|c| c.contains("v2")), "{audit}");
    assert!(audit.get("account_id").is_none(), "{audit}");
    // Listed back as published (a weight of 0 reads as one for one); v1
    // stays in force until v2's time.
    let listed = app
        .admin
        .list_price_versions(proto::ListPriceVersionsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut expected = version.clone();
    expected.models[0].token_weight_milli = 1000;
    assert_eq!(listed.versions.last(), Some(&expected));
    assert_eq!(listed.in_force, "v1");
    // The same version again (a retry): answered as the first time.
    let again = app
        .admin
        .publish_price_version(publish(&version))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.versions, vec!["v1", "v2"]);
    let mut changed = version.clone();
    changed.models[0].tiers[0].prices = Some(prices("3", "8"));
    let dup = app.admin.publish_price_version(publish(&changed)).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    // Neither published anything: still the one audit record.
    app.admin
        .top_up(proto::TopUpRequest {
            account_id: "poor".into(),
            adjustment_id: "marker".into(),
            pool: proto::MoneyPool::Paid as i32,
            amount: Some(money("1")),
            reason: "r".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let audits = app.audits(2).await;
    assert_eq!(audits.len(), 2, "{audits:#?}");
    assert_eq!(audits[1]["adjustment_id"], "marker");
    let past = proto::PriceVersion {
        id: "v0".into(),
        effective_at: Some(timestamp_out(
            app.now().checked_sub(SignedDuration::from_secs(1)).unwrap(),
        )),
        ..version
    };
    let err = app.admin.publish_price_version(publish(&past)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("retroactive"), "{}", err.message());

    // Reserved under v1, settled after v2 took effect: charged at v1.
    app.quota.reserve(reserve("rich", "before", 1000, 10)).await.unwrap();
    app.advance(SignedDuration::from_secs(10));
    let s = app
        .quota
        .settle(settle("rich", "before", 1000, 10))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(
        (s.price_version.as_str(), s.total_money.unwrap().decimal.as_str()),
        ("v1", "0.001040000000")
    );
    let r = app
        .quota
        .reserve(reserve("rich", "after", 1000, 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.price_version, "v2");
    let s = app
        .quota
        .settle(settle("rich", "after", 1000, 10))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(s.total_money.unwrap().decimal, "0.002080000000");
    app.shutdown().await;
}

async fn get_account_shows_sources_lots_holds_and_recent_usage(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    app.quota.reserve(reserve("rich", "done", 10, 10)).await.unwrap();
    app.quota.settle(settle("rich", "done", 10, 5)).await.unwrap();
    app.quota.reserve(reserve("rich", "open", 10, 10)).await.unwrap();
    let d = support::detail(&mut app.admin, "rich").await;
    assert_eq!(d.holds.len(), 1);
    assert_eq!(d.holds[0].reservation_id, "open");
    assert_eq!(d.recent_usage.len(), 1);
    assert_eq!(d.recent_usage[0].request_id, "done");
    let paid = d.lots.iter().find(|l| l.source == SourceKind::Paid as i32).unwrap();
    assert_eq!(paid.granted, "100.000000000000");
    assert_eq!(paid.charged, "0.000030000000");
    assert_eq!(paid.held, "0.000050000000");
    assert_eq!(paid.available, "99.999920000000");
    let missing = app
        .admin
        .get_account(proto::GetAccountRequest {
            account_id: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    app.shutdown().await;
}

/// Every Admin RPC once on `account`, as `client` presents itself: the
/// code each answered.
async fn every_call(
    client: &mut tollgate::transport::channel::AdminClient,
    account: &str,
) -> Vec<(&'static str, Code)> {
    let id = || account.to_owned();
    let later = Some(timestamp_out("2031-01-01T00:00:00Z".parse().unwrap()));
    let mut codes = Vec::new();
    macro_rules! call {
        ($name:literal, $call:expr) => {
            codes.push(($name, $call.await.map(|_| Code::Ok).unwrap_or_else(|s| s.code())))
        };
    }
    call!(
        "CreateAccount",
        client.create_account(proto::CreateAccountRequest {
            account_id: format!("{account}-2"),
            plan: "payg".into(),
            adjustment_id: "auth-c".into(),
            reason: "r".into(),
            ..Default::default()
        })
    );
    call!(
        "UpdateAccount",
        client.update_account(proto::UpdateAccountRequest {
            account_id: id(),
            adjustment_id: "updateaccount-14".into(),
            reason: "test".into(),
            credit_limit: Some(money("1")),
            ..Default::default()
        })
    );
    call!(
        "TopUp",
        client.top_up(proto::TopUpRequest {
            account_id: id(),
            adjustment_id: "auth-t".into(),
            pool: proto::MoneyPool::Paid as i32,
            amount: Some(money("1")),
            reason: "r".into(),
            ..Default::default()
        })
    );
    call!(
        "AdjustMoney",
        client.adjust_money(proto::AdjustMoneyRequest {
            account_id: id(),
            adjustment_id: "auth-a".into(),
            amount: Some(money("1")),
            reason: "r".into(),
        })
    );
    call!(
        "GrantPack",
        client.grant_pack(proto::GrantPackRequest {
            account_id: id(),
            adjustment_id: "grantpack-15".into(),
            reason: "test".into(),
            pack_id: "auth-p".into(),
            tokens: 10,
            expires_at: later,
            ..Default::default()
        })
    );
    call!(
        "RevokePack",
        client.revoke_pack(proto::RevokePackRequest {
            account_id: id(),
            adjustment_id: "revokepack-16".into(),
            pack_id: "auth-p".into(),
            reason: "r".into(),
        })
    );
    call!(
        "AssignPlan",
        client.assign_plan(proto::AssignPlanRequest {
            account_id: id(),
            adjustment_id: "assignplan-17".into(),
            reason: "test".into(),
            plan: "pro".into(),
            ..Default::default()
        })
    );
    call!(
        "SetLimitOverrides",
        client.set_limit_overrides(proto::SetLimitOverridesRequest {
            account_id: id(),
            adjustment_id: "setlimitoverrides-18".into(),
            reason: "test".into(),
            overrides: Some(Default::default()),
        })
    );
    call!(
        "Suspend",
        client.suspend(proto::SuspendRequest {
            account_id: id(),
            adjustment_id: "suspend-19".into(),
            reason: "r".into(),
        })
    );
    call!(
        "Resume",
        client.resume(proto::ResumeRequest {
            account_id: id(),
            adjustment_id: "resume-20".into(),
            reason: "r".into(),
        })
    );
    call!(
        "PublishPriceVersion",
        client.publish_price_version(proto::PublishPriceVersionRequest {
            version: None,
            adjustment_id: "a".into(),
            reason: "r".into(),
        })
    );
    call!(
        "GetAccount",
        client.get_account(proto::GetAccountRequest { account_id: id() })
    );
    call!(
        "Refund",
        client.refund(proto::RefundRequest {
            account_id: id(),
            request_id: "nothing-charged".into(),
            kind: "settle".into(),
            charges: vec![proto::SourceAmount {
                source: SourceKind::Paid as i32,
                money: Some(money("1")),
                ..Default::default()
            }],
            reason: "r".into(),
            adjustment_id: "auth-r".into(),
            settled_at: None,
        })
    );
    call!(
        "ListAccounts",
        client.list_accounts(proto::ListAccountsRequest::default())
    );
    call!(
        "ListPriceVersions",
        client.list_price_versions(proto::ListPriceVersionsRequest {})
    );
    codes
}

#[tokio::test]
async fn operators_need_a_valid_token_and_the_role_for_the_call() {
    let mut app = support::spawn_app().await;
    let before = support::detail(&mut app.admin, "rich").await;
    for account in ["rich", "ghost"] {
        // No token, or one nobody issued: nothing is looked at, so an
        // unknown account is refused exactly as a known one.
        for token in [None, Some("tg_not_issued"), Some("")] {
            let mut client = support::admin_client(&app.admin_url, token).await;
            for (call, code) in every_call(&mut client, account).await {
                assert_eq!(code, Code::Unauthenticated, "{call} on {account} with {token:?}");
            }
        }
        // The read role reads and changes nothing.
        let mut reader = support::admin_client(&app.admin_url, Some(support::READ_TOKEN)).await;
        for (call, code) in every_call(&mut reader, account).await {
            let expected = match (call, account) {
                ("GetAccount", "rich") | ("ListPriceVersions" | "ListAccounts", _) => Code::Ok,
                ("GetAccount", _) => Code::NotFound,
                _ => Code::PermissionDenied,
            };
            assert_eq!(code, expected, "{call} on {account} with the read token");
        }
    }
    let after = support::detail(&mut app.admin, "rich").await;
    assert_eq!(before, after, "a refused call changed the account");
    // The write role may do everything; its first change is the first
    // audit record (the sink keeps order), so no refused call left one.
    let mut writer = support::admin_client(&app.admin_url, Some(support::WRITE_TOKEN)).await;
    writer
        .top_up(support::paid_top_up("rich", "marker", "1", "r"))
        .await
        .unwrap();
    let audits = app.audits(1).await;
    assert_eq!(audits.len(), 1, "a refused call was audited: {audits:?}");
    assert_eq!(audits[0]["adjustment_id"], "marker");
    assert_eq!(audits[0]["operator"], "alice@billing");
    let codes = every_call(&mut writer, "rich").await;
    assert!(
        codes
            .iter()
            .all(|(_, c)| !matches!(c, Code::Unauthenticated | Code::PermissionDenied)),
        "{codes:?}"
    );
    assert!(codes.iter().filter(|(_, c)| *c == Code::Ok).count() >= 9, "{codes:?}");
}

#[tokio::test]
async fn the_data_plane_listener_does_not_serve_the_admin_api() {
    let app = support::spawn_app().await;
    let mut on_data_port = support::admin_client(&app.quota_url, Some(support::WRITE_TOKEN)).await;
    let refused = on_data_port
        .get_account(proto::GetAccountRequest {
            account_id: "rich".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented);
    let refused = on_data_port
        .top_up(support::paid_top_up("rich", "via-data-port", "1", "r"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented);
}

async fn adjustments_apply_once_and_are_audited_with_before_and_after(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    let suspend = |adjustment: &str| proto::SuspendRequest {
        account_id: "rich".into(),
        reason: "chargeback".into(),
        adjustment_id: adjustment.into(),
    };
    app.admin.suspend(suspend("case-7")).await.unwrap();
    // The same change again: the first result, nothing applied or audited.
    let again = app.admin.suspend(suspend("case-7")).await.unwrap().into_inner();
    assert!(again.suspended);
    // Another change under the same id is refused and changes nothing.
    let reused = app
        .admin
        .resume(proto::ResumeRequest {
            account_id: "rich".into(),
            reason: "resolved".into(),
            adjustment_id: "case-7".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
    let detail = support::detail(&mut app.admin, "rich").await;
    assert!(detail.suspended);
    // No id, or no reason: refused before anything is applied.
    for (adjustment, reason, field) in [("", "r", "adjustment_id"), ("x-1", " ", "reason")] {
        let refused = app
            .admin
            .resume(proto::ResumeRequest {
                account_id: "rich".into(),
                reason: reason.into(),
                adjustment_id: adjustment.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(refused.message().contains(field), "{refused:?}");
    }
    app.admin
        .top_up(support::paid_top_up("rich", "inv-9", "2.5", "invoice 9"))
        .await
        .unwrap();
    // One record per applied change, each saying who, which, why, and
    // what changed from what to what.
    let audits = app.audits(2).await;
    assert_eq!(audits.len(), 2, "{audits:#?}");
    let (suspended, topped) = (&audits[0], &audits[1]);
    for (audit, adjustment, reason) in [(suspended, "case-7", "chargeback"), (topped, "inv-9", "invoice 9")] {
        assert_eq!(audit["operator"], "alice@billing");
        assert_eq!(audit["adjustment_id"], adjustment);
        assert_eq!(audit["reason"], reason);
        assert_eq!(audit["account_id"], "rich");
    }
    assert_eq!(suspended["before"], serde_json::json!({"suspended": false}));
    assert_eq!(suspended["after"], serde_json::json!({"suspended": true}));
    assert_eq!(topped["before"]["paid"], "100.000000000000");
    assert_eq!(topped["after"]["paid"], "102.500000000000");
    assert_eq!(topped["before"].as_object().map(|o| o.len()), Some(1), "{topped}");
}

async fn refunds_unwind_the_lots_a_charge_drew_from(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    let expires = app.now().checked_add(SignedDuration::from_hours(24 * 30)).unwrap();
    app.admin
        .grant_pack(proto::GrantPackRequest {
            account_id: "rich".into(),
            pack_id: "p1".into(),
            tokens: 100,
            expires_at: Some(timestamp_out(expires)),
            reason: "order 1".into(),
            adjustment_id: "order-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let get = |mut admin: tollgate::transport::channel::AdminClient| async move {
        admin
            .get_account(proto::GetAccountRequest {
                account_id: "rich".into(),
            })
            .await
            .unwrap()
            .into_inner()
    };
    let paid = |d: &proto::AccountDetail| d.balance.as_ref().and_then(|b| b.paid.clone()).unwrap().decimal;
    let pack = |d: &proto::AccountDetail| {
        let lot = d.lots.iter().find(|l| l.lot_id == "p1").unwrap();
        (lot.available.clone(), lot.charged.clone())
    };
    let before = get(app.admin.clone()).await;
    // 150 tokens: the pack's 100, the rest from paid money.
    app.quota.reserve(reserve("rich", "r1", 60, 100)).await.unwrap();
    let record = app
        .quota
        .settle(settle("rich", "r1", 60, 90))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    let kinds: Vec<i32> = record.charges.iter().map(|c| c.source).collect();
    assert_eq!(
        kinds,
        vec![SourceKind::Pack as i32, SourceKind::Paid as i32],
        "{record:?}"
    );
    let charged = get(app.admin.clone()).await;
    assert_ne!(paid(&charged), paid(&before));
    let refund = |adjustment: &str, charges: Vec<proto::SourceAmount>| proto::RefundRequest {
        account_id: "rich".into(),
        request_id: "r1".into(),
        kind: "settle".into(),
        charges,
        reason: "customer complaint".into(),
        adjustment_id: adjustment.into(),
        settled_at: record.settled_at,
    };
    // A record never made: refused, nothing changed.
    let made_up = proto::RefundRequest {
        request_id: "never-made".into(),
        ..refund("ref-made-up", record.charges.clone())
    };
    let refused = app.admin.refund(made_up).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    assert!(
        refused.message().contains("within the idempotency window"),
        "{refused:?}"
    );
    assert_eq!(get(app.admin.clone()).await, charged);
    // Too much from one source: refused, nothing changed.
    let mut greedy = record.charges.clone();
    greedy[0].tokens += 1;
    let refused = app.admin.refund(refund("ref-0", greedy)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(get(app.admin.clone()).await, charged);
    // The whole record: each lot gets back what it gave.
    let refunded = app
        .admin
        .refund(refund("ref-1", record.charges.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paid(&refunded), paid(&before));
    assert_eq!(pack(&refunded), ("100".to_owned(), "0".to_owned()));
    // A retry applies nothing; the same record again under another id is refused.
    let again = app
        .admin
        .refund(refund("ref-1", record.charges.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paid(&again), paid(&before));
    let twice = app
        .admin
        .refund(refund("ref-2", record.charges.clone()))
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::AlreadyExists, "{twice:?}");
    // The audit record says what moved back.
    let audits = app.audits(2).await;
    let audit = audits
        .iter()
        .find(|a| a["operation"] == "refund")
        .expect("a refund audit");
    assert_eq!(audit["adjustment_id"], "ref-1");
    assert_eq!(audit["after"]["paid"].as_str(), Some(paid(&before).as_str()));
    assert_eq!(audit["after"]["packs"]["p1"]["available"], 100);
    assert_eq!(audits.iter().filter(|a| a["operation"] == "refund").count(), 1);
}

async fn accounts_list_in_pages(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    for id in ["zeta", "alpha"] {
        app.admin
            .create_account(proto::CreateAccountRequest {
                account_id: id.into(),
                plan: "payg".into(),
                adjustment_id: format!("open-{id}"),
                reason: "signed up".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let (mut seen, mut after) = (Vec::new(), String::new());
    loop {
        let page = app
            .admin
            .list_accounts(proto::ListAccountsRequest { after, limit: 3 })
            .await
            .unwrap()
            .into_inner();
        assert!(page.account_ids.len() <= 3);
        seen.extend(page.account_ids);
        if page.next_after.is_empty() {
            break;
        }
        after = page.next_after;
    }
    assert_eq!(seen, ["alpha", "frozen", "limited", "poor", "pro", "rich", "zeta"]);
    let too_many = proto::ListAccountsRequest {
        after: String::new(),
        limit: 1001,
    };
    assert_eq!(
        app.admin.list_accounts(too_many).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

/// On Redis, an account joins its shard's index (what ListAccounts reads)
/// when it is written first, and an account written before the index
/// existed joins it at its next change; no other commit touches the index
/// (every commit re-added the account, one ZADD each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_join_the_index_once() {
    let mut app = spawn_app_on(Backend::Redis).await;
    let redis = app.redis.clone().unwrap();
    let listed = async |app: &mut support::TestApp| {
        let page = app
            .admin
            .list_accounts(proto::ListAccountsRequest::default())
            .await
            .unwrap();
        page.into_inner().account_ids
    };
    // `rich` as a version before the index wrote it: not indexed.
    redis.cli(&["ZREM", "tollgate:{0}:accounts", "rich"]);
    redis.cli(&["HDEL", "tollgate:{0}:account:rich", "i"]);
    assert!(!listed(&mut app).await.contains(&"rich".to_owned()));
    let zadds = |stats: &[(String, u64)]| stats.iter().filter(|(c, _)| c == "zadd").map(|(_, n)| n).sum::<u64>();
    let before = zadds(&redis.commandstats());
    for i in 0..5 {
        app.admin
            .top_up(proto::TopUpRequest {
                account_id: "rich".into(),
                adjustment_id: format!("top-up-{i}"),
                pool: proto::MoneyPool::Paid as i32,
                amount: Some(money("1")),
                reason: "invoice".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert_eq!(zadds(&redis.commandstats()) - before, 1, "ZADDs for five commits");
    assert!(
        listed(&mut app).await.contains(&"rich".to_owned()),
        "joined at its next change"
    );
    app.shutdown().await;
}

on_both_stores!(
    accounts_list_in_pages,
    refunds_unwind_the_lots_a_charge_drew_from,
    adjustments_apply_once_and_are_audited_with_before_and_after,
    accounts_money_packs_plans_limits_and_status,
    published_prices_apply_from_their_effective_time_and_never_retroactively,
    get_account_shows_sources_lots_holds_and_recent_usage,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_reloads_under_load_and_a_new_price_takes_effect_on_time() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let config = support::CONFIG.replace("[server]\n", "[server]\nreload_poll_ms = 20\n");
    let (mut app, path, reloads) = support::spawn_app_watching(&config).await;
    // Load: four clients reserve and settle until told to stop; every
    // failure is kept.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (mut quota, stop) = (app.quota.clone(), Arc::clone(&stop));
        clients.push(tokio::spawn(async move {
            let (mut settled, mut failed, mut versions) = (0u64, Vec::new(), std::collections::BTreeSet::new());
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let id = format!("load-{c}-{i}");
                match quota.reserve(reserve("rich", &id, 10, 10)).await {
                    Ok(r) if r.get_ref().decision == Decision::Allow as i32 => {}
                    other => {
                        failed.push(format!("{other:?}"));
                        continue;
                    }
                }
                match quota.settle(settle("rich", &id, 10, 5)).await {
                    Ok(s) => {
                        settled += 1;
                        versions.insert(s.into_inner().record.map(|r| r.price_version).unwrap_or_default());
                    }
                    Err(e) => failed.push(format!("{e:?}")),
                }
            }
            (settled, failed, versions)
        }));
    }
    let list = |mut admin: tollgate::transport::channel::AdminClient| async move {
        admin
            .list_price_versions(proto::ListPriceVersionsRequest {})
            .await
            .unwrap()
            .into_inner()
    };
    // A version ahead of its time, and a plan's limit raised.
    let at = app.now().checked_add(SignedDuration::from_secs(10)).unwrap();
    let v2 = format!(
        "[[prices]]\nid = \"v2\"\neffective_at = \"{at}\"\n[prices.models.m.tiers.default]\ninput = \"2\"\noutput = \"8\"\n\n[[accounts]]\nid = \"rich\""
    );
    let next = config
        .replacen("[[accounts]]\nid = \"rich\"", &v2, 1)
        .replace("requests_per_minute = 2", "requests_per_minute = 3");
    std::fs::write(&path, &next).unwrap();
    support::reached(&reloads.applied, 1).await;
    let listed = list(app.admin.clone()).await;
    let ids: Vec<&str> = listed.versions.iter().map(|v| v.id.as_str()).collect();
    assert_eq!((ids, listed.in_force.as_str()), (vec!["v1", "v2"], "v1"));
    for i in 0..3 {
        let id = format!("limited-{i}");
        let r = app
            .quota
            .reserve(reserve("limited", &id, 1, 1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.decision,
            Decision::Allow as i32,
            "request {i} under the raised limit: {r:?}"
        );
        app.quota
            .release(proto::ReleaseRequest {
                account_id: "limited".into(),
                reservation_id: id,
            })
            .await
            .unwrap();
    }
    // A file with problems is refused whole; so is one that edits a
    // published version. The catalog in force stays.
    let broken = next
        .replace("period = \"month\"", "period = \"fortnight\"")
        .replacen("[plans.payg]\n", "", 1);
    std::fs::write(&path, broken).unwrap();
    support::reached(&reloads.refused, 1).await;
    std::fs::write(&path, next.replace("input = \"2\"", "input = \"3\"")).unwrap();
    support::reached(&reloads.refused, 2).await;
    assert_eq!(list(app.admin.clone()).await.versions, listed.versions);
    // v2's time comes while the load runs: reserves from then on are
    // charged at v2.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    app.advance(SignedDuration::from_secs(10));
    assert_eq!(list(app.admin.clone()).await.in_force, "v2");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut versions = std::collections::BTreeSet::new();
    for client in clients {
        let (settled, failed, seen) = client.await.unwrap();
        assert!(failed.is_empty(), "failed under reload: {failed:?}");
        assert!(settled > 0);
        versions.extend(seen);
    }
    assert_eq!(versions.into_iter().collect::<Vec<_>>(), vec!["v1", "v2"]);
    assert_eq!(reloads.applied.load(Ordering::Relaxed), 1);
}

/// A CA, a server certificate for localhost and client certificates.
struct Pki {
    dir: tempfile::TempDir,
    ca: String,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
        };
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tollgate test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let write = |name: &str, cert: String, key: &KeyPair| {
            std::fs::write(dir.path().join(format!("{name}.pem")), cert).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        };
        // A client certificate says so (extended key usage clientAuth),
        // unless `any_use`.
        let leaf = |name: &str, sans: Vec<SanType>, cn: &str, any_use: bool, issuer: &Issuer<'_, KeyPair>| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = sans;
            params.distinguished_name.push(DnType::CommonName, cn);
            if !any_use {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            write(name, params.signed_by(&key, issuer).unwrap().pem(), &key);
        };
        let dns = |n: &str| SanType::DnsName(n.try_into().unwrap());
        leaf("server", vec![dns("localhost")], "localhost", true, &issuer);
        leaf("alice", vec![], "alice", false, &issuer);
        leaf("auditor", vec![], "auditor-cert", false, &issuer);
        leaf("nobody", vec![], "nobody", false, &issuer);
        // Alice's name on a certificate not issued for clients.
        leaf("alice-any-use", vec![], "alice", true, &issuer);
        // A workload known by its SPIFFE id, whatever its common name.
        let spiffe = SanType::URI("spiffe://example.org/ns/billing/sa/bot".try_into().unwrap());
        leaf("bot", vec![spiffe, dns("bot.billing.svc")], "pod-7f9c", false, &issuer);
        // The same name, from a CA the server does not trust.
        let other_key = KeyPair::generate().unwrap();
        let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        other.distinguished_name.push(DnType::CommonName, "another CA");
        leaf("impostor", vec![], "alice", false, &Issuer::new(other, other_key));
        std::fs::write(dir.path().join("ca.pem"), &ca).unwrap();
        Pki { dir, ca }
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    /// A TLS channel to `port` on localhost, presenting `client`'s
    /// certificate if named.
    async fn channel(&self, port: u16, client: Option<&str>) -> Result<tonic::transport::Channel, String> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .domain_name("localhost");
        if let Some(name) = client {
            let read = |ext: &str| std::fs::read(self.dir.path().join(format!("{name}.{ext}"))).unwrap();
            tls = tls.identity(Identity::from_pem(read("pem"), read("key")));
        }
        tollgate::transport::channel::connect_with(&format!("https://localhost:{port}"), Some(tls))
            .await
            .map_err(|e| format!("{e:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_identify_operators_and_the_data_plane_can_require_them() {
    let pki = Pki::new();
    let tls = |section: &str| {
        format!(
            "[{section}]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            pki.path("server.pem"),
            pki.path("server.key"),
            pki.path("ca.pem")
        )
    };
    let config = format!(
        "{}\n{}\n[[admin.certificates]]\ncommon_name = \"alice\"\nrole = \"write\"\noperator = \"alice@billing\"\n\n\
         [[admin.certificates]]\ncommon_name = \"auditor-cert\"\nrole = \"read\"\n\n\
         [[admin.certificates]]\nuri = \"spiffe://example.org/ns/billing/sa/bot\"\nrole = \"read\"\n",
        support::CONFIG.replacen("[server]\n", &format!("{}\n[server]\n", tls("server.tls")), 1),
        tls("admin.tls"),
    );
    let (settings, _dir, _usage) = support::settings(&config);
    let clock = std::sync::Arc::new(tollgate::clock::ManualClock::new(support::START.parse().unwrap()));
    let app = tollgate::app::server::App::build(settings, clock).await.unwrap();
    let (quota_port, admin_port) = (app.quota_addr().port(), app.admin_addr().port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(app.run(async {
        let _ = stopped.await;
    }));
    let admin = |channel, token: Option<&str>| {
        let bearer = token.map_or_else(tollgate::transport::channel::Bearer::default, |t| {
            tollgate::transport::channel::Bearer::new(t).unwrap()
        });
        tollgate::transport::channel::admin_client(channel, bearer)
    };
    let show = || proto::GetAccountRequest {
        account_id: "rich".into(),
    };
    let suspend = |adjustment: &str| proto::SuspendRequest {
        account_id: "rich".into(),
        reason: "r".into(),
        adjustment_id: adjustment.into(),
    };
    // A mapped certificate is an operator with its role.
    let mut alice = admin(pki.channel(admin_port, Some("alice")).await.unwrap(), None);
    alice.suspend(suspend("cert-1")).await.unwrap();
    let mut auditor = admin(pki.channel(admin_port, Some("auditor")).await.unwrap(), None);
    assert!(auditor.get_account(show()).await.unwrap().into_inner().suspended);
    assert_eq!(
        auditor.suspend(suspend("cert-2")).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // A SPIFFE id (a URI among the alternative names) names an operator
    // too, and is the operator audit records name.
    let mut bot = admin(pki.channel(admin_port, Some("bot")).await.unwrap(), None);
    bot.get_account(show()).await.unwrap();
    assert_eq!(
        bot.suspend(suspend("cert-3")).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // A certificate not issued for clients is nobody, even with a mapped
    // name in it.
    let any_use = pki.channel(admin_port, Some("alice-any-use")).await.unwrap();
    assert_eq!(
        admin(any_use, None).get_account(show()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // A certificate no rule names is nobody, unless a token says who.
    let nobody = pki.channel(admin_port, Some("nobody")).await.unwrap();
    assert_eq!(
        admin(nobody.clone(), None)
            .get_account(show())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    admin(nobody, Some(support::READ_TOKEN))
        .get_account(show())
        .await
        .unwrap();
    // No certificate: a token over TLS works too.
    let plain = pki.channel(admin_port, None).await.unwrap();
    admin(plain, Some(support::READ_TOKEN))
        .get_account(show())
        .await
        .unwrap();
    // A certificate from another CA is refused in the handshake.
    let impostor = match pki.channel(admin_port, Some("impostor")).await {
        Ok(channel) => admin(channel, None)
            .get_account(show())
            .await
            .map(|_| ())
            .map_err(|s| s.code()),
        Err(_) => Err(Code::Unavailable),
    };
    assert!(impostor.is_err(), "a certificate from an unknown CA was accepted");
    // The data plane requires a client certificate.
    let mut quota =
        tollgate::proto::quota_client::QuotaClient::new(pki.channel(quota_port, Some("alice")).await.unwrap());
    quota.reserve(reserve("pro", "tls-1", 1, 1)).await.unwrap();
    let anonymous = match pki.channel(quota_port, None).await {
        Ok(channel) => tollgate::proto::quota_client::QuotaClient::new(channel)
            .reserve(reserve("pro", "tls-2", 1, 1))
            .await
            .map(|_| ())
            .map_err(|s| s.code()),
        Err(_) => Err(Code::Unavailable),
    };
    assert!(
        anonymous.is_err(),
        "the data plane served a client without a certificate"
    );
    let _ = stop.send(());
    served.await.unwrap().unwrap();
}
