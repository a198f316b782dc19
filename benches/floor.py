#!/usr/bin/env python3
"""The floor under the tenant bench's per-decision Redis figures.

Draws the bench's load (Zipf 1 over N accounts, requests spread evenly
over three sidecars, at RATE requests/s for SECONDS) and counts, per
request: how many are the first on their (account, sidecar) pair in the
idle return (10 s: a borrow is then unavoidable), and how many distinct
(account, sidecar, second) there are (a report per account and sidecar
per report interval with something to report: a commit each). Last, per
decision (two a request): the accounts touched at all, a floor under any
design that reads an account from Redis before its first decision on it
(one command each, whatever the routing and however reports are batched).

    python3 benches/floor.py N RATE SECONDS    # e.g. 100000 3400 60
"""
import bisect
import itertools
import random
import sys

n, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
rng = random.Random(1)
cumulative = list(itertools.accumulate(1 / r for r in range(1, n + 1)))
requests = int(rate * seconds)
times = sorted(rng.uniform(0, seconds) for _ in range(requests))
last, cold, reports, accounts = {}, 0, set(), set()
for t in times:
    account = bisect.bisect_left(cumulative, rng.random() * cumulative[-1])
    accounts.add(account)
    pair = (account, rng.randrange(3))
    if pair not in last or t - last[pair] > 10:
        cold += 1
    last[pair] = t
    reports.add((pair, int(t)))
print(f"N={n}: first on their pair in 10 s {cold / requests:.3f} of requests; "
      f"(account, sidecar, second) {len(reports) / requests:.3f} per request; "
      f"accounts touched {len(accounts) / (2 * requests):.3f} per decision")
