"""The voice (``call:voice``) and webrtc (``call:video``) backends: call signalling and media.

On a call channel, JSON frames are signalling and binary frames are media:

- Signalling is ``{"type": T, ...}`` with ``T`` one of ``offer``, ``answer``, ``ice``,
  ``ringing``, ``reject``, ``hangup`` (any other fields, e.g. ``sdp`` or ``candidate``, are
  relayed untouched). Each message is checked against the call's state and relayed to the
  other end. A malformed or out-of-place message is refused with its own code
  (``unknown_signal``, ``bad_signal``, ``answer_before_offer``, ``unexpected_answer``,
  ``offer_pending``, ``ice_before_offer``, ``unexpected_ringing``, ``unexpected_reject``) and
  the call goes on. Signalling is never dropped: when the receiver's inbox is full it waits in
  a small backlog per direction (acknowledged with disposition ``consumed``) that is
  delivered, in order and ahead of newer media, as soon as there is room.
- Other JSON (not an object with a ``type``: e.g. in-call text) is application data: relayed
  as is, like signalling (never dropped), without touching the call state.
- Media is relayed at real-time priority with drop-late: it is never queued and never
  refused; when the receiver's inbox is full the frame is dropped and counted (the intents are
  ``realtime`` and not preemptible, so over their budget frames pass and are only counted as
  ``throttled``).

How this works: the call state lives in ``backend_state`` (``GET /api/mux/channel/{id}``):
``state`` goes ``idle`` -> ``ringing`` (the first offer; ``caller`` is its sender) ->
``answered`` (the answer; a later offer/answer pair renegotiates) -> ``ended`` (``hangup``
from either end, or ``reject`` by the callee), with the frame timestamps ``ringing_at``,
``answered_at``, ``ended_at``, the ``end_reason`` and ``ended_by``, per-type signalling
counters and the media counters ``media_frames``, ``media_bytes``, ``media_dropped``. After
the call ends the channel's task delivers any backlog (for at most ``hangup_grace_s``) and
closes the channel with the hangup's ``reason`` (default ``call_ended``; ``call_rejected``
for a reject). The refusals are raised from ``on_frame``: the refused frame is in the
channel's ledger but is not delivered.

Node options (``[backends.voice]`` / ``[backends.webrtc]``): ``signalling_backlog`` (default
64 messages; beyond it signalling is refused with ``signalling_backlog_full``) and
``hangup_grace_s`` (default 1.0).
"""

from __future__ import annotations

import collections
import re
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

from mux.errors import BadRequest, ChannelError, ChannelFull

from .base import Disposition, relayed

if TYPE_CHECKING:
    from mux.channel import ChannelContext, Draft
    from mux.frames import Frame

__all__ = ["SIGNAL_TYPES", "MediaBackend", "VoiceBackend", "WebRTCBackend"]

SIGNAL_TYPES = ("offer", "answer", "ice", "ringing", "reject", "hangup")
"""The ``type`` values of call signalling messages."""

_REASON = re.compile(r"^[a-z0-9][a-z0-9_.:\-]{0,63}$")


@attrs.define(eq=False)
class _Call:
    """What the backend keeps of one call besides ``backend_state``."""

    state: str = "idle"
    pending_offer_by: str | None = None
    backlog: dict[str, collections.deque[Frame]] = attrs.field(factory=dict)
    """Deferred signalling per receiving end, in order."""
    closing: str | None = None
    wake: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    checked: str | None = None
    """The signal type ``check_frame`` found in the frame being chained."""

    def deferred(self) -> int:
        """How many signalling messages wait for room."""
        return sum(len(q) for q in self.backlog.values())


