"""The asyncio client (grpc.aio)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from tollgate import _common
from tollgate._common import Grant, Held, Options
from tollgate.v1 import common_pb2, quota_pb2, quota_pb2_grpc

log = logging.getLogger("tollgate")
Reply = TypeVar("Reply")


# Releases under way (see AsyncReservation.__aexit__).
_releasing: set[asyncio.Future[None]] = set()


def _released(release: asyncio.Future[None]) -> None:
    _releasing.discard(release)
    if not release.cancelled() and (failed := release.exception()) is not None:
        log.warning("releasing a reservation failed (its hold lapses at expiry): %s", failed)


class AsyncClient:
    """`Client` for asyncio: the same calls, awaited. Use it as an async
    context manager, or `await close()`."""

    def __init__(self, target: str = "", *, options: Options = Options(), channel: Any = None) -> None:
        if channel is None and not target:
            raise ValueError("a target or a channel")
        self._owned = channel is None
        self._channel = grpc.aio.insecure_channel(_common.grpc_target(target)) if channel is None else channel
        self._stub = quota_pb2_grpc.QuotaStub(self._channel)
        self.options = options

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel (not one passed in)."""
        if self._owned:
            await self._channel.close()

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
    ) -> Reserving:
        """`Client.reserve` for asyncio: `async with tg.reserve(...) as r:`
        (released on leaving unsettled), or `r = await tg.reserve(...)`."""
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
        return Reserving(self, account, request)

    async def balance(self, account: str) -> quota_pb2.GetBalanceResponse:
        """What `account` can spend now."""
        balance: quota_pb2.GetBalanceResponse = await self._call(
            self._stub.GetBalance, quota_pb2.GetBalanceRequest(account_id=account)
        )
        return balance

    async def _call(self, method: Callable[..., Awaitable[Reply]], request: object) -> Reply:
        """`request` with a deadline, sent again while its outcome is unknown,
        marked as a resend."""
        pause = self.options.backoff
        for attempt in range(1, self.options.attempts + 1):
            try:
                return await method(
                    request, timeout=self.options.deadline, metadata=_common.attempt_metadata(attempt)
                )
            except grpc.aio.AioRpcError as error:
                if error.code() not in _common.RETRYABLE or attempt == self.options.attempts:
                    raise _common.failure(error) from error
            await asyncio.sleep(pause)
            pause *= 2
        raise AssertionError("unreachable: the last attempt returns or raises")


class Reserving:
    """A reserve about to be sent: await it, or enter it."""

    def __init__(self, client: AsyncClient, account: str, request: quota_pb2.ReserveRequest) -> None:
        self._client = client
        self._account = account
        self._request = request
        self._reservation: AsyncReservation | None = None

    async def _send(self) -> AsyncReservation:
        # In a task of its own: if this one is cancelled while the reserve
        # is in flight, the reserve still finishes, and what it granted is
        # released rather than left to lapse.
        call = asyncio.ensure_future(self._client._call(self._client._stub.Reserve, self._request))
        try:
            response: quota_pb2.ReserveResponse = await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(self._abandoned)
            raise
        return AsyncReservation(self._client, _common.granted(self._account, self._request, response))

    def _abandoned(self, call: asyncio.Future[quota_pb2.ReserveResponse]) -> None:
        """A reserve whose caller went away: releases what it granted."""
        if call.cancelled() or call.exception() is not None or call.result().decision != quota_pb2.DECISION_ALLOW:
            return
        grant = _common.granted(self._account, self._request, call.result())
        release = asyncio.ensure_future(AsyncReservation(self._client, grant).release())
        _releasing.add(release)
        release.add_done_callback(_released)

    def __await__(self) -> Generator[Any, None, AsyncReservation]:
        return self._send().__await__()

    async def __aenter__(self) -> AsyncReservation:
        self._reservation = await self._send()
        return self._reservation

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._reservation is not None:
            await self._reservation.__aexit__(kind, error, trace)


class AsyncReservation(Held):
    """`Reservation` for asyncio. Leaving its `async with` block unsettled,
    by an exception or by cancellation (the caller went away), releases
    it; the release runs to the end even if the task is cancelled again.
    A reserve cancelled while in flight still finishes, and what it granted
    is released."""

    def __init__(self, client: AsyncClient, grant: Grant) -> None:
        super().__init__(grant)
        self._client = client

    async def __aenter__(self) -> AsyncReservation:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._done:
            return
        # In a task of its own, kept until done: it finishes even if this
        # one is cancelled again (anyio cancels at every await), and its
        # failure is logged either way.
        release = asyncio.ensure_future(self.release())
        _releasing.add(release)
        release.add_done_callback(_released)
        try:
            await asyncio.shield(release)
        except _common.TollgateError:
            pass  # logged by _released

    async def extend(self, max_output_tokens: int) -> int:
        """Asks to generate up to `max_output_tokens` in all; returns the
        grant now, which is less when funds fall short."""
        response = await self._client._call(
            self._client._stub.Extend, _common.extend_request(self._grant, max_output_tokens)
        )
        self._grant.granted_output_tokens = response.granted_output_tokens
        return self._grant.granted_output_tokens

    async def settle(
        self,
        output_tokens: int,
        *,
        input_tokens: int | None = None,
        cached_input_tokens: int | None = None,
        cache_write_tokens: int = 0,
    ) -> common_pb2.UsageRecord:
        """Charges what the request used (input counts default to those
        reserved) and returns its usage record. Shielded: a cancellation
        while it runs does not leave the charge half-sent."""
        request = _common.settle_request(self._grant, output_tokens, input_tokens, cached_input_tokens, cache_write_tokens)
        self._done = True
        settled: quota_pb2.SettleResponse = await asyncio.shield(self._client._call(self._client._stub.Settle, request))
        return settled.record

    async def release(self) -> None:
        """Gives back everything held (nothing billable was produced)."""
        self._done = True
        await self._client._call(self._client._stub.Release, _common.release_request(self._grant))
