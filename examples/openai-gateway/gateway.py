"""An OpenAI-compatible `/v1/chat/completions` in front of a model server,
metered by Tollgate through its Python client, as an inference server
integrates it:

1. count the prompt with the model's tokenizer;
2. reserve: a denial becomes the OpenAI error with `retry-after` and the
   `x-ratelimit-*` headers (and `x-should-retry: false` when waiting will not
   help); a grant caps `max_tokens`;
3. generate; a stream holds `GATEWAY_STREAM_GRANT` output tokens at a time,
   extends as it goes (counting with the model's running usage, vLLM's
   `continuous_usage_stats`), and ends with `finish_reason: length` when
   funds stop the extension;
4. settle with the model's final usage, cached prompt tokens included; a
   stream that ends early (the client disconnected, the model failed, the
   grant could not grow) is charged for the tokens relayed and the rest of
   the hold is released; a model that fails before any token releases it
   all.

Environment: `TOLLGATE_TARGET` (`unix:/PATH` or `HOST:PORT`), `MODEL_URL`,
`GATEWAY_KEYS` (JSON: bearer key -> {"account": ..., "api_key": ...}),
`GATEWAY_STREAM_GRANT` (64). Run: `uvicorn gateway:app`."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
import grpc
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

import tollgate
from tollgate import AsyncReservation, Denied, Reason, TollgateError
from tokens import ENCODING, chat_prompt

KEYS: dict[str, dict[str, str]] = json.loads(os.environ.get("GATEWAY_KEYS", "{}"))
STREAM_GRANT = int(os.environ.get("GATEWAY_STREAM_GRANT", "64"))
DEFAULT_MAX_TOKENS = 1024
PATH = "/v1/chat/completions"

# Denials as OpenAI reports them: status, error code, and whether waiting helps.
DENIALS = {
    Reason.RATE_LIMITED: (429, "rate_limit_exceeded", True),
    Reason.INSUFFICIENT_FUNDS: (429, "insufficient_quota", False),
    Reason.ACCOUNT_SUSPENDED: (403, "account_suspended", False),
    Reason.UNKNOWN_ACCOUNT: (403, "account_unknown", False),
    Reason.MODEL_NOT_ALLOWED: (403, "model_not_allowed", False),
    Reason.MODEL_NOT_PRICED: (404, "model_not_found", False),
}


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "insufficient_quota" if code == "insufficient_quota" else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def denial(denied: Denied) -> JSONResponse:
    status, code, waiting_helps = DENIALS.get(denied.reason, (403, denied.reason.value, False))
    headers = dict(denied.headers)
    if not waiting_helps:
        headers["x-should-retry"] = "false"
    return error(status, code, denied.message or denied.reason.value, headers)


async def completions(request: Request) -> Response:
    caller = KEYS.get(request.headers.get("authorization", "").removeprefix("Bearer "))
    if caller is None:
        return error(401, "invalid_api_key", "Incorrect API key provided.")
    try:
        body = await request.json()
        model, messages = body["model"], body["messages"]
        max_tokens = next(
            (body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), DEFAULT_MAX_TOKENS
        )
        if not (isinstance(model, str) and isinstance(messages, list) and messages):
            raise ValueError("model must be a string and messages a non-empty list")
        if not (isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0):
            raise ValueError("max_tokens must be a positive integer")
        # One choice is what is reserved for and what a stream can cut.
        if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
            raise ValueError("only n = 1 is served")
    except (ValueError, KeyError, TypeError) as bad:
        return error(400, "invalid_request", f"Invalid request: {bad}")
    stream = bool(body.get("stream"))
    prompt = len(chat_prompt(messages))
    # Tollgate's idempotency key, so always the gateway's own: a caller's
    # id replayed would get the first answer again, and be served free.
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    tg: tollgate.AsyncClient = request.app.state.tollgate
    try:
        reservation = await tg.reserve(
            account=caller["account"],
            api_key=caller.get("api_key", ""),
            model=model,
            request_id=request_id,
            input_tokens=prompt,
            max_output_tokens=min(max_tokens, STREAM_GRANT) if stream else max_tokens,
        )
    except Denied as denied:
        return denial(denied)
    except TollgateError as failed:
        if failed.code is grpc.StatusCode.INVALID_ARGUMENT:
            return error(400, "invalid_request", failed.details)
        return error(503, "quota_unavailable", "Quota service unavailable; try again.", {"retry-after": "1"})
    upstream = {**body, "max_tokens": max_tokens, "max_completion_tokens": None}
    model_server: httpx.AsyncClient = request.app.state.model
    if stream:
        # vLLM's continuous_usage_stats: each chunk says how many tokens
        # were generated so far (a chunk may carry several).
        upstream |= {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        try:
            answer = await model_server.send(model_server.build_request("POST", PATH, json=upstream), stream=True)
            if answer.status_code != 200:
                await answer.aclose()
                raise httpx.HTTPStatusError("the model failed", request=answer.request, response=answer)
        except BaseException as failed:
            with anyio.CancelScope(shield=True):
                await reservation.release()
            if isinstance(failed, httpx.HTTPError):
                return error(502, "model_error", f"The model server failed: {failed}")
            raise
        relay = Relay(answer, reservation, request_id, prompt, max_tokens, body)
        return Metered(relay, reservation.headers)
    async with reservation as r:
        upstream["max_tokens"] = r.granted_output_tokens
        try:
            answer = await model_server.post(PATH, json=upstream)
        except httpx.HTTPError as failed:
            return error(502, "model_error", f"The model server failed: {failed}")
        if answer.status_code != 200:
            return error(502, "model_error", f"The model server answered {answer.status_code}.")
        reply = answer.json()
        await settle(r, reply["usage"])
    reply["id"] = request_id
    return JSONResponse(reply, headers=r.headers)


async def settle(r: AsyncReservation, usage: dict[str, Any]) -> None:
    """Settles with the model's own counts; cached prompt tokens are priced
    as such."""
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    await r.settle(
        usage["completion_tokens"],
        input_tokens=usage["prompt_tokens"] - cached,
        cached_input_tokens=cached,
    )


class Relay:
    """One streamed completion: relays the model's events, keeping the
    output within the grant, and settles however the stream ends."""

    def __init__(
        self, answer: httpx.Response, r: AsyncReservation, request_id: str, prompt: int, wanted: int, body: dict[str, Any]
    ) -> None:
        self.answer, self.r, self.request_id = answer, r, request_id
        self.prompt, self.wanted = prompt, wanted
        options = body.get("stream_options") or {}
        self.show_usage = bool(options.get("include_usage"))
        self.show_running_usage = bool(options.get("continuous_usage_stats"))
        self.produced = 0
        self.usage: dict[str, Any] | None = None

    async def events(self) -> AsyncGenerator[str, None]:
        try:
            async for line in self.answer.aiter_lines():
                data = line.removeprefix("data: ")
                if not line.startswith("data: ") or data == "[DONE]":
                    continue
                event = json.loads(data)
                event["id"] = self.request_id
                if not event["choices"]:  # the final usage
                    self.usage = event.get("usage")
                    if not self.show_usage:
                        continue
                elif any(c.get("delta", {}).get("content") for c in event["choices"]):
                    total = self.generated(event)
                    if not await self.granted(total):
                        yield f"data: {json.dumps(cut(event))}\n\n"
                        break
                    self.produced = total
                if not self.show_running_usage and event["choices"]:
                    event.pop("usage", None)
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await self.finish()

    def generated(self, event: dict[str, Any]) -> int:
        """Output tokens generated up to this event: the model's running
        count, or without one the event's text counted."""
        if usage := event.get("usage"):
            return int(usage["completion_tokens"])
        text = "".join(c.get("delta", {}).get("content") or "" for c in event["choices"])
        return self.produced + len(ENCODING.encode(text, disallowed_special=()))

    async def granted(self, total: int) -> bool:
        """Whether `total` output tokens are within the grant, extending it
        (at least `STREAM_GRANT` ahead) when they are not. A failed extend
        ends the stream as funds would."""
        if total <= self.r.granted_output_tokens:
            return True
        ask = min(self.wanted, max(total, self.r.granted_output_tokens + STREAM_GRANT))
        try:
            return await self.r.extend(ask) >= total
        except TollgateError:
            return False

    async def finish(self) -> None:
        """Charges what was relayed and releases the rest, once, however
        the stream ended (to the end, cut, the client gone and this task
        being cancelled, or never started), whatever happens to the task
        meanwhile. Without the model's final usage, the prompt is charged
        as uncached."""
        with anyio.CancelScope(shield=True):
            await self.answer.aclose()
            if self.r.settled:
                return
            if self.usage is not None:
                await settle(self.r, self.usage)
            elif self.produced:
                await self.r.settle(self.produced, input_tokens=self.prompt, cached_input_tokens=0)
            else:
                await self.r.release()


def cut(event: dict[str, Any]) -> dict[str, Any]:
    """The last event of a stream the grant stopped."""
    return {**event, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], "usage": None}


class Metered(StreamingResponse):
    """A relayed stream that is always finished (settled or released),
    whether the client read to the end, left, or never got a byte."""

    def __init__(self, relay: Relay, headers: dict[str, str]) -> None:
        self.events = relay.events()
        self.relay = relay
        super().__init__(self.events, media_type="text/event-stream", headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()
                await self.relay.finish()


async def health(_: Request) -> Response:
    return Response("ok")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with (
        tollgate.AsyncClient(os.environ["TOLLGATE_TARGET"]) as app.state.tollgate,
        httpx.AsyncClient(base_url=os.environ["MODEL_URL"], timeout=60) as app.state.model,
    ):
        yield


app = Starlette(
    routes=[Route("/v1/chat/completions", completions, methods=["POST"]), Route("/health", health)],
    lifespan=lifespan,
)
