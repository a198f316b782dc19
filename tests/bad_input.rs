//! Bad input over real gRPC: each class gets its precise status, names the
//! field, and changes nothing (invariant 5).

#![allow(clippy::unwrap_used)]

mod support;

use jiff::SignedDuration;
use support::{Backend, money, price_version, prices, reserve, settle, spawn_app_on};
use tollgate::proto;
use tonic::Code;

fn expect(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, mentions: &str) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(mentions),
        "{:?} does not mention {mentions:?}",
        status.message()
    );
}

async fn malformed_data_plane_requests_are_refused_and_change_nothing(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    app.quota.reserve(reserve("rich", "open", 10, 10)).await.unwrap();
    let before = app.balance("rich").await;

    let q = &mut app.quota;
    expect(
        q.reserve(reserve("", "r", 1, 1)).await,
        Code::InvalidArgument,
        "account_id",
    );
    expect(
        q.reserve(reserve(&"a".repeat(129), "r", 1, 1)).await,
        Code::InvalidArgument,
        "account_id",
    );
    expect(
        q.reserve(reserve("rich", "has space", 1, 1)).await,
        Code::InvalidArgument,
        "request_id",
    );
    expect(
        q.reserve(reserve("rich", "", 1, 1)).await,
        Code::InvalidArgument,
        "request_id",
    );
    let mut bad_model = reserve("rich", "r", 1, 1);
    bad_model.model = "m\n".into();
    expect(q.reserve(bad_model).await, Code::InvalidArgument, "model");
    let mut bad_tier = reserve("rich", "r", 1, 1);
    bad_tier.service_tier = "x".repeat(200);
    expect(q.reserve(bad_tier).await, Code::InvalidArgument, "service_tier");
    let mut bad_key = reserve("rich", "r", 1, 1);
    bad_key.api_key_id = "key#1".into();
    expect(q.reserve(bad_key).await, Code::InvalidArgument, "api_key_id");
    expect(
        q.reserve(reserve("rich", "r", 1_000_000_001, 1)).await,
        Code::InvalidArgument,
        "input_tokens",
    );
    expect(
        q.reserve(reserve("rich", "r", 1, u64::MAX)).await,
        Code::InvalidArgument,
        "max_output_tokens",
    );
    // Same request id, different content.
    expect(
        q.reserve(reserve("rich", "open", 10, 11)).await,
        Code::AlreadyExists,
        "request_id",
    );

    let no_usage = proto::SettleRequest {
        account_id: "rich".into(),
        reservation_id: "open".into(),
        usage: None,
    };
    expect(q.settle(no_usage).await, Code::InvalidArgument, "usage");
    let mut huge = settle("rich", "open", 1, 1);
    huge.usage.as_mut().unwrap().cache_write_tokens = 2_000_000_000;
    expect(q.settle(huge).await, Code::InvalidArgument, "usage.cache_write_tokens");
    expect(
        q.settle(settle("rich", "nope", 1, 1)).await,
        Code::NotFound,
        "reservation nope",
    );
    expect(
        q.settle(settle("ghost", "open", 1, 1)).await,
        Code::NotFound,
        "account ghost",
    );
    let extend = proto::ExtendRequest {
        account_id: "rich".into(),
        reservation_id: "nope".into(),
        max_output_tokens: 5,
    };
    expect(q.extend(extend).await, Code::NotFound, "reservation");
    let release = proto::ReleaseRequest {
        account_id: "rich".into(),
        reservation_id: "".into(),
    };
    expect(q.release(release).await, Code::InvalidArgument, "reservation_id");

    let charge = |charge| proto::ChargeRequest {
        account_id: "rich".into(),
        request_id: "c".into(),
        model: String::new(),
        charge,
        ..Default::default()
    };
    expect(q.charge(charge(None)).await, Code::InvalidArgument, "charge");
    let usage = proto::charge_request::Charge::Usage(proto::Usage::default());
    expect(q.charge(charge(Some(usage))).await, Code::InvalidArgument, "model");
    let negative = proto::charge_request::Charge::Amount(money("-1"));
    expect(q.charge(charge(Some(negative))).await, Code::InvalidArgument, "amount");
    let mixed = proto::charge_request::Charge::Amount(proto::Money {
        units: 1,
        picos: -5,
        decimal: String::new(),
    });
    expect(q.charge(charge(Some(mixed))).await, Code::InvalidArgument, "same sign");
    let overflow = proto::charge_request::Charge::Amount(proto::Money {
        units: 0,
        picos: 1_000_000_000_000,
        decimal: String::new(),
    });
    expect(q.charge(charge(Some(overflow))).await, Code::InvalidArgument, "picos");

    assert_eq!(app.balance("rich").await, before);
    app.shutdown().await;
}

