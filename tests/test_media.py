"""Call backends (voice: call:voice, webrtc: call:video) on a real node with two connected
agents: signalling relay and call state over REST, media relay, drop-late under a stalled
receiver, refusal of malformed signalling."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import trio

from mux.client import ClientChannel, MuxClient, connect
from mux.errors import MuxError
from mux.server import ServeInfo

T = TypeVar("T")

INTENTS = ["call:voice", "call:video"]


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking client call off the Trio thread (the node runs on it)."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args))


async def info(rest: MuxClient, ch: ClientChannel) -> dict[str, Any]:
    return await in_thread(rest.channel, ch.id)


async def relay(src: ClientChannel, dst: ClientChannel, payload: Any) -> dict[str, Any]:
    """Send ``payload`` on ``src``; the other end receives exactly it. Returns the frame_ack."""
    ack = await src.send(payload)
    frame = await dst.receive()
    assert frame["payload"] == payload and frame["seq"] == ack["seq"]
    return ack


@pytest.mark.parametrize("intent", INTENTS)
async def test_call_signalling_media_and_hangup(server: ServeInfo, intent: str) -> None:
    backend = {"call:voice": "voice", "call:video": "webrtc"}[intent]
    with trio.fail_after(20), MuxClient(server.url, "alice") as rest:
        async with connect(server.url, "alice") as alice, connect(server.url, "bob") as bob:
            a = await alice.open("bob", intent, {"codec": "opus"})
            b = await bob.accept()
            assert a.route["backend"] == backend and b.intent == intent
            state = (await info(rest, a))["backend_state"]
            assert state["state"] == "idle" and state["caller"] is None

            await relay(a, b, {"type": "offer", "sdp": "v=0 offer"})
            state = (await info(rest, a))["backend_state"]
            assert (state["state"], state["caller"], state["callee"]) == ("ringing", "alice", "bob")
            assert isinstance(state["ringing_at"], int) and state["answered_at"] is None

            await relay(b, a, {"type": "ringing"})
            await relay(b, a, {"type": "ice", "candidate": "candidate:1 1 udp 1 127.0.0.1 5000 typ host"})
            await relay(a, b, {"type": "ice", "candidate": "candidate:2 1 udp 1 127.0.0.1 5002 typ host"})
            await relay(b, a, {"type": "answer", "sdp": "v=0 answer"})
            state = (await info(rest, a))["backend_state"]
            assert state["state"] == "answered" and state["answered_at"] >= state["ringing_at"]

            for i in range(5):  # media both ways
                ack = await relay(a, b, bytes([i]) * 160)
                assert ack["disposition"] == "delivered"
                await relay(b, a, bytes([100 + i]) * 320)
            state = (await info(rest, a))["backend_state"]
            assert (state["media_frames"], state["media_bytes"], state["media_dropped"]) == (10, 5 * 480, 0)
            assert state["signals"] == {"offer": 1, "answer": 1, "ice": 2, "ringing": 1, "reject": 0, "hangup": 0}

            await relay(b, a, {"type": "hangup", "reason": "done_talking"})
            assert [f async for f in a] == [] and [f async for f in b] == []
            assert a.closed_reason == b.closed_reason == "done_talking"
            closed = await info(rest, a)
            assert closed["state"] == "closed" and closed["close_reason"] == "done_talking"
            state = closed["backend_state"]
            assert (state["state"], state["end_reason"], state["ended_by"]) == ("ended", "done_talking", "bob")
            assert state["ended_at"] >= state["answered_at"] and state["refused"] == 0
            assert await alice.ping() >= 0 and await bob.ping() >= 0  # both connections carry on


@pytest.mark.parametrize("intent", INTENTS)
async def test_malformed_signalling_is_refused_call_goes_on(server: ServeInfo, intent: str) -> None:
    with trio.fail_after(20), MuxClient(server.url, "bob") as rest:
        async with connect(server.url, "alice") as alice, connect(server.url, "bob") as bob:
            a = await alice.open("bob", intent)
            b = await bob.accept()

            async def refused(ch: ClientChannel, payload: Any) -> str:
                with pytest.raises(MuxError) as exc:
                    await ch.send(payload)
                return exc.value.code

            assert await refused(b, {"type": "answer", "sdp": "x"}) == "answer_before_offer"
            assert await refused(a, {"type": "ice", "candidate": "c"}) == "ice_before_offer"
            assert await refused(a, {"type": "dial"}) == "unknown_signal"
            assert await refused(a, {"type": 7}) == "bad_signal"
            await relay(a, b, {"text": "can you hear me?"})  # JSON without a type: in-call data, relayed
            await relay(b, a, "yes")
            assert await refused(b, {"type": "ringing"}) == "unexpected_ringing"
            await relay(a, b, {"type": "offer", "sdp": "o"})
            assert await refused(a, {"type": "offer", "sdp": "again"}) == "offer_pending"
            assert await refused(a, {"type": "answer", "sdp": "own"}) == "unexpected_answer"
            assert await refused(a, {"type": "reject"}) == "unexpected_reject"
            assert await refused(b, {"type": "hangup", "reason": "Not A Code!"}) == "bad_signal"
            await relay(b, a, {"type": "answer", "sdp": "a"})
            assert await refused(b, {"type": "answer", "sdp": "twice"}) == "unexpected_answer"
            # renegotiation: a new offer from either end, answered by the other
            await relay(b, a, {"type": "offer", "sdp": "o2"})
            await relay(a, b, {"type": "answer", "sdp": "a2"})

            data = await info(rest, b)
            state = data["backend_state"]
            assert data["state"] == "open" and state["state"] == "answered"
            assert state["refused"] == 10 and state["last_refusal"] == "unexpected_answer"
            assert state["signals"]["offer"] == 2 and state["signals"]["answer"] == 2
            assert state["data_messages"] == 2

            await relay(a, b, {"type": "hangup"})
            assert [f async for f in b] == []
            assert b.closed_reason == "call_ended"


async def test_reject_ends_the_call(server: ServeInfo) -> None:
    with trio.fail_after(10), MuxClient(server.url, "alice") as rest:
        async with connect(server.url, "alice") as alice, connect(server.url, "bob") as bob:
            a = await alice.open("bob", "call:voice")
            b = await bob.accept()
            await relay(a, b, {"type": "offer", "sdp": "o"})
            await relay(b, a, {"type": "reject"})
            assert [f async for f in a] == []
            assert a.closed_reason == "call_rejected"
            state = (await info(rest, a))["backend_state"]
            assert (state["state"], state["end_reason"], state["ended_by"]) == ("ended", "call_rejected", "bob")


async def test_stalled_receiver_drops_media_never_refuses(server: ServeInfo) -> None:
    with trio.fail_after(30), MuxClient(server.url, "alice") as rest:
        # bob's client keeps one frame per channel; then its reader stops reading the socket
        async with connect(server.url, "alice") as alice, connect(server.url, "bob", buffer_frames=1) as bob:
            a = await alice.open("bob", "call:voice")
            b = await bob.accept()
            await relay(a, b, {"type": "offer", "sdp": "o"})
            await relay(b, a, {"type": "answer", "sdp": "a"})

            frame = b"\x55" * 8192
            sent = dropped = 0
            while dropped < 50:  # bob reads nothing: socket, outbox and inbox fill, then drops
                ack = await a.send(frame)  # never refused: no throttled / receiver_full error
                sent += 1
                dropped += ack["disposition"] == "dropped"
                assert sent < 20_000, "no drop after 20000 frames"
            data = await info(rest, a)
            state = data["backend_state"]
            assert data["state"] == "open"
            assert state["media_dropped"] == dropped == data["dropped"]
            assert state["media_frames"] == sent and data["throttled"] > 0  # over budget: counted only

            # signalling is not dropped: it waits behind the full inbox and arrives in order
            ack = await a.send({"type": "ice", "candidate": "late"})
            assert ack["disposition"] == "consumed"
            assert (await info(rest, a))["backend_state"]["signalling_deferred"] == 1
            assert await alice.ping() >= 0  # the sender's connection is fine

            media = 0
            while True:  # bob catches up: the media that was not dropped, then the ICE candidate
                got = await b.receive()
                if isinstance(got["payload"], bytes):
                    media += 1
                    continue
                assert got["payload"] == {"type": "ice", "candidate": "late"}
                break
            assert media == sent - dropped
            await relay(a, b, {"type": "hangup"})
            assert [f async for f in b] == []
            assert b.closed_reason == "call_ended"
