"""What the sync and asyncio clients share: requests built from arguments,
answers read into Python values, the retry rule and the rate-limit headers.
No I/O here."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2

from tollgate.v1 import common_pb2, quota_pb2


@dataclass(frozen=True)
class Options:
    """How calls are made."""

    deadline: float = 0.5
    """Each attempt's deadline, in seconds."""
    attempts: int = 3
    """Attempts per call, the first included."""
    backoff: float = 0.025
    """The pause before the first retry, in seconds; doubled before each next one."""

    def __post_init__(self) -> None:
        if self.deadline <= 0 or self.attempts < 1 or self.backoff < 0:
            raise ValueError(f"invalid {self!r}: deadline > 0, attempts >= 1 and backoff >= 0")


# The outcome of a call that ended with these is unknown: it may or may not
# have taken effect. Every data-plane call is idempotent (by request id or
# reservation id), so it is sent again, marked as a resend.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


PREVIOUS_ATTEMPTS = "tollgate-previous-attempts"
"""The header a resend carries (gRPC's own retries set `grpc-previous-rpc-attempts`,
which a client cannot): Tollgate then answers it as the first attempt was, even
when another sidecar took that one."""


def attempt_metadata(attempt: int) -> tuple[tuple[str, str], ...]:
    """The metadata of attempt `attempt` (from 1): a resend says how many
    attempts came before it."""
    return ((PREVIOUS_ATTEMPTS, str(attempt - 1)),) if attempt > 1 else ()


def grpc_target(target: str) -> str:
    """`unix:/PATH`, `HOST:PORT` or `http://HOST:PORT`, as grpcio names it."""
    if target.startswith("https://"):
        raise ValueError(f"{target}: for TLS, pass a secure channel (channel=...)")
    return target.removeprefix("http://")


class TollgateError(Exception):
    """A call failed: bad input, an unknown reservation, or Tollgate still
    unavailable after every attempt. Denials are not errors: see `Denied`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class Reason(enum.Enum):
    """Why a request was denied."""

    INSUFFICIENT_FUNDS = "insufficient_funds"
    RATE_LIMITED = "rate_limited"
    UNKNOWN_ACCOUNT = "unknown_account"
    ACCOUNT_SUSPENDED = "account_suspended"
    MODEL_NOT_PRICED = "model_not_priced"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    BUDGET_EXCEEDED = "budget_exceeded"
    UNSPECIFIED = "unspecified"

    @classmethod
    def of(cls, value: int) -> Reason:
        name = quota_pb2.DenyReason.Name(value) if value in quota_pb2.DenyReason.values() else ""
        try:
            return cls(name.removeprefix("DENY_REASON_").lower())
        except ValueError:
            return cls.UNSPECIFIED


class Denied(Exception):
    """Tollgate said no: `reason`, and for limits that clear with time
    `retry_after` (seconds); for a used-up budget, `budget` (which, and
    when it resets). `headers` are the response headers to send:
    `x-ratelimit-*`, `retry-after` / `retry-after-ms` when known, and
    `x-budget-*` for a budget."""

    def __init__(self, response: quota_pb2.ReserveResponse) -> None:
        self.reason = Reason.of(response.deny_reason)
        super().__init__(f"{self.reason.value}: {response.message}")
        self.message = response.message
        known = response.HasField("retry_after") and seconds(response.retry_after) >= 0
        self.retry_after: float | None = seconds(response.retry_after) if known else None
        self.limit: quota_pb2.LimitRef | None = response.limit if response.HasField("limit") else None
        self.budget: quota_pb2.BudgetRef | None = response.budget if response.HasField("budget") else None
        self.headers = rate_limit_headers(response.rate_limits)
        if self.budget is not None:
            self.headers.update(budget_headers(self.budget))
        if known:
            after = millis(response.retry_after)
            self.headers["retry-after"] = str(-(-after // 1000))
            self.headers["retry-after-ms"] = str(after)
        self.response = response


@dataclass
class Grant:
    """What a reserve allowed, read from its answer."""

    account: str
    request: quota_pb2.ReserveRequest
    response: quota_pb2.ReserveResponse
    granted_output_tokens: int = field(init=False)
    headers: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.granted_output_tokens = self.response.granted_output_tokens
        self.headers = rate_limit_headers(self.response.rate_limits)

    @property
    def id(self) -> str:
        return self.response.reservation_id


class Held:
    """What a reservation shows, sync or asyncio."""

    def __init__(self, grant: Grant) -> None:
        self._grant = grant
        self._done = False

    @property
    def id(self) -> str:
        """The reservation's id."""
        return self._grant.id

    @property
    def granted_output_tokens(self) -> int:
        """Output tokens the request may generate: cap `max_tokens` to this."""
        return self._grant.granted_output_tokens

    @property
    def headers(self) -> dict[str, str]:
        """The `x-ratelimit-*` response headers, as of the reserve."""
        return dict(self._grant.headers)

    @property
    def response(self) -> quota_pb2.ReserveResponse:
        """The reserve's whole answer (expiry, price version, what is held)."""
        return self._grant.response

    @property
    def settled(self) -> bool:
        """Settled or released already (or being so)."""
        return self._done


