"""The library's one logger; no handlers are added to it."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Protocol

__all__ = ["MAX_LOGGED_IDS", "event_ids", "logger"]

logger = logging.getLogger("access_audit")

MAX_LOGGED_IDS = 20
"""Event ids one log message lists at most: a commit of 100,000 events made
a 3.8 MB line, which log shippers truncate or drop (and the failure with it)."""


class _Identified(Protocol):
    @property
    def id(self) -> uuid.UUID: ...


def event_ids(events: Iterable[_Identified]) -> str:
    """The ids of *events* for a log message: all of up to
    :data:`MAX_LOGGED_IDS`, else that many and how many more."""
    listed: list[str] = []
    more = 0
    for event in events:
        if len(listed) < MAX_LOGGED_IDS:
            listed.append(str(event.id))
        else:
            more += 1
    text = ", ".join(listed)
    return f"{text} and {more:,} more" if more else text
