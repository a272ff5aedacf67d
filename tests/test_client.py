"""The REST client (MuxClient) and the async WebSocket client (connect) against a real node."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import trio

import mux
from mux.client import MuxClient, api_url, connect, error_from_wire, ws_url
from mux.errors import (
    BadRequest,
    ChannelClosed,
    ChannelError,
    ChannelForbidden,
    ChannelFull,
    ChannelNotFound,
    ChannelThrottled,
    MuxError,
)
from mux.server import ServeInfo

from .nodes import serve_node

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking client call off the Trio thread (the node runs on it)."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


# ---- URLs and error mapping ----------------------------------------------------------------


def test_urls() -> None:
    assert api_url("http://127.0.0.1:8443") == "http://127.0.0.1:8443/api/mux"
    assert api_url("https://node.example/api/mux/") == "https://node.example/api/mux"
    assert ws_url("http://127.0.0.1:8443", "alice") == "ws://127.0.0.1:8443/api/mux/ws?agent=alice"
    assert ws_url("https://h/api/mux", "bob") == "wss://h/api/mux/ws?agent=bob"
    assert ws_url("ws://h:1/custom/ws?agent=x&k=1", "bob") == "ws://h:1/custom/ws?k=1&agent=bob"
    assert ws_url("wss://h", "a@b") == "wss://h/api/mux/ws?agent=a%40b"
    with pytest.raises(BadRequest):
        api_url("not a url")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"buffer_frames": 0}, "buffer_frames must be a whole number of at least 1, not 0"),
        ({"buffer_frames": 2.5}, "buffer_frames must be a whole number of at least 1, not 2.5"),
        ({"accept_backlog": -1}, "accept_backlog must be a whole number of at least 0, not -1"),
        ({"max_message_bytes": True}, "max_message_bytes must be a whole number of at least 1, not True"),
        ({"connect_timeout": 0}, "connect_timeout must be a number of seconds above 0, not 0"),
        ({"request_timeout": -1.0}, "request_timeout must be a number of seconds above 0, not -1.0"),
    ],
)
async def test_connect_refuses_numbers_out_of_range_before_connecting(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):  # no node at port 9: it fails before connecting
        async with connect("http://127.0.0.1:9", "alice", **arguments):
            pass


def test_error_from_wire() -> None:
    e = error_from_wire({"error": "unknown_channel", "detail": "no", "channel_id": "ch-1", "ref": 7}, 404)
    assert isinstance(e, ChannelNotFound) and (e.code, e.detail, e.channel_id, e.ref) == (
        "unknown_channel",
        "no",
        "ch-1",
        7,
    )
    assert isinstance(error_from_wire({"error": "forbidden"}, 403), ChannelForbidden)
    assert isinstance(error_from_wire({"error": "channel_closed"}, 409), ChannelClosed)
    assert isinstance(error_from_wire({"error": "receiver_full"}, 429), ChannelFull)
    bad = error_from_wire({"error": "bad_agent", "detail": "x"}, 400)
    assert isinstance(bad, BadRequest) and bad.code == "bad_agent"
    other = error_from_wire({"error": "not_found"}, 404)
    assert type(other) is MuxError and other.code == "not_found"
    slow = error_from_wire({"error": "throttled", "retry_after_ms": 12, "window": 1, "channel_id": "ch-1"})
    assert isinstance(slow, ChannelThrottled) and (slow.retry_after_ms, slow.window) == (12, 1)
    odd = error_from_wire({"error": "throttled", "window": "x"})
    assert isinstance(odd, ChannelThrottled) and odd.window is None


# ---- REST client ---------------------------------------------------------------------------


async def test_rest_round_trip(server: ServeInfo) -> None:
    with trio.fail_after(20):
        with MuxClient(server.url, "Alice.aint") as alice, MuxClient(server.url + "/api/mux", "bob") as bob:
            status = await in_thread(alice.status)
            assert status["agent"] == "node" and status["signing"] == "ed25519"
            keys = await in_thread(alice.keys)
            assert keys["node"] == "node" and keys["keys"][0]["public_key"] == status["public_key"]
            intents = await in_thread(alice.intents)
            assert "chat" in {i["intent"] for i in intents["intents"]}

            opened = await in_thread(alice.open, "bob", "chat", {"topic": "t"})
            cid = opened["channel_id"]
            assert (opened["agent"], opened["target"], opened["intent"], opened["state"]) == (
                "alice",
                "bob",
                "chat",
                "open",
            )
            ack = await in_thread(alice.send, cid, {"text": "hello"})
            assert ack["seq"] == 1 and ack["channel_id"] == cid and len(ack["sig"]) == 128
            ack2 = await in_thread(bob.send, cid, [1, 2, 3])
            assert ack2["seq"] == 2

            info = await in_thread(bob.channel, cid)
            assert info["metadata"] == {"topic": "t"} and info["seq"] == 2
            for client in (alice, bob):
                listed = await in_thread(client.channels)
                assert cid in [c["channel_id"] for c in listed["channels"]]

            got = await in_thread(bob.frames, cid)
            assert [f["payload"] for f in got["frames"]] == [{"text": "hello"}]
            assert got["next_after"] == 1 and got["state"] == "open"
            mux.verify_frame(got["frames"][0], status["public_key"])
            back = await in_thread(alice.frames, cid, after=0)
            assert [f["payload"] for f in back["frames"]] == [[1, 2, 3]]
            nothing = await in_thread(bob.frames, cid, after=got["next_after"])
            assert nothing["frames"] == [] and nothing["next_after"] == 1

            closed = await in_thread(alice.close, cid, "bye")
            assert closed["state"] == "closed" and closed["reason"] == "bye" and closed["seq"] == 3
            assert cid not in [c["channel_id"] for c in (await in_thread(alice.channels))["channels"]]
            with pytest.raises(ChannelClosed) as ei:
                await in_thread(alice.send, cid, "late")
            assert ei.value.code == "channel_closed" and ei.value.channel_id == cid


async def test_rest_long_poll_is_woken_by_a_send(server: ServeInfo) -> None:
    with MuxClient(server.url, "alice") as alice, MuxClient(server.url, "bob") as bob:
        cid = (await in_thread(alice.open, "bob"))["channel_id"]
        result: dict[str, Any] = {}

        async def poll() -> None:
            start = trio.current_time()
            result["answer"] = await in_thread(bob.frames, cid, after=0, wait=10)
            result["elapsed"] = trio.current_time() - start

        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                await trio.sleep(0.3)  # let the poll reach the node and park
                assert "answer" not in result
                await in_thread(alice.send, cid, {"wake": True})
        assert [f["payload"] for f in result["answer"]["frames"]] == [{"wake": True}]
        assert result["elapsed"] < 5


async def test_rest_errors(server: ServeInfo) -> None:
    with trio.fail_after(20):
        with MuxClient(server.url, "alice") as alice, MuxClient(server.url, "mallory") as mallory:
            bogus = "ch-" + "0" * 32
            with pytest.raises(ChannelNotFound) as ei:
                await in_thread(alice.channel, bogus)
            assert ei.value.code == "unknown_channel" and ei.value.channel_id == bogus
            with pytest.raises(ChannelNotFound):
                await in_thread(alice.send, bogus, 1)

            cid = (await in_thread(alice.open, "bob"))["channel_id"]
            for call in (
                functools.partial(mallory.channel, cid),
                functools.partial(mallory.send, cid, "x"),
                functools.partial(mallory.frames, cid),
                functools.partial(mallory.close, cid),
            ):
                with pytest.raises(ChannelForbidden) as fe:
                    await in_thread(call)
                assert fe.value.code == "forbidden" and fe.value.channel_id == cid

            with pytest.raises(BadRequest) as be:
                await in_thread(alice.open, "alice")
            assert be.value.code == "bad_target"
            with MuxClient(server.url, "NOT A NAME") as bad:
                with pytest.raises(BadRequest) as ae:
                    await in_thread(bad.channels)
                assert ae.value.code == "bad_agent"

    with MuxClient("http://127.0.0.1:1", "alice", timeout=2) as nowhere:
        with pytest.raises(MuxError) as ue:
            await in_thread(nowhere.status)
        assert ue.value.code == "unreachable" and "127.0.0.1:1" in ue.value.detail


# ---- async WebSocket client ----------------------------------------------------------------


async def test_ws_two_agents_three_channels_both_ways(server: ServeInfo) -> None:
    rounds = 5
    with trio.fail_after(20):
        async with connect(server.url, "alice") as alice, connect(server.url, "bob") as bob:
            assert (alice.agent, bob.agent, alice.node) == ("alice", "bob", "node")
            with MuxClient(server.url, "x") as probe:
                status = await in_thread(probe.status)
            assert alice.public_key == bob.public_key == status["public_key"]

            intents = ["stream", "chat", "session"]
            opened = [await alice.open("bob", intent, {"n": n}) for n, intent in enumerate(intents)]
            accepted = {}
            for _ in intents:
                ch = await bob.accept()
                accepted[ch.id] = ch
            assert set(accepted) == {ch.id for ch in opened}
            for n, ch in enumerate(opened):
                theirs = accepted[ch.id]
                assert (ch.role, theirs.role) == ("opener", "target")
                assert (ch.peer, theirs.peer) == ("bob", "alice")
                assert ch.intent == theirs.intent == intents[n]
                assert theirs.metadata == {"n": n} and theirs.route["backend"]

            def payload(n: int, i: int, who: str) -> Any:
                return f"{who}:{n}:{i}".encode() if i % 2 else {"who": who, "n": n, "i": i}

            async def talk(mine: Any, who: str, n: int) -> None:
                for i in range(rounds):
                    ack = await mine.send(payload(n, i, who))
                    assert ack["event"] == "frame_ack" and ack["disposition"] == "delivered"

            async def hear(mine: Any, conn: Any, peer: str, n: int, got: list[Any]) -> None:
                for i in range(rounds):
                    frame = await mine.receive()
                    assert "event" not in frame and frame["sender"] == peer
                    expected = payload(n, i, peer)
                    assert frame["payload"] == expected
                    assert frame["enc"] == ("bytes" if isinstance(expected, bytes) else "json")
                    verified = conn.verify(frame)
                    assert verified.seq == frame["seq"] and verified.payload == expected
                    got.append(frame)

            got: dict[tuple[str, int], list[Any]] = {}
            async with trio.open_nursery() as nursery:
                for n, ch in enumerate(opened):
                    theirs = accepted[ch.id]
                    got[("alice", n)], got[("bob", n)] = [], []
                    nursery.start_soon(talk, ch, "alice", n)
                    nursery.start_soon(talk, theirs, "bob", n)
                    nursery.start_soon(hear, ch, alice, "bob", n, got[("alice", n)])
                    nursery.start_soon(hear, theirs, bob, "alice", n, got[("bob", n)])
            assert all(len(v) == rounds for v in got.values())
            # Frame dicts have exactly the exported form (binary payloads as raw bytes).
            sample = got[("bob", 0)][1]
            assert list(sample) == [
                "v",
                "channel_id",
                "seq",
                "kind",
                "sender",
                "target",
                "intent",
                "ts",
                "prev",
                "enc",
                "payload",
                "tbz_hash",
                "sig",
            ]
            assert isinstance(sample["payload"], bytes)

            listed = await alice.list()
            assert {c["channel_id"] for c in listed} == {ch.id for ch in opened}
            assert all(c["frames"] == 2 * rounds for c in listed)
            rtt = await alice.ping()
            assert 0 < rtt < 5


async def test_ws_iteration_ends_on_close_with_reason(server: ServeInfo) -> None:
    with trio.fail_after(20):
        async with connect(server.url, "alice") as alice, connect(server.url, "bob") as bob:
            ch = await alice.open("bob", "chat")
            seen: list[Any] = []

            async def consume() -> None:
                async for channel in bob.incoming():
                    async for frame in channel:
                        seen.append(frame["payload"])
                    seen.append(("closed", channel.closed_reason, channel.closed_event))
                    return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                await ch.send({"a": 1})
                await ch.send(b"\xff\x00")
                closed = await ch.close("all done")
            assert closed["event"] == "channel_closed" and closed["reason"] == "all done" and closed["seq"] == 3
            assert seen[:2] == [{"a": 1}, b"\xff\x00"]
            tag, reason, event = seen[2]
            assert (tag, reason) == ("closed", "all done")
            assert event["by"] == "alice" and event["tbz_hash"] == closed["tbz_hash"]
            assert ch.closed_reason == "all done" and not ch.is_open
            assert await ch.close() == ch.closed_event  # idempotent
            with pytest.raises(ChannelClosed):
                await ch.send("after close")
            assert alice.channels == []


async def test_ws_errors(server: ServeInfo) -> None:
    with trio.fail_after(20):
        async with connect(server.url, "alice") as alice:
            with pytest.raises(BadRequest) as be:
                await alice.open("alice")
            assert be.value.code == "bad_target" and isinstance(be.value.ref, int)

            with MuxClient(server.url, "carol") as carol:
                cid = (await in_thread(carol.open, "dave"))["channel_id"]
            ghost = mux.client.ClientChannel(alice, {"channel_id": cid}, 4)
            with pytest.raises(ChannelForbidden) as fe:
                await ghost.send("x")
            assert fe.value.channel_id == cid
            with pytest.raises(ChannelNotFound):
                await mux.client.ClientChannel(alice, {"channel_id": "ch-" + "1" * 32}, 4).send(b"bin")

            # over the node's message limit: refused at once, not left waiting for an answer
            to_self = await alice.open("bob")
            for payload in (b"\0" * alice.max_message_bytes, {"text": "x" * alice.max_message_bytes}):
                with trio.fail_after(2), pytest.raises(BadRequest) as big:
                    await to_self.send(payload)
                assert big.value.code == "message_too_large"
            alice.max_message_bytes = 0  # the client does not know the limit: the node's answer says it
            with trio.fail_after(5), pytest.raises(BadRequest) as big:
                await to_self.send(b"\0" * (2 << 20))
            assert big.value.code == "message_too_large"

            # an error answering no request is kept in conn.errors; the socket carries on
            await alice._ws.send_message("this is not json")
            assert await alice.ping() > 0
            assert [e["error"] for e in alice.errors] == ["invalid_json"]

            with pytest.raises(ChannelError) as ae:
                async with connect(server.url, "alice"):
                    pass  # pragma: no cover
            assert ae.value.code == "agent_attached"

        # a body exception leaves the connection unwrapped (no ExceptionGroup)
        with pytest.raises(KeyError):
            async with connect(server.url, "erin"):
                raise KeyError("body")

    with pytest.raises(MuxError) as ue:
        async with connect("http://127.0.0.1:1", "alice", connect_timeout=3):
            pass  # pragma: no cover
    assert ue.value.code == "unreachable"


async def test_ws_incoming_from_rest_opener_and_disconnect(server: ServeInfo) -> None:
    """A REST agent opens a live channel to a WebSocket agent; leaving ``connect`` closes it
    (durable channels stay open for the target's next connection: see test_durable)."""
    with trio.fail_after(20):
        with MuxClient(server.url, "restie") as restie:
            async with connect(server.url, "wsie") as wsie:
                cid = (await in_thread(restie.open, "wsie", "stream"))["channel_id"]
                ch = await wsie.accept()
                assert ch.id == cid and ch.peer == "restie" and ch.role == "target"
                await in_thread(restie.send, cid, {"n": 1})
                frame = await ch.receive()
                assert frame["payload"] == {"n": 1} and wsie.verify(frame).seq == 1
                await ch.send({"reply": True})
                polled = await in_thread(restie.frames, cid, wait=5)
                assert [f["payload"] for f in polled["frames"]] == [{"reply": True}]
            assert wsie.closed
            info = await in_thread(restie.channel, cid)
            assert info["state"] == "closed" and info["close_reason"] == "ws_disconnect"


async def test_ws_small_inbox_backpressure_loses_nothing(server: ServeInfo) -> None:
    """A full channel inbox makes the reader wait (backpressure); every frame still arrives in order."""
    with trio.fail_after(20):
        async with connect(server.url, "alice") as alice, connect(server.url, "bob", buffer_frames=2) as bob:
            ch = await alice.open("bob", "stream")
            theirs = await bob.accept()
            for i in range(30):
                await ch.send(i if i % 3 else bytes([i]))
            await trio.sleep(0.1)
            assert theirs._inbox_recv.statistics().current_buffer_used == 2
            got = [(await theirs.receive())["payload"] for _ in range(30)]
            assert got == [i if i % 3 else bytes([i]) for i in range(30)]
            assert await bob.ping() > 0


async def test_ws_sends_honour_the_window_hint_beside_a_call(server: ServeInfo) -> None:
    """While a call is active on the connection, a bulk channel's acks carry ``window: 1``
    and concurrent ``send`` calls keep one frame in flight; once the call is quiet the hint
    is gone and sends overlap again. ``pace_ms`` delays the next send; a send waiting for
    room fails when the channel closes."""
    with trio.fail_after(20):
        async with connect(server.url, "alice") as alice, connect(server.url, "bob") as bob:
            call = await alice.open("bob", "call:voice")
            bulk = await alice.open("bob", "stream")
            for _ in range(2):
                await bob.accept()
            in_flight = peak = 0
            request = alice._request

            async def counting(*args: Any, **kwargs: Any) -> dict[str, Any]:
                nonlocal in_flight, peak
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    return await request(*args, **kwargs)
                finally:
                    in_flight -= 1

            alice._request = counting  # type: ignore[method-assign]

            async def burst() -> int:
                nonlocal peak
                peak = 0
                async with trio.open_nursery() as nursery:
                    for i in range(6):
                        nursery.start_soon(bulk.send, {"i": i})
                return peak

            await call.send({"type": "offer", "sdp": "v=0"})  # the call is active now
            assert (await bulk.send({"first": True}))["window"] == 1 and bulk.window == 1
            assert await burst() == 1
            await trio.sleep(1.1)  # realtime_hold_s: the call went quiet
            assert "window" not in await bulk.send({"after": True}) and bulk.window is None
            assert await burst() > 1

            await call.send({"type": "hangup"})  # the call is active again
            assert (await bulk.send({"again": True}))["window"] == 1

            # a send after an ack with pace_ms waits that long, and so fits the budget
            big = bytes(30_000)  # the call's bulk budget: 2 MB/s, 40 kB burst
            first = await bulk.send(big)
            assert first["pace_ms"] >= 5
            t0 = trio.current_time()
            assert (await bulk.send(big))["event"] == "frame_ack"  # waited, not refused
            assert trio.current_time() - t0 >= first["pace_ms"] / 1000 * 0.9

            # a send waiting for room fails as soon as the channel closes
            bulk._in_flight = 1  # as if one send were still unanswered
            failed: list[BaseException] = []

            async def waiting() -> None:
                try:
                    await bulk.send({"waits": True})
                except ChannelClosed as exc:
                    failed.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiting)
                await trio.sleep(0.05)
                assert not failed  # parked on the window
                await bulk.close()
            assert len(failed) == 1


