"""Claiming: which outbox rows a relay takes now, and locking them.

A relay takes whole transactions in commit order, holding back a target's
later events while an earlier one waits (for a retry, or in another relay's
hands), so each target's events reach each plugin in order. On PostgreSQL
transactions are taken by their first rows, which lets the server pass
what other relays hold; everywhere the outbox can be read from its head.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    Connection,
    FromClause,
    Select,
    Text,
    any_,
    bindparam,
    func,
    literal,
    select,
    tuple_,
)
from sqlalchemy.sql.elements import ColumnElement

from ._store import CHUNK, PARKED, OutboxRow, PluginState, chunks, one_of
from ._table import Outbox, UtcDateTime

__all__ = ["Claim", "claim", "group_rows", "parked"]


class Claim:
    """A row this relay took, and the plugins it delivers the row to."""

    __slots__ = ("plugins", "row")

    def __init__(self, row: OutboxRow, plugins: list[str]) -> None:
        self.row = row
        self.plugins = plugins


def claim(
    connection: Connection,
    outbox: Outbox,
    plugins: list[str],
    now: datetime,
    batch_size: int,
    *,
    from_head: bool = False,
) -> tuple[list[Claim], bool]:
    """Lock and return up to about *batch_size* rows this relay may deliver
    now, and whether a transaction it wanted could not be locked whole.

    Whole transactions, in commit order (a transaction larger than a page
    in slices, in order). A group is taken only if each of its rows is due
    for every plugin of this relay that it waits for, it is free (not
    locked by another relay), and no earlier row of one of its targets is
    left behind for one of this relay's plugins: those targets are held.
    Rows waiting only for plugins this relay lacks are passed over without
    holding anything.

    On PostgreSQL, unless *from_head*, the transactions are first taken by
    their first rows (:func:`_claim_by_first_rows`), which passes the
    transactions other relays hold in the server. When that finds nothing,
    with *from_head*, and on other databases, the outbox is read from its
    head (:func:`_claim_by_pages`), which also takes transactions whose
    first row has left, and tells whether rows were passed because others
    held them (the flag is only read when nothing was claimed).
    """
    if connection.dialect.name == "postgresql" and not from_head:
        walk = _Walk(outbox, plugins, now, batch_size)
        _claim_by_first_rows(connection, outbox, walk)
        if walk.claimed:
            return walk.claimed, walk.contended
    walk = _Walk(outbox, plugins, now, batch_size)
    _claim_by_pages(connection, outbox, walk)
    return walk.claimed, walk.contended


class _Walk:
    """One claim's progress: the rows taken, and the targets held back."""

    __slots__ = (
        "batch_size",
        "claimed",
        "contended",
        "held",
        "now",
        "ours",
        "outbox",
        "page_size",
        "wanted_by",
    )

    def __init__(
        self, outbox: Outbox, plugins: list[str], now: datetime, batch_size: int
    ) -> None:
        self.outbox = outbox
        self.ours = frozenset(plugins)
        self.now = now
        self.batch_size = batch_size
        self.page_size = min(max(batch_size * 2, 200), CHUNK)
        # Most rows wait for all the plugins they were written for, and rows
        # share a few such sets: intersect each once.
        self.wanted_by: dict[frozenset[str], list[str]] = {}
        self.held: set[tuple[str, str]] = set()
        self.claimed: list[Claim] = []
        self.contended = False

    def room(self) -> int:
        return self.batch_size - len(self.claimed)

    def take(
        self,
        connection: Connection,
        groups: Iterable[list[OutboxRow]],
        others: Collection[str] = (),
    ) -> None:
        """Claim what it may of *groups* (each a transaction's rows, in
        order), locking their rows; the groups of transactions in *others*
        (held by other relays) only hold their targets back.

        Groups another relay turns out to hold are left behind (holding
        their targets back), and the walk goes on with the groups after
        them.
        """
        held, now, relay_after = self.held, self.now, self.outbox.relay_after
        left = collections.deque(groups)
        while left and self.room() > 0:
            wanted: list[list[Claim]] = []
            room = self.room()
            while left and room > 0:
                group = left.popleft()
                targets = {row.target for row in group}
                if targets & held:
                    held |= targets
                    continue
                taking = []
                for row in group:
                    waiting = row.waiting()
                    row_plugins = self.wanted_by.get(waiting)
                    if row_plugins is None:
                        row_plugins = sorted(waiting & self.ours)
                        self.wanted_by[waiting] = row_plugins
                    if row_plugins:
                        taking.append(Claim(row, row_plugins))
                if not taking:
                    continue  # waiting only for plugins other relays have
                if group[0].transaction_id in others or not all(
                    row.row.due_at(name, relay_after) <= now
                    for row in taking
                    for name in row.plugins
                ):
                    held |= targets
                    continue
                wanted.append(taking)
                room -= len(taking)
            if wanted and not _lock_whole(
                connection, self.outbox, wanted, held, self.claimed
            ):
                self.contended = True


