"""The Mux: the intent router and the owner of every channel of a node.

How this works: a :class:`Mux` lives inside a nursery (``open_mux``). ``open`` resolves the
intent, picks the backend, chains and signs the channel's open frame, and starts the
channel's task (``backend.run``) in that nursery under the channel's own cancel scope. An
:class:`~mux.endpoint.Endpoint` is an agent attached to the mux (``attach``): it is told of
channels opened to it (``accept`` / ``async for``) and holds the ends it opened or accepted.
Sending goes
``Channel.send`` -> ``Mux._post`` (size, room, budget) -> chain + sign -> ``backend.on_frame``.
Closing chains a close frame, cancels the channel's task and ends both ends' inboxes.
A backend failure closes its own channel with a reason and never reaches the node.
"""

from __future__ import annotations

import collections
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from os import PathLike
from pathlib import Path
from typing import Any

import attrs
import trio

from backends.base import Backend, Disposition
from backends.registry import get_backend_factory
from backends.stream import StreamBackend

from . import __version__
from .agents import normalize_agent
from .bandwidth import UNLIMITED, TokenBucket
from .channel import (
    Channel,
    ChannelContext,
    ChannelState,
    Draft,
    End,
    Ends,
    Receipt,
    ShelvedChannel,
    now_ms,
    shared_route,
)
from .config import MuxConfig, configured_registry
from .endpoint import Endpoint
from .errors import (
    BadRequest,
    ChannelClosed,
    ChannelError,
    ChannelForbidden,
    ChannelFull,
    ChannelLimit,
    ChannelNotFound,
    ChannelThrottled,
    MuxError,
)
from .frames import (
    FRAME_HELD_BYTES,
    GENESIS,
    AgentSignature,
    ChainHead,
    Frame,
    canonical_json,
    held_bytes,
    payload_bytes,
)
from .heap import renew, shrink
from .intents import GENERIC_BACKEND, BandwidthPolicy, Intent, IntentRegistry, shared_policy
from .mailbox import Mailbox, MailboxFull, check_room
from .outbox import SharedBudget
from .pieces import PiecesBudget
from .resume import Resumes
from .signing import NodeKey, check_agent_signature
from .storage import STORE_FILE, ChannelRow, MemoryStore, Snapshot, SqliteStore, Store

__all__ = ["Mux", "MuxConfig", "configured_registry", "open_mux", "start_mux"]

log = logging.getLogger("mux")


def _bucket(policy: BandwidthPolicy) -> TokenBucket:
    """A channel's byte budget; channels without a rate limit share ``UNLIMITED``."""
    return TokenBucket(policy.rate, policy.burst) if policy.rate > 0 else UNLIMITED


MAX_METADATA_DEPTH = 32
"""Metadata is echoed inside other JSON documents (channel info, events): keep it shallow."""


def _depth(value: Any, limit: int = MAX_METADATA_DEPTH + 1) -> int:
    """Nesting depth of a JSON value, counted up to ``limit``."""
    if limit <= 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in children), default=0)


