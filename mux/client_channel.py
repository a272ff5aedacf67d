"""One channel of a WebSocket client connection (:class:`ClientChannel`), as
:class:`mux.client.MuxConnection` hands it out.

How this works: the connection's reader puts each ``frame`` event of the channel in the
channel's bounded inbox and marks it closed on ``channel_closed``; :meth:`ClientChannel.receive`
takes frames from there and, on a windowed connection, gives credit back to the node half a
window at a time. :meth:`ClientChannel.send` goes through the connection's request path and
honours the node's pacing hints on the way (``window``, ``pace_ms``, ``retry_after_ms``:
docs/protocol.md, "Scheduling").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from .errors import ChannelClosed, ChannelThrottled

if TYPE_CHECKING:
    from .client import MuxConnection

__all__ = ["ClientChannel"]


class ClientChannel:
    """One channel as seen by a :class:`MuxConnection`: send, receive, iterate, close.

    ``role`` is ``"opener"`` for channels this connection opened and ``"target"`` for ones
    another agent opened to it; ``peer`` is the other end. ``async for frame in ch`` yields
    frame dicts until the channel is closed; then ``closed_reason`` says why.
    """

    def __init__(self, conn: MuxConnection, event: dict[str, Any], buffer_frames: int) -> None:
        self._conn = conn
        self.id: str = event["channel_id"]
        self.intent: str = event.get("intent", "")
        self.agent: str = event.get("agent", "")
        self.target: str = event.get("target", "")
        self.role: str = event.get("role", "opener")
        self.route: dict[str, Any] = event.get("route") or {}
        self.metadata: dict[str, Any] = event.get("metadata") or {}
        self.policy: dict[str, Any] = event.get("policy") or {}
        self.delivery: str = event.get("delivery", "")
        """The intent's delivery as the node names it: ``live``, ``realtime`` (a call) or
        ``durable`` (empty from a node that does not say)."""
        self.tbz_hash: str = event.get("tbz_hash", "")
        self.closed_reason: str | None = None
        self.last_seal: dict[str, Any] | None = None
        """The newest ``seal`` frame (a node signing chain heads sends these; see docs/frames.md)."""
        self.closed_event: dict[str, Any] | None = None
        """The ``channel_closed`` event, once the channel is closed."""
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[dict[str, Any]](buffer_frames)
        self._taken = 0
        """Frames taken since credit was last given back (windowed connections)."""
        self.window: int | None = None
        """The node's ``window`` hint from the last ack or refusal (None: no limit from the
        node): ``send`` keeps at most this many frames unacknowledged on the channel."""
        self._hinted = False
        """An answer to a send of this channel has come (its ``window``, or none, is the node's)."""
        self._in_flight = 0
        self._room = trio.lowlevel.ParkingLot()
        self._not_before = -math.inf
        """No send before this (trio clock): the node's ``pace_ms`` or ``retry_after_ms``."""

    def __repr__(self) -> str:
        state = f"closed ({self.closed_reason})" if self.closed_reason else "open"
        return f"<ClientChannel {self.id} {self.agent}->{self.target} {self.intent} {state}>"

    @property
    def peer(self) -> str:
        """The other end of the channel."""
        return self.target if self.agent == self._conn.agent else self.agent

    @property
    def is_open(self) -> bool:
        """True until the node reports the channel closed."""
        return self.closed_reason is None

    def _closed(self, event: dict[str, Any]) -> None:
        if self.closed_event is None:
            self.closed_event = event
            self.closed_reason = str(event.get("reason") or "closed")
        self._inbox_send.close()
        self._room.unpark_all()  # sends waiting for the window fail at once

    def _raise_closed(self) -> NoReturn:
        raise ChannelClosed(f"channel is closed ({self.closed_reason})", channel_id=self.id)

    async def send(self, payload: Any) -> dict[str, Any]:
        """Send one payload (JSON value, or ``bytes`` as a binary message); returns the ``frame_ack``.

        Sends honour the node's pacing hints (while a call is active on the connection, a bulk
        channel's acks carry them): beyond ``window`` frames in flight a send waits for an
        earlier one's answer, and after a ``pace_ms`` (or a refusal's ``retry_after_ms``) the
        next send waits that long. Before the node's first answer on a preemptible channel,
        while the connection holds a call, sends go one at a time, as the node would ask. A
        ``throttled`` refusal still raises :class:`~mux.errors.ChannelThrottled` (with
        ``retry_after_ms``) for the caller to retry.
        """
        while self.closed_reason is None:  # both gates again after any wait: either may have moved
            window = self._window_now()
            if window is not None and self._in_flight >= window:
                await self._room.park()
            elif self._not_before > trio.current_time():
                await trio.sleep_until(self._not_before)
            else:
                break
        if self.closed_reason is not None:
            self._raise_closed()
        self._in_flight += 1
        window = self.window
        try:
            urgent = self.delivery == "realtime"  # a call's frames go ahead of other writes
            if isinstance(payload, (bytes, bytearray, memoryview)):
                reply = await self._conn._request(
                    {"action": "send", "channel_id": self.id}, binary=bytes(payload), expect="frame_ack", urgent=urgent
                )
            else:
                reply = await self._conn._request(
                    {"action": "send", "channel_id": self.id, "payload": payload}, expect="frame_ack", urgent=urgent
                )
            hint = reply.get("window")
            window = hint if isinstance(hint, int) and not isinstance(hint, bool) and hint > 0 else None
            self._pace(reply.get("pace_ms"))
            self._hinted = True
        except ChannelThrottled as exc:
            window = exc.window or None
            self._pace(exc.retry_after_ms)
            self._hinted = True
            raise
        finally:
            self._in_flight -= 1
            self._set_window(window)
        return reply

    def _window_now(self) -> int | None:
        """The most sends in flight now: the node's hint; before its first answer, one on a
        preemptible channel while the connection holds a call (the node shapes such a channel
        from its first frame: a burst sent before the hint came would be refused)."""
        if self.window is not None or self._hinted:
            return self.window
        return 1 if self.policy.get("preemptible") is True and self._conn._holds_call() else None

    def _pace(self, ms: Any) -> None:
        if isinstance(ms, int) and not isinstance(ms, bool) and 0 < ms <= 60_000:
            self._not_before = max(self._not_before, trio.current_time() + ms / 1000)

    def _set_window(self, window: int | None) -> None:
        self.window = window
        most = self._window_now()
        if most is None:
            self._room.unpark_all()
        else:
            self._room.unpark(count=max(0, most - self._in_flight))

    async def receive(self) -> dict[str, Any]:
        """The next frame addressed to us (``Frame.to_dict()`` form; binary payloads as bytes).

        Raises :class:`~mux.errors.ChannelClosed` once the channel is closed and drained.
        """
        try:
            frame = await self._inbox_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self._raise_closed()
        await self._took()
        return frame

    def __aiter__(self) -> ClientChannel:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            frame = await self._inbox_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        await self._took()
        return frame

    async def _took(self) -> None:
        """One frame was taken: on a windowed connection, give credit back once half a
        window's worth has been taken."""
        window = self._conn.receive_window
        if window is None:
            return
        self._taken += 1
        if self._taken >= max(1, window // 2) and self.is_open:
            taken, self._taken = self._taken, 0
            await self._conn._credit(self.id, taken)

    async def ack(self, seq: int) -> dict[str, Any]:
        """Acknowledge durable frames up to ``seq`` (cumulative); returns the ``acked`` event.

        Durable intents (chat, push, task, sync, mail) redeliver unacknowledged frames on the
        next connection; drop duplicates by ``(channel_id, seq)``.
        """
        return await self._conn._request({"action": "ack", "channel_id": self.id, "seq": seq}, expect="acked")

    async def close(self, reason: str = "closed") -> dict[str, Any]:
        """Close the channel (idempotent); returns the ``channel_closed`` event."""
        if self.closed_event is not None:
            return self.closed_event
        try:
            return await self._conn._request(
                {"action": "close", "channel_id": self.id, "reason": reason}, expect="channel_closed"
            )
        except ChannelClosed:
            if self.closed_event is not None:
                return self.closed_event
            raise
