"""JSON-only, read-only copies of the values an event carries, and lazy values.

Everything an event carries is copied when it is staged, so that later changes
to the caller's objects do not change the event, and frozen, so that no plugin
can change what another plugin (or the outbox) sees.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

__all__ = [
    "EMPTY",
    "MAX_INT_DIGITS",
    "REDACTED",
    "PayloadRules",
    "ReadOnlyDict",
    "ReadOnlyList",
    "check_text",
    "compact_json",
    "fast_json",
    "freeze_json",
    "freeze_parsed",
    "int_text",
    "json_size",
    "refuse_async_lazy",
    "resolve_lazy",
    "thaw",
]

_stdlib_json: Callable[[Any], str] = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":")
).encode
"""``json.dumps(value, ensure_ascii=False, separators=(",", ":"))``, with its
encoder made once (``dumps`` with options makes one per call)."""

_fast_dumps: Callable[[Any], bytes] | None
try:  # the ``fast`` extra: binary wheels, no compiler needed
    from orjson import dumps as _fast_dumps
except ImportError:  # pragma: no cover - depends on the environment
    _fast_dumps = None


def compact_json(value: Any) -> str:
    """*value* (JSON types only, as :func:`freeze_json` leaves them) as
    compact JSON, non-ASCII text as it is: what the outbox stores and
    ``max_payload_bytes`` measures (:func:`json_size`).

    Through orjson when it is installed (the ``fast`` extra), a few times
    faster than the standard library on the commit path. It writes the same
    JSON but for the spelling of some floats (``1e-7`` for ``1e-07``,
    ``0.00002771`` for ``2.771e-05``: the same numbers when read back), so
    :func:`json_size` measures through the same encoder. What orjson refuses
    (an int beyond 64 bits) goes to the standard library: a payload measured
    through orjson is written so too, unless the envelope's metadata holds
    such an int (then each such float may take a byte more).
    """
    return _compact_utf8(value).decode()


def json_size(value: Any) -> int:
    """The size in bytes of :func:`compact_json` of *value*, as UTF-8."""
    return len(_compact_utf8(value))


def fast_json(value: Any) -> str | None:
    """*value* as compact JSON through orjson, for a value the standard
    library does not take as it is (a dataclass); None where orjson is not
    installed or refuses it (an int beyond 64 bits), for the caller to take
    the standard library's way."""
    if _fast_dumps is None:
        return None
    try:
        return _fast_dumps(value).decode()
    except TypeError:
        return None


def _compact_utf8(value: Any) -> bytes:
    if _fast_dumps is not None:
        try:
            return _fast_dumps(value)
        except TypeError:
            pass
    return _stdlib_json(value).encode()


# Deep enough for any real payload; stops a self-referencing structure early
# with a clear message instead of a RecursionError.
_MAX_DEPTH = 32

MAX_INT_DIGITS = 4300
"""The most decimal digits an int in an event may have.

It is Python's default ``sys.get_int_max_str_digits()``, beyond which
``json.dumps`` raises. It is fixed here rather than read from ``sys``: an
envelope is encoded in other processes too (sinks, the outbox relay), which
have the default limit whatever this one set.
"""
_SAFE_INT_BITS = 14_284
"""Every int of at most this many bits has at most 4,300 digits (2**14284 <
10**4300), so only longer ints need counting."""
_TOO_MANY_DIGITS = 10**MAX_INT_DIGITS


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


REDACTED = "[REDACTED]"
"""What a redacted value becomes."""


