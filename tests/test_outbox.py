"""Scheduling on one connection: urgency first, turns among equals, bounded queues,
large frames in pieces, batching both ways."""

from __future__ import annotations

import base64
import collections
import os
import sys
from collections.abc import Sequence
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing

import mux
from mux.client import connect, open_ws
from mux.outbox import CONTROL, CONTROL_URGENCY, Outbox, WriteThrough
from mux.server import ServeInfo
from mux.session import WireSession
from mux.wire import frame_messages, pack_binary, unpack_binary

from .wsutil import recv, send, ws_url


def test_most_urgent_first_and_turns_among_equals() -> None:
    box = Outbox(per_key=100)
    for i in range(5):
        box.put_nowait("bulk", 8, f"bulk{i}")
    box.put_nowait("b", 4, "b0", "b1", "b2")
    box.put_nowait("c", 4, "c0", "c1")
    box.put_nowait("voice", 0, "v0")
    box.put_nowait(CONTROL, CONTROL_URGENCY, "ack")
    order = []
    while (m := box.get_nowait()) is not None:
        order.append(m)
    assert order == ["ack", "v0", "b0", "c0", "b1", "c1", "b2", "bulk0", "bulk1", "bulk2", "bulk3", "bulk4"]
    assert box.empty
    # Drained, the outbox keeps no queue and no ring (an idle connection holds none, and a
    # burst of channels leaves none behind).
    assert box._queues == {}
    assert box._rings == {}


def test_an_emptied_outbox_keeps_no_grown_tables() -> None:
    """Once everything queued has been taken, the outbox's maps of queues and urgencies are
    as small as an empty dict again, the same objects. A dict keeps the table it grew to, and
    adding and removing keys makes it take a new one every few keys: the table a busy
    connection took last would outlive a burst of channels, among the burst's own memory,
    and keep those pages from going back (docs/performance.md, "Memory")."""
    box = Outbox(per_key=100)
    queues, rings = box._queues, box._rings
    empty = sys.getsizeof({})
    for turn in range(3):
        for i in range(40):
            box.put_nowait(f"ch-{turn}-{i}", i % 9, "m")
        assert sys.getsizeof(queues) > empty and sys.getsizeof(rings) > empty
        while box.get_nowait() is not None:
            pass
        assert box._queues is queues and box._rings is rings
        assert (len(queues), sys.getsizeof(queues), len(rings), sys.getsizeof(rings)) == (0, empty, 0, empty)
    box.put_nowait("ch-again", 4, "a", "b")  # and it works as before
    assert [box.get_nowait(), box.get_nowait(), box.get_nowait()] == ["a", "b", None]


async def test_a_held_turn_writes_through_at_its_end_or_wakes_the_writer() -> None:
    """While a ``WriteThrough`` holds, putting into an outbox whose writer waits only notes
    it (once); ``flush`` has it ``write_now``. A ``write_now`` that cannot (False) or fails
    wakes its writer, which then gets what was queued; the other outboxes still write."""
    through = WriteThrough()
    written: dict[str, list[Any]] = {"a": [], "b": [], "c": []}
    can = {"a": True, "b": False, "c": True}

    def writer_of(name: str, box: Outbox) -> Any:
        def write_now() -> bool:
            if name == "c":
                raise RuntimeError("planted")
            if not can[name]:
                return False
            while (m := box.get_nowait()) is not None:
                written[name].append(m)
            return True

        return write_now

    boxes = {name: Outbox(write_through=through) for name in written}
    for name, box in boxes.items():
        box.write_now = writer_of(name, box)
    got: dict[str, list[Any]] = {name: [] for name in written}

    async def writer(name: str) -> None:
        got[name].append(await boxes[name].get())

    async with trio.open_nursery() as nursery:
        for name in boxes:
            nursery.start_soon(writer, name)
        await trio.testing.wait_all_tasks_blocked()
        through.holding = True
        for name, box in boxes.items():
            box.put_nowait(CONTROL, CONTROL_URGENCY, f"{name}1", f"{name}2")
            box.put_nowait("ch", 3, f"{name}3")
        await trio.testing.wait_all_tasks_blocked()
        assert got == {"a": [], "b": [], "c": []}  # nobody woken while held
        assert len(through._noted) == 3  # each noted once
        with pytest.raises(RuntimeError, match="planted"):
            through.flush()
        assert not through.holding and not through._noted
        await trio.testing.wait_all_tasks_blocked()
        assert written["a"] == ["a1", "a2", "a3"] and got["a"] == []  # written through; its writer still waits
        assert got["b"] == ["b1"] and got["c"] == ["c1"]  # woken: they take it themselves
        nursery.cancel_scope.cancel()
    # not holding: a put wakes the writer at once, as always
    box = Outbox(write_through=through)
    box.write_now = lambda: pytest.fail("write_now outside a held turn")
    async with trio.open_nursery() as nursery:
        took: list[Any] = []

        async def take() -> None:
            took.append(await box.get())

        nursery.start_soon(take)
        await trio.testing.wait_all_tasks_blocked()
        box.put_nowait(CONTROL, CONTROL_URGENCY, "now")
        await trio.testing.wait_all_tasks_blocked()
        assert took == ["now"]


