"""Append committed access_audit events to a Redis stream.

:class:`RedisStreamPlugin` (a sync hook) and :class:`AsyncRedisStreamPlugin`
(an ``async def`` hook) append one entry per committed event with ``XADD``,
each committed batch in one ``MULTI``/``EXEC``, and return once Redis has
them. The entry's ``id`` field is the envelope id, the key consumers
de-duplicate by. Installing this distribution registers :data:`plugin`
under the ``access_audit`` entry-point group (name ``redis``): a
:class:`RedisStreamPlugin` configured from ``ACCESS_AUDIT_REDIS_*``
environment variables when this module is first imported, or, while
``ACCESS_AUDIT_REDIS_URL`` is unset, an :class:`Unconfigured` placeholder
that implements no hook. For explicit configuration, register a plugin of
your own with ``load_entrypoints=False``::

    plugin = RedisStreamPlugin("redis://127.0.0.1:6379/0", stream="audit")
    emitter = AuditEmitter(load_entrypoints=False)
    emitter.register(plugin, name="redis")
"""

from ._async_plugin import AsyncRedisStreamPlugin as AsyncRedisStreamPlugin
from ._environment import ENVIRONMENT_PREFIX as ENVIRONMENT_PREFIX
from ._environment import Unconfigured as Unconfigured
from ._environment import from_env as from_env
from ._plugin import RedisStreamPlugin as RedisStreamPlugin
from ._settings import RedisStreamPublishError as RedisStreamPublishError
from ._settings import StreamSettings as StreamSettings

__all__ = [
    "ENVIRONMENT_PREFIX",
    "AsyncRedisStreamPlugin",
    "RedisStreamPlugin",
    "RedisStreamPublishError",
    "StreamSettings",
    "Unconfigured",
    "from_env",
    "plugin",
]

plugin: RedisStreamPlugin | Unconfigured = from_env()
"""The entry-point plugin: configured from the environment; hookless without a URL."""
