"""Plugins named by import strings (config files, command lines, entry points)."""

from __future__ import annotations

import importlib

from ._errors import AuditConfigurationError

__all__ = ["import_plugin", "plugin_from"]


def import_plugin(spec: str, setting: str) -> object:
    """Import ``"package.module:object"`` (or a module); instantiate a class.

    A class is a plugin factory: see :func:`plugin_from`.

    :raises AuditConfigurationError: the string cannot be imported, or names
        a class that cannot be instantiated; the message names *setting* and
        the string.
    """
    if not isinstance(spec, str) or not spec:
        raise AuditConfigurationError(
            f"{setting}: expected an import string such as 'package.module:object', "
            f"got {spec!r}"
        )
    module_name, _, attribute = spec.partition(":")
    try:
        found: object = importlib.import_module(module_name)
        for part in filter(None, attribute.split(".")):
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        raise AuditConfigurationError(
            f"{setting}: cannot import {spec!r} ({error}); use "
            "'package.module:object' or 'package.module'"
        ) from error
    return plugin_from(found, f"{setting}: {spec!r}")


def plugin_from(found: object, origin: str) -> object:
    """The plugin that *found* stands for: an instance if it is a class, else itself.

    A class is a plugin factory: its hook methods need an instance, so it is
    called with no arguments.

    :raises AuditConfigurationError: the class cannot be instantiated so;
        the message starts with *origin*, which says where it was named.
    """
    if not isinstance(found, type):
        return found
    try:
        return found()
    except Exception as error:
        raise AuditConfigurationError(
            f"{origin} names the class {found.__module__}.{found.__qualname__}, "
            f"which cannot be instantiated with no arguments "
            f"({type(error).__name__}: {error}); give each parameter of its "
            "__init__ a default, or name an instance or a module instead"
        ) from error