async def test_a_full_channel_queue_waits_alone() -> None:
    box = Outbox(per_key=3)
    await box.put("bulk", 8, "x", "y", "z")
    with trio.move_on_after(0.05) as waited:
        await box.put("bulk", 8, "w")  # full: waits (backpressure for this channel only)
    assert waited.cancelled_caught
    await box.put("voice", 0, "v")  # another channel is not held up
    assert box.get_nowait() == "v"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.put, "bulk", 8, "w")
        await trio.sleep(0.01)
        assert box.get_nowait() == "x"  # room: the waiting put goes in
    assert [box.get_nowait() for _ in range(3)] == ["y", "z", "w"]


async def test_large_frames_go_in_pieces_that_rebuild_and_verify(node: mux.Mux) -> None:
    ch = await node.open("b", "stream", agent="a")
    blob = os.urandom(40_000)
    frame = await ch.send(blob)
    pieces = frame_messages(frame, 16384)
    assert len(pieces) == 3 and all(isinstance(p, bytes) for p in pieces)
    headers = [unpack_binary(p) for p in pieces]  # type: ignore[arg-type]
    assert [h["part"] for h, _ in headers] == [0, 1, 2] and all(len(d) <= 16384 for _, d in headers)
    exported = headers[0][0]["frame"]
    exported["payload"] = base64.b64encode(b"".join(d for _, d in headers)).decode()
    assert mux.verify_frame(exported, node.public_key).payload == blob
    big_json = await ch.send({"text": "y" * 30_000})
    h0, _ = unpack_binary(frame_messages(big_json)[0])  # type: ignore[arg-type]
    assert h0["frame"]["enc"] == "json"
    assert frame_messages(await ch.send(b"small")) and len(frame_messages(await ch.send(b"small"))) == 1


async def test_voice_overtakes_a_queued_bulk_flood(node: mux.Mux, nursery: trio.Nursery) -> None:
    """The receiver's outbox holds a bulk flood; a voice frame sent after it goes out next."""
    sender = node.attach("alice")
    receiver = WireSession(node, node.attach("bob"), max_message_bytes=1 << 20)
    receiver.start(nursery)
    bulk = await sender.open("bob", "stream")
    voice = await sender.open("bob", "tibet:ping:voiceish")  # priority 2, live relay
    opened = [await receiver.outbox.get() for _ in range(2)]
    assert all(orjson.loads(m)["event"] == "channel_opened" for m in opened)
    for _ in range(40):
        await bulk.send(os.urandom(20_000))  # 2 pieces each
    await trio.sleep(0.05)  # 80 pieces queued under the bulk channel
    assert receiver.outbox.queued >= 64
    await voice.send({"type": "ping", "nonce": "n", "t0": 1})
    await trio.sleep(0.01)
    nxt = await receiver.outbox.get()
    assert isinstance(nxt, str) and orjson.loads(nxt)["channel_id"] == voice.id
    got = 0
    with trio.fail_after(5):
        while got < 80:  # every bulk piece still arrives, in order
            m = await receiver.outbox.get()
            assert isinstance(m, bytes)
            header, _ = unpack_binary(m)
            assert header["seq"] == 1 + got // 2 and header["part"] == got % 2
            got += 1


