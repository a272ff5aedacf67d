"""Clients of a running mux node: the async Trio WebSocket client, and the REST client.

The synchronous REST client, :class:`MuxClient`, lives in ``mux.rest_client`` and is
exported here too, as are the URL helpers (``mux.urls``) and :func:`error_from_wire`
(``mux.errors``).

How this works:

- :func:`connect` opens one WebSocket (``/api/mux/ws?agent=...``) and yields a
  :class:`MuxConnection`. One reader task owns the socket's receiving side and dispatches
  every event: a ``frame`` goes to its channel's bounded inbox, a ``channel_opened``
  registers a :class:`ClientChannel` (``mux.client_channel``; with role ``target``, queued for
  :meth:`MuxConnection.accept`, at most ``accept_backlog`` of them: more are closed at
  once), a ``channel_closed`` ends that channel's inbox, and any event carrying a ``ref``
  answers the request that sent it. The reader never waits for the application.
  Requests (``open``, ``send``, ``close``, ``list``, ``ping``) wait for their answer with a
  timeout. Error events that answer nothing are logged and kept in ``MuxConnection.errors``.
  The connection asks for a per-channel window as large as each inbox (``?window=N``,
  ``buffer_frames``): the node sends at most that many frames of a channel that the
  application has not taken yet, and each channel gives credit back (``credit``) as its
  frames are taken, half a window at a time. So a channel the application does not read
  fills only its own inbox (its senders get ``receiver_full``) while every other channel,
  and the answers to requests, keep flowing. Against a node that does not confirm the window
  (an older one) a full inbox makes the reader wait, which stops the whole socket.

With ``connect(..., batch=True)`` the connection asks the node for batched events
(``?batch=1``) and one sender task writes the requests: whatever JSON requests queued up
while the previous message was being written go out together as one ``batch`` action (each
keeps its own ``ref`` and answer; a binary send goes alone, in its place in the order), so
concurrent sends cost the node and the socket one message per batch. A batch's sends on a
channel share one signature (docs/frames.md), so a receiver verifies such frames with
``verify_chain`` (one by one they are ``unsigned``).

Binary payloads (``bytes``) travel as binary WebSocket messages (u32BE header length, JSON
header, payload bytes); received binary frames carry the raw bytes as ``payload`` with
``enc`` ``"bytes"``. While the connection holds a call, a ``bytes`` payload over
``PART_BYTES`` goes in pieces (``send_parts``, ``mux.pieces``), so the call's frames are
written between them; when the node confirms pieces (``part_acks``), the bytes of pieces in
flight stay within a delay-based window (:attr:`MuxConnection.uplink`, ``mux.uplink``), so
they do not queue up at a slow uplink ahead of the call's frames. A send in pieces whose
task is cancelled half-way tells the node (``abandon``), which forgets it at once. The
reader answers the node's probes at once (``?probes=1``, ``connect(..., probes=False)`` to
not ask for them), so the node keeps what it sends beside a call off a slow downlink's queue
too (``mux.downlink``).
A message over the node's ``max_message_bytes`` fails at once
(``message_too_large``). :meth:`MuxConnection.verify` checks a received frame against the node's
public key.
"""

from __future__ import annotations

import base64
import collections
import itertools
import logging
import math
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import trio
import trio_websocket

from .client_channel import ClientChannel
from .errors import (
    BadRequest,
    MuxError,
    describe_failure,
    error_from_wire,
)
from .frames import Frame
from .rest_client import MuxClient
from .signing import verify_frame
from .uplink import PieceWindow
from .urls import API_PREFIX, api_url, ws_url
from .wire import CHUNK_BYTES, MAX_BATCH_ITEMS, MAX_PARTS, MAX_WINDOW, decode_object, pack_binary, unpack_binary

__all__ = [
    "API_PREFIX",
    "PART_BYTES",
    "UNCONFIRMED_PART_BYTES",
    "ClientChannel",
    "MuxClient",
    "MuxConnection",
    "api_url",
    "connect",
    "error_from_wire",
    "open_ws",
    "ws_url",
]

log = logging.getLogger("mux.client")

ACCEPT_BACKLOG = 1024
"""Channels opened to a connection that may wait for ``accept()`` before more are closed."""

