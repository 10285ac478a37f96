"""The library's one logger; no handlers are added to it."""

from __future__ import annotations

import logging

logger = logging.getLogger("access_audit")
