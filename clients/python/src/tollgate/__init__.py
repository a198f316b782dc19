"""Tollgate's client for inference servers: reserve before generating, cap
the generation to the grant, extend while streaming, settle with the real
counts, and release whatever is never settled.

    with tollgate.Client("unix:/run/tollgate/quota.sock") as tg:
        try:
            with tg.reserve(account="acme", model="llama-3.1-8b",
                            input_tokens=812, max_output_tokens=1024) as r:
                text, used = generate(max_tokens=r.granted_output_tokens)
                r.settle(output_tokens=used)
        except tollgate.Denied as denied:
            ...  # HTTP 429 with denied.headers

`AsyncClient` is the same for asyncio (`async with tg.reserve(...)`).
Every call has a deadline and is retried, as is, while its outcome is
unknown (every data-plane call is idempotent)."""

from tollgate._aio import AsyncClient, AsyncReservation, Reserving
from tollgate._common import Denied, Options, Reason, TollgateError, budget_headers, rate_limit_headers
from tollgate._sync import Client, Reservation

__all__ = [
    "AsyncClient",
    "AsyncReservation",
    "Client",
    "Denied",
    "Options",
    "Reason",
    "Reservation",
    "Reserving",
    "TollgateError",
    "budget_headers",
    "rate_limit_headers",
]
