"""The HTTP face of a node: a Quart Blueprint with the seed's REST routes and the WebSocket.

``create_blueprint`` gives the routes to mount in any QuartTrio app (prefix configurable);
``create_app`` builds the standalone app. Both feed the one intent router of a
:class:`~mux.core.Mux`: either one you pass in, or one the blueprint runs in the app's
nursery from startup to shutdown. Every failure is a JSON body ``{"error": CODE, ...}``.
Each WebSocket connection is served by ``mux.connection.serve_socket``.
"""

from __future__ import annotations

import collections
import gc
import logging
import math
import sys
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio
from quart import Blueprint, Response, current_app, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import downlink, open_files
from .auth import REVOKED_FILE, Authenticator, Grant, Revocations, bearer_token
from .bandwidth import TokenBucket
from .connection import serve_socket, watchdog
from .core import Mux, start_mux
from .errors import BadRequest, MuxError
from .frames import Frame
from .heap import allocator, jemalloc_stats, resident, shrink, trimmer
from .outbox import WriteThrough
from .session import WireSession
from .settings import NodeSettings
from .signing import NodeKey
from .sockets import FastSocketApp, QuartSocket
from .storage import STORE_FILE, MemoryStore, SqliteStore, Store
from .writer import Writer

__all__ = ["HTTP_STATUS", "Node", "create_app", "create_blueprint", "node_asgi", "serve_socket"]

log = logging.getLogger("mux.app")

