"""Print how many inputs each fuzz target tried (see ``tests.fuzz.common``)."""

from __future__ import annotations

import pytest

from tests.fuzz.common import TRIED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TRIED:
        return
    terminalreporter.section("fuzz inputs tried per target")
    for target, count in sorted(TRIED.items()):
        terminalreporter.write_line(f"{target:<44} {count:>9}")
    terminalreporter.write_line(f"{'total':<44} {sum(TRIED.values()):>9}")
