"""Signing chain heads: every frame covered by a later signature within N frames or T ms."""

from __future__ import annotations

import pytest
import trio

import mux
from mux.client import open_ws
from mux.core import MuxConfig

from .nodes import serve_node
from .wsutil import recv, send, ws_url


async def test_every_nth_frame_signed_and_the_chain_verifies() -> None:
    async with mux.open_mux(agent="n", sign_every=4, sign_within_ms=60_000) as m, m.attach("b") as b:
        ch = await m.open("b", "stream", agent="a")
        frames = [await ch.send({"i": i}) for i in range(8)]
        assert [bool(f.sig) for f in frames] == [False, False, False, True] * 2
        with pytest.raises(mux.VerificationError) as info:
            mux.verify_frame(frames[0], m.public_key)
        assert info.value.reason == "unsigned"
        mux.verify_frame(frames[3], m.public_key)
        report = mux.verify_chain(await m.export(ch.id), m.public_key)
        assert report.frames == 9
        tampered = [f.to_dict() for f in await m.export(ch.id)]
        tampered[2]["payload"] = {"i": 99}  # an unsigned frame: caught by its hash and the links
        with pytest.raises(mux.VerificationError) as info:
            mux.verify_chain(tampered, m.public_key)
        assert info.value.reason == "bad_hash"
        await ch.send("tail")  # unsigned tail: not yet covered
        with pytest.raises(mux.VerificationError) as info:
            mux.verify_chain(await m.export(ch.id), m.public_key)
        assert info.value.reason == "unsigned_tail"
        peer = await b.accept()
        got = [await peer.receive() for _ in range(9)]
        assert [f.kind for f in got] == ["data"] * 9
        await ch.close()
        assert mux.verify_chain(await m.export(ch.id), m.public_key).closed  # the close frame is signed


async def test_idle_channel_is_sealed_within_the_bound() -> None:
    async with mux.open_mux(agent="n", sign_every=100, sign_within_ms=50) as m, m.attach("b") as b:
        ch = await m.open("b", "stream", agent="a")
        await ch.send("one")
        await ch.send("two")
        with pytest.raises(mux.VerificationError):
            mux.verify_chain(await m.export(ch.id), m.public_key)  # not covered yet
        await trio.sleep(0.2)  # > sign_within_ms plus the sealer's tick (25 ms)
        chain = await m.export(ch.id)
        assert chain[-1].kind == "seal" and chain[-1].payload == {"covers": 2}
        assert mux.verify_chain(chain, m.public_key).last_seq == 3
        peer = await b.accept()
        assert [(await peer.receive()).payload for _ in range(2)] == ["one", "two"]
        with trio.move_on_after(0.05):
            await peer.receive()  # nothing else: the seal is not handed out as data
        assert peer.last_seal is not None and peer.last_seal.seq == 3


async def test_sealer_covers_an_idle_tail_over_websocket(nursery: trio.Nursery) -> None:
    info = await serve_node(nursery, mux=MuxConfig(sign_every=50, sign_within_ms=100))
    m = info.node.require()
    async with open_ws(ws_url(info.url, "a")) as a, open_ws(ws_url(info.url, "b")) as b:
        await recv(a)
        await recv(b)
        await send(a, action="open", target="b", intent="stream")
        cid = (await recv(a))["channel_id"]
        await recv(b)
        for i in range(3):
            await send(a, action="send", channel_id=cid, payload={"i": i})
        acks = [await recv(a) for _ in range(3)]
        assert [ack["sig"] for ack in acks] == ["", "", ""]
        received = [await recv(b) for _ in range(3)]
        seal = await recv(b, timeout=2)  # within sign_within_ms plus the sealer's tick
        assert seal["event"] == "frame" and seal["kind"] == "seal" and seal["sig"]
        assert seal["prev"] == received[-1]["tbz_hash"] and seal["payload"] == {"covers": received[-1]["seq"]}
        chain = [{k: v for k, v in f.items() if k != "event"} for f in received + [seal]]
        opened = (await m.export(cid))[0].to_dict()
        assert mux.verify_chain([opened, *chain], m.public_key).last_seq == seal["seq"]
