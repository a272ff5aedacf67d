"""The tping backend (``tibet:ping``): identity-based ping of the node or of another agent.

How this works: the pinger opens a ``tibet:ping`` channel and sends ping frames
``{"type": "ping", "nonce": STR, "t0": CLIENT_TIME}``.

- Target = the node's own agent (``Mux.agent``): the backend answers each ping at once with
  ``ctx.emit`` of ``{"type": "pong", "nonce", "t0", "t_node": NODE_TIME_NS, "by": NODE}`` to
  the opener. The pong is a frame chained and signed by the node with ``sender`` = the node's
  agent, so the pinger gets proof of who answered (verify it with the node's public key) plus
  the round-trip time (``now - t0``, or its own clock). The ping itself is ``CONSUMED``. A
  malformed ping is answered with ``{"type": "error", "error": "bad_ping", "detail"}``.
  ``admit`` refuses a ping (``receiver_full``) while the opener's inbox has no room for the
  pong, so a pong is never dropped; only the opener may send on such a channel.
- Target = another agent: frames are relayed like ``stream`` (refused with ``receiver_full``
  while the receiver's inbox is full); the target answers with its own pong
  (``{"type": "pong", "nonce", "t0", "by": TARGET, ...}``), signed by the node as sent by the
  target. ``mux.cli_net.answer_pings`` is such an answerer for WebSocket clients.

Counters ``pings``, ``pongs`` and ``bad`` are kept in ``ctx.state.extra``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TypeGuard

from mux.errors import ChannelForbidden

from .base import Disposition, relayed

if TYPE_CHECKING:
    from mux.channel import ChannelContext
    from mux.frames import Frame

__all__ = ["MAX_NONCE_CHARS", "TpingBackend", "is_ping"]

MAX_NONCE_CHARS = 128
"""Longest nonce the node echoes."""


def is_ping(payload: Any) -> TypeGuard[dict[str, Any]]:
    """True when ``payload`` is a well-formed ping ``{"type": "ping", "nonce": STR, ...}``."""
    if not isinstance(payload, dict) or payload.get("type") != "ping":
        return False
    nonce = payload.get("nonce")
    return isinstance(nonce, str) and 0 < len(nonce) <= MAX_NONCE_CHARS


class TpingBackend:
    """Ping: the node answers pings addressed to it; pings to agents are relayed."""

    name = "tping"
    background = False
    """``run`` does nothing: no task per channel."""

    def __init__(self, mux: Any = None) -> None:
        self.mux = mux

    def _to_node(self, ctx: ChannelContext) -> bool:
        return ctx.target == ctx.mux.agent

    def _count(self, ctx: ChannelContext, key: str) -> None:
        ctx.state.extra[key] = ctx.state.extra.get(key, 0) + 1

    def check_open(self, ctx: ChannelContext) -> None:
        """Every channel may open; the counters start at zero."""
        ctx.state.extra.update(pings=0, pongs=0, bad=0, answered_by="node" if self._to_node(ctx) else "agent")

    async def run(self, ctx: ChannelContext) -> None:
        """Nothing in the background: pings are answered in ``on_frame``."""

    def admit(self, ctx: ChannelContext, sender: str, size: int) -> None:
        """To the node: only the opener pings, and only while its inbox has room for the pong.
        To an agent: refuse (retryably) while the receiver's inbox is full."""
        if self._to_node(ctx):
            if sender != ctx.agent:
                raise ChannelForbidden("only the opener sends on a ping to the node", channel_id=ctx.channel_id)
            ctx.require_room(ctx.agent)
        else:
            ctx.require_room(ctx.peer_of(sender))

    def on_frame(self, ctx: ChannelContext, frame: Frame) -> Disposition:
        """Answer a ping to the node with a node-signed pong; relay anything else."""
        payload = frame.payload
        if not self._to_node(ctx):
            if isinstance(payload, dict) and payload.get("type") in ("ping", "pong"):
                self._count(ctx, payload["type"] + "s")
            return relayed(ctx, frame)
        node = ctx.mux.agent
        if not is_ping(payload):
            self._count(ctx, "bad")
            ctx.emit(
                {"type": "error", "error": "bad_ping", "detail": 'expected {"type":"ping","nonce":STR,"t0":...}'},
                to=ctx.agent,
                sender=node,
            )
            return Disposition.CONSUMED
        self._count(ctx, "pings")
        pong = {
            "type": "pong",
            "nonce": payload["nonce"],
            "t0": payload.get("t0"),
            "t_node": time.time_ns(),
            "by": node,
        }
        ctx.emit(pong, to=ctx.agent, sender=node)
        self._count(ctx, "pongs")
        return Disposition.CONSUMED

    def on_close(self, ctx: ChannelContext, reason: str) -> None:
        """Nothing held."""
