"""``AuditEmitter``: plugins, settings, and the sessions it is attached to."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import os
import time
import types
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import pluggy
from sqlalchemy import Connection
from sqlalchemy.util import greenlet_spawn

from . import signals
from ._background import BackgroundDispatcher, running_loop
from ._context import ActorResolver, MetadataProvider
from ._dispatch import (
    DeliveryReport,
    PluginManager,
    adeliver,
    deliver,
    delivering_plugins,
    send_isolated,
)
from ._errors import AuditConfigurationError
from ._hookspecs import PROJECT_NAME, AuditEventsPluginSpec
from ._imports import plugin_from
from ._listeners import SessionListeners
from ._logging import event_ids, logger
from ._loop_dispatch import Job, LoopDispatcher
from ._registry import (
    AttachTarget,
    attached_to_instance,
    disown,
    listen_target,
    own,
    refuse_sharding,
    spans_databases,
)
from ._types import (
    DISPATCH_MODES,
    JOINED_TRANSACTIONS,
    QUEUE_FULL_POLICIES,
    DiscardReason,
    DispatchMode,
    JoinedTransactions,
    QueueFullPolicy,
)
from ._values import PayloadRules, check_text

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
    from sqlalchemy.orm import Session

    from ._envelope import AuditEventEnvelope
    from ._owner import DeliveryStore
    from ._staged import StagedEvent

__all__ = ["AuditEmitter", "raising_plugin_errors"]

_unraised: list[list[BaseException]] = []
"""One list per open :func:`raising_plugin_errors` block (a test recorder
asking every emitter to raise plugin errors), of the plugin errors that
background and asyncio dispatch had nobody to raise to."""


@contextlib.contextmanager
def raising_plugin_errors() -> Iterator[list[BaseException]]:
    """Act as if every emitter had ``raise_plugin_errors=True`` inside the block.

    For test runs (``access_audit.testing``): a plugin bug fails the test
    that triggered it instead of only being logged. Process-wide. Yields
    the list of the errors that could not be raised (background and
    asyncio dispatch deliver after ``commit()`` returned), for the caller
    to raise when the block ends.
    """
    errors: list[BaseException] = []
    _unraised.append(errors)
    try:
        yield errors
    finally:
        _unraised.remove(errors)


def _keep_unraised(errors: Sequence[BaseException]) -> None:
    """Hand *errors*, raised where nobody waits, to the strict blocks open."""
    for kept in list(_unraised):
        kept.extend(errors)


class AuditEmitter:
    """Turns events staged on attached sessions into committed envelopes.

    :param plugins: plugin objects (modules, classes or instances with
        :data:`~access_audit.hookimpl` functions) registered at once.
    :param load_entrypoints: also register the plugins of installed packages
        that declare an ``access_audit`` entry point.
    :param actor_resolver: called by :func:`~access_audit.stage_event` when the
        call names no actor and no :func:`~access_audit.audit_context` does;
        returns an :class:`~access_audit.Actor`, an ``(id, email)`` tuple or
        None (then the actor is ``"system"``).
    :param metadata_provider: called at stage time; returns a mapping merged
        under the context's and the call's metadata, or None.
    :param redact_keys: key names (any case) whose values in payload and
        metadata, at any depth, become ``"[REDACTED]"`` when an event is
        staged, before any plugin, receiver or the outbox sees it. A redacted
        lazy value is never called.
    :param max_payload_bytes: the largest payload, measured as compact UTF-8
        JSON (as the outbox stores it: through orjson where the ``fast``
        extra is installed, which spells some floats a byte shorter or
        longer than the standard library); a larger one fails ``stage_event``
        (or, when lazy values make it larger, the commit, before COMMIT)
        with ``ValueError``. With an ``outbox``, its own
        ``max_payload_bytes`` applies too (the lower of the two wins).
    :param dispatch: ``"inline"`` delivers in the committing thread before
        ``commit()`` returns (``await session.commit()`` of an AsyncSession
        also awaits the ``async def`` plugins); ``"background"`` queues the
        batch for a worker thread and returns at once (see :meth:`flush` and
        :meth:`close`); ``"asyncio"`` queues it for a task on the running
        event loop (see :meth:`aflush` and :meth:`aclose`; a commit made with
        no running loop delivers inline); ``"relay"`` (with an ``outbox``)
        only writes the outbox rows, and the relay delivers them to plugins
        (blinker receivers still get each commit's signals).
    :param async_timeout: the seconds an ``async def`` plugin may take over
        one batch; one that takes longer is cancelled and reported through
        ``audit_delivery_failed`` with a :class:`TimeoutError`. None: no limit.
    :param async_timeouts: per plugin name, overriding ``async_timeout``.
    :param outbox: an :class:`~access_audit.outbox.Outbox`: envelopes are
        also written to its table inside the committing transaction and
        marked delivered per plugin, for at-least-once delivery with a relay.
    :param queue_size: background dispatch: the most batches queued.
    :param queue_full: background dispatch with a full queue: ``"block"``
        the committing thread until there is room, or ``"drop"`` the batch
        and count it in :attr:`dropped` (only with an outbox).
    :param joined_transactions: for a session joined to a transaction it
        does not end itself (bound to a connection that was in a transaction
        already, in any ``join_transaction_mode`` but ``"control_fully"``;
        sessions sharing one connection): ``"outer"`` holds its committed
        events until that outer transaction commits (delivered then, once)
        or rolls back (discarded, reason ``"rollback"``), and refuses
        staging where that ending cannot be observed (a SAVEPOINT the
        session did not open encloses it); ``"session"`` delivers them on
        the session's own ``commit()``, for rollback-per-test suites.
    :param raise_plugin_errors: strict mode for tests. After every plugin and
        receiver ran, the first error one raised is raised out of the
        ``commit()``; the data is committed and the session is clean.
    """

    def __init__(
        self,
        plugins: Iterable[object] = (),
        *,
        load_entrypoints: bool = True,
        actor_resolver: ActorResolver | None = None,
        metadata_provider: MetadataProvider | None = None,
        raise_plugin_errors: bool = False,
        redact_keys: Iterable[str] = (),
        max_payload_bytes: int | None = None,
        dispatch: DispatchMode = "inline",
        outbox: DeliveryStore | None = None,
        queue_size: int = 10_000,
        queue_full: QueueFullPolicy = "block",
        joined_transactions: JoinedTransactions = "outer",
        async_timeout: float | None = None,
        async_timeouts: Mapping[str, float] | None = None,
    ) -> None:
        _check_choice("dispatch", dispatch, DISPATCH_MODES)
        _check_choice("joined_transactions", joined_transactions, JOINED_TRANSACTIONS)
        _check_choice("queue_full", queue_full, QUEUE_FULL_POLICIES)
        if dispatch == "relay" and outbox is None:
            raise ValueError(
                "dispatch='relay' leaves delivery to the outbox's relay; pass "
                "outbox=Outbox(...) too"
            )
        if queue_full == "drop" and outbox is None:
            raise ValueError(
                "queue_full='drop' loses events without an outbox to re-deliver "
                "them; pass outbox=Outbox(...) or use queue_full='block'"
            )
        self.plugin_manager = PluginManager(PROJECT_NAME)
        """The :class:`pluggy.PluginManager` holding this emitter's plugins."""
        self.plugin_manager.add_hookspecs(AuditEventsPluginSpec)
        self.plugin_manager.async_timeout = async_timeout
        self.plugin_manager.async_timeouts = dict(async_timeouts or {})
        self.actor_resolver = actor_resolver
        self.metadata_provider = metadata_provider
        self.raise_plugin_errors = raise_plugin_errors
        self._joined_transactions: JoinedTransactions = joined_transactions
        """``"outer"`` or ``"session"``: see the constructor. Tests that roll
        every test back may set it to ``"session"``."""
        self.payload_rules = PayloadRules.build(
            redact_keys,
            _payload_limit(max_payload_bytes, outbox),
            getattr(outbox, "max_payload_bytes", None),
        )
        """``redact_keys`` and ``max_payload_bytes``, as staging applies them."""
        self.outbox: DeliveryStore | None = outbox
        """The :class:`~access_audit.outbox.Outbox` events are written to, or None."""
        self._background = (
            BackgroundDispatcher(queue_size, queue_full)
            if dispatch == "background"
            else None
        )
        if self._background is not None:
            # An emitter no one uses any more (an app per test) takes its
            # worker thread with it.
            weakref.finalize(self, self._background.stop)
        self._on_loop = (
            LoopDispatcher(queue_size, queue_full) if dispatch == "asyncio" else None
        )
        self._dispatch: DispatchMode = dispatch
        self._relay_only = dispatch == "relay"
        self._closed = False
        self._on_loops: dict[concurrent.futures.Future[None], _OnLoop] = {}
        """Outbox records handed to an event loop, not yet written."""
        self._on_loops_pid = os.getpid()
        self._records_lost = False
        """A record could not be handed to its loop since the last flush."""
        self._listeners = SessionListeners(self)
        for plugin in plugins:
            self.register(plugin)
        if load_entrypoints:
            self._load_entrypoints()
            for plugin in self.plugin_manager.get_plugins():
                self._refuse_unsupported_hooks(plugin)
        self.plugin_manager.check_pending()

    def __repr__(self) -> str:
        names = sorted(name for name, _ in self.plugin_manager.list_name_plugin())
        return f"<AuditEmitter plugins={names}>"

    @property
    def joined_transactions(self) -> JoinedTransactions:
        """When a joined session's events go (the constructor's
        ``joined_transactions``); settable, for a test suite's set-up.

        :raises ValueError: set to anything but ``"outer"`` or ``"session"``.
        """
        return self._joined_transactions

    @joined_transactions.setter
    def joined_transactions(self, value: JoinedTransactions) -> None:
        _check_choice("joined_transactions", value, JOINED_TRANSACTIONS)
        self._joined_transactions = value

    @property
    def dispatch(self) -> DispatchMode:
        """How committed events are delivered (the constructor's ``dispatch``)."""
        return self._dispatch

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register a plugin; returns its name (None if it was blocked).

        Without *name*, a module is named by its ``__name__`` and any other
        object by its class (``"package.module.ClassName"``, then
        ``"...ClassName#2"`` for a second one): names stay the same from one
        process to the next, as the outbox's per-plugin state needs.

        :raises ValueError: the plugin, or its name, is registered already,
            it declares a hook wrapper, or its name is empty, holds a NUL or
            a lone surrogate, or is longer than the outbox stores.
        :raises TypeError: *name* is not a ``str``.
        :raises pluggy.PluginValidationError: it implements a hook that does not
            exist, or with arguments the hook does not have.
        """
        if name is None and not isinstance(plugin, types.ModuleType):
            # A stable default (pluggy would use id(plugin)): logs, the
            # outbox's per-plugin delivery state and relays in other
            # processes need a name that is the same every run.
            kind = type(plugin)
            base = f"{kind.__module__}.{kind.__qualname__}"
            name, number = base, 1
            while self.plugin_manager.get_plugin(name) is not None:
                number += 1
                name = f"{base}#{number}"
        elif name is not None and self.plugin_manager.get_plugin(name) is not None:
            # pluggy's message lists every registered plugin, on many lines.
            raise ValueError(f"a plugin named {name!r} is registered already")
        self._check_name(name if name is not None else getattr(plugin, "__name__", ""))
        try:
            registered = self.plugin_manager.register(plugin, name)
            self._refuse_unsupported_hooks(plugin)
            self.plugin_manager.check_pending()
        except pluggy.PluginValidationError:
            # Refused means not registered: it must not receive events, nor
            # make every later register() fail. (Older pluggy keeps a plugin
            # that register() itself refused.)
            if self.plugin_manager.is_registered(plugin):
                self.plugin_manager.unregister(plugin)
            raise
        return registered

    def _check_name(self, name: object) -> None:
        """Refuse a plugin name that logs and the outbox cannot key it by.

        :raises TypeError: *name* is not a ``str``.
        :raises ValueError: it is empty, holds a NUL or a lone surrogate, or
            is longer than the outbox stores.
        """
        if not isinstance(name, str):
            raise TypeError(f"a plugin name must be a str, got {name!r}")
        if not name:
            raise ValueError(
                "a plugin name must not be empty; leave it out for one made "
                "from the plugin's class"
            )
        if "\x00" in name:
            raise ValueError(
                f"plugin name {name!r} holds a NUL, which no database stores"
            )
        check_text(name, "plugin name")
        longest = getattr(self.outbox, "max_plugin_name_length", None)
        if longest is not None and len(name) > longest:
            raise ValueError(
                f"plugin name {name[:40]!r}... is {len(name)} characters long; "
                f"the outbox stores names of up to {longest}"
            )

    def unregister(self, plugin: object) -> None:
        """Unregister a plugin; it receives nothing from now on."""
        self.plugin_manager.unregister(plugin)

    def attach(self, target: AttachTarget) -> None:
        """Emit events staged on sessions of *target* when they commit.

        *target* is a Session subclass, a sessionmaker, a scoped_session, a
        Session instance, an AsyncSession, an async_sessionmaker or an
        async_scoped_session. Attaching the same target twice is a no-op.

        :raises AuditConfigurationError: another emitter is attached to it,
            or this emitter has an outbox and *target* is a ``ShardedSession``
            (which cannot name the outbox table's database).
        """
        resolved = listen_target(target)
        if self.outbox is not None:
            refuse_sharding(resolved)
        own(resolved, self)
        self._listeners.listen(resolved, several=spans_databases(target, resolved))

    def detach(self, target: AttachTarget) -> None:
        """Stop emitting for *target*; events it has staged are not sent.

        Safe from a plugin, or from another thread, while a commit delivers:
        that commit returns, its events delivered (the listener delivering
        stays until the next :meth:`attach` or :meth:`detach` of *target*
        made while no delivery runs, serving only sessions another attached
        target covers).
        """
        resolved = listen_target(target)
        self._listeners.remove(resolved)
        disown(resolved, self)

    @property
    def dropped(self) -> int:
        """Batches a full background queue dropped (``queue_full="drop"``)."""
        if self._on_loop is not None:
            return self._on_loop.dropped
        return 0 if self._background is None else self._background.dropped

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until background dispatch delivered everything committed so
        far (not what commits meanwhile: a steady load never keeps it
        waiting), and the outbox recorded what the dispatch delivered.

        Returns False if *timeout* (seconds) passed first; True at once for
        inline dispatch without an outbox.
        """
        self._refuse_sync_wait("flush")
        deadline = _deadline(timeout)
        done = self._background is None or self._background.flush(timeout)
        return self._flush_outbox(deadline) and done

    def close(self, timeout: float | None = None) -> bool:
        """Deliver what background dispatch has queued, then stop its thread
        (and wait for the outbox's records, as :meth:`flush`).

        From then on, without an outbox, ``stage_event`` on its sessions
        raises :class:`AuditConfigurationError` (nothing could deliver the
        event), and an event staged before and committed afterwards is
        delivered in the committing thread, with a warning. Plugins
        that stage while the queue drains are still heard. The interpreter's
        exit does this too. Returns False if *timeout* passed first.
        """
        self._refuse_sync_wait("close")
        deadline = _deadline(timeout)
        done = self._background is None or self._background.close(timeout)
        self._closed = self._background is not None and self.outbox is None
        return self._flush_outbox(deadline) and done

    async def aflush(self, timeout: float | None = None) -> bool:
        """:meth:`flush` for asyncio code: waits without blocking the event loop.

        Returns False if *timeout* (seconds) passed first.
        """
        return await self._await_dispatch("flush", timeout)

    async def aclose(self, timeout: float | None = None) -> bool:
        """:meth:`close` for asyncio code.

        Returns False if *timeout* (seconds) passed first.
        """
        done = await self._await_dispatch("close", timeout)
        self._closed = self.outbox is None and (
            self._background is not None or self._on_loop is not None
        )
        return done

    async def _await_dispatch(
        self, method: Literal["flush", "close"], timeout: float | None
    ) -> bool:
        """Await the dispatcher's *method*, then the outbox's records."""
        deadline = _deadline(timeout)
        if self._on_loop is not None:
            done = await getattr(self._on_loop, method)(timeout)
        elif self._background is not None:
            done = await asyncio.to_thread(getattr(self._background, method), timeout)
        else:
            done = True
        if self.outbox is None:
            return bool(done)
        late: set[Any] = set()
        scheduled, stuck = self._records_on_loops(here_too=True)
        if scheduled:
            # Records handed to this loop are awaited here (a thread waiting
            # for them would wait for the loop it blocks).
            written, late = await asyncio.wait(
                [asyncio.wrap_future(future) for future in scheduled],
                timeout=_remaining(deadline),
            )
            for future in (*written, *late):  # check() logs a failure
                future.add_done_callback(_retrieved)
        flushed = await asyncio.to_thread(self.outbox.flush, _remaining(deadline))
        return flushed and bool(done) and not late and not stuck

    def _flush_outbox(self, deadline: float | None) -> bool:
        if self.outbox is None:
            return True
        scheduled, stuck = self._records_on_loops(here_too=False)
        _, late = concurrent.futures.wait(scheduled, _remaining(deadline))
        return self.outbox.flush(_remaining(deadline)) and not late and not stuck

    def _records_on_loops(
        self, here_too: bool
    ) -> tuple[list[concurrent.futures.Future[None]], bool]:
        """The records handed to event loops that a flush can wait for, and
        whether others are not written: on a loop that is not running, or
        (unless *here_too*) on this thread's own, which a wait would block.
        A record whose loop closed first is logged and forgotten (the relay
        delivers its rows again; the flush that finds it says False), and a
        forked child forgets its parent's."""
        if self._on_loops_pid != os.getpid():
            self._on_loops.clear()
            self._on_loops_pid = os.getpid()
        here = running_loop()
        waitable = []
        stuck, self._records_lost = self._records_lost, False
        for future, (loop, envelopes) in list(self._on_loops.items()):
            if loop.is_closed():
                if self._on_loops.pop(future, None) is not None:
                    _record_failed(envelopes, RuntimeError("its event loop closed"))
                    stuck = True
            elif not loop.is_running() or (loop is here and not here_too):
                stuck = True
            else:
                waitable.append(future)
        return waitable, stuck

    def relay(self, bind: Engine | Connection, **options: Any) -> Any:
        """Re-deliver what the outbox holds undelivered; see :func:`access_audit.outbox.relay`.

        Returns the run's :class:`~access_audit.outbox.RelayStats`.

        :raises AuditConfigurationError: the emitter has no outbox.
        """
        if self.outbox is None:
            raise AuditConfigurationError(
                "this emitter has no outbox to relay from; create it with "
                "AuditEmitter(..., outbox=Outbox(...))"
            )
        return self.outbox.relay(self, bind, **options)

    async def arelay(self, bind: AsyncEngine | AsyncConnection, **options: Any) -> Any:
        """:meth:`relay` from asyncio code, through an ``AsyncEngine`` or
        ``AsyncConnection``; see :func:`access_audit.outbox.arelay`.

        Takes the same options (``stop`` is an :class:`asyncio.Event`) and
        returns the run's :class:`~access_audit.outbox.RelayStats`; the loop
        serves other tasks while it waits on the database or between polls.

        :raises AuditConfigurationError: the emitter has no outbox.
        """
        if self.outbox is None:
            raise AuditConfigurationError(
                "this emitter has no outbox to relay from; create it with "
                "AuditEmitter(..., outbox=Outbox(...))"
            )
        return await self.outbox.arelay(self, bind, **options)

    def _write_outbox(
        self, session: Session, envelopes: Sequence[AuditEventEnvelope]
    ) -> Engine | Connection:
        """Write *envelopes* to the outbox in *session*'s transaction, for the
        plugins that take events; returns the bind they went to."""
        assert self.outbox is not None
        return self.outbox.write(
            session, envelopes, delivering_plugins(self.plugin_manager)
        )

    def _committed(
        self,
        envelopes: tuple[AuditEventEnvelope, ...],
        outbox_bind: Engine | Connection | None,
        *,
        record_apart: bool = False,
    ) -> None:
        """Dispatch a committed batch, inline or on the background thread.

        *record_apart*: the batch is delivered from inside a connection's
        own event (the outer transaction of a joined session), where the
        record must not take a pooled connection: it could wait for the very
        one being returned.
        """
        if self._on_loop is not None:
            loop = running_loop()
            if loop is not None:
                apart = _not_the_callers(outbox_bind)
                try:
                    self._on_loop.submit(
                        loop,
                        Job(
                            functools.partial(self._adeliver, envelopes, apart),
                            functools.partial(self._deliver, envelopes, apart),
                            envelopes,
                        ),
                    )
                except RuntimeError:  # closed: nothing would deliver them
                    self._deliver_after_close(envelopes, outbox_bind, record_apart)
                return
        if self._relay_only:
            # Signals only: the relay delivers to plugins.
            deliver(self.plugin_manager, self, envelopes, only=frozenset())
            return
        if self._background is not None:
            loop = running_loop()
            try:
                self._background.submit(
                    functools.partial(
                        self._deliver, envelopes, _not_the_callers(outbox_bind), loop
                    )
                )
            except RuntimeError:  # closed: nothing would deliver them
                self._deliver_after_close(envelopes, outbox_bind, record_apart)
            return
        report = deliver(self.plugin_manager, self, envelopes)
        if outbox_bind is not None or report.errors:
            self._settle(envelopes, outbox_bind, report, None, record_apart)

    def _deliver_after_close(
        self,
        envelopes: tuple[AuditEventEnvelope, ...],
        outbox_bind: Engine | Connection | None,
        record_apart: bool,
    ) -> None:
        """Deliver a batch committed after the background or asyncio dispatch
        was closed, in the committing thread, as the worker would have:
        isolating everything, raising nothing (the application chose a
        dispatch whose commits never raise for a plugin)."""
        logger.warning(
            "events %s committed after the emitter's dispatch was closed: "
            "delivered in the committing thread",
            event_ids(envelopes),
        )
        report = deliver(self.plugin_manager, self, envelopes, let_through=())
        if outbox_bind is not None:
            self._mark_outbox(outbox_bind, envelopes, report, None, record_apart)

    async def _adeliver(
        self,
        envelopes: tuple[AuditEventEnvelope, ...],
        outbox_bind: Engine | Connection | None,
    ) -> None:
        """A job of ``dispatch="asyncio"``: deliver, then record the outbox rows.

        Plugin errors are logged and reported; nobody is left to raise to.
        Nothing is let through, not even ``KeyboardInterrupt`` or
        ``SystemExit``: raised by a plugin in the worker task, they would
        stop the application's event loop, long after its commit returned.
        """
        report = await adeliver(self.plugin_manager, self, envelopes, let_through=())
        if report.errors:
            _keep_unraised(report.errors)
        if outbox_bind is None:
            return
        arguments = (
            outbox_bind,
            envelopes,
            delivering_plugins(self.plugin_manager),
            report,
        )
        if outbox_bind.dialect.is_async:
            # The rows went through an async engine's connection: its sync
            # facade works inside SQLAlchemy's greenlet.
            await greenlet_spawn(self._record_or_log, *arguments)
        else:
            await asyncio.to_thread(self._record_or_log, *arguments)

    def _refuse_sync_wait(self, method: str) -> None:
        if self._on_loop is not None:
            raise RuntimeError(
                f"emitter.{method}() cannot wait for dispatch='asyncio' from "
                f"synchronous code; use 'await emitter.a{method}()' on the loop"
            )

    def _deliver(
        self,
        envelopes: Sequence[AuditEventEnvelope],
        outbox_bind: Engine | Connection | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """The background worker's job: deliver a batch, isolating everything.

        Even ``KeyboardInterrupt`` and ``SystemExit``: raised in the worker by a
        plugin, they would stop the worker, not the program.
        """
        report = deliver(self.plugin_manager, self, envelopes, let_through=())
        self._settle(envelopes, outbox_bind, report, loop)

    def _settle(
        self,
        envelopes: Sequence[AuditEventEnvelope],
        outbox_bind: Engine | Connection | None,
        report: DeliveryReport,
        loop: asyncio.AbstractEventLoop | None,
        record_apart: bool = False,
    ) -> None:
        """After delivery: mark the outbox rows, raise in strict mode."""
        if outbox_bind is not None:
            self._mark_outbox(outbox_bind, envelopes, report, loop, record_apart)
        errors = report.errors
        if errors and self._background is not None:
            _keep_unraised(errors)  # logged already; nobody to raise to
            return
        if errors and (self.raise_plugin_errors or _unraised):
            first = errors[0]
            for later in errors[1:]:
                if hasattr(first, "add_note"):  # Python 3.11+
                    first.add_note(f"access_audit: another plugin raised {later!r}")
            raise first

    def _mark_outbox(
        self,
        bind: Engine | Connection,
        envelopes: Sequence[AuditEventEnvelope],
        report: DeliveryReport,
        loop: asyncio.AbstractEventLoop | None,
        record_apart: bool = False,
    ) -> None:
        """Have the outbox record *report*: here, or on the event loop that
        an async engine's connections belong to; a failure is logged, never
        raised. :meth:`flush` waits for a record handed to a loop.

        *record_apart*: the batch was delivered from inside a connection's
        own event; the outbox is told so (it takes no connection then), and
        an async engine's record goes to the running loop, to run after it.
        """
        plugins = delivering_plugins(self.plugin_manager)
        if record_apart and loop is None and bind.dialect.is_async:
            loop = running_loop()
        if loop is None or not bind.dialect.is_async:
            self._record_or_log(bind, envelopes, plugins, report, record_apart)
            return
        # Without waiting: the loop may be the one blocked in emitter.flush(),
        # waiting for this very job.
        assert self.outbox is not None
        work = greenlet_spawn(self.outbox.record, bind, envelopes, plugins, report)
        try:
            scheduled = asyncio.run_coroutine_threadsafe(work, loop)
        except RuntimeError as error:  # the loop closed first
            work.close()
            _record_failed(envelopes, error)
            self._records_lost = True
            return
        self._on_loops[scheduled] = (loop, envelopes)

        def check(done: concurrent.futures.Future[None]) -> None:
            self._on_loops.pop(done, None)
            if not done.cancelled() and done.exception() is None:
                return
            _record_failed(envelopes, None if done.cancelled() else done.exception())

        scheduled.add_done_callback(check)

    def _record_or_log(
        self,
        bind: Engine | Connection,
        envelopes: Sequence[AuditEventEnvelope],
        plugins: Collection[str],
        report: DeliveryReport,
        apart: bool = False,
    ) -> None:
        assert self.outbox is not None
        try:
            if apart and _takes_apart(self.outbox.record):
                self.outbox.record(bind, envelopes, plugins, report, apart=True)
            else:  # as a store written before apart was known takes it
                self.outbox.record(bind, envelopes, plugins, report)
        except Exception as error:
            _record_failed(envelopes, error)

    def _discarded(self, events: Sequence[StagedEvent], reason: DiscardReason) -> None:
        if not signals.audit_event_discarded.receivers:
            return
        for staged in events:
            send_isolated(
                signals.audit_event_discarded, self, event=staged, reason=reason
            )

    def _load_entrypoints(self) -> None:
        """Register what each ``access_audit`` entry point names, under its name.

        As pluggy's ``load_setuptools_entrypoints``, except that a class is a
        plugin factory, as in ``ACCESS_AUDIT_PLUGINS``: an instance of it is
        registered, and ``list_plugin_distinfo()`` pairs that instance with
        its distribution.

        :raises AuditConfigurationError: an entry point names a class that
            cannot be instantiated with no arguments.
        """
        manager = self.plugin_manager
        manager.load_setuptools_entrypoints(PROJECT_NAME)
        # pluggy registers a class as it is (its hook methods then miss their
        # instance at every call) and keeps (plugin, distribution) pairs in a
        # list of its own, whose item type differs between pluggy versions:
        # swap the class for an instance in both, keeping pluggy's item.
        records = manager._plugin_distinfo
        for index, (plugin, dist) in enumerate(records):
            if not isinstance(plugin, type):
                continue
            name = manager.get_name(plugin)
            instance = plugin_from(
                plugin,
                f"entry point {name!r} of the distribution "
                f"{dist.metadata['Name']} {dist.version}",
            )
            manager.unregister(plugin)
            manager.register(instance, name)
            records[index] = (instance, dist)

    def _watch_connections(self, session: Session) -> None:
        """Check the connections *session* acquires from now on (see SessionListeners)."""
        self._listeners.watch_connections(session, attached_to_instance(session))

    def _listen_to_class(self, session_class: type[Any], *, several: bool) -> None:
        """Install this emitter's listeners on a class whose owner a selector
        picks, holding this emitter weakly: many emitters may share it.
        *several*: its sessions may work in several databases."""
        self._listeners.listen(session_class, weakly=True, several=several)

    def _refuse_unsupported_hooks(self, plugin: object) -> None:
        # Each implementation is called (or awaited) on its own: a wrapper
        # has nothing to wrap.
        for caller in self.plugin_manager.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                if impl.hookwrapper or impl.wrapper:
                    problem = (
                        "as a wrapper; access_audit calls each implementation on "
                        "its own, so declare it with a plain @hookimpl"
                    )
                else:
                    continue
                name = impl.plugin_name
                self.plugin_manager.unregister(plugin)
                raise ValueError(f"plugin {name!r} declares {caller.name} {problem}")
        logger.debug("registered plugin %r", self.plugin_manager.get_name(plugin))


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        choices = " or ".join(repr(choice) for choice in allowed)
        raise ValueError(f"{name} must be {choices}, got {value!r}")


def _payload_limit(
    max_payload_bytes: int | None, outbox: DeliveryStore | None
) -> int | None:
    """The emitter's ``max_payload_bytes``, lowered to what *outbox* can store
    (a value of the wrong type is left for ``PayloadRules.build`` to refuse)."""
    stored: int | None = getattr(outbox, "max_payload_bytes", None)
    if stored is None:
        return max_payload_bytes
    if max_payload_bytes is None:
        return stored
    if type(max_payload_bytes) is int and max_payload_bytes > stored:
        return stored
    return max_payload_bytes


_OnLoop = tuple[asyncio.AbstractEventLoop, Sequence["AuditEventEnvelope"]]
"""A record handed to an event loop: the loop, and the batch it records."""


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _takes_apart(record: Callable[..., None]) -> bool:
    """Whether a delivery store's ``record`` takes ``apart=`` (one written
    before it existed does not; it is asked only for a joined session's
    batch, so the signature is read then)."""
    try:
        parameters = inspect.signature(record).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a builtin, say
        return False
    return any(
        p.name == "apart" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
    )


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark *future*'s outcome as seen (asyncio logs one nobody asked for)."""
    if not future.cancelled():
        future.exception()


def _not_the_callers(bind: Engine | Connection | None) -> Engine | None:
    """*bind*, for a record written by another thread or task: None for a
    connection, the caller's and in its transaction still (the rows of a
    session under ``joined_transactions="session"``), that only the caller
    may use, and only now. Those rows are left pending: they roll back with
    that transaction, or a relay delivers them again if it commits."""
    return None if isinstance(bind, Connection) else bind


def _record_failed(
    envelopes: Sequence[AuditEventEnvelope], error: BaseException | None
) -> None:
    """Log that the delivery of *envelopes* could not be recorded."""
    logger.error(
        "could not mark outbox rows %s as delivered; the relay will "
        "deliver them again (consumers de-duplicate by id)",
        event_ids(envelopes),
        exc_info=error,
    )


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
