"""The ipoll backend (``chat``, ``push``, ``task``, ``sync``): durable store-and-forward.

Every frame is put into its target's mailbox (``mux.mailbox``) and recorded in the node's
store before it is acknowledged; it is delivered, in order, whenever the target's end is
attached (now, or when the target connects later, even after a node restart), and it is
delivered again on every new attachment until the target acknowledges it. A full mailbox
refuses the frame with ``mailbox_full``; nothing is ever dropped silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Disposition

if TYPE_CHECKING:
    from mux.channel import ChannelContext
    from mux.frames import Frame

__all__ = ["IpollBackend"]


class IpollBackend:
    """Durable, at-least-once delivery through per-agent mailboxes."""

    name = "ipoll"
    background = False
    """``run`` does nothing: no task per channel."""
    durable = True

    def __init__(self, mux: Any) -> None:
        self.mux = mux

    def check_open(self, ctx: ChannelContext) -> None:
        """Every channel may open."""

    async def run(self, ctx: ChannelContext) -> None:
        """Nothing in the background: delivery is driven by sends, receives and attaches."""

    def admit(self, ctx: ChannelContext, sender: str, size: int) -> None:
        """Refuse with ``mailbox_full`` when the receiver's mailbox is at its limits."""
        ctx.mux.mail_check(ctx.peer_of(sender), size, ctx.channel_id)

    def on_frame(self, ctx: ChannelContext, frame: Frame) -> Disposition:
        """Store the frame in the target's mailbox and deliver what fits now."""
        return Disposition.DELIVERED if ctx.mux.mail_put(ctx.state, frame) else Disposition.STORED

    def on_close(self, ctx: ChannelContext, reason: str) -> None:
        """Unacknowledged frames stay in the mailboxes; delivery goes on after close."""
