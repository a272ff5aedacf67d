"""The HTTP face of a node: a Quart Blueprint with the seed's REST routes and the WebSocket.

``create_blueprint`` gives the routes to mount in any QuartTrio app (prefix configurable);
``create_app`` builds the standalone app. Both feed the one intent router of a
:class:`~mux.core.Mux`: either one you pass in, or one the blueprint runs in the app's
nursery from startup to shutdown. Every failure is a JSON body ``{"error": CODE, ...}``.
"""

from __future__ import annotations

import collections
import gc
import logging
import math
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio
from quart import Blueprint, Response, current_app, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import wire
from .auth import REVOKED_FILE, Authenticator, Grant, Revocations
from .bandwidth import TokenBucket
from .core import Mux, start_mux
from .errors import BadRequest, MuxError
from .frames import Frame
from .heap import trimmer
from .outbox import CONTROL, CONTROL_URGENCY, Outbox, Outgoing, WriteThrough
from .session import WireSession
from .settings import NodeSettings
from .signing import NodeKey
from .sockets import Disconnected, FastSocketApp, QuartSocket, Socket
from .storage import STORE_FILE, MemoryStore, SqliteStore, Store

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
    sessions: dict[WireSession, _Writer | None] = attrs.field(factory=dict)
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
        token = _bearer(request.headers.get("Authorization")) or request.args.get("token")
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
                partial(trimmer, lambda: m._stats["closed"] + self.closed_sessions, threshold=s.trim_after_closes)
            )

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
            while any(not (s.idle and w.idle) for s, w in self._writing()):  # noqa: ASYNC110  (bounded)
                await trio.sleep(0.005)
        for _, writer in self._writing():
            writer.outbox.put_nowait(_CLOSE_KEY, _LAST_URGENCY, _CLOSE)  # after whatever is still queued
        with trio.move_on_after(grace):
            while self.sessions:  # noqa: ASYNC110  (sockets leave as they close; bounded poll)
                await trio.sleep(0.01)

    def _writing(self) -> list[tuple[WireSession, _Writer]]:
        """The connections whose writer runs."""
        return [(s, w) for s, w in self.sessions.items() if w is not None]

    def status(self) -> dict[str, Any]:
        """``Mux.status()`` plus transport facts."""
        out = self.require().status()
        out["tls"] = "TLSv1.3" if self.settings.tls else None
        out["connections"] = len(self.sessions)
        collections_done = gc.get_stats()
        out["memory"] = {
            "heap_blocks": sys.getallocatedblocks(),
            "gc_frozen": gc.get_freeze_count(),
            "gc_collections": [g["collections"] for g in collections_done],
            "gc_collected": sum(g["collected"] for g in collections_done),
        }
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


def _bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


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
        current_app.nursery.start_soon(_watchdog, node)  # type: ignore[attr-defined]

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
        token = _bearer(request.headers.get("Authorization")) or request.args.get("token")
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


def _window_arg(raw: str | None) -> int | None:
    """``?window=N`` (1 to ``wire.MAX_WINDOW`` frames per channel), or None when not given."""
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= wire.MAX_WINDOW:
        raise BadRequest(f"?window= must be a whole number of frames from 1 to {wire.MAX_WINDOW}", code="bad_request")
    return int(raw)


def _log_connected(agent: str, addr: object) -> None:
    """Log a new connection from a plain function: logging's caller lookup makes a frame
    object for the frame that called it, and a connection's handler (a coroutine that lives
    as long as the connection) would keep that object, about 300 bytes, until it ends."""
    log.info("%s connected from %s", agent, addr)


