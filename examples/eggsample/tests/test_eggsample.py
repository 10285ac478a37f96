"""examples/eggsample: the installed access-audit-eggsample package.

pip installed it (``tests/requirements.txt``), so its entry point registers
:mod:`access_audit_eggsample.plugin` with every emitter that loads entry
points; the module keeps what it received in two lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from access_audit_eggsample import plugin as eggsample
from support import Recorder, commit_two_events

from access_audit import AuditEmitter, AuditEventEnvelope


@pytest.fixture
def eggsample_received() -> Iterator[list[AuditEventEnvelope]]:
    """The example package's ``received`` list, cleared before and after."""
    eggsample.received.clear()
    eggsample.batches.clear()
    yield eggsample.received
    eggsample.received.clear()
    eggsample.batches.clear()


@pytest.mark.parametrize(
    "make",
    [lambda: AuditEmitter(load_entrypoints=True), lambda: AuditEmitter()],
    ids=["load_entrypoints-true", "default"],
)
def test_entry_points_load_the_installed_example_plugin(
    eggsample_received: list[AuditEventEnvelope], make: Callable[[], AuditEmitter]
) -> None:
    """load_entrypoints=True (the default) registers examples/eggsample's plugin."""
    emitter = make()
    assert emitter.plugin_manager.get_plugin("eggsample") is eggsample
    names = commit_two_events(emitter)
    assert [envelope.target_id for envelope in eggsample_received] == names
    assert [len(batch) for batch in eggsample.batches] == [2]
    assert "eggsample" in repr(emitter)


def test_entry_points_are_not_loaded_when_disabled(
    eggsample_received: list[AuditEventEnvelope],
) -> None:
    """load_entrypoints=False leaves the installed example plugin out."""
    recorder = Recorder()
    emitter = AuditEmitter([recorder], load_entrypoints=False)
    assert emitter.plugin_manager.get_plugin("eggsample") is None
    assert not emitter.plugin_manager.is_registered(eggsample)
    commit_two_events(emitter)
    assert recorder.names == ["x", "y"]
    assert eggsample_received == []
    assert eggsample.batches == []
