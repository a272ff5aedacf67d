"""Bulk beside a call on the way down: probes, and the window they keep (``mux.downlink``).

The node keeps about one piece unsent in its socket, but what the socket sent may still
queue at a slow link's deep buffer ahead of the call's frames. A client that answers probes
(``?probes=1``, ``mux.client``'s default) lets the node keep the bulk in flight within a
delay-based window. Here: the window's rules alone; the outbox holding bulk back while the
call's frames go; the wire (``connected``, the answers, bad ones); and a real node whose
callee sits behind :class:`~tests.bench.downlink.SlowDownlink` (a 4 MB/s link that buffers up
to 2 MiB, as a mobile network does), with and without answering.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing

from mux.client import connect, open_ws
from mux.core import MuxConfig
from mux.downlink import PROBE_BYTES, PROBE_TIMEOUT_S, DownlinkProbes
from mux.errors import MuxError
from mux.outbox import CONTROL, CONTROL_URGENCY, NO_BULK, Outbox
from mux.wire import CHUNK_BYTES, pack_binary, unpack_binary
from tests.bench.downlink import SlowDownlink

from .nodes import serve_node
from .wsutil import recv, send, ws_url

PIECE = CHUNK_BYTES
TAIL = 5000
"""A send's last piece, shorter than the others."""


# ---- the window's rules ---------------------------------------------------------------------


def test_a_probe_follows_the_first_bulk_then_every_piece_and_a_full_window() -> None:
    p = DownlinkProbes()
    assert p.open
    first = p.wrote(1000, 0.0)
    assert first is not None and orjson.loads(first) == {"event": "probe", "n": 0}
    assert p.wrote(1000, 0.001) is None  # one outstanding, the window not full, not a piece yet
    third = p.wrote(PROBE_BYTES - 1000, 0.002)  # a piece's worth since the last probe
    assert third is not None and orjson.loads(third)["n"] == 1
    assert p.wrote(PIECE, 0.003) is not None  # the window (2 pieces to start) is now full
    assert not p.open and p.sent == 3


def test_the_write_that_takes_the_last_bulk_queued_brings_a_probe() -> None:
    """Else the bytes of a tail written behind an outstanding probe would stay in flight,
    with nothing to answer for them, until the next bulk came (``/status`` would show them)."""
    p = DownlinkProbes()
    assert p.wrote(PIECE, 0.0) is not None
    assert p.wrote(1000, 0.001) is None  # more bulk queued behind it: no probe yet
    last = p.wrote(500, 0.002, more=False)
    assert last is not None and orjson.loads(last)["n"] == 1
    assert p.answered(0, 0.003) is False and p.window.in_flight == 1500
    p.answered(1, 0.004)
    assert p.window.in_flight == 0 and p.answers == 2 and p.sent == 2


def test_an_answer_frees_what_it_and_earlier_probes_covered_and_reopens_the_window() -> None:
    p = DownlinkProbes()
    p.wrote(PIECE, 0.0)
    p.wrote(PIECE, 0.001)
    assert not p.open and p.window.in_flight == 2 * PIECE
    assert p.answered(1, 0.003)  # both covered: the window has room again
    assert p.window.in_flight == 0 and p.answers == 2 and p.open
    assert p.window.base_s == pytest.approx(0.002)  # the lowest time an answer took


def test_answers_not_awaited_change_nothing() -> None:
    p = DownlinkProbes()
    p.wrote(PIECE, 0.0)
    p.wrote(PIECE, 0.001)
    for stray in (7, -1, True, "0", None, 1.0):
        assert not p.awaits(stray)
    assert not p.answered(7, 0.002)  # never sent
    assert p.window.in_flight == 2 * PIECE and p.answers == 0
    assert p.answered(0, 0.002) and not p.answered(0, 0.003)  # the second time: late, ignored
    assert p.window.in_flight == PIECE and p.answers == 1


def test_queueing_shrinks_the_window_to_one_piece_and_an_empty_link_grows_it() -> None:
    p = DownlinkProbes()
    now = 0.0
    p.wrote(PIECE, now)
    p.answered(0, now + 0.004)  # the path's own: 4 ms
    for n in range(1, 60):  # every answer 40 ms late: a queue far past the 5 ms target
        p.wrote(PIECE, now)
        now += 0.004
        p.answered(n, now + 0.040)
    assert p.window.window == PIECE
    for n in range(60, 400):  # answers at the path's own time again
        p.wrote(PIECE, now)
        now += 0.004
        p.answered(n, now + 0.004)
    assert p.window.window > 8 * PIECE


