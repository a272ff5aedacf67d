"""A node's WebSocket handles messages in Hypercorn's reader while its task waits
(``AsgiSocket.handle_inline``) and writes straight onto a plain TCP socket when it can
(``mux.direct_writes``): on a real Hypercorn server, every message is handled once and in order,
a declined message or a failing handler goes through the app's own ``receive``, and a
write the socket cannot take at once goes down Hypercorn's path with nothing lost or
reordered. On a node, what a reader's turn produces (acks, relayed frames) is written at the
turn's end straight from the reader, by urgency, and the rest of a write the socket took only
part of goes out before anything else, a pong included."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import open_websocket_url

import mux.direct_writes
import mux.writer
from mux.session import WireSession
from mux.sockets import AsgiSocket, Disconnected
from mux.wire import pack_binary, unpack_binary

from .nodes import serve_node
from .wsutil import raw_client, recv, recv_until, send, serve_raw, ws_url


class _LoggingApp:
    """Logs who handled each message (the reader's ``inline`` or the app's ``receive``);
    the handler declines ``report``, ``wait`` and messages starting with ``q``, and raises
    on ``boom``. On ``report`` the app sends the log as one message ``who:message,...``;
    on ``wait`` it is busy for a while."""

    def __init__(self, most: int = 16, most_bytes: int = 4096) -> None:
        self.most = most
        self.most_bytes = most_bytes
        self.log: list[tuple[str, str | bytes]] = []
        self.failures: list[Exception] = []
        self.done: Any = None

    def inline(self, message: str | bytes) -> bool:
        if message == "boom":
            raise ValueError("the handler failed")
        if message in ("report", "wait") or (isinstance(message, str) and message.startswith("q")):
            return False
        self.log.append(("inline", message))
        return True

    async def __call__(self, scope: dict[str, Any], receive: Any, send_: Any) -> None:
        sock = AsgiSocket(scope, receive, send_)
        await sock.accept(None)
        sock.handle_inline(self.inline, self.most, self.most_bytes, self.done)
        while True:
            try:
                message = await sock.receive()
            except Disconnected:
                return
            except ValueError as exc:  # raised for the handler, here
                self.failures.append(exc)
                await sock.send(f"failed:{exc}")
                continue
            self.log.append(("app", message))
            if message == "report":
                await sock.send(",".join(f"{who}:{m!s}" for who, m in self.log))
            elif message == "wait":  # busy: what arrives meanwhile queues
                await trio.sleep(0.2)


async def test_messages_are_handled_in_the_reader_once_and_in_order(nursery: trio.Nursery) -> None:
    """The reader hands a read's messages to the handler while the app waits (at most
    ``most`` of them); a declined one, and everything behind it while the app is busy, and
    the rest of a read after a ping, come through ``receive``: every message once, in order."""
    app = _LoggingApp(most=3)
    async with raw_client(await serve_raw(nursery, app)) as client:
        sent = ["a1", "a2", "q1", "a3", "a4"]
        await client.burst(*sent)
        await trio.sleep(0.2)  # the app is done with what it was given, and waits again
        await client.burst("b1", "b2", "b3", "b4", "b5")  # three in the reader, then the app's
        await trio.sleep(0.2)
        await client.burst("wait")
        await trio.sleep(0.05)
        await client.burst("c1", "c2")  # while the app is busy: queued for it
        await trio.sleep(0.3)
        await client.burst("d1", None, "d2")  # after a ping (Hypercorn's to answer), the app's
        await trio.sleep(0.2)
        await client.burst("report")
        (report,) = await client.messages(1)
    assert isinstance(report, str)
    log = [tuple(entry.split(":", 1)) for entry in report.split(",")]
    handled = [m for _, m in log]
    # each once, in order
    assert handled == [*sent, "b1", "b2", "b3", "b4", "b5", "wait", "c1", "c2", "d1", "d2", "report"]
    who = dict((m, w) for w, m in log)
    assert who["a1"] == who["a2"] == "inline"
    assert who["q1"] == "app"  # declined
    assert who["a3"] == who["a4"] == "app"  # behind the declined one, while the app is busy with it
    assert [who[m] for m in ("b1", "b2", "b3", "b4", "b5")] == ["inline"] * 3 + ["app"] * 2  # most=3 per read
    assert who["c1"] == who["c2"] == "app"
    assert (who["d1"], who["d2"]) == ("inline", "app")
    nursery.cancel_scope.cancel()


async def test_the_reader_stops_after_most_bytes_of_a_read(nursery: trio.Nursery) -> None:
    """Messages of a read go to the handler until they add up to ``most_bytes``: the one
    that crosses it still does, the rest of the read goes through ``receive``."""
    app = _LoggingApp(most_bytes=10)
    async with raw_client(await serve_raw(nursery, app)) as client:
        await client.burst("aaaaaa", "bbbbbb", "cc", "dd")
        await trio.sleep(0.2)
        await client.burst("e" * 20, "ff")  # over at once
        await trio.sleep(0.2)
        await client.burst("report")
        (report,) = await client.messages(1)
    assert report == "inline:aaaaaa,inline:bbbbbb,app:cc,app:dd,inline:" + "e" * 20 + ",app:ff,app:report"
    nursery.cancel_scope.cancel()


async def test_a_failing_handler_raises_in_the_app_s_receive(nursery: trio.Nursery) -> None:
    """The handler's exception reaches the app's task, as if the app had handled the
    message itself; from then on every message goes through ``receive``."""
    app = _LoggingApp()
    async with raw_client(await serve_raw(nursery, app)) as client:
        await client.burst("x1", "boom", "x2")
        assert await client.messages(1) == ["failed:the handler failed"]
        await client.burst("x3", "report")
        (report,) = await client.messages(1)
    assert report == "inline:x1,app:x2,app:x3,app:report"
    assert len(app.failures) == 1
    nursery.cancel_scope.cancel()


async def test_done_runs_once_after_a_read_s_inline_run_and_its_failure_reaches_the_app(
    nursery: trio.Nursery,
) -> None:
    """``done`` is called once after the messages of a read that went to the handler,
    before anything of that read is queued for the app; if it raises, the app's next
    ``receive`` raises it and the reader hands nothing more to the handler."""
    app = _LoggingApp()
    calls: list[list[str]] = []

    def done() -> None:
        calls.append([str(m) for _, m in app.log])
        if ("inline", "dboom") in app.log:
            raise ValueError("done failed")

    app.done = done
    async with raw_client(await serve_raw(nursery, app)) as client:
        await client.burst("x1", "x2")
        await trio.sleep(0.2)
        await client.burst("y1", "q1", "y2")  # done before the declined one is queued
        await trio.sleep(0.2)
        await client.burst("dboom", "x3")
        assert await client.messages(1) == ["failed:done failed"]
        await client.burst("x4", "report")
        (report,) = await client.messages(1)
    assert report == "inline:x1,inline:x2,inline:y1,app:q1,app:y2,inline:dboom,inline:x3,app:x4,app:report"
    assert calls == [["x1", "x2"], ["x1", "x2", "y1"], ["x1", "x2", "y1", "q1", "y2", "dboom", "x3"]]
    assert [str(f) for f in app.failures] == ["done failed"]
    nursery.cancel_scope.cancel()


async def test_writes_the_socket_cannot_take_go_down_hypercorn_s_path_intact(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small writes go straight onto the socket; 24 MiB sent to a client that reads
    nothing for a while fill it: the rest of each write waits in Hypercorn's send, and the
    client then gets every byte, in order."""
    writes: list[tuple[int, int]] = []
    write_some = mux.direct_writes.write_some

    def counted(stream: trio.SocketStream, data: bytes) -> int:
        sent = write_some(stream, data)
        writes.append((sent, len(data)))
        return sent

    monkeypatch.setattr(mux.direct_writes, "write_some", counted)
    blobs = [bytes([i]) * (1 << 20) for i in range(24)]
    direct: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send_: Any) -> None:
        sock = AsgiSocket(scope, receive, send_)
        await sock.accept(None)
        direct.append(sock._wire is not None)
        with contextlib.suppress(Disconnected):
            await sock.send(await sock.receive())
            for i in range(0, len(blobs), 4):
                await sock.send_many(blobs[i : i + 4])
            await sock.send("done")
            await sock.receive()

    async with raw_client(await serve_raw(nursery, app)) as client:
        await client.burst("hello")
        assert await client.messages(1) == ["hello"]
        assert writes and writes[0][0] == writes[0][1]  # the small one went straight out
        await trio.sleep(0.3)  # not reading: the socket's buffers fill
        got = await client.messages(len(blobs) + 1)
    assert direct == [True]
    assert [hashlib.sha256(g).digest() for g in got[:-1]] == [hashlib.sha256(b).digest() for b in blobs]
    assert got[-1] == "done"
    assert any(0 <= sent < size for sent, size in writes), writes  # some went down Hypercorn's path
    nursery.cancel_scope.cancel()


