"""Receive windows end to end (docs/protocol.md "Receive windows"): a real node, ``mux.client``
at both ends. A channel the receiving application does not read fills only its own window
and queue (its sender is refused ``receiver_full``) while the connection's other channels, a
call among them, and the answers to its own requests go on; read later, it gives every
acknowledged frame, in order. Bad windows and credits fail that message only."""

from __future__ import annotations

import contextlib

import orjson
import pytest
import trio

import mux
from mux.client import connect, open_ws
from mux.core import MuxConfig
from mux.errors import ChannelFull
from mux.wire import CHUNK_BYTES, MAX_WINDOW, pack_binary

from .nodes import outbox_events, serve_node, started_sessions
from .wsutil import open_cuttable_ws, recv, send, ws_url

WINDOW = 4
QUEUE = 8
"""The receiver's window and the node's queue per channel (``channel_buffer_frames``)."""


async def test_an_unread_channel_holds_up_nothing_else(nursery: trio.Nursery) -> None:
    info = await serve_node(nursery, mux=MuxConfig(channel_buffer_frames=QUEUE))
    async with connect(info.url, "tx") as tx, connect(info.url, "rx", buffer_frames=WINDOW) as rx:
        assert rx.receive_window == WINDOW
        unread = await tx.open("rx", "stream")
        other = await tx.open("rx", "stream")
        call = await tx.open("rx", "call:voice")
        peers = {ch.id: ch for ch in [await rx.accept() for _ in range(3)]}
        acked = []
        with trio.fail_after(10):
            for n in range(WINDOW + QUEUE + 5):
                try:
                    await unread.send({"n": n})
                    acked.append(n)
                except ChannelFull as exc:
                    assert exc.code == "receiver_full"
                    break
            assert acked == list(range(WINDOW + QUEUE)), "the window, then the channel's own queue"
            for n in range(3 * WINDOW):  # the others flow, however far past the window
                await other.send({"other": n})
                await call.send(n.to_bytes(2, "big") * 80)
                assert (await peers[other.id].receive())["payload"] == {"other": n}
                assert (await peers[call.id].receive())["payload"] == n.to_bytes(2, "big") * 80
            assert await rx.ping() < 5  # and so do the answers to the receiver's own requests
            got = [(await peers[unread.id].receive())["payload"]["n"] for _ in acked]
        assert got == acked, "read later, every acknowledged frame, in order"
        await unread.send({"n": "after"})  # room again
        assert (await peers[unread.id].receive())["payload"] == {"n": "after"}


async def test_a_closed_channel_closes_after_its_last_frame_past_the_window(nursery: trio.Nursery) -> None:
    info = await serve_node(nursery, mux=MuxConfig(channel_buffer_frames=QUEUE))
    async with connect(info.url, "tx") as tx, connect(info.url, "rx", buffer_frames=WINDOW) as rx:
        ch = await tx.open("rx", "stream")
        peer = await rx.accept()
        for n in range(WINDOW + 3):
            await ch.send(n)
        await ch.close()
        with trio.fail_after(10):
            assert [frame["payload"] async for frame in peer] == list(range(WINDOW + 3))
        assert peer.closed_reason == "closed"


@pytest.mark.parametrize("query", ["&window=0", "&window=x", "&window=65537", "&window=-3"])
async def test_a_bad_window_is_refused_clearly(nursery: trio.Nursery, query: str) -> None:
    info = await serve_node(nursery)
    async with open_ws(ws_url(info.url, "rx") + query) as ws:
        refusal = await recv(ws)
        assert refusal["error"] == "bad_request" and "window" in refusal["detail"]


async def test_bad_credits_fail_that_message_only(nursery: trio.Nursery) -> None:
    info = await serve_node(nursery)
    async with open_ws(ws_url(info.url, "plain")) as plain, open_ws(ws_url(info.url, "rx") + "&window=2") as rx:
        assert "window" not in await recv(plain)
        assert (await recv(rx))["window"] == 2
        await send(plain, action="credit", channel_id="ch-" + "0" * 32, frames=1, ref=1)
        refusal = await recv(plain)
        assert (refusal["error"], refusal["ref"]) == ("bad_request", 1) and "window" in refusal["detail"]
        for frames in (0, -1, True, "2"):
            await send(rx, action="credit", channel_id="ch-" + "0" * 32, frames=frames, ref=2)
            assert (await recv(rx))["error"] == "bad_request"
        await send(rx, action="credit", channel_id="ch-" + "0" * 32, frames=3, ref=3)  # not held: ignored
        await send(rx, action="ping", ref=4)
        assert (await recv(rx))["event"] == "pong"


async def test_a_resumed_channel_replays_within_its_window(nursery: trio.Nursery) -> None:
    """What a windowed connection missed while away is replayed a window at a time: the
    replay waits for credit like live frames do."""
    info = await serve_node(nursery, resume_grace_s=5.0)
    async with connect(info.url, "tx") as tx:
        url = ws_url(info.url, "rx") + "&resumable=1&window=2"
        async with open_cuttable_ws(url) as (rx, stream):
            token = (await recv(rx))["resume_token"]
            ch = await tx.open("rx", "stream")
            assert (await recv(rx))["event"] == "channel_opened"
            await trio.aclose_forcefully(stream)  # cut before anything was sent
        for n in range(5):
            await ch.send(n)
        async with open_ws(url) as rx:
            assert (await recv(rx))["window"] == 2
            await send(rx, action="resume", token=token, last={ch.id: 0}, ref="r")
            assert (await recv(rx))["event"] == "resumed"
            got = []
            for _ in range(3):
                frames = [await recv(rx) for _ in range(min(2, 5 - len(got)))]
                got += [f["payload"] for f in frames]
                with trio.move_on_after(0.2):  # nothing more before credit
                    raise AssertionError(f"past the window: {await recv(rx)}")
                await send(rx, action="credit", channel_id=ch.id, frames=len(frames))
            assert got == [0, 1, 2, 3, 4]


