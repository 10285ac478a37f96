"""Publish committed access_audit events to NATS JetStream.

Installing this distribution registers :data:`plugin` under the
``access_audit`` entry-point group (name ``nats``): every
:class:`access_audit.AuditEmitter` created with ``load_entrypoints=True``
loads it. :data:`plugin` is configured from ``ACCESS_AUDIT_NATS_*``
environment variables when this module is first imported, and is inert (its
hook returns at once, with no connection) while ``ACCESS_AUDIT_NATS_URL`` is
unset. The hook is ``async def``: it publishes on the loop access_audit
awaits it on, with one connection per loop. For explicit configuration,
register a :class:`JetStreamPublisher` of your own with
``load_entrypoints=False``::

    publisher = JetStreamPublisher("nats://127.0.0.1:4222", subject_prefix="audit")
    emitter = AuditEmitter([publisher], load_entrypoints=False)
    ...
    await publisher.aclose()  # at shutdown, in your loop; close() from sync code
"""

from ._publisher import ENVIRONMENT_PREFIX as ENVIRONMENT_PREFIX
from ._publisher import JetStreamPublisher as JetStreamPublisher
from ._publisher import JetStreamPublishError as JetStreamPublishError

__all__ = [
    "ENVIRONMENT_PREFIX",
    "JetStreamPublishError",
    "JetStreamPublisher",
    "plugin",
]

plugin: JetStreamPublisher = JetStreamPublisher.from_env()
"""The entry-point plugin: configured from the environment; inert without a URL."""
