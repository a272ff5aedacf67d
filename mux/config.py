"""A Mux's configuration: its limits and sizes (:class:`MuxConfig`, the ``[mux]`` table of
``serve --config``) and the intent table they give (:func:`configured_registry`)."""

from __future__ import annotations

from typing import Any

import attrs

from .checks import flag, number, table_of_tables, whole
from .errors import BadSetting
from .intents import IntentRegistry

__all__ = ["MuxConfig", "configured_registry"]


@attrs.define
class MuxConfig:
    """Limits and sizes of a Mux; units are in the names. Each is checked (``mux.checks``): a
    value of the wrong type or out of range raises :class:`~mux.errors.BadSetting`."""

    max_channels_per_agent: int = attrs.field(default=32, validator=whole(1))
    """Open channels an agent may have opened at once (the seed's limit)."""
    channel_buffer_frames: int = attrs.field(default=256, validator=whole(1))
    """Frames an end's inbox holds before senders wait (or are refused)."""
    connection_buffer_bytes: int = attrs.field(default=16 << 20, validator=whole(1))
    """Bytes of frames one WebSocket connection's queues may hold for its client in all (its
    channels' queues, and frames waiting for credit): past it a frame to that connection is
    refused ``receiver_full`` (a call's is dropped late), however many channels it holds.
    Each channel's own queue is bounded too (``channel_buffer_frames`` messages)."""
    readers_buffer_bytes: int = attrs.field(default=1 << 30, validator=whole(0))
    """What all WebSocket connections' queues may hold together: each connection's budget is
    ``connection_buffer_bytes``, or an equal share of this once more connections are open
    (1 GiB: 16 MiB each up to 64 connections, about 105 KiB each at 10,000), so a crowd of
    slow readers cannot make the node hold connections x 16 MiB. 0 = no node-wide bound."""
    pieces_max_bytes: int = attrs.field(default=256 << 20, validator=whole(0))
    """What all connections' unfinished sends in pieces (``mux.pieces``) may hold together
    before a piece is refused ``pieces_full`` (each connection's own are bounded by
    ``MAX_OPEN`` x ``max_message_bytes``). 0 = no node-wide bound."""
    pieces_idle_s: float = attrs.field(default=60.0, validator=number(0))
    """An unfinished send in pieces none of whose pieces came for this long is forgotten
    (``pieces_expired``). 0 = never (``pieces_max_bytes`` still bounds them)."""
    incoming_buffer_channels: int = attrs.field(default=64, validator=whole(1))
    """Channels announced to an endpoint and not yet accepted."""
    max_payload_bytes: int = attrs.field(default=1 << 20, validator=whole(1))
    """Largest payload of one frame (encoded bytes)."""
    max_metadata_bytes: int = attrs.field(default=16 << 10, validator=whole(2))
    """Largest metadata object at open (canonical JSON bytes)."""
    closed_retention: int = attrs.field(default=1024, validator=whole(0))
    """Closed channels remembered for ``channel(id)`` lookups."""
    mailbox_max_frames: int = attrs.field(default=10_000, validator=whole(1))
    """Unacknowledged durable frames one agent's mailbox holds before ``mailbox_full``."""
    mailbox_max_bytes: int = attrs.field(default=64 << 20, validator=whole(1))
    """Memory one agent's unacknowledged durable frames may hold before ``mailbox_full``
    (payload and bookkeeping, :func:`mux.frames.held_bytes`)."""
    mailboxes_max_bytes: int = attrs.field(default=512 << 20, validator=whole(1))
    """Memory all agents' mailboxes together may hold before ``mailbox_full``, however many
    agents there are."""
    mailbox_max_age_s: float = attrs.field(default=7 * 24 * 3600.0, validator=number(0, above=True))
    """Unacknowledged durable frames older than this are expired (counted and logged): looked
    for on durable puts and attaches, at most once in a quarter of this or in a minute,
    whichever is shorter."""
    intent_policies: dict[str, dict[str, Any]] = attrs.field(factory=dict, validator=table_of_tables)
    """Per-intent policy overrides, e.g. ``{"file:sync": {"rate": 0}}`` (TOML
    ``[mux.intent_policies."file:sync"]``): fields of :class:`BandwidthPolicy`."""
    sign_every: int = attrs.field(default=1, validator=whole(1))
    """Sign every N-th data frame of a channel (1 = every frame). Unsigned frames are covered
    by the next signed frame of their chain (hash links), within N frames or
    ``sign_within_ms`` plus half that (the sealer's tick), whichever comes first."""
    sign_within_ms: float = attrs.field(default=100.0, validator=number(0, above=True))
    """With ``sign_every`` > 1: the longest a frame waits for a covering signature."""
    realtime_bulk_rate: int = attrs.field(default=2_000_000, validator=whole(0))
    """While a connection carries a real-time call (a voice or video frame sent in the last
    ``realtime_hold_s``), its preemptible channels share this many bytes/s, over which
    their frames are refused with ``throttled`` (that frame only): a file transfer beside a
    call cannot saturate the node and delay the call's frames. 0 = no shaping."""
    realtime_hold_s: float = attrs.field(default=1.0, validator=number(0))
    """How long after a connection's last real-time frame its bulk stays shaped."""
    realtime_bulk_window: int = attrs.field(default=1, validator=whole(0))
    """While a connection's bulk is shaped, every ``frame_ack`` and ``throttled`` refusal on
    its preemptible channels carries ``window``: the most frames the sender should have
    unacknowledged on that channel, so a client that honours it never has a run of bulk
    frames on the wire ahead of the call's next frame (acks also carry ``pace_ms`` once the
    budget is spent; docs/protocol.md). 0 = no hint."""
    realtime_bulk_gaps: bool = attrs.field(default=True, validator=flag)
    """Meanwhile ``pace_ms`` also moves the bulk sender's next frame into the gap after one
    of the call's frames (``mux.bandwidth.Cadence``), so bulk on the same socket is through
    before the call's next frame comes; False = pace by the budget alone."""
    downlink_target_ms: float = attrs.field(default=5.0, validator=number(0, above=True))
    """To a client that answers probes (``?probes=1``, ``mux.client``'s default), bulk sent
    beside its call is kept within a delay-based window that aims at this much queueing on
    the way to it (``mux.downlink``)..."""
    downlink_min_pieces: int = attrs.field(default=1, validator=whole(1, 64))
    """... and that keeps at least this many 16 KiB pieces in flight. 2 (LEDBAT's own
    minimum) keeps a fast link fuller with bulk, for a few milliseconds more on the call's
    frames (docs/performance.md, row (d-down))."""
    backends: dict[str, dict[str, Any]] = attrs.field(factory=dict, validator=table_of_tables)
    """Options per backend name, e.g. ``{"overlay": {"allow": ["127.0.0.1:8080"]}}``
    (``[backends.NAME]`` tables of ``serve --config``)."""


def configured_registry(config: MuxConfig) -> IntentRegistry:
    """The built-in intents with ``config.intent_policies`` applied (raises ``bad_config``)."""
    registry = IntentRegistry()
    for name, fields in config.intent_policies.items():
        current = registry.resolve(name)
        try:
            policy = attrs.evolve(current.policy, **fields)
        except TypeError as exc:
            raise BadSetting(f"intent_policies[{name!r}]: {exc}", setting="intent_policies") from None
        except BadSetting as exc:
            raise BadSetting(f"intent_policies[{name!r}]: {exc.detail}", setting="intent_policies") from None
        registry.register(
            name,
            backend=current.backend,
            description=current.route.description,
            policy=policy,
            delivery=current.delivery,
        )
    return registry
