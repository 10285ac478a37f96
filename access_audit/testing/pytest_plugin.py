"""The pytest plugin: the ``audit_events`` fixture.

Loaded through the ``pytest11`` entry point named ``access_audit``; turn it
off with ``-p no:access_audit``. Loading it imports access_audit's core (and
so SQLAlchemy, pluggy and blinker), never Flask or any sink's client library.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from access_audit.testing import AuditEventRecorder

_INI_RAISE = "audit_raise_plugin_errors"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        _INI_RAISE,
        type="bool",
        default=False,
        help="access_audit: make a plugin error raised during a test's commit "
        "fail that test instead of only being logged.",
    )


@pytest.fixture
def audit_events(request: pytest.FixtureRequest) -> Iterator[AuditEventRecorder]:
    """Audit events committed (``.events``) and discarded (``.discarded``) in this test.

    Records from every emitter in the process. Methods: ``filter()``,
    ``assert_emitted()``, ``assert_not_emitted()``, ``clear()``; see
    :class:`access_audit.testing.AuditEventRecorder`.
    """
    from access_audit.testing import capture_audit_events

    strict = bool(request.config.getini(_INI_RAISE))
    with capture_audit_events(raise_plugin_errors=strict) as recorder:
        yield recorder