def test_probes_unanswered_too_long_count_as_lost_and_let_bulk_go_again() -> None:
    p = DownlinkProbes()
    p.wrote(PIECE, 0.0)
    p.wrote(PIECE, 0.5)
    assert not p.open
    assert not p.expire(PROBE_TIMEOUT_S - 0.01)  # not yet
    assert p.expire(PROBE_TIMEOUT_S + 0.01)
    assert p.open and p.window.in_flight == 0 and p.lost == 2
    assert p.window.window == PIECE  # halved, never below one piece
    assert not p.answered(0, PROBE_TIMEOUT_S + 0.02)  # a late answer to a lost probe: ignored
    assert not p.expire(10.0)  # nothing outstanding


# ---- the outbox holding bulk back ----------------------------------------------------------------


def test_held_bulk_waits_while_the_call_replies_and_events_go() -> None:
    box = Outbox(per_key=100)
    box.set_bulk_from(1)  # the connection's call is at urgency 0
    box.put_nowait("bulk", 8, "b0", "b1")
    box.put_nowait("chat", 3, "c0")
    assert box.get_nowait() == "c0" and box.bulk_taken == 2  # chat is less urgent than the call: bulk too
    box.hold_bulk(True)
    box.put_nowait("voice", 0, "v0")
    box.put_nowait(CONTROL, CONTROL_URGENCY, "ack")
    assert [box.get_nowait(), box.get_nowait(), box.get_nowait()] == ["ack", "v0", None]
    assert box.queued == 2  # the bulk waits
    box.hold_bulk(False)
    assert [box.get_nowait(), box.get_nowait()] == ["b0", "b1"]
    assert box.bulk_taken == 6


def test_the_outbox_says_whether_bulk_is_queued() -> None:
    box = Outbox(per_key=100)
    box.put_nowait("bulk", 8, "b0")
    assert not box.bulk_queued  # no call: nothing counts as bulk
    box.set_bulk_from(1)
    assert box.bulk_queued
    box.put_nowait("voice", 0, "v0")
    assert box.get_nowait() == "v0" and box.bulk_queued
    assert box.get_nowait() == "b0" and not box.bulk_queued
    box.put_nowait("voice", 0, "v1")
    assert not box.bulk_queued  # only the call's frame is queued


async def test_letting_bulk_go_wakes_the_waiting_writer() -> None:
    box = Outbox(per_key=100)
    box.set_bulk_from(1)
    box.hold_bulk(True)
    got: list[Any] = []
    async with trio.open_nursery() as nursery:

        async def take() -> None:
            got.append(await box.get())

        nursery.start_soon(take)
        await trio.testing.wait_all_tasks_blocked()
        box.put_nowait("bulk", 8, "b0")
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # woken by the put, it found only held bulk and waits on
        box.hold_bulk(False)
    assert got == ["b0"]


def test_no_call_means_no_bulk_and_a_closing_writer_ends_the_holding_for_good() -> None:
    box = Outbox(per_key=100)
    box.set_bulk_from(1)
    box.hold_bulk(True)
    box.put_nowait("bulk", 8, "b0")
    box.set_bulk_from(NO_BULK)  # the call ended: the bulk goes
    assert not box.bulk_held and box.get_nowait() == "b0" and box.bulk_taken == 0
    box.set_bulk_from(1)
    box.hold_bulk(True)
    box.put_nowait("bulk", 8, "b1")
    box.end_bulk()  # the writer closes: its last marker (least urgent of all) must go out
    box.put_nowait("*close*", 1 << 20, "close")
    box.set_bulk_from(1)  # ignored from now on
    box.hold_bulk(True)
    assert [box.get_nowait(), box.get_nowait()] == ["b1", "close"]


# ---- the wire ------------------------------------------------------------------------------------