async def test_ack_durable_frames_rest_and_ws(server: ServeInfo) -> None:
    """Durable (chat) frames stay in the receiver's mailbox until acknowledged."""
    with trio.fail_after(20):
        with MuxClient(server.url, "alice") as alice, MuxClient(server.url, "bob") as bob:
            cid = (await in_thread(alice.open, "bob", "chat"))["channel_id"]
            for n in range(3):
                await in_thread(alice.send, cid, {"n": n})
            assert await in_thread(bob.ack, cid, 2) == {"channel_id": cid, "seq": 2, "removed": 2}
            assert (await in_thread(bob.ack, cid, 3))["removed"] == 1

        async with connect(server.url, "carol") as carol, connect(server.url, "dave") as dave:
            ch = await carol.open("dave", "chat")
            ack = await ch.send({"hello": "dave"})
            assert ack["stored"] is True
            theirs = await dave.accept()
            frame = await theirs.receive()
            acked = await theirs.ack(frame["seq"])
            assert (acked["event"], acked["channel_id"], acked["seq"], acked["removed"]) == ("acked", ch.id, 1, 1)


# ---- batching connections (connect(..., batch=True)) -----------------------------------------


async def test_ws_batching_connection_folds_concurrent_sends(server: ServeInfo) -> None:
    """Concurrent sends on a batching connection go out as ``batch`` actions: each still gets
    its own ack, for the frame it made; a binary send goes alone, in its place; the frames
    share signatures per batch, and the exported chain verifies."""
    from mux.signing import verify_chain

    count = 60
    binary_at = count // 2

    def payload(i: int) -> Any:
        return f"bin{i}".encode() if i == binary_at else {"i": i}

    with trio.fail_after(20):
        async with connect(server.url, "alice", batch=True) as alice, connect(server.url, "bob") as bob:
            ch = await alice.open("bob", "stream")
            theirs = await bob.accept()
            acks: dict[int, dict[str, Any]] = {}

            async def one(i: int) -> None:
                acks[i] = await ch.send(payload(i))

            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(one, i)
            got = [await theirs.receive() for _ in range(count)]
            with MuxClient(server.url, "alice") as rest:
                chain = await in_thread(rest.chain, ch.id)
    assert sorted(ack["seq"] for ack in acks.values()) == list(range(1, count + 1))
    assert [frame["seq"] for frame in got] == list(range(1, count + 1))
    by_seq = {frame["seq"]: frame for frame in got}
    for i, ack in acks.items():
        assert by_seq[ack["seq"]]["tbz_hash"] == ack["tbz_hash"]
        assert by_seq[ack["seq"]]["payload"] == payload(i)
    unsigned = sum(1 for frame in got if frame["sig"] == "")
    assert unsigned >= count // 2, unsigned  # batches, one signature each
    assert got[-1]["sig"]
    assert verify_chain(chain, alice.public_key).frames == count + 1  # open + data


