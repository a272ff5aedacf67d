"""Channels: the shared record of a channel, its two ends, and the handle each end holds.

How this works: a channel has exactly two ends, the opener (``agent``) and the ``target``.
Each end that is attached (held by a local agent or a connection) has its own bounded trio
memory channel, its inbox. Frames one end sends are chained and signed under the channel's
:class:`~mux.frames.ChainHead`, handed to the channel's backend, and the backend may deliver
them only through :meth:`ChannelContext.deliver`, which can reach nothing but the other end's
inbox. No other path into an inbox exists: that is the isolation boundary.

A :class:`Channel` is one end's handle: ``send``, ``receive``/``async for``, ``close``.
"""

from __future__ import annotations

import functools
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import orjson
import trio

from . import packed_frames
from .bandwidth import TokenBucket
from .errors import ChannelClosed, ChannelForbidden, ChannelFull, MuxError
from .frames import ChainHead, Frame
from .intents import Intent

if TYPE_CHECKING:
    from backends.base import Backend, Disposition

    from .core import Mux
    from .endpoint import Endpoint

__all__ = ["Channel", "ChannelContext", "ChannelState", "Draft", "End", "Ends", "Receipt", "ShelvedChannel", "Sink"]


@functools.lru_cache(maxsize=512)
def shared_route(intent: Intent, backend_name: str, fallback: bool) -> dict[str, Any]:
    """A channel's ``route`` object, one shared dict per distinct route (never mutate it:
    open frames of many channels carry it; ``ChannelState.route`` hands out copies)."""
    out: dict[str, Any] = {"backend": intent.backend, "description": intent.route.description}
    if fallback:
        out["served_by"] = backend_name
        out["fallback"] = True
    return out


