"""Flask integration: ``AccessAudit``, the extension for Flask and Flask-SQLAlchemy.

Importing this module imports Flask; ``import access_audit`` does not.
"""

from ._extension import AccessAudit as AccessAudit

__all__ = ["AccessAudit"]
