//! The data plane's Rust client, for inference servers: reserve before
//! generating, extend while streaming, settle with the real counts, and
//! release whatever is never settled.
//!
//! - Every call has a deadline ([`Options::deadline`]).
//! - Every data-plane call is idempotent (by request id, or by reservation
//!   id), so a call whose outcome is unknown (`UNAVAILABLE`,
//!   `DEADLINE_EXCEEDED`) is sent again as is, up to
//!   [`Options::attempts`] times, with a doubling pause between.
//! - A [`Reservation`] settles explicitly ([`Reservation::settle`]) and is
//!   released when dropped unsettled: a handler that returns early, fails
//!   or is cancelled (its client disconnected) gives back what it held,
//!   even when cancelled while its reserve was in flight.
//! - A [`Denial`] carries its reason and, for rate limits, when to retry;
//!   [`headers`] turns either answer into the `x-ratelimit-*` and
//!   `retry-after` headers OpenAI-compatible clients read.
//! - Targets are `http://HOST:PORT` or `unix:/PATH` ([`crate::transport::channel`]).

use std::future::Future;
use std::time::Duration;

use tonic::transport::Channel;

use crate::proto;
use crate::proto::quota_client::QuotaClient;

/// How calls are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Each attempt's deadline.
    pub deadline: Duration,
    /// Attempts per call, the first included (at least 1).
    pub attempts: u32,
    /// The pause before the first retry; doubled before each next one.
    pub backoff: Duration,
}

impl Default for Options {
    /// 500 ms a call, three attempts, 25 ms then 50 ms between.
    fn default() -> Self {
        Options {
            deadline: Duration::from_millis(500),
            attempts: 3,
            backoff: Duration::from_millis(25),
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The target could not be reached at all.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// Where.
        target: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The call's last answer: an error status (bad input, unknown
    /// reservation, or still unavailable after every attempt).
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
}

/// A Tollgate data plane; cheap to clone (one HTTP/2 connection shared).
#[derive(Debug, Clone)]
pub struct Client(std::sync::Arc<Inner>);

#[derive(Debug)]
struct Inner {
    quota: QuotaClient<Channel>,
    options: Options,
}

/// What a reserve asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ask {
    /// The account to charge.
    pub account: String,
    /// The request's id: a retry of the same request sends the same one.
    pub request_id: String,
    /// The model.
    pub model: String,
    /// The API key, if limits apply per key.
    pub api_key: String,
    /// The service tier; empty is `default`.
    pub tier: String,
    /// Prompt tokens, cached ones excluded.
    pub input_tokens: u64,
    /// Prompt tokens read from the cache.
    pub cached_input_tokens: u64,
    /// The most output tokens the request may generate.
    pub max_output_tokens: u64,
}

/// A reserve's answer.
#[derive(Debug)]
pub enum Reserved {
    /// Go ahead, within [`Reservation::granted_output_tokens`].
    Granted(Reservation),
    /// Do not.
    Denied(Denial),
}

/// Why a reserve was denied, and when to come back.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    /// The reason.
    pub reason: proto::DenyReason,
    /// For people.
    pub message: String,
    /// When the limit that denied expects to admit again, if it is a rate.
    pub retry_after: Option<Duration>,
    /// The rate-limit figures now (for `x-ratelimit-*` headers).
    pub limits: Option<proto::RateLimitStatus>,
    /// The budget that denied (for `x-budget-*` headers).
    pub budget: Option<proto::BudgetRef>,
}

/// Held funds and permits for one request: settle it, or it is released
/// when dropped.
#[derive(Debug)]
pub struct Reservation {
    client: Client,
    account: String,
    id: String,
    granted: u64,
    limits: Option<proto::RateLimitStatus>,
    /// Settled or released: nothing to give back on drop.
    done: bool,
}

fn duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.and_then(|d| {
        Some(Duration::new(
            u64::try_from(d.seconds).ok()?,
            u32::try_from(d.nanos).ok()?,
        ))
    })
}

impl Denial {
    /// The response headers for this denial (see [`headers`] and
    /// [`budget_headers`]).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut out = headers(self.limits.as_ref(), self.retry_after);
        out.extend(self.budget.as_ref().map(budget_headers).unwrap_or_default());
        out
    }
}