PART_ACK_TIMEOUT_S = 2.0
"""Pieces written this long ago and not confirmed (``part_ack``) count as lost."""
ABANDON_WRITE_S = 1.0
"""The most a cancelled send in pieces spends telling the node it gave up (``abandon``)."""
PART_BYTES = 4 << 10
"""While a connection holds a call, a ``bytes`` payload larger than this goes to a node that
takes pieces (``send_parts``) and confirms them (``part_acks``) in pieces of this size
(larger ones where a payload would need more than ``MAX_PARTS``): a call's frame sent
meanwhile waits behind one piece, not the whole payload, and :attr:`MuxConnection.uplink`'s
smallest window is one piece. 4 KiB, not the node's 16 KiB ``frame_part`` pieces: at the
bench's 4 MB/s uplink a piece takes 1 ms to cross, not 4, and a call frame's p99 beside
512 KiB uploads fell from 17.1 and 17.2 ms to 12.2 and 12.5 ms in two runs, for as many
bytes uploaded (docs/performance.md, row (d-up)). Without a call a payload goes whole (a
piece costs the node a message: measured, 512 KiB chunks of a file in 16 KiB pieces took
the node about twice the CPU)."""
UNCONFIRMED_PART_BYTES = CHUNK_BYTES
"""The pieces' size for a node that takes pieces but does not confirm them, so no window
keeps them off the uplink's queue: 16 KiB. Through the bench's uplink, 4 KiB pieces sent
that way often queued behind them about as much as a whole payload does (docs/performance.md,
row (d-up))."""

_FRAME_KEYS = ("v", "channel_id", "seq", "kind", "sender", "target", "intent", "ts", "prev", "enc", "payload")


@attrs.define(eq=False)
class _Pending:
    """A request waiting for the event (or error) that carries its ``ref``."""

    done: trio.Event = attrs.field(factory=trio.Event)
    reply: dict[str, Any] | None = None
    error: MuxError | None = None
    channel: ClientChannel | None = None
    """For ``open``: the channel the ``channel_opened`` answer registered."""
    batch: _Batch | None = None
    """The ``batch`` action that carried this request (``connect(..., batch=True)``)."""

    def resolve(self, reply: dict[str, Any] | None = None, error: MuxError | None = None) -> None:
        if self.done.is_set():
            return
        self.reply, self.error = reply, error
        self.done.set()
        if self.batch is not None:
            self.batch.settled()


