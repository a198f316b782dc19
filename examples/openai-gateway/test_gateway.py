"""End to end: Tollgate, the fake model server and the gateway as real
processes on loopback, driven by the official `openai` package as an
application would drive any OpenAI-compatible endpoint. Run by
`cargo test --test python` (which sets TOLLGATE_BIN), or by pytest."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import tollgate
from tollgate.testing import Sidecar
from tokens import ENCODING, chat_prompt

HERE = Path(__file__).parent
MODEL = "llama-3.1-8b"
KEYS = {
    "sk-acme": {"account": "acme", "api_key": "acme-web"},
    "sk-tight": {"account": "tight"},
    "sk-thrifty": {"account": "thrifty"},
    "sk-broke": {"account": "broke"},
}


def cost(input_tokens: int, cached: int, output: int) -> Decimal:
    """The price book's charge: 0.10, 0.05 and 0.20 per million tokens."""
    return (input_tokens * Decimal("0.10") + cached * Decimal("0.05") + output * Decimal("0.20")) / 10**6


class Uvicorn:
    """`uvicorn APP` on a free loopback port, stopped on close."""

    def __init__(self, app: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", "0"],
            cwd=HERE,
            env={**os.environ, **env},
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        self.log: list[str] = []
        for line in self.process.stderr:
            self.log.append(line)
            if running := re.search(r"Uvicorn running on (http://\S+)", line):
                self.url = running.group(1)
                break
        else:
            raise RuntimeError(f"{app} exited:\n{''.join(self.log)}")
        threading.Thread(target=lambda: self.log.extend(self.process.stderr or []), daemon=True).start()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class Stack:
    def __init__(self, sidecar: Sidecar, gateway: Uvicorn) -> None:
        self.sidecar, self.gateway = sidecar, gateway
        self.tollgate = tollgate.Client(sidecar.target)

    def openai(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.url}/v1", api_key=key, max_retries=0)

    def paid(self, account: str) -> Decimal:
        return Decimal(self.tollgate.balance(account).paid.decimal)

    def held(self, account: str) -> Decimal:
        return Decimal(self.tollgate.balance(account).held_money.decimal)

    def record(self, request_id: str) -> dict[str, Any]:
        return self.sidecar.record(request_id)


def eventually(check: Callable[[], Any], timeout: float = 10) -> Any:
    """`check()` once it neither fails an assertion nor returns False."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (result := check()) is not False:
                return result
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        assert time.monotonic() < deadline, "still False"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Sidecar((HERE / "tollgate.toml").read_text()) as sidecar:
        model = Uvicorn("model_server:app", {"MODEL_TOKEN_DELAY_MS": "2"})
        gateway = Uvicorn(
            "gateway:app",
            {"TOLLGATE_TARGET": sidecar.target, "MODEL_URL": model.url, "GATEWAY_KEYS": json.dumps(KEYS)},
        )
        stack = Stack(sidecar, gateway)
        try:
            yield stack
        finally:
            stack.tollgate.close()
            gateway.close()
            model.close()


def test_a_completion_is_counted_reserved_capped_settled_and_recorded(stack: Stack) -> None:
    messages = [{"role": "user", "content": "count to 40"}]
    before = stack.paid("acme")
    raw = stack.openai("sk-acme").chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=50  # type: ignore[arg-type]
    )
    reply = raw.parse()
    text = reply.choices[0].message.content or ""
    assert text.startswith("1 2 3") and reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(chat_prompt(messages))  # the gateway's count
    assert reply.usage.completion_tokens == 50 == len(ENCODING.encode(text))
    assert raw.headers["x-ratelimit-limit-requests"] == "1000"
    assert int(raw.headers["x-ratelimit-remaining-requests"]) < 1000
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000000"
    assert re.fullmatch(r"\d+(\.\d+)?m?s|\d+m\d+(\.\d+)?s", raw.headers["x-ratelimit-reset-tokens"])

    record = stack.record(reply.id)
    assert record["account_id"] == "acme" and record["api_key_id"] == "acme-web" and record["model"] == MODEL
    charged = cost(reply.usage.prompt_tokens, 0, 50)
    assert Decimal(record["total_money"]) == charged
    assert stack.paid("acme") == before - charged
    assert stack.held("acme") == 0


def test_a_repeated_prompt_is_charged_its_cached_tokens_at_the_cached_price(stack: Stack) -> None:
    long = "Summarise the following notes. " + " ".join(f"note {i}: all is well." for i in range(60))
    messages = [{"role": "system", "content": long}, {"role": "user", "content": "count to 5"}]
    client = stack.openai("sk-acme")
    first = client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    before = stack.paid("acme")
    second = client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None and second.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens or 0
    assert cached >= 300 and cached % 16 == 0
    fresh = second.usage.prompt_tokens - cached
    record = stack.record(second.id)
    assert record["usage"]["cached_input_tokens"] == cached and record["usage"]["input_tokens"] == fresh
    charged = cost(fresh, cached, second.usage.completion_tokens)
    assert Decimal(record["total_money"]) == charged
    assert stack.paid("acme") == before - charged


def extends(stack: Stack) -> int:
    """Extends Tollgate has granted so far."""
    page = stack.sidecar.metrics()
    found = re.search(r'^tollgate_decisions_total\{rpc="extend",outcome="allowed",reason="none"\} (\d+)', page, re.M)
    return int(found.group(1)) if found else 0


def test_a_stream_extends_its_grant_and_reports_usage(stack: Stack) -> None:
    before, extended = stack.paid("acme"), extends(stack)
    chunks = list(
        stack.openai("sk-acme").chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "count to 300"}],
            max_tokens=2000,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " ".join(str(i) for i in range(1, 301))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == len(ENCODING.encode(text)) == 599
    # 599 tokens from a first grant of 64, in steps of 64 (and chunks of
    # up to three tokens): nine extends at the least.
    assert extends(stack) - extended >= 9
    record = stack.record(chunks[0].id)
    assert record["usage"]["output_tokens"] == 599
    assert stack.paid("acme") == before - cost(usage.prompt_tokens, 0, 599)
    assert stack.held("acme") == 0


def test_a_stream_stops_where_the_funds_do(stack: Stack) -> None:
    before = stack.paid("thrifty")
    stream = stack.openai("sk-thrifty").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "count to 300"}], max_tokens=1000, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    delivered = len(ENCODING.encode(text))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert 64 < delivered < 599  # past the first grant, short of the answer
    record = stack.record(chunks[0].id)
    assert record["usage"]["output_tokens"] == delivered
    charged = Decimal(record["total_money"])
    assert charged == cost(record["usage"]["input_tokens"], 0, delivered)
    assert stack.paid("thrifty") == before - charged >= 0
    assert stack.held("thrifty") == 0


def test_a_client_leaving_mid_stream_pays_for_what_was_generated_and_no_more(stack: Stack) -> None:
    before = stack.paid("acme")
    stream = stack.openai("sk-acme").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "count to 3000"}], max_tokens=10000, stream=True
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 100:
            break
    stream.close()  # the connection goes; the gateway sees the disconnect
    record = stack.record(chunk.id)
    generated = record["usage"]["output_tokens"]
    assert 100 <= generated < 1000  # what was generated before the gateway noticed, not the 6,000 asked
    eventually(lambda: stack.held("acme") == 0)
    assert stack.paid("acme") == before - Decimal(record["total_money"])
    assert Decimal(record["total_money"]) == cost(record["usage"]["input_tokens"], 0, generated)


def test_a_failing_model_costs_nothing_or_what_it_streamed(stack: Stack) -> None:
    client = stack.openai("sk-acme")
    before, records = stack.paid("acme"), len(stack.sidecar.usage_records())
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "fail"}], stream=stream
            )
        assert failed.value.status_code == 502
    assert stack.paid("acme") == before and stack.held("acme") == 0
    assert len(stack.sidecar.usage_records()) == records  # released, not charged

    received, ids = "", set()
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "count to 30 then fail"}], stream=True
        ):
            ids.add(chunk.id)
            received += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert received == " ".join(str(i) for i in range(1, 31))
    [request_id] = ids
    record = stack.record(request_id)
    assert record["usage"]["output_tokens"] == len(ENCODING.encode(received))
    eventually(lambda: stack.held("acme") == 0)
    assert stack.paid("acme") == before - Decimal(record["total_money"])


def test_denials_are_429s_with_retry_after_and_rate_limit_headers(stack: Stack) -> None:
    client = stack.openai("sk-tight")
    ask: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    for _ in range(2):
        client.chat.completions.create(**ask)
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(**ask)
    headers = limited.value.response.headers
    assert limited.value.code == "rate_limit_exceeded"
    assert 1 <= int(headers["retry-after"]) <= 60 and int(headers["retry-after-ms"]) > 0
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-should-retry" not in headers

    with pytest.raises(openai.RateLimitError) as broke:
        stack.openai("sk-broke").chat.completions.create(**ask)
    assert broke.value.code == "insufficient_quota"
    assert broke.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in broke.value.response.headers

    with pytest.raises(openai.AuthenticationError):
        stack.openai("sk-nobody").chat.completions.create(**ask)
    with pytest.raises(openai.NotFoundError):
        stack.openai("sk-acme").chat.completions.create(**{**ask, "model": "no-such-model"})


def test_every_admitted_request_has_exactly_one_record_and_money_adds_up(stack: Stack) -> None:
    records = stack.sidecar.usage_records()
    ids = [r["request_id"] for r in records]
    assert len(ids) == len(set(ids))
    for account, start in (("acme", "10.00"), ("tight", "10.00"), ("thrifty", "0.00003")):
        spent = sum((Decimal(r["total_money"]) for r in records if r["account_id"] == account), Decimal(0))
        assert stack.paid(account) == Decimal(start) - spent, account
        assert stack.held(account) == 0
    # Denied requests leave no record.
    assert not [r for r in records if r["account_id"] == "broke"]


def test_bad_requests_are_400s_before_anything_is_reserved(stack: Stack) -> None:
    reserves = len(stack.sidecar.usage_records())
    for body in (
        {"model": MODEL, "messages": [], "max_tokens": 5},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2},  # one choice is reserved for
    ):
        answer = httpx.post(
            f"{stack.gateway.url}/v1/chat/completions", headers={"authorization": "Bearer sk-acme"}, json=body
        )
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_request", body
    assert len(stack.sidecar.usage_records()) == reserves


def test_a_replayed_request_id_is_a_new_request_not_a_free_one(stack: Stack) -> None:
    client = stack.openai("sk-acme")
    ask: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "count to 3"}]}
    before = stack.paid("acme")
    first = client.chat.completions.create(**ask, extra_headers={"x-request-id": "same"})
    second = client.chat.completions.create(**ask, extra_headers={"x-request-id": "same"})
    assert first.id != second.id
    charged = Decimal(stack.record(first.id)["total_money"]) + Decimal(stack.record(second.id)["total_money"])
    assert charged > 0 and stack.paid("acme") == before - charged
