"""A connection's send queue: urgent first, fair among equals, bounded per channel.

How this works (RFC 9218-style urgency, as on one HTTP/2 connection): every outgoing
message is queued under a *key* (a channel id, or ``CONTROL`` for replies and channel
events) with an *urgency* (``CONTROL_URGENCY`` for control, else the intent's priority:
0 = voice ... 8 = bulk). The writer always takes the next message of the most urgent key
that has one ready, and keys of the same urgency take turns (round robin), so a voice frame
waits at most for the write already on the wire (one message, or a few small ones: see
``mux.writer.Writer``). A frame whose payload is larger than
``chunk_bytes`` is queued as several ``frame_part`` messages (see ``docs/protocol.md``) so
that "the message on the wire" is never a whole 1 MiB bulk payload.

Each key's queue holds at most ``per_key`` messages: a channel whose queue is full takes no
more frames (its sender gets ``receiver_full``, or waits; that channel only), the others go
on. ``on_take(key)`` is called whenever a message of a channel key leaves, so its room can
be announced.

Writing through: while a connection's writer waits for work, what is put in its outbox
during a server reader's turn (``mux.connection``: the replies to the messages the reader handled,
the frames they relay to other connections) need not wake that writer. With a shared
:class:`WriteThrough` that is ``holding``, ``put_nowait`` only notes the outbox; at the end
of the turn :meth:`WriteThrough.flush` has each noted outbox call its ``write_now`` (the
writer's: take what is queued, as the writer would, and write it straight to the socket
without waiting), and wakes the writer when that could not be done whole. Messages queued
together still go out in one write; no task switch is spent on the way.

Bulk held back: on a connection whose client answers probes (``mux.downlink``), messages of
``bulk_from`` urgency and above (what is less urgent than the connection's calls) are counted
as taken (``bulk_taken``) and, while :meth:`Outbox.hold_bulk` holds them, not taken at all:
the writer sends the call's frames, replies and events alone until the probes' window has
room again.

An idle writer's task may end (:meth:`Outbox.retire`, asked by ``mux.connection``'s watchdog after
``writer_idle_s``): a retired writer counts as waiting, so what is queued next is written
through as above, and whatever must wait for the socket starts the task again
(``start_writer``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import attrs
import trio

__all__ = ["CONTROL", "CONTROL_URGENCY", "NO_BULK", "Outbox", "Outgoing", "SharedBudget", "WriteThrough"]

Outgoing = str | bytes
"""A message for the socket: text (JSON) or bytes (binary framing)."""

CONTROL = "*control*"
"""The key of replies, acks and channel events."""
CONTROL_URGENCY = -1
NO_BULK = 1 << 30
"""``Outbox.bulk_from`` when no message counts as bulk (past every urgency in use)."""
_ENDED = NO_BULK + 1
"""``Outbox.bulk_from`` once :meth:`Outbox.end_bulk` ended it for good."""


@attrs.define(eq=False)
class _Queue:
    urgency: int
    items: collections.deque[Outgoing] = attrs.field(factory=collections.deque)
    room: trio.lowlevel.ParkingLot | None = None
    """Made when a ``put`` first waits for room (most queues never need one)."""


@attrs.define(eq=False)
class WriteThrough:
    """Outboxes given messages while ``holding`` (one reader's turn), written at its end."""

    holding: bool = False
    """Set by whoever will call :meth:`flush` before anything can wait."""
    _noted: list[Outbox] = attrs.field(factory=list)

    def note(self, outbox: Outbox) -> None:
        """``outbox`` was given messages while its writer waits."""
        self._noted.append(outbox)

    def flush(self) -> None:
        """Stop holding; each noted outbox writes now or wakes its writer."""
        self.holding = False
        noted = self._noted
        failure: Exception | None = None
        try:
            for outbox in noted:
                try:
                    outbox.kick()
                except Exception as exc:  # the others still write (kick woke that writer)
                    failure = failure or exc
        finally:
            noted.clear()
        if failure is not None:
            raise failure


class SharedBudget:
    """The byte budget of each of a node's connections (what its queues may hold for its
    client): ``per_connection``, or an equal share of ``total`` once more connections than
    ``total // per_connection`` are open, so all connections together hold at most about
    ``total`` however many slow readers there are (``total`` 0: no such bound). ``limit`` is
    the budget now; connections ``join`` and ``leave``. Connections found full register in
    ``full`` (a callable each, telling it to look for room again): when a connection leaves
    and the share grows, they are told at once, not at their next drained message."""

    __slots__ = ("connections", "full", "limit", "per_connection", "total")

    def __init__(self, per_connection: int, total: int = 0) -> None:
        self.per_connection = per_connection
        self.total = total
        self.connections = 0
        self.limit = per_connection
        self.full: dict[object, Callable[[], None]] = {}
        """Connections whose budget was found full, by owner: called when the share grows."""

    def join(self) -> None:
        """One more connection shares the budget."""
        self.connections += 1
        self._share()

    def leave(self, owner: object = None) -> None:
        """A connection (``owner``, as registered in ``full``) is gone: the others' share may
        grow, and those found full are told."""
        self.full.pop(owner, None)
        self.connections = max(0, self.connections - 1)
        before = self.limit
        self._share()
        if self.limit > before and self.full:
            for look in list(self.full.values()):
                look()

    def _share(self) -> None:
        if self.total > 0 and self.connections > 0:
            self.limit = min(self.per_connection, self.total // self.connections)
        else:
            self.limit = self.per_connection


class Outbox:
    """Per-connection scheduler of outgoing messages (see the module docstring)."""

    def __init__(
        self,
        *,
        per_key: int = 64,
        control: int = 1024,
        on_take: Callable[[str], None] | None = None,
        write_through: WriteThrough | None = None,
        budget: SharedBudget | None = None,
    ) -> None:
        self.per_key = per_key
        self.on_take = on_take
        self.control_limit = control
        self.write_through = write_through
        self.write_now: Callable[[], bool] | None = None
        """Set by the writer: write what is queued now without waiting; False when the
        writer's task must be woken for it (see the module docstring)."""
        self._noted = False
        # A key's queue and an urgency's ring exist only while they hold something: an idle
        # connection keeps none, and a burst of channels leaves none behind.
        self._queues: dict[str, _Queue] = {}
        self._rings: dict[int, collections.deque[str]] = {}
        self._ready = trio.lowlevel.ParkingLot()
        self.queued = 0
        self.bytes = 0
        """Characters or bytes of the messages queued."""
        self.held = 0
        """Bytes of frames held for this connection outside the queues (waiting for credit)."""
        self.budget = budget if budget is not None else SharedBudget(16 << 20)
        """What the queues and ``held`` may hold in all (``budget.limit``) before the
        connection's channels take no more frames (``MuxConfig.connection_buffer_bytes``,
        shared out by ``readers_buffer_bytes``; the caller checks it)."""
        self.budget_full = False
        """A frame found the budget full: every channel hears of room once it is not."""
        self.start_writer: Callable[[], None] | None = None
        """Set by a writer that may retire (:meth:`retire`): starts its task again."""
        self._retiring = False
        self._retired = False
        self.bulk_from = NO_BULK
        """Messages of this urgency and above are bulk: counted in ``bulk_taken`` and held
        back while ``bulk_held`` (``mux.downlink``; ``NO_BULK``: nothing is)."""
        self.bulk_held = False
        self.bulk_taken = 0
        """Characters or bytes of bulk taken since the writer last reset it."""

    def _limit(self, key: str) -> int:
        return self.control_limit if key == CONTROL else self.per_key

    def has_room(self, key: str, n: int = 1) -> bool:
        """True when ``key``'s queue can take ``n`` more messages."""
        q = self._queues.get(key)
        return q is None or len(q.items) + n <= max(self._limit(key), n)

    def put_nowait(self, key: str, urgency: int, *messages: Outgoing) -> None:
        """Queue ``messages`` under ``key`` without waiting (callers check ``has_room``)."""
        q = self._queues.get(key)
        if q is None:  # a queue exists only while it holds something: a new one joins its ring
            q = self._queues[key] = _Queue(urgency)
            ring = self._rings.get(urgency)
            if ring is None:
                ring = self._rings[urgency] = collections.deque()
            ring.append(key)
        q.items.extend(messages)
        self.queued += len(messages)
        self.bytes += len(messages[0]) if len(messages) == 1 else sum(map(len, messages))
        if self._ready or self._retired:  # the writer waits for work (or has retired)
            self._poke()

    def _poke(self) -> None:
        """The waiting (or retired) writer has work: note it for the reader's turn's end
        (``WriteThrough``) or wake it."""
        through = self.write_through
        if through is not None and through.holding and self.write_now is not None:
            if not self._noted:
                self._noted = True
                through.note(self)
        else:
            self._wake()

    def set_bulk_from(self, urgency: int) -> None:
        """Count messages of ``urgency`` and above as bulk (``NO_BULK``: none, and bulk held
        back goes); ignored once the writer is closing (:meth:`end_bulk`)."""
        if self.bulk_from == _ENDED:
            return
        self.bulk_from = urgency
        if urgency == NO_BULK:
            self.hold_bulk(False)

    def end_bulk(self) -> None:
        """Nothing counts as bulk or waits as bulk from now on (the writer is closing: its
        last marker must go out after everything, bulk included)."""
        self.bulk_from = _ENDED
        self.hold_bulk(False)

    def hold_bulk(self, held: bool) -> None:
        """Hold bulk back (``True``) or let it go again; letting it go gives a waiting
        writer the bulk queued meanwhile."""
        was, self.bulk_held = self.bulk_held, held
        if was and not held and self.queued and (self._ready or self._retired):
            self._poke()

    def kick(self) -> None:
        """If the writer still waits and something is queued: ``write_now``, or wake it."""
        self._noted = False
        if self.queued and (self._ready or self._retired):
            write_now = self.write_now
            written = False
            try:
                written = write_now is not None and write_now()
            finally:
                if not written:
                    self._wake()

    def _wake(self) -> None:
        """Wake the waiting writer, or start the retired one's task again."""
        if self._retired:
            self._retired = False
            if self.start_writer is not None:
                self.start_writer()
        else:
            self._ready.unpark_all()

    @property
    def retired(self) -> bool:
        """True while the writer's task has ended (:meth:`retire`) and nothing restarted it."""
        return self._retired

    def retire(self) -> bool:
        """Ask the writer waiting in :meth:`get` with nothing queued to end its task (``get``
        returns None): an idle connection keeps no writer task. The next message queued
        starts it again (``start_writer``). False when no writer waits or none can restart."""
        if not self._ready or self.queued or self.start_writer is None:
            return False
        self._retiring = True
        self._ready.unpark_all()
        return True

    async def put(self, key: str, urgency: int, *messages: Outgoing) -> None:
        """Queue ``messages`` under ``key``, waiting while its queue is full."""
        while not self.has_room(key, len(messages)):
            q = self._queues[key]  # full, so it exists
            if q.room is None:
                q.room = trio.lowlevel.ParkingLot()
            await q.room.park()
        self.put_nowait(key, urgency, *messages)

    def get_nowait(self, limit: int | None = None) -> Outgoing | None:
        """The next message by urgency and turn, or None if nothing is queued (or, with
        ``limit``, if the next message is longer than ``limit``: it stays queued)."""
        if not self.queued:
            return None
        for urgency in sorted(self._rings):
            ring = self._rings[urgency]  # never empty: deleted with its last key
            key = ring[0]
            q = self._queues[key]
            if limit is not None and len(q.items[0]) > limit:
                return None
            if urgency >= self.bulk_from:
                if self.bulk_held:
                    return None  # only bulk is left (rings go by urgency), and it waits
                self.bulk_taken += len(q.items[0])
            ring.popleft()
            message = q.items.popleft()
            self.queued -= 1
            self.bytes -= len(message)
            if q.items:
                ring.append(key)
            else:
                del self._queues[key]
                if not ring:
                    del self._rings[urgency]
                if not self.queued:  # emptied dicts keep their tables: let them go (see heap.py)
                    self._queues.clear()
                    self._rings.clear()
            if q.room is not None:
                q.room.unpark_all()
            if self.on_take is not None and key != CONTROL:
                self.on_take(key)
            return message
        return None

    async def get(self) -> Outgoing | None:
        """Wait for and return the next message; None when :meth:`retire` asked the writer
        to leave and nothing came meanwhile."""
        while True:
            message = self.get_nowait()
            if message is not None:
                self._retiring = False
                return message
            if self._retiring:
                self._retiring, self._retired = False, True
                return None
            await self._ready.park()

    @property
    def bulk_queued(self) -> bool:
        """True when a message that counts as bulk (``bulk_from``) is queued."""
        return bool(self._rings) and max(self._rings) >= self.bulk_from

    @property
    def empty(self) -> bool:
        """True when nothing is queued."""
        return not self.queued