async def test_ws_batching_splits_at_the_nodes_message_size(nursery: trio.Nursery) -> None:
    """A batch stays within the node's ``max_message_bytes`` (from its hello): many
    concurrent sends that would not fit one message go as several batches, none refused."""
    small = await serve_node(nursery, max_message_bytes=4096)
    with trio.fail_after(20):
        async with connect(small.url, "alice", batch=True) as alice, connect(small.url, "bob") as bob:
            assert alice.max_message_bytes == 4096
            ch = await alice.open("bob", "stream")
            theirs = await bob.accept()
            acks: list[dict[str, Any]] = []

            async def one(i: int) -> None:
                acks.append(await ch.send({"i": i, "pad": "x" * 900}))

            async with trio.open_nursery() as senders:
                for i in range(20):
                    senders.start_soon(one, i)
            got = [await theirs.receive() for _ in range(20)]
    assert len(acks) == 20 and not alice.errors
    assert sorted(frame["payload"]["i"] for frame in got) == list(range(20))
    assert any(frame["sig"] == "" for frame in got)  # batched all the same, three or four a message


async def test_ws_an_error_answering_a_batch_fails_each_send_in_it(nursery: trio.Nursery) -> None:
    """A refusal of the batch itself (here the connection's message rate: a batch costs one
    token per item) reaches every send it carried at once, not after a timeout."""
    limited = await serve_node(nursery, rate_messages_per_s=1.0, rate_burst=6)
    with trio.fail_after(10):
        async with connect(limited.url, "alice", batch=True, request_timeout=30) as alice:
            async with connect(limited.url, "bob"):
                ch = await alice.open("bob", "stream")
                errors: list[MuxError] = []

                async def one(i: int) -> None:
                    try:
                        await ch.send({"i": i})
                    except MuxError as exc:
                        errors.append(exc)

                async with trio.open_nursery() as senders:
                    for i in range(12):
                        senders.start_soon(one, i)
    assert len(errors) == 12 and {exc.code for exc in errors} == {"rate_limited"}


