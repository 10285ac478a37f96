"""An example access_audit plugin package.

Installing this distribution registers :mod:`access_audit_eggsample.plugin`
under the ``access_audit`` entry-point group, so every
:class:`access_audit.AuditEmitter` created with ``load_entrypoints=True``
loads it without being told about it.
"""
