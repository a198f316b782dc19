//! Entry points of the fuzz targets (`fuzz/`): each takes arbitrary bytes
//! and must never panic. `cargo test` runs every seed of their corpora
//! through the same functions (`tests/fuzz_corpus.rs`), so a seed added
//! for a crash is a regression test on the stable toolchain.

use std::sync::Arc;

use prost::Message;
use sha2::Digest;
use tonic::Request;

use crate::api::admin::AdminApi;
use crate::api::auth::{Operators, Role, Token};
use crate::api::quota::QuotaApi;
use crate::api::rls::RlsApi;
use crate::clock::ManualClock;
use crate::config::{DEMO, Settings, UsageSinkConfig};
use crate::engine::Command;
use crate::engine::ids::AccountId;
use crate::proto;
use crate::proto::admin_server::Admin;
use crate::proto::quota_server::Quota;
use crate::service::Tollgate;
use crate::store::memory::MemoryStore;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;

/// The token the admin calls of [`Rpcs`] present (write role).
pub const TOKEN: &str = "tg_fuzz";

/// The Envoy rate-limit rules the RLS calls of [`Rpcs`] run against.
const RLS_RULES: &str = include_str!("../examples/rls/inference.yaml");

/// The configuration parser, on any text.
pub fn config_toml(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let _ = Settings::parse(&text, &|_| None);
}

/// The Envoy rate-limit rule parser, on any text.
pub fn envoy_yaml(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let _ = crate::rls::config::Rules::parse(&[("fuzz.yaml".to_owned(), text.into_owned())]);
}

/// The journal's segment decoder, on any bytes: what it returns must be
/// consistent (entries only before the end it reports) and encode again.
pub fn journal_decode(bytes: &[u8]) {
    use crate::usage::journal::{Ending, decode, encode};
    let (entries, ending) = decode(bytes);
    match ending {
        Ending::Clean => {}
        Ending::Torn { at } | Ending::Corrupt { at, .. } => assert!(at <= bytes.len()),
    }
    for entry in entries {
        let _ = encode(&entry);
    }
}

/// The Unix sockets' reading of a client's connection (preface, frames,
/// header blocks decoded and re-encoded), on any bytes: the first byte
/// sets the size of the pieces the rest arrives in. It must never panic,
/// and never pass on more than a header list's bound per block it takes.
pub fn uds_frames(bytes: &[u8]) {
    let Some((&piece, rest)) = bytes.split_first() else {
        return;
    };
    let mut reader = crate::transport::uds::Reader::default();
    for chunk in rest.chunks(usize::from(piece).max(1)) {
        if reader.feed(chunk).is_err() {
            return;
        }
    }
    // Re-encoding never grows a connection by more than its blocks' bound.
    assert!(reader.output().len() <= rest.len() + 64 * 1024 * (1 + rest.len() / 9));
}

/// Every RPC of the data plane, the control plane and the Envoy
/// rate-limit service, called in process through the real handlers on a
/// memory store seeded with the demo configuration, on a manual clock.
pub struct Rpcs {
    runtime: tokio::runtime::Runtime,
    tollgate: Tollgate,
    clock: Arc<ManualClock>,
    quota: QuotaApi,
    admin: AdminApi,
    rls: RlsApi,
    seeded: Vec<AccountId>,
}

/// The RPCs, in the order of the first byte that selects them.
pub const RPCS: [&str; 23] = [
    "Reserve",
    "Extend",
    "Settle",
    "Release",
    "Charge",
    "GetBalance",
    "CreateAccount",
    "UpdateAccount",
    "TopUp",
    "AdjustMoney",
    "GrantPack",
    "RevokePack",
    "AssignPlan",
    "SetLimitOverrides",
    "Refund",
    "Suspend",
    "Resume",
    "PublishPriceVersion",
    "GetAccount",
    "ListAccounts",
    "ListPriceVersions",
    "ShouldRateLimit",
    "ReserveThenSettle",
];

impl Rpcs {
    /// The services, with the demo accounts seeded.
    pub fn new() -> Rpcs {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let mut settings = Settings::parse(DEMO, &|_| None).expect("the demo configuration");
        settings.usage = UsageSinkConfig::File("/dev/null".into());
        let clock = Arc::new(ManualClock::new("2026-06-01T00:00:00Z".parse().expect("a timestamp")));
        let (tollgate, rls) = runtime.block_on(async {
            let store = Arc::new(MemoryStore::new(settings.catalog.clone()));
            let (sender, writer) = crate::usage::spawn(&settings.usage).await.expect("the usage sink");
            // The writer runs until the process ends.
            std::mem::forget(writer);
            let tollgate = Tollgate::new(store, Arc::clone(&clock) as _, sender);
            for seed in &settings.seed {
                tollgate.seed(seed).await.expect("seeding");
            }
            let rules = crate::rls::config::Rules::parse(&[("inference.yaml".into(), RLS_RULES.into())])
                .expect("the example rules");
            let in_force = crate::rls::config::InForce {
                rules,
                settings: settings.rls.clone(),
            };
            let rls = RlsApi::new(tollgate.clone(), Arc::new(std::sync::RwLock::new(Arc::new(in_force))));
            (tollgate, rls)
        });
        let operators = Operators::new(vec![Token {
            sha256: sha2::Sha256::digest(TOKEN.as_bytes()).into(),
            role: Role::Write,
            operator: "fuzz".into(),
        }]);
        Rpcs {
            quota: QuotaApi::new(tollgate.clone()),
            admin: AdminApi::new(tollgate.clone(), Arc::new(operators)),
            seeded: settings.seed.iter().map(|s| s.id.clone()).collect(),
            runtime,
            tollgate,
            clock,
            rls,
        }
    }