async def serve_socket(node: Node, sock: Socket) -> None:
    """One WebSocket: hello, then actions in and events out until either side goes away."""
    m = node.require()
    settings = node.settings
    token, subprotocol = _socket_token(sock)
    try:
        if len(node.sessions) >= settings.max_connections:
            raise MuxError(
                f"the node holds its maximum of {settings.max_connections} connections", code="too_many_connections"
            )
        grant = node.auth.authenticate(token, sock.args.get("agent"))
        acks = sock.args.get("acks", "all")
        if acks not in ("all", "errors"):
            raise BadRequest('?acks= must be "all" or "errors"', code="bad_request")
        live_acks = acks == "all"
        window = _window_arg(sock.args.get("window"))
        endpoint = m.attach(grant.agent)
    except MuxError as exc:
        try:
            await sock.accept(subprotocol)
            await sock.send(wire.error_event(exc))
            await sock.close(_CLOSE_CODES.get(exc.code, 4400), exc.code)
        except Disconnected:
            pass
        return
    _log_connected(grant.agent, sock.remote_addr)
    resumable = sock.args.get("resumable", "") in ("1", "true", "yes")
    session = WireSession(
        m,
        endpoint,
        max_message_bytes=settings.max_message_bytes,
        resume_grace_s=settings.resume_grace_s if resumable else None,
        grant=grant,
        rate=(settings.rate_messages_per_s, settings.rate_burst),
        live_acks=live_acks,
        window=window,
    )
    node.sessions[session] = None
    batching = sock.args.get("batch", "") in ("1", "true", "yes")
    try:
        await sock.accept(subprotocol)
        await sock.send(session.hello())
        async with trio.open_nursery() as nursery:
            session.start(nursery)
            writer = _Writer(
                sock,
                session.outbox,
                settings.send_timeout_s,
                nursery.cancel_scope,
                endpoint.agent,
                batching,
                lambda: session.holds_realtime,
            )
            nursery.start_soon(writer.run)
            session.outbox.start_writer = partial(_restart, nursery, writer)
            node.sessions[session] = writer  # watched by the node's one _watchdog
            session.outbox.write_through = node.write_through
            session.outbox.write_now = writer.write_now
            if grant.exp:
                nursery.start_soon(_expire_with_token, sock, grant, nursery.cancel_scope)
            sock.handle_inline(
                partial(_handle_inline, session, node.write_through), READ_AHEAD, None, node.write_through.flush
            )
            while True:
                try:
                    message = await sock.receive()
                except Disconnected:  # the peer went away (raw ASGI; Quart cancels the handler instead)
                    nursery.cancel_scope.cancel()
                    break
                await _handle_ready(session, sock, message)
                del message  # an idle connection keeps nothing of its last round alive
                # Writers next: the messages the server already held are handled (at most
                # READ_AHEAD), then one scheduling turn, so the writers they woke (the
                # receivers', ours for the replies) each put what they were given on the wire
                # in one write before more is taken. That paces this reader with the writers:
                # the server's socket reader meanwhile finds its queue to us full and reads
                # what has arrived in one go, not one message per read syscall (README, "For
                # speed"). A stuck writer is parked, not runnable: it is not waited for.
                # While this task waits in receive(), the server's reader handles what it
                # reads itself (_handle_inline, at most READ_AHEAD a read), and
                # its next read is that scheduling turn.
                await trio.lowlevel.checkpoint()
    except Disconnected:
        pass  # gone during the handshake
    finally:
        sock.handle_inline(None)
        session.outbox.write_now = None
        session.close("ws_disconnect")
        node.sessions.pop(session, None)
        node.closed_sessions += 1


def _restart(nursery: trio.Nursery, writer: _Writer) -> None:
    """Start a retired writer's task again (not once its connection is ending)."""
    writer.since = trio.current_time()
    try:
        nursery.start_soon(writer.run)
    except RuntimeError:  # the connection's nursery is closing: nothing more is written
        pass


async def _handle_ready(session: WireSession, sock: Socket, message: str | bytes) -> None:
    """Handle ``message`` and then the messages ``sock`` already holds (at most
    ``READ_AHEAD`` in all), queueing each one's replies."""
    outbox = session.outbox
    taken = 1
    while True:
        replies = session.handle(message)
        if replies:
            await outbox.put(CONTROL, CONTROL_URGENCY, *replies)
        ready = sock.receive_ready() if taken < READ_AHEAD else None
        if ready is None:
            return
        message, taken = ready, taken + 1


def _handle_inline(session: WireSession, through: WriteThrough, message: str | bytes) -> bool:
    """Handle ``message`` in the server's reader (``Socket.handle_inline``) when its reply
    fits in the outbox now (every action has at most one reply); else False, and the
    connection's own task handles it, waiting for room. What it gives waiting writers (its
    reply, the frames it relays) is written when the reader's turn ends (``through.flush``
    is the socket's ``inline_done``)."""
    outbox = session.outbox
    if not outbox.has_room(CONTROL):
        return False
    through.holding = True
    replies = session.handle(message)
    if replies:
        outbox.put_nowait(CONTROL, CONTROL_URGENCY, *replies)
    return True


