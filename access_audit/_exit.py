"""What must also run as a process that never runs exit handlers ends."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["before_os_exit"]


def before_os_exit(callback: Callable[..., Any], *args: Any, priority: int) -> None:
    """In a process that :mod:`multiprocessing` started by forking, run
    ``callback(*args)`` as it ends, highest *priority* first.

    Such a process ends with ``os._exit()``: the interpreter's exit
    handlers never run there, but multiprocessing's own finalizers do (a
    worker it ends with ``terminate()``, a signal, runs neither). Elsewhere
    this does nothing: the exit handlers run.
    """
    process = sys.modules.get("multiprocessing.process")
    if process is None or process.parent_process() is None:
        return
    from multiprocessing import util

    util.Finalize(None, callback, args=args, exitpriority=priority)
