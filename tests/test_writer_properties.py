"""What a connection's writer puts in one write (``mux.writer.Writer``), checked on random
queues (hypothesis): the messages the scheduler gives next, in its order, while together
they stay within one piece's size beside a call (so a call's frame waits for at most that
much on the wire) or the bulk size without one, at most ``WRITE_MESSAGES``; the message that
would not fit stays first in line. For a batching client, the JSON ready next goes as one
flat ``batch`` (a ``batch`` reply's items spliced in), and a binary message keeps its own
write, still first in line."""

from __future__ import annotations

from typing import Any

import orjson
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mux.outbox import CONTROL, CONTROL_URGENCY, Outbox
from mux.wire import batch_event
from mux.writer import BULK_WRITE_BYTES, WRITE_BYTES, WRITE_MESSAGES, Writer

KEYS = {CONTROL: CONTROL_URGENCY, "voice": 0, "a": 4, "b": 4, "bulk": 8}


def _json(n: int, pad: int) -> str:
    return orjson.dumps({"event": "frame", "n": n, "p": "x" * pad}).decode()


def _binary(n: int, size: int) -> bytes:
    return n.to_bytes(4, "big") + bytes(size)


messages = st.lists(
    st.tuples(
        st.sampled_from(sorted(KEYS)),
        st.sampled_from(("json", "json", "binary", "batch")),
        st.integers(0, 20_000),
    ),
    min_size=1,
    max_size=80,
)
"""Queued messages: key, kind (a ``batch`` reply of 1-3 JSON items for the control key), size."""


def _fill(box: Outbox, plan: list[tuple[str, str, int]]) -> None:
    for n, (key, kind, size) in enumerate(plan):
        if kind == "binary":
            message: str | bytes = _binary(n, size)
        elif kind == "batch":
            message = batch_event([_json(n * 10 + i, size // 3) for i in range(1 + size % 3)])
        else:
            message = _json(n, size)
        box.put_nowait(key, KEYS[key], message)


@settings(max_examples=200, deadline=None)
@given(plan=messages, call=st.booleans(), batching=st.booleans())
@example(plan=[(CONTROL, "json", 0), (CONTROL, "binary", 0), (CONTROL, "json", 0)], call=False, batching=True)
@example(plan=[("a", "binary", 8188), ("a", "binary", 8189)], call=True, batching=False)  # one byte over
@example(plan=[("a", "binary", 8188), ("a", "binary", 8188)], call=True, batching=False)  # exactly the bound
@example(plan=[("b", "binary", 0)] * 70, call=True, batching=False)  # more than WRITE_MESSAGES fit
def test_one_write_takes_the_next_messages_within_its_bound(
    plan: list[tuple[str, str, int]], call: bool, batching: bool
) -> None:
    async def check() -> None:
        box, order = Outbox(per_key=1000, control=1000), Outbox(per_key=1000, control=1000)
        _fill(box, plan)
        _fill(order, plan)  # the same queue, drained message by message: the scheduler's order
        expected: list[str | bytes] = []
        while (m := order.get_nowait()) is not None:
            expected.append(m)
        writer = Writer(None, box, 1.0, trio.CancelScope(), "x", batching, lambda: call)  # type: ignore[arg-type]
        written: list[str | bytes] = []
        while True:
            queued = box.queued
            first = box.get_nowait()
            if first is None:
                break
            write = writer._one_write(first)
            took = expected[len(written) : len(written) + queued - box.queued]  # what left the queue
            assert took and took[0] == first
            after = expected[len(written) + len(took)] if len(written) + len(took) < len(expected) else None
            if batching and isinstance(first, str):
                assert len(write) == 1 and isinstance(write[0], str)
                assert all(isinstance(t, str) for t in took)
                assert _items(write[0]) == [i for t in took for i in _items(str(t))], "one flat batch, in order"
                size = sum(len(t) for t in took)
                # it stops at a binary message, at 64 KiB or 128 messages, or when none is left
                assert after is None or isinstance(after, bytes) or size >= 65536 or len(took) >= 128
                assert len(took) <= 128 and size - len(took[-1]) < 65536
            else:
                assert write == took
                most = WRITE_BYTES if call else BULK_WRITE_BYTES
                size = sum(len(m) for m in write)
                assert len(write) <= 1 + WRITE_MESSAGES
                assert len(write) == 1 or size <= most, "one write stays within its bound"
                if after is not None and len(write) <= WRITE_MESSAGES:
                    assert size + len(after) > most, "a message that fits is not left behind"
            written.extend(took)
        assert written == expected, "every message once, in the scheduler's order"

    trio.run(check)


def _items(batch_or_one: str) -> list[Any]:
    msg = orjson.loads(batch_or_one)
    return list(msg["items"]) if msg.get("event") == "batch" else [msg]
