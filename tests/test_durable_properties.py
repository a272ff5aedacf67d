"""Nothing acknowledged is lost (DESIGN.md, docs/security.md): a durable send's ``frame_ack``
goes out only once its frame is committed to the SQLite store, which its writer thread fills
in batches. Checked on random traffic (hypothesis) through a real session on a real store:
at the moment each ack reaches the connection's outbox, another SQLite connection to the
file already finds the frame and the target's mailbox entry, and acks leave in send order."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import orjson
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import mux

from .nodes import started_sessions

plans = st.lists(st.tuples(st.integers(1, 6), st.integers(0, 30)), min_size=1, max_size=12)
"""Rounds: this many sends at once, then a pause of this many milliseconds."""


@settings(max_examples=15, deadline=None)
@given(plan=plans)
def test_a_durable_ack_leaves_only_after_its_frame_is_committed(plan: list[tuple[int, int]]) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        trio.run(_scenario, Path(data_dir), plan)


async def _scenario(data_dir: Path, plan: list[tuple[int, int]]) -> None:
    async with mux.open_mux(agent="node", data_dir=data_dir) as node, trio.open_nursery() as nursery:
        (sender,) = started_sessions(node, nursery, "alice")
        (opened,) = sender.handle('{"action":"open","target":"bob","intent":"chat"}')  # bob is offline
        cid = orjson.loads(opened)["channel_id"]
        db = sqlite3.connect(data_dir / "mux.sqlite3")
        acked: list[int] = []
        all_acked = trio.Event()
        n = 0

        def committed(seq: int) -> bool:
            found = db.execute(
                "SELECT (SELECT count(*) FROM frames WHERE channel_id = ? AND seq = ?),"
                " (SELECT count(*) FROM mailbox WHERE agent = 'bob' AND channel_id = ? AND seq = ?)",
                (cid, seq, cid, seq),
            ).fetchone()
            return bool(found == (1, 1))

        async def watch_acks() -> None:
            while True:
                message = await sender.outbox.get()
                ack: dict[str, Any] = orjson.loads(message) if message is not None else {}
                if ack.get("event") == "frame_ack":
                    assert ack["stored"] and committed(ack["seq"]), f"seq {ack['seq']} acked before its commit"
                    acked.append(ack["ref"])
                    if len(acked) == sum(sends for sends, _ in plan):
                        all_acked.set()

        nursery.start_soon(watch_acks)
        for sends, pause_ms in plan:
            for _ in range(sends):
                n += 1
                message = {"action": "send", "channel_id": cid, "ref": n, "payload": {"n": n}}
                assert sender.handle(orjson.dumps(message).decode()) == []  # the ack comes after the commit
            await trio.sleep(pause_ms / 1000)
        with trio.fail_after(10):
            await all_acked.wait()
        assert acked == list(range(1, n + 1)), "acks in send order"
        db.close()
        nursery.cancel_scope.cancel()
