"""FastAPI integration: request metadata, the actor, and shutdown.

Importing this module imports FastAPI and Starlette; ``import access_audit``
does not.
"""

from ._actor import audit_actor as audit_actor
from ._lifespan import audit_lifespan as audit_lifespan
from ._middleware import AccessAuditMiddleware as AccessAuditMiddleware

__all__ = ["AccessAuditMiddleware", "audit_actor", "audit_lifespan"]
