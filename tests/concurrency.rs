//! Many concurrent clients drain one account over real gRPC on a
//! multi-threaded runtime: nothing is overspent, and the usage records add
//! up to the balance change to the unit (invariants 1 to 3).

#![allow(clippy::unwrap_used)]

mod support;

use support::{Backend, money, reserve, settle, spawn_app_on};
use tollgate::engine::Money;
use tollgate::proto;
use tollgate::proto::{Decision, DenyReason};

async fn concurrent_clients_drain_an_account_exactly(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    app.admin
        .top_up(proto::TopUpRequest {
            account_id: "poor".into(),
            adjustment_id: "funding".into(),
            pool: proto::MoneyPool::Paid as i32,
            amount: Some(money("0.5")),
            reason: "load test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let clients = 64;
    let mut tasks = Vec::new();
    for c in 0..clients as u64 {
        let mut quota = app.quota.clone();
        tasks.push(tokio::spawn(async move {
            let mut settled = 0u32;
            for i in 0u64.. {
                let id = format!("c{c}-{i}");
                // Worst case 1000 input + 1000 output = 0.005; actual output varies.
                let r = quota
                    .reserve(reserve("poor", &id, 1000, 1000))
                    .await
                    .unwrap()
                    .into_inner();
                if r.decision == Decision::Deny as i32 {
                    assert_eq!(r.deny_reason, DenyReason::InsufficientFunds as i32);
                    break;
                }
                let output = (c * 7 + i) % (r.granted_output_tokens + 1);
                if i % 5 == 4 {
                    let release = proto::ReleaseRequest {
                        account_id: "poor".into(),
                        reservation_id: id,
                    };
                    quota.release(release).await.unwrap();
                } else {
                    quota.settle(settle("poor", &id, 1000, output)).await.unwrap();
                    settled += 1;
                }
            }
            settled
        }));
    }
    let mut settles = 0;
    for t in tasks {
        settles += t.await.unwrap();
    }
    let balance = app.balance("poor").await;
    let paid: Money = balance.paid.unwrap().decimal.parse().unwrap();
    assert!(!paid.is_negative(), "overspent: {paid}");
    assert_eq!(balance.held_money.unwrap().decimal, "0.000000000000");
    let records = app.records(settles as usize).await;
    assert_eq!(records.len(), settles as usize, "one record per settle");
    let charged = records.iter().try_fold(Money::ZERO, |sum, r| {
        sum.checked_add(r["total_money"].as_str().unwrap().parse().unwrap())
    });
    let start: Money = "0.5".parse().unwrap();
    assert_eq!(
        charged.unwrap(),
        start.checked_sub(paid).unwrap(),
        "records add up to the balance change"
    );
    // Drained: what is left cannot pay for a prompt and one output token.
    assert!(paid < Money::from_picos(1000 * 1_000_000 + 4_000_000));
    app.shutdown().await;
}

on_both_stores!(concurrent_clients_drain_an_account_exactly,);
