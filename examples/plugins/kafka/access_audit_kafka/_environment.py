"""The entry-point plugin: configured from ``ACCESS_AUDIT_KAFKA_*``, or nothing.

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

from ._plugin import KafkaPlugin
from ._settings import check_timeout, check_topic, parse_config

__all__ = ["ENVIRONMENT_PREFIX", "Unconfigured", "from_env"]

logger = logging.getLogger("access_audit_kafka")

ENVIRONMENT_PREFIX = "ACCESS_AUDIT_KAFKA_"
"""Prefix of the environment variables :func:`from_env` reads."""


class Unconfigured:
    """The entry-point plugin while ``ACCESS_AUDIT_KAFKA_BOOTSTRAP_SERVERS`` is unset.

    It has no hook implementation: registered, it receives nothing.
    """

    def __repr__(self) -> str:
        return (
            f"<access_audit_kafka unconfigured: {ENVIRONMENT_PREFIX}"
            "BOOTSTRAP_SERVERS is unset>"
        )


def from_env(environ: Mapping[str, str] | None = None) -> KafkaPlugin | Unconfigured:
    """A :class:`KafkaPlugin` from ``ACCESS_AUDIT_KAFKA_*`` variables.

    ``BOOTSTRAP_SERVERS`` (unset or empty: an :class:`Unconfigured`
    placeholder), ``TOPIC``, ``TIMEOUT`` (seconds), ``CONFIG`` (a JSON object
    of further librdkafka properties); each unset variable keeps the
    constructor's default.

    :param environ: where to read them; :data:`os.environ` by default.
    :raises ValueError: a variable is invalid; the message names it.
    """
    env = os.environ if environ is None else environ
    servers = env.get(ENVIRONMENT_PREFIX + "BOOTSTRAP_SERVERS", "").strip()
    if not servers:
        logger.debug(
            "%sBOOTSTRAP_SERVERS is not set: access_audit_kafka produces nothing",
            ENVIRONMENT_PREFIX,
        )
        return Unconfigured()
    parsers: dict[str, Callable[[str], Any]] = {
        "TOPIC": check_topic,
        "TIMEOUT": lambda value: check_timeout(float(value)),
        "CONFIG": parse_config,
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
        return KafkaPlugin(servers, **options)
    except ValueError as error:
        raise ValueError(f"{ENVIRONMENT_PREFIX}*: {error}") from None