/// The headers that say which budget denied a request and when it has
/// room again: `x-budget-scope` (`api_key` or `project`), `x-budget-id`,
/// `x-budget-period`, `x-budget-limit-money` or `x-budget-limit-tokens`
/// (what ran out), and `x-budget-reset` (RFC 3339). A budget resets in
/// hours or days, so no `retry-after` is sent for it.
pub fn budget_headers(b: &proto::BudgetRef) -> Vec<(&'static str, String)> {
    let scope = match proto::BudgetScope::try_from(b.scope) {
        Ok(proto::BudgetScope::Project) => "project",
        _ => "api_key",
    };
    let mut out = vec![
        ("x-budget-scope", scope.to_owned()),
        ("x-budget-id", b.id.clone()),
        ("x-budget-period", b.period.clone()),
    ];
    match &b.money_limit {
        Some(m) => out.push(("x-budget-limit-money", m.decimal.clone())),
        None => out.push(("x-budget-limit-tokens", b.tokens_limit.to_string())),
    }
    if let Some(t) = b
        .resets_at
        .as_ref()
        .and_then(|t| jiff::Timestamp::new(t.seconds, t.nanos).ok())
    {
        out.push(("x-budget-reset", t.to_string()));
    }
    out
}

/// The response headers OpenAI-compatible clients read:
/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the limits
/// configured (a limit of zero is none, and has no headers), and, given
/// `retry_after`, `retry-after` (whole seconds, rounded up) and
/// `retry-after-ms`. Resets are written as OpenAI writes them (Go's
/// notation, to the millisecond rounded up: `250ms`, `1.5s`, `6m0s`).
pub fn headers(limits: Option<&proto::RateLimitStatus>, retry_after: Option<Duration>) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(l) = limits {
        let kinds = [
            (
                [
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ],
                l.requests_limit,
                l.requests_remaining,
                l.requests_reset.as_ref(),
            ),
            (
                [
                    "x-ratelimit-limit-tokens",
                    "x-ratelimit-remaining-tokens",
                    "x-ratelimit-reset-tokens",
                ],
                l.tokens_limit,
                l.tokens_remaining,
                l.tokens_reset.as_ref(),
            ),
        ];
        for ([limit_name, remaining_name, reset_name], limit, remaining, reset) in kinds {
            if limit > 0 {
                out.push((limit_name, limit.to_string()));
                out.push((remaining_name, remaining.to_string()));
                out.push((reset_name, go_duration(duration(reset).unwrap_or_default())));
            }
        }
    }
    if let Some(after) = retry_after {
        let millis = after.as_nanos().div_ceil(1_000_000);
        out.push(("retry-after", millis.div_ceil(1000).to_string()));
        out.push(("retry-after-ms", millis.to_string()));
    }
    out
}

/// `d` in Go's notation, to the millisecond rounded up.
fn go_duration(d: Duration) -> String {
    let millis = d.as_nanos().div_ceil(1_000_000);
    if millis == 0 {
        return "0s".to_owned();
    }
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let (hours, minutes, seconds, fraction) = (
        millis / 3_600_000,
        millis / 60_000 % 60,
        millis / 1000 % 60,
        millis % 1000,
    );
    let seconds = if fraction == 0 {
        seconds.to_string()
    } else {
        format!("{seconds}.{fraction:03}").trim_end_matches('0').to_owned()
    };
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, m) => format!("{m}m{seconds}s"),
        (h, m) => format!("{h}h{m}m{seconds}s"),
    }
}

impl Client {
    /// Connects to `target` (`http://HOST:PORT` or `unix:/PATH`).
    pub async fn connect(target: &str, options: Options) -> Result<Client, ClientError> {
        let channel = crate::transport::channel::connect(target)
            .await
            .map_err(|source| ClientError::Connect {
                target: target.to_owned(),
                source,
            })?;
        Ok(Client::new(channel, options))
    }

    /// A client on `channel`.
    pub fn new(channel: Channel, options: Options) -> Client {
        Client(std::sync::Arc::new(Inner {
            quota: QuotaClient::new(channel),
            options: Options {
                attempts: options.attempts.max(1),
                ..options
            },
        }))
    }

