"""The client against a real `tollgate serve` (see conftest.py), over its
Unix socket with grpcio's default options and over TCP."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

import tollgate
from tollgate import AsyncClient, Client, Denied, Options, Reason, TollgateError
from tollgate._common import go_duration
from tollgate.testing import Sidecar
from tollgate.v1 import quota_pb2
from tollgate.v1.quota_pb2 import RateLimitStatus


def paid(tg: Client, account: str) -> Decimal:
    return Decimal(tg.balance(account).paid.decimal)


def test_a_reservation_extends_settles_and_charges_exactly(sidecar: Sidecar) -> None:
    with Client(sidecar.target) as tg:
        before = paid(tg, "rich")
        with tg.reserve(account="rich", model="m", input_tokens=1000, max_output_tokens=100, request_id="sync-1") as r:
            assert r.granted_output_tokens == 100
            assert r.headers["x-ratelimit-limit-tokens"] == "1000000"
            assert int(r.headers["x-ratelimit-remaining-tokens"]) <= 1000000 - 1100
            assert "x-ratelimit-limit-requests" not in r.headers  # no such limit on the plan
            assert tg.balance("rich").held_money.decimal == "0.000120000000"
            assert r.extend(300) == 300
            record = r.settle(250, input_tokens=400, cached_input_tokens=600)
        assert record.request_id == "sync-1"
        assert (record.usage.input_tokens, record.usage.cached_input_tokens, record.usage.output_tokens) == (400, 600, 250)
        # 400 x 0.10 + 600 x 0.05 + 250 x 0.20 per million.
        assert Decimal(record.total_money.decimal) == Decimal("0.00012")
        assert paid(tg, "rich") == before - Decimal("0.00012")
        assert tg.balance("rich").held_money.decimal in ("0", "0.000000000000")
    assert sidecar.record("sync-1")["total_money"] == "0.000120000000"


def test_leaving_unsettled_releases_and_a_retried_reserve_gets_the_same_answer(sidecar: Sidecar) -> None:
    with Client(sidecar.tcp_target) as tg:
        before = paid(tg, "rich")
        with pytest.raises(RuntimeError, match="model crashed"):
            with tg.reserve(account="rich", model="m", input_tokens=10, max_output_tokens=10, request_id="sync-2") as r:
                assert tg.balance("rich").held_money.decimal != "0"
                raise RuntimeError("model crashed")
        assert r.settled
        assert tg.balance("rich").held_tokens == 0
        assert tg.balance("rich").held_money.decimal in ("0", "0.000000000000")
        assert paid(tg, "rich") == before
        again = tg.reserve(account="rich", model="m", input_tokens=10, max_output_tokens=10, request_id="sync-2")
        assert again.id == r.id


def test_denials_carry_their_reason_retry_after_and_headers(sidecar: Sidecar) -> None:
    with Client(sidecar.target) as tg:
        with pytest.raises(Denied) as poor:
            tg.reserve(account="poor", model="m", input_tokens=1000, max_output_tokens=1000)
        assert poor.value.reason is Reason.INSUFFICIENT_FUNDS
        assert poor.value.retry_after is None and "retry-after" not in poor.value.headers

        for _ in range(2):
            with tg.reserve(account="tight", model="m", input_tokens=1, max_output_tokens=1) as r:
                assert r.headers["x-ratelimit-limit-requests"] == "2"
                r.settle(1)
        with pytest.raises(Denied) as tight:
            tg.reserve(account="tight", model="m", input_tokens=1, max_output_tokens=1)
        denied = tight.value
        assert denied.reason is Reason.RATE_LIMITED
        assert denied.retry_after is not None and 0 < denied.retry_after <= 60
        assert denied.headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(denied.headers["retry-after"]) <= 60
        assert int(denied.headers["retry-after-ms"]) == pytest.approx(denied.retry_after * 1000, abs=1)
        assert denied.limit is not None and denied.limit.limit == 2

        with pytest.raises(Denied) as unknown:
            tg.reserve(account="nobody", model="m", input_tokens=1, max_output_tokens=1)
        assert unknown.value.reason is Reason.UNKNOWN_ACCOUNT


def test_bad_input_is_an_error_not_a_retry(sidecar: Sidecar) -> None:
    with Client(sidecar.target) as tg:
        with pytest.raises(TollgateError) as bad:
            tg.reserve(account="has spaces", model="m", input_tokens=1, max_output_tokens=1)
        assert bad.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "account" in bad.value.details


def test_asyncio_settles_and_a_cancelled_request_gives_its_hold_back(sidecar: Sidecar) -> None:
    async def run() -> None:
        async with AsyncClient(sidecar.target) as tg:
            before = Decimal((await tg.balance("async")).paid.decimal)
            async with tg.reserve(account="async", model="m", input_tokens=1000, max_output_tokens=100) as r:
                assert await r.extend(200) == 200
                record = await r.settle(50)
            assert Decimal(record.total_money.decimal) == Decimal("0.00011")

            started = asyncio.Event()

            async def generate() -> None:
                async with tg.reserve(account="async", model="m", input_tokens=1000, max_output_tokens=1000):
                    started.set()
                    await asyncio.sleep(60)  # the caller goes away first

            task = asyncio.create_task(generate())
            await started.wait()
            assert (await tg.balance("async")).held_tokens == 0  # money holds, not tokens
            assert (await tg.balance("async")).held_money.decimal != "0.000000000000"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            balance = await tg.balance("async")
            assert balance.held_money.decimal in ("0", "0.000000000000")
            assert Decimal(balance.paid.decimal) == before - Decimal("0.00011")

            with pytest.raises(Denied) as poor:
                await tg.reserve(account="poor", model="m", input_tokens=1000, max_output_tokens=1000)
            assert poor.value.reason is Reason.INSUFFICIENT_FUNDS

    asyncio.run(run())


def test_a_silent_server_is_retried_until_the_attempts_run_out() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[tuple[socket.socket, object]] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    options = Options(deadline=0.2, attempts=3, backoff=0.05)
    start = time.monotonic()
    with Client("127.0.0.1:%d" % listener.getsockname()[1], options=options) as tg:
        with pytest.raises(TollgateError) as silent:
            tg.balance("rich")
    elapsed = time.monotonic() - start
    assert silent.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed >= 3 * 0.2 + 0.05 + 0.1
    listener.close()


def test_a_resend_is_marked_as_one() -> None:
    """A call sent again after an unknown outcome says so, as gRPC's own
    retries do: Tollgate answers it as the first attempt was answered."""
    from concurrent import futures

    from tollgate.v1 import quota_pb2, quota_pb2_grpc

    seen: list[dict[str, str]] = []

    class FailsOnce(quota_pb2_grpc.QuotaServicer):  # type: ignore[misc]
        def GetBalance(self, request: object, context: grpc.ServicerContext) -> quota_pb2.GetBalanceResponse:
            seen.append(dict(context.invocation_metadata()))
            if len(seen) == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the outcome is unknown")
            return quota_pb2.GetBalanceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    quota_pb2_grpc.add_QuotaServicer_to_server(FailsOnce(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client("127.0.0.1:%d" % port, options=Options(backoff=0.01)) as tg:
            tg.balance("rich")
    finally:
        server.stop(None)
    assert "tollgate-previous-attempts" not in seen[0]
    assert seen[1]["tollgate-previous-attempts"] == "1"


def test_durations_are_written_as_openai_writes_them() -> None:
    cases = [(0, 0, "0s"), (0, 250_000_000, "250ms"), (0, 1, "1ms"), (1, 0, "1s"), (1, 500_000_000, "1.5s"),
             (360, 0, "6m0s"), (3723, 0, "1h2m3s"), (59, 999_000_000, "59.999s")]
    for seconds, nanos, text in cases:
        assert go_duration(Duration(seconds=seconds, nanos=nanos)) == text
    assert tollgate.rate_limit_headers(RateLimitStatus()) == {}


def test_budget_headers_say_which_budget_and_when_it_resets() -> None:
    money = quota_pb2.BudgetRef(scope=quota_pb2.BUDGET_SCOPE_PROJECT, id="research", period="month")
    money.money_limit.decimal = "25"
    money.resets_at.FromJsonString("2027-01-01T05:00:00Z")
    assert tollgate.budget_headers(money) == {
        "x-budget-scope": "project",
        "x-budget-id": "research",
        "x-budget-period": "month",
        "x-budget-limit-money": "25",
        "x-budget-reset": "2027-01-01T05:00:00Z",
    }
    tokens = quota_pb2.BudgetRef(scope=quota_pb2.BUDGET_SCOPE_API_KEY, id="k1", period="day", tokens_limit=1000)
    assert tollgate.budget_headers(tokens)["x-budget-limit-tokens"] == "1000"
    assert "x-budget-reset" not in tollgate.budget_headers(tokens)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError):
        Options(attempts=0)
    with pytest.raises(ValueError):
        Client("https://example:443")


def test_the_readme_snippet_runs_as_written(sidecar: Sidecar) -> None:
    readme_file = Path(__file__).parents[3] / "README.md"
    if not readme_file.exists():
        pytest.skip("the repository's README is not here (an sdist)")
    readme = readme_file.read_text()
    section = readme[readme.index("## Integrate your inference server") :]
    snippet = section[section.index("```python\n") + len("```python\n") : section.index("```\n", section.index("```python"))]
    snippet = snippet.replace("unix:/run/tollgate/quota.sock", sidecar.target)
    replies: list[dict[str, str]] = []

    def generate(prompt: str, max_tokens: int) -> tuple[str, SimpleNamespace]:
        assert max_tokens == 1024
        return "hello", SimpleNamespace(prompt_tokens=30, cached=10, completion_tokens=7)

    def run(account: str, request_id: str) -> None:
        names = {"account": account, "request_id": request_id, "prompt": "hi", "prompt_tokens": 30}
        exec(snippet, {**names, "generate": generate, "too_many_requests": lambda headers: replies.append(headers)})

    run("rich", "readme-1")
    record = sidecar.record("readme-1")
    assert record["usage"] == {"input_tokens": 20, "cached_input_tokens": 10, "cache_write_tokens": 0, "output_tokens": 7}
    run("poor", "readme-2")
    [headers] = replies  # denied for funds: the token limit's figures, no retry-after
    assert headers["x-ratelimit-limit-tokens"] == "1000000" and "retry-after" not in headers


def decisions(sidecar: Sidecar, rpc: str) -> int:
    """Calls of `rpc` Tollgate has answered yes to."""
    found = re.search(rf'^tollgate_decisions_total\{{rpc="{rpc}",outcome="allowed",reason="none"\}} (\d+)', sidecar.metrics(), re.M)
    return int(found.group(1)) if found else 0


def test_a_reserve_cancelled_in_flight_is_released_once_it_lands(sidecar: Sidecar) -> None:
    async def run() -> None:
        async with AsyncClient(sidecar.target) as tg:
            reserves, releases = decisions(sidecar, "reserve"), decisions(sidecar, "release")

            async def generate() -> None:
                async with tg.reserve(account="async", model="m", input_tokens=10, max_output_tokens=10):
                    raise AssertionError("cancelled before the reserve answered")

            task = asyncio.create_task(generate())
            await asyncio.sleep(0)  # the reserve is on its way
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            deadline = time.monotonic() + 10
            while decisions(sidecar, "release") == releases:
                assert time.monotonic() < deadline, "the landed reserve was never released"
                await asyncio.sleep(0.02)
            assert decisions(sidecar, "reserve") == reserves + 1
            assert (await tg.balance("async")).held_money.decimal == "0.000000000000"

    asyncio.run(run())