class Mux:
    """A node's intent router and channel table. Create with :func:`open_mux`."""

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        agent: str = "mux-node",
        key: NodeKey | None = None,
        config: MuxConfig | None = None,
        registry: IntentRegistry | None = None,
        store: Store | None = None,
    ) -> None:
        self.agent = normalize_agent(agent)
        self.key = key or NodeKey.generate()
        self.config = config or MuxConfig()
        self.registry = registry or configured_registry(self.config)
        self.store: Store = store if store is not None else MemoryStore()
        self.readers = SharedBudget(self.config.connection_buffer_bytes, self.config.readers_buffer_bytes)
        """The byte budget each WebSocket connection's queues get (``mux.session``)."""
        self.pieces = PiecesBudget(self.config.pieces_max_bytes)
        """What all connections' unfinished sends in pieces hold (``mux.pieces``)."""
        self.mailboxes: dict[str, Mailbox] = {}
        self._mail_bytes = 0
        """Bytes all mailboxes hold (``Mailbox.bytes`` summed)."""
        self._nursery = nursery
        self._channels: dict[str, ChannelState] = {}
        self._closed: collections.OrderedDict[str, ChannelState | ShelvedChannel] = collections.OrderedDict()
        """Recently closed channels (``closed_retention``), the settled ones shelved by ``compact``."""
        self._opened_by: collections.Counter[str] = collections.Counter()
        self._endpoints: dict[str, Endpoint] = {}
        self._backends: dict[str, Backend] = {}
        self._started = time.time()
        self._stats = collections.Counter[str]()
        self._sign = self.key.sign
        self._now = trio.lowlevel.current_clock().current_time
        """``trio.current_time`` without its wrapper (the send path reads it once a frame)."""
        self._last_expiry = time.monotonic()
        self.resumes = Resumes(self)
        if self.config.sign_every > 1:
            nursery.start_soon(self._sealer, name="mux-sealer")

    # ---- intents -------------------------------------------------------------------------

    def register_intent(
        self,
        name: str,
        backend: str = GENERIC_BACKEND,
        description: str = "",
        *,
        policy: BandwidthPolicy | None = None,
        delivery: str = "live",
    ) -> Intent:
        """Add a custom intent (e.g. ``iot:sensor`` -> backend ``mqtt``); returns it."""
        return self.registry.register(name, backend=backend, description=description, policy=policy, delivery=delivery)

    def resolve(self, intent: str) -> Intent:
        """Resolve an intent name with this mux's table."""
        return self.registry.resolve(intent)

    def intents(self) -> list[dict[str, Any]]:
        """Every intent this mux knows, with route, delivery and policy."""
        return [i.to_dict() for i in self.registry.table()]

    # ---- status and lookups --------------------------------------------------------------

    @property
    def public_key(self) -> str:
        """The node's Ed25519 public key (hex): what verifiers of its frames need."""
        return self.key.public_hex

    def status(self) -> dict[str, Any]:
        """Node status: identity, key, counts of channels, agents and frames."""
        by_intent = collections.Counter(s.intent.name for s in self._channels.values())
        return {
            "agent": self.agent,
            "version": __version__,
            "public_key": self.public_key,
            "signing": "ed25519",
            "uptime_s": round(time.time() - self._started, 3),
            "channels_open": len(self._channels),
            "channels_total": self._stats["opened"],
            "channels_by_intent": dict(by_intent),
            "agents_attached": sorted(self._endpoints),
            "frames": self._stats["frames"],
            "bytes": self._stats["bytes"],
            "throttled": self._stats["throttled"],
            "dropped": self._stats["dropped"],
            "mailboxes": {
                "agents": len(self.mailboxes),
                "frames": sum(b.frames for b in self.mailboxes.values()),
                "bytes": self._mail_bytes,
            },
            "acked": self._stats["acked"],
            "expired": self._stats["expired"],
            "store_stalled": self.store.stalled,
            "ledger": self.store.usage(),
            "readers": {
                "connections": self.readers.connections,
                "budget_per_connection": self.readers.limit,
                "max_bytes": self.readers.total,
            },
            "pieces": {"sends": self.pieces.sends, "bytes": self.pieces.held, "max_bytes": self.pieces.max_bytes},
            "intents": len(self.registry.routes),
        }

    def channel_state(self, channel_id: str, *, caller: str | None = None) -> ChannelState:
        """Look up a channel (open or recently closed); with ``caller``, only its two ends."""
        state = self._channels.get(channel_id) or self._closed.get(channel_id)
        if isinstance(state, ShelvedChannel):
            state = state.revive(channel_id, self._sign)
        if state is None:
            shown = channel_id[:80] if isinstance(channel_id, str) else None
            raise ChannelNotFound(f"no channel {shown!r}", channel_id=shown)
        if caller is not None and caller not in state.ends:
            raise ChannelForbidden("not an end of this channel", channel_id=channel_id)
        return state

    def channels(self, agent: str | None = None, *, include_closed: bool = False) -> list[dict[str, Any]]:
        """Summaries of open channels (and recently closed ones), optionally one agent's."""
        states = list(self._channels.values())
        if include_closed:
            states += [
                state.revive(cid, self._sign) if isinstance(state, ShelvedChannel) else state
                for cid, state in self._closed.items()
            ]
        if agent is not None:
            agent = normalize_agent(agent)
            states = [s for s in states if agent in s.ends]
        return [s.info() for s in states]

    def handle(self, channel_id: str, agent: str) -> Channel:
        """A handle on ``agent``'s end of an open channel (refused if not an end)."""
        state = self.channel_state(channel_id, caller=normalize_agent(agent))
        return Channel(self, state, state.ends[normalize_agent(agent)])

    # ---- open ----------------------------------------------------------------------------

    def _backend_for(self, intent: Intent) -> tuple[Backend, str, bool]:
        name = intent.backend
        backend = self._backends.get(name)
        if backend is None:
            factory = get_backend_factory(name)
            if factory is None:
                backend = self._backends.get(GENERIC_BACKEND) or StreamBackend(self)
                self._backends[GENERIC_BACKEND] = backend
                return backend, GENERIC_BACKEND, True
            backend = factory(self)
            self._backends[name] = backend
        return backend, name, False

    async def open(
        self,
        target: str,
        intent: str = "stream",
        metadata: dict[str, Any] | None = None,
        agent: str | None = None,
    ) -> Channel:
        """Open a channel from ``agent`` (default: this mux's agent) to ``target``.

        Returns the opener's :class:`Channel`. Raises BadRequest (bad names, metadata),
        ChannelLimit (too many open channels), ChannelFull (target has too many unaccepted
        channels), or the backend's refusal.
        """
        await trio.lowlevel.checkpoint()
        return self.open_nowait(target, intent, metadata, agent)

    def open_nowait(
        self,
        target: str,
        intent: str = "stream",
        metadata: dict[str, Any] | None = None,
        agent: str | None = None,
        *,
        holder: Endpoint | None = None,
        attach: bool = True,
        fork_of: ChannelState | None = None,
    ) -> Channel:
        """``open`` without a checkpoint; ``holder`` is the endpoint that holds the opener end.

        With ``attach=False`` the opener end gets no inbox (a REST opener reads the ledger
        instead), so live frames to it are dropped rather than queued for nobody.
        ``fork_of`` starts the new channel's chain at that channel's head: its open frame's
        ``prev`` is the parent's last hash and its payload names the parent (``fork_of``).
        """
        opener = normalize_agent(agent) if agent is not None else (holder.agent if holder else self.agent)
        target = normalize_agent(target)
        if opener == target:
            raise BadRequest("a channel needs two different ends (agent == target)", code="bad_target")
        resolved = self.registry.resolve(intent)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise BadRequest("metadata must be a JSON object", code="bad_metadata")
        if len(canonical_json(metadata)) > self.config.max_metadata_bytes:
            raise BadRequest(f"metadata over {self.config.max_metadata_bytes} bytes", code="bad_metadata")
        if _depth(metadata) > MAX_METADATA_DEPTH:
            raise BadRequest(f"metadata nested deeper than {MAX_METADATA_DEPTH} levels", code="bad_metadata")
        limit = self.config.max_channels_per_agent
        if self._opened_by[opener] >= limit:
            raise ChannelLimit(f"{opener} already has {limit} open channels (max_channels_per_agent)")
        target_ep = self._endpoints.get(target)
        if target_ep is not None:
            if not target_ep._has_room():
                raise ChannelFull(f"{target} has too many channels waiting to be accepted")
            target = target_ep.agent  # one string for all its channels, not a copy per open
        backend, backend_name, fallback = self._backend_for(resolved)
        channel_id = "ch-" + secrets.token_hex(16)
        cap = self.config.channel_buffer_frames
        policy = resolved.policy
        state = ChannelState(
            id=channel_id,
            intent=resolved,
            agent=opener,
            target=target,
            metadata=metadata,
            chain=self._new_chain(channel_id, resolved.name, head=fork_of.chain.head if fork_of else GENESIS),
            bucket=_bucket(policy),
            ends=Ends(End(opener, cap), End(target, cap)),
            backend=backend,
            backend_name=backend_name,
            fallback=fallback,
            opened_at=time.time(),
        )
        ctx = self._bind(state)
        try:
            backend.check_open(ctx)
        except BaseException:  # refused: its context's link back to it would leave a cycle
            state.ctx = None
            raise
        self.store.record_open(
            ChannelRow(channel_id, resolved.name, opener, target, metadata, state.opened_at, False, None, None, None)
        )
        state.open_frame = self._chain(
            state,
            "open",
            opener,
            target,
            {
                "agent": opener,
                "target": target,
                "intent": resolved.name,
                "route": shared_route(resolved, backend_name, fallback),
                "policy": shared_policy(policy),
                "metadata": metadata,
                **(
                    {
                        "fork_of": {
                            "channel_id": fork_of.id,
                            "seq": fork_of.chain.next_seq - 1,
                            "head": fork_of.chain.head,
                        }
                    }
                    if fork_of is not None
                    else {}
                ),
            },
        )
        self._channels[channel_id] = state
        self._opened_by[opener] += 1
        self._stats["opened"] += 1
        if getattr(backend, "background", True):
            state.cancel_scope = trio.CancelScope()
            self._nursery.start_soon(self._run_channel, state, name=f"mux-channel-{channel_id}")
        opener_end = state.ends[opener]
        if attach:
            opener_end.attach(holder)
        handle = Channel(self, state, opener_end)
        if holder is not None:
            holder._held[channel_id] = handle
        if target_ep is not None:
            target_ep._announce(state)
        return handle

    def _bind(self, state: ChannelState) -> ChannelContext:
        """Give a new channel its context and what its backend is, once, not per frame."""
        backend = state.backend
        state.ctx = ChannelContext(state, self)
        state.check_frame = getattr(backend, "check_frame", None)
        if getattr(backend, "durable", False):
            state.durable = True
            state.on_room = self._pump
        return state.ctx

    async def _run_channel(self, state: ChannelState) -> None:
        assert state.ctx is not None and state.cancel_scope is not None
        with state.cancel_scope:
            try:
                await state.backend.run(state.ctx)
                await trio.sleep_forever()
            except MuxError as exc:
                self._close_nowait(state, exc.code, detail=exc.detail)
            except Exception as exc:
                log.warning("backend %s failed on %s", state.backend_name, state.id, exc_info=True)
                self._close_nowait(state, "backend_error", detail=f"{type(exc).__name__}: {exc}")

    # ---- send ----------------------------------------------------------------------------

    def _chain(
        self,
        state: ChannelState,
        kind: str,
        sender: str,
        target: str,
        payload: Any,
        encoded: tuple[str, bytes] | None = None,
        agent: AgentSignature | None = None,
        defer: bool = False,
    ) -> Frame:
        frame = state.chain.append(kind, sender, target, payload, now_ms(), encoded, agent, defer)
        self.store.append(frame)
        if state.appended:
            state.appended.unpark_all()
        return frame

    async def export(
        self, channel_id: str, *, caller: str | None = None, after_seq: int = -1, limit: int | None = None
    ) -> list[Frame]:
        """The channel's signed frames from the ledger (with ``caller``: only its ends may).

        Channels the node no longer keeps in memory are looked up in the store."""
        who = normalize_agent(caller) if caller is not None else None
        try:
            self.channel_state(channel_id, caller=who)
        except ChannelNotFound:
            ends = await self.store.channel_ends(channel_id)
            if ends is None:
                raise
            if who is not None and who not in ends:
                raise ChannelForbidden("not an end of this channel", channel_id=channel_id) from None
        return await self.store.chain(channel_id, after_seq, limit)

    def _post(
        self,
        state: ChannelState,
        sender: str,
        payload: Any,
        agent: AgentSignature | None = None,
        *,
        defer_sign: bool = False,
        encoded: tuple[str, bytes] | None = None,
    ) -> Receipt:
        """Chain, sign and hand over one frame from ``sender``; never awaits.

        ``agent`` is the sender's own signature over the payload: checked here (refused with
        ``bad_agent_signature``), then kept in the frame for the receiver to verify. With
        ``defer_sign`` the frame is left unsigned: the caller signs a later frame of the
        channel (or seals it) before it returns to its event loop. ``encoded`` is
        ``payload_bytes(payload)`` when the caller already has it."""
        if not state.is_open:
            raise ChannelClosed(f"channel is closed ({state.close_reason})", channel_id=state.id)
        encoded = encoded or payload_bytes(payload)
        size = len(encoded[1])
        if size > self.config.max_payload_bytes:
            raise BadRequest(
                f"payload is {size} bytes, over max_payload_bytes={self.config.max_payload_bytes}",
                code="payload_too_large",
                channel_id=state.id,
            )
        if agent is not None:
            check_agent_signature(state.id, sender, encoded[1], agent)
        ctx = state.ctx
        assert ctx is not None
        if not self.store.has_room():
            raise ChannelFull("the node's store is behind; retry shortly", code="store_busy", channel_id=state.id)
        state.backend.admit(ctx, sender, size)
        check = state.check_frame
        if check is not None:
            check(
                ctx,
                Draft(
                    sender,
                    state.target if sender == state.agent else state.agent,
                    encoded[1] if encoded[0] == "bytes" else payload,
                ),
            )
        if not state.bucket.take(size, self._now()):
            state.throttled += 1
            self._stats["throttled"] += 1
            if state.intent.policy.preemptible:
                raise ChannelThrottled(  # as made, not from a local (see WireSession._shape)
                    f"over the {state.intent.name} budget of {state.intent.policy.rate} B/s",
                    channel_id=state.id,
                    retry_after_ms=state.bucket.retry_after_ms(size),
                )
        frame = self._chain(
            state,
            "data",
            sender,
            state.target if sender == state.agent else state.agent,
            payload,
            encoded,
            agent,
            defer_sign,
        )
        try:
            disposition = state.backend.on_frame(ctx, frame)
        except MuxError:
            raise
        except Exception as exc:
            log.warning("backend %s failed on a frame of %s", state.backend_name, state.id, exc_info=True)
            self._close_nowait(state, "backend_error", detail=f"{type(exc).__name__}: {exc}")
            raise ChannelError(
                f"backend failed: {type(exc).__name__}", code="backend_error", channel_id=state.id
            ) from exc
        self._count(state, size)
        if disposition is Disposition.DROPPED:
            self._stats["dropped"] += 1
        return Receipt(frame, disposition, state.durable, self.store.position)

    def start_task(self, async_fn: Callable[..., Awaitable[object]], *args: object, name: str | None = None) -> None:
        """Run a backend's node-level task (one that outlives a channel) in the mux nursery;
        it is cancelled at shutdown and must handle its own errors."""
        self._nursery.start_soon(async_fn, *args, name=name)

    def _new_chain(self, channel_id: str, intent: str, *, next_seq: int = 0, head: str = GENESIS) -> ChainHead:
        cfg = self.config
        return ChainHead(
            channel_id,
            intent,
            self._sign,
            next_seq,
            head,
            sign_every=cfg.sign_every,
            sign_within_ms=int(cfg.sign_within_ms),
        )

    async def _sealer(self) -> None:
        """With ``sign_every`` > 1: a channel whose newest frames wait for a signature longer
        than ``sign_within_ms`` gets a signed ``seal`` frame (delivered to both ends), so no
        frame stays uncovered by a signature for long, even on an idle channel."""
        within = self.config.sign_within_ms
        while True:
            await trio.sleep(within / 2000)
            cutoff = now_ms() - within
            for state in list(self._channels.values()):
                chain = state.chain
                if chain.unsigned and chain.unsigned_since <= cutoff and state.is_open:
                    self.seal(state)

    def seal(self, state: ChannelState) -> Frame:
        """Chain a signed ``seal`` frame covering the channel's unsigned head; both attached
        ends receive it."""
        frame = self._chain(state, "seal", self.agent, state.target, {"covers": state.chain.next_seq - 1})
        for end in state.ends.values():
            end.put(frame)
        return frame

    def compact(self) -> int:
        """After a burst of closes: rebuild the node's tables of channels, agents and
        mailboxes where the burst grew them far past what they now hold
        (:func:`mux.heap.shrink`), shelve the states of recently closed channels
        (``_shelve_closed``), and let the store move what it keeps (``Store.compact``: the
        in-memory ledger's packed chains). Returns the bytes the tables gave back."""
        self._shelve_closed()
        tables: tuple[MutableMapping[str, Any], ...] = (
            self._channels,
            self._opened_by,
            self._endpoints,
            self.mailboxes,
        )
        return self.store.compact() + sum(shrink(table) for table in tables)

    def _shelve_closed(self) -> None:
        """Keep each settled closed channel's state shelved (``ShelvedChannel``), in a new
        table with new keys, and move those already shelved into new objects too: what a
        burst left in the closed-channel lookups sits among the memory the burst freed, and
        would keep it."""
        fresh: collections.OrderedDict[str, ChannelState | ShelvedChannel] = collections.OrderedDict()
        for cid, state in self._closed.items():
            kept: ChannelState | ShelvedChannel = state
            if isinstance(state, ShelvedChannel):
                kept = ShelvedChannel(state.intent, state.backend, bytes(memoryview(state.data)))
            elif self._settled(state):
                state.ctx = None  # its context's link back to it: let refcounting free it
                kept = ShelvedChannel.of(state)
            fresh[renew(cid) if kept is not state else cid] = kept
        self._closed = fresh

    def _settled(self, state: ChannelState) -> bool:
        """True for a closed channel nothing will touch again but lookups: no task still
        to end, no long-poll reader, no resume waiting, no mail of it in a mailbox."""
        scope = state.cancel_scope
        if state.durable or (scope is not None and not scope.cancel_called) or state.appended:
            return False
        agents = [end.agent for end in state.ends.values() if end.reserved is None]
        if len(agents) < 2:
            return False
        for agent in (*agents, self.agent):
            box = self.mailboxes.get(agent)
            if box is not None and state.id in box.channels:
                return False
        return True

    def _count(self, state: ChannelState, size: int) -> None:
        state.frames += 1
        state.bytes += size
        self._stats["frames"] += 1
        self._stats["bytes"] += size

    # ---- mailboxes (durable delivery) ----------------------------------------------------

    def mail_check(self, agent: str, size: int, channel_id: str) -> None:
        """Raise ``mailbox_full`` if ``agent``'s mailbox, or all mailboxes together, cannot
        take a frame of a ``size``-byte payload."""
        cfg = self.config
        held = FRAME_HELD_BYTES + size
        if self._mail_bytes + held > cfg.mailboxes_max_bytes:
            raise MailboxFull(
                f"the node's mailboxes are full ({self._mail_bytes} bytes held; limit {cfg.mailboxes_max_bytes})",
                channel_id=channel_id,
            )
        check_room(agent, self.mailboxes.get(agent), held, cfg.mailbox_max_frames, cfg.mailbox_max_bytes, channel_id)

    def mail_put(self, state: ChannelState, frame: Frame) -> bool:
        """Put a durable frame in its target's mailbox (and store); True if delivered at once."""
        self._expire_mail()  # first: it drops the mailboxes it empties
        box = self.mailboxes.get(frame.target)
        if box is None:
            box = self.mailboxes[frame.target] = Mailbox(frame.target)
        before = box.bytes
        mail = box.put(state, frame)
        self._mail_bytes += box.bytes - before
        self.store.mail_put(frame)
        self._pump(state, state.ends[frame.target])
        return mail.sent == len(mail.frames)

    def _undelivered(self, state: ChannelState, agent: str) -> bool:
        box = self.mailboxes.get(agent)
        mail = box.channels.get(state.id) if box is not None else None
        return mail is not None and mail.undelivered > 0

    def _pump(self, state: ChannelState, end: End) -> None:
        """Move ``end``'s waiting mail of this channel into its inbox while there is room;
        end the inbox of a closed channel once everything is in."""
        box = self.mailboxes.get(end.agent)
        mail = box.channels.get(state.id) if box is not None else None
        if mail is not None and end.attached and (end.holder is None or end.holder.attached):
            frames = mail.frames
            while mail.sent < len(frames) and end.put(frames[mail.sent]):
                mail.sent += 1
        if state.close_frame is not None and (mail is None or mail.undelivered == 0):
            end.shut()

    def ack(self, agent: str, channel_id: str, upto_seq: int) -> int:
        """``agent`` acknowledges the channel's durable frames up to ``upto_seq``; returns
        how many left its mailbox (0 for a repeated ack)."""
        agent = normalize_agent(agent)
        if not isinstance(upto_seq, int) or isinstance(upto_seq, bool) or upto_seq < 0:
            raise BadRequest("ack: seq must be a non-negative integer", code="bad_request", channel_id=channel_id)
        box = self.mailboxes.get(agent)
        if box is None or channel_id not in box.channels:
            self.channel_state(channel_id, caller=agent)  # unknown or foreign ids still fail clearly
            return 0
        before = box.bytes
        removed = box.ack(channel_id, upto_seq)
        self._mail_bytes -= before - box.bytes
        if removed:
            self.store.mail_ack(agent, channel_id, upto_seq)
            self._stats["acked"] += removed
        if not box.channels:
            del self.mailboxes[agent]
        return removed

    def _expire_mail(self) -> None:
        """Expire mailbox frames past ``mailbox_max_age_s`` (at most once in a quarter of
        that age or in a minute, whichever is shorter)."""
        now = time.monotonic()
        if now - self._last_expiry < min(60.0, self.config.mailbox_max_age_s / 4):
            return
        self._last_expiry = now
        cutoff = now_ms() - int(self.config.mailbox_max_age_s * 1000)
        for agent, box in list(self.mailboxes.items()):
            before = box.bytes
            gone = box.expire(cutoff)
            self._mail_bytes -= before - box.bytes
            for frame in gone:
                log.warning("mailbox of %s: expired %s seq %d (retention)", agent, frame.channel_id, frame.seq)
                self.store.mail_drop(agent, frame.channel_id, frame.seq)
                self._stats["expired"] += 1
            if not box.channels:
                del self.mailboxes[agent]

    # ---- restart ---------------------------------------------------------------------------

    def restore(self, snapshot: Snapshot) -> None:
        """Rebuild what a store kept: channels still open when the node stopped are closed
        with reason ``node_restart`` (close frame signed now); mailboxes are refilled."""
        states: dict[str, ChannelState] = {}
        for row in snapshot.channels:
            if row.first is None or row.last is None:
                continue
            resolved = self.registry.resolve(row.intent)
            backend, backend_name, fallback = self._backend_for(resolved)
            cap = self.config.channel_buffer_frames
            state = ChannelState(
                id=row.id,
                intent=resolved,
                agent=row.agent,
                target=row.target,
                metadata=row.metadata,
                chain=self._new_chain(row.id, resolved.name, next_seq=row.last.seq + 1, head=row.last.tbz_hash),
                bucket=_bucket(resolved.policy),
                ends=Ends(End(row.agent, cap), End(row.target, cap)),
                backend=backend,
                backend_name=backend_name,
                fallback=fallback,
                opened_at=row.opened_at,
                open_frame=row.first,
            )
            self._bind(state)
            states[row.id] = state
            if row.closed and row.last.kind == "close":
                state.close_frame = row.last
                state.close_reason = row.close_reason
                self._closed[row.id] = state
            else:
                self._channels[row.id] = state
                self._opened_by[row.agent] += 1
        for frame in snapshot.mail:
            owner = states.get(frame.channel_id)
            if owner is None:
                continue
            box = self.mailboxes.get(frame.target)
            if box is None:
                box = self.mailboxes[frame.target] = Mailbox(frame.target)
            box.put(owner, frame)
            self._mail_bytes += held_bytes(frame)
        for state in list(self._channels.values()):
            self._close_nowait(state, "node_restart")
        self._stats["restored_channels"] = len(states)
        self._stats["restored_mail"] = len(snapshot.mail)

    # ---- close ---------------------------------------------------------------------------

    async def _close(self, state: ChannelState, reason: str, *, by: str | None = None) -> Frame:
        await trio.lowlevel.checkpoint()
        return self._close_nowait(state, reason, by=by)

    def _close_nowait(self, state: ChannelState, reason: str, *, by: str | None = None, detail: str = "") -> Frame:
        """Close ``state`` (idempotent): chain the close frame, stop the task, end the inboxes."""
        if state.close_frame is not None:
            return state.close_frame
        if not isinstance(reason, str) or not reason or len(reason) > 200:
            reason = "closed"
        assert state.ctx is not None
        try:
            state.backend.on_close(state.ctx, reason)
        except Exception:
            log.warning("backend %s failed while closing %s", state.backend_name, state.id, exc_info=True)
        sender = by if by is not None and by in state.ends else self.agent
        target = state.target if sender != state.target else state.agent
        payload: dict[str, Any] = {"reason": reason, "by": sender}
        if detail:
            payload["detail"] = detail
        state.close_reason = reason
        state.close_frame = self._chain(state, "close", sender, target, payload)
        self.store.record_close(state.id, reason)
        if state.cancel_scope is not None:
            state.cancel_scope.cancel()
        self._channels.pop(state.id, None)
        self._opened_by[state.agent] -= 1
        if self._opened_by[state.agent] <= 0:
            del self._opened_by[state.agent]
        self._closed[state.id] = state
        self._stats["closed"] += 1
        while len(self._closed) > self.config.closed_retention:
            _, forgotten = self._closed.popitem(last=False)
            if isinstance(forgotten, ChannelState):
                # its context points back at it: without that cycle, refcounting frees the channel
                # (and its ends) as soon as nothing else holds it, not at a later garbage collection
                forgotten.ctx = None
        for end in state.ends.values():
            holder = end.holder
            if holder is not None:
                holder._held.pop(state.id, None)
                if not holder._held:  # an emptied dict keeps the table it grew to: let it go
                    holder._held.clear()
            if not self._undelivered(state, end.agent):
                end.shut()
                end.holder = None  # a closed channel kept for lookups holds no connection
        return state.close_frame

    async def close_channel(self, channel_id: str, reason: str = "closed", *, by: str | None = None) -> Frame:
        """Close a channel by id; with ``by``, only one of its ends may."""
        state = self.channel_state(channel_id, caller=normalize_agent(by) if by is not None else None)
        return await self._close(state, reason, by=normalize_agent(by) if by is not None else None)

    async def aclose(self, reason: str = "mux_shutdown") -> None:
        """Close every channel with ``reason`` and detach every endpoint."""
        await trio.lowlevel.checkpoint()
        for state in list(self._channels.values()):
            self._close_nowait(state, reason)
        for ep in list(self._endpoints.values()):
            ep._detach()

    # ---- endpoints -----------------------------------------------------------------------

    def attach(self, agent: str) -> Endpoint:
        """Attach ``agent`` to the mux as an :class:`Endpoint` (one per agent at a time).

        The endpoint is told of channels opened to the agent, including ones already open.
        """
        name = normalize_agent(agent)
        if name == self.agent:
            raise ChannelError("the node's own agent name cannot attach", code="bad_agent")
        if name in self._endpoints:
            raise ChannelError(f"agent {name} is already attached", code="agent_attached")
        ep = Endpoint(self, name)
        self._endpoints[name] = ep
        self._expire_mail()  # nothing past the retention age is delivered
        box = self.mailboxes.get(name)
        if box is not None:
            box.rewind()  # everything unacknowledged is delivered again
            for mail in list(box.channels.values()):
                ep._announce(mail.state)
        for state in list(self._channels.values()):
            end = state.ends.get(name)
            if state.target == name and end is not None and not end.attached and end.reserved is None:
                ep._announce(state)
        return ep


