"""Token bucket and the throttling of both kinds of channel."""

from __future__ import annotations

import collections
import gc
from collections.abc import Callable
from typing import Any

import orjson
import trio
import trio.testing

import mux
from mux.bandwidth import GAP_CLOSES, GAP_OPENS, BulkShare, Cadence, TokenBucket

from .nodes import outbox_events, started_sessions


def test_bucket_refills_at_rate_up_to_burst() -> None:
    b = TokenBucket(rate=1000, burst=500)
    assert b.take(500, now=0.0)
    assert not b.take(1, now=0.0)
    assert not b.take(200, now=0.1)  # 100 bytes refilled
    assert b.take(200, now=0.2)  # 200 refilled by now
    assert b.take(500, now=100.0)  # never more than burst banked
    assert not b.take(1, now=100.0)


def test_unlimited_rate_and_oversize_frame() -> None:
    assert all(TokenBucket(rate=0, burst=0).take(10**9, now=0.0) for _ in range(3))
    b = TokenBucket(rate=10, burst=100)
    assert b.take(1000, now=0.0)  # a full bucket lets one big frame through...
    assert not b.take(1, now=1.0)  # ...and the debt holds back the next ones


async def test_preemptible_over_budget_is_refused(node: mux.Mux) -> None:
    async with node.attach("b") as b:
        ch = await node.open("b", "task", agent="a")  # burst 50000, preemptible
        blob = "x" * 30000
        await ch.send(blob)
        try:
            await ch.send(blob)
        except mux.ChannelThrottled as exc:
            assert exc.code == "throttled" and exc.channel_id == ch.id
        else:
            raise AssertionError("second frame should have been throttled")
        assert ch.state == "open" and ch.info()["throttled"] == 1
        # the refused frame never entered the chain
        assert [f.seq for f in await node.export(ch.id)] == [0, 1]
        got = await (await b.accept()).receive()
        assert got.seq == 1


async def test_non_preemptible_over_budget_passes_and_is_counted(node: mux.Mux) -> None:
    ch = await node.open("b", "call:voice", agent="a")  # burst 32000, not preemptible
    for _ in range(5):
        await ch.send(b"\x00" * 16000)
    info = ch.info()
    assert info["frames"] == 5 and info["throttled"] == 3
    assert node.status()["throttled"] == 3


async def test_budget_refills_with_time(node: mux.Mux, autojump_clock: trio.testing.MockClock) -> None:
    task = await node.open("b", "task", agent="a")  # 100000 B/s, burst 50000
    await task.send("y" * 50000)
    assert task.info()["throttled"] == 0
    await trio.sleep(0.5)  # 100000 B/s * 0.5 s = 50000 refilled
    await task.send("y" * 40000)
    assert task.info()["throttled"] == 0
    try:
        await task.send("y" * 40000)
    except mux.ChannelThrottled:
        pass
    else:
        raise AssertionError("no time passed: the third frame must be throttled")


def test_wait_ms_is_when_the_next_frame_fits() -> None:
    """``wait_ms``: 0 while a frame of that size fits, else the refill time (a frame over the
    burst waits for a full bucket, as ``take`` lets it through then)."""
    b = TokenBucket(1000, 500)
    assert b.wait_ms(400) == 0
    assert b.take(400, 0.0)
    assert b.wait_ms(400) == 300  # 100 left, 300 bytes short at 1000 B/s
    assert b.wait_ms(10_000) == 400  # over the burst: until the bucket is full
    assert TokenBucket(0, 0).wait_ms(1 << 20) == 0  # unlimited


def _sent(share: BulkShare, key: str, nbytes: int, now: float) -> bool:
    """One bulk frame through ``share`` as the node shapes it: when it passes, its channel's
    next slot is promised (``pace_ms``)."""
    arrival = share.arrive(key, nbytes, now)
    ok = share.take(key, nbytes, now, kept=arrival.kept)
    if ok:
        share.promise(key, arrival.reckon, arrival.reckon, now + share.wait_ms(arrival.reckon, now) / 1000)
    return ok


