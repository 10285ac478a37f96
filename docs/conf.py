"""Sphinx configuration for the access_audit documentation.

Why Sphinx, with the furo theme and MyST-Parser: the library's docstrings
already use Sphinx field lists (``:param:``, ``:raises:``) and roles
(``:class:``, ``:meth:``), which autodoc renders as they are, so the API
reference is generated from the code with no docstring rewritten; MyST lets
the pages themselves stay Markdown, like the README they grew out of, and
readable on a forge as they are.

Build, with warnings as errors and nothing fetched from the network (no
intersphinx)::

    python -m sphinx -W --keep-going -n -b html docs docs/_build/html
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.nodes import make_refnode

project = "access_audit"
author = "access_audit contributors"
project_copyright = "access_audit contributors"

extensions = ["myst_parser", "sphinx.ext.autodoc"]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = "access_audit"
html_static_path = ["_static"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

# The public paths the reference documents; a name defined in a private
# module links to its public path when it has one.
PUBLIC_MODULES = (
    "access_audit",
    "access_audit.signals",
    "access_audit.outbox",
    "access_audit.sinks",
    "access_audit.testing",
    "access_audit.flask",
)

# Without intersphinx, names from the standard library and the libraries
# access_audit builds on have nothing to link to: they stay plain text. A
# bare name is a type imported only for type checking.
EXTERNAL = (
    r"(asyncio|builtins|collections|contextvars|datetime|json|logging|os|threading"
    r"|types|typing|uuid|sqlalchemy|flask|flask_sqlalchemy|werkzeug|pluggy"
    r"|blinker|pytest)(\..+)?"
)
BARE_EXTERNAL = (
    r"AsyncConnection|AsyncEngine|AsyncSession|Connection|Engine|Flask|MetaData"
    r"|Session|SQLAlchemy"
    r"|Table|scoped_session|sessionmaker|timedelta"
)
nitpick_ignore_regex = [(r"py:.*", EXTERNAL), (r"py:.*", BARE_EXTERNAL)]


def _private_modules() -> list[ModuleType]:
    """access_audit's private modules, imported (once)."""
    if not _PRIVATE_MODULES:
        for package in PUBLIC_MODULES:
            found = importlib.import_module(package)
            for info in pkgutil.iter_modules(getattr(found, "__path__", [])):
                # Private modules only: never __main__, which runs the CLI.
                if info.name.startswith("_") and not info.name.startswith("__"):
                    name = f"{package}.{info.name}"
                    _PRIVATE_MODULES.append(importlib.import_module(name))
    return _PRIVATE_MODULES


_PRIVATE_MODULES: list[ModuleType] = []


def _is_private(target: str) -> bool:
    """Whether *target* names something of access_audit's private modules."""
    module, _, name = target.rpartition(".")
    parts = module.split(".") if module else []
    if parts and parts[0] != "access_audit":
        return False
    if any(part.startswith("_") for part in parts):
        return True
    # A bare name, or one the reference does not document under a public path.
    return any(name in vars(module) for module in _private_modules())


def resolve_private_names(
    app: Sphinx, env: BuildEnvironment, node: Any, contnode: nodes.Element
) -> nodes.Element | None:
    """Link a private path of a public name to the public path, else plain text.

    Signatures show the module a name is defined in (``access_audit._staged``)
    or a private type alias the reference does not document: neither is a
    broken link to report.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    if not _is_private(target):
        return None
    name = target.rpartition(".")[2]
    objects = env.get_domain("py").objects
    for module in PUBLIC_MODULES:
        found = objects.get(f"{module}.{name}")
        if found is not None:
            return make_refnode(
                app.builder, node["refdoc"], found.docname, found.node_id, contnode
            )
    return contnode


def dataclass_factory_defaults(
    app: Sphinx,
    what: str,
    name: str,
    obj: object,
    options: object,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None] | None:
    """Show a dataclass field's ``default_factory`` as ``...``.

    Its repr, ``<factory>``, is not Python, so the signature could not be
    parsed and its annotations would be split at every comma.
    """
    if signature is None or "= <factory>" not in signature:
        return None
    return signature.replace("= <factory>", "= ..."), return_annotation


def reexported_docstrings(
    app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    """Give re-exported data the docstring written where it is defined.

    A constant or type alias re-exported from a private module
    (``access_audit.DiscardReason``) has its docstring after its assignment
    in that module, which autodoc reads only for the module it documents;
    without this it would show the docstring of the value's type.
    """
    if what != "data" or not name.startswith("access_audit."):
        return
    short = name.rpartition(".")[2]
    for module in _private_modules():
        if vars(module).get(short, lines) is obj:  # defined or imported there
            docs = ModuleAnalyzer.for_module(module.__name__).find_attr_docs()
            if ("", short) in docs:
                lines[:] = list(docs["", short])
                return


def setup(app: Sphinx) -> None:
    app.connect("missing-reference", resolve_private_names)
    app.connect("autodoc-process-signature", dataclass_factory_defaults)
    app.connect("autodoc-process-docstring", reexported_docstrings)