@asynccontextmanager
async def open_mux(
    agent: str = "mux-node",
    *,
    data_dir: str | PathLike[str] | None = None,
    key: NodeKey | None = None,
    config: MuxConfig | None = None,
    **limits: Any,
) -> AsyncIterator[Mux]:
    """Run a :class:`Mux` in a nursery of its own for the duration of the block.

    ``data_dir`` holds the node key (created on first use) and the durable store
    (``mux.sqlite3``: ledger, channels, mailboxes), restored on the next start; without it
    the key and everything else live in memory only. ``limits`` override :class:`MuxConfig` fields. On exit every
    channel is closed with reason ``mux_shutdown`` (close frames signed) and its task ends.
    """
    if key is None:
        key = NodeKey.load_or_create(data_dir) if data_dir is not None else NodeKey.generate()
    cfg = attrs.evolve(config or MuxConfig(), **limits)
    configured_registry(cfg)  # a bad configuration fails here, before anything starts
    store: Store = SqliteStore(Path(data_dir) / STORE_FILE) if data_dir is not None else MemoryStore()
    try:
        async with trio.open_nursery() as nursery:
            mux = await start_mux(nursery, agent=agent, key=key, config=cfg, store=store)
            try:
                yield mux
            finally:
                with trio.CancelScope(shield=True):
                    await mux.aclose("mux_shutdown")
                nursery.cancel_scope.cancel()
    finally:
        if isinstance(store, SqliteStore):
            store.close()


async def start_mux(nursery: trio.Nursery, *, agent: str, key: NodeKey, config: MuxConfig, store: Store) -> Mux:
    """Start ``store``'s writer in ``nursery``, build a Mux on it and restore what the store
    kept from before (channels, mailboxes)."""
    await nursery.start(store.run)
    mux = Mux(nursery, agent=agent, key=key, config=config, store=store)
    mux.restore(await store.load())
    return mux
