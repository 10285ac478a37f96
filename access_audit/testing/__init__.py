"""Assert which audit events an operation emitted.

``capture_audit_events()`` records, while active, every envelope committed
and every staged event discarded by any emitter in the process. The pytest
plugin (``pytest_plugin``, loaded through the ``pytest11`` entry point)
offers the same recorder as the ``audit_events`` fixture.
"""

from ._recorder import AuditEventRecorder as AuditEventRecorder
from ._recorder import DiscardedEvent as DiscardedEvent
from ._recorder import capture_audit_events as capture_audit_events

__all__ = ["AuditEventRecorder", "DiscardedEvent", "capture_audit_events"]
