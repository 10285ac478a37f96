"""``flask access-audit ...`` commands."""

from __future__ import annotations

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
