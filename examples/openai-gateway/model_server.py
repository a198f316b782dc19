"""A fake model server with an OpenAI-style `/v1/chat/completions`: it
"generates" by counting ("count to 40" in the last message; anything else
gets a short greeting), streaming one to three tokens a chunk,
`MODEL_TOKEN_DELAY_MS` a token (default 2), with the running count on each
chunk if asked (vLLM's `stream_options.continuous_usage_stats`), and stops
at `max_tokens`. A last message starting "fail" gets a 500; one ending
"then fail" breaks its stream after the tokens. It keeps a prefix cache of 16-token
blocks like vLLM's and reports the cached part of a prompt as
`prompt_tokens_details.cached_tokens`. Run: `uvicorn model_server:app`."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tokens import ENCODING, chat_prompt, text_of

BLOCK = 16
# Tokens per streamed chunk, in turn: like vLLM, a chunk may carry several.
CHUNK_SIZES = (1, 2, 3)
DELAY = int(os.environ.get("MODEL_TOKEN_DELAY_MS", "2")) / 1000
cached_blocks: set[bytes] = set()


def cached_prefix(prompt: list[int]) -> int:
    """Tokens of `prompt` served from the cache (whole blocks of a prefix
    seen before, the last token always computed); caches its blocks."""
    cached, digest = 0, hashlib.sha256()
    for end in range(BLOCK, len(prompt), BLOCK):
        digest.update(json.dumps(prompt[end - BLOCK : end]).encode())
        key = digest.digest()
        if key in cached_blocks and cached == end - BLOCK:
            cached = end
        cached_blocks.add(key)
    return cached


def answer(messages: list[dict[str, Any]]) -> list[int]:
    last = text_of(messages[-1].get("content")) if messages else ""
    wanted = re.search(r"count to (\d+)", last)
    text = " ".join(str(i) for i in range(1, int(wanted.group(1)) + 1)) if wanted else "Hello from the fake model."
    return ENCODING.encode(text)


async def completions(request: Request) -> Response:
    body = await request.json()
    last = text_of(body["messages"][-1].get("content")) if body["messages"] else ""
    if last.startswith("fail"):
        return JSONResponse({"error": {"message": "the model failed"}}, status_code=500)
    prompt = chat_prompt(body["messages"])
    cached = cached_prefix(prompt)
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or 4096
    tokens = answer(body["messages"])
    finish = "length" if len(tokens) > limit else "stop"
    tokens = tokens[:limit]
    chat_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def usage(output: int) -> dict[str, Any]:
        return {
            "prompt_tokens": len(prompt),
            "completion_tokens": output,
            "total_tokens": len(prompt) + output,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {
            "id": chat_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body["model"],
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    if not body.get("stream"):
        await asyncio.sleep(DELAY * len(tokens))
        return JSONResponse(
            {
                "id": chat_id,
                "object": "chat.completion",
                "created": created,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": ENCODING.decode(tokens)},
                        "finish_reason": finish,
                    }
                ],
                "usage": usage(len(tokens)),
            }
        )

    options = body.get("stream_options") or {}

    async def stream() -> AsyncIterator[str]:
        yield f"data: {json.dumps(chunk({'role': 'assistant', 'content': ''}, None))}\n\n"
        sent = 0
        for size in itertools.cycle(CHUNK_SIZES):
            if sent == len(tokens):
                break
            await asyncio.sleep(DELAY * size)
            piece, sent = tokens[sent : sent + size], min(sent + size, len(tokens))
            event = chunk({"content": ENCODING.decode(piece)}, None)
            if options.get("continuous_usage_stats"):
                event["usage"] = usage(sent)
            yield f"data: {json.dumps(event)}\n\n"
        if last.endswith("then fail"):
            raise RuntimeError("the model failed mid-stream")
        yield f"data: {json.dumps(chunk({}, finish))}\n\n"
        if options.get("include_usage"):
            yield f"data: {json.dumps({**chunk({}, None), 'choices': [], 'usage': usage(len(tokens))})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


async def health(_: Request) -> Response:
    return Response("ok")


app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]), Route("/health", health)])
