"""The HTTP face of a node: a Quart Blueprint with the seed's REST routes and the WebSocket.

``create_blueprint`` gives the routes to mount in any QuartTrio app (prefix configurable);
``create_app`` builds the standalone app. Both feed the one intent router of a
:class:`~mux.core.Mux`: either one you pass in, or one the blueprint runs in the app's
nursery from startup to shutdown. Every failure is a JSON body ``{"error": CODE, ...}``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio
from quart import Blueprint, Response, current_app, request, websocket
from quart_trio import QuartTrio

from . import wire
from .agents import normalize_agent
from .core import Mux, start_mux
from .errors import BadRequest, MuxError
from .session import Outgoing, WireSession
from .settings import NodeSettings
from .signing import NodeKey
from .storage import STORE_FILE, MemoryStore, SqliteStore, Store

__all__ = ["HTTP_STATUS", "Node", "create_app", "create_blueprint"]

log = logging.getLogger("mux.app")

HTTP_STATUS: dict[str, int] = {
    "forbidden": 403,
    "unknown_channel": 404,
    "channel_closed": 409,
    "agent_attached": 409,
    "payload_too_large": 413,
    "message_too_large": 413,
    "throttled": 429,
    "receiver_full": 429,
    "channel_limit": 429,
    "backend_error": 502,
}
"""HTTP status of each error code on REST (anything else from a MuxError is 400)."""


@attrs.define(eq=False)
class Node:
    """The running node behind a blueprint: its Mux, settings and live sessions."""

    settings: NodeSettings
    mux: Mux | None = None
    owns_mux: bool = False
    sessions: set[WireSession] = attrs.field(factory=set)
    shutting_down: trio.Event = attrs.field(factory=trio.Event)

    def require(self) -> Mux:
        """The Mux, or a clear error when the app is not serving."""
        if self.mux is None:
            raise MuxError("the node is not running", code="not_running")
        return self.mux

    async def start(self, nursery: trio.Nursery) -> None:
        """Create this node's Mux in ``nursery`` (unless one was given)."""
        if self.mux is not None:
            return
        s = self.settings
        key = NodeKey.load_or_create(s.data_dir) if s.data_dir else NodeKey.generate()
        store: Store = SqliteStore(Path(s.data_dir) / STORE_FILE) if s.data_dir else MemoryStore()
        self.mux = await start_mux(nursery, agent=s.agent, key=key, config=s.mux, store=store)
        self.owns_mux = True

    async def shutdown(self, reason: str = "node_shutdown") -> None:
        """Close every channel (signed close frames), tell clients, close their sockets.

        Waits up to ``graceful_timeout_s`` for sockets to flush their last events.
        """
        if self.shutting_down.is_set():
            return
        if self.mux is not None:
            await self.mux.aclose(reason)
        self.shutting_down.set()
        with trio.move_on_after(self.settings.graceful_timeout_s):
            while self.sessions:  # noqa: ASYNC110  (sockets leave as they flush; bounded poll)
                await trio.sleep(0.01)

    def status(self) -> dict[str, Any]:
        """``Mux.status()`` plus transport facts."""
        out = self.require().status()
        out["tls"] = "TLSv1.3" if self.settings.tls else None
        out["connections"] = len(self.sessions)
        out["protocols"] = ["h2", "http/1.1"] if self.settings.tls else ["http/1.1", "h2c"]
        return out


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status=status, mimetype="application/json")


def _error(exc: MuxError) -> Response:
    response = _json(exc.to_wire(), HTTP_STATUS.get(exc.code, 400))
    if exc.code == "message_too_large":
        # the unread body is still on the wire: this connection cannot carry another request
        response.headers["Connection"] = "close"
    return response


async def _body(limit: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(f"body is {request.content_length} bytes, over the limit of {limit}", code="message_too_large")
    raw = await request.get_data(cache=False, as_text=False)
    if len(raw) > limit:
        raise BadRequest(f"body over the limit of {limit} bytes", code="message_too_large")
    try:
        data = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object", code="invalid_json")
    return data


def _caller(body: dict[str, Any] | None = None, *, required: bool) -> str | None:
    """The agent making the request: body ``agent``, ``?agent=``, or ``X-Mux-Agent``."""
    name = (body or {}).get("agent") or request.args.get("agent") or request.headers.get("X-Mux-Agent")
    if name is None:
        if required:
            raise BadRequest("name the calling agent (?agent=, body agent or X-Mux-Agent)", code="bad_request")
        return None
    return normalize_agent(name)


def _field(body: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    if key not in body or body[key] is None:
        if default is ...:
            raise BadRequest(f"missing field {key!r}", code="bad_request")
        return default
    if not isinstance(body[key], kind):
        raise BadRequest(f"field {key!r} must be {kind.__name__}", code="bad_request")
    return body[key]


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"?{name}= must be an integer", code="bad_request") from None
    return max(lo, min(hi, value))


def _seconds_arg(name: str) -> float:
    raw = request.args.get(name)
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"?{name}= must be a number of seconds", code="bad_request") from None
    if not math.isfinite(value):
        raise BadRequest(f"?{name}= must be finite", code="bad_request")
    return max(0.0, value)