    /// Reserves for `ask`.
    ///
    /// If the caller goes away while the reserve is in flight (its future
    /// dropped, say by a client that disconnected), the reserve may land
    /// unseen: it is sent again in the background (the same request id
    /// gets the same answer) and what it grants is released.
    pub async fn reserve(&self, ask: &Ask) -> Result<Reserved, ClientError> {
        let mut in_flight = InFlight {
            client: self,
            ask,
            answered: false,
        };
        let answer = self.reserve_request(ask.into()).await;
        in_flight.answered = true;
        let r = answer?;
        if r.decision == proto::Decision::Allow as i32 {
            return Ok(Reserved::Granted(Reservation {
                client: self.clone(),
                account: ask.account.clone(),
                id: r.reservation_id,
                granted: r.granted_output_tokens,
                limits: r.rate_limits,
                done: false,
            }));
        }
        Ok(Reserved::Denied(Denial {
            reason: proto::DenyReason::try_from(r.deny_reason).unwrap_or(proto::DenyReason::Unspecified),
            message: r.message,
            retry_after: duration(r.retry_after.as_ref()),
            limits: r.rate_limits,
            budget: r.budget,
        }))
    }

    /// A plain reserve, for callers that keep the ids themselves (a
    /// command line that reserves in one process and settles in another):
    /// the same deadline and retries, the whole answer, nothing released
    /// on the caller's behalf.
    pub async fn reserve_request(&self, request: proto::ReserveRequest) -> Result<proto::ReserveResponse, ClientError> {
        self.call(request, |mut q, r| async move { q.reserve(r).await }).await
    }

    /// A plain settle (see [`Client::reserve_request`]).
    pub async fn settle_request(&self, request: proto::SettleRequest) -> Result<proto::SettleResponse, ClientError> {
        self.call(request, |mut q, r| async move { q.settle(r).await }).await
    }

    /// A plain release (see [`Client::reserve_request`]).
    pub async fn release_request(&self, request: proto::ReleaseRequest) -> Result<proto::ReleaseResponse, ClientError> {
        self.call(request, |mut q, r| async move { q.release(r).await }).await
    }

    /// What `account` can spend now.
    pub async fn balance(&self, account: &str) -> Result<proto::GetBalanceResponse, ClientError> {
        let request = proto::GetBalanceRequest {
            account_id: account.to_owned(),
        };
        self.call(request, |mut q, r| async move { q.get_balance(r).await })
            .await
    }

    /// Gives back what reservation `id` of `account` holds.
    async fn release(&self, account: &str, id: &str) -> Result<(), ClientError> {
        let request = proto::ReleaseRequest {
            account_id: account.to_owned(),
            reservation_id: id.to_owned(),
        };
        self.release_request(request).await?;
        Ok(())
    }

    /// Makes `request` with a deadline, again as is while its outcome is
    /// unknown.
    async fn call<Req, Resp, F, Fut>(&self, request: Req, mut send: F) -> Result<Resp, ClientError>
    where
        Req: Clone,
        F: FnMut(QuotaClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let Inner { quota, options } = &*self.0;
        // Kept here, as DEADLINE_EXCEEDED. (Not sent as grpc-timeout: the
        // server finishes a command it started whatever the caller does,
        // and tonic would report its own expiry as CANCELLED.)
        let mut once = async |request: Req| {
            tokio::time::timeout(options.deadline, send(quota.clone(), tonic::Request::new(request)))
                .await
                .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer within the deadline")))
                .map(tonic::Response::into_inner)
        };
        let mut pause = options.backoff;
        // Every attempt but the last sends a copy.
        for _ in 1..options.attempts {
            match once(request.clone()).await {
                Err(status) if unknown_outcome(status.code()) => {
                    tokio::time::sleep(pause).await;
                    pause = pause.saturating_mul(2);
                }
                answer => return answer.map_err(ClientError::from),
            }
        }
        once(request).await.map_err(ClientError::from)
    }
}

impl From<&Ask> for proto::ReserveRequest {
    fn from(ask: &Ask) -> Self {
        proto::ReserveRequest {
            account_id: ask.account.clone(),
            api_key_id: ask.api_key.clone(),
            model: ask.model.clone(),
            service_tier: ask.tier.clone(),
            request_id: ask.request_id.clone(),
            input_tokens: ask.input_tokens,
            cached_input_tokens: ask.cached_input_tokens,
            max_output_tokens: ask.max_output_tokens,
        }
    }
}

