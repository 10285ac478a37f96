"""``changes(obj)``: what the transaction changed in an object's columns, as a
lazy payload value.

The old values are taken when ``changes()`` is called: from SQLAlchemy's
attribute history for changes not flushed yet, from the object for the
attributes it has loaded, and with one SELECT for those it has not. The new
values are read when the lazy value is resolved, after the commit's final
flush. Comparing the two covers every flush in between, and SAVEPOINTs rolled
back (SQLAlchemy expires what they touched, so the new values are read back
from the database), without a listener: a session that never stages
``changes()`` pays nothing for it.
"""

from __future__ import annotations

import copy
import datetime
import decimal
import enum
import math
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Column, inspect, select
from sqlalchemy.orm import InstanceState, Mapper, Session

from ._sqla import flushed_in_transaction, in_greenlet, is_flushing

__all__ = ["Changes", "changes"]


def changes(
    obj: object,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> Changes:
    """A lazy payload value: the column attributes of *obj* that this
    transaction changed, as ``{attribute: [old, new]}``.

    Put it in a payload (``payload={"changes": changes(group)}``); it
    resolves, with the other lazy values, after the commit's final flush.
    *old* is the value before this transaction changed it and *new* the value
    after its final flush, so changes flushed after this call, in several
    flushes or in SAVEPOINTs, are all counted, and an attribute whose value
    ends where it started (changed back, or undone by a rolled-back
    SAVEPOINT) is not reported. An object inserted by the transaction
    reports ``[None, new]`` for each attribute that is not NULL, one deleted
    reports ``[old, None]``, one inserted and deleted (or whose insert was
    rolled back with a SAVEPOINT) reports ``{}``.

    Only attributes mapped to table columns count (not relationships, nor
    ``column_property`` SQL expressions); keys are attribute names, in
    mapping order. ``datetime``, ``date`` and ``time`` values become ISO 8601
    text, ``Decimal`` and ``UUID`` become ``str``, an ``Enum`` member its
    value; anything else must be a JSON value, as for any payload, and the
    emitter's ``redact_keys`` and ``max_payload_bytes`` apply.

    Call it before the changes are flushed: an UPDATE flushed earlier in the
    transaction has overwritten the old values (queries autoflush, and so
    does ``begin_nested()``). It may run one SELECT, for the columns the
    session has not loaded (expired by an earlier commit, or deferred).

    :param include: report only these attributes.
    :param exclude: leave these attributes out.
    :raises TypeError: *obj* is not an instance of a mapped class, or
        *include*/*exclude* is one string.
    :raises ValueError: *include* or *exclude* names an attribute that is
        not a column attribute of *obj*'s class; *obj* is detached; with an
        ``AsyncSession``, the old values need a SELECT (load them first).
    :raises RuntimeError: *obj* was updated or deleted by a flush of this
        transaction already.
    """
    state = inspect(obj, raiseerr=False)
    if not isinstance(state, InstanceState):
        raise TypeError(
            f"changes() takes an instance of a mapped class, got {type(obj).__name__}"
        )
    keys = _column_keys(state.mapper, include, exclude)
    return Changes(obj, keys, _old_values(obj, state, keys))


class Changes:
    """The lazy value :func:`changes` returns: called once, after the
    commit's final flush, it returns ``{attribute: [old, new]}``."""

    __slots__ = ("_keys", "_obj", "_old")

    def __init__(
        self, obj: object, keys: tuple[str, ...], old: dict[str, Any] | None
    ) -> None:
        self._obj = obj
        self._keys = keys
        self._old = old
        """The values before this transaction; None for an object it inserts."""

    def __call__(self) -> dict[str, list[Any]]:
        obj = self._obj
        state: InstanceState[Any] = inspect(obj)
        new: dict[str, Any] | None
        if state.persistent:
            # Loads what the flushes expired (server defaults, a rolled-back
            # SAVEPOINT's rows): the values the database has now.
            new = {key: getattr(obj, key) for key in self._keys}
        elif state.detached and not state.was_deleted:
            raise ValueError(
                f"{_describe(obj, state)} was detached from its session before "
                "the commit, so its new values cannot be read"
            )
        else:  # deleted, or never inserted (transient again after a rollback)
            new = None
        old = self._old
        found: dict[str, list[Any]] = {}
        for key in self._keys:
            before = None if old is None else old[key]
            after = None if new is None else new[key]
            if not _equal(before, after):
                found[key] = [_json_value(before), _json_value(after)]
        return found

    def __repr__(self) -> str:
        return f"<changes of {_describe(self._obj, inspect(self._obj))}>"


def _column_keys(
    mapper: Mapper[Any],
    include: Iterable[str] | None,
    exclude: Iterable[str] | None,
) -> tuple[str, ...]:
    """The attributes to compare: the mapper's column attributes, filtered.

    :raises TypeError, ValueError: see :func:`changes`.
    """
    known = [
        prop.key
        for prop in mapper.column_attrs
        if all(isinstance(column, Column) for column in prop.columns)
    ]
    chosen = known
    for option, names in (("include", include), ("exclude", exclude)):
        if names is None:
            continue
        if isinstance(names, str):
            raise TypeError(
                f"{option} must be a collection of attribute names, not one "
                f"string: use ({names!r},)"
            )
        listed = list(names)
        unknown = [name for name in listed if name not in known]
        if unknown:
            raise ValueError(
                f"changes(): {option} names {unknown}, which are not column "
                f"attributes of {mapper.class_.__name__} (those are {known})"
            )
        if option == "include":
            chosen = [key for key in chosen if key in listed]
        else:
            chosen = [key for key in chosen if key not in listed]
    return tuple(chosen)


def _old_values(
    obj: object, state: InstanceState[Any], keys: tuple[str, ...]
) -> dict[str, Any] | None:
    """*obj*'s values before this transaction changed them; None if the
    transaction inserts it (or will: it is transient or pending now).

    :raises ValueError, RuntimeError: see :func:`changes`.
    """
    if state.transient or state.pending:
        return None
    session = state.session
    if session is None:
        raise ValueError(
            f"changes(): {_describe(obj, state)} is detached; call changes() "
            "once it is in the session that changes it (session.add() it)"
        )
    flushed = flushed_in_transaction(session, state)
    if flushed == "inserted":
        return None
    if flushed is not None or state.deleted:
        raise RuntimeError(
            f"changes(): {_describe(obj, state)} was already written by a "
            "flush of this transaction, so the values it had before are no "
            "longer known; call changes() before the flush (before changing "
            "the object: queries autoflush, and so does begin_nested())"
        )
    old: dict[str, Any] = {}
    unloaded = []
    for key in keys:
        added, unchanged, deleted = state.attrs[key].history
        if deleted:  # changed since it was loaded: what it was loaded as
            old[key] = _copied(deleted[0])
        elif unchanged:
            old[key] = _copied(unchanged[0])
        else:  # not loaded, or set while expired: the database has it
            if added and is_flushing(session):
                raise RuntimeError(
                    f"changes(): {type(obj).__name__}.{key} was set while "
                    "expired, so its old value was never loaded, and inside a "
                    "flush the database may hold the new one already; load it "
                    "before setting it, or call changes() before the flush"
                )
            unloaded.append(key)
    if unloaded:
        old.update(_select(session, obj, state, unloaded))
    return old


def _select(
    session: Session, obj: object, state: InstanceState[Any], keys: list[str]
) -> dict[str, Any]:
    """The database's values of *keys* for *obj*'s row (not autoflushing:
    pending changes are not in it yet)."""
    if state.async_session is not None and not in_greenlet():
        raise ValueError(
            f"changes(): {_describe(obj, state)} has not loaded {keys}, and an "
            "AsyncSession cannot load them here; load them before changing the "
            "object (await session.refresh(obj, [...])), or leave them out "
            "with exclude="
        )
    mapper = state.mapper
    statement = select(*[mapper.attrs[key].class_attribute for key in keys]).where(
        *[
            column == value
            for column, value in zip(
                mapper.primary_key, state.identity or (), strict=True
            )
        ]
    )
    with session.no_autoflush:
        row = session.execute(statement).one_or_none()
    if row is None:
        raise ValueError(
            f"changes(): {_describe(obj, state)} has no row in the database "
            "(deleted by a statement the session did not track?)"
        )
    return {key: _copied(value) for key, value in zip(keys, row, strict=True)}


def _copied(value: Any) -> Any:
    # A JSON or ARRAY column's value may be changed in place later (with
    # sqlalchemy.ext.mutable): keep the old one as it is now.
    if isinstance(value, (dict, list)):
        return copy.deepcopy(value)
    return value


def _equal(before: Any, after: Any) -> bool:
    """Whether an attribute's value is unchanged: equal, or unequal only for
    NaNs in the same places (NaN equals nothing, itself included, so a NaN
    read again, alone or in a JSON or ARRAY value, is no change)."""
    if before is after:
        return True
    try:
        if before == after:
            return True
    except Exception:  # an == that returns no bool (arrays): a change
        return False
    if isinstance(before, (list, tuple)) and isinstance(after, (list, tuple)):
        return len(before) == len(after) and all(map(_equal, before, after))
    if isinstance(before, dict) and isinstance(after, dict):
        return before.keys() == after.keys() and all(
            _equal(value, after[key]) for key, value in before.items()
        )
    return _is_nan(before) and _is_nan(after)


def _is_nan(value: Any) -> bool:
    if isinstance(value, decimal.Decimal):
        return value.is_nan()
    return isinstance(value, float) and value != value


def _json_value(value: Any) -> Any:
    """Column values JSON has no type for, as text (or an Enum's value);
    a float's NaN and infinities as ``"NaN"``, ``"Infinity"`` and
    ``"-Infinity"``, inside a JSON or ARRAY value too."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, (list, tuple)):  # a JSON or ARRAY value
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, enum.Enum) and not isinstance(value, (str, int)):
        return value.value
    return value


def _describe(obj: object, state: InstanceState[Any]) -> str:
    identity = state.identity
    if identity is None:
        return f"a new {type(obj).__name__}"
    key = identity[0] if len(identity) == 1 else identity
    return f"{type(obj).__name__} {key!r}"