def parked(outbox: Outbox, table: FromClause) -> ColumnElement[bool]:
    """Whether *table*'s row (the outbox table or an alias of it) is parked."""
    state = outbox.delivery_table
    return (
        select(literal(1))
        .where(state.c.event_id == table.c.id, state.c.plugin == PARKED)
        .exists()
    )


def _candidates(outbox: Outbox) -> Select[Any]:
    """The rows a relay may deliver, as :class:`OutboxRow`, in commit order."""
    table, state = outbox.table, outbox.delivery_table
    # Whether a row has delivery state at all, read with it: most rows have
    # none, and need no query of the delivery table, nor a delete there.
    has_state = (
        select(literal(1))
        .where(state.c.event_id == table.c.id)
        .exists()
        .label("has_state")
    )
    return (
        select(*OutboxRow.columns(outbox, has_state))
        .where(~parked(outbox, table))
        .order_by(*_order(outbox))
    )


def _order(outbox: Outbox) -> tuple[ColumnElement[Any], ...]:
    table = outbox.table
    return (table.c.created_at, table.c.transaction_id, table.c.sequence)


def _claim_by_pages(connection: Connection, outbox: Outbox, walk: _Walk) -> None:
    """Claim into *walk* reading the outbox page by page from its head.

    Candidates are read without locks and only the rows to deliver are
    locked, by primary key: a locking read that scans (InnoDB) would lock
    every row it reads, and idle relays would starve. Held targets are left
    out in SQL from then on, so however many rows a held target has, other
    targets' due rows are found.
    """
    table = outbox.table
    order = _order(outbox)
    candidate = _candidates(outbox)
    page_size = walk.page_size
    after: tuple[Any, ...] | None = None
    while walk.room() > 0:
        query = candidate.limit(page_size)
        if after is not None:
            # The first conjunct is implied by the second: it is there for
            # MariaDB, whose optimizer reads a row comparison as a filter and
            # would scan the index from its start for every page.
            query = query.where(order[0] >= after[0], tuple_(*order) > tuple_(*after))
        if walk.held and len(walk.held) <= _HELD_IN_SQL:
            query = query.where(
                tuple_(table.c.aggregatetype, table.c.aggregateid).not_in(walk.held)
            )
        rows, groups, full = _page(connection.execute(query).all(), page_size)
        if not rows:
            break
        last = rows[-1]
        after = (last.created_at, last.transaction_id, last.sequence)
        _load_states(connection, outbox, rows)
        walk.take(connection, groups.values())
        if not full:
            break


_HELD_IN_SQL = 200
"""Held targets the scan leaves out in SQL; beyond this, in Python."""


def _page(
    found: Sequence[Sequence[Any]], page_size: int
) -> tuple[list[OutboxRow], dict[str, list[OutboxRow]], bool]:
    """The candidate rows read (at most *page_size*), grouped by transaction,
    and whether the page was full. The limit may have cut a full page's
    last transaction: it is left out, for a later page, unless it is the
    page's only one (a slice of a transaction larger than a page)."""
    rows = [OutboxRow(row) for row in found]
    full = len(rows) == page_size
    groups = group_rows(rows)
    if full and len(groups) > 1:
        del groups[next(reversed(groups))]
        rows = [row for group in groups.values() for row in group]
    return rows, groups, full