/// A reserve on its way; dropped before its answer came (its caller went
/// away), it is sent again in the background and what it grants is
/// released. Costs nothing until then: it only borrows.
struct InFlight<'a> {
    client: &'a Client,
    ask: &'a Ask,
    answered: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (client, request) = (self.client.clone(), proto::ReserveRequest::from(self.ask));
        runtime.spawn(async move {
            let account = request.account_id.clone();
            match client.reserve_request(request).await {
                Ok(r) if r.decision == proto::Decision::Allow as i32 => {
                    if let Err(e) = client.release(&account, &r.reservation_id).await {
                        tracing::warn!(%account, reservation = %r.reservation_id, error = %e, "releasing an abandoned reservation failed; its hold lapses at expiry");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(%account, error = %e, "resending an abandoned reserve failed; a hold it made lapses at expiry"),
            }
        });
    }
}

/// Codes after which the call may or may not have taken effect.
fn unknown_outcome(code: tonic::Code) -> bool {
    matches!(code, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded)
}

impl Reservation {
    /// The reservation's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Output tokens the request may generate: cap `max_tokens` to this.
    pub fn granted_output_tokens(&self) -> u64 {
        self.granted
    }

    /// The rate-limit figures at the reserve.
    pub fn limits(&self) -> Option<&proto::RateLimitStatus> {
        self.limits.as_ref()
    }

    /// The `x-ratelimit-*` response headers, as of the reserve (see
    /// [`headers`]).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        headers(self.limits.as_ref(), None)
    }

    /// Asks to generate up to `max_output_tokens` in all (a stream about
    /// to pass its grant); returns the new grant, which may be less.
    pub async fn extend(&mut self, max_output_tokens: u64) -> Result<u64, ClientError> {
        let request = proto::ExtendRequest {
            account_id: self.account.clone(),
            reservation_id: self.id.clone(),
            max_output_tokens,
        };
        let r = self
            .client
            .call(request, |mut q, r| async move { q.extend(r).await })
            .await?;
        self.granted = r.granted_output_tokens;
        Ok(self.granted)
    }

    /// Charges what the request used; returns its usage record.
    pub async fn settle(mut self, usage: proto::Usage) -> Result<proto::UsageRecord, ClientError> {
        let request = proto::SettleRequest {
            account_id: self.account.clone(),
            reservation_id: self.id.clone(),
            usage: Some(usage),
        };
        // Never released after a settle was sent, even one that failed:
        // usage may have been charged, and a release must not undo it. A
        // settle still failing after every attempt leaves the hold to the
        // account's expiry policy.
        self.done = true;
        let answer = self.client.settle_request(request).await?;
        Ok(answer.record.unwrap_or_default())
    }

    /// Gives back what the reservation holds (the request failed before
    /// producing anything billable).
    pub async fn release(mut self) -> Result<(), ClientError> {
        self.done = true;
        self.client.release(&self.account, &self.id).await
    }
}

impl Drop for Reservation {
    /// Never settled nor released: released in the background (on the
    /// runtime the drop happens in; without one, its hold lapses at its
    /// expiry).
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (client, account, id) = (self.client.clone(), self.account.clone(), self.id.clone());
        runtime.spawn(async move {
            if let Err(e) = client.release(&account, &id).await {
                tracing::warn!(%account, reservation = %id, error = %e, "releasing a dropped reservation failed; its hold lapses at expiry");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_as_openai_writes_them() {
        let cases = [
            (0, 0, "0s"),
            (0, 1, "1ms"),
            (0, 250_000_000, "250ms"),
            (1, 0, "1s"),
            (1, 500_000_000, "1.5s"),
            (59, 999_000_000, "59.999s"),
            (360, 0, "6m0s"),
            (3723, 0, "1h2m3s"),
        ];
        for (seconds, nanos, text) in cases {
            assert_eq!(go_duration(Duration::new(seconds, nanos)), text);
        }
    }

    #[test]
    fn headers_name_the_configured_limits_and_when_to_retry() {
        let limits = proto::RateLimitStatus {
            requests_limit: 2,
            requests_remaining: 0,
            requests_reset: Some(prost_types::Duration { seconds: 30, nanos: 1 }),
            ..Default::default()
        };
        let got = headers(Some(&limits), Some(Duration::from_millis(1500)));
        let want = [
            ("x-ratelimit-limit-requests", "2"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "30.001s"),
            ("retry-after", "2"),
            ("retry-after-ms", "1500"),
        ];
        assert_eq!(got, want.map(|(k, v)| (k, v.to_owned())));
        assert!(headers(Some(&proto::RateLimitStatus::default()), None).is_empty());
    }
}