async def test_batch_action_and_batched_events(server: ServeInfo) -> None:
    async with open_ws(ws_url(server.url, "alice")) as a, open_ws(ws_url(server.url, "bob") + "&batch=1") as b:
        await recv(a)
        await recv(b)
        await send(a, action="open", target="bob", intent="stream")
        cid = (await recv(a))["channel_id"]
        await recv(b)
        items: list[dict[str, Any]] = [
            {"action": "send", "channel_id": cid, "payload": {"n": i}, "ref": i} for i in range(30)
        ]
        items.insert(5, {"action": "teleport", "ref": "bad"})
        items.append({"action": "ping", "ref": "p"})
        await send(a, action="batch", items=items, ref="B")
        answer = await recv(a)
        assert answer["event"] == "batch" and len(answer["items"]) == 32
        assert answer["items"][5] == {"error": "unknown_action", "detail": answer["items"][5]["detail"], "ref": "bad"}
        assert [x["ref"] for x in answer["items"] if x.get("event") == "frame_ack"] == list(range(30))
        assert answer["items"][-1]["event"] == "pong"
        frames: list[Any] = []
        messages = 0
        with trio.fail_after(5):
            while len(frames) < 30:
                msg = await recv(b)
                messages += 1
                frames += [x["payload"]["n"] for x in (msg["items"] if msg["event"] == "batch" else [msg])]
        assert frames == list(range(30)) and messages < 30  # fewer messages than frames
        await send(a, action="batch", items=[{"action": "batch", "items": []}])
        assert (await recv(a))["items"][0]["error"] == "bad_request"
        await send(a, action="batch", items=[{"action": "ping"}] * 300)
        assert (await recv(a))["error"] == "bad_request"
        await send(a, action="batch", items=[], ref="empty")
        assert await recv(a) == {"event": "batch", "items": []}  # always answered


async def test_client_rebuilds_large_frames(server: ServeInfo) -> None:
    async with connect(server.url, "alice") as alice, connect(server.url, "bob") as bob:
        ch = await alice.open("bob", "stream")
        theirs = await bob.accept()
        blob = os.urandom(100_000)
        await ch.send(blob)
        await ch.send({"text": "z" * 50_000})
        first, second = await theirs.receive(), await theirs.receive()
        assert first["payload"] == blob and bob.verify(first).payload == blob
        assert second["payload"] == {"text": "z" * 50_000} and bob.verify(second).seq == 2


async def test_a_batch_is_covered_by_one_signature_per_channel(server: ServeInfo) -> None:
    """Within a batch only each channel's last send is signed; a refused last send is
    followed by a signed seal; every exported chain verifies and ends signed."""
    async with open_ws(ws_url(server.url, "alice")) as a, open_ws(ws_url(server.url, "bob")) as b:
        await recv(a)
        await recv(b)
        ids = []
        for _ in range(2):
            await send(a, action="open", target="bob", intent="stream")
            ids.append((await recv(a))["channel_id"])
            await recv(b)
        one, two = ids
        items: list[dict[str, Any]] = []
        for i in range(6):
            items.append({"action": "send", "channel_id": one, "payload": {"n": i}, "ref": f"1:{i}"})
            if i < 4:
                items.append({"action": "send", "channel_id": two, "payload": {"n": i}, "ref": f"2:{i}"})
        # two's last send is refused (no agent key registered): its earlier frames need a seal
        items.append({"action": "send", "channel_id": two, "payload": 1, "agent_sig": "00", "ref": "bad"})
        await send(a, action="batch", items=items, ref="B")
        answer = await recv(a)
        acks = {x["ref"]: x for x in answer["items"] if x.get("event") == "frame_ack"}
        assert len(acks) == 10 and answer["items"][-1]["error"] == "no_agent_key"
        assert [bool(acks[f"1:{i}"]["sig"]) for i in range(6)] == [False] * 5 + [True]
        assert not any(acks[f"2:{i}"]["sig"] for i in range(4))
        seen: list[dict[str, Any]] = []
        with trio.fail_after(5):
            while len(seen) < 11:
                seen.append(await recv(b))
        seal = [f for f in seen if f.get("kind") == "seal"]
        assert len(seal) == 1 and seal[0]["channel_id"] == two and seal[0]["payload"] == {"covers": 4}
    async with httpx.AsyncClient(base_url=server.url + "/api/mux") as http:
        for cid, count in ((one, 7), (two, 6)):
            lines = (await http.get(f"/channel/{cid}/chain", params={"agent": "alice"})).text.splitlines()
            frames = [orjson.loads(line) for line in lines]
            report = mux.verify_chain(frames, server.node.require().public_key)
            assert report.frames >= count and frames[count - 1]["sig"]