def create_blueprint(
    mux: Mux | None = None,
    *,
    prefix: str = "/api/mux",
    settings: NodeSettings | None = None,
    name: str = "mux",
) -> Blueprint:
    """The mux routes as a Blueprint under ``prefix``.

    With ``mux`` given, the routes serve it (you own its lifetime); otherwise the blueprint
    starts a Mux from ``settings`` in the app's nursery when the app starts serving and
    closes its channels (reason ``node_shutdown``) when it stops.
    """
    node = Node(settings or NodeSettings(data_dir=None), mux=mux)
    bp = Blueprint(name, __name__, url_prefix=prefix)
    bp.node = node  # type: ignore[attr-defined]
    limit = node.settings.max_message_bytes

    @bp.before_app_serving
    async def _start() -> None:
        await node.start(current_app.nursery)  # type: ignore[attr-defined]

    @bp.after_app_serving
    async def _stop() -> None:
        if node.owns_mux:
            await node.shutdown()

    @bp.errorhandler(MuxError)
    async def _mux_error(exc: MuxError) -> Response:
        return _error(exc)

    @bp.post("/open")
    async def open_channel() -> Response:
        body = await _body(limit)
        m = node.require()
        agent = _caller(body, required=True)
        ch = m.open_nowait(
            _field(body, "target", str),
            _field(body, "intent", str, "stream"),
            _field(body, "metadata", dict, {}),
            agent,
            attach=False,
        )
        s = ch._state
        return _json(
            {
                "channel_id": ch.id,
                "intent": ch.intent,
                "route": s.route(),
                "state": s.state,
                "agent": ch.agent,
                "target": ch.target,
                "tbz_hash": ch.tbz_hash,
                "seq": 0,
                "policy": s.intent.policy.to_dict(),
            }
        )

    @bp.post("/send")
    async def send() -> Response:
        body = await _body(limit)
        m = node.require()
        channel_id = _field(body, "channel_id", str)
        if "payload" not in body:
            raise BadRequest("missing field 'payload'", code="bad_request", channel_id=channel_id[:80])
        caller = _caller(body, required=False)
        state = m.channel_state(channel_id, caller=caller)
        receipt = m._post(state, caller or state.agent, body["payload"])
        if receipt.stored:
            await m.store.flushed(receipt.position)
        f = receipt.frame
        return _json(
            {
                "delivered": receipt.delivered,
                "stored": receipt.stored,
                "disposition": receipt.disposition.value,
                "channel_id": f.channel_id,
                "seq": f.seq,
                "tbz_hash": f.tbz_hash,
                "sig": f.sig,
                "route": state.route(),
            }
        )

    @bp.post("/close")
    async def close() -> Response:
        body = await _body(limit)
        m = node.require()
        channel_id = _field(body, "channel_id", str)
        reason = _field(body, "reason", str, "closed")
        caller = _caller(body, required=False)
        state = m.channel_state(channel_id, caller=caller)
        frame = m._close_nowait(state, reason, by=caller or state.agent)
        return _json(
            {
                "channel_id": channel_id,
                "state": "closed",
                "reason": state.close_reason,
                "seq": frame.seq,
                "tbz_hash": frame.tbz_hash,
            }
        )

    @bp.post("/ack")
    async def ack() -> Response:
        body = await _body(limit)
        m = node.require()
        agent = _caller(body, required=True)
        assert agent is not None
        channel_id = _field(body, "channel_id", str)
        seq = _field(body, "seq", int)
        removed = m.ack(agent, channel_id, seq)
        return _json({"channel_id": channel_id, "seq": seq, "removed": removed})

    @bp.get("/channels")
    async def channels() -> Response:
        agent = _caller(required=True)
        found = node.require().channels(agent=agent)
        return _json({"agent": agent, "channels": found, "count": len(found)})

    @bp.get("/channel/<channel_id>")
    async def channel(channel_id: str) -> Response:
        agent = _caller(required=True)
        return _json(node.require().channel_state(channel_id, caller=agent).info())

    @bp.get("/channel/<channel_id>/frames")
    async def frames(channel_id: str) -> Response:
        agent = _caller(required=True)
        m = node.require()
        state = m.channel_state(channel_id, caller=agent)
        after = _int_arg("after", 0, -1, 2**62)
        limit_n = _int_arg("limit", 100, 1, 1000)
        wait_s = min(_seconds_arg("wait"), node.settings.longpoll_max_s)

        async def pick() -> list[dict[str, Any]]:
            return [f.to_dict() for f in await m.store.chain(channel_id, after) if f.target == agent][:limit_n]

        found = await pick()
        if not found and wait_s > 0 and state.is_open:
            with trio.move_on_after(wait_s):
                while not found and state.is_open:
                    await state.appended.park()
                    found = await pick()
            found = found or await pick()
        next_after = found[-1]["seq"] if found else after
        return _json({"channel_id": channel_id, "frames": found, "next_after": next_after, "state": state.state})

    @bp.get("/channel/<channel_id>/chain")
    async def chain(channel_id: str) -> Response:
        agent = _caller(required=True)
        frames = await node.require().export(channel_id, caller=agent)
        body = b"".join(f.to_json() + b"\n" for f in frames)
        return Response(body, status=200, mimetype="application/x-ndjson")

    @bp.get("/intents")
    async def intents() -> Response:
        table = node.require().intents()
        return _json({"intents": table, "count": len(table)})

    @bp.get("/status")
    async def status() -> Response:
        return _json(node.status())

    @bp.get("/keys")
    async def keys() -> Response:
        m = node.require()
        return _json(
            {"node": m.agent, "keys": [{"kid": m.public_key[:16], "alg": "ed25519", "public_key": m.public_key}]}
        )

    @bp.websocket("/ws")
    async def ws() -> None:
        await _serve_socket(node)

    return bp


