"""The generic relay backend (``stream`` and every unknown intent): live, nothing stored.

A frame goes straight into the receiving end's bounded buffer. If the receiver is not
attached the frame is dropped (``Disposition.DROPPED``; a live channel keeps nothing), unless
its connection dropped and may resume: then it is ``HELD`` (replayed from the ledger on
resume). If its buffer is full, a real-time channel drops the frame (late media is
worthless) and counts the drop; any other channel refuses it with ``ChannelFull`` before it
is chained, so the sender can wait or retry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Disposition, relayed

if TYPE_CHECKING:
    from mux.channel import ChannelContext
    from mux.frames import Frame

__all__ = ["StreamBackend"]


class StreamBackend:
    """Live relay between a channel's two ends."""

    name = "stream"
    background = False
    """``run`` does nothing: no task per channel."""

    def __init__(self, mux: Any = None) -> None:
        self.mux = mux

    def check_open(self, ctx: ChannelContext) -> None:
        """Every channel may open."""

    async def run(self, ctx: ChannelContext) -> None:
        """Nothing to do in the background: relay happens in ``on_frame``."""

    def admit(self, ctx: ChannelContext, sender: str, size: int) -> None:
        """Refuse (retryably) when a non-real-time receiver's buffer is full."""
        if not ctx.intent.realtime:
            ctx.require_room(ctx.peer_of(sender))

    def on_frame(self, ctx: ChannelContext, frame: Frame) -> Disposition:
        """Hand the frame to the receiving end, or drop it."""
        return relayed(ctx, frame)

    def on_close(self, ctx: ChannelContext, reason: str) -> None:
        """Nothing held."""
