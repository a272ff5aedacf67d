"""The SQLite store's writer: batches in few statements with the same end state, a linger
that durable sends never wait for, nothing queued lost when it stops, no orjson slack kept."""

from __future__ import annotations

import ctypes.util
import gc
import random
import sqlite3
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

import mux
from mux.core import MuxConfig, start_mux
from mux.frames import Frame, canonical_json, exact, held_bytes
from mux.signing import NodeKey, verify_chain
from mux.sqlite_batch import BatchWriter, Operation, Statement
from mux.storage import _SCHEMA, ChannelRow, SqliteStore


def _frame(cid: str, seq: int, payload: Any = None) -> Frame:
    """A ledger frame as the store sees it (the store neither hashes nor verifies)."""
    return Frame.from_dict(
        {
            "channel_id": cid,
            "seq": seq,
            "kind": "data",
            "sender": "a",
            "target": "b",
            "intent": "stream",
            "ts": 1_000 + seq,
            "prev": "0" * 64,
            "payload": {"n": seq} if payload is None else payload,
            "tbz_hash": f"{seq:064x}",
            "sig": "s",
        }
    )


def _db() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.executescript(_SCHEMA)
    return db


def _one_by_one(db: sqlite3.Connection, batch: list[Operation]) -> None:
    """The reference: each operation as its own statement, in order."""
    sql = {
        "open": "INSERT OR IGNORE INTO channels (id, intent, agent, target, metadata, opened_at) VALUES (?,?,?,?,?,?)",
        "close": "UPDATE channels SET closed = 1, close_reason = ? WHERE id = ?",
        "mail": "INSERT OR IGNORE INTO mailbox (agent, channel_id, seq) VALUES (?, ?, ?)",
        "ack": "DELETE FROM mailbox WHERE agent = ? AND channel_id = ? AND seq <= ?",
        "drop": "DELETE FROM mailbox WHERE agent = ? AND channel_id = ? AND seq = ?",
    }
    for op, args, frame in batch:
        if op == "frame":
            assert frame is not None
            db.execute(
                "INSERT OR IGNORE INTO frames (channel_id, seq, target, ts, frame) VALUES (?, ?, ?, ?, ?)",
                (frame.channel_id, frame.seq, frame.target, frame.ts, frame.to_json()),
            )
        else:
            db.execute(sql[op], args)


