from __future__ import annotations

from collections.abc import Iterator

import pytest

from tollgate.testing import Sidecar

# Prices per million tokens; every account starts with what it needs.
CONFIG = """
currency = "USD"

[plans.payg.limits.account]
tokens_per_minute = 1000000

[plans.tight.limits.account]
requests_per_minute = 2

[[prices]]
id = "2026-01"
effective_at = "2026-01-01T00:00:00Z"
[prices.models."m".tiers.default]
input = "0.10"
cached_input = "0.05"
output = "0.20"
[prices.models."llama-3.1-8b".tiers.default]
input = "0.10"
cached_input = "0.05"
output = "0.20"

[[accounts]]
id = "rich"
plan = "payg"
paid = "1.00"

[[accounts]]
id = "async"
plan = "payg"
paid = "1.00"

[[accounts]]
id = "poor"
plan = "payg"
paid = "0.000001"

[[accounts]]
id = "tight"
plan = "tight"
paid = "1.00"
"""


@pytest.fixture(scope="session")
def sidecar() -> Iterator[Sidecar]:
    with Sidecar(CONFIG) as sidecar:
        yield sidecar