class _StuckSocket:
    """A WebSocket whose sends never complete (a peer that stopped reading)."""

    def __init__(self) -> None:
        self.started: list[str | bytes] = []

    async def send_message(self, message: str | bytes) -> None:
        self.started.append(message)
        await trio.sleep_forever()


async def test_ws_a_queued_request_whose_caller_gives_up_is_never_sent() -> None:
    """On a batching connection a request waits in the sender's queue; if its caller is
    cancelled (or times out) first, it is taken out of the queue and its ``ref`` let go."""
    from mux.client import MuxConnection

    sock = _StuckSocket()
    conn = MuxConnection(sock, {"agent": "alice", "max_message_bytes": 4096}, batch=True)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn._send_loop)
        with trio.move_on_after(0.2):
            await conn.ping()  # taken by the sender, which is stuck writing it
        assert len(sock.started) == 1 and not conn._pending

        async def give_up(i: int) -> None:
            with trio.move_on_after(0.2):
                await conn._request({"action": "ping", "n": i})

        async with trio.open_nursery() as callers:
            for i in range(3):
                callers.start_soon(give_up, i)
        assert not conn._outgoing and not conn._pending
        assert len(sock.started) == 1  # none of the three was written
        nursery.cancel_scope.cancel()


async def test_ws_a_refused_request_leaves_no_garbage_cycle(nursery: trio.Nursery) -> None:
    """A request the node refuses raises its error without tying it, its traceback and the
    caller's frames into a cycle (the pending request kept the error it raised: about 13
    objects per refusal, each waiting for a garbage collection); the node's side of the
    refusal leaves none either."""
    server = await serve_node(nursery, mux=mux.MuxConfig(intent_policies={"session": {"rate": 1000, "burst": 1000}}))
    async with connect(server.url, "bob") as bob, connect(server.url, "alice") as alice:
        ch = await alice.open("bob", "session")
        await bob.accept()
        await ch.send({"x": "y" * 900})  # the intent's burst: the sends below are refused
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            refused = 0
            for _ in range(30):
                with pytest.raises(mux.ChannelThrottled):
                    await ch.send({"x": "y" * 900})
                refused += 1
                ch._not_before = 0.0  # the retry_after_ms pace is not what this test waits for
            gc.collect()
            left = [o for o in gc.garbage if isinstance(o, BaseException) or type(o).__name__ in ("frame", "traceback")]
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
            gc.enable()
        assert refused == 30 and left == [], f"{len(left)} exceptions, frames and tracebacks in cycles"
