"""Where a node keeps what must outlive a moment: the frame ledger, channels, mailboxes.

How this works: the core calls the synchronous *record* methods (``append`` a frame,
``record_open``/``record_close`` a channel, ``mail_put``/``mail_ack`` a mailbox entry) on its
hot path; they never block. A store queues them in order and its writer task (``run``)
applies them in batches, one transaction per batch (group commit; while nobody waits in
``flushed``, :class:`SqliteStore` lets a batch gather for ``linger_s``). ``position`` counts what
was recorded, ``await flushed(p)`` returns once everything up to ``p`` is durable: that is
what a durable ``frame_ack`` waits for. ``has_room`` is False while the queue is over its
bound, and the core then refuses new data frames with ``store_busy`` rather than grow.
A batch SQLite cannot commit for now (the database locked by another writer for longer than
its busy timeout, the disk full, an I/O error) is tried again, ever less often, while the
node goes on: nothing acknowledged is lost, durable acks wait, and once the queue is full
data frames are refused ``store_busy`` until the writes succeed again.

:class:`MemoryStore` is the in-process default (nothing survives a restart; the ledger is
bounded). :class:`SqliteStore` keeps everything in ``DATA_DIR/mux.sqlite3`` (WAL mode),
working in a worker thread so the event loop never waits on the disk (the statements come
from :mod:`mux.sqlite_batch`). Another store (for instance one shared by several nodes)
implements the same :class:`Store` protocol; none ships yet.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import orjson
import trio

from . import packed_frames
from .frames import Frame, exact, held_bytes
from .heap import flush_thread_cache, renew
from .sqlite_batch import BatchWriter, Operation, Statement

__all__ = [
    "CHAIN_BYTES",
    "CHAIN_HELD_BYTES",
    "OPERATION_HELD_BYTES",
    "PACK_FRAMES_MAX",
    "STORE_FILE",
    "ChannelRow",
    "MemoryStore",
    "Snapshot",
    "SqliteStore",
    "Store",
]

STORE_FILE = "mux.sqlite3"
"""The store's file name inside a node's data directory."""
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0
"""A batch SQLite could not commit is tried again after ``RETRY_FIRST_S``, then after twice
as long each time, at most ``RETRY_MAX_S`` apart."""

log = logging.getLogger("mux")


@attrs.frozen
class ChannelRow:
    """A channel as stored: enough to rebuild it after a restart."""

    id: str
    intent: str
    agent: str
    target: str
    metadata: dict[str, Any]
    opened_at: float
    closed: bool
    close_reason: str | None
    first: Frame | None
    last: Frame | None


@attrs.frozen
class Snapshot:
    """What a store holds at start-up: channels and unacknowledged mailbox frames, in order."""

    channels: list[ChannelRow]
    mail: list[Frame]


class Store(Protocol):
    """The storage seam. Record methods are sync and ordered; ``run`` applies them."""

    position: int
    stalled: str | None
    """Why the writer cannot commit now (it keeps trying), else None."""

    def append(self, frame: Frame) -> None:
        """Record a chained frame in the ledger."""

    def record_open(self, row: ChannelRow) -> None:
        """Record a new channel."""

    def record_close(self, channel_id: str, reason: str) -> None:
        """Record that a channel closed."""

    def mail_put(self, frame: Frame) -> None:
        """Record ``frame`` as waiting in ``frame.target``'s mailbox."""

    def mail_ack(self, agent: str, channel_id: str, upto_seq: int) -> None:
        """Drop ``agent``'s mailbox entries of ``channel_id`` with ``seq <= upto_seq``."""

    def mail_drop(self, agent: str, channel_id: str, seq: int) -> None:
        """Drop one mailbox entry (expired by the retention policy)."""

    def has_room(self) -> bool:
        """False while too much is queued for the writer."""

    def compact(self) -> int:
        """After a burst of closes: move or let go of what the burst left in memory; returns
        the bytes given back, as far as known."""

    def usage(self) -> dict[str, Any]:
        """What the store holds now, for ``/status`` (``ledger``)."""

    async def flushed(self, position: int) -> None:
        """Return once everything recorded up to ``position`` is durable."""

    async def chain(self, channel_id: str, after_seq: int = -1, limit: int | None = None) -> list[Frame]:
        """The ledger's frames of a channel with ``seq > after_seq``, in order."""

    async def load(self) -> Snapshot:
        """What survived from before this start."""

    async def channel_ends(self, channel_id: str) -> tuple[str, str] | None:
        """The two ends of a channel the store still knows (for exports of channels the Mux
        no longer remembers), or None."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task."""


