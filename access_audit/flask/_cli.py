"""``flask access-audit ...`` commands."""

from __future__ import annotations

import argparse
import sys

import click
from flask import current_app
from flask.cli import AppGroup

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


@cli.command(
    "relay",
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
def relay(arguments: tuple[str, ...]) -> None:
    """Re-deliver undelivered outbox rows (options as for python -m access_audit relay).

    Uses this app's emitter (its plugins and outbox) and the database that
    holds the outbox table. Run with --help for the options.
    """
    from ..outbox._cli import add_relay_arguments, run_command
    from ._extension import AccessAudit

    parser = argparse.ArgumentParser(prog="flask access-audit relay")
    add_relay_arguments(parser)
    options = parser.parse_args(arguments)
    emitter = AccessAudit.emitter_of(current_app)
    if emitter.outbox is None:
        raise click.ClickException(
            "this app's emitter has no outbox: create AccessAudit(..., "
            "outbox=Outbox(db.metadata)) to use the relay"
        )
    engine = AccessAudit.outbox_engine_of(current_app)
    status = run_command(options, emitter, engine, emitter.outbox, out=sys.stdout)
    if status:
        raise SystemExit(status)