@attrs.define(eq=False)
class _Batch:
    """One ``batch`` action of a batching connection, under its own ``ref``: an error that
    answers the batch itself (``rate_limited``, say) fails every request in it; its items'
    answers resolve them one by one, and the last one lets go of the batch's ``ref``."""

    pending: dict[int, _Pending | _Batch]
    ref: int
    items: list[_Pending]
    left: int = attrs.field(init=False)
    """Items not answered yet."""

    def __attrs_post_init__(self) -> None:
        self.left = len(self.items)

    def resolve(self, reply: dict[str, Any] | None = None, error: MuxError | None = None) -> None:
        if error is not None:
            for item in self.items:
                item.resolve(error=error)

    def settled(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.pending.pop(self.ref, None)


class _Turns:
    """Turns at writing a connection's socket: a call's frames before anything else that
    waits, the rest in the order they came. So a call's frame waits for at most the message
    being written (one piece of a large payload), not for every writer queued before it."""

    def __init__(self) -> None:
        self._busy = False
        self._urgent = trio.lowlevel.ParkingLot()
        self._rest = trio.lowlevel.ParkingLot()

    async def acquire(self, urgent: bool) -> None:
        """Wait for a turn (``urgent``: ahead of the others waiting)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._busy or self._urgent or (not urgent and self._rest):
            await (self._urgent if urgent else self._rest).park()  # woken holding the turn
        else:
            self._busy = True

    def release(self) -> None:
        """End a turn: hand it to the next waiter, urgent ones first."""
        if self._urgent:
            self._urgent.unpark()
        elif self._rest:
            self._rest.unpark()
        else:
            self._busy = False


def _frame_dict(msg: dict[str, Any]) -> dict[str, Any]:
    """A ``frame`` event as ``Frame.to_dict()`` would give it: same keys, same order, no ``event``."""
    msg.pop("event", None)
    out = {k: msg.pop(k) for k in _FRAME_KEYS if k in msg}
    out.update(msg)
    return out


@attrs.define
class _Incoming:
    """The async iterator of :meth:`MuxConnection.incoming` (a class, not a generator: safe to break)."""

    conn: MuxConnection

    def __aiter__(self) -> _Incoming:
        return self

    async def __anext__(self) -> ClientChannel:
        try:
            return await self.conn.accept()
        except MuxError as exc:
            if exc.code == "connection_closed":
                raise StopAsyncIteration from None
            raise


class MuxConnection:
    """One WebSocket to a node, created by :func:`connect`; many channels over it.

    ``agent``, ``node`` and ``public_key`` come from the node's ``connected`` event.
    ``errors`` keeps the most recent error events that answered no request.
    """

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        hello: dict[str, Any],
        *,
        buffer_frames: int = 256,
        request_timeout: float | None = 30.0,
        batch: bool = False,
        accept_backlog: int = ACCEPT_BACKLOG,
    ) -> None:
        self._ws = ws
        self.batch = batch
        """True: requests go through one sender task, concurrent ones as ``batch`` actions."""
        self.accept_backlog = accept_backlog
        """Channels opened to us that may wait for :meth:`accept`; more are closed at once
        (reason ``accept_backlog_full``), as a full listen backlog refuses connections."""
        self.agent: str = hello["agent"]
        self.node: str = hello.get("node", "")
        self.public_key: str = hello.get("public_key", "")
        self.max_message_bytes: int = int(hello.get("max_message_bytes") or 0)
        parts = hello.get("send_parts")
        self.send_parts: int = parts if type(parts) is int and parts > 0 else 0
        """How many sends in pieces the node takes at once (``connected``'s ``send_parts``; 0:
        none). While the connection holds a call, ``bytes`` payloads over ``PART_BYTES``
        (``UNCONFIRMED_PART_BYTES`` without ``part_acks``) are sent that way, so the call's
        frames go out between the pieces, not behind the whole payload."""
        self._piecing = trio.Semaphore(max(1, self.send_parts))
        """Sends writing their pieces now (at most ``send_parts``)."""
        self._unpieced: collections.deque[int] = collections.deque(maxlen=4 * max(1, self.send_parts))
        """The ``ref``s of sends in pieces the node refused part-way (``pieces_full``): the
        errors its pieces already on the way get are expected, not reported."""
        self._turns = _Turns()
        """Whose turn it is to write (a call's frames first)."""
        self.part_acks: bool = hello.get("part_acks") is True
        """The node confirms each piece that asks (``part_ack``): the bytes of pieces written
        and not yet confirmed are then kept within :attr:`uplink`'s window."""
        self.uplink = PieceWindow(PART_BYTES, max_pieces=(1 << 20) // PART_BYTES)
        """Pieces in flight and the delay-based window over them (``mux.uplink``): they fill
        the uplink without queueing much more than ``target_s`` in front of a call's frames."""
        self._in_flight: dict[tuple[int, int], tuple[float, int]] = {}
        """Pieces written and not yet confirmed: (ref, part) -> (when written, bytes)."""
        self._uplink_room = trio.lowlevel.ParkingLot()
        self.probes: bool = hello.get("probes") is True
        """The node probes this connection's downlink (``?probes=1``, ``mux.downlink``): the
        reader answers each probe as it reads it, so the node keeps the bulk it sends beside a
        call from queueing ahead of the call's frames on a slow downlink."""
        window = hello.get("window")
        self.receive_window: int | None = window if isinstance(window, int) and window > 0 else None
        """Frames per channel the node sends ahead of the application (``?window=N``, as the
        node confirmed it); None: no window, a full inbox holds the whole socket."""
        self.errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self.request_timeout = request_timeout
        self._buffer_frames = buffer_frames
        self._channels: dict[str, ClientChannel] = {}
        self._pending: dict[int, _Pending | _Batch] = {}
        self._outgoing: collections.deque[tuple[str | bytes, _Pending]] = collections.deque()
        self._more_out = trio.lowlevel.ParkingLot()
        self._parts: dict[tuple[str, int], tuple[dict[str, Any], list[bytes]]] = {}
        self._refs = itertools.count(1)
        self._incoming: collections.deque[ClientChannel] = collections.deque()
        """Channels opened to us, waiting for :meth:`accept` (at most ``accept_backlog``). Never
        bounded by making the reader wait (that would hold up every channel); a channel that
        closes before it is accepted with nothing left to read leaves it."""
        self._arrived = trio.lowlevel.ParkingLot()
        self._closed = False

    def __repr__(self) -> str:
        return f"<MuxConnection {self.agent} to {self.node} with {len(self._channels)} channels>"

    @property
    def channels(self) -> list[ClientChannel]:
        """The channels of this connection that are still open."""
        return [ch for ch in self._channels.values() if ch.is_open]

    @property
    def closed(self) -> bool:
        """True once the socket is gone."""
        return self._closed

    # ---- requests --------------------------------------------------------------------------

    async def _call(
        self, action: dict[str, Any], binary: bytes | None = None, *, urgent: bool = False, whole: bool = False
    ) -> _Pending:
        """Send one action with a fresh ``ref`` and wait for the event or error that echoes it;
        ``urgent`` (a call's frame) is written ahead of other writes waiting, not batched. A
        binary send the node refuses part-way through its pieces because all its
        connections' pieces are at its bound (``pieces_full``) is sent again ``whole``."""
        if self._closed:
            raise MuxError("the connection to the node is closed", code="connection_closed")
        ref = next(self._refs)
        message = {**action, "ref": ref}
        try:
            data: str | bytes = pack_binary(message, binary) if binary is not None else orjson.dumps(message).decode()
        except orjson.JSONEncodeError as exc:
            raise BadRequest(f"payload is not JSON-serializable: {exc}", code="bad_payload") from exc
        pieces = (
            not whole
            and binary is not None
            and len(binary) > self._part_bytes()
            and self.send_parts > 0
            and self._holds_call()
        )
        size = len(binary) if pieces and binary is not None else len(data)
        if self.max_message_bytes and size > self.max_message_bytes:
            raise BadRequest(
                f"message is {size} bytes, over the node's limit of {self.max_message_bytes}", code="message_too_large"
            )
        pending = self._pending[ref] = _Pending()
        try:
            if pieces and binary is not None:
                await self._send_pieces(message, binary, pending)
            elif self.batch and not urgent:  # the sender task writes it, with whatever else is queued by then
                self._outgoing.append((data, pending))
                self._more_out.unpark_all()
            else:
                try:
                    await self._write(data, urgent=urgent)
                except trio_websocket.ConnectionClosed as exc:
                    raise MuxError("the connection to the node is closed", code="connection_closed") from exc
            with trio.fail_after(self.request_timeout if self.request_timeout is not None else math.inf):
                await pending.done.wait()
        except trio.TooSlowError:
            raise MuxError(
                f"no answer to {message['action']} within {self.request_timeout} s", code="timeout"
            ) from None
        finally:
            self._pending.pop(ref, None)
            if not pending.done.is_set():  # timed out or cancelled
                self._abandon(data, pending)
            if pieces and self.part_acks:
                self._forget_pieces(ref)
        error = pending.error
        if error is None:
            return pending
        pending.error = None  # nothing this frame holds may point at the error it raises: a cycle
        if pieces and isinstance(error, MuxError) and error.code == "pieces_full":
            self._unpieced.append(ref)
            if not self.max_message_bytes or len(data) <= self.max_message_bytes:  # fits in one message
                return await self._call(action, binary, urgent=urgent, whole=True)
        try:
            raise error
        finally:
            del error

    async def _write(self, message: str | bytes, *, urgent: bool = False) -> None:
        """Write one message on the socket in its turn (``_Turns``)."""
        await self._turns.acquire(urgent)
        try:
            await self._ws.send_message(message)
        finally:
            self._turns.release()

    def _part_bytes(self) -> int:
        """The size of the pieces a large payload goes in: ``PART_BYTES`` when the node
        confirms them (the window keeps them off the uplink's queue), else
        ``UNCONFIRMED_PART_BYTES``."""
        return PART_BYTES if self.part_acks else UNCONFIRMED_PART_BYTES

    def _holds_call(self) -> bool:
        """True while a real-time channel (a call) of this connection is open: only then do
        large payloads go in pieces (each piece costs the node a message of its own)."""
        return any(ch.delivery == "realtime" and ch.is_open for ch in self._channels.values())

    async def _send_pieces(self, message: dict[str, Any], payload: bytes, pending: _Pending) -> None:
        """Write ``payload`` as ``send`` pieces of ``_part_bytes()`` (``mux.pieces``; larger
        when it would take more than ``MAX_PARTS``), each its own message: the socket's writes
        are taken in turn, so a send of another task waiting meanwhile goes out after the
        piece being written, not after the whole payload. Stops once the send is answered (a
        piece refused)."""
        step = max(self._part_bytes(), -(-len(payload) // MAX_PARTS))
        parts = -(-len(payload) // step)
        view = memoryview(payload)
        ref: int = message["ref"]
        windowed = self.part_acks
        try:
            async with self._piecing:
                written = 0
                try:
                    for part in range(parts):
                        if pending.done.is_set():
                            return
                        piece = bytes(view[part * step : (part + 1) * step])
                        header = {**message, "part": part, "parts": parts}
                        if windowed:
                            await self._uplink_wait(len(piece), pending)
                            if pending.done.is_set():
                                return
                            if part < parts - 1:  # the last is answered as the whole send
                                header["part_ack"] = True
                        written_at = trio.current_time()
                        await self._write(pack_binary(header, piece))
                        written += 1
                        if windowed:  # in flight until confirmed, or until the send is answered
                            self._in_flight[(ref, part)] = (written_at, len(piece))
                            self.uplink.sent(len(piece))
                finally:
                    if 0 < written < parts and not pending.done.is_set() and not self._closed:
                        await self._abandon_pieces(message["channel_id"], ref)  # given up half-way
        except trio_websocket.ConnectionClosed as exc:
            raise MuxError("the connection to the node is closed", code="connection_closed") from exc

    async def _abandon_pieces(self, channel_id: str, ref: int) -> None:
        """Tell the node to forget a send in pieces given up half-way (the task sending was
        cancelled), so that its place among the node's ``send_parts`` is free again at once,
        not after the node's ``pieces_idle_s``: written while that task is being cancelled,
        within ``ABANDON_WRITE_S``, and before another send in pieces may start."""
        with trio.CancelScope(shield=True), trio.move_on_after(ABANDON_WRITE_S):
            await self._send_quietly({"action": "abandon", "channel_id": channel_id, "ref": ref})

    async def _uplink_wait(self, size: int, pending: _Pending) -> None:
        """Wait until :attr:`uplink` has room for a piece of ``size`` bytes, or the send
        (``pending``) is answered (refused part-way). Confirmations that stop coming for
        ``PART_ACK_TIMEOUT_S`` count as lost: what was in flight no longer counts and the
        window halves."""
        while not self.uplink.room(size) and not pending.done.is_set():
            with trio.move_on_after(PART_ACK_TIMEOUT_S) as waited:
                await self._uplink_room.park()
            if waited.cancelled_caught:
                log.debug("%s: no part_ack for %.1f s: pieces in flight lost", self.agent, PART_ACK_TIMEOUT_S)
                self._in_flight.clear()
                self.uplink.forget(self.uplink.in_flight)
                self.uplink.lost()

    def _on_part_ack(self, msg: dict[str, Any]) -> None:
        """The node took a piece: time it and make room for the next."""
        ref, part = msg.get("ref"), msg.get("part")
        sent = self._in_flight.pop((ref, part), None) if type(ref) is int and type(part) is int else None
        if sent is None:
            return  # counted as lost meanwhile, or not ours
        written_at, size = sent
        now = trio.current_time()
        self.uplink.acked(size, now - written_at, now)
        self._uplink_room.unpark_all()

    def _forget_pieces(self, ref: int) -> None:
        """A send in pieces was answered (or given up): its pieces still in flight will not be
        confirmed."""
        for key in [key for key in self._in_flight if key[0] == ref]:
            self.uplink.forget(self._in_flight.pop(key)[1])
        self._uplink_room.unpark_all()

    def _abandon(self, data: str | bytes, pending: _Pending) -> None:
        """A request whose caller stopped waiting: not sent at all if it is still queued
        (batching), and no longer holding its batch's ``ref``."""
        if self.batch:
            try:
                self._outgoing.remove((data, pending))
            except ValueError:
                pass  # already written
        pending.resolve(error=MuxError("the request was abandoned", code="cancelled"))

    async def _request(
        self, message: dict[str, Any], *, binary: bytes | None = None, expect: str | None = None, urgent: bool = False
    ) -> dict[str, Any]:
        reply = (await self._call(message, binary, urgent=urgent)).reply
        assert reply is not None
        if expect is not None and reply.get("event") != expect:
            raise MuxError(f"expected {expect}, got {reply.get('event')!r}", code="bad_response")
        return reply

    async def open(self, target: str, intent: str = "stream", metadata: dict[str, Any] | None = None) -> ClientChannel:
        """Open a channel to ``target``; returns it once the node answered ``channel_opened``."""
        msg: dict[str, Any] = {"action": "open", "target": target, "intent": intent}
        if metadata is not None:
            msg["metadata"] = metadata
        pending = await self._call(msg)
        if pending.channel is None:
            raise MuxError(f"expected channel_opened, got {pending.reply!r:.200}", code="bad_response")
        return pending.channel

    async def accept(self) -> ClientChannel:
        """The next channel another agent opened to us (MuxError ``connection_closed`` at the end)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._incoming:
            if self._closed:
                raise MuxError("the connection to the node is closed", code="connection_closed")
            await self._arrived.park()
        ch = self._incoming.popleft()
        await trio.lowlevel.cancel_shielded_checkpoint()  # taken: not lost to a cancel
        return ch

    def incoming(self) -> AsyncIterator[ClientChannel]:
        """``async for ch in conn.incoming()``: channels opened to us, until the connection ends."""
        return _Incoming(self)

    async def list(self) -> list[dict[str, Any]]:
        """This agent's open channels, as the node sees them (channel info dicts)."""
        reply = await self._request({"action": "list"}, expect="channel_list")
        channels = reply.get("channels") or []
        return list(channels)

    async def ping(self) -> float:
        """Round-trip time of one ``ping``/``pong``, in seconds."""
        start = trio.current_time()
        await self._request({"action": "ping"}, expect="pong")
        return trio.current_time() - start

    def verify(self, frame: dict[str, Any] | Frame) -> Frame:
        """Verify a received frame's hash and signature with the node's key; return it as a Frame.

        Raises :class:`~mux.errors.VerificationError` (``bad_hash``, ``bad_signature``, ...).
        """
        if isinstance(frame, dict) and isinstance(frame.get("payload"), (bytes, bytearray, memoryview)):
            frame = {**frame, "enc": "bytes", "payload": base64.b64encode(bytes(frame["payload"])).decode()}
        return verify_frame(frame, self.public_key)

    async def _credit(self, channel_id: str, frames: int) -> None:
        """Tell the node ``frames`` more frames of the channel may come (no answer expected;
        a closed socket is the reader's to report)."""
        await self._send_quietly({"action": "credit", "channel_id": channel_id, "frames": frames})

    async def _send_quietly(self, action: dict[str, Any], *, urgent: bool = False) -> None:
        """Send ``action`` with no ``ref``: no answer is waited for (errors land in ``errors``).
        ``urgent``: ahead of other writes waiting, as a call's frame."""
        try:
            await self._write(orjson.dumps(action).decode(), urgent=urgent)
        except trio_websocket.ConnectionClosed:
            pass

    # ---- the sender (batching connections) -----------------------------------------------

    def _next_message(self) -> tuple[str | bytes, Sequence[_Pending]]:
        """The next message to write: the first queued request, with the JSON requests
        behind it folded into one ``batch`` action (within the node's message size and
        ``MAX_BATCH_ITEMS``); a binary request goes alone."""
        data, first = self._outgoing.popleft()
        if isinstance(data, bytes):
            return data, [first]
        limit = (self.max_message_bytes or 1 << 20) - 64
        texts, items, size = [data], [first], len(data)
        while self._outgoing and len(items) < MAX_BATCH_ITEMS:
            nxt, pending = self._outgoing[0]
            if isinstance(nxt, bytes) or size + len(nxt) + 1 > limit:
                break
            self._outgoing.popleft()
            texts.append(nxt)
            items.append(pending)
            size += len(nxt) + 1
        if len(items) == 1:
            return data, items
        ref = next(self._refs)
        batch = self._pending[ref] = _Batch(self._pending, ref, items)
        for pending in items:
            pending.batch = batch
        return f'{{"action":"batch","ref":{ref},"items":[{",".join(texts)}]}}', items

    async def _send_loop(self) -> None:
        """Write queued requests in order, concurrent JSON ones as one ``batch`` each time."""
        while True:
            while not self._outgoing:
                await self._more_out.park()
            message, items = self._next_message()
            try:
                await self._write(message)
            except trio_websocket.ConnectionClosed:
                for pending in items:
                    pending.resolve(error=MuxError("the connection to the node is closed", code="connection_closed"))

    # ---- the reader ------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    message = await self._ws.get_message()
                except trio_websocket.ConnectionClosed:
                    return
                try:
                    await self._dispatch(message)
                except MuxError as exc:
                    log.warning("%s: undecodable message from the node: %s", self.agent, exc)
                    self.errors.append(exc.to_wire())
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._closed = True
        for pending in list(self._pending.values()):
            pending.resolve(error=MuxError("the connection to the node is closed", code="connection_closed"))
        self._arrived.unpark_all()
        self._uplink_room.unpark_all()  # pieces waiting for room: their sends have failed
        for ch in self._channels.values():
            if ch.closed_reason is None:
                ch.closed_reason = "connection_closed"
            ch._inbox_send.close()
            ch._room.unpark_all()  # sends waiting for the window fail at once
        self._channels.clear()

    async def _dispatch(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            header, payload = unpack_binary(message)
            event = header.get("event")
            if event == "frame_part":
                await self._on_part(header, payload)
                return
            if event != "frame":
                raise BadRequest(f"binary message with event {event!r}", code="bad_binary")
            header["payload"] = payload
            header["enc"] = "bytes"
            await self._on_frame(_frame_dict(header))
            return
        msg = decode_object(message)
        if msg.get("event") == "batch" and isinstance(msg.get("items"), list):
            for item in msg["items"]:
                if isinstance(item, dict):
                    await self._dispatch_obj(item)
            return
        await self._dispatch_obj(msg)

    async def _on_part(self, header: dict[str, Any], data: bytes) -> None:
        """Reassemble a large frame sent as ``frame_part`` pieces (docs/protocol.md)."""
        key = (str(header.get("channel_id")), int(header.get("seq", -1)))
        part, parts = int(header.get("part", -1)), int(header.get("parts", 0))
        if part == 0:
            if not isinstance(header.get("frame"), dict) or parts < 1:
                raise BadRequest("first frame_part without its frame header", code="bad_binary")
            self._parts[key] = (header["frame"], [data])
        else:
            got = self._parts.get(key)
            if got is None or len(got[1]) != part:
                self._parts.pop(key, None)
                raise BadRequest(f"frame_part {part} of {key} out of order", code="bad_binary")
            got[1].append(data)
        if part == parts - 1:
            frame, chunks = self._parts.pop(key)
            raw = b"".join(chunks)
            frame["payload"] = raw if frame.get("enc") == "bytes" else orjson.loads(raw)
            await self._on_frame(_frame_dict(frame))

    async def _dispatch_obj(self, msg: dict[str, Any]) -> None:
        name = msg.get("event")
        if name == "frame":
            await self._on_frame(_frame_dict(msg))
            return
        if name == "part_ack":  # a piece arrived; its send's answer comes with the last piece
            self._on_part_ack(msg)
            return
        if name == "probe":  # answered at once: its time is what the node's window measures
            n = msg.get("n")
            if type(n) is int:
                await self._send_quietly({"action": "probe", "n": n}, urgent=True)
            return
        ref = msg.get("ref")
        pending = self._pending.get(ref) if isinstance(ref, int) and not isinstance(ref, bool) else None
        if name is None and "error" in msg:
            if pending is not None:
                pending.resolve(error=error_from_wire(msg))
                if self._in_flight:  # a send in pieces refused part-way stops waiting for room
                    self._uplink_room.unpark_all()
            elif ref in self._unpieced and msg.get("error") == "bad_request":
                log.debug("%s: a piece of refused send %s: %s", self.agent, ref, msg.get("detail"))
            else:
                log.warning("%s: error from the node: %s: %s", self.agent, msg.get("error"), msg.get("detail"))
                self.errors.append(msg)
            return
        if name == "channel_opened":
            ch = ClientChannel(self, msg, self._buffer_frames)
            self._channels[ch.id] = ch
            if isinstance(pending, _Pending):
                pending.channel = ch
            if ch.role == "target":
                if len(self._incoming) < self.accept_backlog:
                    self._incoming.append(ch)
                    self._arrived.unpark_all()
                else:
                    log.warning("%s: %d channels wait for accept(); %s closed", self.agent, len(self._incoming), ch.id)
                    await self._send_quietly({"action": "close", "channel_id": ch.id, "reason": "accept_backlog_full"})
        elif name == "channel_closed":
            closing = self._channels.pop(msg.get("channel_id", ""), None)
            if closing is not None:
                closing._closed(msg)
                if closing.role == "target" and not closing._inbox_recv.statistics().current_buffer_used:
                    try:
                        self._incoming.remove(closing)  # closed before anyone took it, nothing to read
                    except ValueError:
                        pass
        if pending is not None:
            pending.resolve(reply=msg)

    async def _on_frame(self, frame: dict[str, Any]) -> None:
        ch = self._channels.get(frame.get("channel_id", ""))
        if ch is None or not ch.is_open:
            log.warning("%s: frame for unknown channel %r dropped", self.agent, frame.get("channel_id"))
            return
        if frame.get("kind") == "seal":  # a node signing chain heads covers earlier frames with it
            ch.last_seal = frame
            await ch._took()  # it took a place in the window
            return
        try:
            if self.receive_window is None:
                await ch._inbox_send.send(frame)  # a full inbox holds the socket: backpressure
                return
            try:
                ch._inbox_send.send_nowait(frame)  # the window leaves room for it
            except trio.WouldBlock:
                log.warning("%s: the node sent %s past its window; reading waits", self.agent, ch.id)
                await ch._inbox_send.send(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            log.debug("%s: frame for closed channel %s dropped", self.agent, ch.id)


@asynccontextmanager
async def connect(
    url: str,
    agent: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    token: str | None = None,
    buffer_frames: int = 256,
    request_timeout: float | None = 30.0,
    connect_timeout: float = 10.0,
    max_message_bytes: int = 4 << 20,
    batch: bool = False,
    window: bool = True,
    accept_backlog: int = ACCEPT_BACKLOG,
    probes: bool = True,
) -> AsyncIterator[MuxConnection]:
    """Connect ``agent`` to a node over WebSocket: ``async with connect(url, "alice") as conn:``.

    ``url`` is the node URL (``http(s)://host:port``) or a full ``ws(s)://`` URL. The block
    owns the connection and its reader task; leaving it closes the socket (the node then
    closes this agent's channels with reason ``ws_disconnect``). ``buffer_frames`` bounds each
    channel's inbox; ``request_timeout`` bounds each request's wait for its answer. A refused
    connection (e.g. ``agent_attached``) raises the node's error; an unreachable node raises
    MuxError ``unreachable``. With ``batch`` the node batches its events and concurrent
    requests go out as ``batch`` actions; with ``window`` (the default) each channel has a
    window of ``buffer_frames`` frames, so one channel left unread never holds up the others
    (see the module docstring). At most ``accept_backlog`` channels opened to us wait for
    ``accept()``; more are closed at once with reason ``accept_backlog_full``. A number out
    of its range (``buffer_frames`` 0 would make an unread channel stall the reader) raises
    ``ValueError`` before anything connects. With ``probes`` (the default) the connection
    answers the node's probes (``?probes=1``), so bulk the node sends it beside a call does
    not queue up on a slow downlink ahead of the call's frames (``mux.downlink``).
    """
    _check_numbers(buffer_frames, accept_backlog, max_message_bytes, connect_timeout, request_timeout)
    target = ws_url(url, agent) + ("&batch=1" if batch else "") + ("&probes=1" if probes else "")
    if window:  # as many frames as an inbox holds, within what a node accepts
        target += f"&window={max(1, min(buffer_frames, MAX_WINDOW))}"
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else None
    if ssl_context is None and target.startswith("wss:"):
        ssl_context = ssl.create_default_context()
    body_error: Exception | None = None
    try:
        async with open_ws(
            target,
            ssl_context,
            extra_headers=headers,
            max_message_size=max_message_bytes,
            connect_timeout=connect_timeout,
            disconnect_timeout=5,
        ) as ws:
            with trio.fail_after(connect_timeout):
                conn = await _greeting(ws, buffer_frames, request_timeout, batch, accept_backlog)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn._read_loop, name=f"mux-client-reader-{conn.agent}")
                if batch:
                    nursery.start_soon(conn._send_loop, name=f"mux-client-sender-{conn.agent}")
                try:
                    yield conn
                except Exception as exc:  # re-raised below, outside the nursery: no ExceptionGroup
                    body_error = exc
                finally:
                    nursery.cancel_scope.cancel()
            conn._shutdown()
    except trio.TooSlowError as exc:
        raise MuxError(f"no greeting from {target} within {connect_timeout} s", code="unreachable") from exc
    except trio_websocket.DisconnectionTimeout:
        log.info("%s: the node did not finish the closing handshake in time", agent)
    except (OSError, trio_websocket.HandshakeError) as exc:
        raise MuxError(f"cannot connect to {target}: {describe_failure(exc)}", code="unreachable") from exc
    if body_error is not None:
        raise body_error


def _check_numbers(
    buffer_frames: int,
    accept_backlog: int,
    max_message_bytes: int,
    connect_timeout: float,
    request_timeout: float | None,
) -> None:
    """:func:`connect`'s numbers, each in its range, else ``ValueError`` naming it."""
    for name, count, least in (
        ("buffer_frames", buffer_frames, 1),
        ("accept_backlog", accept_backlog, 0),
        ("max_message_bytes", max_message_bytes, 1),
    ):
        if isinstance(count, bool) or not isinstance(count, int) or count < least:
            raise ValueError(f"connect(): {name} must be a whole number of at least {least}, not {count!r}")
    for name, seconds in (("connect_timeout", connect_timeout), ("request_timeout", request_timeout)):
        if seconds is None and name == "request_timeout":
            continue
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
            raise ValueError(f"connect(): {name} must be a number of seconds above 0, not {seconds!r}")


@asynccontextmanager
async def open_ws(
    url: str,
    ssl_context: ssl.SSLContext | None = None,
    *,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    max_message_size: int = 4 << 20,
    connect_timeout: float = 10.0,
    disconnect_timeout: float = 5.0,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A trio-websocket client connection over a TCP/TLS stream this function owns.

    Like ``trio_websocket.open_websocket_url``, but the socket is always closed on exit, also
    when the server ended the connection first (trio-websocket 0.12 leaves it open then).
    """
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "wss"
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise MuxError(f"not a WebSocket URL: {url!r}", code="bad_request")
    host = parts.hostname
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = host if parts.port is None else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if parts.port is None else f"[{host}]:{port}"
    with trio.fail_after(connect_timeout):
        tcp = await trio.open_tcp_stream(host, port)
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = tcp
    if secure:
        stream = trio.SSLStream(
            tcp, ssl_context or ssl.create_default_context(), server_hostname=host, https_compatible=True
        )
    body_error: Exception | None = None
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout):
                ws = await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,
                    host_header,
                    resource,
                    extra_headers=extra_headers,
                    max_message_size=max_message_size,
                )
            try:
                yield ws
            except Exception as exc:  # re-raised below, outside the nursery: no ExceptionGroup
                body_error = exc
            finally:
                with trio.move_on_after(disconnect_timeout, shield=True):
                    await ws.aclose()
                await trio.aclose_forcefully(stream)  # ends trio-websocket's reader in any case
    finally:
        await trio.aclose_forcefully(stream)
    if body_error is not None:
        raise body_error


async def _greeting(
    ws: trio_websocket.WebSocketConnection,
    buffer_frames: int,
    request_timeout: float | None,
    batch: bool = False,
    accept_backlog: int = ACCEPT_BACKLOG,
) -> MuxConnection:
    """Read the node's first message: ``connected`` gives the connection, an error raises it."""
    try:
        first = await ws.get_message()
    except trio_websocket.ConnectionClosed as exc:
        raise MuxError(f"the node closed the connection: {exc.reason}", code="unreachable") from exc
    try:
        hello = orjson.loads(first)
    except orjson.JSONDecodeError:
        hello = None
    if not isinstance(hello, dict) or hello.get("event") != "connected":
        if isinstance(hello, dict) and "error" in hello:
            raise error_from_wire(hello)
        raise MuxError("the node did not greet with a connected event", code="bad_response")
    return MuxConnection(
        ws,
        hello,
        buffer_frames=buffer_frames,
        request_timeout=request_timeout,
        batch=batch,
        accept_backlog=accept_backlog,
    )
