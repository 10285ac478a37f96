"""``python -m access_audit relay``: run the outbox relay from a shell or a job."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from sqlalchemy.util import await_only, greenlet_spawn

from .._errors import AuditConfigurationError
from .._imports import import_plugin
from ._relay import (
    LONGEST_RETENTION,
    LONGEST_WAIT,
    RelayStats,
    arelay,
    check_options,
    check_tables,
    count_pending,
    list_dead,
    relay,
    retry_dead,
    status,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.ext.asyncio import AsyncEngine

    from .._emitter import AuditEmitter
    from ._table import Outbox

__all__ = [
    "INTERRUPTED",
    "CliOption",
    "RelayOptions",
    "add_relay_arguments",
    "arun_command",
    "database_error",
    "main",
    "main_exit",
    "relay_after_option",
    "relay_cli_options",
    "run_command",
]


@dataclasses.dataclass(frozen=True, slots=True)
class CliOption:
    """How one :class:`RelayOptions` field is written on a command line."""

    value_type: type[Any] | None
    """What the value converts to; None for a switch (present or not)."""
    help: str
    metavar: str | None = None
    repeatable: bool = False
    name: str = ""
    """The field's name (set by :func:`relay_cli_options`)."""
    default: Any = None

    @property
    def flag(self) -> str:
        """``--batch-size`` for the field ``batch_size``."""
        return "--" + self.name.replace("_", "-")


def _option(default: Any, cli: CliOption) -> Any:
    return dataclasses.field(default=default, metadata={"cli": cli})


@dataclasses.dataclass(frozen=True, slots=True)
class RelayOptions:
    """The options of every command that runs the relay, and their defaults.

    Each field is one ``--option``: ``python -m access_audit relay``
    (argparse, :func:`add_relay_arguments`) and ``flask access-audit relay``
    (click) both declare theirs from :func:`relay_cli_options`.
    """

    once: bool = _option(False, CliOption(None, "exit when nothing is due"))
    interval: float = _option(1.0, CliOption(float, "seconds between polls"))
    batch_size: int = _option(
        500,
        CliOption(
            int,
            "rows a batch aims for (a larger transaction goes in slices of 200 to 1,000 rows)",
        ),
    )
    max_attempts: int = _option(
        8, CliOption(int, "attempts before a delivery is given up (dead)")
    )
    backoff: float = _option(1.0, CliOption(float, "first retry delay, s"))
    max_backoff: float = _option(300.0, CliOption(float, "longest retry delay, s"))
    retention_days: float | None = _option(
        None,
        CliOption(float, "delete events some plugin gave up on this many days ago"),
    )
    list_dead: bool = _option(False, CliOption(None, "list dead deliveries"))
    retry_dead: bool = _option(False, CliOption(None, "make dead deliveries due again"))
    only_plugin: tuple[str, ...] = _option(
        (),
        CliOption(
            str,
            "with --retry-dead: only this plugin's (repeatable)",
            metavar="NAME",
            repeatable=True,
        ),
    )
    quiet: bool = _option(False, CliOption(None, "no progress lines"))

    def __post_init__(self) -> None:
        """:raises ValueError: an option is out of range, or goes with none
        it needs, named as on the command line (``--batch-size``)."""
        if self.list_dead and self.retry_dead:
            raise ValueError(
                "--list-dead and --retry-dead go one at a time: list, then retry"
            )
        if self.only_plugin and not self.retry_dead:
            raise ValueError("--only-plugin goes with --retry-dead")
        days = self.retention_days
        if days is not None and not 0 <= days <= LONGEST_RETENTION.days:
            raise ValueError(
                "--retention-days must be a number of days from 0 to "
                f"{LONGEST_RETENTION.days:,}, got {days!r}"
            )
        check_options(
            self.batch_size,
            self.max_attempts,
            self.backoff,
            self.max_backoff,
            self.interval,
            None if self.retention_days is None else timedelta(self.retention_days),
            spell=lambda name: (
                "--" + {"retention": "retention_days"}.get(name, name).replace("_", "-")
            ),
        )

    @classmethod
    def from_namespace(cls, parsed: argparse.Namespace) -> RelayOptions:
        """The relay options among what :func:`add_relay_arguments` parsed."""
        values = {
            option.name: getattr(parsed, option.name) for option in relay_cli_options()
        }
        # argparse leaves a repeatable option that was never given None.
        values["only_plugin"] = tuple(values["only_plugin"] or ())
        return cls(**values)


INTERRUPTED = (
    "interrupted; the batch in hand was rolled back, and a later run delivers it again"
)
"""What a relay command says when a second SIGINT or SIGTERM stopped it."""


