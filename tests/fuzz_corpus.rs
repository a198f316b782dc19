//! Every seed of every fuzz target's corpus (`fuzz/corpus/TARGET/`) run
//! through the target's entry point (`tollgate::fuzzing`) on the stable
//! toolchain: the corpus is a regression suite, and a crash a fuzzer finds
//! stays fixed once its input is added there.

#![allow(clippy::unwrap_used)]

use std::path::Path;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

#[test]
fn config_toml_seeds() {
    for (_, bytes) in seeds("config_toml") {
        tollgate::fuzzing::config_toml(&bytes);
    }
}

#[test]
fn envoy_yaml_seeds() {
    for (_, bytes) in seeds("envoy_yaml") {
        tollgate::fuzzing::envoy_yaml(&bytes);
    }
}

#[test]
fn journal_decode_seeds() {
    for (_, bytes) in seeds("journal_decode") {
        tollgate::fuzzing::journal_decode(&bytes);
    }
}

#[test]
fn uds_frames_seeds() {
    for (_, bytes) in seeds("uds_frames") {
        tollgate::fuzzing::uds_frames(&bytes);
    }
}

/// The RPC seeds cover every RPC, each with a message that decodes.
#[test]
fn rpc_request_seeds() {
    let rpcs = tollgate::fuzzing::Rpcs::new();
    let seeds = seeds("rpc_requests");
    for (i, name) in tollgate::fuzzing::RPCS.iter().enumerate() {
        assert!(
            seeds
                .iter()
                .any(|(_, b)| b.first().map(|w| usize::from(*w) % tollgate::fuzzing::RPCS.len()) == Some(i)),
            "no seed for {name}"
        );
    }
    for (_, bytes) in &seeds {
        rpcs.call(bytes);
    }
}

