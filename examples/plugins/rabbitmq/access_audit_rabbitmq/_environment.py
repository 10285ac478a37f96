"""The entry-point plugin: configured from ``ACCESS_AUDIT_RABBITMQ_*``, or nothing.

Every ``AuditEmitter(load_entrypoints=True)`` in a process with this package
installed registers the entry point's object. Unconfigured, that object is
an :class:`Unconfigured` placeholder that implements no hook: it is never
called, costs a commit nothing, and is no recipient of outbox rows (a
plugin that merely returned would be one, and a relay without it would
report rows waiting for it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from ._plugin import RabbitMQPlugin
from ._settings import check_exchange, check_routing_key, check_timeout

__all__ = ["ENVIRONMENT_PREFIX", "Unconfigured", "from_env"]

logger = logging.getLogger("access_audit_rabbitmq")

ENVIRONMENT_PREFIX = "ACCESS_AUDIT_RABBITMQ_"
"""Prefix of the environment variables :func:`from_env` reads."""


class Unconfigured:
    """The entry-point plugin while ``ACCESS_AUDIT_RABBITMQ_URL`` is unset.

    It has no hook implementation: registered, it receives nothing.
    """

    def __repr__(self) -> str:
        return f"<access_audit_rabbitmq unconfigured: {ENVIRONMENT_PREFIX}URL is unset>"


def from_env(
    environ: Mapping[str, str] | None = None,
) -> RabbitMQPlugin | Unconfigured:
    """A :class:`RabbitMQPlugin` from ``ACCESS_AUDIT_RABBITMQ_*`` variables.

    ``URL`` (unset or empty: an :class:`Unconfigured` placeholder),
    ``EXCHANGE``, ``ROUTING_KEY``, ``TIMEOUT`` (seconds); each unset
    variable keeps the constructor's default.

    :param environ: where to read them; :data:`os.environ` by default.
    :raises ValueError: a variable is invalid; the message names it.
    """
    env = os.environ if environ is None else environ
    url = env.get(ENVIRONMENT_PREFIX + "URL", "").strip()
    if not url:
        logger.debug(
            "%sURL is not set: access_audit_rabbitmq publishes nothing",
            ENVIRONMENT_PREFIX,
        )
        return Unconfigured()
    parsers: dict[str, Callable[[str], Any]] = {
        "EXCHANGE": check_exchange,
        "ROUTING_KEY": check_routing_key,
        "TIMEOUT": lambda value: check_timeout(float(value)),
    }
    options: dict[str, Any] = {}
    for name, parse in parsers.items():
        variable = ENVIRONMENT_PREFIX + name
        if variable in env:
            try:
                options[name.lower()] = parse(env[variable])
            except ValueError as error:
                raise ValueError(f"{variable}={env[variable]!r}: {error}") from None
    try:
        return RabbitMQPlugin(url, **options)
    except ValueError as error:
        raise ValueError(f"{ENVIRONMENT_PREFIX}URL: {error}") from None
