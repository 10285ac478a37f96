"""OpenTelemetry: the trace of the span recording where an event is staged.

Nothing here imports OpenTelemetry. A span can be current only once the
application has imported ``opentelemetry.trace`` (the context holds spans
under a key that package creates), so staging looks the package up in
``sys.modules`` before anything else: with OpenTelemetry absent, or installed
but unused, one dict lookup per staged event is the whole cost, and an
application that imports it after access_audit is traced all the same.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["TRACE_KEYS", "TRACE_MODULE", "current_trace", "loaded", "traceparent"]

TRACE_MODULE = "opentelemetry.trace"
"""The module a recording span implies (see the module docstring)."""

loaded: Mapping[str, object] = sys.modules
"""Where staging looks for :data:`TRACE_MODULE`: ``TRACE_MODULE in loaded``."""

TRACE_KEYS = frozenset({"trace_id", "span_id", "trace_flags"})
"""The metadata keys :func:`current_trace` fills in. When the metadata an
event is staged with sets any of them, none is captured: the ids of one
trace stay together."""

_TRACE_ID = re.compile(r"[0-9a-f]{32}\Z")
_SPAN_ID = re.compile(r"[0-9a-f]{16}\Z")
_FLAGS = re.compile(r"[0-9a-f]{2}\Z")


def current_trace() -> dict[str, str] | None:
    """The trace of the span recording now, as W3C Trace Context hex text.

    ``{"trace_id": 32 hex digits, "span_id": 16, "trace_flags": 2}``, or
    None when OpenTelemetry was never imported, no span is current, or the
    current one is not recording (sampled out, or only propagated). Never
    raises: tracing must not make staging fail.
    """
    trace: Any = loaded.get(TRACE_MODULE)
    if trace is None:
        return None
    try:
        span = trace.get_current_span()
        if not span.is_recording():
            return None
        context = span.get_span_context()
        if not context.is_valid:
            return None
        return {
            "trace_id": format(context.trace_id, "032x"),
            "span_id": format(context.span_id, "016x"),
            "trace_flags": format(context.trace_flags, "02x"),
        }
    except Exception:  # a partly imported module, an SDK's bug: no trace
        return None


def traceparent(metadata: Mapping[str, Any]) -> str | None:
    """The W3C ``traceparent`` of an event's metadata, or None.

    ``00-<trace_id>-<span_id>-<trace_flags>`` when ``trace_id`` and
    ``span_id`` are valid W3C ids (lowercase hex, not all zeros); a missing
    or malformed ``trace_flags`` is ``00`` (not sampled: nothing says the
    trace was recorded).
    """
    trace_id = metadata.get("trace_id")
    span_id = metadata.get("span_id")
    if (
        type(trace_id) is not str
        or type(span_id) is not str
        or not _TRACE_ID.match(trace_id)
        or not _SPAN_ID.match(span_id)
        or trace_id == "0" * 32
        or span_id == "0" * 16
    ):
        return None
    flags = metadata.get("trace_flags")
    if type(flags) is not str or not _FLAGS.match(flags):
        flags = "00"
    return f"00-{trace_id}-{span_id}-{flags}"