async def test_a_connection_that_asks_gets_probes_after_bulk_beside_its_call_and_nothing_else(
    nursery: trio.Nursery,
) -> None:
    info = await serve_node(nursery)
    base = info.url
    with trio.fail_after(20):
        async with (
            open_ws(ws_url(base, "bob") + "&probes=1") as bob,
            open_ws(ws_url(base, "plain")) as plain,
            open_ws(ws_url(base, "alice")) as alice,
        ):
            hello = await recv(bob)
            assert hello["event"] == "connected" and hello["probes"] is True
            assert "probes" not in await recv(plain)
            await recv(alice)
            # without a call, bulk comes with no probe
            await send(alice, action="open", target="bob", intent="stream", ref=1)
            stream = (await recv(alice))["channel_id"]
            assert (await recv(bob))["event"] == "channel_opened"
            await alice.send_message(pack_binary({"action": "send", "channel_id": stream}, b"x" * 1000))
            message = await bob.get_message()
            assert isinstance(message, bytes) and unpack_binary(message)[0]["channel_id"] == stream
            (session,) = [s for s in info.node.sessions if s.agent == "bob"]
            assert session.probing and session.probes is None  # made with the first call: idle, none
            await send(bob, action="probe", n=0, ref="early")  # no probe sent yet: ignored, no reply
            # with a call, bulk is followed by a probe, which bob answers
            await send(alice, action="open", target="bob", intent="call:voice", ref=2)
            call = (await recv_event(alice, "channel_opened"))["channel_id"]
            assert (await recv_event(bob, "channel_opened"))["channel_id"] == call
            await alice.send_message(pack_binary({"action": "send", "channel_id": stream}, b"y" * 1000))
            message = await bob.get_message()
            assert isinstance(message, bytes) and unpack_binary(message)[1] == b"y" * 1000
            probe = await recv(bob)
            assert probe == {"event": "probe", "n": 0} and session.probes is not None
            await send(bob, action="probe", n=0)
            # a call frame brings no probe: it is not bulk
            await alice.send_message(pack_binary({"action": "send", "channel_id": call}, b"v" * 200))
            message = await bob.get_message()
            assert isinstance(message, bytes) and unpack_binary(message)[0]["channel_id"] == call
            # answers: a stray one is ignored, a malformed one fails alone, and one on a
            # connection that did not ask fails with a clear error
            await send(bob, action="probe", n=99, ref="stray")
            await send(bob, action="probe", n="0", ref="bad")
            assert await recv(bob) == {"error": "bad_request", "detail": "probe: field 'n' must be int", "ref": "bad"}
            await send(plain, action="probe", n=0, ref="p")
            refused = await recv(plain)
            assert refused["error"] == "bad_request" and "?probes=1" in refused["detail"] and refused["ref"] == "p"
            await send(bob, action="ping", ref="still")
            assert (await recv(bob))["ref"] == "still"  # the stray answer had no reply
    async with httpx.AsyncClient(base_url=base + "/api/mux") as http:
        status = (await http.get("/status")).json()["probes"]
    assert status == {"connections": 0, "holding_bulk": 0, "in_flight_bytes": 0, "sent": 0, "answered": 0, "lost": 0}


async def test_status_counts_the_probed_connections(nursery: trio.Nursery) -> None:
    info = await serve_node(nursery)
    with trio.fail_after(20):
        async with (
            open_ws(ws_url(info.url, "bob") + "&probes=1") as bob,
            open_ws(ws_url(info.url, "alice")) as alice,
            httpx.AsyncClient(base_url=info.url + "/api/mux") as http,
        ):
            stream = await _call_and_stream(alice, bob)
            await alice.send_message(pack_binary({"action": "send", "channel_id": stream}, b"s" * (3 * PIECE + TAIL)))
            probes = []
            got = 0  # the payload's bytes bob has
            while len(probes) < 2:  # the window (2 pieces to start) fills: bulk is held back
                message = await bob.get_message()
                if isinstance(message, bytes):
                    got += len(unpack_binary(message)[1])
                elif orjson.loads(message).get("event") == "probe":
                    probes.append(orjson.loads(message)["n"])
            status = (await http.get("/status")).json()["probes"]
            assert status == {
                "connections": 1,
                "holding_bulk": 1,
                "in_flight_bytes": status["in_flight_bytes"],
                "sent": 2,
                "answered": 0,
                "lost": 0,
            }
            assert status["in_flight_bytes"] >= 2 * PIECE
            await send(bob, action="probe", n=probes[-1])
            await send(bob, action="ping", ref="p")
            later = []  # the rest of the bulk comes meanwhile: its probes, answered after the check
            while True:
                message = await bob.get_message()
                if isinstance(message, bytes):
                    got += len(unpack_binary(message)[1])
                elif orjson.loads(message).get("event") == "probe":
                    later.append(orjson.loads(message)["n"])
                elif orjson.loads(message).get("event") == "pong":
                    break
            status = (await http.get("/status")).json()["probes"]
            assert status["answered"] == 2 and status["holding_bulk"] == 0
            # the rest of the bulk, its tail last, every probe answered: nothing stays in flight
            while got < 3 * PIECE + TAIL:
                message = await bob.get_message()
                if isinstance(message, bytes):
                    got += len(unpack_binary(message)[1])
                elif orjson.loads(message).get("event") == "probe":
                    later.append(orjson.loads(message)["n"])
            assert got == 3 * PIECE + TAIL
            await trio.sleep(0.05)  # a probe written with the tail comes with it, or not at all
            await send(bob, action="ping", ref="q")
            while (event := orjson.loads(await bob.get_message())).get("event") != "pong":
                if event.get("event") == "probe":
                    later.append(event["n"])
            for n in later:
                await send(bob, action="probe", n=n)
            await send(bob, action="ping", ref="r")
            await recv_event(bob, "pong")
            status = (await http.get("/status")).json()["probes"]
            assert status["in_flight_bytes"] == 0 and status["sent"] == status["answered"]


