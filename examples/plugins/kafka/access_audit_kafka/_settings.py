"""What both plugins share: their settings, the record, the error.

One Kafka record per committed event:

- key: ``target_type:target_id`` (UTF-8): a target's events go to one
  partition, where Kafka keeps their order;
- value: the envelope's JSON (``AuditEventEnvelope.to_json()``);
- headers ``id`` (the envelope id, the de-duplication key) and ``type``
  (the event type).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from access_audit import AuditEventEnvelope

__all__ = ["KafkaPublishError", "ProducerSettings", "Record"]

Record = tuple[bytes, bytes, list[tuple[str, str | bytes | None]]]
"""What is produced for one event: (key, value, headers)."""

# Settings the plugin's guarantees rest on: a configuration may not change them.
_FIXED = {
    "enable.idempotence": True,
    "acks": "all",
}
# librdkafka's own names for the same settings.
_ALIASES = {
    "request.required.acks": "acks",
    "delivery.timeout.ms": "message.timeout.ms",
}


class KafkaPublishError(Exception):
    """Events of a batch were not acknowledged by Kafka (not stored, or not known to be).

    :ivar envelopes: the batch.
    :ivar envelope: its first event (in staging order) that was not delivered.
    :ivar delivered: how many of the batch's events Kafka acknowledged.
    """

    def __init__(
        self,
        message: str,
        envelopes: Sequence[AuditEventEnvelope],
        envelope: AuditEventEnvelope,
        delivered: int,
    ) -> None:
        super().__init__(message)
        self.envelopes = tuple(envelopes)
        self.envelope = envelope
        self.delivered = delivered


class ProducerSettings:
    """Where and how to produce: checked once, at construction.

    :param bootstrap_servers: ``host:port[,host:port...]`` of the cluster.
    :param topic: the topic every event goes to. The plugin creates no
        topic: create it (partitions, replication, ``min.insync.replicas``)
        beforehand, or rely on the brokers' auto-creation.
    :param timeout: seconds Kafka has to acknowledge each event, retries
        included (librdkafka's ``message.timeout.ms``): the longest a hook
        waits.
    :param config: further librdkafka producer properties (``security.protocol``,
        ``sasl.*``, ``ssl.*``, ``linger.ms``, ``compression.type``, ...). They
        may not turn off idempotence or ``acks=all``.
    :raises ValueError: an argument is invalid; the message names it.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        topic: str = "audit",
        timeout: float = 30.0,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.bootstrap_servers = check_bootstrap_servers(bootstrap_servers)
        self.topic = check_topic(topic)
        self.timeout = check_timeout(timeout)
        self.config: dict[str, Any] = check_config(config or {})
        self._setup()

    def _setup(self) -> None:
        """Called once the settings are checked: a plugin's own state, unconnected."""

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} bootstrap_servers={self.bootstrap_servers!r} "
            f"topic={self.topic!r}>"
        )

    def producer_config(self, logger: logging.Logger) -> dict[str, Any]:
        """The librdkafka configuration of the plugin's producer."""
        return {
            "client.id": "access_audit_kafka",
            # Java's partitioner for keyed records: a target lands on the
            # partition a Java or Kafka Streams producer would pick.
            "partitioner": "murmur2_random",
            **self.config,
            "bootstrap.servers": self.bootstrap_servers,
            "message.timeout.ms": round(self.timeout * 1000),
            "logger": logger,
            **_FIXED,
        }

    @staticmethod
    def record_for(envelope: AuditEventEnvelope) -> Record:
        """The record for *envelope*: key ``target_type:target_id``, headers ``id``, ``type``."""
        return (
            f"{envelope.target_type}:{envelope.target_id}".encode(),
            envelope.to_json().encode(),
            [("id", str(envelope.id).encode()), ("type", envelope.event_type.encode())],
        )

    def error(
        self,
        envelopes: Sequence[AuditEventEnvelope],
        failed: AuditEventEnvelope,
        delivered: int,
        reason: str,
    ) -> KafkaPublishError:
        """The error the hook raises: the first event not delivered, and why."""
        return KafkaPublishError(
            f"audit event {failed.id} was not acknowledged by Kafka at "
            f"{self.bootstrap_servers} (topic {self.topic!r}; {delivered} of "
            f"{len(envelopes)} events of its batch were): {reason}",
            envelopes,
            failed,
            delivered,
        )


def check_bootstrap_servers(servers: str) -> str:
    if not isinstance(servers, str) or not all(
        part.strip() and ":" in part for part in servers.split(",")
    ):
        raise ValueError(
            "bootstrap_servers must be 'host:port', or several separated by "
            f"commas, got {servers!r}"
        )
    return ",".join(part.strip() for part in servers.split(","))


def check_topic(topic: str) -> str:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    if (
        not isinstance(topic, str)
        or not 0 < len(topic) <= 249
        or not set(topic) <= allowed
        or topic in {".", ".."}
    ):
        raise ValueError(
            "topic must be 1-249 characters of letters, digits, '.', '_' and '-', "
            f"got {topic!r}"
        )
    return topic


def check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ValueError(f"timeout must be a number of seconds, got {timeout!r}")
    if not timeout >= 0.001:
        raise ValueError(f"timeout must be at least 0.001 seconds, got {timeout!r}")
    return float(timeout)


def check_config(config: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping, got {config!r}")
    checked = dict(config)
    for name, value in checked.items():
        canonical = _ALIASES.get(name, name)
        if canonical in _FIXED and str(value).lower() not in {
            str(_FIXED[canonical]).lower(),
            "-1" if canonical == "acks" else "true",
        }:
            raise ValueError(
                f"config may not set {name}={value!r}: the plugin needs an "
                "idempotent producer with acks=all"
            )
        if canonical in {"bootstrap.servers", "message.timeout.ms"}:
            raise ValueError(
                f"config may not set {name}: pass bootstrap_servers= and timeout= "
                "(seconds) instead"
            )
    return checked


def parse_config(text: str) -> dict[str, Any]:
    """A JSON object of librdkafka properties (the ``CONFIG`` variable)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object of librdkafka properties")
    return value
