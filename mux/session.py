"""One client connection's protocol state: actions in, events out, channels held.

How this works: a :class:`WireSession` wraps the :class:`~mux.endpoint.Endpoint` of the agent
behind one socket. ``handle(message)`` parses a message (``mux.wire``), applies it to the
Mux with the synchronous ``*_nowait`` operations and returns the messages to send back; it
never raises for bad input (each failure becomes an error event for that message only).
Every channel the session holds gets a sink (``End.sink``): a frame delivered to this agent
is turned into its ``frame`` message(s) right away and queued in ``outbox``, the
connection's urgency scheduler, under the channel's key; the channel's end is followed by
one ``channel_closed``. No task runs per channel. ``run()`` announces channels opened to
the agent and sends durable acks once committed. Everything is bounded: a client that stops
reading fills its channels' queues in the outbox, and their senders then get
``receiver_full`` (or wait, for backends that must not drop), channel by channel.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Any, NamedTuple

import trio

from . import wire
from .auth import Grant
from .bandwidth import BulkShare, Cadence, TokenBucket
from .channel import Channel, ChannelState, End
from .core import Mux
from .downlink import DownlinkProbes, new_window
from .endpoint import Endpoint
from .errors import BadRequest, ChannelClosed, ChannelError, ChannelNotFound, ChannelThrottled, MuxError
from .frames import AgentSignature, Frame, payload_bytes
from .outbox import CONTROL, CONTROL_URGENCY, NO_BULK, Outbox, Outgoing
from .pieces import MAX_OPEN, Pieces
from .resume import Resumed, new_token

__all__ = ["WireSession"]

log = logging.getLogger("mux.session")


class _Shaped(NamedTuple):
    """What shaping beside a call decided for one send (``WireSession._shape``)."""

    encoded: tuple[str, bytes] | None = None
    """The payload's encoding, when shaping had to compute it."""
    window: int | None = None
    pace_ms: int | None = None
    charged: int = 0
    """Bytes taken from the connection's bulk budget (given back if the send is refused)."""


_NOT_SHAPED = _Shaped()