async def recv_event(ws: Any, name: str) -> dict[str, Any]:
    """The next message that is event ``name`` (others, as an ack, are skipped)."""
    while True:
        message = await recv(ws)
        if message.get("event") == name:
            return message


async def test_the_node_settings_set_the_window(nursery: trio.Nursery) -> None:
    """``downlink_min_pieces`` 3 and ``downlink_target_ms`` 20: bob's window starts at three
    pieces, so three pieces go before the bulk is held back (two by default)."""
    info = await serve_node(nursery, mux=MuxConfig(downlink_min_pieces=3, downlink_target_ms=20))
    with trio.fail_after(20):
        async with open_ws(ws_url(info.url, "bob") + "&probes=1") as bob, open_ws(ws_url(info.url, "alice")) as alice:
            stream = await _call_and_stream(alice, bob)
            await alice.send_message(pack_binary({"action": "send", "channel_id": stream}, b"s" * (5 * PIECE)))
            (session,) = [s for s in info.node.sessions if s.agent == "bob"]
            pieces = 0
            while not session.outbox.bulk_held:  # until the window is full (bounded by the fail_after)
                message = await bob.get_message()
                pieces += isinstance(message, bytes)
            await trio.testing.wait_all_tasks_blocked()
            window = session.probes.window if session.probes is not None else None
            assert window is not None and window.min_pieces == 3 and window.target_s == pytest.approx(0.020)
            assert session.outbox.bulk_held and window.in_flight >= 3 * PIECE > window.in_flight - PIECE


async def _call_and_stream(alice: Any, bob: Any) -> str:
    """Both raw sockets greeted; alice opens a call and then a ``stream`` channel to bob;
    returns the stream's id."""
    await recv(bob)
    await recv(alice)
    await send(alice, action="open", target="bob", intent="call:voice")
    await recv(alice)
    await send(alice, action="open", target="bob", intent="stream")
    return str((await recv(alice))["channel_id"])


async def test_answers_the_node_asked_for_do_not_count_against_the_rate_limit(nursery: trio.Nursery) -> None:
    """Bob may send 4 messages at once (then 1 a second). Two 64 KiB frames come to him in
    8 pieces, each followed by a probe: his 8 answers cost nothing, an answer to a probe not
    awaited costs as any message does."""
    info = await serve_node(nursery, rate_messages_per_s=1.0, rate_burst=4)
    with trio.fail_after(20):
        async with open_ws(ws_url(info.url, "bob") + "&probes=1") as bob, open_ws(ws_url(info.url, "alice")) as alice:
            stream = await _call_and_stream(alice, bob)
            for payload in (b"a" * (4 * PIECE), b"b" * (4 * PIECE)):  # alice's 4 messages in all
                await alice.send_message(pack_binary({"action": "send", "channel_id": stream}, payload))
            pieces = answers = 0
            while pieces < 8:
                message = await bob.get_message()
                if isinstance(message, bytes):
                    pieces += unpack_binary(message)[0]["event"] == "frame_part"
                    continue
                event = orjson.loads(message)
                assert "error" not in event, event
                if event.get("event") == "probe":
                    await send(bob, action="probe", n=event["n"])
                    answers += 1
            assert answers > 4  # more than bob's burst
            await send(bob, action="ping", ref="after")
            reply = await recv_event(bob, "pong")  # not rate_limited: the answers cost nothing
            assert reply["ref"] == "after"
            for _ in range(4):  # answers to a probe never sent count as messages
                await send(bob, action="probe", n=10_000)
            refused = await recv(bob)
            assert refused["error"] == "rate_limited"


# ---- a real node, the callee behind a slow, deep downlink ---------------------------------------------

DOWNLINK_RATE = 4_000_000
DOWNLINK_DEPTH = 2 << 20
DOWNLOAD = 64 << 10
CALL_FRAMES = 60
DEEPEST_WITH_PROBES = 256 << 10
"""The most the link's buffer may hold while the callee answers probes: the window keeps
what is in flight near 5 ms of queueing (about 20 KiB here, 64 KiB at most measured), and it
can never grow past 1 MiB; without answers it fills to the link's 2 MiB."""


