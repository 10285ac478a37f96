"""What every test in this repository shares, the example packages' own included.

The root ``pyproject.toml`` is pytest's configuration for a run started
anywhere below this folder, so pytest loads this file whether it runs the
whole suite or one package's tests alone (``pytest examples/plugins/s3/tests``):
the same ``filterwarnings = error`` and ``--strict-markers`` apply, and
``tests/support.py`` gives every test the same models, recording plugins and
rule for a server that is down (skipped locally, a failure under ``CI=true``).
The core suite's own fixtures are in ``tests/conftest.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine

# The packages' tests import tests/support.py as ``support``, as the core suite
# does, also when tests/ itself is not collected.
sys.path.insert(0, str(Path(__file__).parent / "tests"))

from support import Base


@pytest.fixture
def memory_engine() -> Iterator[Engine]:
    """An in-memory SQLite database with the test tables."""
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()
