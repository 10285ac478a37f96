"""Audit events for SQLAlchemy that fire only for what really committed."""

from ._changes import changes as changes
from ._context import Actor as Actor
from ._context import audit_context as audit_context
from ._emitter import AuditEmitter as AuditEmitter
from ._envelope import AuditEventEnvelope as AuditEventEnvelope
from ._errors import AuditConfigurationError as AuditConfigurationError
from ._hookspecs import AuditEventsPluginSpec as AuditEventsPluginSpec
from ._hookspecs import hookimpl as hookimpl
from ._staged import StagedEvent as StagedEvent
from ._staging import stage_event as stage_event
from ._types import DiscardReason as DiscardReason
from ._types import DispatchMode as DispatchMode
from ._types import JoinedTransactions as JoinedTransactions
from ._types import QueueFullPolicy as QueueFullPolicy
from ._withdraw import discard_staged as discard_staged
from ._withdraw import staged_events as staged_events

__all__ = [
    "Actor",
    "AuditConfigurationError",
    "AuditEmitter",
    "AuditEventEnvelope",
    "AuditEventsPluginSpec",
    "DiscardReason",
    "DispatchMode",
    "JoinedTransactions",
    "QueueFullPolicy",
    "StagedEvent",
    "audit_context",
    "changes",
    "discard_staged",
    "hookimpl",
    "stage_event",
    "staged_events",
]
