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
    bindparam,
    literal,
    select,
    tuple_,
)
from sqlalchemy.sql.elements import ColumnElement

from ._store import CHUNK, PARKED, OutboxRow, PluginState, chunks, in_joined, one_of
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
        for _ in range(_FIRST_ROW_TRIES):
            walk = _Walk(outbox, plugins, now, batch_size)
            _claim_by_first_rows(connection, outbox, walk)
            if walk.claimed or not walk.contended:
                break
        if walk.claimed:
            return walk.claimed, walk.contended
    walk = _Walk(outbox, plugins, now, batch_size)
    _claim_by_pages(connection, outbox, walk)
    return walk.claimed, walk.contended


_FIRST_ROW_TRIES = 3
"""Times a claim by first rows is tried while another relay took what it
chose (in the moment between choosing and locking), before reading from
the head."""


class _Walk:
    """One claim's progress: the rows taken, and what is held back.

    A target is held when one of its events may not be delivered now (not
    due, or in another relay's hands): its later events wait. So is a
    transaction, whose later slices (of one larger than a page) wait for
    its earlier ones.
    """

    __slots__ = (
        "batch_size",
        "claimed",
        "contended",
        "held",
        "held_transactions",
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
        self.held_transactions: set[str] = set()
        self.claimed: list[Claim] = []
        self.contended = False

    def room(self) -> int:
        return self.batch_size - len(self.claimed)

    def take(self, connection: Connection, groups: Iterable[list[OutboxRow]]) -> None:
        """Claim what it may of *groups* (each a transaction's rows, in
        order), locking their rows.

        Groups another relay turns out to hold are left behind (holding
        their targets back), and the walk goes on with the groups after
        them.
        """
        left = collections.deque(groups)
        while left and self.room() > 0:
            wanted = self.choose(left, self.room())
            if wanted:
                self.lock(connection, wanted)

    def choose(
        self,
        left: collections.deque[list[OutboxRow]],
        room: int,
        others: Collection[str] = (),
    ) -> list[list[Claim]]:
        """Take from *left* the groups to deliver, until they fill *room*:
        each one's rows this relay may deliver now. The groups of
        transactions in *others* (other relays hold them) are not
        delivered, and hold their targets back."""
        held, now, relay_after = self.held, self.now, self.outbox.relay_after
        wanted: list[list[Claim]] = []
        while left and room > 0:
            group = left.popleft()
            transaction = group[0].transaction_id
            targets = {row.target for row in group}
            if targets & held or transaction in self.held_transactions:
                self._hold(transaction, targets)
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
            if transaction in others or not all(
                taken.row.due_at(name, relay_after) <= now
                for taken in taking
                for name in taken.plugins
            ):
                self._hold(transaction, targets)
                continue
            wanted.append(taking)
            room -= len(taking)
        return wanted

    def lock(
        self,
        connection: Connection,
        wanted: list[list[Claim]],
        *,
        firsts: bool = False,
    ) -> None:
        """Lock *wanted* groups' rows (by primary key), reading their
        payloads; claim the groups locked whole, in order, and hold the
        others (another relay, or its attempt, had some of their rows) and
        the groups after them that share a target or their transaction.
        With *firsts*, each group's first row is locked before the rest, in
        a statement of their own: what other relays look for.

        What :meth:`choose` held back applies to the groups after the one
        held only, which it did not choose: so it is not asked here. The
        delivery state was read before the rows were locked (even by the
        statement that locked them: it read with the snapshot it started
        with), so it is read again now that they are: a group whose state
        another relay changed meanwhile (it delivered them, or recorded a
        failure and its backoff) is held, for a later batch to read afresh.
        Else the other relay's plugins would get the rows again and its
        backoff and attempts would be overwritten. On PostgreSQL and
        MariaDB, where the relay claims in READ COMMITTED (each statement
        reads what is committed when it starts); SQLite has one writer at
        a time.
        """
        payloads: dict[str, str] = {}
        if firsts:
            self._lock_ids(connection, [group[0].row.id for group in wanted], payloads)
            # A group whose first row another relay took is that relay's.
            wanted_rest = [group[1:] for group in wanted if group[0].row.id in payloads]
        else:
            wanted_rest = wanted
        rest = [taken.row.id for group in wanted_rest for taken in group]
        self._lock_ids(connection, rest, payloads)
        states = (
            _read_states(connection, self.outbox, list(payloads))
            if connection.dialect.name != "sqlite"
            else None
        )
        missed: set[tuple[str, str]] = set()
        missed_transactions: set[str] = set()
        for group in wanted:
            transaction = group[0].row.transaction_id
            targets = {taken.row.target for taken in group}
            complete = all(taken.row.id in payloads for taken in group)
            if not complete:
                self.contended = True
            changed = states is not None and any(
                states.get(taken.row.id, {}) != taken.row.states for taken in group
            )
            if (
                not complete
                or changed
                or targets & missed
                or transaction in missed_transactions
            ):
                missed |= targets
                missed_transactions.add(transaction)
                self._hold(transaction, targets)
                continue
            for taken in group:
                taken.row.payload = payloads[taken.row.id]
            self.claimed.extend(group)

    def _lock_ids(
        self, connection: Connection, ids: list[str], payloads: dict[str, str]
    ) -> None:
        """Lock the rows *ids* that no one else holds, adding their payloads."""
        table = self.outbox.table
        for part in chunks(connection, ids):
            locked = connection.execute(
                select(table.c.id, table.c.payload)
                .where(one_of(connection, table.c.id, part))
                .with_for_update(skip_locked=True)
            ).all()
            payloads.update((row_id, payload) for row_id, payload in locked)

    def _hold(self, transaction: str, targets: set[tuple[str, str]]) -> None:
        self.held |= targets
        self.held_transactions.add(transaction)


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

    A transaction's first row (``sequence`` 0) stands for it while relays
    choose: one statement locks the first rows of the next free
    transactions (``SKIP LOCKED`` passes the ones other relays hold, in the
    server, reading only the order index for the rest of their rows) and
    returns those transactions' rows. The earlier rows of other
    transactions that share a target with them are then read, and hold
    those targets back, so each target stays in order (the first page
    tries the outbox's first transaction alone, before which there is
    nothing to read: what a relay alone takes). The first rows are
    locked in a savepoint: if the relay passed over a transaction whose
    first row it locked (one waiting only for plugins it lacks, held back,
    or cut by the page's limit), the savepoint is rolled back, letting them
    all go, so that it holds no transaction it does not deliver, and the
    chosen ones' first rows are locked again; else it is released. The
    rows to deliver are then locked whole by primary key, as on every
    database: that is what keeps two relays off the same row.

    Transactions are taken a few at a time, as many as the batch has room
    for by the size of the ones taken so far; the walk stops at a full page
    and at one from which it took nothing. A transaction whose first row
    has left the outbox (delivered, while the rest of it waits) is not
    taken here: it is left to reading from the head, which every relay
    does when this finds nothing, when the outbox's first row is such a
    transaction's, and at least once a second (the relay's loop asks for
    it).
    """
    with connection.begin_nested() as choosing:
        wanted, passed_over = _choose_by_first_rows(connection, outbox, walk)
        if passed_over:
            choosing.rollback()  # lets the first rows go
        # Else the savepoint is released, the first rows kept.
    if wanted:
        # Until the chosen transactions' first rows are locked again, another
        # relay may choose them too: the one that locks a first row takes
        # the transaction, the other holds it back (and tries again); one
        # that delivered it meanwhile changed its state.
        walk.lock(connection, wanted, firsts=passed_over)


def _choose_by_first_rows(
    connection: Connection, outbox: Outbox, walk: _Walk
) -> tuple[list[list[Claim]], bool]:
    """The groups :func:`_claim_by_first_rows` delivers, in order, and
    whether it locked the first row of a transaction it did not choose."""
    statements = _first_row_statements(outbox)
    page_size = walk.page_size
    mine: set[str] = set()
    after: tuple[datetime, str] = (_BEFORE_ALL, "")
    count = 1
    wanted: list[list[Claim]] = []
    passed_over = False
    room = walk.room()
    at_head = True
    while room > 0:
        held = walk.held if len(walk.held) <= _HELD_IN_SQL else ()
        found = connection.execute(
            statements.head if at_head else statements.page,
            {
                "after_at": after[0],
                "after_transaction": after[1],
                "held": sorted(held),
                "fresh_from": walk.now - outbox.relay_after,
                "count": count,
                "page_size": page_size,
            },
        )
        page = found.all()
        rows, groups, full = _page(page, page_size)
        if not rows:
            if at_head:  # another relay has it, or it is not due
                at_head = False
                continue
            break
        # A full page may leave out (cut) transactions it locked.
        passed_over = passed_over or (full and count > 1)
        mine.update(groups)
        first, last = rows[0], rows[-1]
        rows_each = len(rows) / len(groups)
        others = (
            []
            if at_head
            else [
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
        )
        at_head = False
        _load_states(connection, outbox, rows + others)
        if others:
            rows = sorted(rows + others, key=_position)
            groups = group_rows(rows)
        chosen = walk.choose(
            collections.deque(groups.values()),
            room,
            {row.transaction_id for row in others},
        )
        wanted += chosen
        room -= sum(map(len, chosen))
        taken = {group[0].row.transaction_id for group in chosen}
        passed_over = passed_over or any(
            transaction not in taken for transaction in groups if transaction in mine
        )
        if full or not chosen:
            # A page that took nothing (rows not due, held back): reading
            # from the head finds what is due without locking the rest.
            break
        after = (last.created_at, last.transaction_id)
        count = min(page_size, math.ceil(room / rows_each))
    return wanted, passed_over


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
        def first(column: ColumnElement[Any]) -> ColumnElement[Any]:
            """*column* of the outbox's first row still to relay."""
            return (
                select(column)
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

        def taking(*where: ColumnElement[bool]) -> Select[Any]:
            """The rows of the next free transactions whose first rows
            match *where*, their first rows locked."""
            taken = (
                select(table.c.created_at, table.c.transaction_id)
                .where(
                    table.c.created_at >= after_at,
                    position > tuple_(after_at, bindparam("after_transaction")),
                    table.c.sequence == 0,
                    tuple_(table.c.aggregatetype, table.c.aggregateid).not_in(
                        bindparam("held", expanding=True)
                    ),
                    maybe_due,
                    any_unparked,
                    *where,
                )
                .order_by(table.c.created_at, table.c.transaction_id)
                .limit(bindparam("count"))
                .with_for_update(skip_locked=True)
                .cte("taken")
            )
            return (
                _candidates(outbox)
                .join(
                    taken,
                    (taken.c.created_at == table.c.created_at)
                    & (taken.c.transaction_id == table.c.transaction_id),
                )
                .limit(bindparam("page_size"))
            )

        self.page = taking(first(head.c.sequence) == 0)
        # The outbox's first transaction: no row can come before it.
        self.head = taking(
            table.c.created_at == first(head.c.created_at),
            table.c.transaction_id == first(head.c.transaction_id),
        )
        page = table.alias("page")
        shares_target = (
            select(literal(1))
            .where(
                page.c.created_at >= bindparam("first_at", type_=UtcDateTime()),
                page.c.created_at <= bindparam("last_at", type_=UtcDateTime()),
                in_joined(page.c.transaction_id, bindparam("page", type_=Text())),
                page.c.aggregatetype == table.c.aggregatetype,
                page.c.aggregateid == table.c.aggregateid,
            )
            .exists()
        )
        last_at = bindparam("last_at", type_=UtcDateTime())
        self.before: Select[Any] = _candidates(outbox).where(
            table.c.created_at <= last_at,
            position < tuple_(last_at, bindparam("last_transaction")),
            ~in_joined(table.c.transaction_id, bindparam("mine", type_=Text())),
            shares_target,
        )


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
    found = _read_states(connection, outbox, [row.id for row in rows if row.has_state])
    for row in rows:
        row.states.update(found.get(row.id, ()))


def _read_states(
    connection: Connection, outbox: Outbox, ids: list[str]
) -> dict[str, dict[str, PluginState]]:
    """The delivery states of the events *ids* that have any, by plugin."""
    state = outbox.delivery_table
    states: dict[str, dict[str, PluginState]] = {}
    for part in chunks(connection, ids):
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
            states.setdefault(found.event_id, {})[found.plugin] = PluginState(
                found.state, found.attempts, found.error, found.next_attempt_at
            )
    return states
