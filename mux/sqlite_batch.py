"""Applying a batch of store operations to SQLite in a few statements.

Why few: the store's writer runs in a worker thread, and every statement gives up Python's
GIL while SQLite runs it and must then win it back from the event loop, which on a busy
node can take milliseconds (a thread waiting for the GIL is woken, and loses the race,
each time the loop releases it around a socket call). One statement per operation made a
2,048-operation batch 2,048 such hand-backs; a few multi-row statements make it a handful.
On an event loop that never rests (a burst of 10,000 channel opens) the writer still falls
behind by seconds; docs/security.md says so.

How: the rows of one kind go in as multi-row ``INSERT OR IGNORE ... VALUES (...), (...)``
statements (channel closes as one ``UPDATE ... FROM (VALUES ...)``) of a few fixed sizes,
so SQLite and Python's statement cache only ever see a handful of statements. A part
smaller than its statement repeats its last row: a repeated insert is ignored, a repeated
close sets the same values again. The end state is that of applying the operations one by
one: channel rows go in before any close (a close always follows its open), ledger frames
are independent rows (the first copy of a (channel, seq) wins either way), and mailbox
operations keep their order among themselves.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from .frames import Frame

__all__ = ["BatchWriter", "Operation", "Statement"]

Operation = tuple[str, tuple[Any, ...], Frame | None]
"""A queued store operation: its kind, its row (empty for a ledger frame) and the frame."""

Statement = tuple[str, list[Any], bool]
"""SQL, its parameters, and whether they are rows for ``executemany``."""

SIZES = (512, 64, 8)
"""Rows per statement; a part takes the smallest that holds it."""

_INSERT = {
    "open": ("INSERT OR IGNORE INTO channels (id, intent, agent, target, metadata, opened_at) VALUES ", 6, ""),
    "frame": ("INSERT OR IGNORE INTO frames (channel_id, seq, target, ts, frame) VALUES ", 5, ""),
    "mail": ("INSERT OR IGNORE INTO mailbox (agent, channel_id, seq) VALUES ", 3, ""),
}
"""Per multi-row statement: what precedes its rows, their width, what follows them."""
_CLOSE_FROM = (
    "UPDATE channels SET closed = 1, close_reason = v.column1 FROM (VALUES ",
    2,
    ") AS v WHERE channels.id = v.column2",
)
_CLOSE_ONE = "UPDATE channels SET closed = 1, close_reason = ? WHERE id = ?"
_DELETE = {
    "ack": "DELETE FROM mailbox WHERE agent = ? AND channel_id = ? AND seq <= ?",
    "drop": "DELETE FROM mailbox WHERE agent = ? AND channel_id = ? AND seq = ?",
}


@functools.lru_cache(maxsize=32)
def _values(head: str, width: int, tail: str, rows: int) -> str:
    one = "(" + ", ".join("?" * width) + ")"
    return head + ", ".join([one] * rows) + tail


def _flat(rows: Iterable[tuple[Any, ...]]) -> list[Any]:
    return [value for row in rows for value in row]


class BatchWriter:
    """Turns batches of :data:`Operation` into a few statements (:meth:`plan`, pure: the
    event loop runs it) and runs them on one SQLite connection (:meth:`execute`: the writer
    thread runs it, inside the caller's transaction). The thread then holds the GIL only to
    bind parameters, never for Python work the event loop would wait on."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        limit = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self.sizes = tuple(s for s in SIZES if s * 6 <= limit) or (1,)
        """The statement sizes this connection allows (6 parameters per row at most)."""
        self._update_from = sqlite3.sqlite_version_info >= (3, 33, 0)

    def plan(self, batch: Sequence[Operation]) -> list[Statement]:
        """The statements that leave the end state of applying ``batch`` in order."""
        opens: list[tuple[Any, ...]] = []
        frames: list[tuple[Any, ...]] = []
        closes: list[tuple[Any, ...]] = []
        mailbox: list[tuple[str, list[tuple[Any, ...]]]] = []
        for op, args, frame in batch:
            if op == "frame":
                assert frame is not None
                frames.append((frame.channel_id, frame.seq, frame.target, frame.ts, frame.to_json()))
            elif op == "open":
                opens.append(args)
            elif op == "close":
                closes.append(args)
            elif mailbox and mailbox[-1][0] == op:
                mailbox[-1][1].append(args)
            else:
                mailbox.append((op, [args]))
        out: list[Statement] = []
        self._rows(out, *_INSERT["open"], opens)
        self._rows(out, *_INSERT["frame"], frames)
        if self._update_from:
            self._rows(out, *_CLOSE_FROM, closes)
        elif closes:
            out.append((_CLOSE_ONE, closes, True))
        for op, rows in mailbox:
            if op in _INSERT:
                self._rows(out, *_INSERT[op], rows)
            else:
                out.append((_DELETE[op], rows, True))
        return out

    def execute(self, plan: Iterable[Statement]) -> None:
        """Run ``plan`` (from :meth:`plan`) on the connection."""
        db = self._db
        for sql, params, many in plan:
            if many:
                db.executemany(sql, params)
            else:
                db.execute(sql, params)

    def _rows(self, out: list[Statement], head: str, width: int, tail: str, rows: list[tuple[Any, ...]]) -> None:
        done = 0
        while done < len(rows):
            left = len(rows) - done
            size = next((s for s in reversed(self.sizes) if s >= left), self.sizes[0])
            part = rows[done : done + size]
            part += [part[-1]] * (size - len(part))
            out.append((_values(head, width, tail, size), _flat(part), False))
            done += size