async def test_a_node_session_failing_in_the_reader_ends_that_connection_only(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a session's handling (here: a planted exception) while the reader handles
    the message ends that connection; the node and its other connections go on."""
    handle = WireSession.handle

    def planted(self: WireSession, message: str | bytes) -> Any:
        if isinstance(message, str) and "planted-bug" in message:
            raise RuntimeError("planted bug")
        return handle(self, message)

    monkeypatch.setattr(WireSession, "handle", planted)
    info = await serve_node(nursery)
    async with open_websocket_url(ws_url(info.url, "bystander")) as other:
        await recv(other)  # connected
        async with raw_client(ws_url(info.url, "victim")) as victim:
            await victim.messages(1)  # connected
            await victim.burst('{"action":"ping","ref":"before"}')
            assert '"ref":"before"' in str(await victim.messages(1))
            await victim.burst('{"action":"ping","ref":"planted-bug"}')
            with trio.fail_after(5):
                while await victim.stream.receive_some(1 << 16):  # until the node drops it
                    pass
        await send(other, action="ping", ref="after")
        assert (await recv_until(other, lambda m: m.get("event") == "pong"))["ref"] == "after"
    nursery.cancel_scope.cancel()


async def test_a_cancelled_sender_writes_nothing_and_a_write_begun_is_finished(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender already cancelled writes nothing (``Cancelled``, as trio's own sends); a
    write the socket took only part of is finished through Hypercorn, whole, though the
    sender's scope is cancelled while it waits there (the client never sees half a frame)."""
    write_some = mux.direct_writes.write_some

    def half(stream: trio.SocketStream, data: bytes) -> int:
        return write_some(stream, data[: len(data) // 2])

    monkeypatch.setattr(mux.direct_writes, "write_some", half)
    outcomes: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send_: Any) -> None:
        sock = AsgiSocket(scope, receive, send_)
        await sock.accept(None)
        with contextlib.suppress(Disconnected):
            await sock.receive()
            with trio.CancelScope() as cancelled:
                cancelled.cancel()
                try:
                    await sock.send_many(["skipped"])
                except trio.Cancelled:
                    outcomes.append("nothing written")
                    raise
            with trio.CancelScope() as scope_:

                async def cancel_soon() -> None:
                    scope_.cancel()

                async with trio.open_nursery() as inner:
                    inner.start_soon(cancel_soon)
                    await sock.send_many(["x" * 100_000, "y" * 1000])  # half written, then cancelled
            outcomes.append("cancelled" if scope_.cancelled_caught else "finished")
            await sock.send("after")
            await sock.receive()

    async with raw_client(await serve_raw(nursery, app)) as client:
        await client.burst("go")
        assert await client.messages(3) == ["x" * 100_000, "y" * 1000, "after"]
    assert outcomes[0] == "nothing written"
    nursery.cancel_scope.cancel()


async def test_a_node_writes_replies_and_relayed_frames_in_the_reader_s_turn(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One frame at a time from one agent to another: the sender's ack and the receiver's
    frame are written straight to their sockets at the end of the reader's turn
    (``Writer.write_now``), not by waking each connection's writer task; every frame
    arrives once, in order, acknowledged."""
    counts = {"task": 0, "through": 0}
    write, write_now = mux.writer.Writer._write, mux.writer.Writer.write_now

    async def by_task(self: mux.writer.Writer, message: Any) -> bool:
        counts["task"] += 1
        return await write(self, message)

    def through(self: mux.writer.Writer) -> bool:
        done = write_now(self)
        counts["through"] += done
        return done

    monkeypatch.setattr(mux.writer.Writer, "_write", by_task)
    monkeypatch.setattr(mux.writer.Writer, "write_now", through)
    info = await serve_node(nursery)
    async with open_websocket_url(ws_url(info.url, "wt-tx")) as tx, open_websocket_url(ws_url(info.url, "wt-rx")) as rx:
        await recv(tx)
        await recv(rx)  # connected
        await send(tx, action="open", target="wt-rx", intent="stream", ref="o")
        cid = (await recv_until(tx, lambda m: m.get("event") == "channel_opened"))["channel_id"]
        await recv_until(rx, lambda m: m.get("event") == "channel_opened")
        await trio.sleep(0.1)  # both writers wait again
        before = dict(counts)
        for n in range(40):
            await send(tx, action="send", channel_id=cid, payload={"n": n}, ref=n)
            ack = await recv(tx)
            assert (ack["event"], ack["ref"], ack["delivered"]) == ("frame_ack", n, True), ack
            frame = await recv(rx)
            assert (frame["event"], frame["seq"], frame["payload"]) == ("frame", ack["seq"], {"n": n}), frame
        by_writers = counts["task"] - before["task"]
        written_through = counts["through"] - before["through"]
    assert written_through >= 76, counts  # an ack and a frame per send (a few may meet a busy writer)
    assert by_writers <= 4, counts
    nursery.cancel_scope.cancel()


async def test_a_direct_write_the_socket_takes_part_of_is_finished_before_anything_else(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames relayed to a receiver that reads nothing for a while fill its socket: a write
    in the reader's turn is then only partly taken, and its rest goes out first (through the
    writer's task, or the reader before Hypercorn answers a ping). Once the receiver reads,
    every delivered frame arrives whole and in order, and its ping is answered. The writer
    is made slow to take up the first rest, so the ping meets one still held."""
    partial = 0
    send_now = AsgiSocket.send_now
    write = mux.writer.Writer._write
    slowed: list[bool] = []
    held = trio.Event()

    async def slow_rest(self: mux.writer.Writer, message: Any) -> bool:
        if message is mux.writer._REST and not slowed:
            slowed.append(True)
            await trio.sleep(0.6)  # the ping arrives meanwhile; the reader writes the rest first
        return await write(self, message)

    def counted(self: AsgiSocket, messages: Any) -> bool:
        nonlocal partial
        done = send_now(self, messages)
        partial += not done
        if not done:
            held.set()
        return done

    monkeypatch.setattr(AsgiSocket, "send_now", counted)
    monkeypatch.setattr(mux.writer.Writer, "_write", slow_rest)
    info = await serve_node(nursery)
    body = "x" * 12_000
    async with open_websocket_url(ws_url(info.url, "pw-tx")) as tx, raw_client(ws_url(info.url, "pw-rx")) as rx:
        await recv(tx)
        await rx.messages(1)  # connected
        await send(tx, action="open", target="pw-rx", intent="stream", ref="o")
        cid = (await recv_until(tx, lambda m: m.get("event") == "channel_opened"))["channel_id"]
        await rx.messages(1)  # channel_opened
        delivered: list[int] = []
        outcomes = 0

        async def sender() -> None:
            nonlocal outcomes
            for n in range(400):
                await send(tx, action="send", channel_id=cid, payload={"n": n, "p": body}, ref=n)
            while outcomes < 400:
                reply = await recv(tx, timeout=20)
                if reply.get("event") == "frame_ack":
                    outcomes += 1
                    if reply["delivered"]:
                        delivered.append(reply["ref"])
                elif reply.get("error") == "receiver_full":
                    outcomes += 1

        async with trio.open_nursery() as inner:
            inner.start_soon(sender)
            with trio.fail_after(10):  # the receiver reads nothing: its socket fills
                await held.wait()
            await rx.burst(None)  # a ping, while the rest of a frame is held
            await trio.sleep(1.0)
            got: list[int] = []
            with trio.fail_after(30):
                while outcomes < 400 or len(got) < len(delivered):
                    for message in await rx.messages(1):
                        event = orjson.loads(message)
                        assert event["event"] == "frame" and event["payload"]["p"] == body, str(message)[:200]
                        got.append(event["payload"]["n"])
    assert partial > 0  # some writes in the reader's turn were only partly taken
    assert got == delivered and len(got) >= 64, (len(got), len(delivered))
    assert got == sorted(got)
    assert rx.pongs == 1
    nursery.cancel_scope.cancel()


async def test_a_call_frame_behind_a_bulk_frame_in_one_read_is_written_first(nursery: trio.Nursery) -> None:
    """A 16 KiB bulk frame and then a call's 200-byte frame arrive in one read: the reader
    handles both in its turn (no byte bound on a node), so the receiver's writer gets both
    and, by urgency, writes the call's frame first."""
    info = await serve_node(nursery)
    async with (
        raw_client(ws_url(info.url, "hol-caller")) as caller,
        open_websocket_url(ws_url(info.url, "hol-callee")) as callee,
    ):
        await caller.messages(1)  # connected
        await recv(callee)
        channels = {}
        for intent in ("call:voice", "stream"):
            await caller.burst(f'{{"action":"open","target":"hol-callee","intent":"{intent}"}}')
            (opened,) = await caller.messages(1)
            channels[intent] = orjson.loads(opened)["channel_id"]
            await recv_until(callee, lambda m: m.get("event") == "channel_opened")
        call, bulk = channels["call:voice"], channels["stream"]
        await caller.burst(
            orjson.dumps({"action": "send", "channel_id": call, "payload": {"type": "offer", "sdp": "v=0"}}).decode()
        )
        await caller.messages(1)  # its ack
        assert (await recv(callee))["payload"]["type"] == "offer"
        await send(callee, action="send", channel_id=call, payload={"type": "answer", "sdp": "v=0"})
        assert (await recv(callee))["event"] == "frame_ack"
        await caller.messages(1)  # the answer
        for round_ in range(3):
            voice = bytes([round_]) * 200
            await caller.burst(
                pack_binary({"action": "send", "channel_id": bulk}, bytes(16 << 10)),
                pack_binary({"action": "send", "channel_id": call}, voice),
            )
            with trio.fail_after(5):
                first, second = await callee.get_message(), await callee.get_message()
            assert isinstance(first, bytes) and isinstance(second, bytes)
            (head, payload), (head2, _) = unpack_binary(first), unpack_binary(second)
            assert (head["channel_id"], payload) == (call, voice), head  # the call's frame first
            assert head2["channel_id"] == bulk
            acks = [orjson.loads(m) for m in await caller.messages(2)]
            assert [a["event"] for a in acks] == ["frame_ack", "frame_ack"], acks
            await trio.sleep(0.2)  # the bulk frame's pace hint: the call's connection has a bulk budget
    nursery.cancel_scope.cancel()