HTTP_STATUS: dict[str, int] = {
    "unauthenticated": 401,
    "bad_token": 401,
    "token_expired": 401,
    "token_revoked": 401,
    "agent_mismatch": 403,
    "intent_forbidden": 403,
    "rate_limited": 429,
    "too_many_connections": 503,
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
    sessions: dict[WireSession, Writer | None] = attrs.field(factory=dict)
    """Each live connection and, once it sends, its writer (shutdown, slow-consumer watchdog)."""
    shutting_down: trio.Event = attrs.field(factory=trio.Event)
    closed_sessions: int = 0
    """WebSocket connections that ended (counted for ``mux.heap``)."""
    write_through: WriteThrough = attrs.field(factory=WriteThrough)
    """What the server readers' turns give waiting writers, written at the turn's end."""
    _auth: Authenticator | None = None
    _rest_buckets: collections.OrderedDict[str, TokenBucket] = attrs.field(factory=collections.OrderedDict)

    @property
    def auth(self) -> Authenticator:
        """Token checking with this node's key (open mode when ``settings.open_mode``)."""
        if self._auth is None:
            m = self.require()
            revoked = Path(self.settings.data_dir) / REVOKED_FILE if self.settings.data_dir else None
            self._auth = Authenticator(m.key, Revocations(revoked), open_mode=self.settings.open_mode)
        return self._auth

    def caller(self, body: dict[str, Any] | None = None, *, required: bool = True) -> Grant | None:
        """The authenticated caller of this REST request (rate-limited per agent).

        The token comes from ``Authorization: Bearer`` or ``?token=``; a named agent (body
        ``agent``, ``?agent=``, ``X-Mux-Agent``) must be the token's. In open mode an unnamed
        caller of a call that does not require one is None (the seed's behaviour)."""
        claimed = (body or {}).get("agent") or request.args.get("agent") or request.headers.get("X-Mux-Agent")
        if claimed is not None and not isinstance(claimed, str):
            raise BadRequest("agent must be a string", code="bad_agent")
        token = bearer_token(request.headers.get("Authorization")) or request.args.get("token")
        if self.settings.open_mode and claimed is None and not required:
            return None
        grant = self.auth.authenticate(token, claimed)
        self._rate_check(grant.agent)
        return grant

    def _rate_check(self, agent: str) -> None:
        s = self.settings
        if s.rate_messages_per_s <= 0:
            return
        bucket = self._rest_buckets.get(agent)
        if bucket is None:
            bucket = self._rest_buckets[agent] = TokenBucket(int(s.rate_messages_per_s), s.rate_burst)
            while len(self._rest_buckets) > 10_000:
                self._rest_buckets.popitem(last=False)
        if not bucket.take(1, trio.current_time()):
            raise MuxError(f"over {s.rate_messages_per_s:g} requests/s for {agent}; slow down", code="rate_limited")

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
        store: Store = (
            SqliteStore(Path(s.data_dir) / STORE_FILE) if s.data_dir else MemoryStore.holding(s.memory_ledger_bytes)
        )
        self.mux = await start_mux(nursery, agent=s.agent, key=key, config=s.mux, store=store)
        self.owns_mux = True
        if s.trim_after_closes > 0:
            m = self.mux
            nursery.start_soon(
                partial(
                    trimmer,
                    lambda: m._stats["closed"] + self.closed_sessions,
                    threshold=s.trim_after_closes,
                    compact=self.compact,
                )
            )

    def compact(self) -> int:
        """The trimmer's compact (after a burst of closes): the Mux's (:meth:`Mux.compact`),
        then the node's table of connections where a burst of them grew it (72 KiB after
        2,000); returns the bytes the tables gave back."""
        return self.require().compact() + shrink(self.sessions)

    async def shutdown(self, reason: str = "node_shutdown") -> None:
        """Close every channel (signed close frames), tell clients, close their sockets.

        Waits up to ``graceful_timeout_s`` for sockets to flush their last events.
        """
        if self.shutting_down.is_set():
            return
        if self.mux is not None:
            await self.mux.aclose(reason)
        self.shutting_down.set()
        grace = self.settings.graceful_timeout_s
        with trio.move_on_after(grace):  # let the channel_closed events out
            while any(not (s.idle and w.idle) for s, w in self.writing()):  # noqa: ASYNC110  (bounded)
                await trio.sleep(0.005)
        for _, writer in self.writing():
            writer.close_when_sent()  # after whatever is still queued
        with trio.move_on_after(grace):
            while self.sessions:  # noqa: ASYNC110  (sockets leave as they close; bounded poll)
                await trio.sleep(0.01)

    def writing(self) -> list[tuple[WireSession, Writer]]:
        """The connections whose writer runs."""
        return [(s, w) for s, w in self.sessions.items() if w is not None]

    def status(self) -> dict[str, Any]:
        """``Mux.status()`` plus transport facts."""
        out = self.require().status()
        out["tls"] = "TLSv1.3" if self.settings.tls else None
        out["connections"] = len(self.sessions)
        collections_done = gc.get_stats()
        rss, rss_peak = resident()
        out["memory"] = {
            "rss_bytes": rss,
            "rss_peak_bytes": rss_peak,
            "allocator": allocator(),
            "heap_blocks": sys.getallocatedblocks(),
            "jemalloc": jemalloc_stats(),
            "gc_frozen": gc.get_freeze_count(),
            "gc_collections": [g["collections"] for g in collections_done],
            "gc_collected": sum(g["collected"] for g in collections_done),
        }
        out["open_files"] = open_files.status()
        out["probes"] = downlink.status((s.probes, s.outbox.bulk_held) for s in self.sessions if s.probes is not None)
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


def _agent(grant: Grant | None) -> str:
    assert grant is not None
    return grant.agent


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


_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "message_too_large"}


