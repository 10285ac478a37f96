"""Fixtures of the access-audit-kafka tests: librdkafka's mock cluster, a topic.

No Kafka server is needed: one mock cluster (``test.mock.num.brokers``,
see kafka_support.py) serves the run, and each test produces to a topic of
its own.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest
from kafka_support import MockCluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[MockCluster]:
    """The run's mock cluster."""
    started = MockCluster()
    yield started
    started.close()


@pytest.fixture
def topic() -> str:
    """A topic name of the test's own (auto-created at first use)."""
    return f"access_audit_test.{uuid.uuid4().hex}"


@pytest.fixture
def dead_servers() -> str:
    """Bootstrap servers on a local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"
