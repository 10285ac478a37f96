"""Which databases a session's open transaction has written to.

An outbox's rows must commit with the changes they record, so they go to the
database those changes are in; a transaction that only read another database
(a reporting database, a read replica) must not send them there. No public
API says which of a transaction's connections were written through, so an
emitter with an outbox notes it as it happens:

- each flush: the databases of the objects it really wrote (inserted,
  deleted, or with a net change), as the flush binds them, while it runs (a
  session that routes reads to replicas binds the same mapper elsewhere
  outside a flush);
- each statement run with ``Session.execute`` that writes, once it ran: an
  INSERT, UPDATE or DELETE construct, or text that begins with a writing
  keyword, in the database the session binds it to.

Writes in a SAVEPOINT that rolled back still count: their database took
them. A write whose database the session cannot name again (a sharded
session's) makes the answer unknown. Not seen: statements run on a
connection taken from the session (``session.connection().execute(...)``),
and the legacy ``bulk_save_objects`` and ``bulk_*_mappings`` methods.
"""

from __future__ import annotations

import inspect
import re
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import TextClause
from sqlalchemy.sql.selectable import TextualSelect

from ._sqla import autobegin, bind_of, flushed_mappers, sole_connection

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine
    from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction

__all__ = ["Written", "note_flush", "note_statement", "written"]

_KEY = "access_audit.written"
"""``session.info`` key: the :class:`Written` of its latest transaction."""


class Written:
    """What one transaction of a session has written to so far."""

    __slots__ = ("_root", "noted", "placed", "unknown")

    def __init__(self, root: SessionTransaction) -> None:
        self._root = weakref.ref(root)
        self.noted: set[Engine | Connection] = set()
        """The binds (or the session's connections) written through."""
        self.unknown = False
        """Some write's database could not be told."""
        self.placed: Engine | Connection | None = None
        """Where the outbox put this transaction's rows (all go together)."""

    def databases(self) -> list[Engine | Connection] | None:
        """The written databases, one bind each (an Engine, or the
        Connection a joined session was given); None when unknown."""
        root = self._root()
        if self.unknown or root is None:
            return None
        found: list[Engine | Connection] = []
        for bind in self.noted:
            held = bind_of(root, bind)
            if held is not None and held not in found:
                found.append(held)
        return found


def written(session: Session) -> Written | None:
    """The record of the session's open transaction, if it wrote anything
    noted (or the outbox placed its rows) yet."""
    record: Written | None = session.info.get(_KEY)
    if record is None or record._root() is not session.get_transaction():
        return None
    return record


def record_of(session: Session, root: SessionTransaction) -> Written:
    """The record of *root*, the session's open transaction: made if it has none."""
    record: Written | None = session.info.get(_KEY)
    if record is None or record._root() is not root:
        record = session.info[_KEY] = Written(root)
    return record


def note_flush(session: Session, flush_context: Any) -> None:
    """``after_flush``: note the databases this flush wrote to."""
    root = session.get_transaction()
    if root is None:  # pragma: no cover - a flush runs in a transaction
        return
    mappers = flushed_mappers(session, flush_context)
    if not mappers:
        return
    record = record_of(session, root)
    only = sole_connection(root)
    if only is not None:
        record.noted.add(only)  # every write of the flush went through it
        return
    for mapper in mappers:
        _add(record, session, {"mapper": mapper})


def note_statement(state: ORMExecuteState) -> Any:
    """``do_orm_execute``: run a statement that writes, then note its
    database (one that failed wrote nothing); let any other run as usual."""
    statement = state.statement
    if state.is_select:  # the common case: returns at once
        if type(statement) is not TextualSelect:
            return None
        writes = _writes(statement.element)
    else:
        writes = (
            state.is_insert
            or state.is_update
            or state.is_delete
            or (isinstance(statement, TextClause) and _writes(statement))
        )
    if not writes:
        return None
    session = state.session
    result = None
    if _takes_keywords(type(session)):
        result = state.invoke_statement()
    else:
        # invoke_statement() would pass this get_bind a keyword of
        # SQLAlchemy's own it does not take (SQLAlchemy's routing recipe
        # declares only mapper and clause): note first, let it run.
        try:
            autobegin(session)
        except Exception:  # autobegin=False: SQLAlchemy says so itself next
            return None
    root = session.get_transaction()
    if root is not None:
        _add(record_of(session, root), session, state.bind_arguments)
    return result


def _takes_keywords(session_class: type[Session]) -> bool:
    """Whether *session_class*'s ``get_bind`` takes any keyword (as
    SQLAlchemy's own does), asked once per class."""
    known = _KEYWORDS.get(session_class)
    if known is None:
        try:
            parameters = inspect.signature(session_class.get_bind).parameters
            known = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        except (TypeError, ValueError):  # pragma: no cover - not introspectable
            known = False
        _KEYWORDS[session_class] = known
    return known


_KEYWORDS: weakref.WeakKeyDictionary[type[Session], bool] = weakref.WeakKeyDictionary()
"""Per session class: whether its ``get_bind`` takes any keyword."""


def _add(record: Written, session: Session, bind_arguments: dict[str, Any]) -> None:
    """Note the bind the session gives for *bind_arguments*. Never fails the
    application's work: a bind the session cannot name again (a sharded
    session's chooser wants the instance) makes the record unknown."""
    try:
        record.noted.add(session.get_bind(**bind_arguments))
    except Exception:
        record.unknown = True


_WRITING = frozenset(("INSERT", "UPDATE", "DELETE", "REPLACE", "MERGE", "UPSERT"))
"""The first word of a textual statement that writes. (A ``WITH`` may only
read: a read replica must never be taken for a written database.)"""

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"[\s(\ufeff]*")
_LINE_END = re.compile(r"[\r\n]")


def _writes(text: Any) -> bool:
    """Whether the textual statement *text* begins with a writing keyword,
    after any space, parentheses and comments (read in one pass: a regular
    expression with a repeated group took exponential time on some text)."""
    sql: str = text.text
    at, end = 0, len(sql)
    while at < end:
        at = _SPACE.match(sql, at).end()  # type: ignore[union-attr]
        if sql.startswith("/*", at):
            close = sql.find("*/", at + 2)
            at = end if close < 0 else close + 2
        elif sql.startswith(("--", "#"), at):  # "#": MariaDB's and MySQL's
            line_end = _LINE_END.search(sql, at)
            at = end if line_end is None else line_end.end()
        else:
            break
    found = _WORD.match(sql, at)
    return found is not None and found.group().upper() in _WRITING
