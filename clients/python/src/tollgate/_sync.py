"""The blocking client."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import grpc

from tollgate import _common
from tollgate._common import Grant, Held, Options
from tollgate.v1 import common_pb2, quota_pb2, quota_pb2_grpc

log = logging.getLogger("tollgate")
Reply = TypeVar("Reply")


class Client:
    """A Tollgate data plane at `target` (`unix:/PATH`, `HOST:PORT` or
    `http://HOST:PORT`), or on `channel` (TLS, custom options). Use it as a
    context manager, or `close()` it."""

    def __init__(self, target: str = "", *, options: Options = Options(), channel: Any = None) -> None:
        if channel is None and not target:
            raise ValueError("a target or a channel")
        self._owned = channel is None
        self._channel = grpc.insecure_channel(_common.grpc_target(target)) if channel is None else channel
        self._stub = quota_pb2_grpc.QuotaStub(self._channel)
        self.options = options

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel (not one passed in)."""
        if self._owned:
            self._channel.close()

    def reserve(
        self,
        *,
        account: str,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        request_id: str | None = None,
        cached_input_tokens: int = 0,
        api_key: str = "",
        tier: str = "",
    ) -> Reservation:
        """Holds the worst case of a request, or raises `Denied`. Use the
        answer as a context manager: it is released on leaving unsettled.
        `request_id` (a new one if not given) makes a retry of the same
        request get the same answer."""
        request = _common.reserve_request(
            account=account,
            model=model,
            input_tokens=input_tokens,
            max_output_tokens=max_output_tokens,
            request_id=request_id,
            cached_input_tokens=cached_input_tokens,
            api_key=api_key,
            tier=tier,
        )
        response = self._call(self._stub.Reserve, request)
        return Reservation(self, _common.granted(account, request, response))

    def balance(self, account: str) -> quota_pb2.GetBalanceResponse:
        """What `account` can spend now."""
        balance: quota_pb2.GetBalanceResponse = self._call(
            self._stub.GetBalance, quota_pb2.GetBalanceRequest(account_id=account)
        )
        return balance

    def _call(self, method: Callable[..., Reply], request: object) -> Reply:
        """`request` with a deadline, sent again while its outcome is unknown,
        marked as a resend."""
        pause = self.options.backoff
        for attempt in range(1, self.options.attempts + 1):
            try:
                return method(
                    request, timeout=self.options.deadline, metadata=_common.attempt_metadata(attempt)
                )
            except grpc.RpcError as error:
                if error.code() not in _common.RETRYABLE or attempt == self.options.attempts:
                    raise _common.failure(error) from error
            time.sleep(pause)
            pause *= 2
        raise AssertionError("unreachable: the last attempt returns or raises")


class Reservation(Held):
    """Funds and permits held for one request. Cap the generation to
    `granted_output_tokens`, `extend` it while streaming, and `settle` with
    what was used. Leaving its `with` block unsettled (an exception, an
    early return) releases it."""

    def __init__(self, client: Client, grant: Grant) -> None:
        super().__init__(grant)
        self._client = client

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._done:
            return
        try:
            self.release()
        except _common.TollgateError as failed:
            log.warning("releasing reservation %s failed (its hold lapses at expiry): %s", self.id, failed)

    def extend(self, max_output_tokens: int) -> int:
        """Asks to generate up to `max_output_tokens` in all; returns the
        grant now, which is less when funds fall short."""
        response = self._client._call(self._client._stub.Extend, _common.extend_request(self._grant, max_output_tokens))
        self._grant.granted_output_tokens = response.granted_output_tokens
        return self._grant.granted_output_tokens

    def settle(
        self,
        output_tokens: int,
        *,
        input_tokens: int | None = None,
        cached_input_tokens: int | None = None,
        cache_write_tokens: int = 0,
    ) -> common_pb2.UsageRecord:
        """Charges what the request used (input counts default to those
        reserved) and returns its usage record."""
        request = _common.settle_request(self._grant, output_tokens, input_tokens, cached_input_tokens, cache_write_tokens)
        # Never released once a settle is sent, even one that fails: usage
        # may have been charged, and a release must not undo it.
        self._done = True
        settled: quota_pb2.SettleResponse = self._client._call(self._client._stub.Settle, request)
        return settled.record

    def release(self) -> None:
        """Gives back everything held (nothing billable was produced)."""
        self._done = True
        self._client._call(self._client._stub.Release, _common.release_request(self._grant))