CHAIN_HELD_BYTES = 256
"""What the in-memory ledger holds per chain beside its frames (the list, the lookups)."""
OPERATION_HELD_BYTES = 256
"""What a queued store operation other than a frame holds (a tuple of a few short values),
beside a channel's metadata."""
CHAIN_BYTES = 4 << 20
"""The in-memory ledger's default bound per chain (``MemoryStore.max_bytes_per_channel``)."""
PACK_FRAMES_MAX = 256
"""A closed channel's chain of at most this many frames is packed into one ``bytes`` when it
closes (:mod:`mux.packed_frames`: 1.6 ms for 256 small frames here); a longer one stays as it
is (packing happens inside the close, on the event loop)."""


@attrs.define(eq=False)
class MemoryStore:
    """In-memory store: a bounded ledger (``max_channels`` chains of at most
    ``max_frames_per_channel`` frames and ``max_bytes_per_channel`` bytes, at most
    ``max_total_bytes`` in all; over a bound the chains begun longest ago are forgotten first,
    never the one just written to, whose oldest frames go instead); nothing survives a restart.

    Bytes are what the frames hold in memory, payload and bookkeeping
    (:func:`mux.frames.held_bytes`, about 560 bytes a frame beside its payload), so the bounds
    hold for small frames too: a million 50-byte frames count 610 MB, not 50.

    A chain of a closed channel (of at most ``PACK_FRAMES_MAX``, 256, frames) is kept packed, as
    one ``bytes`` (:mod:`mux.packed_frames`) that counts its own length: an open and a close
    frame take under 500 bytes instead of the 1,200 they hold as frames (``held_bytes``). Reads unpack a copy;
    a frame appended to a packed chain unpacks it first. :meth:`compact` (after a burst of
    closes) moves the packed chains into new objects, so what the ledger keeps does not
    hold on to the memory the burst took."""

    max_channels: int = 4096
    max_frames_per_channel: int = 100_000
    max_bytes_per_channel: int = CHAIN_BYTES
    """Bytes kept per chain; older frames are forgotten first (partial export)."""
    max_total_bytes: int = 64 << 20
    """Bytes kept in all, chains included; the chains begun longest ago are forgotten first."""
    position: int = 0
    stalled: str | None = attrs.field(default=None, init=False)
    """Never: memory does not stall."""
    _bytes: dict[str, int] = attrs.field(factory=dict, init=False)
    """Bytes each chain kept as frames holds (packed chains count their length instead)."""
    _total: int = attrs.field(default=0, init=False)
    _frames: int = attrs.field(default=0, init=False)
    _chains: collections.OrderedDict[str, list[Frame] | collections.deque[Frame] | bytes] = attrs.field(
        factory=collections.OrderedDict, init=False
    )

    @classmethod
    def holding(cls, total_bytes: int) -> MemoryStore:
        """A store holding at most ``total_bytes`` in all, and per chain."""
        return cls(max_total_bytes=total_bytes, max_bytes_per_channel=min(CHAIN_BYTES, total_bytes))

    def usage(self) -> dict[str, Any]:
        """``{"store": "memory", "chains", "packed", "frames", "bytes", "max_bytes"}``: bytes
        as counted against ``max_total_bytes`` (:func:`mux.frames.held_bytes`, or a packed
        chain's length); ``packed``, the closed channels' chains kept packed."""
        return {
            "store": "memory",
            "chains": len(self._chains),
            "packed": len(self._chains) - len(self._bytes),
            "frames": self._frames,
            "bytes": self._total,
            "max_bytes": self.max_total_bytes,
        }

    def append(self, frame: Frame) -> None:
        """Keep ``frame``; past a bound, forget the oldest frames of its chain, then (``_make_room``)
        the chains begun longest ago."""
        cid = frame.channel_id
        chain = self._chains.get(cid)
        if chain is None:
            chain = self._chains[cid] = []  # most chains stay short: a list is 8x smaller than a deque
            self._bytes[cid] = 0
            self._total += CHAIN_HELD_BYTES
        elif isinstance(chain, bytes):
            chain = self._unpacked(cid, chain)
        chain.append(frame)
        self._frames += 1
        size = held_bytes(frame)
        held = self._bytes[cid] + size
        before = held
        while len(chain) > 1 and (held > self.max_bytes_per_channel or len(chain) > self.max_frames_per_channel):
            if isinstance(chain, list):
                chain = self._chains[cid] = collections.deque(chain)
            held -= held_bytes(chain.popleft())
            self._frames -= 1
        self._bytes[cid] = held
        self._total += size - (before - held)
        if len(self._chains) > self.max_channels or self._total > self.max_total_bytes:
            self._make_room(cid)
        self.position += 1

    def _unpacked(self, cid: str, packed: bytes) -> list[Frame]:
        """Put a packed chain back as frames (a frame is appended to it)."""
        frames = packed_frames.unpack(packed, cid)
        held = sum(held_bytes(frame) for frame in frames)
        self._chains[cid] = frames  # an existing key keeps its place in the order
        self._bytes[cid] = held
        self._total += held - len(packed)
        return frames

    def _make_room(self, written: str) -> None:
        """Forget the chains begun longest ago but ``written`` (the chain just appended to)
        until within ``max_channels`` and ``max_total_bytes``; then, while still over, forget
        ``written``'s oldest frames (its newest is always kept)."""
        chains = self._chains
        while len(chains) > self.max_channels or self._total > self.max_total_bytes:
            oldest: str | None = next(iter(chains))
            if oldest == written:
                oldest = next(itertools.islice(chains, 1, None), None)
            if oldest is None:
                break
            forgotten = chains.pop(oldest)
            if isinstance(forgotten, bytes):
                self._total -= len(forgotten) + CHAIN_HELD_BYTES
                self._frames -= packed_frames.count(forgotten)
            else:
                self._total -= self._bytes.pop(oldest) + CHAIN_HELD_BYTES
                self._frames -= len(forgotten)
        chain = chains[written]
        assert not isinstance(chain, bytes)  # just appended to: unpacked
        while self._total > self.max_total_bytes and len(chain) > 1:
            if isinstance(chain, list):
                chain = chains[written] = collections.deque(chain)
            size = held_bytes(chain.popleft())
            self._frames -= 1
            self._bytes[written] -= size
            self._total -= size

    def compact(self) -> int:
        """Move the packed chains, and the keys they are kept under, into new objects (after
        a burst of closes: the old ones sit among the burst's freed memory, and would keep
        it from going back); returns the bytes the ledger's table gave back."""
        before = sys.getsizeof(self._chains)
        fresh: collections.OrderedDict[str, list[Frame] | collections.deque[Frame] | bytes] = collections.OrderedDict()
        for cid, chain in self._chains.items():
            if isinstance(chain, bytes):
                fresh[renew(cid)] = bytes(memoryview(chain))
            else:
                fresh[cid] = chain
        self._chains = fresh
        return max(0, before - sys.getsizeof(fresh))

    def record_open(self, row: ChannelRow) -> None:
        """Nothing to persist in memory."""

    def record_close(self, channel_id: str, reason: str) -> None:
        """Pack the closed channel's chain (of at most ``PACK_FRAMES_MAX`` frames): nothing is
        appended to it any more but, now and then, a seal."""
        chain = self._chains.get(channel_id)
        if chain is None or isinstance(chain, bytes) or len(chain) > PACK_FRAMES_MAX:
            return
        packed = packed_frames.pack(chain)
        self._chains[channel_id] = packed
        self._total += len(packed) - self._bytes.pop(channel_id)

    def mail_put(self, frame: Frame) -> None:
        """Mailboxes live in the Mux; nothing more to keep."""

    def mail_ack(self, agent: str, channel_id: str, upto_seq: int) -> None:
        """Nothing to persist in memory."""

    def mail_drop(self, agent: str, channel_id: str, seq: int) -> None:
        """Nothing to persist in memory."""

    def has_room(self) -> bool:
        """Always: appends are O(1) and bounded."""
        return True

    async def flushed(self, position: int) -> None:
        """Memory is as durable as it gets here."""
        await trio.lowlevel.checkpoint()

    async def chain(self, channel_id: str, after_seq: int = -1, limit: int | None = None) -> list[Frame]:
        """Frames of ``channel_id`` with ``seq > after_seq``."""
        await trio.lowlevel.checkpoint()
        chain = self._frames_of(channel_id)
        if not chain:
            return []
        out = list(chain) if after_seq < chain[0].seq else [f for f in chain if f.seq > after_seq]
        return out if limit is None else out[:limit]

    def _frames_of(self, channel_id: str) -> Sequence[Frame]:
        """The frames kept of ``channel_id`` (a packed chain unpacked anew), maybe none."""
        chain = self._chains.get(channel_id)
        if isinstance(chain, bytes):
            return packed_frames.unpack(chain, channel_id)
        return chain if chain is not None else ()

    async def load(self) -> Snapshot:
        """A memory store starts empty."""
        await trio.lowlevel.checkpoint()
        return Snapshot([], [])

    async def channel_ends(self, channel_id: str) -> tuple[str, str] | None:
        """The ends of a channel whose chain is kept, as its open frame or any data frame
        names them (sender and target); None without one (a chain of which only a close or
        seal frame is kept)."""
        await trio.lowlevel.checkpoint()
        for frame in self._frames_of(channel_id):
            if frame.kind in ("open", "data"):
                return frame.sender, frame.target
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """No writer needed."""
        task_status.started()
        await trio.sleep_forever()


