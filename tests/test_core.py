"""The Mux: quick start, delivery both ways, isolation, limits, backend failures."""

from __future__ import annotations

import re
from typing import Any

import pytest
import trio
import trio.lowlevel

import mux
from backends import register_backend
from backends.base import Disposition
from mux.channel import ChannelContext
from mux.frames import Frame


async def test_quick_start_reads_naturally_in_trio() -> None:
    async with mux.open_mux(agent="my_agent") as m:
        ch = await m.open(target="gemini", intent="chat")
        assert re.fullmatch(r"ch-[0-9a-f]{32}", ch.id)
        frame = await ch.send({"text": "Hello"})
        assert isinstance(frame, mux.Frame)
        assert frame.seq == 1 and len(frame.tbz_hash) == 64 and len(frame.sig) == 128
        assert frame.prev == ch.tbz_hash == ch.open_frame.tbz_hash
        voice = await m.open(target="vandemeent", intent="call:voice", metadata={"codec": "opus", "samplerate": 48000})
        assert voice.route["backend"] == "voice"
        assert voice.route["description"] == "Voice call (SIP/Voice Pipeline)"
        assert voice.metadata == {"codec": "opus", "samplerate": 48000}
        await ch.close()
        await voice.close(reason="call_ended")
        assert voice.close_reason == "call_ended" and voice.state == "closed"
        status = m.status()
        assert status["agent"] == "my_agent" and status["channels_total"] == 2 and status["channels_open"] == 0
        assert len(m.intents()) == 13
        m.register_intent("iot:sensor", backend="mqtt", description="IoT sensor data")
        assert len(m.intents()) == 14
        mux.verify_chain(await m.export(ch.id), m.public_key)
        mux.verify_chain(await m.export(voice.id), m.public_key)


async def test_agent_names_normalized_as_in_seed(node: mux.Mux) -> None:
    ch = await node.open(target="Gemini.AINT", intent="chat", agent="  Root_AI.aint ")
    assert (ch.agent, ch.target) == ("root_ai", "gemini")
    with pytest.raises(mux.BadRequest):
        await node.open(target="bad name!", intent="chat", agent="a")
    with pytest.raises(mux.BadRequest):
        await node.open(target="a", intent="chat", agent="a")


async def test_delivery_between_two_local_agents_both_ways(node: mux.Mux) -> None:
    async with node.attach("alice") as alice, node.attach("bob") as bob:
        a_ch = await alice.open("bob", "stream", {"topic": "t"})
        b_ch = await bob.accept()
        assert (b_ch.id, b_ch.local, b_ch.peer, b_ch.metadata) == (a_ch.id, "bob", "alice", {"topic": "t"})
        for i in range(20):
            await a_ch.send({"n": i})
        await b_ch.send(b"\x01\x02binary")
        for i in range(5):
            await b_ch.send({"reply": i})
        got = [await b_ch.receive() for _ in range(20)]
        assert [f.payload for f in got] == [{"n": i} for i in range(20)]
        assert all(f.sender == "alice" and f.target == "bob" for f in got)
        back = [await a_ch.receive() for _ in range(6)]
        assert back[0].payload == b"\x01\x02binary" and back[0].enc == "bytes"
        assert [f.payload for f in back[1:]] == [{"reply": i} for i in range(5)]
        # one chain across both directions, seq strictly increasing in each direction
        assert [f.seq for f in got] == list(range(1, 21))
        assert [f.seq for f in back] == list(range(21, 27))
        close = await b_ch.close("done")
        assert close.kind == "close" and close.sender == "bob"
        assert [f async for f in a_ch] == []  # iteration ends at close
        assert a_ch.close_reason == "done"
        report = mux.verify_chain(await node.export(a_ch.id), node.public_key)
        assert report.frames == 28 and report.closed


async def test_target_attaching_later_is_told_of_open_channels(node: mux.Mux) -> None:
    ch = await node.open("late", "stream", agent="early")
    dropped = await ch.post({"lost": True})
    assert dropped.disposition is Disposition.DROPPED and not dropped.delivered
    async with node.attach("late") as late:
        got = await late.accept()
        assert got.id == ch.id
        r = await ch.post({"n": 1})
        assert r.delivered
        f = await got.receive()
        assert f.payload == {"n": 1} and f.seq == 2  # the gap shows the dropped frame


