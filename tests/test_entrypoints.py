"""Plugins installed by other distributions, found through ``access_audit`` entry points.

Each test installs a tiny distribution of its own: a module and a
``*.dist-info`` folder on a ``sys.path`` entry that only the test sees.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy.orm import sessionmaker
from support import commit_one

from access_audit import AuditConfigurationError, AuditEmitter
from access_audit._imports import import_plugin

PLUGIN_MODULE = '''
from access_audit import hookimpl

received = []


class Collector:
    """A plugin class whose instances keep what they receive."""

    def __init__(self):
        self.events = []

    @hookimpl
    def audit_event_logged(self, envelope):
        self.events.append(envelope.target_id)


class NeedsUrl:
    """A plugin class that cannot be made without an argument."""

    def __init__(self, url):
        self.url = url

    @hookimpl
    def audit_event_logged(self, envelope):
        pass


@hookimpl
def audit_event_logged(envelope):
    received.append(envelope.target_id)
'''

Install = Callable[[dict[str, str]], ModuleType]


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """Install ``fake-audit-plugin 1.0``: its module, and the entry points given.

    Returns the imported module. Each entry point maps a name to a value in
    which ``{module}`` stands for that module's name: ``"{module}:Collector"``.
    """
    module_name = f"fake_audit_plugin_{tmp_path.name}"

    def install(entry_points: dict[str, str]) -> ModuleType:
        (tmp_path / f"{module_name}.py").write_text(PLUGIN_MODULE)
        info = tmp_path / "fake_audit_plugin-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: fake-audit-plugin\nVersion: 1.0\n"
        )
        lines = [
            f"{name} = {value.format(module=module_name)}"
            for name, value in entry_points.items()
        ]
        (info / "entry_points.txt").write_text(
            "[access_audit]\n" + "\n".join(lines) + "\n"
        )
        # Also invalidates the import caches, so importlib.metadata sees it.
        monkeypatch.syspath_prepend(tmp_path)
        return importlib.import_module(module_name)

    yield install
    sys.modules.pop(module_name, None)


def test_an_entry_point_naming_a_class_registers_an_instance(
    install: Install,
) -> None:
    """The instance, under the entry point's name, receives events; its dist is known."""
    module = install({"collector": "{module}:Collector"})
    emitter = AuditEmitter()
    plugin = emitter.plugin_manager.get_plugin("collector")
    assert isinstance(plugin, module.Collector)
    maker = sessionmaker()
    emitter.attach(maker)
    commit_one(maker, "a")
    assert plugin.events == ["a"]
    [dist] = [
        dist
        for registered, dist in emitter.plugin_manager.list_plugin_distinfo()
        if registered is plugin
    ]
    assert dist.metadata["Name"] == "fake-audit-plugin"


def test_an_entry_point_naming_a_module_registers_the_module(
    install: Install,
) -> None:
    """A module is registered as it is and receives events."""
    module = install({"collector": "{module}"})
    emitter = AuditEmitter()
    assert emitter.plugin_manager.get_plugin("collector") is module
    maker = sessionmaker()
    emitter.attach(maker)
    commit_one(maker, "a")
    assert module.received == ["a"]


def test_an_entry_point_naming_a_class_that_needs_arguments_is_refused(
    install: Install,
) -> None:
    """Loading fails at once, naming the entry point, distribution and class, and the fix."""
    module = install({"needs_url": "{module}:NeedsUrl"})
    with pytest.raises(AuditConfigurationError) as caught:
        AuditEmitter()
    message = str(caught.value)
    assert "entry point 'needs_url'" in message
    assert "fake-audit-plugin 1.0" in message
    assert f"{module.__name__}.NeedsUrl" in message
    assert "missing 1 required positional argument: 'url'" in message
    assert "give each parameter of its __init__ a default" in message
    assert isinstance(caught.value.__cause__, TypeError)


def test_an_import_string_naming_a_class_that_needs_arguments_is_refused(
    install: Install,
) -> None:
    """``ACCESS_AUDIT_PLUGINS``, ``--plugin``: the same error, naming the setting."""
    module = install({})
    spec = f"{module.__name__}:NeedsUrl"
    with pytest.raises(AuditConfigurationError) as caught:
        import_plugin(spec, "ACCESS_AUDIT_PLUGINS")
    assert str(caught.value).startswith(
        f"ACCESS_AUDIT_PLUGINS: {spec!r} names the class"
    )
