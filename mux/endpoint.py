"""An agent attached to a :class:`~mux.core.Mux`: the channels opened to it, and those it holds.

How this works: ``Mux.attach`` makes one :class:`Endpoint` per attached agent. The mux
announces each channel opened to the agent (``_announce``): the endpoint holds its end and
hands it to the taker set with ``take_channels`` (as a connection does), or else queues it
for ``accept`` (bounded by the opens the mux admits, ``incoming_buffer_channels``). Leaving
closes what it opened and the live channels it accepted; durable channels opened to it stay
open, their frames waiting in its mailbox for its next attachment.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .channel import Channel, ChannelState
from .errors import ChannelClosed, ChannelForbidden

if TYPE_CHECKING:
    from .core import Mux

__all__ = ["Endpoint"]


class Endpoint:
    """An agent attached to a Mux: receives channels opened to it and opens its own.

    Use ``async with mux.attach("gemini") as gemini:``; ``await gemini.accept()`` (or
    ``async for ch in gemini``) gives each channel opened to it as a :class:`Channel`.
    Leaving the block closes the channels it holds with reason ``detached``.
    """

    def __init__(self, mux: Mux, agent: str) -> None:
        self.mux = mux
        self.agent = agent
        self._held: dict[str, Channel] = {}
        # Announced channels not yet accepted, oldest first, and the tasks waiting in accept():
        # made by the first that needs them (a connection takes its channels as they come, see
        # take_channels, and most endpoints never queue one). Unbounded here, bounded by the
        # opens it admits (incoming_buffer_channels) and by the agent's own mailbox channels
        # announced at attach.
        self._incoming: collections.deque[Channel] | None = None
        self._arrived: trio.lowlevel.ParkingLot | None = None
        self._take: Callable[[Channel], bool] | None = None
        self.attached = True

    def __repr__(self) -> str:
        return f"<Endpoint {self.agent} holding {len(self._held)} channels>"

    def _has_room(self) -> bool:
        return self._incoming is None or len(self._incoming) < self.mux.config.incoming_buffer_channels

    def _announce(self, state: ChannelState) -> None:
        end = state.ends[self.agent]
        end.attach(self)
        handle = Channel(self.mux, state, end)
        if state.is_open:
            self._held[state.id] = handle
        take = self._take
        if take is None or self._incoming or not take(handle):  # queued ones go first
            self._queue(handle)
        if state.on_room is not None:
            state.on_room(state, end)

    def _queue(self, handle: Channel) -> None:
        if self._incoming is None:
            self._incoming = collections.deque()
        self._incoming.append(handle)
        if self._arrived is not None:
            self._arrived.unpark_all()

    def take_channels(self, take: Callable[[Channel], bool]) -> None:
        """Hand every channel announced from now on (and those waiting now, oldest first)
        to ``take`` as it is announced, instead of queueing it for :meth:`accept`; ``take``
        returns False to leave it (and every later one) queued, for ``accept_nowait``. A
        connection takes its channels this way: no task waits in ``accept`` for it."""
        self._take = take
        while self._incoming and take(self._incoming[0]):
            self._incoming.popleft()

    @property
    def channels(self) -> list[Channel]:
        """The open channels this endpoint holds (opened or accepted)."""
        return list(self._held.values())

    async def accept(self) -> Channel:
        """The next channel opened to this agent (raises ChannelClosed once detached and
        every announced channel is taken)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            ch = self.accept_nowait()
            if ch is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()  # taken: not lost to a cancel
                return ch
            if self._arrived is None:
                self._arrived = trio.lowlevel.ParkingLot()
            await self._arrived.park()

    def accept_nowait(self) -> Channel | None:
        """The next announced channel, or None when none is waiting (ChannelClosed once
        detached and every announced channel is taken)."""
        if self._incoming:
            return self._incoming.popleft()
        if not self.attached:
            raise ChannelClosed(f"endpoint {self.agent} is detached")
        return None

    def __aiter__(self) -> Endpoint:
        return self

    async def __anext__(self) -> Channel:
        try:
            return await self.accept()
        except ChannelClosed:
            raise StopAsyncIteration from None

    async def open(self, target: str, intent: str = "stream", metadata: dict[str, Any] | None = None) -> Channel:
        """Open a channel from this agent; this endpoint holds the opener end."""
        await trio.lowlevel.checkpoint()
        return self.open_nowait(target, intent, metadata)

    def open_nowait(self, target: str, intent: str = "stream", metadata: dict[str, Any] | None = None) -> Channel:
        """``open`` without a checkpoint."""
        if not self.attached:
            raise ChannelClosed(f"endpoint {self.agent} is detached")
        return self.mux.open_nowait(target, intent, metadata, holder=self)

    def channel(self, channel_id: str) -> Channel:
        """The handle of a channel this endpoint holds (ChannelNotFound/ChannelForbidden otherwise)."""
        handle = self._held.get(channel_id)
        if handle is None:
            state = self.mux.channel_state(channel_id, caller=self.agent)
            if not state.is_open:
                raise ChannelClosed(f"channel is closed ({state.close_reason})", channel_id=channel_id)
            raise ChannelForbidden("this connection does not hold that channel", channel_id=channel_id)
        return handle

    def close_all(self, reason: str) -> None:
        """The agent is leaving: close the channels it opened and the live ones it accepted
        with ``reason``; durable channels opened to it stay open, their frames wait in its
        mailbox for its next attachment."""
        for handle in list(self._held.values()):
            state = handle._state
            if state.durable and handle.local == state.target:
                handle._end.detach()
                del self._held[state.id]
                if not self._held:
                    self._held.clear()
            else:
                self.mux._close_nowait(state, reason, by=self.agent)

    def _detach(self) -> None:
        if not self.attached:
            return
        self.attached = False
        self._take = None
        if self._arrived is not None:
            self._arrived.unpark_all()  # accept() raises once the queue is empty
        if self.mux._endpoints.get(self.agent) is self:
            del self.mux._endpoints[self.agent]

    def leave(self, reason: str) -> None:
        """The agent goes away: ``close_all(reason)``, detach, and let go of every frame still
        queued for it (nobody will read those; durable ones stay in its mailbox)."""
        held = list(self._held.values())
        self.close_all(reason)
        self._detach()
        for handle in held:
            handle._end.detach()

    async def aclose(self, reason: str = "detached") -> None:
        """Close this endpoint's channels with ``reason`` and detach it (see ``leave``)."""
        await trio.lowlevel.checkpoint()
        self.leave(reason)

    async def __aenter__(self) -> Endpoint:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()