async def test_bulk_beside_a_call_is_shaped_on_that_connection_only(node: mux.Mux) -> None:
    """While a connection carries a call, its preemptible bulk shares ``realtime_bulk_rate``
    (refused with ``throttled`` and ``retry_after_ms``, the connection and call untouched);
    another connection's bulk, and this one's once the call is quiet, are not shaped."""

    async with trio.open_nursery() as connections:
        sessions = {}
        for name in ("alice", "bob", "carol"):
            s = WireSession(node, node.attach(name), max_message_bytes=2 << 20)
            s.start(connections)
            sessions[name] = s
        alice, carol = sessions["alice"], sessions["carol"]

        def opened(s: WireSession, target: str, intent: str) -> str:
            return str(
                orjson.loads(
                    s.handle(orjson.dumps({"action": "open", "target": target, "intent": intent}).decode())[0]
                )["channel_id"]
            )

        call = opened(alice, "bob", "call:voice")
        bulk = opened(alice, "bob", "stream")
        other = opened(carol, "bob", "stream")
        blob = os.urandom(node.config.realtime_bulk_rate // 100 - 1)  # two fit the burst (rate / 50)

        def send_bulk(s: WireSession, cid: str) -> dict[str, Any]:
            return dict(orjson.loads(s.handle(pack_binary({"action": "send", "channel_id": cid}, blob))[0]))

        offer = {"action": "send", "channel_id": call, "payload": {"type": "offer", "sdp": "v=0"}}
        assert orjson.loads(alice.handle(orjson.dumps(offer).decode())[0])["event"] == "frame_ack"
        replies = [send_bulk(alice, bulk) for _ in range(4)]
        assert [r.get("event") for r in replies[:2]] == ["frame_ack", "frame_ack"]
        assert [r.get("window") for r in replies] == [1, 1, 1, 1]  # the hint, on acks and refusals
        assert "pace_ms" not in replies[0]  # another frame this size still fits the burst
        assert 1 <= replies[1]["pace_ms"] <= 20  # this one does not: when it will
        refused = replies[-1]
        assert refused["error"] == "throttled" and refused["channel_id"] == bulk
        assert 1 <= refused["retry_after_ms"] <= 1000 and "call is active" in refused["detail"]
        others = [send_bulk(carol, other) for _ in range(4)]
        assert all(r.get("event") == "frame_ack" and "window" not in r for r in others)  # not shaped
        await trio.sleep(node.config.realtime_hold_s + 0.05)  # the call went quiet
        after = [send_bulk(alice, bulk) for _ in range(4)]
        assert all(r.get("event") == "frame_ack" and "window" not in r for r in after)
        connections.cancel_scope.cancel()


async def _bulk_paces_beside_a_steady_call(clock: trio.testing.MockClock, gaps: bool) -> list[Any]:
    """A call frame every 20 ms on alice's connection, then a bulk send 1, 5 and 16 ms after
    the last one: the ``pace_ms`` of each ack (None when absent); then at 30 ms two 30 kB
    frames, the second refused: its ``retry_after_ms``."""
    paces: list[Any] = []
    async with mux.open_mux(agent="n", realtime_bulk_gaps=gaps) as m, trio.open_nursery() as connections:
        alice = WireSession(m, m.attach("alice"), max_message_bytes=1 << 20)
        alice.start(connections)
        m.attach("bob")

        def act(**action: Any) -> dict[str, Any]:
            return dict(orjson.loads(alice.handle(orjson.dumps(action).decode())[0]))

        call = act(action="open", target="bob", intent="call:voice")["channel_id"]
        bulk = act(action="open", target="bob", intent="stream")["channel_id"]
        start = trio.current_time()
        for i, kind in enumerate(["offer", "ice", "ice", "ice"]):
            clock.jump(start + 0.02 * i - trio.current_time())
            assert act(action="send", channel_id=call, payload={"type": kind})["event"] == "frame_ack"
        last = trio.current_time()
        for offset in (0.001, 0.005, 0.016):
            clock.jump(last + offset - trio.current_time())
            ack = act(action="send", channel_id=bulk, payload={"n": 1})
            assert ack["event"] == "frame_ack" and ack["window"] == 1
            paces.append(ack.get("pace_ms"))
        clock.jump(last + 0.030 - trio.current_time())  # the budget (2 MB/s, 40 kB burst) is full
        blob = pack_binary({"action": "send", "channel_id": bulk}, bytes(30_000))
        assert orjson.loads(alice.handle(blob)[0])["event"] == "frame_ack"
        refused = orjson.loads(alice.handle(blob)[0])  # 10 kB left: room again in 10 ms
        assert refused["error"] == "throttled" and refused["window"] == 1
        paces.append(refused["retry_after_ms"])
        connections.cancel_scope.cancel()
    return paces


async def test_bulk_beside_a_call_is_paced_into_the_gaps_between_its_frames(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Beside a call with a steady cadence, a bulk ack's ``pace_ms`` puts the sender's next
    frame in the gap after a call frame (``MuxConfig.realtime_bulk_gaps``), even with budget
    to spare (a refusal's ``retry_after_ms`` is the budget's alone); without the option only
    the budget paces."""
    # just behind a call frame: wait for the gap (it opens at 3 ms); in the gap: no wait;
    # after it closed (14 ms): wait for the next one (20 + 3 ms); a refusal's retry stays what
    # the budget says (10 ms), though that is when a call frame is expected (see protocol.md)
    assert await _bulk_paces_beside_a_steady_call(mock_clock, gaps=True) == [2, None, 7, 10]
    assert await _bulk_paces_beside_a_steady_call(mock_clock, gaps=False) == [None, None, None, 10]


async def test_a_bulk_frame_refused_by_its_intent_does_not_spend_the_calls_share() -> None:
    """Beside a call, a frame refused further on (here by its own intent's budget) gives its
    bytes back to the connection's bulk budget, and the refusal still carries ``window``."""

    async with mux.open_mux(agent="n", intent_policies={"bulk:tiny": {"rate": 1000, "burst": 1000}}) as m:
        async with trio.open_nursery() as connections:
            alice = WireSession(m, m.attach("alice"), max_message_bytes=1 << 20)
            alice.start(connections)
            m.attach("bob")

            def open_(intent: str) -> str:
                reply = alice.handle(orjson.dumps({"action": "open", "target": "bob", "intent": intent}).decode())
                return str(orjson.loads(reply[0])["channel_id"])

            call, tiny = open_("call:voice"), open_("bulk:tiny")
            offer = {"action": "send", "channel_id": call, "payload": {"type": "offer", "sdp": "v=0"}}
            alice.handle(orjson.dumps(offer).decode())
            assert alice._bulk is not None
            full = alice._bulk.bucket.tokens
            blob = bytes(5000)

            def send_tiny() -> dict[str, Any]:
                return dict(orjson.loads(alice.handle(pack_binary({"action": "send", "channel_id": tiny}, blob))[0]))

            assert send_tiny()["event"] == "frame_ack"  # over its burst, but its bucket was full
            refused = send_tiny()
            assert refused["error"] == "throttled" and refused["window"] == 1 and refused["retry_after_ms"] > 0
            assert "call is active" not in refused["detail"]  # its intent's budget said no
            assert alice._bulk.bucket.tokens >= full - len(blob) - 1  # charged once (the sent frame), not twice
            connections.cancel_scope.cancel()


async def test_acks_errors_makes_delivered_sends_quiet(server: ServeInfo) -> None:
    """``?acks=errors``: delivered sends are silent, refusals and drops still answer."""
    url = ws_url(server.url, "alice") + "&acks=errors"
    async with open_ws(url) as a, open_ws(ws_url(server.url, "bob")) as b:
        await recv(a)
        await recv(b)
        await send(a, action="open", target="bob", intent="stream")
        cid = (await recv(a))["channel_id"]
        await recv(b)
        for i in range(5):
            await send(a, action="send", channel_id=cid, payload={"n": i}, ref=i)
        await send(a, action="send", channel_id="ch-nope", payload=1, ref="bad")
        await send(a, action="batch", items=[{"action": "send", "channel_id": cid, "payload": {"n": 5}}])
        await send(a, action="ping", ref="p")
        first = await recv(a)  # nothing for the six delivered sends: the error comes first
        assert first["error"] in ("unknown_channel", "forbidden") and first["ref"] == "bad"
        assert (await recv(a))["event"] == "pong"  # the quiet batch was not answered either
        got = [(await recv(b))["payload"]["n"] for _ in range(6)]
        assert got == list(range(6))
    async with open_ws(ws_url(server.url, "carol") + "&acks=sometimes") as c:
        assert (await recv(c))["error"] == "bad_request"


class _ReadySocket:
    """A ``mux.sockets.Socket`` whose client messages are all ready at once: ``receive``
    and ``receive_ready`` return the next without blocking or yielding (as a server holding
    many received messages would); it records each write (``send`` or ``send_many``)."""

    def __init__(self, agent: str, messages: list[str], on_take: Any) -> None:
        self.args = {"agent": agent}
        self.authorization: str | None = None
        self.subprotocols: list[str] = []
        self.remote_addr: str | None = "127.0.0.1"
        self.messages = messages
        self.on_take = on_take
        self.sent: list[str | bytes] = []
        self.writes: list[int] = []
        """How many messages each write carried."""
        self._more = trio.lowlevel.ParkingLot()
        self._sends = trio.lowlevel.ParkingLot()

    def feed(self, messages: list[str]) -> None:
        """Make more client messages ready, all at once."""
        self.messages.extend(messages)
        self._more.unpark_all()

    async def accept(self, subprotocol: str | None) -> None:
        pass

    async def send(self, message: str | bytes) -> None:
        await self.send_many([message])

    async def send_many(self, messages: Sequence[str | bytes]) -> None:
        self.sent.extend(messages)
        self.writes.append(len(messages))
        self._sends.unpark_all()
        await trio.lowlevel.checkpoint()

    async def wait_sent(self, n: int) -> None:
        """Return once ``n`` messages were sent in all."""
        while len(self.sent) < n:
            await self._sends.park()

    async def receive(self) -> str | bytes:
        while not self.messages:
            await self._more.park()
        self.on_take()
        return self.messages.pop(0)

    def receive_ready(self) -> str | bytes | None:
        if not self.messages:
            return None
        self.on_take()
        return self.messages.pop(0)

    async def close(self, code: int, reason: str) -> None:
        pass

    def direct_ready(self) -> bool:
        """Never: every write goes through send_many, as on a server without a direct path."""
        return False

    def send_now(self, messages: Sequence[str | bytes]) -> bool:
        raise AssertionError("send_now without direct_ready")

    def handle_inline(self, handler: Any, most: int = 16, most_bytes: int = 4096, done: Any = None) -> None:
        pass  # every message comes through receive (as under Quart)


async def test_the_reader_takes_what_is_ready_then_gives_writers_a_turn(node: mux.Mux, nursery: trio.Nursery) -> None:
    """The socket handler takes the client messages the server already holds, at most
    ``READ_AHEAD`` of them, then takes one scheduling turn, so the writers they woke put
    what they were given on the wire, in one write, before more is taken (and the server's
    socket reader is paced with them; see mux/connection.py): a task that counts its turns sees at
    most ``READ_AHEAD`` messages taken per turn (two turns' worth within one round), and
    the replies go out several per write, in order."""
    from mux.app import Node
    from mux.connection import READ_AHEAD, serve_socket
    from mux.settings import NodeSettings

    turns = 0
    seen_at_take: list[int] = []

    async def other_task() -> None:
        nonlocal turns
        while True:
            turns += 1
            await trio.lowlevel.checkpoint()

    count = 5 * READ_AHEAD
    sock = _ReadySocket(
        "reader-a",
        [orjson.dumps({"action": "ping", "ref": i}).decode() for i in range(count)],
        lambda: seen_at_take.append(turns),
    )
    app_node = Node(NodeSettings(data_dir=None, open_mode=True), mux=node)
    nursery.start_soon(serve_socket, app_node, sock)
    with trio.fail_after(10):
        await sock.wait_sent(count + 1)  # the hello, then one pong per ping
        nursery.start_soon(other_task)
        sock.feed([orjson.dumps({"action": "ping", "ref": count + i}).decode() for i in range(count)])
        await sock.wait_sent(2 * count + 1)
    taken = seen_at_take[count:]
    assert len(taken) == count
    # READ_AHEAD messages per turn of the reader; the counting task runs once a round too
    # (in either order within it), so no count sees more than two turns' worth taken
    per_count = collections.Counter(taken).values()
    assert max(per_count) <= 2 * READ_AHEAD, taken
    assert len(per_count) >= count // (2 * READ_AHEAD), taken  # turns were taken all along
    assert max(sock.writes) > 1 and len(sock.writes) < count, sock.writes  # replies share writes
    pongs = [orjson.loads(m) for m in sock.sent[1:]]
    assert [p["ref"] for p in pongs] == list(range(2 * count))  # in order, none lost
    nursery.cancel_scope.cancel()


async def test_the_writer_puts_ready_messages_in_one_write_up_to_a_pieces_size(nursery: trio.Nursery) -> None:
    """What is queued together goes out in one write, in the outbox's order (most urgent
    first), as long as the write stays within ``WRITE_BYTES`` (a voice frame then waits for
    at most one piece's worth): a message that would overflow it starts the next write, and
    one larger than that goes alone."""
    from mux.writer import WRITE_BYTES, Writer

    sock = _ReadySocket("writer-a", [], lambda: None)
    box = Outbox()
    third = WRITE_BYTES // 3
    box.put_nowait("bulk", 8, "b1" + "x" * third, "b2" + "x" * third, "b3" + "x" * third, "b4")
    box.put_nowait("voice", 0, "v1")
    box.put_nowait(CONTROL, CONTROL_URGENCY, "c1")
    box.put_nowait("bulk2", 8, "p" * (WRITE_BYTES + 1))
    writer = Writer(sock, box, 5.0, trio.CancelScope(), "writer-a")  # type: ignore[arg-type]
    nursery.start_soon(writer.run)
    with trio.fail_after(5):
        await sock.wait_sent(7)
    heads = [m[:2] for m in sock.sent]
    assert heads == ["c1", "v1", "b1", "pp", "b2", "b3", "b4"]  # urgency, then bulk keys in turn
    assert sock.writes == [3, 1, 3]  # c1 v1 b1 | the oversized piece alone | b2 b3 b4
    assert all(sum(map(len, sock.sent[i : i + 3])) <= WRITE_BYTES for i in (0, 4))
    for _ in range(10):  # the last write returns
        if writer.idle:
            break
        await trio.lowlevel.checkpoint()
    assert writer.idle
    nursery.cancel_scope.cancel()


async def test_without_a_call_held_a_large_frames_pieces_share_writes(nursery: trio.Nursery) -> None:
    """A connection that holds no real-time channel has no call frame to keep waiting: the
    pieces of a large frame go out ``BULK_WRITE_BYTES`` at a time (a sixteenth of the
    writes); one that holds a call writes one piece's worth at a time."""
    from mux.writer import BULK_WRITE_BYTES, WRITE_BYTES, Writer

    piece = "p" * (WRITE_BYTES - 100)
    pieces = BULK_WRITE_BYTES // WRITE_BYTES
    for call_held, writes in ((False, [pieces, pieces]), (True, [1] * (2 * pieces))):
        sock = _ReadySocket("writer-b", [], lambda: None)
        box = Outbox(per_key=1000)
        box.put_nowait("bulk", 8, *[piece] * (2 * pieces))

        def held(value: bool = call_held) -> bool:
            return value

        writer = Writer(sock, box, 5.0, trio.CancelScope(), "writer-b", holds_realtime=held)  # type: ignore[arg-type]
        async with trio.open_nursery() as inner:
            inner.start_soon(writer.run)
            with trio.fail_after(5):
                await sock.wait_sent(2 * pieces)
            inner.cancel_scope.cancel()
        assert sock.writes == writes, call_held
        assert all(sum(map(len, sock.sent[i : i + n])) <= BULK_WRITE_BYTES for i, n in ((0, pieces), (pieces, pieces)))


async def test_a_session_knows_when_it_holds_a_call(node: mux.Mux, nursery: trio.Nursery) -> None:
    """Both ends of a real-time channel count it while it is open; a bulk channel does not."""
    alice, bob = (WireSession(node, node.attach(name), max_message_bytes=1 << 20) for name in ("alice", "bob"))
    alice.start(nursery)
    bob.start(nursery)
    alice.handle('{"action":"open","target":"bob","intent":"stream"}')
    await trio.sleep(0.05)
    assert not alice.holds_realtime and not bob.holds_realtime
    (opened,) = alice.handle('{"action":"open","target":"bob","intent":"call:voice"}')
    call = orjson.loads(opened)["channel_id"]
    await trio.sleep(0.05)
    assert alice.holds_realtime and bob.holds_realtime
    alice.handle(orjson.dumps({"action": "close", "channel_id": call}).decode())
    await trio.sleep(0.05)
    assert not alice.holds_realtime and not bob.holds_realtime