async def test_third_agent_sees_and_touches_nothing(node: mux.Mux) -> None:
    async with node.attach("a") as a, node.attach("b") as b, node.attach("x") as x:
        ch = await a.open("b", "chat")
        await ch.send({"secret": 1})
        assert (await (await b.accept()).receive()).payload == {"secret": 1}
        assert x.accept_nowait() is None
        assert node.channels(agent="x") == []
        for attempt in (
            lambda: x.channel(ch.id),
            lambda: node.handle(ch.id, "x"),
            lambda: node.channel_state(ch.id, caller="x"),
        ):
            with pytest.raises(mux.ChannelForbidden):
                attempt()
        with pytest.raises(mux.ChannelForbidden):
            await node.close_channel(ch.id, by="x")
        with pytest.raises(mux.ChannelForbidden):
            await node.export(ch.id, caller="x")
        with pytest.raises(mux.ChannelNotFound):
            x.channel("ch-" + "0" * 32)
        assert ch.state == "open"
        assert [c["channel_id"] for c in node.channels(agent="a")] == [ch.id]


async def test_frames_never_cross_channels_under_concurrency(node: mux.Mux) -> None:
    n_pairs, n_channels, n_frames = 4, 8, 40
    errors: list[str] = []

    async with trio.open_nursery() as nursery:
        eps = {}
        for p in range(n_pairs):
            eps[f"s{p}"] = node.attach(f"s{p}")
            eps[f"r{p}"] = node.attach(f"r{p}")

        async def receiver(ep: mux.Endpoint, count: int) -> None:
            async with trio.open_nursery() as inner:
                for _ in range(count):
                    ch = await ep.accept()
                    inner.start_soon(check, ch)

        async def check(ch: mux.Channel) -> None:
            seen = []
            async for f in ch:
                if f.payload["ch"] != ch.id or f.channel_id != ch.id or f.target != ch.local:
                    errors.append(f"{ch.id} got {f.payload}")
                seen.append(f.payload["i"])
            if seen != list(range(n_frames)):
                errors.append(f"{ch.id} saw {seen[:5]}... ({len(seen)})")

        async def sender(ep: mux.Endpoint, target: str) -> None:
            async def one() -> None:
                ch = await ep.open(target, "stream")
                for i in range(n_frames):
                    await ch.send({"ch": ch.id, "i": i})
                    if i % 7 == 0:
                        await trio.lowlevel.checkpoint()
                await ch.close()

            async with trio.open_nursery() as inner:
                for _ in range(n_channels):
                    inner.start_soon(one)

        for p in range(n_pairs):
            nursery.start_soon(receiver, eps[f"r{p}"], n_channels)
            nursery.start_soon(sender, eps[f"s{p}"], f"r{p}")
    assert errors == []
    assert node.status()["frames"] == n_pairs * n_channels * n_frames


async def test_slow_receiver_makes_sender_wait_or_refuses() -> None:
    async with mux.open_mux(agent="n", channel_buffer_frames=4) as m, m.attach("r") as r:
        ch = await m.open("r", "stream", agent="s")
        peer = await r.accept()
        for i in range(4):
            await ch.send(i)
        with pytest.raises(mux.ChannelFull) as info:
            await ch.send(99, wait=False)
        assert info.value.code == "receiver_full"
        assert (await m.export(ch.id))[-1].seq == 4  # the refused frame was never chained

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ch.send, 4)  # waits for room
            await trio.sleep(0.01)
            assert (await peer.receive()).payload == 0
        assert [(await peer.receive()).payload for _ in range(4)] == [1, 2, 3, 4]


async def test_channel_limit_per_agent() -> None:
    async with mux.open_mux(agent="n", max_channels_per_agent=3) as m:
        chans = [await m.open("t", "chat", agent="a") for _ in range(3)]
        with pytest.raises(mux.ChannelLimit) as info:
            await m.open("t", "chat", agent="a")
        assert info.value.code == "channel_limit"
        await m.open("t", "chat", agent="other")  # the limit is per agent
        await chans[0].close()
        await m.open("t", "chat", agent="a")  # a closed channel frees its slot