def test_a_late_frames_room_is_held_from_the_other_channels() -> None:
    share = BulkShare(TokenBucket(rate=1_000_000, burst=20_000))  # 1 kB a ms
    assert _sent(share, "a", 16_000, 0.0)  # 4 kB left: a's next slot is at 12 ms
    # 2 ms after a's slot its frame has not come: the room stays a's, b is told to wait ...
    assert share.wait_ms(16_000, 0.014) == 14
    assert not share.take("b", 16_000, 0.014, kept=False)  # ... and b's first frame is refused
    assert share.take("a", 16_000, 0.015, kept=share.arrive("a", 16_000, 0.015).kept)  # a's comes
    # a promise whose frame does not come holds its room no longer than the hold: 5 ms, or
    # twice the connection's recent lateness (a's frame came 3 ms late)
    share.promise("a", 16_000, 16_000, 0.040)
    assert share.wait_ms(16_000, 0.044) == 12
    assert share.wait_ms(16_000, 0.047) == 0
    assert share.take("b", 16_000, 0.047, kept=False)


def test_the_hold_follows_the_connections_lateness() -> None:
    share = BulkShare(TokenBucket(rate=1_000_000, burst=20_000))
    share.promise("a", 16_000, 16_000, 0.0)
    share.take("a", 16_000, 0.050, kept=share.arrive("a", 16_000, 0.050).kept)  # 50 ms late
    share.promise("a", 16_000, 16_000, 1.0)
    assert share.wait_ms(16_000, 1.090) == 12  # held for twice that: 100 ms
    assert share.wait_ms(16_000, 1.110) == 0


def test_a_frame_that_keeps_its_promise_passes_into_debt() -> None:
    share = BulkShare(TokenBucket(rate=1_000_000, burst=20_000))
    share.promise("a", 16_000, 16_000, 0.0)
    share.promise("b", 16_000, 16_000, 0.001)
    assert share.take("b", 16_000, 0.002, kept=share.arrive("b", 16_000, 0.002).kept)
    arrival = share.arrive("a", 16_000, 0.003)  # later than b, both late: the bucket has 5 kB
    assert arrival.kept and share.take("a", 16_000, 0.003, kept=True)
    assert share.wait_ms(16_000, 0.003) == 27  # the 11 kB of debt first, then 16 kB
    early = share.arrive("a", 100, 0.003)  # no promise now: a frame that keeps none
    assert not early.kept and not share.take("a", 100, 0.003, kept=False)
    larger = BulkShare(TokenBucket(rate=1_000_000, burst=20_000))
    larger.promise("a", 100, 100, 0.0)  # a file's chunk after a header's room: not kept
    assert not larger.arrive("a", 16_000, 0.001).kept


def test_cadence_learns_a_calls_period_and_finds_the_gap_after_its_frames() -> None:
    cadence = Cadence()
    assert cadence.next_gap(5.0) == 5.0  # no call frame yet: no gap to aim for
    for i in range(4):
        cadence.frame(1.0 + 0.02 * i)  # a frame every 20 ms; the last at 1.06
    assert cadence.period is not None and abs(cadence.period - 0.02) < 1e-9
    opens, closes = 1.06 + GAP_OPENS * 0.02, 1.06 + GAP_CLOSES * 0.02
    assert cadence.next_gap(1.065) == 1.065  # inside the gap: at once
    assert abs(cadence.next_gap(1.061) - opens) < 1e-9  # too close behind the frame: wait for the gap
    assert abs(cadence.next_gap(closes + 0.001) - (1.08 + GAP_OPENS * 0.02)) < 1e-9  # too late: the next gap
    assert abs(cadence.next_gap(1.205) - 1.205) < 1e-9  # frames predicted ahead: 1.20, then gap from 1.203
    cadence.frame(1.0605)  # a burst (0.5 ms apart) does not change the period
    assert cadence.period is not None and abs(cadence.period - 0.02) < 1e-9
    cadence.frame(3.0)  # after a pause of more than a second: a new call, period unknown
    assert cadence.period is None and cadence.next_gap(3.001) == 3.001


