"""Publish committed access_audit events to RabbitMQ, with publisher confirms.

:class:`RabbitMQPlugin` (a sync hook) and :class:`AsyncRabbitMQPlugin` (an
``async def`` hook) publish one persistent message per committed event,
``message_id`` = the envelope id (the key consumers de-duplicate by), and
return once the broker confirmed every event of the batch. Installing this
distribution registers :data:`plugin` under the ``access_audit`` entry-point
group (name ``rabbitmq``): a :class:`RabbitMQPlugin` configured from
``ACCESS_AUDIT_RABBITMQ_*`` environment variables when this module is first
imported, or, while ``ACCESS_AUDIT_RABBITMQ_URL`` is unset, an
:class:`Unconfigured` placeholder that implements no hook. For explicit
configuration, register a plugin of your own with ``load_entrypoints=False``::

    plugin = RabbitMQPlugin("amqp://guest:guest@127.0.0.1:5672/", routing_key="audit")
    emitter = AuditEmitter(load_entrypoints=False)
    emitter.register(plugin, name="rabbitmq")
"""

from ._async_plugin import AsyncRabbitMQPlugin as AsyncRabbitMQPlugin
from ._environment import ENVIRONMENT_PREFIX as ENVIRONMENT_PREFIX
from ._environment import Unconfigured as Unconfigured
from ._environment import from_env as from_env
from ._plugin import THREAD_NAME as THREAD_NAME
from ._plugin import RabbitMQPlugin as RabbitMQPlugin
from ._settings import PublisherSettings as PublisherSettings
from ._settings import RabbitMQPublishError as RabbitMQPublishError

__all__ = [
    "ENVIRONMENT_PREFIX",
    "THREAD_NAME",
    "AsyncRabbitMQPlugin",
    "PublisherSettings",
    "RabbitMQPlugin",
    "RabbitMQPublishError",
    "Unconfigured",
    "from_env",
    "plugin",
]

plugin: RabbitMQPlugin | Unconfigured = from_env()
"""The entry-point plugin: configured from the environment; hookless without a URL."""