def _tables(db: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2, 3").fetchall() for t in ("channels", "frames", "mailbox")}


def _random_batch(rng: random.Random, n: int) -> list[Operation]:
    """Operations as a node makes them: a channel opens before its frames, mail and close;
    frames repeat now and then (the first copy must win); acks and drops follow mail."""
    batch: list[Operation] = []
    open_ids: list[str] = []
    seqs: dict[str, int] = {}
    for i in range(n):
        roll = rng.random()
        if roll < 0.15 or not open_ids:
            cid = f"ch-{i}"
            open_ids.append(cid)
            seqs[cid] = 0
            batch.append(("open", (cid, "chat", "a", "b", b"{}", float(i)), None))
        elif roll < 0.6:
            cid = rng.choice(open_ids)
            seq = seqs[cid] if rng.random() > 0.1 or not seqs[cid] else seqs[cid] - 1  # now and then a repeat
            seqs[cid] = max(seqs[cid], seq + 1)
            batch.append(("frame", (), _frame(cid, seq, {"n": seq, "copy": rng.random()})))
        elif roll < 0.75:
            cid = rng.choice(open_ids)
            batch.append(("mail", ("b", cid, seqs[cid]), None))
        elif roll < 0.82:
            cid = rng.choice(open_ids)
            batch.append(("ack", ("b", cid, rng.randrange(seqs[cid] + 1)), None))
        elif roll < 0.88:
            cid = rng.choice(open_ids)
            batch.append(("drop", ("b", cid, rng.randrange(seqs[cid] + 1)), None))
        else:
            cid = open_ids.pop(rng.randrange(len(open_ids)))
            batch.append(("close", (f"reason-{i}", cid), None))
    return batch


@pytest.mark.parametrize("update_from", [True, False], ids=["update-from", "sqlite-before-3.33"])
@pytest.mark.parametrize("n", [1, 7, 9, 65, 600, 1500])
def test_a_batch_ends_as_its_operations_applied_one_by_one(n: int, update_from: bool) -> None:
    """Sizes below, at and across the statement sizes (8, 64, 512), padded parts included."""
    for seed in range(3):
        batch = _random_batch(random.Random(seed * 1000 + n), n)
        ours, reference = _db(), _db()
        writer = BatchWriter(ours)
        writer._update_from = update_from and writer._update_from
        writer.execute(writer.plan(batch))
        _one_by_one(reference, batch)
        assert _tables(ours) == _tables(reference)
        assert _tables(ours)["frames"] or n < 3


def test_a_batch_takes_a_few_statements() -> None:
    """1,000 frames, 200 opens and 200 closes: a handful of statements, not 1,400 (each one
    gives up the GIL and waits to take it back from the event loop)."""
    db = _db()
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    batch: list[Operation] = [("open", (f"c{i}", "stream", "a", "b", b"{}", 0.0), None) for i in range(200)]
    batch += [("frame", (), _frame(f"c{i % 200}", i // 200)) for i in range(1000)]
    batch += [("close", ("done", f"c{i}"), None) for i in range(200)]
    writer = BatchWriter(db)
    writer.execute(writer.plan(batch))
    assert len(statements) <= 8, len(statements)
    assert db.execute("SELECT count(*) FROM frames").fetchone() == (1000,)
    assert db.execute("SELECT count(*) FROM channels WHERE closed = 1 AND close_reason = 'done'").fetchone() == (200,)


def test_the_statement_sizes_follow_the_connections_parameter_limit() -> None:
    db = _db()
    db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)  # SQLite's default before 3.32
    writer = BatchWriter(db)
    assert writer.sizes == (64, 8)
    batch: list[Operation] = [("frame", (), _frame("c", i)) for i in range(300)]
    writer.execute(writer.plan(batch))
    assert db.execute("SELECT count(*) FROM frames").fetchone() == (300,)


def _store(tmp_path: Path, **kw: Any) -> SqliteStore:
    return SqliteStore(tmp_path / "mux.sqlite3", **kw)


@asynccontextmanager
async def _relay(nursery: trio.Nursery, store: SqliteStore) -> AsyncIterator[tuple[mux.Mux, mux.Channel, mux.Channel]]:
    """A Mux on ``store`` with a ``stream`` channel alice -> bob (bob's handle as ``peer``),
    everything so far committed."""
    m = await start_mux(nursery, agent="n", key=NodeKey.generate(), config=MuxConfig(), store=store)
    async with m.attach("bob") as bob:
        ch = await m.open("bob", "stream", agent="alice")
        peer = await bob.accept()
        with trio.fail_after(5):
            await store.flushed(store.position)
        yield m, ch, peer


def _write_lock(tmp_path: Path) -> sqlite3.Connection:
    """Another connection holding the database's write lock: the writer's commits wait."""
    blocker = sqlite3.connect(tmp_path / "mux.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    return blocker


def _rows(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "mux.sqlite3") as db:
        return int(db.execute("SELECT count(*) FROM frames").fetchone()[0])


async def test_live_frames_gather_into_one_commit(tmp_path: Path) -> None:
    store = _store(tmp_path, linger_s=0.5)
    commits = 0
    write = store._write

    def counting(plan: list[Statement]) -> None:
        nonlocal commits
        commits += 1
        write(plan)

    store._write = counting  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for i in range(50):
            store.append(_frame("c", i))
            await trio.lowlevel.checkpoint()  # frames arrive one by one; the writer may wake between
        usage = store.usage()  # lingering
        assert (usage["store"], usage["queued"], usage["max_queue"]) == ("sqlite", 50, store.max_queue)
        assert usage["queued_bytes"] == sum(held_bytes(_frame("c", i)) for i in range(50))
        with trio.fail_after(5):
            while store.durable < 50:  # noqa: ASYNC110  (flushed() would hurry the writer)
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    store.close()
    assert commits == 1
    assert _rows(tmp_path) == 50
    assert store.usage()["queued"] == 0


async def test_a_durable_send_does_not_wait_for_the_linger(tmp_path: Path) -> None:
    store = _store(tmp_path, linger_s=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        store.append(_frame("c", 0))
        await trio.sleep(0.05)  # the writer lingers now
        store.append(_frame("c", 1))
        with trio.fail_after(5):
            await store.flushed(store.position)
        assert store.durable == 2
        nursery.cancel_scope.cancel()
    store.close()
    assert _rows(tmp_path) == 2


async def test_a_full_batch_does_not_wait_for_the_linger(tmp_path: Path) -> None:
    store = _store(tmp_path, linger_s=30.0, batch=64)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for i in range(64):
            store.append(_frame("c", i))
        with trio.fail_after(5):
            while store.durable < 64:  # noqa: ASYNC110  (flushed() would hurry the writer)
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    store.close()


async def test_what_is_queued_is_written_when_the_writer_stops(tmp_path: Path) -> None:
    """Cancelled while it lingers, the writer still commits what is queued; a later durable
    wait fails clearly instead of hanging."""
    store = _store(tmp_path, linger_s=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for i in range(10):
            store.append(_frame("c", i))
        store.record_open(ChannelRow("c", "stream", "a", "b", {"k": 1}, 0.0, False, None, None, None))
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert store.durable == store.position == 11
    store.append(_frame("c", 10))
    with pytest.raises(RuntimeError, match="stopped"):
        await store.flushed(store.position)
    store.close()
    assert _rows(tmp_path) == 10


def _sqlite_memory_used() -> int:
    """What SQLite has allocated in this process, all connections (``sqlite3_memory_used``
    of the library Python's ``sqlite3`` module runs on)."""
    name = ctypes.util.find_library("sqlite3")
    if name is None:
        pytest.fail("libsqlite3 not found: Python's sqlite3 module loads it")
    library = ctypes.CDLL(name)
    library.sqlite3_memory_used.restype = ctypes.c_int64
    return int(library.sqlite3_memory_used())


async def test_compact_hands_the_page_cache_back_once_what_is_queued_is_written(tmp_path: Path) -> None:
    """docs/performance.md, "Memory": after a burst, the trimmer's ``compact`` has the writer
    hand SQLite's page cache back (a burst of writes fills it, 2 MiB by default), but only
    after everything queued then is committed (written first, not dropped)."""
    store = _store(tmp_path, linger_s=0.0)
    statements: list[str] = []
    padding = {"pad": "x" * 400}
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        store._db.set_trace_callback(statements.append)  # called in the writer's thread
        gc.collect()  # earlier tests' connections close now, not while this one is measured
        start = _sqlite_memory_used()
        for i in range(4000):
            store.append(_frame("c", i, padding))
        with trio.fail_after(10):
            await store.flushed(store.position)
        filled = _sqlite_memory_used()
        assert filled - start > 1 << 20  # the cache took what the burst wrote
        for i in range(4000, 4100):
            store.append(_frame("c", i, padding))
        assert store.compact() == 0  # SQLite does not say how much
        with trio.fail_after(10):
            while "PRAGMA shrink_memory" not in statements:  # noqa: ASYNC110  (the writer's thread)
                await trio.sleep(0.01)
        assert store.durable == store.position  # the 100 queued frames went in first
        nursery.cancel_scope.cancel()
    released = statements.index("PRAGMA shrink_memory")
    assert "COMMIT" in statements[:released] and statements.count("PRAGMA shrink_memory") == 1
    assert _sqlite_memory_used() < filled - (1 << 20)
    store.close()
    assert _rows(tmp_path) == 4100


async def test_the_writer_keeps_nothing_of_a_written_batch_while_it_waits(tmp_path: Path) -> None:
    """The batch's statements (every frame encoded) are let go once committed, not held by
    the waiting writer until the next batch: after a burst, that would be the burst's last
    batch kept for as long as the node stays quiet, among the pages the burst took."""
    store = _store(tmp_path, linger_s=0.0)
    padding = {"pad": "x" * 1000}
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await trio.sleep(0.05)  # the writer waits for its first batch
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for i in range(500):
                store.append(_frame("c", i, padding))
            with trio.fail_after(10):
                await store.flushed(store.position)
            await trio.sleep(0.05)  # the writer waits again
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        nursery.cancel_scope.cancel()
    assert kept < 100_000  # the batch encoded: over 500 KB
    store.close()


def test_kept_json_carries_no_orjson_slack() -> None:
    """orjson returns its whole working buffer (1-8 KiB); what frames and the store keep is
    exact-size."""
    frames = [_frame("c", i) for i in range(200)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        kept = [f.to_json() for f in frames] + [exact(orjson.dumps({})) for _ in range(200)]
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < sum(len(b) + 64 for b in kept) + 200 * 8 + 4096
    assert exact(canonical_json({"b": 1, "a": 2})) == b'{"a":2,"b":1}'


async def test_a_failed_last_write_leaves_no_durable_wait_parked(tmp_path: Path) -> None:
    """The writer's last write at its stop fails: a durable wait hears that the writer
    stopped rather than wait forever."""
    store = _store(tmp_path, linger_s=30.0)
    scope = trio.CancelScope()
    seen: list[str] = []

    async def writer() -> None:
        with scope:
            try:
                await store.run()
            except sqlite3.OperationalError as exc:
                seen.append(f"writer: {exc}")

    async def durable_wait() -> None:
        with pytest.raises(RuntimeError, match="stopped"):
            await store.flushed(store.position)
        seen.append("waiter: stopped")

    def broken(plan: list[Statement]) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.sleep(0.01)
            store.append(_frame("c", 0))
            await trio.sleep(0.05)  # the writer lingers
            store._write = broken  # type: ignore[method-assign]
            scope.cancel()
            nursery.start_soon(durable_wait)
    store.close()
    assert sorted(seen) == ["waiter: stopped", "writer: disk I/O error"]


async def test_a_stalled_store_refuses_data_frames_with_store_busy_then_recovers(tmp_path: Path) -> None:
    """While another connection holds the database's write lock (a disk or backup stall),
    the writer cannot commit: once ``max_queue`` operations wait, data frames are refused
    ``store_busy`` (never chained: no gap in the chain), the channel stays open, and when
    the lock goes everything accepted is committed and delivered, and sends are taken again."""
    store = _store(tmp_path, max_queue=16, linger_s=0.0)
    async with trio.open_nursery() as nursery:
        async with _relay(nursery, store) as (m, ch, peer):
            blocker = _write_lock(tmp_path)
            accepted: list[int] = []
            refused = 0
            for i in range(40):
                try:
                    await ch.send(i, wait=False)
                    accepted.append(i)
                except mux.ChannelFull as exc:
                    assert exc.code == "store_busy" and exc.channel_id == ch.id
                    refused += 1
                await trio.sleep(0.005)  # the writer is stuck in its commit meanwhile
            assert refused > 0 and 0 < len(accepted) <= 16, (accepted, refused)
            assert ch.state == "open" and store.durable < store.position
            blocker.execute("ROLLBACK")
            blocker.close()
            with trio.fail_after(10):
                await store.flushed(store.position)
            await ch.send("after", wait=False)
            got = []
            while (frame := peer.receive_nowait()) is not None:
                got.append(frame.payload)
            assert got == [*accepted, "after"]
            chain = await m.export(ch.id)
            assert [f.seq for f in chain] == list(range(len(chain)))  # no gap where frames were refused
            assert [f.payload for f in chain[1:]] == [*accepted, "after"]
            assert verify_chain(chain, m.public_key).frames == len(chain)
        nursery.cancel_scope.cancel()
    store.close()
    assert _rows(tmp_path) == len(accepted) + 2 + 1  # open, the accepted frames, "after", bob's close


async def test_what_waits_for_a_stalled_store_is_bounded_in_bytes(tmp_path: Path) -> None:
    """``max_queue_bytes`` bounds the memory of what waits for a stalled writer, not only the
    count of operations: 64 KiB frames are refused ``store_busy`` once about 1 MiB waits,
    where the count bound alone (50,000 operations) let them pile up to gigabytes; when the
    writer commits again, every accepted frame is on disk and the bytes count back to 0."""
    bound = 1 << 20
    store = _store(tmp_path, max_queue_bytes=bound, linger_s=0.0)
    big = "x" * (64 << 10)
    async with trio.open_nursery() as nursery:
        async with _relay(nursery, store) as (_, ch, peer):
            assert store.usage()["queued_bytes"] == 0
            blocker = _write_lock(tmp_path)
            accepted = refused = 0
            for _ in range(100):
                try:
                    await ch.send(big, wait=False)
                    accepted += 1
                except mux.ChannelFull as exc:
                    assert exc.code == "store_busy"
                    refused += 1
                while peer.receive_nowait() is not None:  # bob keeps up: only the store lags
                    pass
                await trio.sleep(0.002)
            usage = store.usage()
            assert refused > 0 and 12 <= accepted <= 17, (accepted, refused)
            assert bound <= usage["queued_bytes"] < bound + (80 << 10) and usage["max_queue_bytes"] == bound
            blocker.execute("ROLLBACK")
            blocker.close()
            with trio.fail_after(10):
                await store.flushed(store.position)
            assert store.usage()["queued_bytes"] == 0
            await ch.send("after", wait=False)
            assert await store.channel_ends(ch.id) == ("alice", "bob")  # what exports check callers against
            assert await store.channel_ends("ch-unknown") is None
        nursery.cancel_scope.cancel()
    store.close()
    assert _rows(tmp_path) == 1 + accepted + 1 + 1  # open, the accepted frames, "after", the close


@pytest.mark.parametrize("stall", ["locked", "disk_full"])
async def test_a_store_that_cannot_commit_keeps_the_node_up_and_loses_nothing(tmp_path: Path, stall: str) -> None:
    """Commits that fail (another writer holds the lock past the busy timeout; the disk is
    full) do not stop the node: ``/status`` shows ``store_stalled``, the writer tries again,
    a durable send waits for its commit, live sends are refused ``store_busy`` once the
    queue is full; when writes succeed again everything accepted is committed, the durable
    send returns, and ``store_stalled`` is cleared."""
    store = _store(tmp_path, max_queue=16, linger_s=0.0, busy_timeout_s=0.02)
    db = store._db
    async with trio.open_nursery() as nursery:
        m = await start_mux(nursery, agent="n", key=NodeKey.generate(), config=MuxConfig(), store=store)
        async with m.attach("bob") as bob:
            live = await m.open("bob", "stream", agent="alice")
            durable = await m.open("bob", "chat", agent="alice")
            peers = {(p := await bob.accept()).id: p for _ in range(2)}
            with trio.fail_after(5):
                await store.flushed(store.position)
            if stall == "locked":
                blocker = sqlite3.connect(tmp_path / "mux.sqlite3", isolation_level=None)
                blocker.execute("BEGIN IMMEDIATE")
            else:
                pages = db.execute("PRAGMA page_count").fetchone()[0]
                db.execute(f"PRAGMA max_page_count = {pages}")  # no room to grow: SQLITE_FULL
            done = trio.Event()

            async def durable_send() -> None:
                await durable.send({"mail": 1})  # returns once committed
                done.set()

            accepted: list[int] = []
            refused = 0
            started = False
            for i in range(80):
                try:
                    await live.send(i, wait=False)
                    accepted.append(i)
                except mux.ChannelFull as exc:
                    assert exc.code == "store_busy"
                    refused += 1
                if store.stalled and not started:  # the first commit failed, the queue is not full
                    started = True
                    nursery.start_soon(durable_send)
                await trio.sleep(0.005)
            assert started and refused > 0 and accepted and not done.is_set()
            stalled = m.status()["store_stalled"]
            assert stalled and ("locked" in stalled if stall == "locked" else "full" in stalled), stalled
            assert store.failed is None and live.state == durable.state == "open"
            if stall == "locked":
                blocker.execute("ROLLBACK")
                blocker.close()
            else:
                db.execute("PRAGMA max_page_count = 1073741823")
            with trio.fail_after(10):
                await done.wait()
                await store.flushed(store.position)
            assert m.status()["store_stalled"] is None
            await live.send("after", wait=False)
            got = []
            while (frame := peers[live.id].receive_nowait()) is not None:
                got.append(frame.payload)
            assert got == [*accepted, "after"]
            assert (await peers[durable.id].receive()).payload == {"mail": 1}
            chain = await m.export(live.id)
            assert [f.payload for f in chain[1:]] == [*accepted, "after"]
            assert verify_chain(chain, m.public_key).frames == len(chain)
        nursery.cancel_scope.cancel()
    store.close()
    with sqlite3.connect(tmp_path / "mux.sqlite3") as check:
        assert (
            check.execute("SELECT count(*) FROM frames WHERE channel_id = ?", (live.id,)).fetchone()[0]
            == len(accepted) + 3
        )  # open, the accepted frames, "after", the close
        assert check.execute("SELECT count(*) FROM mailbox").fetchone()[0] == 1  # not acknowledged by bob