def _claim_by_first_rows(connection: Connection, outbox: Outbox, walk: _Walk) -> None:
    """Claim into *walk* by locking transactions' first rows (PostgreSQL).

    A transaction's first row (``sequence`` 0) is its lock: one statement
    locks the first rows of the next free transactions (``SKIP LOCKED``
    passes the ones other relays hold, in the server, reading only the
    order index for the rest of their rows) and returns those transactions'
    rows. A transaction whose first row has left the outbox (delivered,
    while the rest of it waits) is not taken here: it is left to reading
    from the head, which every relay does when this finds nothing, when
    the outbox's first row is such a transaction's, and at least once a
    second (the relay's loop asks for it). The earlier rows
    of other transactions that share a target with them are then read (and
    hold those targets back), so each target stays in order; the rows to
    deliver are locked whole as on every database. Transactions are taken a
    few at a time, as many as the batch has room for by the size of the
    ones taken so far, so a relay does not hold more than it delivers; it
    stops at a page from which it took nothing.
    """
    statements = _first_row_statements(outbox)
    page_size = walk.page_size
    mine: set[str] = set()
    after: tuple[datetime, str] = (_BEFORE_ALL, "")
    count = 1
    while walk.room() > 0:
        held = walk.held if len(walk.held) <= _HELD_IN_SQL else ()
        found = connection.execute(
            statements.page,
            {
                "after_at": after[0],
                "after_transaction": after[1],
                "held": sorted(held),
                "fresh_from": walk.now - outbox.relay_after,
                "count": count,
                "page_size": page_size,
            },
        )
        # A transaction the limit cut stays locked, untaken.
        rows, groups, full = _page(found.all(), page_size)
        if not rows:
            break
        mine.update(groups)
        first, last = rows[0], rows[-1]
        rows_each = len(rows) / len(groups)
        others = [
            OutboxRow(row)
            for row in connection.execute(
                statements.before,
                {
                    "first_at": first.created_at,
                    "last_at": last.created_at,
                    "last_transaction": last.transaction_id,
                    "page": ",".join(groups),
                    "mine": ",".join(mine),
                },
            ).all()
        ]
        _load_states(connection, outbox, rows + others)
        if others:
            rows = sorted(rows + others, key=_position)
            groups = group_rows(rows)
        before = len(walk.claimed)
        walk.take(connection, groups.values(), {row.transaction_id for row in others})
        if full or len(walk.claimed) == before:
            # A page that took nothing (rows not due, held back): reading
            # from the head finds what is due without locking the rest.
            break
        after = (last.created_at, last.transaction_id)
        count = min(page_size, math.ceil(walk.room() / rows_each))


_BEFORE_ALL = datetime(1, 1, 1, tzinfo=timezone.utc)
"""Before every row's ``created_at``: where the first page starts."""


