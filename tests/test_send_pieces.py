"""A client's payload in pieces (``mux.pieces``): joined into one frame, a call's frames between.

- A property test drives a node's session by hand (no socket): several sends in pieces at
  once, on two channels and under several ``ref``s, their pieces interleaved at random with
  whole sends, with faults mixed in (a piece skipped, repeated, or its ``parts`` changed; a
  send started over). Every send whose pieces all came in order becomes exactly one frame
  with exactly its bytes, answered once with its ``ref`` (nothing for the pieces before,
  but a ``part_ack`` for each that asked);
  every fault fails that piece with ``bad_request`` and the send yields no frame; the
  frames reach the receiver whole, in the order their sends completed; what the node holds
  for unfinished sends never passes ``MAX_OPEN`` sends nor ``max_message_bytes`` each.
- Edge cases: bad ``part``/``parts``, pieces in a JSON message, too many unfinished, a
  payload over the limit, and the rate limit charging a send in pieces once.
- End to end (a real node, ``mux.client`` at both ends): while the sender holds a call, a
  1 MiB payload goes in ``PART_BYTES`` (4 KiB) pieces, or in ``MAX_PARTS`` larger ones where
  it would take more, and a call frame sent while they are being written is answered
  (handled by the node) before the payload is; without a call the payload goes whole, in
  one message.
- Confirmed pieces (``part_ack``): the node answers each piece that asks; through a 1 MB/s
  shaping proxy ``mux.client`` keeps its pieces in flight within its window (``mux.uplink``),
  which closes as the link's queue grows; confirmations that stop coming hold a send up
  for ``PART_ACK_TIMEOUT_S`` at a time, not for good.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import tracemalloc
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio_websocket
from hypothesis import given, settings
from hypothesis import strategies as st

import mux
from mux.client import PART_BYTES, UNCONFIRMED_PART_BYTES, connect
from mux.errors import ChannelThrottled
from mux.pieces import MAX_OPEN, PIECE_HELD_BYTES, SEND_HELD_BYTES
from mux.server import ServeInfo
from mux.wire import pack_binary, unpack_binary

from .nodes import outbox_events, serve_node, started_sessions
from .wsutil import recv, recv_until, send, ws_url

# A step: (kind, channel index, ref, size or fault). Kinds: "whole" (one message), "piece"
# (the next piece of that send, starting it with ``size`` bytes in up to 4 pieces), "fault".
steps = st.lists(
    st.tuples(
        st.sampled_from(["whole", "piece", "piece", "piece", "fault"]),
        st.integers(0, 1),
        st.integers(0, 3),
        st.integers(1, 200),
    ),
    max_size=60,
)
FAULTS = ("skip", "repeat", "parts", "restart")


def _send(
    cid: str, ref: int, payload: bytes, part: int | None = None, parts: int | None = None, *, confirm: bool = False
) -> bytes:
    header: dict[str, Any] = {"action": "send", "channel_id": cid, "ref": ref}
    if part is not None:
        header.update(part=part, parts=parts)
    if confirm:
        header["part_ack"] = True
    return pack_binary(header, payload)


@settings(max_examples=150, deadline=None)
@given(plan=steps, data=st.data())
async def test_pieces_join_into_exactly_the_frames_sent(plan: list[tuple[str, int, int, int]], data: Any) -> None:
    async with mux.open_mux(agent="node") as node, trio.open_nursery() as nursery:
        sender, receiver = started_sessions(node, nursery, "alice", "bob")
        channels = []
        for _ in range(2):
            (opened,) = outbox_events(sender.handle(orjson.dumps({"action": "open", "target": "bob"}).decode()))
            channels.append(opened["channel_id"])
        # (channel, ref) -> [payload, parts, next part]; a ref is reused once its send ends
        under_way: dict[tuple[str, int], list[Any]] = {}
        expected: dict[str, list[bytes]] = collections.defaultdict(list)
        next_ref = 1000
        for kind, i, ref, size in plan:
            cid = channels[i]
            key = (cid, ref)
            if kind == "whole":
                next_ref += 1
                payload = os.urandom(size)
                (ack,) = outbox_events(sender.handle(_send(cid, next_ref, payload)))
                assert ack["event"] == "frame_ack" and ack["ref"] == next_ref
                expected[cid].append(payload)
                continue
            send = under_way.get(key)
            if kind == "fault":
                if send is None:
                    continue
                fault = data.draw(st.sampled_from(FAULTS))
                payload, parts, part = send
                if fault == "restart":  # its piece 0 again: starts over, nothing answered
                    count = data.draw(st.integers(2, 4))
                    fresh = os.urandom(max(size, count))
                    send[:] = [fresh, count, 1]
                    assert sender.handle(_send(cid, ref, fresh[: -(-len(fresh) // count)], 0, count)) == []
                    continue
                bad = {"skip": (part + 1, parts), "repeat": (part - 1, parts), "parts": (part, parts + 1)}[fault]
                if bad[0] < 1 or bad[0] >= bad[1]:  # (a piece 0 again is a restart, not a fault)
                    continue
                (err,) = outbox_events(sender.handle(_send(cid, ref, b"x", *bad)))
                assert err["error"] == "bad_request" and err["ref"] == ref and err["channel_id"] == cid, err
                del under_way[key]  # that send is forgotten
                continue
            if send is None:
                if len(under_way) >= MAX_OPEN:
                    continue
                count = data.draw(st.integers(2, 4))
                send = under_way[key] = [os.urandom(max(size, count)), count, 0]
            payload, parts, part = send
            step = -(-len(payload) // parts)
            chunk = payload[part * step : (part + 1) * step]
            confirm = data.draw(st.booleans())
            replies = outbox_events(sender.handle(_send(cid, ref, chunk, part, parts, confirm=confirm)))
            send[2] += 1
            if send[2] < parts:  # pieces are silent, but for a confirmation when they ask
                assert replies == (
                    [{"event": "part_ack", "channel_id": cid, "part": part, "ref": ref}] if confirm else []
                )
            else:
                (ack,) = replies
                assert ack["event"] == "frame_ack" and ack["ref"] == ref and ack["disposition"] == "delivered", ack
                expected[cid].append(payload)
                del under_way[key]
            assert sender._pieces is None or len(sender._pieces) <= MAX_OPEN
            # the node counts exactly the unfinished sends, each with its pieces so far
            assert node.pieces.sends == len(under_way)
            assert node.pieces.held == sum(map(_counted, under_way.values()))
        assert (sender._pieces is None) == (not under_way)
        got: dict[str, list[bytes]] = collections.defaultdict(list)
        while (m := receiver.outbox.get_nowait()) is not None:
            if isinstance(m, bytes):
                header, payload = unpack_binary(m)
                if header.get("event") == "frame":
                    got[header["channel_id"]].append(payload)
        assert got == expected
        sender.close()
        assert (node.pieces.sends, node.pieces.held) == (0, 0)  # a connection gone holds nothing


def _counted(send: list[Any]) -> int:
    """What the node counts for an unfinished send of the property test (payload, parts,
    pieces sent): its record and each piece taken so far."""
    payload, parts, sent = send
    step = -(-len(payload) // parts)
    return SEND_HELD_BYTES + sum(len(payload[i * step : (i + 1) * step]) + PIECE_HELD_BYTES for i in range(sent))


async def test_bad_pieces_fail_alone(nursery: trio.Nursery) -> None:
    async with mux.open_mux(agent="node") as node:
        sender, receiver = started_sessions(node, nursery, "alice", "bob")
        (opened,) = outbox_events(sender.handle(orjson.dumps({"action": "open", "target": "bob"}).decode()))
        cid = opened["channel_id"]
        assert orjson.loads(sender.hello())["send_parts"] == MAX_OPEN
        for part, parts in ((0, 1), (2, 2), (-1, 3), (True, 2), (0, "2"), (None, 2), (0, 5000)):
            header = {"action": "send", "channel_id": cid, "ref": 1, "part": part, "parts": parts}
            (err,) = outbox_events(sender.handle(pack_binary(header, b"x")))
            assert err["error"] == "bad_request" and err["ref"] == 1, (part, parts, err)
        json_piece = {"action": "send", "channel_id": cid, "ref": 2, "payload": "x", "part": 0, "parts": 2}
        (err,) = outbox_events(sender.handle(orjson.dumps(json_piece).decode()))
        assert err["error"] == "bad_request" and "binary" in err["detail"]
        for ref in range(MAX_OPEN):  # the most unfinished sends a connection may have
            assert sender.handle(_send(cid, ref, b"a", 0, 2)) == []
        (err,) = outbox_events(sender.handle(_send(cid, 99, b"a", 0, 2)))
        assert err["error"] == "bad_request" and f"at most {MAX_OPEN}" in err["detail"]
        assert sender.handle(_send(cid, 0, b"b", 1, 2))  # one finishes: room for another
        assert sender.handle(_send(cid, 99, b"a", 0, 2)) == []
        assert sender.handle(_send(cid, 99, b"c", 1, 2))  # and that one too
        # the joined payload is held to the connection's message limit
        big = sender.max_message_bytes // 2 + 1
        assert sender.handle(_send(cid, 50, b"\0" * big, 0, 3)) == []
        (err,) = outbox_events(sender.handle(_send(cid, 50, b"\0" * big, 1, 3)))
        assert err["error"] == "message_too_large" and err["ref"] == 50
        (err,) = outbox_events(sender.handle(_send(cid, 50, b"\0", 2, 3)))  # forgotten with it
        assert err["error"] == "bad_request" and "expected piece 0" in err["detail"]
        # a piece for a channel not held: the whole send fails as a whole send would
        assert sender.handle(_send("ch-nope", 60, b"a", 0, 2)) == []
        (err,) = outbox_events(sender.handle(_send("ch-nope", 60, b"b", 1, 2)))
        assert err["error"] == "unknown_channel" and err["ref"] == 60
        frames = [m for m in iter(receiver.outbox.get_nowait, None) if isinstance(m, bytes)]
        assert [unpack_binary(m)[1] for m in frames] == [b"ab", b"ac"]  # only the sends that finished


async def test_a_send_in_pieces_is_charged_once_by_the_rate_limit(nursery: trio.Nursery) -> None:
    async with mux.open_mux(agent="node") as node:
        (sender,) = started_sessions(node, nursery, "alice", rate=(1.0, 3))
        started_sessions(node, nursery, "bob")
        (opened,) = outbox_events(sender.handle(orjson.dumps({"action": "open", "target": "bob"}).decode()))
        cid = opened["channel_id"]  # the open took 1 of the 3
        for part in range(10):  # 10 pieces: one send, charged at its piece 0
            replies = outbox_events(sender.handle(_send(cid, 1, b"p", part, 10)))
        assert replies[0]["event"] == "frame_ack"
        assert outbox_events(sender.handle(_send(cid, 2, b"w")))[0]["event"] == "frame_ack"
        (err,) = outbox_events(sender.handle(_send(cid, 3, b"p", 0, 2)))
        assert err["error"] == "rate_limited"


async def test_the_node_bounds_all_connections_unfinished_pieces_together(nursery: trio.Nursery) -> None:
    """``pieces_max_bytes`` bounds what every connection's unfinished sends hold together:
    past it a piece fails ``pieces_full`` (that send forgotten, nothing else), whole sends
    go on, and room comes back as sends finish."""
    piece = 20_000
    bound = 3 * (SEND_HELD_BYTES + piece + PIECE_HELD_BYTES)  # three sends' first pieces
    async with mux.open_mux(agent="node", pieces_max_bytes=bound) as node:
        alice, carol, _bob = started_sessions(node, nursery, "alice", "carol", "bob")
        cids = {}
        for name, session in (("alice", alice), ("carol", carol)):
            (opened,) = outbox_events(session.handle(orjson.dumps({"action": "open", "target": "bob"}).decode()))
            cids[name] = opened["channel_id"]
        chunk = os.urandom(piece)
        assert alice.handle(_send(cids["alice"], 1, chunk, 0, 2)) == []
        assert alice.handle(_send(cids["alice"], 2, chunk, 0, 2)) == []
        assert carol.handle(_send(cids["carol"], 1, chunk, 0, 2)) == []
        assert (node.pieces.sends, node.pieces.held) == (3, bound)
        (err,) = outbox_events(carol.handle(_send(cids["carol"], 2, chunk, 0, 2)))
        assert err["error"] == "pieces_full" and err["ref"] == 2 and err["channel_id"] == cids["carol"], err
        assert f"limit {bound}" in err["detail"]
        (err,) = outbox_events(carol.handle(_send(cids["carol"], 2, chunk, 1, 2)))  # it was forgotten
        assert err["error"] == "bad_request" and "expected piece 0" in err["detail"]
        assert (node.pieces.sends, node.pieces.held) == (3, bound)
        (ack,) = outbox_events(carol.handle(_send(cids["carol"], 3, chunk)))  # whole sends go on
        assert ack["event"] == "frame_ack"
        (ack,) = outbox_events(alice.handle(_send(cids["alice"], 1, b"end", 1, 2)))  # one finishes
        assert ack["event"] == "frame_ack" and ack["ref"] == 1
        assert node.pieces.sends == 2
        assert carol.handle(_send(cids["carol"], 2, chunk, 0, 2)) == []  # room again
        assert node.status()["pieces"] == {"sends": 3, "bytes": bound, "max_bytes": bound}
        alice.close()  # a connection that goes gives back what its sends held
        assert (node.pieces.sends, node.pieces.held) == (2, 2 * bound // 3)  # carol's two


@pytest.mark.parametrize(("piece", "agent_signed"), [(1, False), (200, True), (5000, False), (60_000, True)])
async def test_what_the_node_counts_for_pieces_is_what_they_hold(
    nursery: trio.Nursery, piece: int, agent_signed: bool
) -> None:
    """Measured with tracemalloc: what unfinished sends in pieces hold (their records,
    fields from piece 0, an agent's signature among them, and their pieces) is no more than
    the node counts for them, and not much less for large pieces."""
    async with mux.open_mux(agent="node", max_channels_per_agent=64) as node:
        sessions = started_sessions(node, nursery, *(f"a{i}" for i in range(6)), "bob")
        cids = []
        for session in sessions[:-1]:
            (opened,) = outbox_events(session.handle(orjson.dumps({"action": "open", "target": "bob"}).decode()))
            cids.append(opened["channel_id"])
        messages = []
        for ref in range(MAX_OPEN):
            for cid in cids:
                extra = {"agent_sig": os.urandom(64).hex(), "agent_nonce": os.urandom(12).hex()} if agent_signed else {}
                for part in range(3):
                    header = {"action": "send", "channel_id": cid, "ref": f"r{ref}", "part": part, "parts": 4, **extra}
                    messages.append((cids.index(cid), pack_binary(header, os.urandom(piece))))
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i, message in messages:
                assert sessions[i].handle(message) == []
            del message
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        counted = node.pieces.held
        assert node.pieces.sends == len(cids) * MAX_OPEN
        assert held <= counted, (held, counted)
        if piece >= 5000:
            assert held >= 0.9 * counted, (held, counted)


async def test_a_send_whose_pieces_stop_coming_is_forgotten(nursery: trio.Nursery) -> None:
    """A send none of whose pieces came for ``pieces_idle_s`` is forgotten and its sender
    told (``pieces_expired`` with the send's ``ref``); a send still moving is kept."""
    async with mux.open_mux(agent="node", pieces_idle_s=30.0) as node:
        alice, _bob = started_sessions(node, nursery, "alice", "bob")
        (opened,) = outbox_events(alice.handle(orjson.dumps({"action": "open", "target": "bob"}).decode()))
        cid = opened["channel_id"]
        start = trio.current_time()
        assert alice.handle(_send(cid, "stale", b"a" * 100, 0, 3)) == []
        assert alice.handle(_send(cid, "moving", b"b" * 100, 0, 3)) == []
        alice.expire_pieces(start + 29.0)  # not yet
        assert node.pieces.sends == 2 and alice.outbox.get_nowait() is None
        await trio.sleep(0.05)
        assert alice.handle(_send(cid, "moving", b"b" * 100, 1, 3)) == []  # a piece came
        alice.expire_pieces(start + 30.0 + 0.01)
        (err,) = outbox_events([m for m in iter(alice.outbox.get_nowait, None)])
        assert err["error"] == "pieces_expired" and err["ref"] == "stale" and err["channel_id"] == cid, err
        assert "30 s" in err["detail"]
        assert node.pieces.sends == 1
        (err,) = outbox_events(alice.handle(_send(cid, "stale", b"a", 1, 3)))
        assert err["error"] == "bad_request" and "expected piece 0" in err["detail"]
        (ack,) = outbox_events(alice.handle(_send(cid, "moving", b"b", 2, 3)))
        assert ack["event"] == "frame_ack" and ack["ref"] == "moving"
        assert (node.pieces.sends, node.pieces.held) == (0, 0) and alice._pieces is None
        node.config.pieces_idle_s = 0  # 0: sends in pieces never expire
        assert alice.handle(_send(cid, "kept", b"k" * 100, 0, 2)) == []
        alice.expire_pieces(trio.current_time() + 10**6)
        assert node.pieces.sends == 1 and alice.outbox.get_nowait() is None


async def test_a_send_given_up_half_way_is_forgotten_at_once(nursery: trio.Nursery) -> None:
    """``abandon`` (the send's channel and ``ref``) forgets an unfinished send in pieces: its
    place among ``MAX_OPEN`` is free again, nothing of it is chained, nothing answered.
    One for a send not under way is ignored; a malformed one fails alone."""
    async with mux.open_mux(agent="node") as node:
        alice, bob = started_sessions(node, nursery, "alice", "bob")
        (opened,) = outbox_events(alice.handle(orjson.dumps({"action": "open", "target": "bob"}).decode()))
        cid = opened["channel_id"]
        for ref in range(MAX_OPEN):
            assert alice.handle(_send(cid, ref, b"a" * 100, 0, 3)) == []
        assert node.pieces.sends == MAX_OPEN
        abandon = {"action": "abandon", "channel_id": cid, "ref": 2}
        assert alice.handle(orjson.dumps(abandon).decode()) == []
        assert node.pieces.sends == MAX_OPEN - 1
        assert alice.handle(orjson.dumps(abandon).decode()) == []  # not under way any more: ignored
        assert alice.handle(orjson.dumps({**abandon, "channel_id": "ch-other"}).decode()) == []
        (err,) = outbox_events(alice.handle(orjson.dumps({"action": "abandon", "ref": 3}).decode()))
        assert err["error"] == "bad_request" and "channel_id" in err["detail"] and err["ref"] == 3
        assert alice.handle(_send(cid, 9, b"n", 0, 2)) == []  # its place is free
        (err,) = outbox_events(alice.handle(_send(cid, 2, b"b", 1, 3)))
        assert err["error"] == "bad_request" and "expected piece 0" in err["detail"]
        for ref in (0, 1, 3, 9):
            alice.handle(orjson.dumps({**abandon, "ref": ref}).decode())
        assert (node.pieces.sends, node.pieces.held) == (0, 0) and alice._pieces is None
        assert bob.outbox.get_nowait() is not None  # channel_opened, and no frame after it
        assert bob.outbox.get_nowait() is None


async def test_a_cancelled_send_in_pieces_frees_its_place_on_the_node(nursery: trio.Nursery) -> None:
    """``mux.client``: a send in pieces whose task is cancelled after a piece was written
    tells the node (``abandon``), which forgets it at once. More such sends than the node
    keeps unfinished (``MAX_OPEN``), then a large send beside the call goes through; without
    the abandon it would be refused until ``pieces_idle_s`` (60 s) passed."""
    server = await serve_node(nursery)
    with trio.fail_after(30):
        async with (
            connect(server.url, "alice") as alice,
            connect(server.url, "bob") as bob,
            httpx.AsyncClient(base_url=server.url) as http,
        ):
            call = await alice.open("bob", "call:voice")
            stream = await alice.open("bob", "stream")
            await call.send(bytes(200))  # the connection holds a call: large payloads go in pieces
            theirs = [await bob.accept(), await bob.accept()]

            async def pieces_held() -> int:
                held: int = (await http.get("/api/mux/status")).json()["pieces"]["sends"]
                return held

            async with trio.open_nursery() as readers:
                for ch in theirs:
                    readers.start_soon(_drain, ch)
                for _ in range(MAX_OPEN + 2):
                    async with trio.open_nursery() as sending:
                        sending.start_soon(_send_waiting_out_refusals, stream, bytes(800_000))
                        while await pieces_held() == 0:  # noqa: ASYNC110  (bounded by fail_after)
                            await trio.sleep(0.005)
                        sending.cancel_scope.cancel()  # given up half-way
                    for _ in range(200):
                        if await pieces_held() == 0:
                            break
                        await trio.sleep(0.005)
                    assert await pieces_held() == 0
                ack = await _send_waiting_out_refusals(stream, bytes(800_000))
                assert ack["event"] == "frame_ack" and ack["disposition"] == "delivered"
                readers.cancel_scope.cancel()


async def _drain(ch: Any) -> None:
    async for _ in ch:
        pass


async def _send_waiting_out_refusals(ch: Any, payload: bytes) -> dict[str, Any]:
    """Send ``payload``, again after each ``throttled`` refusal (the bulk budget beside a
    call; the channel waits ``retry_after_ms`` itself)."""
    while True:
        try:
            reply: dict[str, Any] = await ch.send(payload)
            return reply
        except ChannelThrottled:
            pass


async def test_a_real_node_forgets_a_stalled_send_in_pieces(nursery: trio.Nursery) -> None:
    """End to end: a client that sends a first piece and no more is told ``pieces_expired``
    by the node's watchdog, and ``/status`` counts the send, then none; its connection and
    channel go on."""
    server = await serve_node(nursery, mux=mux.MuxConfig(pieces_idle_s=0.4))
    async with (
        connect(server.url, "bob") as bob,
        trio_websocket.open_websocket_url(ws_url(server.url, "alice")) as ws,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        assert (await recv(ws))["event"] == "connected"
        await send(ws, action="open", target="bob", ref="o")
        cid = (await recv_until(ws, lambda m: m.get("ref") == "o"))["channel_id"]
        await ws.send_message(_send(cid, 7, b"x" * 1000, 0, 2))
        status = (await http.get("/api/mux/status")).json()
        assert status["pieces"]["sends"] == 1 and status["pieces"]["bytes"] == SEND_HELD_BYTES + 1000 + PIECE_HELD_BYTES
        start = trio.current_time()
        err = await recv_until(ws, lambda m: "error" in m, timeout=5.0)
        assert err["error"] == "pieces_expired" and err["ref"] == 7 and err["channel_id"] == cid, err
        assert 0.3 <= trio.current_time() - start < 3.0
        assert (await http.get("/api/mux/status")).json()["pieces"]["sends"] == 0
        await ws.send_message(_send(cid, 8, b"whole"))  # the connection and channel go on
        ack = await recv_until(ws, lambda m: m.get("ref") == 8)
        assert ack["event"] == "frame_ack"
        with trio.fail_after(5):
            frame = await (await bob.accept()).receive()
        assert frame["payload"] == b"whole"  # only the whole send became a frame


@pytest.fixture
async def server(nursery: trio.Nursery) -> ServeInfo:
    return await serve_node(nursery)


async def test_a_call_frame_goes_between_the_pieces_of_a_large_payload(server: ServeInfo) -> None:
    payload = os.urandom((1 << 20) - 4096)  # whole, it fits in one message with its header
    async with connect(server.url, "bob") as bob, connect(server.url, "alice") as alice:
        written: list[bytes] = []
        ws = alice._ws
        stock = ws.send_message
        second = trio.Event()

        async def counted(message: str | bytes) -> None:
            await stock(message)
            if isinstance(message, bytes) and len(message) > PART_BYTES // 2:
                written.append(message)
                if len(written) == 2:
                    second.set()

        ws.send_message = counted  # type: ignore[method-assign]
        bulk = await alice.open("bob", "stream")
        received = await bob.accept()
        # without a call the payload goes whole
        assert (await bulk.send(payload))["disposition"] == "delivered"
        assert len(written) == 1 and len(written[0]) > len(payload)
        written.clear()
        call = await alice.open("bob", "call:voice")
        answered: list[str] = []

        async def send_bulk() -> None:
            await bulk.send(payload)
            answered.append("payload")

        async def send_call_frame() -> None:
            await second.wait()  # two pieces are out: the call's frame goes next
            await call.send(b"v" * 200)
            answered.append("call")

        with trio.fail_after(20):
            async with trio.open_nursery() as senders:
                senders.start_soon(send_bulk)
                senders.start_soon(send_call_frame)
        assert answered == ["call", "payload"]
        pieces = [(h, p) for h, p in map(unpack_binary, written) if h.get("parts")]
        assert len(pieces) == -(-len(payload) // PART_BYTES)
        assert [h["part"] for h, _ in pieces] == list(range(len(pieces)))
        assert b"".join(p for _, p in pieces) == payload
        with trio.fail_after(10):
            frames = [await received.receive() for _ in range(2)]
        assert [f["payload"] for f in frames] == [payload, payload]  # whole, and it verifies
        for frame in frames:
            bob.verify(frame)


def _binary_written(conn: Any) -> list[bytes]:
    """The binary messages ``conn`` (a ``mux.client`` connection) writes from now on."""
    written: list[bytes] = []
    stock = conn._ws.send_message

    async def counted(message: str | bytes) -> None:
        if isinstance(message, bytes):
            written.append(message)
        await stock(message)

    conn._ws.send_message = counted
    return written


async def _pieces_of_one_send(
    server: ServeInfo, payload: bytes, *, part_acks: bool = True
) -> list[tuple[int, int, int]]:
    """Send ``payload`` beside a call from ``mux.client``; (part, parts, bytes) of each piece
    written, after checking the payload arrived whole and verified."""
    async with connect(server.url, "bob") as bob, connect(server.url, "alice") as alice:
        alice.part_acks = part_acks and alice.part_acks
        written = _binary_written(alice)
        await alice.open("bob", "call:voice")
        await bob.accept()
        bulk = await alice.open("bob", "stream")
        received = await bob.accept()
        with trio.fail_after(20):
            with contextlib.suppress(ChannelThrottled):  # beside the call the node may refuse it
                await bulk.send(payload)
            frame = await received.receive()
        assert frame["payload"] == payload
        bob.verify(frame)
    return [(h["part"], h["parts"], len(p)) for h, p in map(unpack_binary, written) if h.get("parts")]


async def test_a_payload_past_max_parts_pieces_goes_in_fewer_larger_pieces(
    server: ServeInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A payload that would take more than ``MAX_PARTS`` pieces of ``PART_BYTES`` (the node
    refuses more) goes in ``MAX_PARTS`` larger pieces, and arrives whole."""
    import mux.client

    monkeypatch.setattr(mux.client, "MAX_PARTS", 4)  # the wire's 4,096 would need a 16 MiB payload
    payload = os.urandom(9 * PART_BYTES + 100)
    step = -(-len(payload) // 4)
    assert await _pieces_of_one_send(server, payload) == [
        (0, 4, step),
        (1, 4, step),
        (2, 4, step),
        (3, 4, len(payload) - 3 * step),
    ]


async def test_pieces_are_larger_for_a_node_that_does_not_confirm_them(server: ServeInfo) -> None:
    """Without ``part_acks`` no window keeps small pieces off the uplink's queue: they go in
    ``UNCONFIRMED_PART_BYTES`` pieces; with it, in ``PART_BYTES`` pieces."""
    payload = os.urandom(2 * UNCONFIRMED_PART_BYTES + 100)
    unconfirmed = await _pieces_of_one_send(server, payload, part_acks=False)
    assert [size for *_, size in unconfirmed] == [UNCONFIRMED_PART_BYTES] * 2 + [100]
    confirmed = await _pieces_of_one_send(server, payload)
    assert len(confirmed) == -(-len(payload) // PART_BYTES) and {size for *_, size in confirmed[:-1]} == {PART_BYTES}


async def test_a_call_frame_waits_for_at_most_the_piece_being_written(server: ServeInfo) -> None:
    """Four tasks upload in pieces at once; a call frame sent meanwhile is written next, ahead
    of the other uploads' waiting pieces (in arrival order it would wait for three more)."""
    async with connect(server.url, "bob") as bob, connect(server.url, "alice") as alice:
        written: list[str] = []  # the channel of each binary message, in the order written
        ws = alice._ws
        stock = ws.send_message
        going = trio.Event()

        async def counted(message: str | bytes) -> None:
            await stock(message)
            if isinstance(message, bytes):
                written.append(unpack_binary(message)[0]["channel_id"])
                if len(written) >= 8:
                    going.set()

        ws.send_message = counted  # type: ignore[method-assign]
        call = await alice.open("bob", "call:voice")
        await bob.accept()
        bulks = [await alice.open("bob", "stream") for _ in range(4)]
        for _ in bulks:
            await bob.accept()
        payload = os.urandom(256 << 10)
        behind: list[int] = []

        async def upload(ch: Any) -> None:
            with contextlib.suppress(ChannelThrottled):  # beside the call the node may refuse it: written all the same
                await ch.send(payload)

        async def call_frame() -> None:
            await going.wait()
            before = len(written)
            await call.send(b"v" * 200)
            behind.append(written.index(call.id) - before)

        with trio.fail_after(20):
            async with trio.open_nursery() as senders:
                for ch in bulks:
                    senders.start_soon(upload, ch)
                senders.start_soon(call_frame)
        assert written.count(call.id) == 1 and len(written) == 1 + 4 * (256 << 10) // PART_BYTES
        assert behind[0] <= 1, f"{behind[0]} messages written after the call frame's send began, before it"


async def test_mux_client_sends_whole_what_the_node_has_no_room_to_take_in_pieces(nursery: trio.Nursery) -> None:
    """On a node whose pieces are at their node-wide bound, ``mux.client``'s send in pieces
    (it holds a call) is refused part-way with ``pieces_full``; the client stops writing its
    pieces and sends the payload whole: one frame, exactly the payload, and no error left
    over from the pieces already on their way."""
    bound = 3 * PART_BYTES  # room for the first pieces of one send, not all of them
    server = await serve_node(nursery, mux=mux.MuxConfig(pieces_max_bytes=bound))
    payload = os.urandom(8 * PART_BYTES)
    async with connect(server.url, "bob") as bob, connect(server.url, "alice") as alice:
        written: list[dict[str, Any]] = []
        stock = alice._ws.send_message

        async def counted(message: str | bytes) -> None:
            await stock(message)
            if isinstance(message, bytes):
                written.append(unpack_binary(message)[0])

        alice._ws.send_message = counted  # type: ignore[method-assign]
        await alice.open("bob", "call:voice")  # a call: large payloads go in pieces
        bulk = await alice.open("bob", "stream")
        await bob.accept()
        received = await bob.accept()
        with trio.fail_after(10):
            ack = await bulk.send(payload)
        assert ack["event"] == "frame_ack" and ack["disposition"] == "delivered"
        pieced = [h for h in written if "parts" in h]
        assert 1 <= len(pieced) < 8 and pieced[0]["part"] == 0  # refused part-way
        assert [h for h in written if "parts" not in h] == [
            {"action": "send", "channel_id": bulk.id, "ref": ack["ref"]}
        ]
        with trio.fail_after(5):
            frame = await received.receive()
        assert frame["payload"] == payload
        bob.verify(frame)
        assert await alice.ping() >= 0  # every answer to the pieces has come by now
        assert list(alice.errors) == []
        assert (await _status(server))["pieces"]["sends"] == 0


async def test_a_payload_that_fits_only_in_pieces_keeps_the_nodes_refusal(nursery: trio.Nursery) -> None:
    """A payload of exactly ``max_message_bytes`` fits in pieces but not in one message with
    its header: refused ``pieces_full``, ``mux.client`` raises that refusal rather than try
    a whole send the node could not take."""
    server = await serve_node(nursery, max_message_bytes=4 * PART_BYTES, mux=mux.MuxConfig(pieces_max_bytes=PART_BYTES))
    async with connect(server.url, "bob") as bob, connect(server.url, "alice") as alice:
        await alice.open("bob", "call:voice")
        bulk = await alice.open("bob", "stream")
        await bob.accept()
        with trio.fail_after(10), pytest.raises(mux.MuxError) as refused:
            await bulk.send(os.urandom(4 * PART_BYTES))
        assert refused.value.code == "pieces_full"
        assert (await bulk.send(b"small"))["event"] == "frame_ack"  # the channel goes on


async def _status(server: ServeInfo) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.url) as http:
        status: dict[str, Any] = (await http.get("/api/mux/status")).json()
    return status


async def test_a_piece_that_asks_is_confirmed_as_it_arrives(nursery: trio.Nursery) -> None:
    """A piece with ``"part_ack": true`` is answered ``part_ack`` (its ``ref``, channel and
    ``part``) once the node took it; the last piece is answered as the send, and pieces that
    do not ask stay silent. ``connected`` says the node does it (``part_acks``)."""
    async with mux.open_mux(agent="node") as node:
        sender, receiver = started_sessions(node, nursery, "alice", "bob")
        assert orjson.loads(sender.hello())["part_acks"] is True
        (opened,) = outbox_events(sender.handle(orjson.dumps({"action": "open", "target": "bob"}).decode()))
        cid = opened["channel_id"]

        def piece(ref: int, part: int, parts: int, **extra: Any) -> list[dict[str, Any]]:
            header = {"action": "send", "channel_id": cid, "ref": ref, "part": part, "parts": parts, **extra}
            return outbox_events(sender.handle(pack_binary(header, bytes([part]) * 10)))

        for part in range(3):
            confirmed = {"event": "part_ack", "channel_id": cid, "part": part, "ref": 1}
            assert piece(1, part, 4, part_ack=True) == [confirmed]
        (answer,) = piece(1, 3, 4, part_ack=True)
        assert answer["event"] == "frame_ack" and answer["ref"] == 1
        assert piece(2, 0, 2) == [] and piece(2, 1, 2, part_ack=False)[0]["event"] == "frame_ack"
        for bad in ("yes", 1, None):
            header = {"action": "send", "channel_id": cid, "ref": 3, "part": 0, "parts": 2, "part_ack": bad}
            replies = outbox_events(sender.handle(pack_binary(header, b"x")))
            if bad is None:  # null: not asked
                assert replies == []
                continue
            (err,) = replies
            assert err["error"] == "bad_request" and err["ref"] == 3 and "part_ack" in err["detail"]
        whole = {"action": "send", "channel_id": cid, "ref": 4, "part_ack": True}
        (err,) = outbox_events(sender.handle(pack_binary(whole, b"w")))
        assert err["error"] == "bad_request" and "in pieces" in err["detail"]
        frames = [unpack_binary(m) for m in iter(receiver.outbox.get_nowait, None) if isinstance(m, bytes)]
        assert [p for _, p in frames] == [b"".join(bytes([i]) * 10 for i in range(4)), b"\0" * 10 + b"\1" * 10]
        assert all("part_ack" not in h for h, _ in frames)


async def test_pieces_through_a_slow_uplink_stay_within_the_clients_window(nursery: trio.Nursery) -> None:
    """Through a 1 MB/s link (the bench's shaping proxy), ``mux.client`` holding a call sends
    a 256 KiB payload in pieces: each piece but the last is confirmed, the bytes in flight
    never pass the window (or one piece), the window closes as the queue at the link grows
    past its target (at 1 MB/s a 4 KiB piece alone takes 4 ms to cross; the target is 5 ms),
    and the payload arrives whole and verified."""
    from tests.bench.uplink import SlowUplink

    server = await serve_node(nursery)
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    link = SlowUplink(port, 1_000_000, 32 << 10)
    await nursery.start(link.run)
    slow_url = f"http://127.0.0.1:{link.listen_port}"
    payload = os.urandom(256 << 10)
    async with connect(slow_url, "alice") as alice, connect(server.url, "bob") as bob:
        assert alice.part_acks
        call = await alice.open("bob", "call:voice")
        await bob.accept()
        bulk = await alice.open("bob", "stream")
        received = await bob.accept()
        seen: list[tuple[int, int, float]] = []  # each piece written: bytes in flight, its own, the window
        confirmed = 0
        stock_write, stock_ack = alice._write, alice._on_part_ack

        async def write(message: str | bytes, *, urgent: bool = False) -> None:
            if isinstance(message, bytes):
                header, data = unpack_binary(message)
                if header.get("parts"):
                    seen.append((alice.uplink.in_flight, len(data), alice.uplink.window))
            await stock_write(message, urgent=urgent)

        def on_ack(msg: dict[str, Any]) -> None:
            nonlocal confirmed
            confirmed += 1
            stock_ack(msg)

        alice._write = write  # type: ignore[method-assign]
        alice._on_part_ack = on_ack  # type: ignore[method-assign]
        with trio.fail_after(20):
            with contextlib.suppress(ChannelThrottled):  # beside the call the node may refuse it
                await bulk.send(payload)
            frame = await received.receive()
        parts = len(payload) // PART_BYTES
        assert confirmed == parts - 1 and len(seen) == parts
        assert all(flying == 0 or flying + size <= window for flying, size, window in seen), seen
        windows = [window for _, _, window in seen]
        assert any(b < a for a, b in itertools.pairwise(windows)), windows  # it closed as the queue grew
        assert alice.uplink.in_flight == 0 and not alice._in_flight
        assert frame["payload"] == payload
        bob.verify(frame)
        assert call.is_open


async def test_pieces_go_on_when_confirmations_stop(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    """Confirmations that stop coming (lost, or a node that stopped sending them) hold a send
    in pieces up for ``PART_ACK_TIMEOUT_S`` at a time, not for good: what was in flight counts
    as lost and the window halves."""
    import mux.client

    monkeypatch.setattr(mux.client, "PART_ACK_TIMEOUT_S", 0.05)
    server = await serve_node(nursery)
    payload = os.urandom(128 << 10)
    async with connect(server.url, "alice") as alice, connect(server.url, "bob") as bob:
        await alice.open("bob", "call:voice")
        await bob.accept()
        bulk = await alice.open("bob", "stream")
        received = await bob.accept()
        alice._on_part_ack = lambda msg: None  # type: ignore[method-assign]
        with trio.fail_after(20):
            with contextlib.suppress(ChannelThrottled):
                await bulk.send(payload)
            frame = await received.receive()
        assert frame["payload"] == payload
        assert alice.uplink.window == PART_BYTES and alice.uplink.in_flight == 0


async def test_a_send_refused_part_way_stops_waiting_for_room(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send in pieces whose pieces fill the window and are never confirmed, refused
    part-way (``pieces_full``), stops waiting for room at the refusal: it is sent again whole
    at once, not after ``PART_ACK_TIMEOUT_S``."""
    import mux.client

    monkeypatch.setattr(mux.client, "PART_ACK_TIMEOUT_S", 60.0)
    server = await serve_node(nursery, mux=mux.MuxConfig(pieces_max_bytes=PART_BYTES * 3 // 2))
    payload = os.urandom(8 * PART_BYTES)
    async with connect(server.url, "bob") as bob, connect(server.url, "alice") as alice:
        await alice.open("bob", "call:voice")
        bulk = await alice.open("bob", "stream")
        await bob.accept()
        received = await bob.accept()
        alice._on_part_ack = lambda msg: None  # type: ignore[method-assign]  # the window stays full
        with trio.fail_after(5):
            ack = await bulk.send(payload)  # piece 1 is refused: whole, at once
            frame = await received.receive()
        assert ack["event"] == "frame_ack" and frame["payload"] == payload
        assert alice.uplink.in_flight == 0 and not alice._in_flight
