"""An access_audit plugin that POSTs committed events to an HTTP(S) endpoint.

:class:`WebhookPlugin` sends each committed event (or each committed batch)
as JSON or CloudEvents JSON, signed per the Standard Webhooks specification
(receivers verify with ``standardwebhooks.Webhook(secret).verify``) from a
sync hook over :mod:`urllib`; :class:`AsyncWebhookPlugin` does the same from
an ``async def`` hook over pooled :mod:`httpx` connections (the ``async``
extra; httpx is imported when one is made). Installing this distribution
registers :data:`environment_plugin` under the ``access_audit`` entry-point
group as ``webhook``: it is configured by the ``ACCESS_AUDIT_WEBHOOK_*``
environment variables, and inert while ``ACCESS_AUDIT_WEBHOOK_URL`` is unset.
"""

from ._async_plugin import AsyncWebhookPlugin as AsyncWebhookPlugin
from ._plugin import DEFAULT_SOURCE as DEFAULT_SOURCE
from ._plugin import ENVIRONMENT_VARIABLES as ENVIRONMENT_VARIABLES
from ._plugin import EnvironmentWebhookPlugin as EnvironmentWebhookPlugin
from ._plugin import WebhookDeliveryError as WebhookDeliveryError
from ._plugin import WebhookPlugin as WebhookPlugin
from ._signature import SECRET_PREFIX as SECRET_PREFIX
from ._signature import sign as sign

environment_plugin = EnvironmentWebhookPlugin()
"""The entry-point plugin (``webhook``), shared by every emitter in the process."""

__all__ = [
    "DEFAULT_SOURCE",
    "ENVIRONMENT_VARIABLES",
    "SECRET_PREFIX",
    "AsyncWebhookPlugin",
    "EnvironmentWebhookPlugin",
    "WebhookDeliveryError",
    "WebhookPlugin",
    "environment_plugin",
    "sign",
]