async fn settling_in_the_wrong_state_is_a_failed_precondition(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    app.quota.reserve(reserve("rich", "a", 10, 10)).await.unwrap();
    app.quota.settle(settle("rich", "a", 10, 10)).await.unwrap();
    let paid = app.paid("rich").await;
    expect(
        app.quota.settle(settle("rich", "a", 10, 9)).await,
        Code::FailedPrecondition,
        "different usage",
    );
    let release = proto::ReleaseRequest {
        account_id: "rich".into(),
        reservation_id: "a".into(),
    };
    expect(
        app.quota.release(release).await,
        Code::FailedPrecondition,
        "already settled",
    );

    app.quota.reserve(reserve("rich", "b", 10, 10)).await.unwrap();
    let release = proto::ReleaseRequest {
        account_id: "rich".into(),
        reservation_id: "b".into(),
    };
    app.quota.release(release).await.unwrap();
    expect(
        app.quota.settle(settle("rich", "b", 1, 1)).await,
        Code::FailedPrecondition,
        "released",
    );

    app.quota.reserve(reserve("rich", "c", 10, 10)).await.unwrap();
    app.advance(SignedDuration::from_secs(60));
    expect(
        app.quota.settle(settle("rich", "c", 1, 1)).await,
        Code::FailedPrecondition,
        "expired",
    );
    assert_eq!(app.paid("rich").await, paid);
    assert_eq!(app.records(1).await.len(), 1);
    app.shutdown().await;
}