async def test_channels_not_yet_accepted_hold_up_nothing_else(nursery: trio.Nursery) -> None:
    """However many channels are opened to a ``mux.client`` connection that has not accepted
    them yet, its reader goes on: the channel it reads and its requests keep flowing."""
    info = await serve_node(nursery)
    async with contextlib.AsyncExitStack() as stack:
        rx = await stack.enter_async_context(connect(info.url, "rx"))
        tx = await stack.enter_async_context(connect(info.url, "tx"))
        openers = [await stack.enter_async_context(connect(info.url, f"o{i}")) for i in range(3)]
        ch = await tx.open("rx", "stream")
        peer = await rx.accept()
        with trio.fail_after(10):
            for opener in openers:
                for _ in range(30):
                    await opener.open("rx", "stream")  # 90 channels nobody accepts yet
            await ch.send("still flowing")
            assert (await peer.receive())["payload"] == "still flowing"
            assert await rx.ping() < 5
            accepted = [await rx.accept() for _ in range(90)]
        assert len({c.id for c in accepted}) == 90


async def test_a_channel_closed_before_it_is_accepted_with_nothing_to_read_is_forgotten(
    nursery: trio.Nursery,
) -> None:
    """Channels opened to an agent and closed again before it accepts them, with nothing
    for it to read, do not pile up waiting for accept(); one with frames still waits."""
    info = await serve_node(nursery)
    async with connect(info.url, "rx") as rx, connect(info.url, "tx") as tx:
        for _ in range(50):
            await (await tx.open("rx", "stream")).close()
        kept = await tx.open("rx", "stream")
        await kept.send("read me")
        await kept.close()
        with trio.fail_after(5):
            while len(rx._incoming) > 1 or not rx._incoming or rx._incoming[0].is_open:  # noqa: ASYNC110
                await trio.sleep(0.01)  # until the node's events have all arrived
            ch = await rx.accept()
        assert ch.id == kept.id and [f["payload"] async for f in ch] == ["read me"]
        assert not rx._incoming


async def test_channels_past_the_accept_backlog_are_closed_at_once(nursery: trio.Nursery) -> None:
    """Past ``accept_backlog`` channels waiting for accept(), a new one is closed at once
    (reason ``accept_backlog_full``, which its opener sees); those waiting are kept."""
    info = await serve_node(nursery)
    async with connect(info.url, "rx", accept_backlog=3) as rx, connect(info.url, "tx") as tx:
        opened = [await tx.open("rx", "stream") for _ in range(5)]
        with trio.fail_after(5):
            for ch in opened[3:]:
                while ch.is_open:  # noqa: ASYNC110  (the close comes from the receiver, unasked)
                    await trio.sleep(0.01)
                assert ch.closed_reason == "accept_backlog_full"
            accepted = [await rx.accept() for _ in range(3)]
        assert [ch.id for ch in accepted] == [ch.id for ch in opened[:3]]
        assert all(ch.is_open for ch in opened[:3]) and not rx._incoming


async def test_a_client_inbox_larger_than_a_window_may_be_asks_for_the_largest(nursery: trio.Nursery) -> None:
    info = await serve_node(nursery)
    async with connect(info.url, "rx", buffer_frames=MAX_WINDOW + 1) as rx:
        assert rx.receive_window == MAX_WINDOW


@pytest.mark.parametrize("window", [None, 1], ids=["no-window", "window-1"])
async def test_large_frames_for_a_stuck_receiver_are_held_to_the_same_bound(window: int | None) -> None:
    """What the node holds for a channel whose receiver takes nothing is bounded in pieces,
    windowed or not: its queue holds ``channel_buffer_frames`` messages, a large frame
    counting one per 16 KiB piece (one frame may go past it), so large frames do not make
    the bound ``channel_buffer_frames`` times the largest frame (256 x 1 MiB by default)."""
    frame_bytes = 256 << 10
    pieces = frame_bytes // CHUNK_BYTES
    async with mux.open_mux(agent="node", channel_buffer_frames=QUEUE) as node, trio.open_nursery() as nursery:
        (sender,) = started_sessions(node, nursery, "alice")
        options = {} if window is None else {"window": window}
        (receiver,) = started_sessions(node, nursery, "bob", **options)
        (opened,) = outbox_events(sender.handle(orjson.dumps({"action": "open", "target": "bob"}).decode()))
        cid = opened["channel_id"]
        accepted = 0
        for n in range(40):  # bob's socket takes nothing: the node holds what it accepts
            header = {"action": "send", "channel_id": cid, "ref": n}
            (reply,) = outbox_events(sender.handle(pack_binary(header, bytes(frame_bytes))))
            if reply.get("error") == "receiver_full":
                break
            assert reply["disposition"] == "delivered", reply
            accepted += 1
        else:
            raise AssertionError("never refused")
        held = sum(len(m) for m in iter(receiver.outbox.get_nowait, None) if isinstance(m, bytes))
        sink = receiver._sinks.get(cid)
        held += sum(f.size for f in (sink.pending or ()) if sink is not None)
        # at most the bound's worth of pieces, plus one frame that went past it (plus one in
        # the window: the window's frame is in the queue, the next waits for credit)
        most = (QUEUE - 1) * CHUNK_BYTES + frame_bytes * (1 if window is None else 2)
        print(f"window {window}: {accepted} accepted, {held} bytes held (bound {most})")
        assert held <= most + accepted * 4096, (accepted, held, most)
        assert accepted <= (1 if window is None else 2) + QUEUE // pieces