READ_AHEAD = 16
"""Messages the server already holds that a socket's reader handles before its writers'
turn (Hypercorn queues at most 10 per connection)."""
WRITE_BYTES = wire.CHUNK_BYTES
"""Messages ready together are written at once up to this many characters in all, on a
connection that holds a real-time channel (a call's frame waits for at most that much)..."""
BULK_WRITE_BYTES = 16 * wire.CHUNK_BYTES
"""... and up to this many on one that holds none (no frame there is waiting for a gap: a
large frame's pieces go out 16 at a time, with a sixteenth of the per-write cost)."""
WRITE_MESSAGES = 64
"""... and at most this many of them."""
_CLOSE = "\x00close"
"""Put last in a connection's outbox at shutdown: its writer closes the socket (1001)."""
_CLOSE_KEY = "*close*"
_LAST_URGENCY = 1 << 20
"""The marker's own queue, less urgent than any channel: it goes out last."""
_REST = "\x00rest"
"""Put in a waiting writer's outbox when the socket took only part of a direct write
(``_Writer.write_now``): the writer writes the rest before anything else."""
_REST_KEY = "*rest*"
_FIRST_URGENCY = -(1 << 20)
"""The marker's own queue, more urgent than anything: it goes out first."""
_AGAIN_KEY = "*again*"
"""A binary message a batching writer took while gathering JSON goes back here, next in line
after the rest of a write (whatever its own key held behind it stays behind it)."""

_BATCH_HEAD = '{"event":"batch","items":['


def _unbatch(message: str) -> str:
    """The comma-joined items of a ``batch`` event (as ``wire.batch_event`` writes it), or
    ``message`` itself."""
    if message.startswith(_BATCH_HEAD) and message.endswith("]}"):
        return message[len(_BATCH_HEAD) : -2]
    return message


@attrs.define(eq=False)
class _Writer:
    """Drains a socket's outbox onto the WebSocket; knows when everything queued is sent."""

    sock: Socket
    outbox: Outbox
    send_timeout_s: float
    connection: trio.CancelScope
    agent: str
    batching: bool = False
    """The client asked (``?batch=1``) for queued JSON events in one ``batch`` message."""
    holds_realtime: Callable[[], bool] = lambda: True
    """True while the connection holds a real-time channel: writes stay within
    ``WRITE_BYTES``; else within ``BULK_WRITE_BYTES``."""
    busy: bool = False
    since: float = attrs.field(factory=trio.current_time)
    """When the last write began (or the writer was made, or started again)."""

    @property
    def idle(self) -> bool:
        """True when nothing is queued or being written."""
        return not self.busy and self.outbox.empty

    def write_now(self) -> bool:
        """While this writer waits for work (``Outbox.write_now``, in a server reader's turn):
        take what is queued as :meth:`_write` would and write it straight to the socket
        without waiting. True when that is all done; False when this writer's task has to
        go on (the socket cannot be written directly now, or took only part: the rest is
        marked to go out first, or more is queued than one write takes)."""
        if self.busy or not self.sock.direct_ready():
            return False
        message = self.outbox.get_nowait()
        if message is None:
            return True
        if message is _CLOSE or message is _REST:  # the writer's own business
            self._put_back(message)
            return False
        if not self.sock.send_now(self._one_write(message)):
            self.outbox.put_nowait(_REST_KEY, _FIRST_URGENCY, _REST)
            return False
        return not self.outbox.queued

    def _one_write(self, message: Outgoing) -> list[Outgoing]:
        """``message`` and what is ready behind it, for one write: coalesced into one
        ``batch`` for a batching client, else as :meth:`_following` takes it."""
        if self.batching and isinstance(message, str):
            return [self._coalesce(message)]
        return [message, *self._following(len(message))]

    def _coalesce(self, first: str) -> str:
        """``first`` plus whatever JSON is ready next (in urgency order), as one flat batch
        (the items of a ``batch`` reply are spliced in, never nested)."""
        items = [_unbatch(first)]
        size = len(first)
        while size < 65536 and len(items) < 128:
            nxt = self.outbox.get_nowait()
            if nxt is None:
                break
            if nxt is _CLOSE or nxt is _REST:  # the writer's markers go back
                self._put_back(nxt)
                break
            if isinstance(nxt, bytes):  # binary keeps its own message: put it back in front
                self.outbox.put_nowait(_AGAIN_KEY, _FIRST_URGENCY + 1, nxt)
                break
            items.append(_unbatch(nxt))
            size += len(nxt)
        if len(items) == 1:
            return first
        return wire.batch_event([item for item in items if item])

    async def run(self) -> None:
        """Send each message; a client that takes none for ``send_timeout_s`` is dropped
        (slow consumer): nothing queues past the outbox bounds meanwhile. Ends when the
        outbox retires it (idle; ``Outbox.retire``): the next message starts it again."""
        while (message := await self.outbox.get()) is not None and await self._write(message):
            del message  # nothing written stays referenced while we wait

    async def _write(self, message: Outgoing) -> bool:
        """Write ``message`` and whatever is ready behind it; False after the shutdown marker."""
        if message is _CLOSE:  # the node shuts down: everything before this was sent
            await self.sock.close(1001, "node shutting down")
            self.connection.cancel()
            return False
        self.busy, self.since = True, trio.current_time()
        if message is _REST:  # what the socket did not take of a direct write
            await self.sock.send_many(())
        else:
            await self.sock.send_many(self._one_write(message))
        self.busy = False
        return True

    def _following(self, size: int) -> list[Outgoing]:
        """The messages ready after one of ``size`` characters, in order, while all of them
        together stay within ``WRITE_BYTES`` (one write; a voice frame waits for at most that
        much, as for one ``frame_part``), or ``BULK_WRITE_BYTES`` with no call held."""
        out: list[Outgoing] = []
        most = WRITE_BYTES if self.holds_realtime() else BULK_WRITE_BYTES
        while len(out) < WRITE_MESSAGES:
            nxt = self.outbox.get_nowait(limit=most - size)
            if nxt is None:
                break
            if nxt is _CLOSE or nxt is _REST:  # the writer's markers go back
                self._put_back(nxt)
                break
            out.append(nxt)
            size += len(nxt)
        return out

    def _put_back(self, marker: str) -> None:
        """Queue a marker taken out of turn again: the shutdown's last, the rest's first."""
        if marker is _CLOSE:
            self.outbox.put_nowait(_CLOSE_KEY, _LAST_URGENCY, marker)
        else:
            self.outbox.put_nowait(_REST_KEY, _FIRST_URGENCY, marker)

    def stalled(self, now: float) -> bool:
        """True when a send has not completed for ``send_timeout_s`` (a slow consumer)."""
        return self.busy and now - self.since > self.send_timeout_s