    /// Calls the RPC the first byte selects with the message the rest
    /// encodes (bytes that are no such message are the transport's to
    /// refuse: skipped). A call refused for its content must leave every
    /// seeded account as it was.
    pub fn call(&self, bytes: &[u8]) {
        let Some((&which, body)) = bytes.split_first() else {
            return;
        };
        // Time moves on, so holds lapse and remembered ids are forgotten
        // as in a long-running process.
        self.clock.advance(jiff::SignedDuration::from_secs(1));
        self.runtime.block_on(async {
            let before = self.snapshots().await;
            let refused = self.dispatch(usize::from(which) % RPCS.len(), body).await;
            if let Some(status) = refused {
                let after = self.snapshots().await;
                assert!(
                    before == after,
                    "{} refused ({status:?}) but changed an account",
                    RPCS[usize::from(which) % RPCS.len()]
                );
            }
        });
    }

    async fn snapshots(&self) -> Vec<String> {
        let mut out = Vec::new();
        for id in &self.seeded {
            let snapshot = self.tollgate.apply(id, Command::Snapshot).await;
            out.push(format!("{snapshot:?}"));
        }
        out
    }

    /// Runs one call; returns its status if it was refused for what it
    /// asked (nothing may have changed).
    async fn dispatch(&self, which: usize, body: &[u8]) -> Option<tonic::Status> {
        macro_rules! call {
            ($service:expr, $method:ident, $message:ty) => {{
                let Ok(message) = <$message>::decode(body) else {
                    return None;
                };
                let mut request = Request::new(message);
                let bearer = format!("Bearer {TOKEN}").parse().expect("ASCII");
                request.metadata_mut().insert("authorization", bearer);
                $service.$method(request).await.err()
            }};
        }
        let status = match which {
            0 => call!(self.quota, reserve, proto::ReserveRequest),
            1 => call!(self.quota, extend, proto::ExtendRequest),
            2 => call!(self.quota, settle, proto::SettleRequest),
            3 => call!(self.quota, release, proto::ReleaseRequest),
            4 => call!(self.quota, charge, proto::ChargeRequest),
            5 => call!(self.quota, get_balance, proto::GetBalanceRequest),
            6 => call!(self.admin, create_account, proto::CreateAccountRequest),
            7 => call!(self.admin, update_account, proto::UpdateAccountRequest),
            8 => call!(self.admin, top_up, proto::TopUpRequest),
            9 => call!(self.admin, adjust_money, proto::AdjustMoneyRequest),
            10 => call!(self.admin, grant_pack, proto::GrantPackRequest),
            11 => call!(self.admin, revoke_pack, proto::RevokePackRequest),
            12 => call!(self.admin, assign_plan, proto::AssignPlanRequest),
            13 => call!(self.admin, set_limit_overrides, proto::SetLimitOverridesRequest),
            14 => call!(self.admin, refund, proto::RefundRequest),
            15 => call!(self.admin, suspend, proto::SuspendRequest),
            16 => call!(self.admin, resume, proto::ResumeRequest),
            17 => call!(self.admin, publish_price_version, proto::PublishPriceVersionRequest),
            18 => call!(self.admin, get_account, proto::GetAccountRequest),
            19 => call!(self.admin, list_accounts, proto::ListAccountsRequest),
            20 => call!(self.admin, list_price_versions, proto::ListPriceVersionsRequest),
            21 => call!(self.rls, should_rate_limit, RateLimitRequest),
            _ => {
                // A reserve and the settle of what it reserved, so settles
                // of live reservations are reached with fuzzed usage.
                let Ok(settle) = proto::SettleRequest::decode(body) else {
                    return None;
                };
                let reserve = proto::ReserveRequest {
                    account_id: settle.account_id.clone(),
                    model: "llama-3.1-8b".into(),
                    request_id: settle.reservation_id.clone(),
                    input_tokens: 10,
                    max_output_tokens: 10,
                    ..Default::default()
                };
                let _ = self.quota.reserve(Request::new(reserve)).await;
                // The reserve changed the account: no comparison.
                let _ = self.quota.settle(Request::new(settle)).await;
                None
            }
        };
        // Refusals of the request itself; UNAVAILABLE and the like say
        // nothing of the content.
        status.filter(|s| {
            use tonic::Code;
            matches!(
                s.code(),
                Code::InvalidArgument
                    | Code::NotFound
                    | Code::AlreadyExists
                    | Code::FailedPrecondition
                    | Code::Unauthenticated
                    | Code::PermissionDenied
            )
        })
    }
}

impl Default for Rpcs {
    fn default() -> Self {
        Rpcs::new()
    }
}
