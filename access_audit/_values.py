"""JSON-only, read-only copies of the values an event carries, and lazy values.

Everything an event carries is copied when it is staged, so that later changes
to the caller's objects do not change the event, and frozen, so that no plugin
can change what another plugin (or the outbox) sees.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

__all__ = ["ReadOnlyDict", "ReadOnlyList", "freeze_json", "resolve_lazy", "thaw"]

# Deep enough for any real payload; stops a self-referencing structure early
# with a clear message instead of a RecursionError.
_MAX_DEPTH = 32


def _read_only(self: object, *args: object, **kwargs: object) -> NoReturn:
    raise TypeError(
        f"{type(self).__name__} is read-only: an audit event's payload and "
        "metadata cannot be changed after staging; copy it first "
        "(dict(value) or list(value))"
    )


class ReadOnlyDict(dict):  # type: ignore[type-arg]
    """A ``dict`` that refuses changes; still a dict for ``json.dumps``."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self) -> tuple[type[ReadOnlyDict], tuple[dict[str, Any]]]:
        # Copies (pickle, copy.deepcopy) stay read-only.
        return (type(self), (dict(self),))

    def __repr__(self) -> str:
        return dict.__repr__(self)


class ReadOnlyList(list):  # type: ignore[type-arg]
    """A ``list`` that refuses changes; still a list for ``json.dumps``."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only
    append = extend = insert = pop = remove = clear = sort = reverse = _read_only

    def __reduce__(self) -> tuple[type[ReadOnlyList], tuple[list[Any]]]:
        return (type(self), (list(self),))

    def __repr__(self) -> str:
        return list.__repr__(self)


def freeze_json(
    value: Any, where: str, *, lazy_ok: bool = False, depth: int = 0
) -> Any:
    """Return a read-only copy of *value* made of plain JSON types.

    ``where`` names the value in error messages (``payload['roles'][2]``).
    With ``lazy_ok``, zero-argument callables are kept as they are, to be
    replaced by :func:`resolve_lazy` later.

    :raises TypeError: a value JSON cannot represent, or a non-``str`` key.
    :raises ValueError: a float that is NaN or infinite, or nesting deeper than
        32 levels.
    """
    kind = type(value)
    if value is None or kind is str or kind is int or kind is bool:
        return value
    if kind is float:
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value!r}, which JSON cannot represent")
        return value
    if depth >= _MAX_DEPTH:
        raise ValueError(f"{where} is nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, Mapping):
        frozen = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{where} has the key {key!r} of type {type(key).__name__}; "
                    "JSON object keys must be str"
                )
            frozen[str.__str__(key)] = freeze_json(
                item, f"{where}[{key!r}]", lazy_ok=lazy_ok, depth=depth + 1
            )
        return ReadOnlyDict(frozen)
    if isinstance(value, (list, tuple)):
        return ReadOnlyList(
            freeze_json(item, f"{where}[{index}]", lazy_ok=lazy_ok, depth=depth + 1)
            for index, item in enumerate(value)
        )
    # Subclasses of the plain types (str and int enums, say) become the plain
    # type, as json.dumps would write them.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return freeze_json(float(value), where)
    if lazy_ok and callable(value):
        return value
    raise TypeError(
        f"{where} is a {kind.__name__}, which is not JSON-serialisable; "
        "convert it to str, int, float, bool, None, a list or a dict first"
    )


def has_lazy(value: Any) -> bool:
    """Whether a value made by ``freeze_json(..., lazy_ok=True)`` holds callables."""
    if isinstance(value, dict):
        return any(has_lazy(item) for item in value.values())
    if isinstance(value, list):
        return any(has_lazy(item) for item in value)
    return callable(value)


def resolve_lazy(value: Any, where: str) -> Any:
    """Call every callable left in *value* and freeze what it returns.

    :raises ValueError: a callable raised (chained) or returned a non-JSON value.
    """
    if isinstance(value, dict):
        return ReadOnlyDict(
            {
                key: resolve_lazy(item, f"{where}[{key!r}]")
                for key, item in value.items()
            }
        )
    if isinstance(value, list):
        return ReadOnlyList(
            resolve_lazy(item, f"{where}[{index}]") for index, item in enumerate(value)
        )
    if callable(value):
        return freeze_json(call_lazy(value, where), where)
    return value


def call_lazy(function: Callable[[], Any], where: str) -> Any:
    """Call a lazy value, naming it in the error if it raises."""
    try:
        return function()
    except Exception as error:
        raise ValueError(f"the lazy value for {where} raised {error!r}") from error


def thaw(value: Any) -> Any:
    """Return a plain, mutable ``dict``/``list`` copy of a frozen value."""
    if isinstance(value, dict):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, list):
        return [thaw(item) for item in value]
    return value