def now_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch (frame ``ts``)."""
    return time.time_ns() // 1_000_000


class Sink(Protocol):
    """Where an end's frames go instead of its inbox: a connection that sends them on
    itself (``mux.session``), with its own bound."""

    def put(self, frame: Frame) -> bool:
        """Take ``frame`` without waiting; False when there is no room for it."""

    def has_room(self) -> bool:
        """True when one more frame would be taken."""

    def shut(self) -> None:
        """The channel ended: after what was taken, tell the holder (idempotent)."""


@attrs.define(eq=False)
class End:
    """One end of a channel: the agent, and its inbox (or sink) once attached.

    The inbox (a bounded trio memory channel) is made when first needed: a connection that
    takes the end's frames through a sink never needs one, nor a parking lot for ``room``."""

    agent: str
    capacity: int
    holder: Endpoint | None = None
    inbox_send: trio.MemorySendChannel[Frame] | None = None
    inbox_recv: trio.MemoryReceiveChannel[Frame] | None = None
    queued: int = 0
    reserved: str | None = None
    """Resume token this end waits for (its connection dropped; see ``mux.resume``)."""
    sink: Sink | None = None
    """Set by a connection that takes this end's frames directly (no inbox, no task)."""
    ended: bool = False
    """True once ``shut``: nothing more will be put."""
    live: bool = False
    """True while someone holds this end."""
    generation: int = 0
    """Counts attachments and detachments: a handle belongs to one of them."""
    _room: trio.lowlevel.ParkingLot | None = None

    @property
    def attached(self) -> bool:
        """True when someone holds this end and can receive on it."""
        return self.live

    @property
    def room(self) -> trio.lowlevel.ParkingLot:
        """Where senders wait for room in this end (made on first use)."""
        if self._room is None:
            self._room = trio.lowlevel.ParkingLot()
        return self._room

    def wake(self) -> None:
        """Wake whoever waits for room (or for the end)."""
        if self._room:
            self._room.unpark_all()

    def attach(self, holder: Endpoint | None) -> None:
        """Hold this end: frames for it are kept (up to ``capacity``) until read."""
        self.holder = holder
        self.sink = None
        self.ended = False
        self.live = True
        self.generation += 1
        self.inbox_send = self.inbox_recv = None
        self.queued = 0

    def inbox(self) -> trio.MemoryReceiveChannel[Frame] | None:
        """The inbox's receiving side (made now if needed); None without one (detached, or
        the frames go to a sink)."""
        if self.inbox_recv is None and self.live and self.sink is None:
            self.inbox_send, self.inbox_recv = trio.open_memory_channel[Frame](self.capacity)
            if self.ended:
                self.inbox_send.close()
        return self.inbox_recv

    def use_sink(self, sink: Sink) -> None:
        """Hand this end's frames to ``sink`` from now on: what waits in the inbox goes
        first (in order), and an end already shut is shut on the sink too."""
        waiting: list[Frame] = []
        if self.inbox_recv is not None:
            while True:
                try:
                    waiting.append(self.inbox_recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            self.inbox_recv.close()
        self.inbox_send = self.inbox_recv = None
        self.queued = 0
        self.sink = sink
        for frame in waiting:
            sink.put(frame)
        if self.ended:
            sink.shut()

    def detach(self) -> None:
        """Nobody holds this end any more: drop its inbox (durable frames stay in the mailbox)."""
        if self.inbox_send is not None:
            self.inbox_send.close()
        self.holder = None
        self.sink = None
        self.live = False
        self.generation += 1
        self.inbox_send = self.inbox_recv = None
        self.queued = 0
        self.wake()

    def has_room(self) -> bool:
        """True when the inbox can take one more frame."""
        if self.sink is not None:
            return self.sink.has_room()
        return self.live and self.queued < self.capacity

    def put(self, frame: Frame) -> bool:
        """Put ``frame`` into the inbox without waiting; False if detached, closed or full."""
        if self.sink is not None:
            return self.sink.put(frame)
        if not self.live or self.ended or self.queued >= self.capacity:
            return False
        if self.inbox_send is None:
            self.inbox()
        assert self.inbox_send is not None
        try:
            self.inbox_send.send_nowait(frame)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        self.queued += 1
        return True

    def shut(self) -> None:
        """Close the inbox's sending side: the holder reads what is queued, then the end."""
        self.ended = True
        if self.sink is not None:
            self.sink.shut()
            self.sink = None  # everything it took is queued with its holder: let go of it
        elif self.inbox_send is not None:
            self.inbox_send.close()
        self.wake()


class Ends:
    """A channel's two ends by agent name (a dict's lookups, a pair's size)."""

    __slots__ = ("_a", "_b")

    def __init__(self, a: End, b: End) -> None:
        self._a = a
        self._b = b

    def get(self, agent: str) -> End | None:
        """The end of ``agent``, or None."""
        if self._a.agent == agent:
            return self._a
        if self._b.agent == agent:
            return self._b
        return None

    def __getitem__(self, agent: str) -> End:
        end = self.get(agent)
        if end is None:
            raise KeyError(agent)
        return end

    def __contains__(self, agent: object) -> bool:
        return agent == self._a.agent or agent == self._b.agent

    def values(self) -> tuple[End, End]:
        """Both ends, opener first."""
        return (self._a, self._b)


@attrs.frozen
class Draft:
    """A frame about to be chained, as ``Backend.check_frame`` sees it: who sends what to whom."""

    sender: str
    target: str
    payload: Any


@attrs.frozen
class Receipt:
    """The outcome of sending one frame: the signed frame, its disposition, and for a
    durable channel the store ``position`` to wait for (``Mux.store.flushed``)."""

    frame: Frame
    disposition: Disposition
    stored: bool = False
    position: int = 0

    @property
    def delivered(self) -> bool:
        """True when the frame reached the receiving end's buffer."""
        return self.disposition.value == "delivered"


@attrs.define(eq=False)
class ChannelState:
    """Everything the node knows about one channel; shared by both ends' handles."""

    id: str
    intent: Intent
    agent: str
    target: str
    metadata: dict[str, Any]
    chain: ChainHead
    bucket: TokenBucket
    ends: Ends
    backend: Backend
    backend_name: str
    fallback: bool
    opened_at: float
    open_frame: Frame | None = None
    close_frame: Frame | None = None
    close_reason: str | None = None
    frames: int = 0
    bytes: int = 0
    throttled: int = 0
    dropped: int = 0
    cancel_scope: trio.CancelScope | None = None
    """The backend task's scope (channels whose backend has no background work have none)."""
    ctx: ChannelContext | None = None
    durable: bool = False
    """True when the backend stores frames until the receiver acknowledges them."""
    check_frame: Callable[[ChannelContext, Draft], None] | None = None
    """The backend's optional content check, run before a frame is chained."""
    on_room: Callable[[ChannelState, End], None] | None = None
    """Called after an end took a frame from its inbox (durable channels refill it)."""
    appended: trio.lowlevel.ParkingLot | None = None
    """Woken whenever a frame is chained (long-poll readers make it and wait here)."""
    extra_seal: Frame | None = None
    """The newest seal frame handed to a library receiver."""
    _extra: dict[str, Any] | None = None

    @property
    def extra(self) -> dict[str, Any]:
        """The backend's own counters and notes, shown as the channel's ``backend_state``
        (made on first use: most channels never have any)."""
        if self._extra is None:
            self._extra = {}
        return self._extra

    @property
    def is_open(self) -> bool:
        """True until the close frame is chained."""
        return self.close_frame is None

    @property
    def state(self) -> str:
        """``"open"`` or ``"closed"``."""
        return "open" if self.is_open else "closed"

    def route(self) -> dict[str, Any]:
        """The seed's ``route`` object, plus which backend really serves the channel."""
        return dict(shared_route(self.intent, self.backend_name, self.fallback))

    def info(self) -> dict[str, Any]:
        """JSON summary of the channel (``GET /channel/{id}``)."""
        return {
            "channel_id": self.id,
            "intent": self.intent.name,
            "route": self.route(),
            "state": self.state,
            "agent": self.agent,
            "target": self.target,
            "metadata": self.metadata,
            "policy": self.intent.policy.to_dict(),
            "opened_at": self.opened_at,
            "tbz_hash": self.open_frame.tbz_hash if self.open_frame else None,
            "head": self.chain.head,
            "seq": self.chain.next_seq - 1,
            "frames": self.frames,
            "bytes": self.bytes,
            "throttled": self.throttled,
            "dropped": self.dropped,
            "close_reason": self.close_reason,
            **({"backend_state": self._extra} if self._extra else {}),
        }


@attrs.frozen
class ShelvedChannel:
    """A closed channel's state kept as one ``bytes`` (beside its intent and backend), for
    the node's lookups of recently closed channels: 1.0 KB kept per channel where the state
    itself kept 2.2 KB (tracemalloc, the lookup's key and table slot included), and a new
    object, so that what a burst of closes leaves in the lookups does not hold the memory
    the burst took.

    :meth:`of` shelves a settled closed channel (nothing will change it any more, the caller
    checks); :meth:`revive` gives an equal state again, made anew at every lookup, with no
    context and no task, its ends detached and ended. ``data`` is a JSON header of the
    state's fields, then its open, close and newest seal frames packed
    (:mod:`mux.packed_frames`)."""

    intent: Intent
    backend: Backend
    data: bytes

    @classmethod
    def of(cls, state: ChannelState) -> ShelvedChannel:
        """``state`` shelved (a closed channel's)."""
        assert state.close_frame is not None
        chain, bucket = state.chain, state.bucket
        a, b = state.ends.values()
        frames = [f for f in (state.open_frame, state.close_frame, state.extra_seal) if f is not None]
        header = orjson.dumps(
            [
                state.agent,
                state.target,
                state.metadata,
                state.backend_name,
                state.fallback,
                state.opened_at,
                state.close_reason,
                [state.frames, state.bytes, state.throttled, state.dropped],
                [chain.intent, chain.next_seq, chain.head, chain.sign_every, chain.sign_within_ms],
                [chain.unsigned, chain.unsigned_since, bucket.rate, bucket.burst, a.capacity, b.capacity],
                [state.open_frame is not None, state.extra_seal is not None],
                state._extra,
            ]
        )
        return cls(state.intent, state.backend, _LEN.pack(len(header)) + header + packed_frames.pack(frames))

    def revive(self, channel_id: str, sign: Callable[[bytes], str]) -> ChannelState:
        """The shelved state again, of ``channel_id``, its chain head signing with ``sign``."""
        (size,) = _LEN.unpack_from(self.data)
        start = _LEN.size + size
        agent, target, metadata, backend_name, fallback, opened_at, reason, counts, head, more, has, extra = (
            orjson.loads(self.data[_LEN.size : start])
        )
        frames = packed_frames.unpack(self.data[start:], channel_id)
        open_frame = frames.pop(0) if has[0] else None
        close_frame = frames.pop(0)
        intent_name, next_seq, head_hash, sign_every, sign_within_ms = head
        unsigned, unsigned_since, rate, burst, cap_a, cap_b = more
        frames_n, bytes_n, throttled, dropped = counts
        return ChannelState(
            id=channel_id,
            intent=self.intent,
            agent=agent,
            target=target,
            metadata=metadata,
            chain=ChainHead(
                channel_id, intent_name, sign, next_seq, head_hash, sign_every, sign_within_ms, unsigned, unsigned_since
            ),
            bucket=TokenBucket(rate, burst),
            ends=Ends(End(agent, cap_a, ended=True), End(target, cap_b, ended=True)),
            backend=self.backend,
            backend_name=backend_name,
            fallback=fallback,
            opened_at=opened_at,
            open_frame=open_frame,
            close_frame=close_frame,
            close_reason=reason,
            frames=frames_n,
            bytes=bytes_n,
            throttled=throttled,
            dropped=dropped,
            extra_seal=frames.pop(0) if has[1] else None,
            extra=extra,
        )


_LEN = struct.Struct("<I")


@attrs.define(eq=False)
class ChannelContext:
    """What a backend may touch for one channel: its facts, its two ends, its chain."""

    state: ChannelState
    mux: Mux

    @property
    def channel_id(self) -> str:
        """The channel id."""
        return self.state.id

    @property
    def intent(self) -> Intent:
        """The resolved intent."""
        return self.state.intent

    @property
    def agent(self) -> str:
        """The opener."""
        return self.state.agent

    @property
    def target(self) -> str:
        """The target agent."""
        return self.state.target

    @property
    def metadata(self) -> dict[str, Any]:
        """The metadata given at open."""
        return self.state.metadata

    def peer_of(self, agent: str) -> str:
        """The other end of the channel from ``agent``."""
        return self.state.target if agent == self.state.agent else self.state.agent

    def require_room(self, agent: str) -> None:
        """Raise ``ChannelFull`` if ``agent``'s end is attached and its inbox is full."""
        end = self.state.ends[agent]
        if end.attached and not end.has_room():
            raise ChannelFull(
                f"{agent}'s buffer for this channel is full", channel_id=self.state.id, wait_room=end.room.park
            )

    def deliver(self, frame: Frame) -> bool:
        """Put ``frame`` into the inbox of its ``target`` end (one of this channel's ends).

        Returns False when that end is not attached or its inbox is full, and counts a drop
        unless the frame is held for a resume (:meth:`held_for_resume`).
        """
        end = self.state.ends.get(frame.target)
        if frame.channel_id != self.state.id or end is None:
            raise ChannelForbidden("a frame can only be delivered to its own channel's ends", channel_id=self.state.id)
        if end.put(frame):
            return True
        if not self.held_for_resume(frame):
            self.state.dropped += 1
        return False

    def held_for_resume(self, frame: Frame) -> bool:
        """True when ``frame``'s receiving end waits for its dropped connection to resume and
        a resume would replay the frame (every frame but a call's binary media)."""
        return self.state.ends[frame.target].reserved is not None and not (frame.binary and self.state.intent.realtime)

    def emit(self, payload: Any, *, to: str, sender: str | None = None) -> Frame:
        """Chain and sign a frame made by the backend and deliver it to end ``to``.

        ``sender`` defaults to the other end (the backend speaks for the side it serves).
        """
        if to not in self.state.ends:
            raise ChannelForbidden(f"{to} is not an end of this channel", channel_id=self.state.id)
        if not self.state.is_open:
            raise ChannelClosed("channel is closed", channel_id=self.state.id)
        frame = self.mux._chain(self.state, "data", sender or self.peer_of(to), to, payload)
        self.deliver(frame)
        self.mux._count(self.state, frame.size)
        return frame

    async def send(self, payload: Any, *, to: str, sender: str | None = None) -> Frame:
        """Like ``emit``, but wait while ``to``'s inbox is full: nothing is dropped (byte
        streams such as tunnels need this). Raises ChannelClosed if the channel closes."""
        end = self.state.ends[to]
        while (end.reserved is not None or (end.attached and not end.has_room())) and self.state.is_open:
            await end.room.park()  # a dropped resumable end waits too: nothing piles up meanwhile
        return self.emit(payload, to=to, sender=sender)

    def options(self) -> dict[str, Any]:
        """This backend's node options (``MuxConfig.backends[backend_name]``)."""
        return dict(self.mux.config.backends.get(self.state.backend_name, {}))

    async def close(self, reason: str) -> None:
        """Close the channel with ``reason``."""
        await self.mux._close(self.state, reason)


class Channel:
    """One end's handle on a channel: send to the other end, receive from it, close.

    ``local`` is the agent holding this handle; ``peer`` the other end. Iterating yields the
    frames the peer sent, in order, and stops when the channel closes (then ``close_reason``
    and ``close_frame`` say how).
    """

    __slots__ = ("_end", "_gen", "_mux", "_recv", "_state")

    def __init__(self, mux: Mux, state: ChannelState, end: End) -> None:
        self._mux = mux
        self._state = state
        self._end = end
        self._gen = end.generation  # this handle reads the inbox of its own attachment
        self._recv: trio.MemoryReceiveChannel[Frame] | None = None

    def _inbox(self) -> trio.MemoryReceiveChannel[Frame] | None:
        if self._recv is None and self._gen == self._end.generation:
            self._recv = self._end.inbox()
        return self._recv

    def __repr__(self) -> str:
        return f"<Channel {self.id} {self.intent} {self.local}->{self.peer} {self.state}>"

    @property
    def id(self) -> str:
        """The channel id, ``ch-`` + 32 hex digits."""
        return self._state.id

    @property
    def intent(self) -> str:
        """The intent name as opened."""
        return self._state.intent.name

    @property
    def agent(self) -> str:
        """The opener of the channel."""
        return self._state.agent

    @property
    def target(self) -> str:
        """The target of the channel."""
        return self._state.target

    @property
    def local(self) -> str:
        """The agent holding this handle."""
        return self._end.agent

    @property
    def peer(self) -> str:
        """The other end."""
        return self._state.target if self._end.agent == self._state.agent else self._state.agent

    @property
    def metadata(self) -> dict[str, Any]:
        """Metadata given at open."""
        return self._state.metadata

    @property
    def route(self) -> dict[str, Any]:
        """The route object (backend, description)."""
        return self._state.route()

    @property
    def state(self) -> str:
        """``"open"`` or ``"closed"``."""
        return self._state.state

    @property
    def open_frame(self) -> Frame:
        """The signed open record (seq 0)."""
        assert self._state.open_frame is not None
        return self._state.open_frame

    @property
    def tbz_hash(self) -> str:
        """Hash of the open frame (as in the seed's open response)."""
        return self.open_frame.tbz_hash

    @property
    def close_frame(self) -> Frame | None:
        """The signed close record, once closed."""
        return self._state.close_frame

    @property
    def close_reason(self) -> str | None:
        """Why the channel closed, once closed."""
        return self._state.close_reason

    def info(self) -> dict[str, Any]:
        """JSON summary of the channel."""
        return self._state.info()

    def post_nowait(self, payload: Any) -> Receipt:
        """Send ``payload`` (JSON value or bytes) without waiting; returns the receipt.

        Raises ChannelClosed, ChannelThrottled (preemptible over budget) or ChannelFull
        (receiver's buffer full; nothing was chained, retry later).
        """
        return self._mux._post(self._state, self._end.agent, payload)

    async def post(self, payload: Any) -> Receipt:
        """Send ``payload``, waiting while the receiver's buffer is full; returns the receipt."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                return self._mux._post(self._state, self._end.agent, payload)
            except ChannelFull as exc:
                if exc.wait_room is None:
                    raise
                await exc.wait_room()

    async def send(self, payload: Any, *, wait: bool = True) -> Frame:
        """Send ``payload`` and return the signed :class:`Frame`.

        With ``wait`` (default) a full receiver buffer makes this wait; without, it raises
        ChannelFull. On a durable channel it returns once the frame is durably stored.
        """
        if wait:
            receipt = await self.post(payload)
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            receipt = self.post_nowait(payload)
        if receipt.stored:
            await self._mux.store.flushed(receipt.position)
        return receipt.frame

    async def ack(self, seq: int) -> int:
        """Acknowledge durable frames of this channel up to ``seq`` (they leave the mailbox)."""
        await trio.lowlevel.checkpoint()
        return self._mux.ack(self._end.agent, self.id, seq)

    async def receive(self) -> Frame:
        """The next frame from the peer; raises ChannelClosed once closed and drained.

        ``seal`` frames (signatures for a node that signs chain heads) are not returned:
        the newest is kept as ``last_seal``."""
        while True:
            frame = await self._receive_any()
            if frame.kind != "seal":
                return frame
            self._state.extra_seal = frame

    @property
    def last_seal(self) -> Frame | None:
        """The newest signed ``seal`` frame received on this channel (see docs/frames.md)."""
        return self._state.extra_seal

    async def _receive_any(self) -> Frame:
        end = self._end
        recv = self._inbox()
        if recv is None:
            raise MuxError("this end is not attached", code="not_attached", channel_id=self.id)
        try:
            frame = await recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ChannelClosed(self._ended(), channel_id=self.id) from None
        if end.inbox_recv is not recv:  # detached meanwhile: nothing more to account
            return frame
        end.queued -= 1
        end.wake()
        if self._state.on_room is not None:
            self._state.on_room(self._state, end)
        return frame

    def receive_nowait(self) -> Frame | None:
        """The next queued frame, or None if none is queued (raises ChannelClosed at the end)."""
        end = self._end
        recv = self._inbox()
        if recv is None:
            return None
        try:
            frame = recv.receive_nowait()
        except trio.WouldBlock:
            return None
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ChannelClosed(self._ended(), channel_id=self.id) from None
        if end.inbox_recv is not recv:
            return frame
        end.queued -= 1
        end.wake()
        if self._state.on_room is not None:
            self._state.on_room(self._state, end)
        return frame

    def _ended(self) -> str:
        if self._state.close_frame is not None:
            return f"channel closed: {self._state.close_reason}"
        return "this end was detached (the channel is still open)"

    @property
    def detached(self) -> bool:
        """True when this handle's attachment ended while the channel stayed open."""
        return self._gen != self._end.generation

    def __aiter__(self) -> Channel:
        return self

    async def __anext__(self) -> Frame:
        try:
            return await self.receive()
        except ChannelClosed:
            raise StopAsyncIteration from None

    async def close(self, reason: str = "closed") -> Frame:
        """Close the channel (both ends) with ``reason``; returns the signed close frame."""
        return await self._mux._close(self._state, reason, by=self._end.agent)
