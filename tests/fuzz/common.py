"""Shared settings for the fuzz suite.

Every Hypothesis target runs a bounded number of examples so that CI stays fast (a few seconds per
target). ``AGENTPAY_FUZZ_EXAMPLES=N`` replaces every target's budget with N for a long run, e.g.

    AGENTPAY_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/fuzz -q -p no:cacheprovider

``TRIED`` counts the inputs each target actually ran (shrinking included); the conftest prints it
in the terminal summary, so a run reports how much it tried.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import timedelta

from hypothesis import HealthCheck, settings

from gateway.errors import GatewayError

TRIED: Counter[str] = Counter()
_OVERRIDE = int(os.environ.get("AGENTPAY_FUZZ_EXAMPLES", "0") or "0")


def budget(default: int) -> int:
    """The number of examples a target runs: ``default`` in CI, the override on a long run."""
    return _OVERRIDE if _OVERRIDE > 0 else default


def fuzz(default: int = 300, *, deadline_ms: int = 2000) -> settings:
    """Settings for one target. The deadline turns a hang (or a super-linear blow-up) on one input
    into a reproducible failure instead of a stuck suite."""
    return settings(
        max_examples=budget(default),
        deadline=timedelta(milliseconds=deadline_ms),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        print_blob=True,
    )


def tried(target: str) -> None:
    TRIED[target] += 1


def assert_clear(exc: GatewayError) -> None:
    """A rejection a caller can act on: a GatewayError with a non-empty human message."""
    assert isinstance(exc, GatewayError)
    assert isinstance(exc.message, str) and exc.message.strip(), f"empty message from {type(exc).__name__}"
    assert str(exc).strip()
