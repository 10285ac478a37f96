"""``flask access-audit ...`` commands."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy.exc import DBAPIError

from .._errors import AuditConfigurationError
from ..outbox._cli import (
    INTERRUPTED,
    RelayOptions,
    database_error,
    relay_after_option,
    relay_cli_options,
    run_command,
)
from ..outbox._table import Outbox

__all__ = ["cli"]

cli = AppGroup("access-audit", help="Inspect access_audit for this app.")


@cli.command("plugins")
def list_plugins() -> None:
    """List the registered plugins, where each came from, and its hooks."""
    from ._extension import AccessAudit

    emitter = AccessAudit.emitter_of(current_app)
    manager = emitter.plugin_manager
    sources = {
        id(plugin): f"entry point of {dist.project_name} {dist.version}"
        for plugin, dist in manager.list_plugin_distinfo()
    }
    pairs = sorted(manager.list_name_plugin(), key=lambda pair: str(pair[0]))
    if not pairs:
        click.echo("no plugins registered")
    for name, plugin in pairs:
        hooks = sorted(caller.name for caller in manager.get_hookcallers(plugin) or ())
        source = sources.get(id(plugin), "registered by the app")
        click.echo(f"{name}  ({source})")
        click.echo(f"    hooks: {', '.join(hooks) or '(none)'}")


def _relay_options(command: Callable[..., None]) -> Callable[..., None]:
    """Declare the relay's options (those of ``python -m access_audit relay``)."""
    # click applies the innermost decorator first: go backwards to keep
    # --help's order that of RelayOptions.
    for option in reversed(relay_cli_options()):
        if option.value_type is None:
            declare = click.option(option.flag, is_flag=True, help=option.help)
        else:
            declare = click.option(
                option.flag,
                type=option.value_type,
                default=option.default,
                multiple=option.repeatable,
                metavar=option.metavar,
                help=option.help,
                show_default=option.default not in (None, ()),
            )
        command = declare(command)
    return command


class _Refused(click.ClickException):
    """A configuration the relay cannot run with (a missing table, an option
    out of range, an unknown bind): one line, exit status 2, as
    ``access-audit relay`` gives."""

    exit_code = 2


class _DatabaseError(click.ClickException):
    """A database error the relay gave up on (``--once``): one line, exit
    status 1, as ``access-audit relay`` gives."""

    exit_code = 1


@cli.command("relay")
@click.option(
    "--bind",
    "bind_key",
    metavar="KEY",
    default=None,
    help="relay the database of this Flask-SQLAlchemy bind (where transactions "
    "that change only that database write their outbox rows, once it has the "
    "table); default: the outbox table's",
)
@click.option(
    "--create-table",
    is_flag=True,
    help="create the outbox tables first if they do not exist",
)
@click.option(
    "--relay-after",
    type=float,
    default=None,
    metavar="SECONDS",
    help="leave a fresh row this long to the dispatch after its commit; "
    "default: the app's Outbox(relay_after=...), or 0 when its emitter has "
    "dispatch='relay' (nothing else delivers)",
)
@_relay_options
def relay(
    bind_key: str | None,
    create_table: bool,
    relay_after: float | None,
    **options: Any,
) -> None:
    """Re-deliver undelivered outbox rows (options as for python -m access_audit relay).

    Uses this app's emitter (its plugins and outbox) and the database that
    holds the outbox table, or the bind ``--bind`` names.
    """
    from ._extension import AccessAudit

    emitter = AccessAudit.emitter_of(current_app)
    outbox = emitter.outbox
    if outbox is None:
        raise _Refused(
            "this app's emitter has no outbox: create AccessAudit(..., "
            "outbox=Outbox(db.metadata)) to use the relay"
        )
    if not isinstance(outbox, Outbox):
        # The relay reads and updates the Outbox's own table layout.
        raise _Refused(
            f"this app's emitter delivers through {outbox!r}, not an "
            "access_audit.outbox.Outbox: relay it with its own tools"
        )
    configured = outbox.relay_after
    try:
        chosen = RelayOptions(**options)
        if relay_after is not None:
            run_after = relay_after_option(relay_after)
        else:
            run_after = timedelta(0) if emitter.dispatch == "relay" else configured
    except ValueError as error:
        raise _Refused(str(error)) from None
    try:
        engine = AccessAudit.outbox_engine_of(current_app, bind_key)
    except AuditConfigurationError as error:
        if bind_key is None:
            raise _Refused(str(error)) from None
        raise _Refused(f"--bind: {error}") from None
    # For this run only: the app's own commits and relays, in this process
    # (a test's CliRunner, say), keep the wait it configured.
    outbox.relay_after = run_after
    try:
        if create_table:
            outbox.create(engine)
        status = run_command(chosen, emitter, engine, outbox, out=sys.stdout)
    except AuditConfigurationError as error:
        raise _Refused(str(error)) from None
    except DBAPIError as error:
        code, line = database_error(error)
        raise (_Refused if code == 2 else _DatabaseError)(line) from None
    except KeyboardInterrupt:
        # A second SIGINT or SIGTERM: as access-audit relay reports it.
        click.echo(INTERRUPTED, err=True)
        click.get_current_context().exit(130)
    finally:
        outbox.relay_after = configured
    if status:
        click.get_current_context().exit(status)