async def _serve_socket(node: Node) -> None:
    """One WebSocket: hello, then actions in and events out until either side goes away."""
    m = node.require()
    try:
        agent = normalize_agent(websocket.args.get("agent", ""))
        endpoint = m.attach(agent)
    except MuxError as exc:
        await websocket.accept()
        await websocket.send(wire.error_event(exc))
        await websocket.close(4409 if exc.code == "agent_attached" else 4400, exc.code)
        return
    resumable = websocket.args.get("resumable", "") in ("1", "true", "yes")
    session = WireSession(
        m,
        endpoint,
        max_message_bytes=node.settings.max_message_bytes,
        resume_grace_s=node.settings.resume_grace_s if resumable else None,
    )
    node.sessions.add(session)
    out_send, out_recv = trio.open_memory_channel[Outgoing](node.settings.outbox_messages)
    try:
        await websocket.accept()
        await websocket.send(session.hello())
        async with trio.open_nursery() as nursery:
            replies = out_send.clone()
            await nursery.start(session.run, out_send)
            writer = _Writer(out_recv)
            nursery.start_soon(writer.run)
            nursery.start_soon(_close_on_shutdown, node, session, writer, nursery.cancel_scope)
            async with replies:
                while True:
                    message = await websocket.receive()
                    for reply in session.handle(message):
                        await replies.send(reply)
    finally:
        session.close("ws_disconnect")
        node.sessions.discard(session)


@attrs.define(eq=False)
class _Writer:
    """Drains a socket's outbox onto the WebSocket; knows when everything queued is sent."""

    outbox: trio.MemoryReceiveChannel[Outgoing]
    busy: bool = False

    @property
    def idle(self) -> bool:
        """True when nothing is queued or being written."""
        return not self.busy and not self.outbox.statistics().current_buffer_used

    async def run(self) -> None:
        async with self.outbox:
            async for message in self.outbox:
                self.busy = True
                await websocket.send(message)
                self.busy = False


async def _close_on_shutdown(node: Node, session: WireSession, writer: _Writer, scope: trio.CancelScope) -> None:
    """On node shutdown: let the channel_closed events out (bounded), then close with 1001."""
    await node.shutting_down.wait()
    with trio.move_on_after(node.settings.graceful_timeout_s):
        while not session.idle or not writer.idle:  # noqa: ASYNC110  (bounded by the timeout)
            await trio.sleep(0.005)
    await websocket.close(1001, "node shutting down")
    scope.cancel()


def create_app(settings: NodeSettings | None = None, *, mux: Mux | None = None) -> QuartTrio:
    """The standalone node app: the blueprint at ``settings.prefix`` plus JSON 404/405/413."""
    settings = settings or NodeSettings()
    app = QuartTrio("mux")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_message_bytes
    bp = create_blueprint(mux, prefix=settings.prefix, settings=settings)
    app.register_blueprint(bp)
    app.extensions["mux"] = bp.node  # type: ignore[attr-defined]

    for status, code in ((404, "not_found"), (405, "method_not_allowed"), (413, "message_too_large")):

        async def handler(exc: Exception, _status: int = status, _code: str = code) -> Response:
            return _json({"error": _code, "detail": str(getattr(exc, "description", exc))}, _status)

        app.register_error_handler(status, handler)
    return app