async def _watchdog(node: Node) -> None:
    """Drop slow consumers, end idle writers' tasks and forget sends in pieces left
    unfinished (``pieces_idle_s``), every connection of the node from one task.

    Hypercorn writes to the socket in a shielded scope, so a send to a client that stopped
    reading cannot be cancelled: the agent leaves the mux here (its channels close with
    ``slow_consumer``, every frame queued for it is released), and the one message on the
    wire stays with the connection until the peer goes away."""
    timeout, idle_s = node.settings.send_timeout_s, node.settings.writer_idle_s
    m = node.require()
    pieces, pieces_idle_s = m.pieces, m.config.pieces_idle_s
    period = min(1.0, timeout / 4, idle_s / 2 if idle_s > 0 else 1.0, pieces_idle_s / 4 if pieces_idle_s > 0 else 1.0)
    while True:
        await trio.sleep(period)
        now = trio.current_time()
        for session, writer in node._writing():
            if writer.stalled(now):
                log.warning("%s: not reading for %.1f s, disconnected (slow consumer)", writer.agent, timeout)
                session.close("slow_consumer")
                node.sessions.pop(session, None)
                writer.connection.cancel()
            elif idle_s > 0 and not writer.busy and now - writer.since > idle_s:
                writer.outbox.retire()  # idle: its task ends until the next message
        if pieces.sends and pieces_idle_s > 0:
            for session in list(node.sessions):
                session.expire_pieces(now)


async def _expire_with_token(sock: Socket, grant: Grant, scope: trio.CancelScope) -> None:
    """End the connection when its token expires."""
    await trio.sleep(max(0.0, grant.exp / 1000 - time.time()))
    with trio.move_on_after(2):
        await sock.send(wire.error_event(MuxError("the connection's token expired", code="token_expired")))
        await sock.close(4401, "token_expired")
    scope.cancel()


_CLOSE_CODES = {
    "agent_attached": 4409,
    "unauthenticated": 4401,
    "bad_token": 4401,
    "token_expired": 4401,
    "token_revoked": 4401,
    "agent_mismatch": 4403,
    "too_many_connections": 1013,
}
"""WebSocket close codes for refused connections (4400 for anything else)."""


def _socket_token(sock: Socket) -> tuple[str | None, str | None]:
    """The bearer token of a WebSocket handshake, and the subprotocol to answer with.

    Browsers cannot set headers: besides ``Authorization: Bearer`` and ``?token=``, a client
    may offer the subprotocol ``mux.token.<TOKEN>`` (beside ``mux.v1``, which is selected)."""
    token = _bearer(sock.authorization) or sock.args.get("token")
    offered = sock.subprotocols
    for proto in offered:
        if proto.startswith("mux.token."):
            token = token or proto[len("mux.token.") :]
    selected = "mux.v1" if "mux.v1" in offered else next((p for p in offered if p.startswith("mux.token.")), None)
    return token, selected


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