class MediaBackend:
    """Signalling relay with call state, and drop-late media relay (see the module docstring)."""

    name = "media"

    def __init__(self, mux: Any = None) -> None:
        self.mux = mux
        self._calls: dict[str, _Call] = {}

    def check_open(self, ctx: ChannelContext) -> None:
        """Refuse a call to the node itself (nobody would answer); set up the call state."""
        if ctx.target == ctx.mux.agent:
            raise ChannelError(f"{ctx.intent.name} needs an agent to call, not the node", code="destination_refused")
        self._calls[ctx.channel_id] = _Call()
        ctx.state.extra.update(
            {
                "state": "idle",
                "caller": None,
                "callee": None,
                "ringing_at": None,
                "answered_at": None,
                "ended_at": None,
                "end_reason": None,
                "ended_by": None,
                "signals": {t: 0 for t in SIGNAL_TYPES},
                "data_messages": 0,
                "signalling_deferred": 0,
                "refused": 0,
                "media_frames": 0,
                "media_bytes": 0,
                "media_dropped": 0,
            }
        )

    async def run(self, ctx: ChannelContext) -> None:
        """Deliver deferred signalling as room appears; close the channel once the call ended."""
        call = self._calls.get(ctx.channel_id)
        if call is None:
            return
        grace = float(ctx.options().get("hangup_grace_s", 1.0))
        while True:
            while not call.deferred() and call.closing is None:
                await call.wake.park()
            if call.closing is not None:
                with trio.move_on_after(grace):
                    await self._flush(ctx, call)
                await ctx.close(call.closing)
                return
            await self._flush(ctx, call)

    async def _flush(self, ctx: ChannelContext, call: _Call) -> None:
        """Deliver all deferred signalling, waiting for room (re-checking every 50 ms)."""
        while not self._drain(ctx, call):
            stuck = next(target for target, queue in call.backlog.items() if queue)
            try:
                ctx.require_room(stuck)
            except ChannelFull as exc:
                assert exc.wait_room is not None
                with trio.move_on_after(0.05):  # the other direction may have room meanwhile
                    await exc.wait_room()

    def _drain(self, ctx: ChannelContext, call: _Call) -> bool:
        """Deliver deferred signalling, in order per direction, while there is room; True
        when nothing is left waiting."""
        for queue in call.backlog.values():
            while queue:
                try:
                    ctx.require_room(queue[0].target)
                except ChannelFull:
                    break
                ctx.deliver(queue.popleft())
        return not call.deferred()

    def admit(self, ctx: ChannelContext, sender: str, size: int) -> None:
        """Never refuse for room: media is dropped late instead, signalling is deferred."""

    def on_frame(self, ctx: ChannelContext, frame: Frame) -> Disposition:
        """Relay media (drop when the receiver is full) or check, apply and relay signalling."""
        call = self._calls.get(ctx.channel_id)
        extra = ctx.state.extra
        if call is None:  # not opened through check_open (cannot happen on a live channel)
            return relayed(ctx, frame)
        if call.deferred():
            self._drain(ctx, call)  # waiting signalling goes first
        if frame.binary:
            delivered = ctx.deliver(frame)
            extra["media_frames"] += 1
            extra["media_bytes"] += len(frame.payload)
            if not delivered:
                extra["media_dropped"] += 1
            return Disposition.DELIVERED if delivered else Disposition.DROPPED
        kind, call.checked = call.checked, None  # validated by check_frame before chaining
        queue = call.backlog.setdefault(frame.target, collections.deque())
        if kind is None:
            extra["data_messages"] += 1
        else:
            self._apply(ctx, call, frame, kind)
        if not queue:
            try:
                ctx.require_room(frame.target)
            except ChannelFull:
                pass  # signalling is never dropped for room: it waits for the channel's task
            else:
                return relayed(ctx, frame)
        queue.append(frame)
        extra["signalling_deferred"] += 1
        call.wake.unpark_all()
        return Disposition.CONSUMED

    def check_frame(self, ctx: ChannelContext, draft: Draft) -> None:
        """Refuse malformed or out-of-order signalling before it is chained (media pass)."""
        call = self._calls.get(ctx.channel_id)
        if call is None or isinstance(draft.payload, bytes):
            return
        call.checked = self._check(ctx, call, draft)
        limit = int(ctx.options().get("signalling_backlog", 64))
        if len(call.backlog.get(draft.target, ())) >= limit:
            raise self._refuse(ctx, "signalling_backlog_full", f"{limit} signalling messages wait for the receiver")

    def _check(self, ctx: ChannelContext, call: _Call, frame: Draft) -> str | None:
        """Validate a signalling message against the call state; return its type (None for
        JSON that is not signalling: no object with a ``type``)."""
        payload = frame.payload
        if not isinstance(payload, dict) or "type" not in payload:
            return None
        if not isinstance(payload["type"], str):
            raise self._refuse(ctx, "bad_signal", 'signalling is a JSON object {"type": "offer"|"answer"|...}')
        kind: str = payload["type"]
        if kind not in SIGNAL_TYPES:
            raise self._refuse(ctx, "unknown_signal", f"unknown signal {kind[:40]!r}; one of {', '.join(SIGNAL_TYPES)}")
        if call.state == "ended":
            raise self._refuse(ctx, "call_ended", "the call has ended")
        reason = payload.get("reason")
        if (
            kind in ("hangup", "reject")
            and reason is not None
            and not (isinstance(reason, str) and _REASON.match(reason))
        ):
            raise self._refuse(ctx, "bad_signal", "reason must be 1-64 of [a-z0-9_.:-]")
        offerer = call.pending_offer_by
        if kind == "offer" and offerer is not None:
            raise self._refuse(ctx, "offer_pending", f"an offer from {offerer} waits for its answer")
        if kind == "answer" and (offerer is None or offerer == frame.sender):
            if call.state == "idle":
                raise self._refuse(ctx, "answer_before_offer", "no offer to answer yet")
            raise self._refuse(ctx, "unexpected_answer", "no offer from the other end waits for an answer")
        if kind == "ice" and call.state == "idle":
            raise self._refuse(ctx, "ice_before_offer", "ICE candidates follow an offer")
        if kind in ("ringing", "reject") and (offerer is None or offerer == frame.sender or call.state != "ringing"):
            raise self._refuse(ctx, f"unexpected_{kind}", f"{kind} answers a ringing call's offer, from the callee")
        return kind

    def _apply(self, ctx: ChannelContext, call: _Call, frame: Frame, kind: str) -> None:
        extra = ctx.state.extra
        extra["signals"][kind] += 1
        if kind == "offer":
            call.pending_offer_by = frame.sender
            if call.state == "idle":
                call.state = extra["state"] = "ringing"
                extra["caller"], extra["callee"] = frame.sender, ctx.peer_of(frame.sender)
                extra["ringing_at"] = frame.ts
        elif kind == "answer":
            call.pending_offer_by = None
            if call.state == "ringing":
                call.state = extra["state"] = "answered"
                extra["answered_at"] = frame.ts
        elif kind in ("hangup", "reject"):
            default = "call_ended" if kind == "hangup" else "call_rejected"
            reason = frame.payload.get("reason") or default
            call.state = extra["state"] = "ended"
            extra["ended_at"] = frame.ts
            extra["end_reason"] = reason
            extra["ended_by"] = frame.sender
            call.pending_offer_by = None
            call.closing = reason
            call.wake.unpark_all()

    def _refuse(self, ctx: ChannelContext, code: str, detail: str) -> BadRequest:
        ctx.state.extra["refused"] = ctx.state.extra.get("refused", 0) + 1
        ctx.state.extra["last_refusal"] = code
        return BadRequest(detail, code=code, channel_id=ctx.channel_id)

    def on_close(self, ctx: ChannelContext, reason: str) -> None:
        """Forget the call; a call closed without hangup ends with the channel's reason."""
        call = self._calls.pop(ctx.channel_id, None)
        extra = ctx.state.extra
        if call is not None and call.state != "ended":
            extra["state"] = "ended"
            extra["end_reason"] = reason
            extra["ended_at"] = time.time_ns() // 1_000_000


class VoiceBackend(MediaBackend):
    """``call:voice``: voice call signalling and audio frames."""

    name = "voice"


class WebRTCBackend(MediaBackend):
    """``call:video``: WebRTC-style signalling (SDP offer/answer, ICE) and video frames."""

    name = "webrtc"
