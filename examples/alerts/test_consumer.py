"""End to end: a real Tollgate with alert thresholds, spent past them, its
usage file piped into the consumer: the account is recharged once, however
often the alerts are read, and every alert becomes an email. Run by
`cargo test --test python` (which sets TOLLGATE_BIN), or by pytest."""

from __future__ import annotations

import email
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import tollgate
from tollgate.testing import Sidecar

HERE = Path(__file__).parent
TOKEN = "tg_test_write"
CONFIG = """
[[admin.tokens]]
operator = "billing-bot"
role = "write"
sha256 = "79a8639ebf26530f4bc031484a4e1ef1ee755cde16461ba68052abc53421301c"

[plans.payg.alerts]
balance_below = ["9", "5"]

[[prices]]
id = "v1"
effective_at = "2026-01-01T00:00:00Z"
[prices.models.m.tiers.default]
input = "1000"
output = "1000"

[[accounts]]
id = "acme"
plan = "payg"
paid = "10"
"""


def spend(tg: tollgate.Client, request_id: str, tokens: int) -> None:
    """`tokens` input tokens of `m`, at 0.001 each."""
    with tg.reserve(account="acme", request_id=request_id, model="m", input_tokens=tokens,
                    max_output_tokens=1) as r:
        r.settle(0, input_tokens=tokens)


def consume(sidecar: Sidecar, outbox: Path) -> str:
    binary = os.environ.get("TOLLGATE_BIN", "tollgate")
    token = sidecar.directory / "bot.token"
    token.write_text(TOKEN)
    token.chmod(0o400)
    lines = (sidecar.directory / "tollgate-usage.jsonl").read_text()
    done = subprocess.run(
        [sys.executable, str(HERE / "consumer.py"), "--mail-to", "billing@example.com",
         "--outbox", str(outbox), "--recharge-below", "5", "--recharge-amount", "20", "--tollgate", binary],
        input=lines, capture_output=True, text=True, check=False,
        env={**os.environ, "TOLLGATE_ADMIN_ADDR": f"http://{sidecar.admin_target}", "TOLLGATE_ADMIN_TOKEN_FILE": str(token)},
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_alerts_become_emails_and_one_recharge(tmp_path: Path) -> None:
    with Sidecar(CONFIG) as sidecar, tollgate.Client(sidecar.target) as tg:
        spend(tg, "r1", 2000)  # 8 left: below 9
        spend(tg, "r2", 4000)  # 4 left: below 5
        tg.balance("acme")
        assert consume(sidecar, tmp_path).strip() == "2 alerts handled"
        assert Decimal(tg.balance("acme").paid.decimal) == Decimal("24")  # 4 left, and 20
        # Read again (a consumer restarted before acknowledging): no second recharge.
        consume(sidecar, tmp_path)
        assert Decimal(tg.balance("acme").paid.decimal) == Decimal("24")
    mails = sorted(tmp_path.glob("*.eml"))
    assert [m.name for m in mails] == ["acme-1.eml", "acme-2.eml"]
    subject = email.message_from_bytes(mails[1].read_bytes())["Subject"]
    assert subject == "acme: money left is below 5.000000000000"