@dataclasses.dataclass(frozen=True, slots=True)
class PayloadRules:
    """An emitter's rules for what payload and metadata may hold."""

    redact: frozenset[str] = frozenset()
    """Casefolded key names whose values become ``"[REDACTED]"``, at any depth."""
    max_payload_bytes: int | None = None
    """Largest payload, as compact UTF-8 JSON; None for no limit."""
    max_field_bytes: int | None = None
    """Largest target id, target name, reason, actor id or email, and
    metadata, each as JSON in an outbox row (the outbox's
    ``max_payload_bytes``); None without an outbox."""

    @classmethod
    def build(
        cls,
        redact_keys: Iterable[str],
        max_payload_bytes: int | None,
        max_field_bytes: int | None = None,
    ) -> PayloadRules:
        """Check an emitter's options and make its rules.

        :raises TypeError: ``redact_keys`` is a single string or holds a
            non-string; ``max_payload_bytes`` is not an int.
        :raises ValueError: ``max_payload_bytes`` is not positive.
        """
        if isinstance(redact_keys, str):
            raise TypeError(
                "redact_keys must be a collection of key names, not one string: "
                f"use ({redact_keys!r},)"
            )
        keys = list(redact_keys)
        for key in keys:
            if not isinstance(key, str):
                raise TypeError(f"redact_keys must hold str, got {type(key).__name__}")
        if max_payload_bytes is not None:
            if isinstance(max_payload_bytes, bool) or not isinstance(
                max_payload_bytes, int
            ):
                raise TypeError("max_payload_bytes must be an int or None")
            if max_payload_bytes <= 0:
                raise ValueError("max_payload_bytes must be positive")
        return cls(
            frozenset(key.casefold() for key in keys),
            max_payload_bytes,
            max_field_bytes,
        )

    def check_size(self, payload: Mapping[str, Any], event_type: str) -> None:
        """Raise if a resolved payload is larger than ``max_payload_bytes``.

        :raises ValueError: naming the event type, the size and the limit.
        """
        if self.max_payload_bytes is None:
            return
        size = json_size(payload)
        if size > self.max_payload_bytes:
            raise ValueError(
                f"event {event_type!r}: payload is {size} bytes as JSON, more than "
                f"max_payload_bytes={self.max_payload_bytes}; store large data "
                "elsewhere and put a reference in the payload"
            )

    def check_fields(
        self, event_type: str, texts: Iterable[tuple[str, Any]], metadata: Any
    ) -> None:
        """Raise if one of *texts* (field name, value) or *metadata* is larger,
        as JSON, than ``max_field_bytes``: with the payload, they make an
        outbox row, which must fit in one statement to the database.

        :raises ValueError: naming the event type, the field, its size and
            the limit.
        """
        limit = self.max_field_bytes
        if limit is None:
            return
        for field, text in texts:
            # A character takes six bytes at most, as a \uXXXX escape, and
            # the quotes two more. A lazy value (not a str yet) is checked
            # once the commit resolves it.
            if type(text) is str and len(text) * 6 + 2 > limit:
                self._check_field(event_type, field, text, limit)
        if metadata:
            self._check_field(event_type, "metadata", metadata, limit)

    @staticmethod
    def _check_field(event_type: str, field: str, value: Any, limit: int) -> None:
        size = json_size(value)
        if size > limit:
            raise ValueError(
                f"event {event_type!r}: {field} is {size} bytes as JSON, more "
                f"than the outbox's max_payload_bytes={limit} (its limit for "
                "each field of a row); store large data elsewhere and put a "
                "reference in the event"
            )


NO_RULES = PayloadRules()

EMPTY: Mapping[str, Any] = ReadOnlyDict()
"""The payload or metadata of an event that has none (shared: it is read-only)."""


def _int_problem(value: int) -> str | None:
    if value.bit_length() <= _SAFE_INT_BITS or abs(value) < _TOO_MANY_DIGITS:
        return None
    return (
        f"is an int of more than {MAX_INT_DIGITS} digits, which JSON encoders "
        "refuse (Python's default int-to-str limit); pass it as a str"
    )


def _text_problem(text: str) -> str | None:
    # Only ASCII can be ruled out in O(1); UTF-8 encodes every code point but
    # the surrogates, so a failed encode means one of those.
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return (
            f"holds a lone surrogate ({text[error.start]!r} at index "
            f"{error.start}), which UTF-8 cannot encode; decode the text it "
            "came from properly first (bytes.decode(errors='replace'), say)"
        )
    return None


def int_text(value: int, where: str) -> str:
    """Return *value* in decimal, refusing more than :data:`MAX_INT_DIGITS` digits.

    :raises ValueError: naming ``where`` and saying to pass it as a str; also
        when this process lowered ``sys.set_int_max_str_digits`` below the
        int's length.
    """
    if value.bit_length() > _SAFE_INT_BITS:
        problem = _int_problem(value)
        if problem is not None:
            raise ValueError(f"{where} {problem}")
    try:
        return str(value)
    except ValueError as error:
        raise ValueError(
            f"{where} is an int of more digits than this process's "
            "sys.get_int_max_str_digits() allows; pass it as a str"
        ) from error


