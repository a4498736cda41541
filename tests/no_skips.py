"""A pytest plugin for CI: with ``METRICSD_NO_SKIPS=1`` a run that skipped any test fails.

A skip is how a test says it could not check what it is for (a missing system program, say); on a
developer's machine that is fair, in CI it would hide a check that never ran. So with the variable
set, every skipped (or xfailed) test is listed at the end and the exit status becomes 1 ("tests
failed") even when everything else passed. ``.ci/run`` sets it; tests/conftest.py imports these
hooks, and tests/test_no_skips.py runs pytest on sample tests with and without it.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["pytest_runtest_logreport", "pytest_sessionfinish", "pytest_terminal_summary"]

ENV = "METRICSD_NO_SKIPS"
_skipped: list[tuple[str, str]] = []


def _active() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def _reason(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail"):
        return f"xfail: {report.wasxfail}"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append((report.nodeid, _reason(report)))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _active() and _skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not (_active() and _skipped):
        return
    terminalreporter.section(f"{ENV}=1: skipped tests fail the run", red=True, bold=True)
    for nodeid, reason in _skipped:
        terminalreporter.line(f"SKIPPED {nodeid}: {reason}", red=True)
    terminalreporter.line(f"{len(_skipped)} skipped test(s): exit status 1", red=True, bold=True)