@pytest.mark.parametrize(
    ("probes", "batch"),
    [(True, False), (True, True), (False, False)],
    ids=["answered", "answered-batching", "unanswered"],
)
async def test_bulk_beside_a_call_stays_off_a_deep_downlink_when_the_client_answers_probes(
    nursery: trio.Nursery, probes: bool, batch: bool
) -> None:
    info = await serve_node(nursery)
    link = SlowDownlink(int(info.url.rsplit(":", 1)[1]), DOWNLINK_RATE, DOWNLINK_DEPTH)
    await nursery.start(link.run)
    received: list[int] = []
    sent: list[int] = []
    voice: list[bytes] = []
    with trio.fail_after(60):
        async with (
            connect(info.url, "carol") as carol,
            connect(f"http://127.0.0.1:{link.listen_port}", "bob", probes=probes, batch=batch) as bob,
            connect(info.url, "alice") as alice,
        ):
            assert bob.probes is probes
            call = await carol.open("bob", "call:voice")
            answering = await bob.accept()
            bulk = await alice.open("bob", "stream")
            taking = await bob.accept()
            done = trio.Event()

            async def download() -> None:
                for n in range(10_000):  # until the call is over (bounded)
                    if done.is_set():
                        return
                    while True:
                        try:
                            await bulk.send(struct.pack(">I", n) + os.urandom(DOWNLOAD - 4))
                            break
                        except MuxError as exc:  # bob's queue in the node is full: wait
                            assert exc.code == "receiver_full", exc
                            await trio.sleep(0.005)
                    sent.append(n)

            async def drain() -> None:
                async for frame in taking:
                    assert len(frame["payload"]) == DOWNLOAD
                    received.append(struct.unpack_from(">I", frame["payload"])[0])

            async def listen() -> None:
                while len(voice) < CALL_FRAMES:
                    voice.append((await answering.receive())["payload"])

            async with trio.open_nursery() as inner:
                inner.start_soon(download)
                inner.start_soon(drain)
                inner.start_soon(listen)
                await trio.sleep(0.3)
                link.peak = link.held  # from here on, with the downloads under way
                for i in range(CALL_FRAMES):
                    await call.send(i.to_bytes(2, "big") + bytes(198))
                    await trio.sleep(0.02)
                deepest = link.peak
                (session,) = [s for s in info.node.sessions if s.agent == "bob"]
                probed = session.probes
                done.set()
                with trio.fail_after(30):
                    while len(voice) < CALL_FRAMES or len(received) < len(sent):  # noqa: ASYNC110  (bounded)
                        await trio.sleep(0.05)
                inner.cancel_scope.cancel()
    print(
        f"probes {'answered' if probes else 'unanswered'}: {len(sent)} downloads, link held at most {deepest >> 10} KiB"
    )
    assert [int.from_bytes(v[:2], "big") for v in voice] == list(range(CALL_FRAMES))
    assert received == sent  # every download, whole, once and in order
    if probes:
        assert deepest <= DEEPEST_WITH_PROBES
        assert probed is not None and probed.sent > 20 and probed.lost == 0  # each answered in time
    else:
        assert probed is None
        assert deepest >= DOWNLINK_DEPTH // 2  # the queue the probes keep away


async def test_a_client_that_stops_answering_still_gets_its_bulk(nursery: trio.Nursery) -> None:
    """Probes it never answers count as lost after ``PROBE_TIMEOUT_S``: the window halves,
    what they covered is forgotten, and the bulk held back goes on."""
    info = await serve_node(nursery)
    with trio.fail_after(30):
        async with open_ws(ws_url(info.url, "bob") + "&probes=1") as bob, connect(info.url, "alice") as alice:
            await recv(bob)
            await alice.open("bob", "call:voice")
            bulk = await alice.open("bob", "stream")
            frames = 6  # 96 KiB: three times the window bob starts with
            for i in range(frames):
                await bulk.send(bytes([i]) * PIECE)
            got: list[int] = []
            probes = 0
            began = trio.current_time()
            while len(got) < frames:
                message = await bob.get_message()
                if isinstance(message, bytes):
                    header, payload = unpack_binary(message)
                    if header["channel_id"] == bulk.id:
                        got.append(payload[0])
                elif orjson.loads(message).get("event") == "probe":
                    probes += 1  # never answered
            waited = trio.current_time() - began
    assert got == list(range(frames))
    assert probes >= 2 and waited >= PROBE_TIMEOUT_S  # held back until the probes were lost