async fn malformed_admin_requests_are_refused_and_change_nothing(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    let before = support::detail(&mut app.admin, "rich").await;
    let a = &mut app.admin;
    let top_up = |pool: i32, amount: proto::Money, reason: &str| proto::TopUpRequest {
        account_id: "rich".into(),
        adjustment_id: "op".into(),
        pool,
        amount: Some(amount),
        reason: reason.into(),
        ..Default::default()
    };
    expect(
        a.top_up(top_up(7, money("1"), "r")).await,
        Code::InvalidArgument,
        "pool",
    );
    expect(
        a.top_up(top_up(0, money("1"), "r")).await,
        Code::InvalidArgument,
        "pool",
    );
    expect(
        a.top_up(top_up(1, money("0"), "r")).await,
        Code::InvalidArgument,
        "amount",
    );
    expect(
        a.top_up(top_up(1, money("1"), "")).await,
        Code::InvalidArgument,
        "reason",
    );
    expect(
        a.top_up(top_up(1, money("1"), &"x".repeat(1025))).await,
        Code::InvalidArgument,
        "reason",
    );
    // A reason is one line: it cannot forge log lines or steer a terminal.
    for forged in [
        "ok\nINFO audit: admin change applied operator=root",
        "tab\there",
        "\u{1b}[2J",
        "ok\u{2028}INFO forged",
        "refund \u{202e}001 DSU",
    ] {
        expect(
            a.top_up(top_up(1, money("1"), forged)).await,
            Code::InvalidArgument,
            "reason",
        );
    }
    let huge = proto::Money {
        units: 1_000_000_000_000_001,
        picos: 0,
        decimal: String::new(),
    };
    expect(a.top_up(top_up(1, huge, "r")).await, Code::InvalidArgument, "at most");
    // Credit is spent like money: a limit is capped as a top-up is.
    let endless = proto::Money {
        units: i64::MAX,
        picos: 0,
        decimal: String::new(),
    };
    let update = proto::UpdateAccountRequest {
        account_id: "rich".into(),
        adjustment_id: "credit".into(),
        reason: "r".into(),
        time_zone: None,
        credit_limit: Some(endless.clone()),
    };
    expect(a.update_account(update).await, Code::InvalidArgument, "credit_limit");
    let create = proto::CreateAccountRequest {
        account_id: "endless".into(),
        plan: "payg".into(),
        adjustment_id: "open-endless".into(),
        reason: "r".into(),
        credit_limit: Some(endless),
        ..Default::default()
    };
    expect(a.create_account(create).await, Code::InvalidArgument, "credit_limit");

    let limits = proto::LimitSet {
        tokens_per_minute: u64::MAX,
        ..Default::default()
    };
    let overrides = proto::LimitOverrides {
        per_model: Some(limits),
        ..Default::default()
    };
    let set = proto::SetLimitOverridesRequest {
        account_id: "rich".into(),
        adjustment_id: "setlimitoverrides-3".into(),
        reason: "test".into(),
        overrides: Some(overrides),
    };
    expect(
        a.set_limit_overrides(set).await,
        Code::InvalidArgument,
        "overrides.per_model: tokens_per_minute",
    );
    let named = proto::LimitOverrides {
        models: [("bad model".to_owned(), proto::LimitSet::default())].into(),
        ..Default::default()
    };
    let set = proto::SetLimitOverridesRequest {
        account_id: "rich".into(),
        adjustment_id: "setlimitoverrides-4".into(),
        reason: "test".into(),
        overrides: Some(named),
    };
    expect(
        a.set_limit_overrides(set).await,
        Code::InvalidArgument,
        "overrides.models.bad model",
    );

    let create = |id: &str, plan: &str, tz: &str, anchor: i32| proto::CreateAccountRequest {
        account_id: id.into(),
        plan: plan.into(),
        time_zone: tz.into(),
        anchor,
        adjustment_id: format!("open-{id}"),
        reason: "test".into(),
        ..Default::default()
    };
    expect(
        a.create_account(create("n1", "gold", "", 0)).await,
        Code::InvalidArgument,
        "plan",
    );
    expect(
        a.create_account(create("n1", "payg", "Mars/Base", 0)).await,
        Code::InvalidArgument,
        "time_zone",
    );
    expect(
        a.create_account(create("n1", "payg", "", 9)).await,
        Code::InvalidArgument,
        "anchor",
    );
    expect(
        a.create_account(create("n 1", "payg", "", 0)).await,
        Code::InvalidArgument,
        "account_id",
    );
    let pack = proto::GrantPackRequest {
        account_id: "rich".into(),
        adjustment_id: "grantpack-5".into(),
        pack_id: "p".into(),
        tokens: 10,
        expires_at: Some(prost_types::Timestamp { seconds: 1, nanos: 0 }),
        reason: "r".into(),
        ..Default::default()
    };
    expect(a.grant_pack(pack.clone()).await, Code::InvalidArgument, "expires_at");
    let bad_nanos = proto::GrantPackRequest {
        expires_at: Some(prost_types::Timestamp { seconds: 1, nanos: -1 }),
        ..pack.clone()
    };
    expect(a.grant_pack(bad_nanos).await, Code::InvalidArgument, "expires_at");
    expect(
        a.grant_pack(proto::GrantPackRequest {
            expires_at: None,
            ..pack
        })
        .await,
        Code::InvalidArgument,
        "expires_at",
    );
    let revoke = proto::RevokePackRequest {
        account_id: "rich".into(),
        adjustment_id: "revokepack-6".into(),
        pack_id: "none".into(),
        reason: "r".into(),
    };
    expect(a.revoke_pack(revoke).await, Code::NotFound, "pack none");
    let inexact = price_version(
        "v9",
        jiff::Timestamp::from_second(4_000_000_000).unwrap(),
        "0.0000001",
        "1",
    );
    let mut heavy = inexact.clone();
    heavy.models[0].token_weight_milli = 1_000_001;
    heavy.models[0].tiers[0].prices = Some(prices("1", "1"));
    let publish = proto::PublishPriceVersionRequest {
        version: Some(heavy),
        adjustment_id: "bad".into(),
        reason: "r".into(),
    };
    expect(
        a.publish_price_version(publish).await,
        Code::InvalidArgument,
        "token_weight",
    );
    let publish = proto::PublishPriceVersionRequest {
        version: Some(inexact),
        adjustment_id: "bad".into(),
        reason: "r".into(),
    };
    expect(
        a.publish_price_version(publish).await,
        Code::InvalidArgument,
        "input_per_million",
    );
    let after = support::detail(a, "rich").await;
    assert_eq!(before, after);
    app.shutdown().await;
}

on_both_stores!(
    malformed_data_plane_requests_are_refused_and_change_nothing,
    settling_in_the_wrong_state_is_a_failed_precondition,
    malformed_admin_requests_are_refused_and_change_nothing,
);
