"""One WebSocket connection of a node: its handshake, its reader and its writer's task.

:func:`serve_socket` authenticates the handshake (``Authorization: Bearer``, ``?token=`` or
the ``mux.token.*`` subprotocol), attaches the agent, sends ``connected`` and then handles the
client's messages: in the server's reader while the connection's task waits (no queue, no
task switch; what that gives waiting writers is written at the end of the reader's turn,
``mux.outbox.WriteThrough``), else in its own task, at most :data:`READ_AHEAD` before its
writers' turn. Its :class:`~mux.writer.Writer` runs in the connection's nursery; the node's
one :func:`watchdog` task drops slow consumers and retires idle writers for every connection.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING

import trio

from . import wire
from .auth import Grant, bearer_token
from .errors import BadRequest, MuxError
from .outbox import CONTROL, CONTROL_URGENCY, WriteThrough
from .session import WireSession
from .sockets import AsgiSocket, Disconnected, Socket
from .writer import Writer

if TYPE_CHECKING:
    from .app import Node

__all__ = ["READ_AHEAD", "serve_socket", "watchdog"]

log = logging.getLogger("mux.app")
"""The connections' log lines keep the node's logger name (``mux.app``), as before this
module was split from it."""


def _window_arg(raw: str | None) -> int | None:
    """``?window=N`` (1 to ``wire.MAX_WINDOW`` frames per channel), or None when not given."""
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= wire.MAX_WINDOW:
        raise BadRequest(f"?window= must be a whole number of frames from 1 to {wire.MAX_WINDOW}", code="bad_request")
    return int(raw)


def _flag_arg(name: str, raw: str | None) -> bool:
    """``?NAME=1`` (or ``true``, ``yes``) on, ``0``, ``false``, ``no`` or not given off; else
    ``bad_request``: a misspelt value must not quietly turn a feature off."""
    word = (raw or "").lower()
    if word in ("1", "true", "yes"):
        return True
    if word in ("", "0", "false", "no"):
        return False
    raise BadRequest(f"?{name}= must be 1, true or yes (or 0, false, no), not {raw!r}", code="bad_request")


def _log_connected(agent: str, addr: object) -> None:
    """Log a new connection from a plain function: logging's caller lookup makes a frame
    object for the frame that called it, and a connection's handler (a coroutine that lives
    as long as the connection) would keep that object, about 300 bytes, until it ends."""
    log.info("%s connected from %s", agent, addr)


def _log_left(agent: str, seconds: float, sock: Socket, gone: Disconnected | None) -> None:
    """Log the end of a connection: how long it lasted and how it ended (``gone``: how the
    client went away, else the node ended it; Quart's route is cancelled instead when its
    client goes, so there it is only "ended"). "connection lost" is an end without the
    client's close frame, as when its peer vanished and the node's keepalive gave up on it."""
    if gone is not None:
        how = str(gone)
    else:
        how = "ended by the node" if isinstance(sock, AsgiSocket) else "ended"
    log.info("%s disconnected after %.1f s (%s)", agent, seconds, how)


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
        resumable = _flag_arg("resumable", sock.args.get("resumable"))
        batching = _flag_arg("batch", sock.args.get("batch"))
        probes = _flag_arg("probes", sock.args.get("probes"))
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
    began, gone = trio.current_time(), None
    session = WireSession(
        m,
        endpoint,
        max_message_bytes=settings.max_message_bytes,
        resume_grace_s=settings.resume_grace_s if resumable else None,
        grant=grant,
        rate=(settings.rate_messages_per_s, settings.rate_burst),
        live_acks=live_acks,
        window=window,
        probes=probes,
    )
    node.sessions[session] = None
    try:
        await sock.accept(subprotocol)
        await sock.send(session.hello())
        async with trio.open_nursery() as nursery:
            session.start(nursery)
            writer = Writer(
                sock,
                session.outbox,
                settings.send_timeout_s,
                nursery.cancel_scope,
                endpoint.agent,
                batching,
                lambda: session.holds_realtime,
                lambda: session.probes,
            )
            nursery.start_soon(writer.run)
            session.outbox.start_writer = partial(_restart, nursery, writer)
            node.sessions[session] = writer  # watched by the node's one watchdog
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
                except Disconnected as exc:  # the peer went away (raw ASGI; Quart cancels the handler instead)
                    gone = exc
                    nursery.cancel_scope.cancel()
                    break
                await _handle_ready(session, sock, message)
                del message  # an idle connection keeps nothing of its last round alive
                # Writers next: the messages the server already held are handled (at most
                # READ_AHEAD), then one scheduling turn, so the writers they woke (the
                # receivers', ours for the replies) each put what they were given on the wire
                # in one write before more is taken. That paces this reader with the writers:
                # the server's socket reader meanwhile finds its queue to us full and reads
                # what has arrived in one go, not one message per read syscall
                # (docs/performance.md, "Many messages per read"). A stuck writer is parked,
                # not runnable: it is not waited for.
                # While this task waits in receive(), the server's reader handles what it
                # reads itself (_handle_inline, at most READ_AHEAD a read), and
                # its next read is that scheduling turn.
                await trio.lowlevel.checkpoint()
    except Disconnected as exc:
        gone = exc  # during the handshake
    finally:
        sock.handle_inline(None)
        session.outbox.write_now = None
        session.close("ws_disconnect")
        node.sessions.pop(session, None)
        node.closed_sessions += 1
        _log_left(endpoint.agent, trio.current_time() - began, sock, gone)


def _restart(nursery: trio.Nursery, writer: Writer) -> None:
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


async def watchdog(node: Node) -> None:
    """Drop slow consumers, end idle writers' tasks, forget sends in pieces left unfinished
    (``pieces_idle_s``) and count probes left unanswered as lost (``mux.downlink``), every
    connection of the node from one task.

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
        for session, writer in node.writing():
            if writer.stalled(now):
                log.warning("%s: not reading for %.1f s, disconnected (slow consumer)", writer.agent, timeout)
                session.close("slow_consumer")
                node.sessions.pop(session, None)
                writer.connection.cancel()
                continue
            if idle_s > 0 and not writer.busy and now - writer.since > idle_s:
                writer.outbox.retire()  # idle: its task ends until the next message
            if session.probes is not None:
                session.expire_probes(now)
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
    token = bearer_token(sock.authorization) or sock.args.get("token")
    offered = sock.subprotocols
    for proto in offered:
        if proto.startswith("mux.token."):
            token = token or proto[len("mux.token.") :]
    selected = "mux.v1" if "mux.v1" in offered else next((p for p in offered if p.startswith("mux.token.")), None)
    return token, selected