/// Writes the RPC seeds: one plausible message per RPC, on the demo
/// accounts. `cargo test --test fuzz_corpus -- --ignored` regenerates them.
#[test]
#[ignore = "writes fuzz/corpus/rpc_requests"]
fn write_rpc_seeds() {
    use prost::Message;
    use tollgate::proto;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/rpc_requests");
    std::fs::create_dir_all(&dir).unwrap();
    let money = |units| {
        Some(proto::Money {
            units,
            picos: 0,
            decimal: String::new(),
        })
    };
    let when = Some(prost_types::Timestamp {
        seconds: 1_900_000_000,
        nanos: 0,
    });
    let counts = proto::Usage {
        input_tokens: 120,
        cached_input_tokens: 20,
        cache_write_tokens: 5,
        output_tokens: 80,
    };
    let usage = Some(counts);
    let write = |i: usize, bytes: Vec<u8>| {
        let name = tollgate::fuzzing::RPCS[i];
        let mut seed = vec![u8::try_from(i).unwrap()];
        seed.extend(bytes);
        std::fs::write(dir.join(name), seed).unwrap();
    };
    let (a, r) = (|| "demo".to_owned(), |s: &str| s.to_owned());
    write(
        0,
        proto::ReserveRequest {
            account_id: a(),
            model: r("llama-3.1-8b"),
            request_id: r("req-1"),
            input_tokens: 120,
            max_output_tokens: 256,
            ..Default::default()
        }
        .encode_to_vec(),
    );
    write(
        1,
        proto::ExtendRequest {
            account_id: a(),
            reservation_id: r("req-1"),
            max_output_tokens: 512,
        }
        .encode_to_vec(),
    );
    write(
        2,
        proto::SettleRequest {
            account_id: a(),
            reservation_id: r("req-1"),
            usage,
        }
        .encode_to_vec(),
    );
    write(
        3,
        proto::ReleaseRequest {
            account_id: a(),
            reservation_id: r("req-1"),
        }
        .encode_to_vec(),
    );
    write(
        4,
        proto::ChargeRequest {
            account_id: a(),
            request_id: r("charge-1"),
            model: r("llama-3.1-8b"),
            charge: Some(proto::charge_request::Charge::Usage(counts)),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    write(5, proto::GetBalanceRequest { account_id: a() }.encode_to_vec());
    write(
        6,
        proto::CreateAccountRequest {
            account_id: r("new-1"),
            plan: r("payg"),
            time_zone: r("Europe/Paris"),
            credit_limit: money(1),
            adjustment_id: r("adj-1"),
            reason: r("fuzz"),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    write(
        7,
        proto::UpdateAccountRequest {
            account_id: a(),
            time_zone: Some(r("UTC")),
            credit_limit: money(2),
            adjustment_id: r("adj-2"),
            reason: r("fuzz"),
        }
        .encode_to_vec(),
    );
    write(
        8,
        proto::TopUpRequest {
            account_id: a(),
            adjustment_id: r("adj-3"),
            pool: proto::MoneyPool::Promo as i32,
            amount: money(5),
            reason: r("fuzz"),
            expires_at: when,
            ..Default::default()
        }
        .encode_to_vec(),
    );
    write(
        9,
        proto::AdjustMoneyRequest {
            account_id: a(),
            adjustment_id: r("adj-4"),
            amount: Some(proto::Money {
                units: -1,
                picos: -500,
                decimal: String::new(),
            }),
            reason: r("fuzz"),
        }
        .encode_to_vec(),
    );
    write(
        10,
        proto::GrantPackRequest {
            account_id: a(),
            pack_id: r("pack-1"),
            tokens: 1000,
            expires_at: when,
            models: vec![r("llama-3.1-8b")],
            priority: 1,
            reason: r("fuzz"),
            adjustment_id: r("adj-11"),
        }
        .encode_to_vec(),
    );
    write(
        11,
        proto::RevokePackRequest {
            account_id: r("demo-pro"),
            pack_id: r("welcome-pack"),
            reason: r("fuzz"),
            adjustment_id: r("adj-5"),
        }
        .encode_to_vec(),
    );
    write(
        12,
        proto::AssignPlanRequest {
            account_id: a(),
            plan: r("pro"),
            adjustment_id: r("adj-6"),
            reason: r("fuzz"),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    write(
        13,
        proto::SetLimitOverridesRequest {
            account_id: a(),
            overrides: Some(proto::LimitOverrides {
                account: Some(proto::LimitSet {
                    requests_per_minute: 10,
                    tokens_per_minute: 1000,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            adjustment_id: r("adj-7"),
            reason: r("fuzz"),
        }
        .encode_to_vec(),
    );
    write(
        14,
        proto::RefundRequest {
            account_id: a(),
            request_id: r("req-1"),
            kind: r("settle"),
            charges: vec![proto::SourceAmount {
                source: proto::SourceKind::Paid as i32,
                money: money(1),
                ..Default::default()
            }],
            reason: r("fuzz"),
            adjustment_id: r("adj-8"),
            settled_at: when,
        }
        .encode_to_vec(),
    );
    write(
        15,
        proto::SuspendRequest {
            account_id: a(),
            reason: r("fuzz"),
            adjustment_id: r("adj-9"),
        }
        .encode_to_vec(),
    );
    write(
        16,
        proto::ResumeRequest {
            account_id: a(),
            reason: r("fuzz"),
            adjustment_id: r("adj-10"),
        }
        .encode_to_vec(),
    );
    write(
        17,
        proto::PublishPriceVersionRequest {
            version: Some(proto::PriceVersion {
                id: r("2027-01"),
                effective_at: when,
                ..Default::default()
            }),
            adjustment_id: r("list-2027-01"),
            reason: r("new list"),
        }
        .encode_to_vec(),
    );
    write(18, proto::GetAccountRequest { account_id: a() }.encode_to_vec());
    write(
        19,
        proto::ListAccountsRequest {
            after: r("demo"),
            limit: 2,
        }
        .encode_to_vec(),
    );
    write(20, proto::ListPriceVersionsRequest {}.encode_to_vec());
    {
        use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
            RateLimitDescriptor, rate_limit_descriptor::Entry,
        };
        use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
        let entry = |key: &str, value: &str| Entry {
            key: r(key),
            value: r(value),
        };
        let request = RateLimitRequest {
            domain: r("inference"),
            descriptors: vec![
                RateLimitDescriptor {
                    entries: vec![entry("api_key", "k1"), entry("model", "llama-3.1-8b")],
                    ..Default::default()
                },
                RateLimitDescriptor {
                    entries: vec![entry("account_tokens", "demo")],
                    ..Default::default()
                },
            ],
            hits_addend: 3,
        };
        write(21, request.encode_to_vec());
    }
    write(
        22,
        proto::SettleRequest {
            account_id: a(),
            reservation_id: r("req-2"),
            usage,
        }
        .encode_to_vec(),
    );
}
