"""Shared fixtures; under CI=true a skipped test fails the run (CI must run every test it selects)."""

from __future__ import annotations

import os

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Turn skips into a failure when CI=true."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(f"CI=true: {len(skipped)} test(s) were skipped; in CI a skip is a failure", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
