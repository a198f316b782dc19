"""Turns Tollgate's alerts into emails and an automatic recharge.

Reads usage records as JSON lines on standard input and acts on each of
kind "alert" (the rest pass by):

    tollgate usage tail --redis redis://... --group alerts | python consumer.py \\
        --mail-to billing@example.com --smtp smtp.example.com:25 \\
        --recharge-below 5 --recharge-amount 50

- an alert that the money left went below --recharge-below tops the
  account up by --recharge-amount with `tollgate admin topup` (endpoint
  and token from TOLLGATE_ADMIN_ADDR and TOLLGATE_ADMIN_TOKEN_FILE, as the
  CLI reads them). The adjustment id is made of the account and the
  alert's number, so an alert read twice (a consumer restarted before
  its group acknowledged it) recharges once;
- every alert is mailed to --mail-to: through --smtp HOST:PORT, or
  written to --outbox DIR as an .eml file to hand to any mailer.

On the Redis store `usage tail --group` reads the usage stream, where each
alert is once across the fleet; on the memory store, follow the usage file
(`tail -F tollgate-usage.jsonl`)."""

from __future__ import annotations

import argparse
import json
import smtplib
import subprocess
import sys
from collections.abc import Iterable
from decimal import Decimal
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TextIO

SUBJECTS = {
    "balance_below": "money left is below {threshold}",
    "allowance_used": "{threshold}% of the allowance ({subject}) is used",
    "pack_used": "{threshold}% of pack {subject} is used",
    "budget_used": "{threshold}% of budget {subject} is used",
    "pack_expiring": "pack {subject} expires within {threshold} days",
    "debt_started": "the account is in debt",
}


def alerts(lines: Iterable[str]) -> Iterable[dict[str, Any]]:
    """The alerts among usage records, one JSON object a line."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        record = json.loads(line)
        if record.get("kind") == "alert":
            yield record


def message(alert: dict[str, Any], to: str) -> EmailMessage:
    """The email for one alert."""
    what = SUBJECTS.get(alert["alert"], alert["alert"]).format(**alert)
    mail = EmailMessage()
    mail["To"] = to
    mail["From"] = "tollgate-alerts@localhost"
    mail["Subject"] = f"{alert['account_id']}: {what}"
    mail.set_content(
        f"Account {alert['account_id']}: {what} (now {alert['value']}), at {alert['at']}.\n"
        f"Alert {alert['seq']} of the account ({alert['key']}).\n"
    )
    return mail


def recharge(alert: dict[str, Any], amount: Decimal, tollgate: str) -> None:
    """Tops the alert's account up by `amount`, once per alert."""
    account = alert["account_id"]
    subprocess.run(
        [tollgate, "admin", "topup", account, "--amount", str(amount),
         "--id", f"auto-recharge-{account}-{alert['seq']}",
         "--reason", f"auto-recharge: money left below {alert['threshold']}"],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def run(args: argparse.Namespace, lines: TextIO) -> int:
    handled = 0
    for alert in alerts(lines):
        below = alert["alert"] == "balance_below"
        if below and args.recharge_below is not None and Decimal(alert["threshold"]) == args.recharge_below:
            recharge(alert, args.recharge_amount, args.tollgate)
        if args.mail_to:
            mail = message(alert, args.mail_to)
            if args.outbox:
                name = f"{alert['account_id']}-{alert['seq']}.eml"
                (Path(args.outbox) / name).write_bytes(bytes(mail))
            else:
                host, _, port = args.smtp.partition(":")
                with smtplib.SMTP(host, int(port or 25)) as smtp:
                    smtp.send_message(mail)
        handled += 1
    return handled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mail-to", help="where alerts are mailed")
    parser.add_argument("--smtp", default="localhost:25", help="SMTP server, HOST:PORT")
    parser.add_argument("--outbox", help="write each email as an .eml file here instead of sending it")
    parser.add_argument("--recharge-below", type=Decimal, help="recharge on this balance_below threshold")
    parser.add_argument("--recharge-amount", type=Decimal, default=Decimal("0"), help="how much to top up")
    parser.add_argument("--tollgate", default="tollgate", help="the tollgate binary")
    args = parser.parse_args()
    if args.recharge_below is not None and args.recharge_amount <= 0:
        parser.error("--recharge-below needs a positive --recharge-amount")
    handled = run(args, sys.stdin)
    print(f"{handled} alerts handled", file=sys.stderr)


if __name__ == "__main__":
    main()