def relay_after_option(seconds: float) -> timedelta:
    """``--relay-after``'s value as a time.

    :raises ValueError: out of range, naming the option.
    """
    if not 0 <= seconds <= LONGEST_WAIT:
        raise ValueError(
            f"--relay-after must be a number of seconds from 0 to {LONGEST_WAIT:,}, "
            f"got {seconds}"
        )
    return timedelta(seconds=seconds)


def relay_cli_options() -> list[CliOption]:
    """Each :class:`RelayOptions` field as a command-line option, in order."""
    return [
        dataclasses.replace(
            field.metadata["cli"], name=field.name, default=field.default
        )
        for field in dataclasses.fields(RelayOptions)
    ]


def add_relay_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the :class:`RelayOptions` to an argparse *parser*."""
    for option in relay_cli_options():
        if option.value_type is None:
            parser.add_argument(option.flag, action="store_true", help=option.help)
        elif option.repeatable:
            # argparse appends to a list of its own, so the default stays None.
            parser.add_argument(
                option.flag,
                action="append",
                type=option.value_type,
                metavar=option.metavar,
                help=option.help,
            )
        else:
            parser.add_argument(
                option.flag,
                type=option.value_type,
                default=option.default,
                metavar=option.metavar,
                help=option.help,
            )


def run_command(
    options: RelayOptions,
    emitter: AuditEmitter,
    engine: Engine,
    outbox: Outbox,
    out: TextIO = sys.stdout,
) -> int:
    """Run what *options* ask for; returns the exit status.

    A polling relay stops at SIGINT or SIGTERM (in the main thread).
    """
    stop = threading.Event()
    _stop_on_signals(stop.set)

    def run_relay(**settings: Any) -> RelayStats:
        return relay(emitter, engine, outbox, stop=stop, **settings)

    return _command(options, engine, outbox, out, run_relay)


async def arun_command(
    options: RelayOptions,
    emitter: AuditEmitter,
    engine: AsyncEngine,
    outbox: Outbox,
    out: TextIO = sys.stdout,
) -> int:
    """:func:`run_command` through an ``AsyncEngine``, relaying with
    :func:`~access_audit.outbox.arelay`; returns the exit status.

    A polling relay stops at SIGINT or SIGTERM (in the main thread).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    _stop_on_signals(lambda: loop.call_soon_threadsafe(stop.set))

    def run_relay(**settings: Any) -> RelayStats:
        return await_only(arelay(emitter, engine, outbox, stop=stop, **settings))

    # The commands run on the engine's synchronous facade, each statement
    # awaited on this loop by SQLAlchemy's greenlet bridge.
    return await greenlet_spawn(
        _command, options, engine.sync_engine, outbox, out, run_relay
    )


def _command(
    options: RelayOptions,
    engine: Engine,
    outbox: Outbox,
    out: TextIO,
    run_relay: Callable[..., RelayStats],
) -> int:
    if options.list_dead or options.retry_dead:
        check_tables(engine, outbox)  # a missing table: one line, as the relay's
    if options.list_dead:
        for row in list_dead(engine, outbox):
            out.write(json.dumps(row, sort_keys=True) + "\n")
        return 0
    if options.retry_dead:
        only = set(options.only_plugin) if options.only_plugin else None
        changed = retry_dead(engine, outbox, only)
        out.write(f"relay: {changed} dead rows are due again\n")
        if not options.once:
            return 0  # with --once, deliver them right away too
    report = _progress_printer(out, engine, outbox, quiet=options.quiet)
    stats = run_relay(
        batch_size=options.batch_size,
        max_attempts=options.max_attempts,
        backoff=options.backoff,
        max_backoff=options.max_backoff,
        once=options.once,
        interval=options.interval,
        retention=(
            None
            if options.retention_days is None
            else timedelta(days=options.retention_days)
        ),
        progress=report,
    )
    if not options.quiet:
        out.write(stats.line(count_pending(engine, outbox)) + "\n")
        if stats.missing_plugins:  # counted when the relay was last idle
            pending = status(engine, outbox).pending
            stats.missing_plugins = {
                name: pending[name]
                for name in stats.missing_plugins
                if pending.get(name)
            }
        for line in stats.missing_lines():
            out.write(line + "\n")
        if stats.missing_plugins:
            out.write(_MISSING_HINT + "\n")
    return 0


_MISSING_HINT = (
    "relay: rows are delivered only to the plugin names they were written for; "
    "give the relay each plugin under the name the app registered it with "
    "(--plugin NAME=MODULE:OBJECT)"
)


