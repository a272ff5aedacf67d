"""The seam between the mux core and a backend.

How this works: when a channel opens, the router resolves its intent to a backend name and
asks the backend factory registered under that name for a :class:`Backend` (one instance per
node, shared by its channels). For each channel the core then:

1. calls ``backend.check_open(ctx)``: raise a ``MuxError`` to refuse the channel;
2. starts ``backend.run(ctx)`` as the channel's own task in the mux nursery; when it returns
   the channel stays open, when it raises the channel (and only it) is closed with reason
   ``backend_error``; the task is cancelled when the channel closes. A backend with nothing
   to do in the background says so with a class attribute ``background = False``: its
   channels then get no task at all (a task costs memory per open channel);
3. for every frame an end sends: ``backend.admit(ctx, sender, size)`` (raise ``ChannelFull``
   to refuse it before it is chained), then the optional ``backend.check_frame(ctx, draft)``
   (a :class:`~mux.channel.Draft` with sender, target and payload: raise a ``MuxError`` to
   refuse a frame by its content, before it is chained, so refusals never leave gaps in a
   chain), then, once signed and chained, ``backend.on_frame(ctx, frame)`` which decides its
   fate and returns a :class:`Disposition`.

``admit`` and ``on_frame`` are synchronous (no awaits): a channel's frames are chained and
handed over in exactly the order they were sent. A backend that needs to do I/O per frame
puts the frame on a bounded memory channel that its ``run`` task drains.

The :class:`ChannelContext` is everything a backend may touch: the channel's facts, delivery
to the channel's own two ends (never anyone else's), emitting frames of its own, closing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mux.channel import ChannelContext
    from mux.frames import Frame

__all__ = ["Backend", "BackendFactory", "Disposition", "relayed"]


class Disposition(enum.StrEnum):
    """What happened to a frame after it was chained."""

    DELIVERED = "delivered"
    """Handed to the receiving end's buffer."""
    STORED = "stored"
    """Stored durably for later delivery."""
    DROPPED = "dropped"
    """Not delivered and not kept (no receiver on a live channel, or a late real-time frame)."""
    CONSUMED = "consumed"
    """Taken by the backend itself (e.g. written to a tunnel, answered by the node)."""
    HELD = "held"
    """Not delivered yet: the receiver's connection dropped and its end waits for it to resume
    (``mux.resume``); the frame is replayed from the ledger if it resumes in time, and goes
    with the channel if it does not."""


def relayed(ctx: ChannelContext, frame: Frame) -> Disposition:
    """Deliver ``frame`` to its receiving end and say what became of it: ``DELIVERED``;
    ``HELD`` while that end waits for its dropped connection to resume; else ``DROPPED``
    (counted on the channel)."""
    if ctx.deliver(frame):
        return Disposition.DELIVERED
    return Disposition.HELD if ctx.held_for_resume(frame) else Disposition.DROPPED


class Backend(Protocol):
    """What the core needs from a backend. See the module docstring for the call order."""

    name: str

    def check_open(self, ctx: ChannelContext) -> None:
        """Validate a new channel (metadata, permissions); raise a MuxError to refuse it."""

    async def run(self, ctx: ChannelContext) -> None:
        """The channel's task: runs while the channel is open; raising closes the channel."""

    def admit(self, ctx: ChannelContext, sender: str, size: int) -> None:
        """Raise ``ChannelFull`` if a ``size``-byte frame from ``sender`` cannot be taken now."""

    def on_frame(self, ctx: ChannelContext, frame: Frame) -> Disposition:
        """Take a chained frame: deliver, store, consume or drop it."""

    def on_close(self, ctx: ChannelContext, reason: str) -> None:
        """The channel is closing (its close frame is chained next); release resources."""


BackendFactory = Callable[[Any], Backend]
"""Builds a node's Backend instance; called once per Mux with the Mux as argument."""
