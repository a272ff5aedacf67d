"""Taking a client's whole messages out of its bytes in Hypercorn's reader.

On Hypercorn, unless ``fast_receive=False``, :class:`~mux.sockets.AsgiSocket` puts
:class:`FastReceive` in front of the stream's ``handle``. Once the connection is open with no
extension negotiated, it takes whole text and binary messages out of the client's bytes
itself (``mux.wsframes.ClientFrames``) and puts them on the app's queue as Hypercorn would;
pings and pongs, and from any other frame on every byte, go to Hypercorn and wsproto, which
answer as without it (tests/test_fast_receive.py; a malformed payload is only found once its
frame is whole).

Handling in the reader: while the app's task waits in
:meth:`~mux.sockets.AsgiSocket.receive` with nothing queued, each message taken apart goes to
the socket's inline handler (:meth:`~mux.sockets.AsgiSocket.handle_inline`) at once (at most
``inline_most`` of a read, and none after ``inline_bytes`` of them) instead of through the
queue and a wake of the app's task; a message it declines (False), and every message while
the app's task is busy, is queued as before, so the app sees every message once and in
order. An exception in the handler is raised by the app's next ``receive``, as if the app had
handled that message itself.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.protocol.events import Data as _HypercornData
from hypercorn.protocol.ws_stream import ASGIWebsocketState as _WSState
from hypercorn.protocol.ws_stream import WSStream
from wsproto.connection import ConnectionState as _WSConnectionState

from .wsframes import ClientFrames, Passed

if TYPE_CHECKING:
    from .sockets import AsgiSocket

__all__ = ["INLINE_FAILED", "FastReceive"]

INLINE_FAILED = "mux.inline_failed"
"""Queued for the app when its inline handler raised (``AsgiSocket.inline_failure``)."""


class FastReceive:
    """Hypercorn's ``WSStream.handle`` for one connection, parsing the client's plain data
    frames itself (``mux.wsframes.ClientFrames``) and putting each message on the app's
    queue as Hypercorn would; every other event, and every byte the parser hands on, goes
    to the stream's own ``handle`` (wsproto). A connection that negotiated an extension,
    or is no longer open, is left to Hypercorn entirely."""

    def __init__(self, stream: WSStream, sock: AsgiSocket) -> None:
        self._stream = stream
        self._sock = sock
        self._stock = stream.handle
        self._frames: ClientFrames | None = None

    def prepare(self) -> ClientFrames | None:
        """Make the frame parser once the handshake is done (the node calls this when it has
        accepted the connection, so that what a connection keeps is made with it, not amid a
        burst of other work at its first message); None when the connection is one this does
        not parse (an extension negotiated, or no WebSocket protocol yet)."""
        if self._frames is None:
            proto = getattr(self._stream.connection, "_proto", None)
            if proto is not None and not proto.extensions and not proto.client:
                self._frames = ClientFrames(self._stream.config.websocket_max_message_size)
        return self._frames

    async def __call__(self, event: Any) -> None:
        stream = self._stream
        sock = self._sock
        if not isinstance(event, _HypercornData) or stream.closed or stream.state != _WSState.CONNECTED:
            await self._stock_after_rest(event)
            if stream.closed:  # the stream and this handler would hold each other until a GC pass
                stream.__dict__.pop("handle", None)
            return
        frames = self._frames or self.prepare()
        if frames is None:
            del stream.handle  # Hypercorn's own from now on
            await self._stock_after_rest(event)
            return
        if frames.off:
            await self._stock_after_rest(event)
            return
        frames.feed(event.data)
        put = stream.app_put
        assert put is not None
        queue: trio.MemorySendChannel[Any] = put.__self__  # type: ignore[attr-defined]
        inline = sock.inline
        # Inline only while the app's task waits in receive() on an empty queue. Nothing
        # but this reader puts on that queue, and the handler never waits, so that holds
        # until this reader puts or waits itself: after that, the rest of the read queues.
        # inline_done runs after the last message handled here, before this reader waits.
        most = sock.inline_most if inline is not None and queue.statistics().tasks_waiting_receive else 0
        room = sock.inline_bytes if sock.inline_bytes is not None else math.inf
        handled = False  # messages went to inline since inline_done was last called
        try:
            while not stream.closed:
                if stream.connection.state is not _WSConnectionState.OPEN:  # closing: wsproto's part
                    if handled:
                        handled = False
                        await self._done(put)
                    rest = frames.stop()
                    if rest:
                        await self._stock_after_rest(_HypercornData(stream_id=stream.stream_id, data=rest))
                    return
                item = frames.next()
                if item is None:  # the read's end
                    if handled:
                        handled = False
                        await self._done(put)
                    return
                if most and not isinstance(item, Passed):
                    most -= 1
                    handled = True
                    try:
                        if inline(item):  # type: ignore[misc]
                            room -= len(item)
                            if room <= 0:  # past the byte bound: the rest of the read is the app's
                                most = 0
                            continue
                    except Exception as exc:
                        handled, most = False, 0
                        if sock.inline_failure is None:  # the handler's failure is the one raised
                            sock.inline_failure = exc
                        self._call_done()
                        await self._fail(exc, put)
                        continue
                most = 0
                if handled:
                    handled = False
                    await self._done(put)
                if isinstance(item, str):
                    await put({"type": "websocket.receive", "bytes": None, "text": item})
                elif isinstance(item, bytes):
                    await put({"type": "websocket.receive", "bytes": item, "text": None})
                else:
                    await self._stock_after_rest(_HypercornData(stream_id=stream.stream_id, data=item.raw))
        finally:
            if handled:  # never leave inline_done uncalled, however this ends
                self._call_done()

    def _call_done(self) -> Exception | None:
        """Call the socket's ``inline_done``; what it raised (then neither it nor ``inline``
        is called again: nothing is handled here that would need it)."""
        sock = self._sock
        done = sock.inline_done
        if done is None:
            return None
        try:
            done()
        except Exception as exc:
            sock.inline = sock.inline_done = None
            if sock.inline_failure is None:
                sock.inline_failure = exc
            return exc
        return None

    async def _done(self, put: Callable[[Any], Awaitable[None]]) -> None:
        """After the last message of a run handled inline: ``inline_done``, before this
        reader waits for anything; a failure ends the app as the handler's would."""
        exc = self._call_done()
        if exc is not None:
            await self._fail(exc, put)

    async def _fail(self, exc: Exception, put: Callable[[Any], Awaitable[None]]) -> None:
        """Stop handling inline; the app's next ``receive`` raises the first failure."""
        sock = self._sock
        sock.inline = None
        if sock.inline_failure is None or sock.inline_failure is exc:
            sock.inline_failure = exc
            await put({"type": INLINE_FAILED})

    async def _stock_after_rest(self, event: Any) -> None:
        """Hypercorn's own handling of ``event`` (which may write: a pong, a close), after
        what is left of a direct write."""
        await self._sock.flush_rest()
        await self._stock(event)