_SCHEMA = """
PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS frames (
    channel_id TEXT NOT NULL, seq INTEGER NOT NULL, target TEXT NOT NULL, ts INTEGER NOT NULL,
    frame BLOB NOT NULL, PRIMARY KEY (channel_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS channels (
    id TEXT PRIMARY KEY, intent TEXT NOT NULL, agent TEXT NOT NULL, target TEXT NOT NULL,
    metadata BLOB NOT NULL, opened_at REAL NOT NULL, closed INTEGER NOT NULL DEFAULT 0,
    close_reason TEXT);
CREATE TABLE IF NOT EXISTS mailbox (
    agent TEXT NOT NULL, channel_id TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (agent, channel_id, seq)) WITHOUT ROWID;
"""


def _operation_bytes(operation: Operation) -> int:
    """Memory a queued operation holds: a frame's (``held_bytes``), else a small tuple's plus
    the metadata of a channel's row."""
    op, args, frame = operation
    if frame is not None:
        return held_bytes(frame)
    return OPERATION_HELD_BYTES + (len(args[4]) if op == "open" else 0)


class SqliteStore:
    """Durable store in one SQLite file (WAL), written by a worker thread in batches.

    ``synchronous="NORMAL"`` (default) survives a killed process; ``"FULL"`` also survives
    power loss at some cost per commit. ``max_queue`` operations and ``max_queue_bytes`` of
    memory (frames counted as they hold it, :func:`mux.frames.held_bytes`) bound what may
    wait for the writer: past either, data frames are refused ``store_busy``.
    While nobody waits for durability (``flushed``), the writer lets operations gather for up
    to ``linger_s`` (or until ``batch`` are queued) before it commits: a live relay's ledger
    frames then go in a few large transactions instead of one small one per wake-up, each of
    which cost a thread hand-off and a commit. A durable send never waits for the linger.
    ``busy_timeout_s`` is how long a statement waits for another writer's lock before the
    commit counts as failed (and is tried again: see the module).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "NORMAL",
        max_queue: int = 50_000,
        max_queue_bytes: int = 64 << 20,
        batch: int = 2048,
        linger_s: float = 0.02,
        busy_timeout_s: float = 5.0,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be NORMAL or FULL")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None)
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._writer = BatchWriter(self._db)
        self._limiter = trio.CapacityLimiter(1)
        self._queue: collections.deque[Operation] = collections.deque()
        self._wake = trio.Event()
        self._urgent = trio.Event()
        self._done = trio.lowlevel.ParkingLot()
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self._queued_bytes = 0
        self.batch = batch
        self.linger_s = linger_s
        self.position = 0
        self.durable = 0
        self.failed: BaseException | None = None
        self.stalled: str | None = None
        """The error of the last commit that failed and is being tried again, else None."""
        self._stopped = False
        self._release = False
        """Set by :meth:`compact`: the writer hands back SQLite's page cache once it has
        written everything queued."""

    def _put(self, op: str, args: tuple[Any, ...], frame: Frame | None = None) -> None:
        operation = (op, args, frame)
        self._queue.append(operation)
        self._queued_bytes += _operation_bytes(operation)
        self.position += 1
        self._wake.set()
        if len(self._queue) >= self.batch:
            self._urgent.set()

    def append(self, frame: Frame) -> None:
        """Queue ``frame`` for the ledger table (encoded by the writer, when it writes)."""
        self._put("frame", (), frame)

    def record_open(self, row: ChannelRow) -> None:
        """Queue a channel row."""
        metadata = exact(orjson.dumps(row.metadata))
        self._put("open", (row.id, row.intent, row.agent, row.target, metadata, row.opened_at))

    def record_close(self, channel_id: str, reason: str) -> None:
        """Queue a channel's close."""
        self._put("close", (reason, channel_id))

    def mail_put(self, frame: Frame) -> None:
        """Queue a mailbox entry for ``frame.target``."""
        self._put("mail", (frame.target, frame.channel_id, frame.seq))

    def mail_ack(self, agent: str, channel_id: str, upto_seq: int) -> None:
        """Queue the removal of acknowledged mailbox entries."""
        self._put("ack", (agent, channel_id, upto_seq))

    def mail_drop(self, agent: str, channel_id: str, seq: int) -> None:
        """Queue the removal of one expired mailbox entry."""
        self._put("drop", (agent, channel_id, seq))

    def compact(self) -> int:
        """After a burst of closes: once everything queued is written, the writer hands
        SQLite's page cache back (``PRAGMA shrink_memory``: up to 2 MiB, which a burst of
        writes fills and SQLite otherwise keeps); the ledger itself is on disk. Returns 0:
        SQLite does not say how much it gave back."""
        self._release = True
        self._wake.set()
        return 0

    def _release_cache(self) -> None:
        """In the writer's thread: SQLite's page cache, then the thread's cache of freed
        blocks (jemalloc), both handed back."""
        try:
            self._db.execute("PRAGMA shrink_memory")
        except sqlite3.Error as exc:  # memory only: the store works on either way
            log.warning("store %s: could not hand back its page cache: %s", self.path, exc)
        flush_thread_cache()

    def has_room(self) -> bool:
        """False while ``max_queue`` operations or ``max_queue_bytes`` wait for the writer."""
        return len(self._queue) < self.max_queue and self._queued_bytes < self.max_queue_bytes

    def usage(self) -> dict[str, Any]:
        """``{"store": "sqlite", "queued", "queued_bytes", "max_queue", "max_queue_bytes"}``:
        what waits for the writer (the ledger itself is on disk)."""
        return {
            "store": "sqlite",
            "queued": len(self._queue),
            "queued_bytes": self._queued_bytes,
            "max_queue": self.max_queue,
            "max_queue_bytes": self.max_queue_bytes,
        }

    async def flushed(self, position: int) -> None:
        """Wait until everything up to ``position`` is committed (raises if the writer died)."""
        while self.durable < position:
            if self.failed is not None:
                raise RuntimeError(f"store writer failed: {self.failed!r}")
            if self._stopped:
                raise RuntimeError("store writer stopped")
            self._urgent.set()
            await self._done.park()

    def _write(self, plan: list[Statement]) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            self._writer.execute(plan)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT may have ended it already
                db.execute("ROLLBACK")
            raise

    async def _commit(self, plan: list[Statement]) -> bool:
        """Commit ``plan`` in the worker thread; False (logged, ``stalled`` set) when SQLite
        cannot for now, which leaves nothing of it written."""
        try:
            await trio.to_thread.run_sync(self._write, plan, limiter=self._limiter)
        except sqlite3.OperationalError as exc:
            if self.stalled is None:
                log.warning(
                    "store %s: cannot commit (%s); trying again, refusing data frames once full", self.path, exc
                )
            self.stalled = str(exc)
            return False
        if self.stalled is not None:
            log.warning("store %s: commits again (after: %s)", self.path, self.stalled)
            self.stalled = None
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer: take what is queued (up to ``batch``), commit it in one transaction."""
        task_status.started()
        try:
            while True:
                if self._release and not self._queue:
                    self._release = False
                    await trio.to_thread.run_sync(self._release_cache, limiter=self._limiter)
                if not self._queue:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue  # woken by compact, with nothing to write: release first
                if not self._done and len(self._queue) < self.batch:  # nobody waits: let more gather
                    with trio.move_on_after(self.linger_s):
                        await self._urgent.wait()
                self._urgent = trio.Event()
                n = min(len(self._queue), self.batch)
                plan = self._writer.plan([self._queue[i] for i in range(n)])  # the thread only binds
                delay = RETRY_FIRST_S
                while True:
                    with trio.CancelScope(shield=True):  # a batch is committed and dequeued as one
                        committed = await self._commit(plan)
                    if committed:
                        break
                    await trio.sleep(delay)  # cancellable: the batch is still queued
                    delay = min(delay * 2, RETRY_MAX_S)
                del plan  # its rows (the batch's frames, encoded) are not kept while the writer waits
                for _ in range(n):
                    self._queued_bytes -= _operation_bytes(self._queue.popleft())
                self.durable += n
                self._done.unpark_all()
        except trio.Cancelled:
            raise  # stopping is not failing: what is still queued is written below
        except BaseException as exc:
            self.failed = exc
            raise
        finally:
            try:
                with trio.CancelScope(shield=True):
                    await self._drain_on_exit()
            finally:  # written or not, no durable wait is left parked
                self._stopped = True
                self._done.unpark_all()

    async def _drain_on_exit(self) -> None:
        if self._queue and self.failed is None:
            batch = list(self._queue)
            await trio.to_thread.run_sync(self._write, self._writer.plan(batch), limiter=self._limiter)
            self._queue.clear()
            self._queued_bytes = 0
            self.durable = self.position

    async def chain(self, channel_id: str, after_seq: int = -1, limit: int | None = None) -> list[Frame]:
        """Committed frames plus the ones still queued, in seq order, no duplicates."""
        queued = [f for op, _, f in list(self._queue) if f is not None and f.channel_id == channel_id]

        def read() -> list[bytes]:
            rows = self._db.execute(
                "SELECT frame FROM frames WHERE channel_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (channel_id, after_seq, -1 if limit is None else limit),
            ).fetchall()
            return [r[0] for r in rows]

        stored = [Frame.from_dict(orjson.loads(b)) for b in await trio.to_thread.run_sync(read, limiter=self._limiter)]
        seen = {f.seq for f in stored}
        merged = stored + [f for f in queued if f.seq > after_seq and f.seq not in seen]
        merged.sort(key=lambda f: f.seq)
        return merged if limit is None else merged[:limit]

    async def load(self) -> Snapshot:
        """Channels with their last frame, and every mailbox entry, oldest first."""

        def read() -> Snapshot:
            db = self._db
            channels = []
            for cid, intent, agent, target, meta, opened_at, closed, reason in db.execute(
                "SELECT id, intent, agent, target, metadata, opened_at, closed, close_reason FROM channels "
                "WHERE closed = 0 OR id IN (SELECT channel_id FROM mailbox)"
            ):
                ends = [
                    db.execute(
                        f"SELECT frame FROM frames WHERE channel_id = ? ORDER BY seq {order} LIMIT 1", (cid,)
                    ).fetchone()
                    for order in ("ASC", "DESC")
                ]
                first, last = (Frame.from_dict(orjson.loads(e[0])) if e else None for e in ends)
                channels.append(
                    ChannelRow(
                        cid, intent, agent, target, orjson.loads(meta), opened_at, bool(closed), reason, first, last
                    )
                )
            mail = [
                Frame.from_dict(orjson.loads(row[0]))
                for row in db.execute(
                    "SELECT f.frame FROM mailbox m JOIN frames f ON f.channel_id = m.channel_id AND f.seq = m.seq "
                    "ORDER BY f.ts, m.channel_id, m.seq"
                )
            ]
            return Snapshot(channels, mail)

        return await trio.to_thread.run_sync(read, limiter=self._limiter)

    async def channel_ends(self, channel_id: str) -> tuple[str, str] | None:
        """The opener and target of ``channel_id`` from its stored row (for exports of
        long-closed channels), or None."""

        def read() -> tuple[str, str] | None:
            row = self._db.execute("SELECT agent, target FROM channels WHERE id = ?", (channel_id,)).fetchone()
            return None if row is None else (str(row[0]), str(row[1]))

        return await trio.to_thread.run_sync(read, limiter=self._limiter)

    def close(self) -> None:
        """Close the database (after the writer has stopped)."""
        self._db.close()