async def _http_error(exc: HTTPException) -> Response:
    """Quart's own HTTP errors (routing, methods, sizes) as JSON bodies with a code."""
    status = exc.code or 400
    return _json({"error": _HTTP_CODES.get(status, "bad_request"), "detail": exc.description or ""}, status)


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
        current_app.nursery.start_soon(watchdog, node)  # type: ignore[attr-defined]

    @bp.after_app_serving
    async def _stop() -> None:
        if node.owns_mux:
            await node.shutdown()

    @bp.errorhandler(MuxError)
    async def _mux_error(exc: MuxError) -> Response:
        return _error(exc)

    bp.register_error_handler(HTTPException, _http_error)

    @bp.errorhandler(Exception)
    async def _internal_error(exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.path)
        return _json({"error": "internal_error", "detail": "the node failed on this request (logged)"}, 500)

    @bp.post("/open")
    async def open_channel() -> Response:
        body = await _body(limit)
        m = node.require()
        grant = node.caller(body)
        assert grant is not None
        intent = _field(body, "intent", str, "stream")
        grant.check_intent(intent)
        ch = m.open_nowait(
            _field(body, "target", str),
            intent,
            _field(body, "metadata", dict, {}),
            grant.agent,
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
        grant = node.caller(body, required=False)
        caller = grant.agent if grant else None
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
        grant = node.caller(body, required=False)
        caller = grant.agent if grant else None
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
        agent = _agent(node.caller(body))
        channel_id = _field(body, "channel_id", str)
        seq = _field(body, "seq", int)
        removed = m.ack(agent, channel_id, seq)
        return _json({"channel_id": channel_id, "seq": seq, "removed": removed})

    @bp.get("/channels")
    async def channels() -> Response:
        agent = _agent(node.caller())
        found = node.require().channels(agent=agent)
        return _json({"agent": agent, "channels": found, "count": len(found)})

    @bp.get("/channel/<channel_id>")
    async def channel(channel_id: str) -> Response:
        agent = _agent(node.caller())
        return _json(node.require().channel_state(channel_id, caller=agent).info())

    @bp.get("/channel/<channel_id>/frames")
    async def frames(channel_id: str) -> Response:
        agent = _agent(node.caller())
        m = node.require()
        state = m.channel_state(channel_id, caller=agent)
        after = _int_arg("after", 0, -1, 2**62)
        limit_n = _int_arg("limit", 100, 1, 1000)
        wait_s = min(_seconds_arg("wait"), node.settings.longpoll_max_s)

        async def pick() -> list[Frame]:
            return [f for f in await m.store.chain(channel_id, after) if f.target == agent][:limit_n]

        found = await pick()
        if not found and wait_s > 0 and state.is_open:
            with trio.move_on_after(wait_s):
                while not found and state.is_open:
                    if state.appended is None:
                        state.appended = trio.lowlevel.ParkingLot()
                    await state.appended.park()
                    found = await pick()
            found = found or await pick()
        next_after = found[-1].seq if found else after
        frames = [orjson.Fragment(f.to_json()) for f in found]  # payloads as chained, not re-encoded
        return _json({"channel_id": channel_id, "frames": frames, "next_after": next_after, "state": state.state})

    @bp.get("/channel/<channel_id>/chain")
    async def chain(channel_id: str) -> Response:
        agent = _agent(node.caller())
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

    @bp.get("/whoami")
    async def whoami() -> Response:
        token = bearer_token(request.headers.get("Authorization")) or request.args.get("token")
        who: str | None = None
        if token or node.settings.open_mode:
            try:
                who = _agent(node.caller())
            except MuxError:
                who = None
        return _json({"agent": who, "remote_addr": request.remote_addr, "scheme": request.scheme})

    @bp.get("/keys")
    async def keys() -> Response:
        m = node.require()
        return _json(
            {"node": m.agent, "keys": [{"kid": m.public_key[:16], "alg": "ed25519", "public_key": m.public_key}]}
        )

    @bp.websocket("/ws")
    async def ws() -> None:
        await serve_socket(node, QuartSocket())

    return bp


def create_app(settings: NodeSettings | None = None, *, mux: Mux | None = None) -> QuartTrio:
    """The standalone node app: the blueprint at ``settings.prefix``; every HTTP error JSON."""
    settings = settings or NodeSettings()
    app = QuartTrio("mux")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_message_bytes
    bp = create_blueprint(mux, prefix=settings.prefix, settings=settings)
    app.register_blueprint(bp)
    app.extensions["mux"] = bp.node  # type: ignore[attr-defined]

    app.register_error_handler(HTTPException, _http_error)
    return app


def node_asgi(app: QuartTrio) -> FastSocketApp:
    """``app`` (from ``create_app``) as the ASGI app a server runs: its WebSocket path is
    served straight on ASGI (``mux.sockets``), everything else by Quart."""
    node: Node = app.extensions["mux"]
    path = node.settings.prefix.rstrip("/") + "/ws"
    return FastSocketApp(app, path, partial(serve_socket, node))
