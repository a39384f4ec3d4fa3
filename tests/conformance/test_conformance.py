"""The official MCP conformance suite, directly against the fixture and through a real gateway
process (see ``run.py``): no check that passes directly may fail through the gateway, billing is
exact and the ledger verifies clean."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_conformance_suite_passes_through_the_gateway_as_it_does_directly(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.conformance.run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    report = proc.stdout[-8000:] + proc.stderr[-4000:]
    assert proc.returncode != 2, (
        f"npm could not provide @modelcontextprotocol/conformance (is the npm registry reachable?)\n{report}"
    )
    assert proc.returncode == 0, report
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["counts"]
    # The fixture implements every server scenario: each graded check passes directly at least once.
    assert summary["failed_direct"] == [], report
    assert counts["passed through the gateway"] >= 40, report
    assert summary["regressions"] == [] and summary["problems"] == [] and summary["ledger_ok"], report


@pytest.mark.timeout(900)
def test_conformance_suite_passes_through_the_gateway_running_the_fixture_over_stdio(tmp_path: Path) -> None:
    """The same fixture, run by the gateway as a stdio server (``command:``): the same checks pass."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.conformance.run", "--stdio", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    report = proc.stdout[-8000:] + proc.stderr[-4000:]
    assert proc.returncode != 2, f"npm could not provide @modelcontextprotocol/conformance\n{report}"
    assert proc.returncode == 0, report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_direct"] == [], report
    assert summary["counts"]["passed through the gateway"] >= 40, report
    assert summary["regressions"] == [] and summary["problems"] == [] and summary["ledger_ok"], report