def check_text(value: str, where: str) -> None:
    """Raise if *value* holds a lone surrogate, which UTF-8 cannot encode.

    Such strings come from decoding with ``errors="surrogateescape"`` or from
    unpaired ``\\ud800``-style JSON escapes; ``json.dumps`` escapes them by
    default, but every UTF-8 writer fails on them (files, HTTP bodies,
    database columns). Cheap for ASCII (one ``isascii()``).

    :raises ValueError: naming ``where``, the code point and its index.
    """
    problem = _text_problem(value)
    if problem is not None:
        raise ValueError(f"{where} {problem}")


class _BadValue(Exception):
    """A value that cannot go into an event; its path is filled in on the way up.

    Building the path (``payload['a'][2]``) only when something is wrong
    keeps the common case cheap.
    """

    def __init__(self, kind: type[Exception], message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.path: list[str | int] = []

    def reraise(self, where: str) -> NoReturn:
        location = where + "".join(f"[{step!r}]" for step in reversed(self.path))
        raise self.kind(f"{location} {self.message}") from self.__cause__


def freeze_json(
    value: Any, where: str, *, lazy_ok: bool = False, rules: PayloadRules = NO_RULES
) -> Any:
    """Return a read-only copy of *value* made of plain JSON types.

    ``where`` names the value in error messages (``payload['roles'][2]``).
    With ``lazy_ok``, zero-argument callables are kept as they are, to be
    replaced by :func:`resolve_lazy` later. Keys named in ``rules.redact``
    (any case, any depth) get ``"[REDACTED]"`` as their value, which is then
    neither checked nor, if lazy, ever called.

    :raises TypeError: a value JSON cannot represent, or a non-``str`` key.
    :raises ValueError: a float that is NaN or infinite, an int of more than
        :data:`MAX_INT_DIGITS` digits, a string or key holding a lone
        surrogate, or nesting deeper than 32 levels.
    """
    try:
        return _freeze(value, lazy_ok, rules.redact, 0)
    except _BadValue as bad:
        bad.reraise(where)


def freeze_parsed(value: Any) -> Any:
    """A read-only copy of JSON this library wrote and ``json.loads`` parsed
    (dicts, lists and scalars only), without :func:`freeze_json`'s checks."""
    kind = type(value)
    if kind is dict:
        return ReadOnlyDict(
            {
                key: freeze_parsed(item) if type(item) in _CONTAINERS else item
                for key, item in value.items()
            }
        )
    if kind is list:
        return ReadOnlyList(
            [
                freeze_parsed(item) if type(item) in _CONTAINERS else item
                for item in value
            ]
        )
    return value


_CONTAINERS = (dict, list)


def freeze_payload(
    payload: Mapping[str, Any], rules: PayloadRules
) -> tuple[Mapping[str, Any], bool]:
    """Freeze a staged payload; also say whether it holds lazy values.

    :raises TypeError, ValueError: as :func:`freeze_json` does.
    """
    if type(payload) is dict and not rules.redact:
        # The common payload: a flat dict of ASCII strings, ints that are not
        # huge, bools and None. Anything else takes the full walk below.
        for key, item in payload.items():
            if type(key) is not str or not key.isascii():
                break
            kind = type(item)
            if kind is str:
                if not item.isascii():
                    break
            elif kind is int:
                if item.bit_length() > _SAFE_INT_BITS:
                    break
            elif item is not None and kind is not bool:
                break
        else:
            return ReadOnlyDict(payload), False
    frozen = freeze_json(payload, "payload", lazy_ok=True, rules=rules)
    return frozen, has_lazy(frozen)


def _freeze(value: Any, lazy_ok: bool, redact: frozenset[str], depth: int) -> Any:
    kind = type(value)
    if kind is str:
        if not value.isascii():
            _refuse(_text_problem(value))
        return value
    if kind is int:
        if value.bit_length() > _SAFE_INT_BITS:
            _refuse(_int_problem(value))
        return value
    if value is None or kind is bool:
        return value
    if kind is float:
        if not math.isfinite(value):
            raise _BadValue(ValueError, f"is {value!r}, which JSON cannot represent")
        return value
    if depth >= _MAX_DEPTH:
        raise _BadValue(ValueError, f"is nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, Mapping):
        frozen = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _BadValue(
                    TypeError,
                    f"has the key {key!r} of type {type(key).__name__}; "
                    "JSON object keys must be str",
                )
            key = str.__str__(key)
            if not key.isascii():
                problem = _text_problem(key)
                if problem is not None:
                    raise _BadValue(ValueError, f"has the key {key!r}: it {problem}")
            if redact and key.casefold() in redact:
                frozen[key] = REDACTED
                continue
            try:
                frozen[key] = _freeze(item, lazy_ok, redact, depth + 1)
            except _BadValue as bad:
                bad.path.append(key)
                raise
        return ReadOnlyDict(frozen)
    if isinstance(value, (list, tuple)):
        items = []
        for index, item in enumerate(value):
            try:
                items.append(_freeze(item, lazy_ok, redact, depth + 1))
            except _BadValue as bad:
                bad.path.append(index)
                raise
        return ReadOnlyList(items)
    # Subclasses of the plain types (str and int enums, say) become the plain
    # type, as json.dumps would write them: through the base type's own
    # conversion, never one the subclass overrides (which may raise).
    if isinstance(value, str):
        return _freeze(str.__str__(value), lazy_ok, redact, depth)
    if isinstance(value, int):
        return _freeze(int.__int__(value), lazy_ok, redact, depth)
    if isinstance(value, float):
        return _freeze(float.__float__(value), lazy_ok, redact, depth)
    if lazy_ok and callable(value):
        if inspect.iscoroutinefunction(value):
            raise _BadValue(TypeError, f"is an async function: {_NEVER_AWAITED}")
        return value
    raise _BadValue(
        TypeError,
        f"is a {kind.__name__}, which is not JSON-serialisable; "
        "convert it to str, int, float, bool, None, a list or a dict first",
    )


_NEVER_AWAITED = (
    "a lazy value is called, never awaited (after the commit's last flush); "
    "pass a plain function, or await the value before staging"
)
"""Why a lazy value may not be, or return, a coroutine."""


def refuse_async_lazy(value: Callable[..., Any], where: str) -> None:
    """:raises TypeError: *value*, a lazy value for *where*, is an async
    function, whose coroutine would never run."""
    if inspect.iscoroutinefunction(value):
        raise TypeError(f"{where} is an async function: {_NEVER_AWAITED}")


def _refuse(problem: str | None) -> None:
    if problem is not None:
        raise _BadValue(ValueError, problem)


def has_lazy(value: Any) -> bool:
    """Whether a value made by ``freeze_json(..., lazy_ok=True)`` holds callables."""
    if isinstance(value, dict):
        return any(has_lazy(item) for item in value.values())
    if isinstance(value, list):
        return any(has_lazy(item) for item in value)
    return callable(value)


def resolve_lazy(value: Any, where: str, rules: PayloadRules = NO_RULES) -> Any:
    """Call every callable left in *value* and freeze what it returns.

    What a callable returns is redacted by ``rules`` like staged values are.

    :raises ValueError: a callable raised (chained), or returned a value
        :func:`freeze_json` refuses with ``ValueError``.
    :raises TypeError: a callable returned a value JSON cannot represent.
    """
    try:
        return _resolve(value, rules.redact)
    except _BadValue as bad:
        bad.reraise(where)


def _resolve(value: Any, redact: frozenset[str]) -> Any:
    if isinstance(value, dict):
        resolved = {}
        for key, item in value.items():
            try:
                resolved[key] = _resolve(item, redact)
            except _BadValue as bad:
                bad.path.append(key)
                raise
        return ReadOnlyDict(resolved)
    if isinstance(value, list):
        items = []
        for index, item in enumerate(value):
            try:
                items.append(_resolve(item, redact))
            except _BadValue as bad:
                bad.path.append(index)
                raise
        return ReadOnlyList(items)
    if callable(value):
        try:
            result = _called(value)
        except Exception as error:
            failure = _BadValue(ValueError, f"(a lazy value) raised {error!r}")
            raise failure from error
        return _freeze(result, False, redact, 0)
    return value


def _called(function: Callable[[], Any]) -> Any:
    """*function*'s value; a coroutine it returns (work that would never
    run) is closed, and refused."""
    result = function()
    if inspect.iscoroutine(result):
        result.close()
        raise TypeError(f"returned a coroutine: {_NEVER_AWAITED}")
    return result


def call_lazy(function: Callable[[], Any], where: str) -> Any:
    """Call a lazy value, naming it in the error if it raises."""
    try:
        return _called(function)
    except Exception as error:
        raise ValueError(f"the lazy value for {where} raised {error!r}") from error


def thaw(value: Any) -> Any:
    """Return a plain, mutable ``dict``/``list`` copy of a frozen value."""
    if isinstance(value, dict):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, list):
        return [thaw(item) for item in value]
    return value
