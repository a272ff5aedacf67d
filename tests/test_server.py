"""A real Hypercorn node on loopback: REST, WebSocket multiplexing, bad input, isolation."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import orjson
import pytest
import trio
from quart_trio import QuartTrio

import mux
from mux.client import open_ws
from mux.server import ServeInfo, create_blueprint, serve
from mux.settings import NodeSettings
from mux.wire import pack_binary

from .wsutil import recv, recv_until, send, serve_raw, ws_url


def frame_of(event: dict[str, Any]) -> dict[str, Any]:
    """The exported frame dict inside a ``frame`` event (binary payloads re-encoded)."""
    d = {k: v for k, v in event.items() if k != "event"}
    if isinstance(d["payload"], bytes):
        d["payload"] = base64.b64encode(d["payload"]).decode()
    return d


async def test_rest_round_trip_of_every_endpoint(server: ServeInfo) -> None:
    async with httpx.AsyncClient(base_url=server.url + "/api/mux") as c:
        status = (await c.get("/status")).json()
        assert status["agent"] == "node" and len(status["public_key"]) == 64 and status["tls"] is None
        keys = (await c.get("/keys")).json()
        assert keys["keys"][0]["public_key"] == status["public_key"] and keys["keys"][0]["alg"] == "ed25519"
        intents = (await c.get("/intents")).json()
        assert intents["count"] == 13 and {i["intent"] for i in intents["intents"]} >= {"chat", "call:voice"}

        r = await c.post("/open", json={"agent": "Alice.aint", "target": "bob", "intent": "chat", "metadata": {"m": 1}})
        assert r.status_code == 200
        opened = r.json()
        assert set(opened) >= {"channel_id", "intent", "route", "state", "agent", "target", "tbz_hash"}
        assert (opened["agent"], opened["target"], opened["state"]) == ("alice", "bob", "open")
        assert opened["route"]["backend"] == "ipoll" and opened["route"]["description"] == "Text messaging"
        cid = opened["channel_id"]

        sent = (await c.post("/send", json={"channel_id": cid, "payload": {"text": "hi"}})).json()
        assert set(sent) >= {"delivered", "channel_id", "seq", "tbz_hash", "route"} and sent["seq"] == 1
        reply = (await c.post("/send", json={"channel_id": cid, "payload": "back", "agent": "bob"})).json()
        assert reply["seq"] == 2

        listed = (await c.get("/channels", params={"agent": "bob"})).json()
        assert [ch["channel_id"] for ch in listed["channels"]] == [cid]
        info = (await c.get(f"/channel/{cid}", params={"agent": "alice"})).json()
        assert info["frames"] == 2 and info["metadata"] == {"m": 1} and info["state"] == "open"

        got = (await c.get(f"/channel/{cid}/frames", params={"agent": "bob", "after": 0})).json()
        assert [f["payload"] for f in got["frames"]] == [{"text": "hi"}] and got["next_after"] == 1
        got = (await c.get(f"/channel/{cid}/frames", params={"agent": "alice"})).json()
        assert [f["payload"] for f in got["frames"]] == ["back"]

        closed = (await c.post("/close", json={"channel_id": cid, "reason": "bye", "agent": "alice"})).json()
        assert closed["state"] == "closed" and closed["reason"] == "bye" and closed["seq"] == 3
        assert (await c.post("/send", json={"channel_id": cid, "payload": 1})).json()["error"] == "channel_closed"
        info = (await c.get(f"/channel/{cid}", params={"agent": "bob"})).json()
        assert info["state"] == "closed" and info["close_reason"] == "bye"


async def test_rest_long_poll_is_woken_by_a_send(server: ServeInfo) -> None:
    async with httpx.AsyncClient(base_url=server.url + "/api/mux", timeout=10) as c:
        cid = (await c.post("/open", json={"agent": "a", "target": "b"})).json()["channel_id"]
        result: dict[str, Any] = {}

        async def poll() -> None:
            r = await c.get(f"/channel/{cid}/frames", params={"agent": "b", "after": 0, "wait": 5})
            result.update(r.json())

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                await trio.sleep(0.2)
                assert not result
                await c.post("/send", json={"channel_id": cid, "payload": {"late": True}})
        assert [f["payload"] for f in result["frames"]] == [{"late": True}]
        # nothing new: a short wait returns empty, not an error
        r = (await c.get(f"/channel/{cid}/frames", params={"agent": "b", "after": 1, "wait": 1})).json()
        assert r["frames"] == [] and r["next_after"] == 1


async def test_rest_bad_input_gets_json_errors(server: ServeInfo) -> None:
    async with httpx.AsyncClient(base_url=server.url + "/api/mux") as c:
        cases = [
            (await c.post("/open", content=b"{nope"), 400, "invalid_json"),
            (await c.post("/open", content=b"[1,2]"), 400, "invalid_json"),
            (await c.post("/open", json={"agent": "a"}), 400, "bad_request"),
            (await c.post("/open", json={"agent": "a", "target": "a"}), 400, "bad_target"),
            (await c.post("/open", json={"agent": "a b", "target": "x"}), 400, "bad_agent"),
            (await c.post("/open", json={"agent": "a", "target": "x", "intent": "::"}), 400, "bad_intent"),
            (await c.post("/open", json={"agent": "a", "target": "x", "metadata": [1]}), 400, "bad_request"),
            (await c.post("/send", json={"channel_id": "ch-" + "0" * 32, "payload": 1}), 404, "unknown_channel"),
            (await c.post("/send", json={"channel_id": "ch-x"}), 400, "bad_request"),
            (await c.get("/channels"), 400, "bad_request"),
            (await c.get("/nothing-here"), 404, "not_found"),
        ]
        for response, status, code in cases:
            assert (response.status_code, response.json()["error"]) == (status, code), response.text
            assert response.json()["detail"]
        assert (await c.get("/status")).status_code == 200
    # an oversize body is refused from its Content-Length, before it is read
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            head = (
                "POST /api/mux/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {2 << 20}\r\n\r\n"
            )
            await stream.send_all(head.encode() + b"x" * 1000)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"413"
    assert orjson.loads(rest.split(b"\r\n\r\n", 1)[1])["error"] == "message_too_large"


async def test_two_agents_multiplex_many_channels_both_ways(server: ServeInfo) -> None:
    async with httpx.AsyncClient() as c:
        key = (await c.get(server.url + "/api/mux/keys")).json()["keys"][0]["public_key"]
    async with (
        open_ws(ws_url(server.url, "alice")) as a,
        open_ws(ws_url(server.url, "bob")) as b,
    ):
        hello = await recv(a)
        assert hello["event"] == "connected" and hello["public_key"] == key
        await recv(b)
        intents = ["chat", "session", "iot:sensor", "stream"]
        for i, intent in enumerate(intents):
            await send(a, action="open", target="bob", intent=intent, ref=i)
        opened = {}
        for _ in intents:
            ev = await recv(a)
            assert ev["event"] == "channel_opened" and ev["role"] == "opener"
            opened[ev["ref"]] = ev["channel_id"]
        incoming = [await recv(b) for _ in intents]
        assert {ev["channel_id"] for ev in incoming} == set(opened.values())
        assert all(ev["role"] == "target" and ev["agent"] == "alice" for ev in incoming)

        # interleave sends on all channels, in both directions, JSON and binary
        for n in range(5):
            for i, cid in opened.items():
                await send(a, action="send", channel_id=cid, payload={"n": n, "ch": cid}, ref=f"a{i}.{n}")
                await b.send_message(pack_binary({"action": "send", "channel_id": cid}, bytes([n, i]) * 10))
        total = 5 * len(opened)
        got_b: dict[str, list[Any]] = {cid: [] for cid in opened.values()}
        got_a: dict[str, list[Any]] = {cid: [] for cid in opened.values()}
        acks = {"a": 0, "b": 0}
        with trio.fail_after(10):
            while sum(map(len, got_b.values())) < total or acks["b"] < total:
                ev = await recv(b)
                if ev["event"] == "frame":
                    mux.verify_frame(frame_of(ev), key)
                    assert ev["payload"]["ch"] == ev["channel_id"] and ev["sender"] == "alice"
                    got_b[ev["channel_id"]].append(ev["payload"]["n"])
                else:
                    assert ev["event"] == "frame_ack" and ev["delivered"], ev
                    acks["b"] += 1
            while sum(map(len, got_a.values())) < total or acks["a"] < total:
                ev = await recv(a)
                if ev["event"] == "frame":
                    assert ev["enc"] == "bytes" and ev["sender"] == "bob"
                    mux.verify_frame(frame_of(ev), key)
                    got_a[ev["channel_id"]].append(ev["payload"][0])
                else:
                    assert ev["event"] == "frame_ack" and ev["delivered"], ev
                    acks["a"] += 1
        assert all(v == list(range(5)) for v in got_b.values())
        assert all(v == list(range(5)) for v in got_a.values())

        first = opened[0]
        await send(b, action="close", channel_id=first, reason="done", ref="c")
        closed_b = await recv_until(b, lambda e: e.get("event") == "channel_closed")
        closed_a = await recv_until(a, lambda e: e.get("event") == "channel_closed")
        assert closed_b["ref"] == "c" and closed_a["reason"] == closed_b["reason"] == "done"
        assert closed_a["by"] == "bob"
        await send(a, action="list", ref="l")
        listed = await recv_until(a, lambda e: e.get("event") == "channel_list")
        assert {c["channel_id"] for c in listed["channels"]} == set(opened.values()) - {first}

        async with httpx.AsyncClient() as c:
            chain = (await c.get(server.url + f"/api/mux/channel/{opened[1]}/frames", params={"agent": "bob"})).json()
        assert len(chain["frames"]) == 5


async def test_third_agent_cannot_see_or_use_channels(server: ServeInfo) -> None:
    async with (
        open_ws(ws_url(server.url, "a")) as a,
        open_ws(ws_url(server.url, "b")) as b,
        open_ws(ws_url(server.url, "x")) as x,
        httpx.AsyncClient(base_url=server.url + "/api/mux") as c,
    ):
        for ws in (a, b, x):
            await recv(ws)
        await send(a, action="open", target="b", intent="chat")
        cid = (await recv(a))["channel_id"]
        await recv(b)
        for action in ({"action": "send", "payload": 1}, {"action": "close"}):
            await send(x, channel_id=cid, ref=1, **action)
            err = await recv(x)
            assert (err["error"], err["channel_id"], err["ref"]) == ("forbidden", cid, 1)
        await send(x, action="list")
        assert (await recv(x))["channels"] == []
        for path in (f"/channel/{cid}", f"/channel/{cid}/frames"):
            r = await c.get(path, params={"agent": "x"})
            assert (r.status_code, r.json()["error"]) == (403, "forbidden")
        r = await c.post("/send", json={"channel_id": cid, "payload": 1, "agent": "x"})
        assert r.status_code == 403
        r = await c.post("/close", json={"channel_id": cid, "agent": "x"})
        assert r.status_code == 403
        assert (await c.get("/channels", params={"agent": "x"})).json()["channels"] == []
        # the channel still works for its ends
        await send(a, action="send", channel_id=cid, payload={"ok": 1})
        assert (await recv(a))["event"] == "frame_ack"
        assert (await recv(b))["payload"] == {"ok": 1}


async def test_every_bad_message_fails_alone(server: ServeInfo) -> None:
    async with open_ws(ws_url(server.url, "a")) as a, open_ws(ws_url(server.url, "b")) as b:
        await recv(a)
        await recv(b)
        await send(a, action="open", target="b", intent="session")
        cid = (await recv(a))["channel_id"]
        await recv(b)
        bad: list[tuple[str | bytes, str]] = [
            ("{not json", "invalid_json"),
            ("[1, 2]", "invalid_json"),
            ('{"no_action": 1}', "bad_request"),
            ('{"action": "teleport"}', "unknown_action"),
            ('{"action": "send", "payload": 1}', "bad_request"),
            ('{"action": "send", "channel_id": 5, "payload": 1}', "bad_request"),
            ('{"action": "open"}', "bad_request"),
            ('{"action": "open", "target": "b", "metadata": "x"}', "bad_request"),
            ('{"action": "open", "target": "B B"}', "bad_agent"),
            ('{"action": "open", "target": "b", "intent": "a::b"}', "bad_intent"),
            (
                orjson.dumps({"action": "send", "channel_id": "ch-" + "f" * 32, "payload": 1}).decode(),
                "unknown_channel",
            ),
            (orjson.dumps({"action": "send", "channel_id": "nope", "payload": 1}).decode(), "unknown_channel"),
            (
                orjson.dumps({"action": "send", "channel_id": cid, "payload": "x", "enc": "base64"}).decode(),
                "bad_payload",
            ),
            ("x" * ((1 << 20) + 1), "message_too_large"),
            (b"\x00\x00", "bad_binary"),
            (b"\x00\x00\x00\xff{}", "bad_binary"),
            (pack_binary({"action": "open"}, b""), "bad_binary"),
            ('{"action": "ping", "ref": {"obj": 1}}', "bad_request"),
        ]
        for message, code in bad:
            await a.send_message(message)
            err = await recv(a)
            assert err.get("error") == code, (message[:60], err)
            assert err["detail"]
            # ...and the same socket, and the channel, work normally right after
            await send(a, action="send", channel_id=cid, payload={"ok": True})
            ack = await recv(a)
            assert ack["event"] == "frame_ack", ack
            assert (await recv(b))["payload"] == {"ok": True}


async def test_closed_socket_closes_its_channels(server: ServeInfo) -> None:
    async with open_ws(ws_url(server.url, "b")) as b:
        await recv(b)
        async with open_ws(ws_url(server.url, "a")) as a:
            await recv(a)
            await send(a, action="open", target="b", intent="stream")
            cid = (await recv(a))["channel_id"]
            await recv(b)
        ev = await recv_until(b, lambda e: e.get("event") == "channel_closed")
        assert (ev["channel_id"], ev["reason"]) == (cid, "ws_disconnect")
    async with httpx.AsyncClient() as c:
        status = (await c.get(server.url + "/api/mux/status")).json()
    assert status["channels_open"] == 0 and status["agents_attached"] == []


async def test_second_socket_for_same_agent_is_refused(server: ServeInfo) -> None:
    async with open_ws(ws_url(server.url, "a")) as a:
        await recv(a)
        async with open_ws(ws_url(server.url, "a")) as again:
            err = await recv(again)
            assert err["error"] == "agent_attached"
        await send(a, action="ping", ref=1)
        assert (await recv(a))["event"] == "pong"


async def test_graceful_shutdown_tells_clients(nursery: trio.Nursery) -> None:
    stop = trio.Event()
    settings = NodeSettings(open_mode=True, port=0, data_dir=None, graceful_timeout_s=2.0)
    info: ServeInfo = await nursery.start(
        lambda task_status: serve(settings, shutdown_trigger=stop.wait, task_status=task_status)
    )
    async with open_ws(ws_url(info.url, "a")) as a, open_ws(ws_url(info.url, "b")) as b:
        await recv(a)
        await recv(b)
        await send(a, action="open", target="b", intent="chat")
        cid = (await recv(a))["channel_id"]
        await recv(b)
        stop.set()
        for ws in (a, b):
            ev = await recv_until(ws, lambda e: e.get("event") == "channel_closed")
            assert (ev["channel_id"], ev["reason"]) == (cid, "node_shutdown")
    m = info.node.mux
    assert m is not None
    chain = await m.export(cid)
    assert chain[-1].kind == "close" and mux.verify_chain(chain, m.public_key).closed


async def test_blueprint_mounts_in_a_user_app(nursery: trio.Nursery) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    app = QuartTrio("user_app")

    @app.get("/hello")
    async def hello() -> str:
        return "hi from the user app"

    app.register_blueprint(create_blueprint(prefix="/mux", settings=NodeSettings(open_mode=True, data_dir=None)))
    cfg = Config()
    cfg.bind = ["127.0.0.1:0"]
    urls = await nursery.start(lambda task_status: hypercorn_serve(app, cfg, task_status=task_status))
    base = urls[0]
    async with httpx.AsyncClient(base_url=base) as c:
        assert (await c.get("/hello")).text == "hi from the user app"
        assert (await c.get("/mux/status")).json()["channels_open"] == 0
        opened = (await c.post("/mux/open", json={"agent": "a", "target": "b"})).json()
        assert opened["channel_id"].startswith("ch-")
    async with open_ws(base.replace("http", "ws") + "/mux/ws?agent=b") as b:
        assert (await recv(b))["event"] == "connected"
        ev = await recv(b)  # told of the channel a opened before b connected
        assert ev["event"] == "channel_opened" and ev["channel_id"] == opened["channel_id"]


@pytest.mark.parametrize("given", [True])
async def test_blueprint_can_serve_a_mux_you_own(nursery: trio.Nursery, given: bool) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    async with mux.open_mux(agent="mine") as m, m.attach("local") as local:
        app = QuartTrio("user_app")
        app.register_blueprint(create_blueprint(m, settings=NodeSettings(open_mode=True, data_dir=None)))
        cfg = Config()
        cfg.bind = ["127.0.0.1:0"]
        urls = await nursery.start(lambda task_status: hypercorn_serve(app, cfg, task_status=task_status))
        async with open_ws(urls[0].replace("http", "ws") + "/api/mux/ws?agent=remote") as r:
            assert (await recv(r))["node"] == "mine"
            await send(r, action="open", target="local", intent="chat")
            cid = (await recv(r))["channel_id"]
            ch = await local.accept()
            assert ch.id == cid
            await ch.send({"from": "library"})
            ev = await recv(r)
            assert ev["event"] == "frame" and ev["payload"] == {"from": "library"}
        nursery.cancel_scope.cancel()


async def test_asgi_socket_takes_queued_messages_and_writes_several_at_once_on_hypercorn(nursery: trio.Nursery) -> None:
    """On a real Hypercorn server, ``AsgiSocket`` finds Hypercorn's stream and queue: what
    the server already holds is taken without waiting (``receive_ready``), and
    ``send_many`` writes several messages at once, each still its own WebSocket message
    (text, binary, one larger than a socket read) in order."""
    from mux.sockets import AsgiSocket, Disconnected, _plain

    seen: dict[str, Any] = {}
    closed = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send_: Any) -> None:
        sock = AsgiSocket(scope, receive, send_)
        seen["fast"] = sock._stream is not None and sock._receive_nowait is not None
        await sock.accept(None)
        seen["plain"] = sock._stream is not None and _plain(sock._stream.connection)
        taken = [await sock.receive()]
        with trio.fail_after(5):
            while len(taken) < 5:  # the rest arrive and wait in Hypercorn's queue
                await trio.sleep(0.01)
                while (message := sock.receive_ready()) is not None:
                    taken.append(message)
        assert sock.receive_ready() is None
        await sock.send_many([f"took {len(taken)}", *taken, b"\x00\x01", "big" * 40_000])
        try:
            await sock.receive()
        except Disconnected:
            closed.set()

    async with open_ws(await serve_raw(nursery, app)) as ws:
        sent: list[str | bytes] = ["one", b"\x02two", "three", "four", b"five"]
        for message in sent:
            await ws.send_message(message)
        got = [await ws.get_message() for _ in range(len(sent) + 3)]
    assert got == ["took 5", *sent, b"\x00\x01", "big" * 40_000]
    assert seen["fast"]  # the fast paths were found (else it would have worked one by one)
    assert seen["plain"]  # and the frames were built directly (no extension negotiated)
    with trio.fail_after(5):
        await closed.wait()  # and the socket saw the client go
    nursery.cancel_scope.cancel()


async def test_asgi_socket_reports_a_disconnect_behind_ready_messages_at_the_next_receive(
    nursery: trio.Nursery,
) -> None:
    """A client that sends and closes at once: ``receive_ready`` hands over every message
    the server holds, never raises, and the next ``receive`` reports the disconnect."""
    from mux.sockets import AsgiSocket, Disconnected

    result: dict[str, Any] = {}
    done = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send_: Any) -> None:
        sock = AsgiSocket(scope, receive, send_)
        await sock.accept(None)
        await trio.sleep(0.3)  # the messages and the close all arrive meanwhile
        taken = [await sock.receive()]
        while (message := sock.receive_ready()) is not None:
            taken.append(message)
        result["taken"] = taken
        result["again"] = sock.receive_ready()
        try:
            await sock.receive()
        except Disconnected:
            result["disconnected"] = True
        done.set()

    async with open_ws(await serve_raw(nursery, app)) as ws:
        for i in range(4):
            await ws.send_message(f"m{i}")
    with trio.fail_after(5):
        await done.wait()
    assert result == {"taken": ["m0", "m1", "m2", "m3"], "again": None, "disconnected": True}
    nursery.cancel_scope.cancel()


async def test_asgi_socket_sends_through_wsproto_when_permessage_deflate_is_negotiated(
    nursery: trio.Nursery,
) -> None:
    """A client that negotiates permessage-deflate (as browsers do) gets ``send_many``'s
    messages compressed by the connection's own wsproto, not as plain frames, and intact."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Message, Request, TextMessage
    from wsproto.extensions import PerMessageDeflate

    from mux.sockets import AsgiSocket, _plain

    seen: dict[str, Any] = {}
    sent: list[str | bytes] = ["hello", b"\x00\x01" * 10, "z" * 70_000, "é"]

    async def app(scope: dict[str, Any], receive: Any, send_: Any) -> None:
        sock = AsgiSocket(scope, receive, send_)
        await sock.accept(None)
        assert sock._stream is not None
        seen["plain"] = _plain(sock._stream.connection)
        await sock.send_many(sent)
        await trio.sleep_forever()

    url = await serve_raw(nursery, app)
    host, port = url.removeprefix("ws://").rstrip("/").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=host, target="/", extensions=[PerMessageDeflate()])))
    got: list[str | bytes] = []
    partial: list[Any] = []
    received = 0  # every byte from the node: the handshake response and the messages
    with trio.fail_after(5):
        while len(got) < len(sent):
            data = await stream.receive_some(65536)
            assert data
            received += len(data)
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    assert [e.name for e in event.extensions] == ["permessage-deflate"]
                elif isinstance(event, Message):
                    partial.append(event.data)
                    if event.message_finished:
                        got.append("".join(partial) if isinstance(event, TextMessage) else b"".join(partial))
                        partial = []
    await stream.aclose()
    assert got == sent
    assert seen["plain"] is False  # wsproto framed (and compressed) them
    assert received < 1000  # 70 KB of "z" went compressed
    nursery.cancel_scope.cancel()
