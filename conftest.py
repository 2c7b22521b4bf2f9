"""Chapter times under nbval: printed after the tests, and a chapter that runs past its hard limit fails.

nbval runs each cell of a chapter as one test item; a chapter's time is the sum of its items' setup,
call and teardown (the kernel's start included). The budget is 3 minutes per chapter on a 2-core CPU
(DESIGN.md, "Budgets"); machines of this kind differ in speed by up to 1.7x, so CI only fails a
chapter that takes more than :data:`CHAPTER_LIMIT_S`, which is broken rather than slow.
"""

from __future__ import annotations

import os
from collections import defaultdict

CHAPTER_BUDGET_S = 180.0
CHAPTER_LIMIT_S = float(os.environ.get("MINIS_CHAPTER_LIMIT_S", 480.0))  # the variable is for tests

_chapter_seconds: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report) -> None:
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _chapter_seconds[path] += report.duration


def _over_limit() -> list[str]:
    return [path for path, seconds in _chapter_seconds.items() if seconds > CHAPTER_LIMIT_S]


def pytest_sessionfinish(session, exitstatus) -> None:
    if _over_limit() and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter) -> None:
    if not _chapter_seconds:
        return
    terminalreporter.section("chapter times (nbval, all cells)")
    for path, seconds in sorted(_chapter_seconds.items()):
        note = ("  FAILED: over the hard limit" if seconds > CHAPTER_LIMIT_S
                else "  over the 3-minute budget" if seconds > CHAPTER_BUDGET_S else "")
        terminalreporter.write_line(f"{seconds:7.1f} s  {path}{note}")
    terminalreporter.write_line(f"{sum(_chapter_seconds.values()):7.1f} s  all chapters "
                                f"(budget {CHAPTER_BUDGET_S:.0f} s each, limit {CHAPTER_LIMIT_S:.0f} s)")
    for path in _over_limit():
        terminalreporter.write_line(f"{path} ran {_chapter_seconds[path]:.0f} s, over the {CHAPTER_LIMIT_S:.0f} s "
                                    "limit for a chapter: it is broken, not slow", red=True)
