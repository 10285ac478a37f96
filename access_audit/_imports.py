"""Plugins named by import strings (config files, command lines)."""

from __future__ import annotations

import importlib

from ._errors import AuditConfigurationError

__all__ = ["import_plugin"]


def import_plugin(spec: str, setting: str) -> object:
    """Import ``"package.module:object"`` (or a module); instantiate a class.

    A class is a plugin factory: its hook methods need an instance, so it is
    called with no arguments.

    :raises AuditConfigurationError: the string cannot be imported; the
        message names *setting* and the string.
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
    return found() if isinstance(found, type) else found