class _FirstRowStatements:
    """The statements of :func:`_claim_by_first_rows` for one outbox, built
    once (building them cost more than running them)."""

    def __init__(self, outbox: Outbox) -> None:
        table, state = outbox.table, outbox.delivery_table
        position = tuple_(table.c.created_at, table.c.transaction_id)
        other, head = table.alias("other"), table.alias("head")
        # A transaction's lock is its first row, which may be parked while a
        # later one is due (asked only of a parked first row).
        any_unparked = ~parked(outbox, table) | (
            select(literal(1))
            .where(
                other.c.created_at == table.c.created_at,
                other.c.transaction_id == table.c.transaction_id,
                ~parked(outbox, other),
            )
            .exists()
        )
        # When the outbox's first row is not its transaction's first (that
        # one was delivered: a slice of a large transaction, or the rest of
        # a partly failed one), nothing here: reading from the head takes it.
        head_sequence = (
            select(head.c.sequence)
            .where(~parked(outbox, head))
            .order_by(head.c.created_at, head.c.transaction_id, head.c.sequence)
            .limit(1)
            .scalar_subquery()
        )
        # Fresh rows are left to the dispatch after their COMMIT: not locked.
        maybe_due = (
            table.c.created_at <= bindparam("fresh_from", type_=UtcDateTime())
        ) | select(literal(1)).where(state.c.event_id == table.c.id).exists()
        after_at = bindparam("after_at", type_=UtcDateTime())
        taken = (
            select(table.c.created_at, table.c.transaction_id)
            .where(
                table.c.created_at >= after_at,
                position > tuple_(after_at, bindparam("after_transaction")),
                table.c.sequence == 0,
                head_sequence == 0,
                tuple_(table.c.aggregatetype, table.c.aggregateid).not_in(
                    bindparam("held", expanding=True)
                ),
                maybe_due,
                any_unparked,
            )
            .order_by(table.c.created_at, table.c.transaction_id)
            .limit(bindparam("count"))
            .with_for_update(skip_locked=True)
            .cte("taken")
        )
        self.page: Select[Any] = (
            _candidates(outbox)
            .join(
                taken,
                (taken.c.created_at == table.c.created_at)
                & (taken.c.transaction_id == table.c.transaction_id),
            )
            .limit(bindparam("page_size"))
        )
        page = table.alias("page")
        shares_target = (
            select(literal(1))
            .where(
                page.c.created_at >= bindparam("first_at", type_=UtcDateTime()),
                page.c.created_at <= bindparam("last_at", type_=UtcDateTime()),
                _in_list(page.c.transaction_id, "page"),
                page.c.aggregatetype == table.c.aggregatetype,
                page.c.aggregateid == table.c.aggregateid,
            )
            .exists()
        )
        last_at = bindparam("last_at", type_=UtcDateTime())
        self.before: Select[Any] = _candidates(outbox).where(
            table.c.created_at <= last_at,
            position < tuple_(last_at, bindparam("last_transaction")),
            ~_in_list(table.c.transaction_id, "mine"),
            shares_target,
        )


def _in_list(column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    """*column* is one of the comma-separated ids of parameter *name*."""
    return column == any_(func.string_to_array(bindparam(name, type_=Text()), ","))


@functools.lru_cache(maxsize=64)
def _first_row_statements(outbox: Outbox) -> _FirstRowStatements:
    return _FirstRowStatements(outbox)


def _position(row: OutboxRow) -> tuple[datetime, str, int]:
    return row.created_at, row.transaction_id, row.sequence


def group_rows(rows: Iterable[OutboxRow]) -> dict[str, list[OutboxRow]]:
    groups: dict[str, list[OutboxRow]] = {}
    for row in rows:
        groups.setdefault(row.transaction_id, []).append(row)
    return groups


def _load_states(connection: Connection, outbox: Outbox, rows: list[OutboxRow]) -> None:
    """Fill each row's :attr:`~OutboxRow.states` from the delivery table."""
    state = outbox.delivery_table
    by_id = {row.id: row for row in rows if row.has_state}
    for part in chunks(list(by_id)):
        for found in connection.execute(
            select(
                state.c.event_id,
                state.c.plugin,
                state.c.state,
                state.c.attempts,
                state.c.error,
                state.c.next_attempt_at,
            ).where(one_of(connection, state.c.event_id, part))
        ):
            by_id[found.event_id].states[found.plugin] = PluginState(
                found.state, found.attempts, found.error, found.next_attempt_at
            )


def _lock_whole(
    connection: Connection,
    outbox: Outbox,
    wanted: list[list[Claim]],
    held: set[tuple[str, str]],
    claimed: list[Claim],
) -> bool:
    """Lock *wanted* groups' rows, reading their payloads; claim the groups
    locked whole, in order, and hold the targets of the others. False if a
    group could not be locked whole: another relay (or its attempt) had
    some of its rows."""
    table = outbox.table
    payloads: dict[str, str] = {}
    ids = [taken.row.id for group in wanted for taken in group]
    for part in chunks(ids):
        locked = connection.execute(
            select(table.c.id, table.c.payload)
            .where(one_of(connection, table.c.id, part))
            .with_for_update(skip_locked=True)
        ).all()
        payloads.update((row_id, payload) for row_id, payload in locked)
    whole = True
    for group in wanted:
        targets = {taken.row.target for taken in group}
        complete = all(taken.row.id in payloads for taken in group)
        whole = whole and complete
        if not complete or targets & held:
            held |= targets
            continue
        for taken in group:
            taken.row.payload = payloads[taken.row.id]
        claimed.extend(group)
    return whole
