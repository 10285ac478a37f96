"""The entry-point plugin: an :class:`S3Sink` configured from the environment.

The distribution registers :data:`plugin` under the ``access_audit``
entry-point group, so every ``AuditEmitter(load_entrypoints=True)`` loads it.
It reads these variables at each commit (a process may set them after
import; a change takes effect at the next commit):

``ACCESS_AUDIT_S3_BUCKET``
    The bucket. Unset or empty: the plugin is inert (no client, no network,
    no error; one debug line on the ``access_audit_s3`` logger, once).
``ACCESS_AUDIT_S3_PREFIX``
    The key prefix; default ``audit``.
``ACCESS_AUDIT_S3_GZIP``
    ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``
    (any case); default off.
``ACCESS_AUDIT_S3_ENDPOINT_URL``
    An S3-compatible endpoint instead of AWS's.

Credentials and region come from boto3's usual chain (``AWS_*`` variables,
shared config files, instance roles). A value that cannot be parsed raises
``ValueError`` from the hook, so access_audit reports it like any failed
delivery.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from access_audit import hookimpl

from ._sink import DEFAULT_PREFIX, S3Sink

if TYPE_CHECKING:
    from access_audit import AuditEventEnvelope

__all__ = ["EnvironmentS3Sink", "Settings", "plugin"]

logger = logging.getLogger("access_audit_s3")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def _flag(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"{name}={environ[name]!r} is not a boolean: use 1/true/yes/on or "
        "0/false/no/off"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """An :class:`S3Sink`'s configuration, as read from the environment."""

    bucket: str
    prefix: str = DEFAULT_PREFIX
    gzip: bool = False
    endpoint_url: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings | None:
        """Read ``ACCESS_AUDIT_S3_*``; None when no bucket is configured.

        :raises ValueError: ``ACCESS_AUDIT_S3_GZIP`` is not a boolean.
        """
        bucket = environ.get("ACCESS_AUDIT_S3_BUCKET", "").strip()
        if not bucket:
            return None
        return cls(
            bucket=bucket,
            prefix=environ.get("ACCESS_AUDIT_S3_PREFIX", DEFAULT_PREFIX),
            gzip=_flag(environ, "ACCESS_AUDIT_S3_GZIP"),
            endpoint_url=environ.get("ACCESS_AUDIT_S3_ENDPOINT_URL") or None,
        )

    def make_sink(self) -> S3Sink:
        """Build the sink these settings describe (and its boto3 client)."""
        return S3Sink(
            self.bucket,
            prefix=self.prefix,
            gzip=self.gzip,
            endpoint_url=self.endpoint_url,
        )


class EnvironmentS3Sink:
    """Delegates each batch to an :class:`S3Sink` built from the environment.

    The sink (and its boto3 client) is made at the first commit that finds a
    bucket configured, and made again only when the settings change.

    :param environ: where to read the variables; :data:`os.environ` if None.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self._lock = threading.Lock()
        self._current: tuple[Settings, S3Sink] | None = None
        self._said_inert = False

    def __repr__(self) -> str:
        return "<EnvironmentS3Sink ACCESS_AUDIT_S3_*>"

    def sink(self) -> S3Sink | None:
        """Return the sink for the current settings; None when unconfigured."""
        settings = Settings.from_environ(self.environ)
        if settings is None:
            if not self._said_inert:
                with self._lock:
                    if not self._said_inert:
                        self._said_inert = True
                        logger.debug(
                            "ACCESS_AUDIT_S3_BUCKET is not set: the s3 plugin "
                            "writes nothing"
                        )
            return None
        with self._lock:
            if self._current is None or self._current[0] != settings:
                self._current = (settings, settings.make_sink())
            return self._current[1]

    @hookimpl
    def audit_events_committed(self, envelopes: Sequence[AuditEventEnvelope]) -> None:
        """Write *envelopes* with the configured sink; do nothing if unconfigured."""
        sink = self.sink()
        if sink is not None:
            sink.audit_events_committed(envelopes)


plugin = EnvironmentS3Sink()
"""The object the ``s3`` entry point names."""
