"""Produce committed access_audit events to Kafka with an idempotent producer.

:class:`KafkaPlugin` (a sync hook) and :class:`AsyncKafkaPlugin` (an
``async def`` hook) produce one record per committed event to one topic,
keyed ``target_type:target_id`` (a target's events stay in order within a
partition), with the envelope id in the ``id`` header (the key consumers
de-duplicate by), and return once Kafka acknowledged every event of the
batch. Installing this distribution registers :data:`plugin` under the
``access_audit`` entry-point group (name ``kafka``): a :class:`KafkaPlugin`
configured from ``ACCESS_AUDIT_KAFKA_*`` environment variables when this
module is first imported, or, while ``ACCESS_AUDIT_KAFKA_BOOTSTRAP_SERVERS``
is unset, an :class:`Unconfigured` placeholder that implements no hook. For
explicit configuration, register a plugin of your own with
``load_entrypoints=False``::

    plugin = KafkaPlugin("broker-1:9092,broker-2:9092", topic="audit")
    emitter = AuditEmitter(load_entrypoints=False)
    emitter.register(plugin, name="kafka")
"""

from ._async_plugin import AsyncKafkaPlugin as AsyncKafkaPlugin
from ._environment import ENVIRONMENT_PREFIX as ENVIRONMENT_PREFIX
from ._environment import Unconfigured as Unconfigured
from ._environment import from_env as from_env
from ._plugin import KafkaPlugin as KafkaPlugin
from ._producer import THREAD_NAME as THREAD_NAME
from ._settings import KafkaPublishError as KafkaPublishError
from ._settings import ProducerSettings as ProducerSettings

__all__ = [
    "ENVIRONMENT_PREFIX",
    "THREAD_NAME",
    "AsyncKafkaPlugin",
    "KafkaPlugin",
    "KafkaPublishError",
    "ProducerSettings",
    "Unconfigured",
    "from_env",
    "plugin",
]

plugin: KafkaPlugin | Unconfigured = from_env()
"""The entry-point plugin: configured from the environment; hookless without servers."""