class WireSession:
    """The protocol state of one connection of ``endpoint.agent``."""

    def __init__(
        self,
        mux: Mux,
        endpoint: Endpoint,
        *,
        max_message_bytes: int,
        resume_grace_s: float | None = None,
        grant: Grant | None = None,
        rate: tuple[float, int] = (0.0, 0),
        outbox_per_channel: int | None = None,
        chunk_bytes: int = wire.CHUNK_BYTES,
        live_acks: bool = True,
        window: int | None = None,
        probes: bool = False,
    ) -> None:
        self.mux = mux
        self.probing = probes
        """``?probes=1``: the client answers probes, and bulk written beside its calls is kept
        within their window (``mux.downlink``)."""
        self.probes: DownlinkProbes | None = None
        """The probes and their window: made when a probing connection first holds a call
        (most connections never do; an idle one keeps none)."""
        self.live_acks = live_acks
        """False (``?acks=errors``): a live send delivered to the receiver's buffer gets no
        ``frame_ack``; errors, drops and durable (``stored``) acks are always sent."""
        self.window = window
        """``?window=N``: at most N frames of each channel go to the client beyond those it
        gave back with ``credit`` (the rest wait in the channel's own bounded queue); None:
        no window, the socket alone holds the client's pace."""
        self._credits: dict[str, int] | None = {} if window else None
        """Frames each channel may still send (windowed connections; from ``window`` down)."""
        self._credited: trio.lowlevel.ParkingLot | None = None
        """Replays waiting for credit (made by the first)."""
        self.endpoint = endpoint
        self.grant = grant or Grant(endpoint.agent)
        """What the connection's credentials allow (intents, agent key)."""
        self._bucket = TokenBucket(int(rate[0]), rate[1]) if rate[0] > 0 else None
        per_channel = outbox_per_channel or mux.config.channel_buffer_frames
        mux.readers.join()  # left in close()
        self.outbox = Outbox(per_key=per_channel, on_take=self._on_take, budget=mux.readers)
        """What this connection sends, scheduled by urgency (``mux.outbox``)."""
        self.chunk_bytes = chunk_bytes
        self.max_message_bytes = max_message_bytes
        self.resume_grace_s = resume_grace_s
        """With a grace period the connection is resumable: see ``mux.resume``."""
        self.resume_token = new_token() if resume_grace_s else None
        self._closed_told: set[str] | None = None
        """Channels whose close this connection's reply announced (made by the first)."""
        self._durable_acks: collections.deque[tuple[int, str]] | None = None
        """Durable sends' acks waiting for their commit, oldest first (made by the first one:
        most connections never send durably)."""
        self._ack_lot = trio.lowlevel.ParkingLot()
        self._sinks: dict[str, _ChannelSink] = {}
        self._realtime: set[str] | None = None
        """The held channels (with a sink) whose intent is real-time (calls); made by the
        first (most connections never hold one)."""
        self._ack_pump_running = False
        bulk_rate = mux.config.realtime_bulk_rate
        # a small burst (20 ms of the rate): bulk is let in a frame or two at a time, never as
        # a run of frames that would hold a call's next frame up behind it
        self._bulk = BulkShare(TokenBucket(bulk_rate, max(1, bulk_rate // 50))) if bulk_rate > 0 else None
        self._realtime_until = -math.inf
        self._cadence = Cadence()
        """The call's frames on this connection: bulk is paced into the gaps between them."""
        self.replaying = 0
        """Resumed channels still replaying what their agent missed."""
        self._closed = False
        self._nursery: trio.Nursery | None = None
        self._announcing = False
        """True while ``_announce_waiting`` runs (announcements queue behind it, in order)."""
        self._pieces: Pieces | None = None
        """Sends arriving in pieces, unfinished (made by the first piece; ``mux.pieces``)."""

    @property
    def agent(self) -> str:
        """The agent on the other side of this connection."""
        return self.endpoint.agent

    @property
    def holds_realtime(self) -> bool:
        """True while this connection holds a real-time channel (a call): its writer then
        keeps each write to one piece's worth, so a call's frame never waits behind more."""
        return bool(self._realtime)

    def hello(self) -> str:
        """The first message of every connection (with a resume token when resumable)."""
        extra: dict[str, Any] = {}
        if self.resume_token:
            extra = {"resume_token": self.resume_token, "resume_grace_s": self.resume_grace_s}
        if self.window:
            extra["window"] = self.window
        if self.probing:
            extra["probes"] = True
        return wire.event(
            "connected",
            agent=self.agent,
            node=self.mux.agent,
            public_key=self.mux.public_key,
            max_message_bytes=self.max_message_bytes,
            send_parts=MAX_OPEN,
            part_acks=True,
            **extra,
        )

    # ---- actions ---------------------------------------------------------------------------

    def handle(self, message: str | bytes) -> list[Outgoing]:
        """Apply one client message; return the replies (an error event on bad input)."""
        try:
            action = wire.parse_message(message, self.max_message_bytes)
        except MuxError as exc:
            return [wire.error_event(exc)]
        bucket = self._bucket
        if bucket is not None:
            name = action.name
            cost = 1
            if name == "batch":
                cost = max(1, len(action.get("items")))
            elif name == wire.SEND_PART and action.get("part"):
                cost = 0  # a send in pieces costs what it would as one message: its piece 0 pays
            elif name == "probe" and self.probes is not None and self.probes.awaits(action.get("n")):
                cost = 0  # the node asked for it
            if cost and not bucket.take(cost, trio.current_time()):
                return [wire.error_event(MuxError("too many messages; slow down", code="rate_limited"), action.ref)]
        return self._apply(action)

    def _do_send_part(self, action: wire.Action) -> list[Outgoing]:
        """One piece of a payload sent in pieces (``mux.pieces``): nothing until the last,
        which is handled as the ``send`` of the whole payload (a piece that asks for it is
        answered ``part_ack``)."""
        if self._pieces is None:
            self._pieces = Pieces(self.max_message_bytes, self.mux.pieces)
        try:
            whole = self._pieces.add(action, trio.current_time())
        finally:
            if not self._pieces:
                self._pieces = None  # none unfinished: the table goes too
        if whole is not None:
            return self._apply(whole)
        if action.get("part_ack"):
            return [wire.event("part_ack", action.ref, channel_id=action.get("channel_id"), part=action.get("part"))]
        return []

    def _do_abandon(self, action: wire.Action) -> list[Outgoing]:
        """The client gave up its send in pieces ``ref`` on the channel: what came of it is
        forgotten, nothing is chained and nothing answered (nor for a send not under way)."""
        pieces = self._pieces
        if pieces is not None and pieces.abandon(action.get("channel_id"), action.ref) and not pieces:
            self._pieces = None
        return []

    def expire_pieces(self, now: float) -> None:
        """Forget this connection's sends in pieces none of whose pieces came for
        ``pieces_idle_s``, telling the client (``pieces_expired``, with each send's ``ref``)."""
        pieces, idle_s = self._pieces, self.mux.config.pieces_idle_s
        if pieces is None or idle_s <= 0:
            return
        for channel_id, ref in pieces.expire(now, idle_s):
            exc = MuxError(
                f"no piece of this send came for {idle_s:g} s: what came of it is forgotten; send it again",
                code="pieces_expired",
                channel_id=channel_id[:80],
            )
            if self.outbox.has_room(CONTROL):
                self.outbox.put_nowait(CONTROL, CONTROL_URGENCY, wire.error_event(exc, ref))
        if not pieces:
            self._pieces = None

    def _apply(self, action: wire.Action, *, defer_sign: bool = False) -> list[Outgoing]:
        try:
            if action.name == "send":
                return self._do_send(action, defer_sign=defer_sign)
            return getattr(self, "_do_" + action.name)(action)  # type: ignore[no-any-return]
        except MuxError as exc:
            if exc.channel_id is None and isinstance(action.get("channel_id"), str):
                exc.channel_id = action.get("channel_id")[:80]
            return [wire.error_event(exc, action.ref)]

    def _do_batch(self, action: wire.Action) -> list[Outgoing]:
        """Apply each item in order; answer with one ``batch`` event of the replies.

        One signature covers a batch's sends on a channel: each send but a channel's last
        in the batch is chained unsigned, the last is signed, and if that last one was
        refused the channel gets a signed ``seal`` before the batch is answered. So every
        frame is covered by a signature sent with (or right after) its own batch."""
        items = wire.batch_items(action)
        last: dict[str, int] = {}
        for i, item in enumerate(items):
            if not isinstance(item, MuxError) and item.name == "send":
                last[item.get("channel_id")] = i
        replies: list[str] = []
        for i, item in enumerate(items):
            if isinstance(item, MuxError):
                replies.append(wire.error_event(item))
                continue
            defer = item.name == "send" and last[item.get("channel_id")] != i
            for reply in self._apply(item, defer_sign=defer):
                assert isinstance(reply, str)  # replies to actions are JSON
                replies.append(reply)
        for channel_id in last:  # a refused last send left its channel's batch unsigned
            held = self.endpoint._held.get(channel_id)
            state = held._state if held is not None else None
            if state is not None and state.chain.unsigned and state.chain.sign_every <= 1:
                self.mux.seal(state)
        if not replies and not self.live_acks:
            return []  # nothing to say: every item was a send that succeeded
        return [wire.batch_event(replies)]

    def _do_open(self, action: wire.Action) -> list[Outgoing]:
        intent = action.get("intent", "stream")
        self.grant.check_intent(intent)
        ch = self.endpoint.open_nowait(action.get("target"), intent, action.get("metadata"))
        self._watch(ch)
        return [wire.channel_opened_event(ch._state, "opener", action.ref)]

    def _held(self, channel_id: str) -> Channel:
        if not channel_id.startswith("ch-") or len(channel_id) > 64:
            raise ChannelNotFound(f"no channel {channel_id[:80]!r}")
        return self.endpoint.channel(channel_id)

    def _do_send(self, action: wire.Action, *, defer_sign: bool = False) -> list[Outgoing]:
        ch = self._held(action.get("channel_id"))
        shaped = self._shape(ch._state, action.get("payload"))
        agent = None
        if action.get("agent_sig") is not None:
            if not self.grant.agent_key:
                raise MuxError(
                    "agent_sig given but no agent key is registered for this agent (token agent_key)",
                    code="no_agent_key",
                )
            agent = AgentSignature(self.grant.agent_key, action.get("agent_nonce") or "", action.get("agent_sig"))
        try:
            receipt = self.mux._post(
                ch._state, self.agent, action.get("payload"), agent, defer_sign=defer_sign, encoded=shaped.encoded
            )
        except MuxError as exc:
            if shaped.charged and self._bulk is not None:  # refused after all (its intent's budget,
                self._bulk.refund(shaped.charged)  # a full receiver): the call's share is not spent
                if isinstance(exc, ChannelThrottled) and exc.window is None:
                    exc.window = shaped.window
            raise
        if not self.live_acks and not receipt.stored and receipt.delivered:
            return []  # ?acks=errors: silence means delivered
        ack = wire.frame_ack_event(
            receipt.frame,
            receipt.disposition.value,
            action.ref,
            stored=receipt.stored,
            window=shaped.window,
            pace_ms=shaped.pace_ms,
        )
        if receipt.stored:  # acknowledged once durable: the ack pump sends it after the commit
            if not self._ack_pump_running and self._nursery is not None:
                self._ack_pump_running = True  # started by the first durable send, not per connection
                self._nursery.start_soon(self._ack_pump)
            if self._durable_acks is None:
                self._durable_acks = collections.deque()
            self._durable_acks.append((receipt.position, ack))
            self._ack_lot.unpark_all()
            return []
        return [ack]

    def _shape(self, state: ChannelState, payload: Any) -> _Shaped:
        """Real-time beside bulk on one connection (``MuxConfig.realtime_bulk_rate``): a call's
        frames mark the connection; meanwhile its preemptible frames share a byte budget and
        their acks carry the ``window`` hint (``MuxConfig.realtime_bulk_window``) and, when
        the budget has no room yet for the channel's next frame after what it promised the
        connection's other bulk channels (``BulkShare``), or it is not the gap after a call
        frame (``MuxConfig.realtime_bulk_gaps``), ``pace_ms``. Returns the
        payload's encoding when it had to compute it (for ``Mux._post``), the hints and what
        the frame was charged."""
        intent = state.intent
        if intent.realtime:
            now = trio.current_time()
            self._cadence.frame(now)
            self._realtime_until = now + self.mux.config.realtime_hold_s
            return _NOT_SHAPED
        if self._bulk is None or not intent.policy.preemptible:
            return _NOT_SHAPED
        now = trio.current_time()
        if now >= self._realtime_until:
            return _NOT_SHAPED
        window = self.mux.config.realtime_bulk_window or None
        encoded = None if isinstance(payload, bytes) else payload_bytes(payload)
        size = len(payload) if encoded is None else len(encoded[1])
        bulk = self._bulk
        arrival = bulk.arrive(state.id, size, now)
        reckon = arrival.reckon  # the size its next slot is reckoned for
        if not bulk.take(state.id, size, now, kept=arrival.kept):
            state.throttled += 1
            self.mux._stats["throttled"] += 1  # the node's count has every refusal, as the channel's
            retry = max(1, bulk.wait_ms(size, now))
            bulk.promise(state.id, size, reckon, now + retry / 1000)
            # not moved into a gap: a client that ignores window would send its whole run of
            # frames there at once (measured: a worse call tail, not a better one). Raised as
            # made, never held in a local: that would tie the error, its traceback and this
            # frame (its payload) into a cycle only the garbage collector frees
            raise ChannelThrottled(
                f"a call is active on this connection: its bulk channels share {bulk.rate} B/s meanwhile",
                channel_id=state.id,
                retry_after_ms=retry,
                window=window,
            )
        pace = self._in_gap(now, bulk.wait_ms(reckon, now))
        bulk.promise(state.id, reckon, reckon, now + pace / 1000)
        return _Shaped(encoded, window, pace or None, size)

    def _in_gap(self, now: float, wait_ms: int) -> int:
        """``wait_ms``, or longer to the gap after one of the call's frames (with
        ``MuxConfig.realtime_bulk_gaps``): when the next bulk frame should be sent."""
        if not self.mux.config.realtime_bulk_gaps:
            return wait_ms
        ready = now + wait_ms / 1000
        gap = self._cadence.next_gap(ready)
        if gap <= ready:
            return wait_ms
        return math.ceil((gap - now) * 1000 - 1e-6)  # whole ms, not one more for float dust

    def _do_credit(self, action: wire.Action) -> list[Outgoing]:
        """The client took ``frames`` frames of a channel: that many more may go to it. No
        answer (errors only); a channel this connection no longer holds is ignored (it may
        have closed meanwhile)."""
        credits = self._credits
        if credits is None:
            raise BadRequest("credit needs a windowed connection (?window=N)", code="bad_request")
        frames = action.get("frames")
        if isinstance(frames, bool) or frames < 1:
            raise BadRequest("credit: frames must be a positive integer", code="bad_request")
        key = action.get("channel_id")
        sink = self._sinks.get(key)
        if sink is None and key not in credits:
            return []
        assert self.window is not None
        credits[key] = min((self.credit_left(key) or 0) + frames, self.window)
        if sink is not None and sink.pending:
            sink.drain()
        if self._credited is not None:
            self._credited.unpark_all()
        return []

    def _do_probe(self, action: wire.Action) -> list[Outgoing]:
        """The client read everything up to probe ``n``: the window over the bulk beside its
        calls moves (``mux.downlink``), and bulk held back goes once it has room. No answer;
        a probe not awaited (late, or never sent) is ignored."""
        if not self.probing:
            raise BadRequest("probe answers need a connection that asked for probes (?probes=1)", code="bad_request")
        probes = self.probes
        if probes is None:  # no probe was ever sent: nothing to answer
            return []
        probes.answered(action.get("n"), trio.current_time())
        if probes.open and self.outbox.bulk_held:
            self.outbox.hold_bulk(False)
        return []

    def expire_probes(self, now: float) -> None:
        """Count probes unanswered for ``PROBE_TIMEOUT_S`` as lost (``mux.downlink``)."""
        probes = self.probes
        if probes is not None and probes.expire(now) and self.outbox.bulk_held:
            self.outbox.hold_bulk(False)

    def _bulk_changed(self) -> None:
        """With probes, bulk is what is less urgent than every call this connection holds;
        without a call, nothing is (and nothing is held back)."""
        if not self.probing:
            return
        sinks, realtime = self._sinks, self._realtime
        urgencies = [sinks[key].urgency for key in realtime if key in sinks] if realtime else []
        if urgencies and self.probes is None:
            config = self.mux.config
            self.probes = DownlinkProbes(new_window(config.downlink_target_ms / 1000, config.downlink_min_pieces))
        self.outbox.set_bulk_from(1 + max(urgencies) if urgencies else NO_BULK)

    def _do_ack(self, action: wire.Action) -> list[Outgoing]:
        removed = self.mux.ack(self.agent, action.get("channel_id"), action.get("seq"))
        return [
            wire.event("acked", action.ref, channel_id=action.get("channel_id"), seq=action.get("seq"), removed=removed)
        ]

    def _do_close(self, action: wire.Action) -> list[Outgoing]:
        ch = self._held(action.get("channel_id"))
        reason = action.get("reason", "closed")
        if not reason or len(reason) > 200:
            raise BadRequest("close: reason must be 1-200 characters", code="bad_request")
        if self._closed_told is None:
            self._closed_told = set()
        self._closed_told.add(ch.id)  # this reply tells it: the channel's sink stays quiet
        self.mux._close_nowait(ch._state, reason, by=self.agent)
        return [wire.channel_closed_event(ch._state, action.ref)]

    def _do_resume(self, action: wire.Action) -> list[Outgoing]:
        resumed, closed = self.mux.resumes.resume(self.endpoint, action.get("token"), action.get("last", {}))
        report = []
        for r in resumed:
            self._watch(r.channel, replay=r)
            report.append(
                {"channel_id": r.channel.id, "replay": r.mode, "after_seq": r.after_seq, "head_seq": r.head_seq}
            )
        return [wire.event("resumed", action.ref, channels=report, closed=closed)]

    def _do_fork(self, action: wire.Action) -> list[Outgoing]:
        parent = self.mux.channel_state(action.get("channel_id"), caller=self.agent)
        other = parent.target if parent.agent == self.agent else parent.agent
        self.grant.check_intent(action.get("intent", parent.intent.name))
        ch = self.mux.open_nowait(
            action.get("target", other),
            action.get("intent", parent.intent.name),
            action.get("metadata"),
            holder=self.endpoint,
            fork_of=parent,
        )
        self._watch(ch)
        return [wire.channel_opened_event(ch._state, "opener", action.ref)]

    def _do_list(self, action: wire.Action) -> list[Outgoing]:
        return [wire.event("channel_list", action.ref, channels=self.mux.channels(agent=self.agent))]

    def _do_ping(self, action: wire.Action) -> list[Outgoing]:
        return [wire.event("pong", action.ref, ts=trio.current_time())]

    # ---- background ------------------------------------------------------------------------

    def _watch(self, ch: Channel, replay: Resumed | None = None) -> None:
        """Send ``ch``'s frames from now on: its end hands them straight to this
        connection's outbox (a sink; no task per channel). A resumed channel first
        replays what the agent missed, in a task, while live frames wait in its inbox."""
        if replay is not None and replay.mode != "mailbox" and replay.head_seq > replay.after_seq:
            if self._nursery is None:
                raise ChannelError("session is not running", code="not_running")
            self._nursery.start_soon(self._replay_then_watch, ch, replay, name=f"mux-replay-{ch.id}")
            return
        self._install(ch)

    def _install(self, ch: Channel) -> None:
        end = ch._end
        if end.holder is not self.endpoint or self._closed:
            return  # the end moved on (left, or re-attached elsewhere) meanwhile
        sink = _ChannelSink(self, ch._state, end)
        self._sinks[ch.id] = sink
        if ch._state.intent.realtime:
            if self._realtime is None:
                self._realtime = set()
            self._realtime.add(ch.id)
            self._bulk_changed()
        end.use_sink(sink)

    def budget_found_full(self) -> None:
        """A frame found the connection's byte budget full: its channels hear of room once it
        drains (``budget_room``) or the node's share of it grows."""
        outbox = self.outbox
        if not outbox.budget_full:
            outbox.budget_full = True
            outbox.budget.full[self] = self.budget_room

    def budget_room(self, key: str | None = None) -> None:
        """If the byte budget was found full and now has room, tell every channel (but
        ``key``, which hears of it itself) that it has room again."""
        outbox = self.outbox
        if outbox.budget_full and outbox.bytes + outbox.held < outbox.budget.limit:
            outbox.budget_full = False
            outbox.budget.full.pop(self, None)
            for other in list(self._sinks.values()):
                if other.key != key:
                    other.room()

    def _on_take(self, key: str) -> None:
        """A message of channel ``key`` left the outbox: its end has room again (and every
        channel's, when the connection's byte budget was full and now is not)."""
        if self.outbox.budget_full:
            self.budget_room(key)
        sink = self._sinks.get(key)
        if sink is not None:
            sink.room()

    def start(self, nursery: trio.Nursery) -> None:
        """Start serving: each channel opened to this agent is announced (``channel_opened``)
        and its frames sent, the moment it is opened; ``nursery`` (the connection's) runs
        the few tasks a connection may need (the durable-ack pump from its first durable
        send, resumed channels' replays, announcements waiting for a full control queue)."""
        self._nursery = nursery
        self.endpoint.take_channels(self._take_channel)

    def _take_channel(self, ch: Channel) -> bool:
        """Announce ``ch`` now; False (it stays queued at the endpoint) while the control
        queue is full or earlier ones wait: ``_announce_waiting`` sends them in order."""
        if self._announcing or not self.outbox.has_room(CONTROL):
            if not self._announcing and self._nursery is not None:
                self._announcing = True
                self._nursery.start_soon(self._announce_waiting)
            return False
        self.outbox.put_nowait(CONTROL, CONTROL_URGENCY, wire.channel_opened_event(ch._state, "target"))
        self._watch(ch)
        return True

    async def _announce_waiting(self) -> None:
        """Announce the channels queued at the endpoint, waiting for room in the control
        queue (a peer that does not read); ends when none is left."""
        try:
            while (ch := self.endpoint.accept_nowait()) is not None:
                await self.outbox.put(CONTROL, CONTROL_URGENCY, wire.channel_opened_event(ch._state, "target"))
                self._watch(ch)
                del ch  # not kept alive (with its state) while waiting for room
        except ChannelClosed:
            pass  # detached meanwhile: the connection is going
        finally:
            self._announcing = False

    async def _ack_pump(self) -> None:
        """Send durable ``frame_ack``s in order, each once the store has committed its frame."""
        while True:
            while not self._durable_acks:
                await self._ack_lot.park()
            acks = self._durable_acks
            position, ack = acks[0]
            await self.mux.store.flushed(position)
            acks.popleft()
            await self.outbox.put(CONTROL, CONTROL_URGENCY, ack)

    @property
    def idle(self) -> bool:
        """True when no durable ack is waiting, no channel is replaying, nothing queued."""
        return not self._durable_acks and not self.replaying and self.outbox.empty

    async def _replay_then_watch(self, ch: Channel, replay: Resumed) -> None:
        """Send what the agent missed while away (from the ledger), then live frames. Frames
        the ledger no longer holds (the in-memory ledger is bounded) are not replayed, and
        the client is told which (error ``replay_incomplete``), never left to guess."""
        self.replaying += 1
        try:
            urgency = ch._state.intent.policy.priority
            frames = await self.mux.store.chain(ch.id, replay.after_seq)
            held_from = frames[0].seq if frames else replay.head_seq + 1
            if held_from > replay.after_seq + 1:
                gap = MuxError(
                    f"frames {replay.after_seq + 1} to {min(held_from - 1, replay.head_seq)} of this channel"
                    " are no longer in the node's ledger (its in-memory ledger is bounded): they are not"
                    " replayed, and those addressed to you among them are lost",
                    code="replay_incomplete",
                    channel_id=ch.id,
                )
                await self.outbox.put(CONTROL, CONTROL_URGENCY, wire.error_event(gap))
            for frame in frames:
                if frame.seq > replay.head_seq:
                    break
                if frame.kind != "data" or frame.target != self.agent:
                    continue
                if replay.mode == "signalling" and frame.binary:
                    continue  # stale media is not replayed
                await self._take_credit(ch.id)
                await self.outbox.put(ch.id, urgency, *wire.frame_messages(frame, self.chunk_bytes))
            self._install(ch)
        finally:
            self.replaying -= 1

    def credit_left(self, key: str) -> int | None:
        """Frames channel ``key`` may still send before the client gives credit back (None:
        the connection has no window)."""
        credits = self._credits
        if credits is None:
            return None
        assert self.window is not None
        return credits.get(key, self.window)

    async def _take_credit(self, key: str) -> None:
        """On a windowed connection, wait until channel ``key`` may send a frame, and count it."""
        credits = self._credits
        if credits is None:
            return
        assert self.window is not None
        while credits.setdefault(key, self.window) <= 0:
            if self._credited is None:
                self._credited = trio.lowlevel.ParkingLot()
            await self._credited.park()
        credits[key] -= 1

    def close(self, reason: str = "ws_disconnect") -> None:
        """The socket is gone: a resumable session's channels linger for its token (see
        ``mux.resume``); otherwise close every channel this session holds and detach.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.mux.readers.leave(self)
        if self._pieces is not None:
            self._pieces.clear()
            self._pieces = None
        self._sinks.clear()
        if self.resume_token and self.resume_grace_s and reason == "ws_disconnect":
            self.mux.resumes.linger(self.endpoint, self.resume_token, self.resume_grace_s)
            return
        self.endpoint.leave(reason)


class _ChannelSink:
    """One held channel's end, feeding the connection's outbox directly (see ``End.sink``):
    a frame is serialized and queued under the channel's key at its intent's urgency, or
    refused when that key's queue is full; the ``channel_closed`` event follows the frames.
    On a windowed connection a frame without credit waits in ``pending`` (bounded like the
    queue: in messages, a large frame counting one per piece) until the client gives credit
    back."""

    __slots__ = ("done", "end", "key", "pending", "pending_pieces", "session", "state", "urgency")

    def __init__(self, session: WireSession, state: ChannelState, end: End) -> None:
        self.session = session
        self.state = state
        self.end = end
        self.key = state.id
        self.urgency = state.intent.policy.priority
        self.done = False
        self.pending: collections.deque[Frame] | None = None
        """Frames waiting for credit, oldest first (windowed connections; made by the first)."""
        self.pending_pieces = 0
        """The messages ``pending`` will take (a large frame: one per ``frame_part`` piece),
        bounded as the outbox bounds a channel's queue."""

    def _messages(self, frame: Frame) -> int:
        """How many messages ``frame`` takes in the outbox (one per ``frame_part`` piece)."""
        return max(1, -(-frame.size // self.session.chunk_bytes))

    def has_room(self) -> bool:
        """True when the channel's queue (or, without credit, its frames waiting for credit)
        can take another frame, and the connection holds less than its byte budget."""
        session = self.session
        outbox = session.outbox
        if outbox.bytes + outbox.held >= outbox.budget.limit:
            session.budget_found_full()
            return False
        if session._credits is not None and (self.pending or session.credit_left(self.key) == 0):
            return self.pending_pieces < session.outbox.per_key
        return session.outbox.has_room(self.key)

    def put(self, frame: Frame) -> bool:
        """Queue ``frame`` (as one message, or its ``frame_part`` pieces) if the channel's
        queue has room for a message: the pieces of one frame may go past the bound (by at
        most ``max_payload_bytes / chunk_bytes``), so a frame that was admitted is never
        dropped for its size."""
        session = self.session
        outbox = session.outbox
        if self.done:
            return False
        if outbox.bytes + outbox.held >= outbox.budget.limit:
            session.budget_found_full()
            return False
        credits = session._credits
        if credits is not None:
            left = session.credit_left(self.key)
            if self.pending or left == 0:  # no credit: the frame waits for it (in order)
                if self.pending is None:
                    self.pending = collections.deque()
                elif self.pending_pieces >= outbox.per_key:
                    return False
                self.pending.append(frame)
                self.pending_pieces += self._messages(frame)
                outbox.held += frame.size
                return True
            if not outbox.has_room(self.key):
                return False
            assert left is not None
            credits[self.key] = left - 1
        elif not outbox.has_room(self.key):
            return False
        outbox.put_nowait(self.key, self.urgency, *wire.frame_messages(frame, session.chunk_bytes))
        return True

    def room(self) -> None:
        """The channel's queue (or the connection's budget) has room again: frames waiting
        for it (and credit) go on; else whoever waits to send to this end may."""
        if self.pending:
            self.drain()
            return
        self.end.wake()
        if self.state.on_room is not None:
            self.state.on_room(self.state, self.end)

    def drain(self) -> None:
        """Queue the frames waiting for credit while there is credit and room; once none is
        left and the channel has closed, its ``channel_closed`` follows."""
        session, pending = self.session, self.pending
        credits, outbox = session._credits, session.outbox
        assert pending is not None and credits is not None
        while pending and (left := session.credit_left(self.key) or 0) > 0 and outbox.has_room(self.key):
            credits[self.key] = left - 1
            frame = pending.popleft()
            self.pending_pieces -= self._messages(frame)
            outbox.held -= frame.size
            outbox.put_nowait(self.key, self.urgency, *wire.frame_messages(frame, session.chunk_bytes))
        if not pending:
            self.pending = None
            self.pending_pieces = 0
            if self.done:
                self._closed()
        self.end.wake()
        if self.state.on_room is not None:
            self.state.on_room(self.state, self.end)

    def shut(self) -> None:
        """Queue ``channel_closed`` after the frames (unless a reply already said it); with
        frames still waiting for credit, once they have gone."""
        if self.done:
            return
        self.done = True
        told = self.session._closed_told
        if self.pending and told is not None and self.key in told:
            self.session.outbox.held -= sum(frame.size for frame in self.pending)
            self.pending = None  # the client closed it: what it did not take is not sent
            self.pending_pieces = 0
            self.session.budget_room(self.key)
        if not self.pending:
            self._closed()

    def _closed(self) -> None:
        session = self.session
        if session._credits is not None:
            session._credits.pop(self.key, None)
        if session._sinks.get(self.key) is self:
            del session._sinks[self.key]
            if not session._sinks:  # an emptied dict keeps the table it grew to: let it go
                session._sinks.clear()
            if session._realtime is not None and self.key in session._realtime:
                session._realtime.discard(self.key)
                if not session._realtime:
                    session._realtime = None
                session._bulk_changed()
        told = session._closed_told
        if told is not None and self.key in told:
            told.discard(self.key)
            if not told:
                session._closed_told = None  # an emptied set keeps its grown table
        elif self.state.close_frame is not None and not session._closed:
            session.outbox.put_nowait(self.key, self.urgency, wire.channel_closed_event(self.state))
