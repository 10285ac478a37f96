"""An access_audit plugin that POSTs committed events to an HTTP(S) endpoint.

:class:`WebhookPlugin` sends each committed event (or each committed batch)
as JSON or CloudEvents JSON, signed with HMAC-SHA256; receivers check the
signature with :func:`verify_signature`. Installing this distribution
registers :data:`environment_plugin` under the ``access_audit`` entry-point
group as ``webhook``: it is configured by the ``ACCESS_AUDIT_WEBHOOK_*``
environment variables, and inert while ``ACCESS_AUDIT_WEBHOOK_URL`` is unset.
"""

from ._plugin import DEFAULT_SOURCE as DEFAULT_SOURCE
from ._plugin import ENVIRONMENT_VARIABLES as ENVIRONMENT_VARIABLES
from ._plugin import EnvironmentWebhookPlugin as EnvironmentWebhookPlugin
from ._plugin import WebhookDeliveryError as WebhookDeliveryError
from ._plugin import WebhookPlugin as WebhookPlugin
from ._signature import sign as sign
from ._signature import verify_signature as verify_signature

environment_plugin = EnvironmentWebhookPlugin()
"""The entry-point plugin (``webhook``), shared by every emitter in the process."""

__all__ = [
    "DEFAULT_SOURCE",
    "ENVIRONMENT_VARIABLES",
    "EnvironmentWebhookPlugin",
    "WebhookDeliveryError",
    "WebhookPlugin",
    "environment_plugin",
    "sign",
    "verify_signature",
]