SHAPED = {"session": {"rate": 1000, "burst": 1000}}
"""Intent policies for the refusal tests: ``session`` has a small budget of its own."""


def bulk_beside_a_call(node: mux.Mux, nursery: trio.Nursery) -> Callable[[str, object], dict[str, Any]]:
    """alice's ``session``, ``stream`` and ``call:voice`` channels to bob on ``node``; a
    function that sends a payload on one (by intent) and returns the reply."""
    alice, _bob = started_sessions(node, nursery, "alice", "bob")
    channels = {}
    for intent in ("session", "stream", "call:voice"):
        (opened,) = outbox_events(
            alice.handle(orjson.dumps({"action": "open", "target": "bob", "intent": intent}).decode())
        )
        channels[intent] = opened["channel_id"]

    def send(intent: str, payload: object) -> dict[str, Any]:
        if intent == "raw":  # a message over the connection's limit
            (reply,) = outbox_events(alice.handle(b"\0" * ((1 << 20) + 1)))
        else:
            message = {"action": "send", "channel_id": channels[intent], "payload": payload}
            (reply,) = outbox_events(alice.handle(orjson.dumps(message).decode()))
        return reply

    return send


async def test_the_node_counts_every_refusal_its_channels_count(nursery: trio.Nursery) -> None:
    """``/status`` ``throttled`` is the sum of the channels' own counts: frames refused over
    their intent's budget and frames refused beside a call (the connection's bulk share)."""
    async with mux.open_mux(agent="node", intent_policies=SHAPED) as node:
        send = bulk_beside_a_call(node, nursery)
        assert send("call:voice", "v" * 200)["event"] == "frame_ack"  # a call: bulk is shaped
        refused = collections.Counter(
            send(intent, {"x": "y" * 16000}).get("error") for intent in ("session", "stream") * 5
        )
        counts = {state.intent.name: state.throttled for state in node._channels.values()}
        assert counts["session"] > 0 and counts["stream"] > 0 and counts["call:voice"] == 0
        assert node.status()["throttled"] == refused["throttled"] == sum(counts.values())


async def test_refused_sends_leave_no_garbage_cycles(nursery: trio.Nursery) -> None:
    """A refusal (``throttled``: over its intent's budget, or beside a call; an oversized
    message) is freed as soon as it is answered, payload and all: it never ties itself, its
    traceback and the frames that raised it into a cycle left for the garbage collector
    (measured in the voice bench before: about 13 cyclic objects per refusal, each holding
    the refused message, and gen-0 pauses of 0.5 to 1.4 ms under a flood)."""
    async with mux.open_mux(agent="node", intent_policies=SHAPED) as node:
        send = bulk_beside_a_call(node, nursery)
        blob = {"x": "y" * 900}
        assert send("session", blob)["event"] == "frame_ack"  # the intent's burst
        assert send("call:voice", "v" * 200)["event"] == "frame_ack"  # a call: bulk is shaped
        gc.collect()
        gc.disable()
        try:
            refused = collections.Counter()
            for _ in range(50):
                refused[send("session", blob).get("error")] += 1
                for _ in range(4):
                    refused[send("stream", {"x": "y" * 16000}).get("error")] += 1
                refused[send("raw", None).get("error")] += 1
            cyclic = gc.collect()
        finally:
            gc.enable()
        assert refused["throttled"] >= 150 and refused["message_too_large"] == 50, refused
        assert cyclic == 0, f"{cyclic} objects in cycles after {sum(refused.values())} refusals"