def _progress_printer(
    out: TextIO, engine: Engine, outbox: Outbox, *, quiet: bool
) -> Callable[[RelayStats], None]:
    last = [time.monotonic()]

    def report(stats: RelayStats) -> None:
        now = time.monotonic()
        if quiet or now - last[0] < 2.0:
            return
        last[0] = now
        out.write(stats.line(count_pending(engine, outbox)) + "\n")
        out.flush()

    return report


def _stop_on_signals(stop: Callable[[], object]) -> None:
    """At SIGINT or SIGTERM, *stop* after the batch in hand; at a second
    one, stop now (``KeyboardInterrupt``: the batch rolls back, and a
    later run delivers it again)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signalled: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        if signalled:
            raise KeyboardInterrupt
        signalled.append(signum)
        sys.stderr.write(
            f"relay: {signal.Signals(signum).name}: stopping after the batch "
            "in hand (again to stop at once; that batch is then delivered "
            "again by a later run)\n"
        )
        stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)


def _register_plugin(emitter: AuditEmitter, spec: str) -> None:
    """Register ``--plugin [NAME=]MODULE:OBJECT`` on *emitter*.

    Rows are delivered only to the plugin names they were written for, so
    NAME is the name the application registered the plugin under; without
    it, the plugin gets the emitter's default name (its class path).

    :raises AuditConfigurationError: *spec* is malformed or does not import;
        the message names the option.
    :raises ValueError: the name is taken (by another ``--plugin`` or an
        entry point).
    """
    name, equals, target = spec.rpartition("=")
    if equals and not name.strip():
        raise AuditConfigurationError(
            f"--plugin: empty plugin name in {spec!r}; use NAME=MODULE:OBJECT "
            "with the name the application registered the plugin under, or "
            "MODULE:OBJECT alone"
        )
    plugin = import_plugin(target, "--plugin")
    try:
        registered = emitter.register(plugin, name=name or None)
    except ValueError as error:
        raise ValueError(f"--plugin {spec!r}: {error}") from error
    if registered is not None and not emitter.plugin_manager.get_hookcallers(plugin):
        emitter.unregister(plugin)
        raise AuditConfigurationError(
            f"--plugin {spec!r}: {plugin!r} has no access_audit hook "
            "(audit_event_logged, audit_events_committed); name a plugin "
            "class, an instance or a module with @hookimpl functions"
        )


def _add_database_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--table", default="access_audit_outbox")
    parser.add_argument("--schema", default=None)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, pointing to ``--help``
    (argparse prints the whole usage first, ten lines for ``relay``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``access-audit relay|status --database-url URL [options]``
    (also ``python -m access_audit``)."""
    parser = _Parser(
        prog="access-audit",
        description="access_audit tools: 'relay' delivers what the outbox holds "
        "undelivered; 'status' counts it.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    relay_parser = commands.add_parser(
        "relay", help="deliver what the outbox holds undelivered"
    )
    _add_database_arguments(relay_parser)
    relay_parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="[NAME=]MODULE:OBJECT",
        help=(
            "a plugin to deliver to (repeatable); a class is instantiated. Rows "
            "go only to the plugin names they were written for: NAME is the "
            "name the app registered the plugin under (default: its class path)"
        ),
    )
    relay_parser.add_argument(
        "--no-entrypoints",
        action="store_true",
        help="do not load plugins from 'access_audit' entry points",
    )
    relay_parser.add_argument(
        "--create-table",
        action="store_true",
        help="create the outbox tables if missing",
    )
    relay_parser.add_argument(
        "--relay-after",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="leave a fresh row this long to the dispatch after its commit "
        "(0 for apps with dispatch='relay')",
    )
    add_relay_arguments(relay_parser)
    status_parser = commands.add_parser(
        "status", help="per plugin: events pending and dead; the oldest pending"
    )
    _add_database_arguments(status_parser)
    options = parser.parse_args(argv)

    from sqlalchemy import make_url
    from sqlalchemy.exc import (
        ArgumentError,
        DBAPIError,
        NoSuchModuleError,
    )

    used = relay_parser if options.command == "relay" else status_parser
    try:
        # The driver too: an ImportError later is a plugin's, not the URL's.
        make_url(options.database_url).get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError, ImportError) as error:
        used.error(f"--database-url: {error}")
    try:
        return _run(options, relay_parser)
    except KeyboardInterrupt:
        used.exit(130, f"{used.prog}: {INTERRUPTED}\n")
    except AuditConfigurationError as error:
        used.exit(2, f"{used.prog}: error: {error}\n")
    except ImportError as error:  # a plugin's package, or its dependency
        used.exit(2, f"{used.prog}: error: a plugin could not be imported: {error}\n")
    except DBAPIError as error:
        code, line = database_error(error)
        used.exit(code, f"{used.prog}: error: {line}\n")