def reserve_request(
    *,
    account: str,
    model: str,
    input_tokens: int,
    max_output_tokens: int,
    request_id: str | None,
    cached_input_tokens: int,
    api_key: str,
    tier: str,
) -> quota_pb2.ReserveRequest:
    return quota_pb2.ReserveRequest(
        account_id=account,
        api_key_id=api_key,
        model=model,
        service_tier=tier,
        request_id=request_id or uuid.uuid4().hex,
        input_tokens=input_tokens,
        cached_input_tokens=cached_input_tokens,
        max_output_tokens=max_output_tokens,
    )


def granted(account: str, request: quota_pb2.ReserveRequest, response: quota_pb2.ReserveResponse) -> Grant:
    """The grant, or `Denied`."""
    if response.decision != quota_pb2.DECISION_ALLOW:
        raise Denied(response)
    return Grant(account, request, response)


def extend_request(grant: Grant, max_output_tokens: int) -> quota_pb2.ExtendRequest:
    return quota_pb2.ExtendRequest(
        account_id=grant.account, reservation_id=grant.id, max_output_tokens=max_output_tokens
    )


def settle_request(
    grant: Grant,
    output_tokens: int,
    input_tokens: int | None,
    cached_input_tokens: int | None,
    cache_write_tokens: int,
) -> quota_pb2.SettleRequest:
    usage = common_pb2.Usage(
        input_tokens=grant.request.input_tokens if input_tokens is None else input_tokens,
        cached_input_tokens=(
            grant.request.cached_input_tokens if cached_input_tokens is None else cached_input_tokens
        ),
        cache_write_tokens=cache_write_tokens,
        output_tokens=output_tokens,
    )
    return quota_pb2.SettleRequest(account_id=grant.account, reservation_id=grant.id, usage=usage)


def release_request(grant: Grant) -> quota_pb2.ReleaseRequest:
    return quota_pb2.ReleaseRequest(account_id=grant.account, reservation_id=grant.id)


def failure(error: Any) -> TollgateError:
    """A grpcio error as a `TollgateError`."""
    return TollgateError(error.code(), error.details() or "")


def seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def rate_limit_headers(status: quota_pb2.RateLimitStatus) -> dict[str, str]:
    """The `x-ratelimit-*` headers OpenAI-compatible clients read, for the
    limits configured (a limit of zero is none, and has no headers)."""
    headers: dict[str, str] = {}
    for what, limit, remaining, reset in (
        ("requests", status.requests_limit, status.requests_remaining, status.requests_reset),
        ("tokens", status.tokens_limit, status.tokens_remaining, status.tokens_reset),
    ):
        if limit:
            headers[f"x-ratelimit-limit-{what}"] = str(limit)
            headers[f"x-ratelimit-remaining-{what}"] = str(remaining)
            headers[f"x-ratelimit-reset-{what}"] = go_duration(reset)
    return headers


def budget_headers(budget: quota_pb2.BudgetRef) -> dict[str, str]:
    """The headers that say which budget denied a request and when it has
    room again: `x-budget-scope` (`api_key` or `project`), `x-budget-id`,
    `x-budget-period`, `x-budget-limit-money` or `x-budget-limit-tokens`
    (what ran out) and `x-budget-reset` (RFC 3339). A budget resets in
    hours or days, so no `retry-after` is sent for it."""
    scope = "project" if budget.scope == quota_pb2.BUDGET_SCOPE_PROJECT else "api_key"
    headers = {"x-budget-scope": scope, "x-budget-id": budget.id, "x-budget-period": budget.period}
    if budget.HasField("money_limit"):
        headers["x-budget-limit-money"] = budget.money_limit.decimal
    else:
        headers["x-budget-limit-tokens"] = str(budget.tokens_limit)
    if budget.HasField("resets_at"):
        headers["x-budget-reset"] = budget.resets_at.ToJsonString()
    return headers


def millis(d: duration_pb2.Duration) -> int:
    """`d` in whole milliseconds, rounded up."""
    return d.seconds * 1000 + -(-d.nanos // 1_000_000)


def go_duration(d: duration_pb2.Duration) -> str:
    """A duration as OpenAI's headers write it (Go's notation, to the
    millisecond, rounded up): `0s`, `250ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`."""
    total = millis(d)
    if total <= 0:
        return "0s"
    if total < 1000:
        return f"{total}ms"
    hours, rest = divmod(total, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, fraction = divmod(rest, 1000)
    text = f"{whole}.{fraction:03d}".rstrip("0") if fraction else str(whole)
    if hours:
        return f"{hours}h{minutes}m{text}s"
    if minutes:
        return f"{minutes}m{text}s"
    return f"{text}s"