async def test_default_limit_is_32() -> None:
    async with mux.open_mux() as m:
        for _ in range(32):
            await m.open("t", "chat", agent="a")
        with pytest.raises(mux.ChannelLimit):
            await m.open("t", "chat", agent="a")


class _Exploding:
    """A backend that fails in run() or in on_frame(), as told by metadata."""

    name = "exploding"

    def __init__(self, m: Any) -> None:
        pass

    def check_open(self, ctx: ChannelContext) -> None:
        if ctx.metadata.get("refuse"):
            raise mux.ChannelError("refused by backend", code="refused")

    async def run(self, ctx: ChannelContext) -> None:
        if ctx.metadata.get("fail") == "run":
            await trio.sleep(0.01)
            raise RuntimeError("kaboom")

    def admit(self, ctx: ChannelContext, sender: str, size: int) -> None:
        pass

    def on_frame(self, ctx: ChannelContext, frame: Frame) -> Disposition:
        if ctx.metadata.get("fail") == "frame":
            raise ValueError("bad frame day")
        return Disposition.DELIVERED if ctx.deliver(frame) else Disposition.DROPPED

    def on_close(self, ctx: ChannelContext, reason: str) -> None:
        pass


async def test_backend_failure_ends_only_its_own_channel(node: mux.Mux) -> None:
    register_backend("exploding", _Exploding)
    node.register_intent("boom", backend="exploding")
    async with node.attach("b") as b:
        healthy = await node.open("b", "call:voice", agent="a")
        in_run = await node.open("b", "boom", {"fail": "run"}, agent="a")
        in_frame = await node.open("b", "boom", {"fail": "frame"}, agent="a")
        with pytest.raises(mux.ChannelError) as info:
            await node.open("b", "boom", {"refuse": True}, agent="a")
        assert info.value.code == "refused"

        peers = {c.id: c for c in [await b.accept() for _ in range(3)]}
        with trio.fail_after(2):
            assert [f async for f in peers[in_run.id]] == []  # ends when the backend fails
        assert in_run.close_reason == "backend_error"
        assert "kaboom" in in_run.close_frame.payload["detail"]  # type: ignore[union-attr]

        with pytest.raises(mux.ChannelError) as info:
            await in_frame.send({"x": 1})
        assert info.value.code == "backend_error"
        assert in_frame.state == "closed"

        await healthy.send(b"still fine")
        assert healthy.state == "open"
        for ch_id in (in_run.id, in_frame.id):
            assert mux.verify_chain(await node.export(ch_id), node.public_key).closed


async def test_shutdown_closes_channels_with_signed_close_frames() -> None:
    async with mux.open_mux(agent="n") as m:
        ch = await m.open("t", "chat", agent="a")
        pk = m.public_key
    assert ch.state == "closed" and ch.close_reason == "mux_shutdown"
    assert mux.verify_chain(await m.export(ch.id), pk).closed


async def test_key_persists_in_data_dir(tmp_path: Any) -> None:
    async with mux.open_mux(data_dir=tmp_path) as m1:
        k1 = m1.public_key
    async with mux.open_mux(data_dir=tmp_path) as m2:
        assert m2.public_key == k1
    assert (tmp_path / "node.key").stat().st_mode & 0o077 == 0


class _Picky(_Exploding):
    """Refuses payloads by content in check_frame, before they are chained."""

    name = "picky"

    def check_frame(self, ctx: ChannelContext, draft: Any) -> None:
        if draft.payload == {"bad": True}:
            raise mux.ChannelError("no bad payloads", code="bad_payload")


async def test_check_frame_refuses_before_chaining(node: mux.Mux) -> None:
    register_backend("picky", _Picky)
    node.register_intent("picky", backend="picky")
    ch = await node.open("b", "picky", agent="a")
    await ch.send({"ok": 1})
    with pytest.raises(mux.ChannelError) as info:
        await ch.send({"bad": True})
    assert info.value.code == "bad_payload" and ch.state == "open"
    await ch.send({"ok": 2})
    assert [f.seq for f in await node.export(ch.id)] == [0, 1, 2]  # no gap where the refusal was
    mux.verify_chain(await node.export(ch.id), node.public_key, require_open=True)