def _checked(engine: Engine) -> Engine:
    """*engine*, whose connections refuse a ``--database-url`` argument its
    driver does not take (``?sslmod=`` for pymysql; the driver raises
    ``TypeError``) as a configuration error, naming the option, and report
    a refused connection that the driver raises as the socket's
    ``OSError`` (asyncpg) as a database error, as other drivers do."""
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    def connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except TypeError as error:
            raise AuditConfigurationError(
                f"--database-url: its driver ({dialect.driver}) does not take "
                f"one of its arguments: {error}"
            ) from error
        except OSError as error:
            raise OperationalError(None, None, error) from error

    event.listen(engine, "do_connect", connect)
    return engine


def database_error(error: DBAPIError) -> tuple[int, str]:
    """The exit status and one line for a database error a relay command
    ends with: one the relay does not retry (a table dropped while it runs:
    a configuration error, 2), or gave up on (``--once``), and status's one
    attempt (an unreachable database: 1)."""
    from sqlalchemy.exc import ProgrammingError

    cause = str(error.orig if error.orig is not None else error)
    first = cause.strip().splitlines()[0] if cause.strip() else type(error).__name__
    return 2 if isinstance(error, ProgrammingError) else 1, f"the database: {first}"


def _run(options: argparse.Namespace, relay_parser: argparse.ArgumentParser) -> int:
    """Run the parsed command.

    :raises AuditConfigurationError: an outbox table is missing, say.
    """
    from sqlalchemy import create_engine, make_url

    from .._emitter import AuditEmitter
    from ._table import Outbox

    if options.command == "status":
        outbox = Outbox(table_name=options.table, schema=options.schema)
        return _status(options.database_url, outbox)
    try:
        relay_after = relay_after_option(options.relay_after)
        relay_options = RelayOptions.from_namespace(options)
    except ValueError as error:
        relay_parser.error(str(error))
    outbox = Outbox(
        table_name=options.table, schema=options.schema, relay_after=relay_after
    )
    emitter = AuditEmitter(load_entrypoints=not options.no_entrypoints, outbox=outbox)
    for spec in options.plugin:
        try:
            _register_plugin(emitter, spec)
        except (AuditConfigurationError, ValueError) as error:
            relay_parser.error(str(error))
    if make_url(options.database_url).get_dialect().is_async:
        return asyncio.run(_amain(options, relay_options, emitter, outbox))
    engine = _checked(create_engine(options.database_url, pool_pre_ping=True))
    try:
        if options.create_table:
            outbox.create(engine)
        return run_command(relay_options, emitter, engine, outbox)
    finally:
        engine.dispose()


def main_exit() -> None:
    """The ``access-audit`` console script: :func:`main`, exiting with its status.

    As ``python -m access_audit`` does, it imports ``--plugin`` modules from
    the current directory too (a console script's ``sys.path`` starts with
    its own directory instead).
    """
    with contextlib.suppress(OSError):  # a directory since deleted has none
        if os.getcwd() not in sys.path:
            # After the installed packages: a stray psycopg.py there does
            # not take the driver's place.
            sys.path.append(os.getcwd())
    raise SystemExit(main())


def _status(url: str, outbox: Outbox, out: TextIO = sys.stdout) -> int:
    """Print :func:`~access_audit.outbox.status` as lines; exit status 0."""
    from sqlalchemy import create_engine, make_url

    if make_url(url).get_dialect().is_async:

        async def read() -> list[str]:
            from sqlalchemy.ext.asyncio import create_async_engine

            engine = create_async_engine(url)
            _checked(engine.sync_engine)
            try:
                async with engine.connect() as connection:
                    found = await connection.run_sync(status, outbox)
                    return found.lines()
            finally:
                await engine.dispose()

        lines = asyncio.run(read())
    else:
        engine = _checked(create_engine(url))
        try:
            lines = status(engine, outbox).lines()
        finally:
            engine.dispose()
    out.write("\n".join(lines) + "\n")
    return 0


async def _amain(
    parsed: argparse.Namespace,
    options: RelayOptions,
    emitter: AuditEmitter,
    outbox: Outbox,
) -> int:
    """:func:`main` for an async driver's URL (``postgresql+asyncpg://``)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(parsed.database_url)
    _checked(engine.sync_engine)
    try:
        if parsed.create_table:
            async with engine.begin() as connection:
                await connection.run_sync(outbox.create)
        return await arun_command(options, emitter, engine, outbox)
    finally:
        await engine.dispose()
