"""The outbox's scheduling rules, checked on random sequences of puts and takes (hypothesis):
nothing lost, duplicated or reordered within a key; always the most urgent key; strict turns
among keys of one urgency; ``limit`` leaves the chosen message queued; ``has_room`` holds each
queue to its bound; ``on_take`` for every channel message; nothing kept once drained. And with
producers waiting for room and a writer that retires when idle: nothing lost."""

from __future__ import annotations

import collections

import trio
import trio.testing
from hypothesis import event, given, settings
from hypothesis import strategies as st

from mux.outbox import CONTROL, CONTROL_URGENCY, Outbox

KEYS = (CONTROL, "voice", "a", "b", "c", "bulk1", "bulk2")
URGENCY = {CONTROL: CONTROL_URGENCY, "voice": 0, "a": 4, "b": 4, "c": 4, "bulk1": 8, "bulk2": 8}
PER_KEY, CONTROL_LIMIT = 6, 9

puts = st.tuples(st.just("put"), st.sampled_from(KEYS), st.integers(1, 8))
takes = st.tuples(st.just("take"), st.sampled_from((None, None, 8, 12)), st.just(0))
"""A take, with no limit or one that only some messages fit (``a:000001`` is 8 long, ``voice:000001`` 12)."""
operations = st.lists(st.one_of(puts, takes), max_size=120)


@settings(max_examples=300, deadline=None)
@given(ops=operations)
def test_random_puts_and_takes_keep_every_scheduling_rule(ops: list[tuple[str, object, int]]) -> None:
    taken_keys: list[str] = []
    box = Outbox(per_key=PER_KEY, control=CONTROL_LIMIT, on_take=taken_keys.append)
    waiting: dict[str, collections.deque[str]] = {k: collections.deque() for k in KEYS}
    # A key's deadline: the number of takes at its urgency by which it must have had its turn
    # (set when it starts waiting and after each turn: one take per key ahead of it in line).
    turns_left: dict[str, int] = {}
    numbered = 0
    put: list[str] = []
    got: list[str] = []

    def others_waiting(key: str) -> list[str]:
        return [k for k in KEYS if k != key and URGENCY[k] == URGENCY[key] and waiting[k]]

    for op, arg, count in ops:
        if op == "put":
            key = str(arg)
            bound = CONTROL_LIMIT if key == CONTROL else PER_KEY
            fits = len(waiting[key]) + count <= bound or not waiting[key]  # an empty queue takes any put
            assert box.has_room(key, count) == fits
            if not fits:  # as callers do: a full queue takes nothing (the sender is told, or waits)
                continue
            messages = []
            for _ in range(count):
                numbered += 1
                messages.append(f"{key}:{numbered:06d}")
            if not waiting[key]:
                turns_left[key] = len(others_waiting(key)) + 1
            box.put_nowait(key, URGENCY[key], *messages)
            waiting[key].extend(messages)
            put.extend(messages)
            continue
        limit = None if arg is None else int(str(arg))
        before = len(taken_keys)
        message = box.get_nowait(limit)
        ready = [k for k in KEYS if waiting[k]]
        if message is None:
            if ready:  # only a limit leaves a message queued: the one whose turn it is is longer
                assert limit is not None
                most = min(URGENCY[k] for k in ready)
                assert all(len(waiting[k][0]) > limit for k in ready if URGENCY[k] == most)
            assert len(taken_keys) == before
            continue
        assert isinstance(message, str) and (limit is None or len(message) <= limit)
        key = message.split(":", 1)[0]
        assert waiting[key] and waiting[key][0] == message, "each key's messages leave in order, once"
        assert URGENCY[key] == min(URGENCY[k] for k in ready), "always the most urgent key with a message"
        for other in others_waiting(key):
            turns_left[other] -= 1
            assert turns_left[other] >= 1, f"{other} waited past its turn behind {key}"
        waiting[key].popleft()
        got.append(message)
        if waiting[key]:  # to the back of its urgency's line
            turns_left[key] = len(others_waiting(key)) + 1
        assert taken_keys[before:] == ([] if key == CONTROL else [key])
    left = sum(len(q) for q in waiting.values())
    assert box.queued == left and box.empty == (left == 0)
    while (rest := box.get_nowait()) is not None:
        assert isinstance(rest, str)
        assert waiting[rest.split(":", 1)[0]].popleft() == rest
        got.append(rest)
    assert collections.Counter(got) == collections.Counter(put), "every message leaves exactly once"
    assert box._queues == {} and box._rings == {}, "nothing is kept once drained"


@settings(max_examples=150, deadline=None)
@given(
    loads=st.lists(st.lists(st.integers(0, 15), min_size=1, max_size=12), min_size=1, max_size=4),
    writer_ms=st.lists(st.integers(0, 10), min_size=1, max_size=20),
    retire_ms=st.lists(st.integers(1, 20), min_size=1, max_size=20),
    per_key=st.integers(1, 4),
)
def test_producers_a_writer_that_retires_and_restarts_lose_nothing(
    loads: list[list[int]], writer_ms: list[int], retire_ms: list[int], per_key: int
) -> None:
    """Producers ``put`` (waiting for room) on keys with a small bound while the writer takes
    messages at its own pace and is asked to retire whenever it waits (as the node's
    watchdog does); whatever is put after it retired starts it again. Every message arrives,
    each key's in order, and never two writer tasks at once."""
    got: list[str] = []
    running = 0
    starts = 0

    async def scenario() -> None:
        nonlocal running
        box = Outbox(per_key=per_key, control=per_key)
        all_in = trio.Event()
        async with trio.open_nursery() as nursery:

            async def writer() -> None:
                nonlocal running, starts
                running += 1
                starts += 1
                assert running == 1, "two writer tasks at once"
                try:
                    i = 0
                    while (message := await box.get()) is not None:
                        got.append(str(message))
                        if len(got) == sum(map(len, loads)):
                            all_in.set()
                        await trio.sleep(writer_ms[i % len(writer_ms)] / 1000)
                        i += 1
                finally:
                    running -= 1

            box.start_writer = lambda: nursery.start_soon(writer)
            nursery.start_soon(writer)

            async def producer(k: int, gaps: list[int]) -> None:
                for n, gap in enumerate(gaps):
                    await trio.sleep(gap / 1000)
                    await box.put(KEYS[k + 1], URGENCY[KEYS[k + 1]], f"{KEYS[k + 1]}:{n:06d}")

            async def retirer() -> None:
                for i in range(1000):
                    await trio.sleep(retire_ms[i % len(retire_ms)] / 1000)
                    box.retire()

            nursery.start_soon(retirer)
            with trio.fail_after(60):  # virtual seconds: a message (or a producer) left behind fails here
                async with trio.open_nursery() as producers:
                    for k, gaps in enumerate(loads):
                        producers.start_soon(producer, k, gaps)
                await all_in.wait()
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    event("writer started again", starts > 1)
    for k, gaps in enumerate(loads):
        key = KEYS[k + 1]
        assert [m for m in got if m.startswith(key + ":")] == [f"{key}:{n:06d}" for n in range(len(gaps))]
