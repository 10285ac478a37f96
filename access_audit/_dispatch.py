"""Hand committed envelopes to plugins and receivers, each on its own.

pluggy's own hook call stops at the first implementation that raises, so each
implementation is called here one at a time; blinker's ``send`` likewise stops
at the first receiver that raises. Anything one raises is isolated, ``GeneratorExit``
and other ``BaseException`` subclasses included, except the types the caller
lets through (:data:`INTERRUPTS` by default).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import threading
import types
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

from . import signals
from ._aio import (
    AsyncPlugin,
    Failure,
    deliver_to_async_plugins,
    run_coroutine,
)
from ._logging import event_ids, logger

if TYPE_CHECKING:
    from pluggy import HookCaller, HookImpl

    from ._envelope import AuditEventEnvelope

__all__ = [
    "INTERRUPTS",
    "DeliveryReport",
    "PluginManager",
    "adeliver",
    "deliver",
    "delivering_plugins",
    "send_isolated",
]


INTERRUPTS: tuple[type[BaseException], ...] = (KeyboardInterrupt, SystemExit)
"""What delivery lets through by default: a user's Ctrl-C or a ``sys.exit()``
means stop the program, not "this plugin failed"."""

DeliveryOrder = tuple[
    list[tuple["HookImpl", bool]], list["HookImpl"], list[AsyncPlugin]
]
"""``audit_event_logged`` implementations (each with whether it takes just
``envelope``) and ``audit_events_committed`` ones, in call order, of the
plugins whose delivery hooks are all plain functions; then the plugins with an
``async def`` delivery hook, each delivered in a task of its own."""


class PluginManager(pluggy.PluginManager):
    """pluggy's plugin manager, remembering the delivery hooks' implementations in call order.

    Dispatch calls every implementation on its own, so it needs them as
    lists; this keeps them until a plugin is registered or unregistered (or
    hook specifications are added), instead of copying them on every
    commit. A list handed out is never changed afterwards, so
    a dispatch running in another thread keeps a consistent one; one that
    was being built while the plugins changed serves that dispatch only and
    is never kept.
    """

    def __init__(self, project_name: str) -> None:
        super().__init__(project_name)
        self.async_timeout: float | None = None
        """Seconds an ``async def`` plugin may take over one batch (None: no limit)."""
        self.async_timeouts: dict[str, float] = {}
        """Per plugin name, overriding :attr:`async_timeout`."""
        self._delivery_order: DeliveryOrder | None = None
        self._delivering: frozenset[str] | None = None
        self._generation = 0
        """Counts plugin changes; an order built across one is not kept."""
        self._cache_lock = threading.Lock()

    def delivery_order(self) -> DeliveryOrder:
        """:meth:`call_order` of ``audit_event_logged`` and ``audit_events_committed``, kept.

        Each ``audit_event_logged`` implementation comes with whether it takes
        exactly ``(envelope)``, so that it can be called without building
        its arguments by name.
        """
        order = self._delivery_order
        if order is None:
            generation = self._generation
            logged = self.call_order("audit_event_logged")
            committed = self.call_order("audit_events_committed")
            waiting = {
                impl.plugin_name
                for impl in (*logged, *committed)
                # unwrap(): an async def behind a functools.wraps decorator.
                if inspect.iscoroutinefunction(inspect.unwrap(impl.function))
            }
            asynchronous: list[AsyncPlugin] = []
            for name in dict.fromkeys(
                impl.plugin_name for impl in (*logged, *committed)
            ):
                if name in waiting:
                    asynchronous.append(
                        (
                            name,
                            next((i for i in logged if i.plugin_name == name), None),
                            next((i for i in committed if i.plugin_name == name), None),
                        )
                    )
            order = (
                [
                    (impl, impl.argnames == ("envelope",))
                    for impl in logged
                    if impl.plugin_name not in waiting
                ],
                [impl for impl in committed if impl.plugin_name not in waiting],
                asynchronous,
            )
            with self._cache_lock:
                if self._generation == generation:
                    self._delivery_order = order
        return order

    def call_order(self, hook_name: str) -> list[HookImpl]:
        """The implementations of *hook_name*, in the order pluggy calls them.

        pluggy calls the last registered implementation first (``tryfirst``
        and ``trylast`` already sorted in); this keeps that order.
        """
        caller: HookCaller = getattr(self.hook, hook_name)
        impls = caller.get_hookimpls()  # a copy: reversing it is safe
        impls.reverse()
        return impls

    def _forget_call_orders(self) -> None:
        # Runs after pluggy changed the implementations: an order whose
        # building began before this is not kept, one begun after sees them.
        with self._cache_lock:
            self._generation += 1
            self._delivery_order = None
            self._delivering = None

    def delivering(self) -> frozenset[str]:
        """Names of the plugins that take events (implement a delivery hook), kept."""
        names = self._delivering
        if names is None:
            generation = self._generation
            hook = self.hook
            names = frozenset(
                impl.plugin_name
                for caller in (hook.audit_event_logged, hook.audit_events_committed)
                for impl in caller.get_hookimpls()
            )
            with self._cache_lock:
                if self._generation == generation:
                    self._delivering = names
        return names

    def register(self, plugin: object, name: str | None = None) -> str | None:
        try:
            return super().register(plugin, name)
        finally:
            self._forget_call_orders()

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        try:
            return super().unregister(plugin, name)
        finally:
            self._forget_call_orders()

    def add_hookspecs(self, module_or_class: types.ModuleType | type) -> None:
        try:
            super().add_hookspecs(module_or_class)
        finally:
            self._forget_call_orders()


def _call(impl: HookImpl, arguments: dict[str, Any]) -> Any:
    return impl.function(*[arguments[name] for name in impl.argnames])


def _refuse_coroutine(
    impl: HookImpl, result: Any, envelopes: Sequence[AuditEventEnvelope]
) -> None:
    """Fail a plain ``def`` hook that returned a coroutine (or another
    awaitable that is not a scheduled task or future): the delivery is
    work that never ran (a decorator without ``functools.wraps`` hid an
    ``async def``, or the hook returns another function's coroutine).
    Counted as taken, the event would be lost; awaited here, it would block
    the caller's loop or run on another one, outside ``async_timeout``. A
    task or future it returns is already scheduled, and left to run; if it
    fails, the failure is logged with the plugin's name and the events'
    ids (the delivery was counted as taken when the hook returned).

    :raises TypeError: saying what to change.
    """
    if isinstance(result, (asyncio.Future, concurrent.futures.Future)):
        result.add_done_callback(
            functools.partial(_log_returned_failure, impl.plugin_name, envelopes)
        )
    elif inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # never awaited, on purpose: no warning
        raise TypeError(
            f"{impl.function.__qualname__} returned an awaitable, which would "
            "never run: declare the hook async def (a decorator must keep that "
            "visible: functools.wraps), or await it inside the hook"
        )


def _log_returned_failure(
    name: str,
    envelopes: Sequence[AuditEventEnvelope],
    future: asyncio.Future[Any] | concurrent.futures.Future[Any],
) -> None:
    """Log the failure of a task or future plugin *name* returned."""
    if future.cancelled() or future.exception() is None:
        return
    logger.error(
        "plugin %r returned a task that failed, for events %s",
        name,
        event_ids(envelopes),
        exc_info=future.exception(),
    )


class DeliveryReport:
    """What went wrong while delivering one batch.

    :func:`deliver` returns the shared :data:`NOTHING_FAILED` when nothing
    did: a report is made only for a batch that needs one.
    """

    __slots__ = ("errors", "failed")

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        """Every error raised, by plugins and receivers, in the order raised."""
        self.failed: dict[str, dict[uuid.UUID, BaseException]] = {}
        """Plugin name -> id of each event that plugin failed to take -> the error."""

    def _plugin_error(
        self,
        name: str,
        envelopes: Sequence[AuditEventEnvelope],
        error: BaseException,
    ) -> None:
        self.errors.append(error)
        failed = self.failed.setdefault(name, {})
        for envelope in envelopes:
            failed.setdefault(envelope.id, error)


NOTHING_FAILED = DeliveryReport()
"""The report of every batch delivered without an error; never modified."""


def _writable(report: DeliveryReport) -> DeliveryReport:
    return DeliveryReport() if report is NOTHING_FAILED else report


def delivering_plugins(plugin_manager: PluginManager) -> frozenset[str]:
    """Names of the plugins that take events (implement a delivery hook)."""
    return plugin_manager.delivering()


async def adeliver(
    plugin_manager: PluginManager,
    sender: object,
    envelopes: Sequence[AuditEventEnvelope],
    *,
    only: Collection[str] | None = None,
    send_signals: bool = True,
    let_through: tuple[type[BaseException], ...] = INTERRUPTS,
) -> DeliveryReport:
    """:func:`deliver` from a coroutine, awaiting ``async def`` plugins (and
    failure hooks) on the running loop; plain functions are called as they are.

    Cancelled while the async plugins run (its loop ending, say), it still
    delivers to the plain plugins and signal receivers, as :func:`deliver`
    does, before the cancellation goes on; the async plugins' failures are
    reported as they finish.
    """
    asynchronous = _order(plugin_manager, only)[2]
    interrupted: asyncio.CancelledError | None = None
    failures: Sequence[Failure] = ()
    if asynchronous:
        try:
            failures = await deliver_to_async_plugins(
                asynchronous,
                envelopes,
                (plugin_manager.async_timeout, plugin_manager.async_timeouts),
                functools.partial(_report_late, plugin_manager),
            )
        except asyncio.CancelledError as cancelled:
            interrupted = cancelled
    awaiting: list[Awaitable[Any]] = []
    report = deliver(
        plugin_manager,
        sender,
        envelopes,
        only=only,
        send_signals=send_signals,
        let_through=let_through,
        failures=failures,
        awaiting=awaiting,
    )
    if interrupted is not None:
        for pending in awaiting:
            _report_late_hook(pending)
        raise interrupted
    for pending in awaiting:
        try:
            await pending
        except let_through:
            raise
        except BaseException:
            logger.exception("an async audit_delivery_failed implementation raised")
    return report


def _order(
    plugin_manager: PluginManager, only: Collection[str] | None
) -> DeliveryOrder:
    """The delivery order, restricted to the plugins named in *only*."""
    logged, committed, asynchronous = plugin_manager.delivery_order()
    if only is not None:
        logged = [pair for pair in logged if pair[0].plugin_name in only]
        committed = [impl for impl in committed if impl.plugin_name in only]
        asynchronous = [plugin for plugin in asynchronous if plugin[0] in only]
    return logged, committed, asynchronous


def deliver(
    plugin_manager: PluginManager,
    sender: object,
    envelopes: Sequence[AuditEventEnvelope],
    *,
    only: Collection[str] | None = None,
    send_signals: bool = True,
    let_through: tuple[type[BaseException], ...] = INTERRUPTS,
    failures: Sequence[Failure] | None = None,
    awaiting: list[Awaitable[Any]] | None = None,
) -> DeliveryReport:
    """Send one committed batch to every plugin, then to signal receivers.

    Calls ``audit_event_logged`` per event and implementation, then
    ``audit_events_committed`` once per implementation, then the
    ``audit_event_committed`` receivers per event. Each error is logged and
    plugin errors are reported through ``audit_delivery_failed``; none stops
    the rest. ``only`` restricts delivery to the plugins of those names (a
    relay re-delivering), ``send_signals=False`` skips the receivers.

    An exception of a type in ``let_through`` is not isolated: it propagates
    at once, from a plugin, a receiver or a failure hook. The background
    worker passes ``()``: nothing it could stop belongs to the program.

    ``async def`` plugins are run through :func:`run_coroutine`, unless
    :func:`adeliver` awaited them itself and passes their ``failures``; async
    failure hooks likewise, unless ``awaiting`` collects them for the caller.
    """
    report = NOTHING_FAILED
    if only is None:
        logged, committed, asynchronous = plugin_manager.delivery_order()
    else:
        logged, committed, asynchronous = _order(plugin_manager, only)
    interrupted: BaseException | None = None
    repeats: _Repeats | None = None
    if asynchronous:
        if failures is None:
            try:
                failures = run_coroutine(
                    deliver_to_async_plugins(
                        asynchronous,
                        envelopes,
                        (plugin_manager.async_timeout, plugin_manager.async_timeouts),
                        functools.partial(_report_late, plugin_manager),
                    )
                )
            except asyncio.CancelledError as cancelled:
                # The caller was cancelled: the async plugins go on (their
                # failures reported as they finish); the rest is delivered
                # before the cancellation goes on.
                interrupted, failures = cancelled, ()
        for name, impl, taken, failed in failures:
            report = _writable(report)
            report._plugin_error(name, taken, failed)
            repeats = repeats or _Repeats()
            first = repeats.first(impl, taken)
            _plugin_failed(plugin_manager, impl, taken, failed, (), awaiting, log=first)
            if isinstance(failed, let_through) and interrupted is None:
                interrupted = failed
    for envelope in envelopes:
        for impl, takes_envelope in logged:
            try:
                if takes_envelope:
                    result = impl.function(envelope)
                else:
                    result = _call(impl, {"envelope": envelope})
                if result is not None:
                    _refuse_coroutine(impl, result, (envelope,))
            except let_through:
                raise
            except BaseException as error:
                report = _writable(report)
                report._plugin_error(impl.plugin_name, (envelope,), error)
                repeats = repeats or _Repeats()
                _plugin_failed(
                    plugin_manager,
                    impl,
                    (envelope,),
                    error,
                    let_through,
                    awaiting,
                    log=repeats.first(impl, (envelope,)),
                )
    if repeats is not None:
        repeats.log()
    for impl in committed:
        try:
            result = _call(impl, {"envelopes": envelopes})
            if result is not None:
                _refuse_coroutine(impl, result, envelopes)
        except let_through:
            raise
        except BaseException as error:
            report = _writable(report)
            report._plugin_error(impl.plugin_name, envelopes, error)
            _plugin_failed(
                plugin_manager, impl, envelopes, error, let_through, awaiting
            )
    if send_signals and signals.audit_event_committed.receivers:
        for envelope in envelopes:
            errors = send_isolated(
                signals.audit_event_committed,
                sender,
                let_through=let_through,
                envelope=envelope,
            )
            if errors:
                report = _writable(report)
                report.errors.extend(errors)
    if interrupted is not None:
        raise interrupted
    return report


class _Repeats:
    """A hook implementation failing event after event in one batch (a sink
    that is down): its first failure is logged with the traceback, the rest
    in one line, by :meth:`log`, once the batch is delivered."""

    __slots__ = ("again",)

    def __init__(self) -> None:
        self.again: dict[HookImpl, list[AuditEventEnvelope]] = {}

    def first(self, impl: HookImpl, envelopes: Sequence[AuditEventEnvelope]) -> bool:
        """Whether this failure is *impl*'s first in the batch; else it is noted."""
        again = self.again.get(impl)
        if again is None:
            self.again[impl] = []
            return True
        again.extend(envelopes)
        return False

    def log(self) -> None:
        """One line per implementation for its failures after the first."""
        for impl, again in self.again.items():
            if again:
                logger.error(
                    "plugin %r raised in %s for %s more events of the batch: %s",
                    impl.plugin_name,
                    impl.function.__name__,
                    f"{len(again):,}",
                    event_ids(again),
                )


def _report_late(plugin_manager: PluginManager, failures: list[Failure]) -> None:
    """Report the failures of async plugins that finished after their caller
    was cancelled (a done callback on the caller's loop)."""
    awaiting: list[Awaitable[Any]] = []
    for _name, impl, taken, error in failures:
        _plugin_failed(plugin_manager, impl, taken, error, (), awaiting)
    for pending in awaiting:
        _report_late_hook(pending)


def _report_late_hook(pending: Awaitable[Any]) -> None:
    """Run an async failure hook on the running loop, kept until done."""
    task = asyncio.ensure_future(pending)
    _late_reports.add(task)
    task.add_done_callback(_late_reports.discard)


_late_reports: set[asyncio.Future[Any]] = set()
"""Async failure hooks scheduled by :func:`_report_late`, kept until done."""


def send_isolated(
    signal: Any,
    sender: object,
    *,
    let_through: tuple[type[BaseException], ...] = INTERRUPTS,
    **kwargs: Any,
) -> list[BaseException]:
    """Call each receiver of a blinker signal on its own; log and return errors.

    Whatever a receiver raises is isolated, except a type in ``let_through``,
    which propagates at once.
    """
    errors: list[BaseException] = []
    receiver: Callable[..., Any]
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **kwargs)
        except let_through:
            raise
        except BaseException as error:
            errors.append(error)
            logger.error(
                "receiver %r of signal %r raised",
                getattr(receiver, "__qualname__", receiver),
                signal.name,
                exc_info=error,
            )
    return errors


def _plugin_failed(
    plugin_manager: PluginManager,
    impl: HookImpl,
    envelopes: Sequence[AuditEventEnvelope],
    error: BaseException,
    let_through: tuple[type[BaseException], ...],
    awaiting: list[Awaitable[Any]] | None = None,
    *,
    log: bool = True,
) -> None:
    name = impl.plugin_name
    if log:
        logger.error(
            "plugin %r raised in %s for events %s",
            name,
            impl.function.__name__,
            event_ids(envelopes),
            exc_info=error,
        )
    arguments = {"plugin_name": name, "envelopes": tuple(envelopes), "error": error}
    for failure_impl in plugin_manager.call_order("audit_delivery_failed"):
        try:
            result = failure_impl.function(
                *[arguments[argument] for argument in failure_impl.argnames]
            )
            if inspect.isawaitable(result):
                if awaiting is not None:
                    awaiting.append(result)
                else:
                    run_coroutine(result)
        except let_through:
            raise
        except BaseException:
            logger.exception(
                "plugin %r raised in audit_delivery_failed for events %s",
                failure_impl.plugin_name,
                event_ids(envelopes),
            )
