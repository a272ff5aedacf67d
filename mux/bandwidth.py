"""Token-bucket bandwidth guard, one per channel, driven by an explicit clock; and the gaps
between a call's frames, where bulk beside the call is paced to.

A bucket holds up to ``burst`` bytes of credit and refills at ``rate`` bytes/s. ``take``
spends credit for a frame; when there is not enough, the frame is over budget. ``rate == 0``
means unlimited. ``now`` is passed in (seconds, monotonic) so tests can use a fake clock.

A :class:`Cadence` follows a call's frames on one connection (their period, and when the
last one came) and moves a bulk sender's next frame into the gap after a call frame:
``GAP_OPENS`` of the period after it, until ``GAP_CLOSES`` of the period, so that bulk on
the same socket and path is through before the call's next frame arrives.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["GAP_CLOSES", "GAP_OPENS", "UNLIMITED", "Arrival", "BulkShare", "Cadence", "TokenBucket"]


_SLACK = 1e-6
"""Credit short by less than this (bytes) counts as enough: refill is float arithmetic, and a
frame retried after its ``retry_after_ms`` must not be refused for a rounding error."""
_PAST = 1e-6
"""A promised slot this many seconds behind now has passed (float dust is not a miss)."""
_FORGET_S = 1.0
"""A promise this long past its time is forgotten (``BulkShare``)."""
_HOLD_MIN_S = 0.005
"""A promise whose time has passed still holds its room, in the slots reckoned for the other
channels, at least this long (its frame may be on its way) ...
"""
_HOLD_LATENESS = 2.0
"""... or this many times the connection's recent lateness, if longer (at most ``_FORGET_S``)."""
_LATENESS_DECAY = 0.8
"""The connection's recent lateness is the latest frame's, or this much of the one before,
whichever is more: it follows a slower path at once and a faster one over a few frames."""


@attrs.define
class TokenBucket:
    """Byte credit for one channel: ``rate`` bytes/s, at most ``burst`` bytes banked."""

    rate: int
    burst: int
    tokens: float = attrs.field(default=attrs.Factory(lambda self: float(self.burst), takes_self=True))
    """Credit now (a full bucket unless given); below zero after a frame larger than ``burst``."""
    stamp: float | None = None

    def take(self, nbytes: int, now: float) -> bool:
        """Spend ``nbytes`` of credit at time ``now``; False (and nothing spent) if short.

        A frame larger than ``burst`` passes when the bucket is full, so one big frame is
        never refused forever; the debt then delays the next frames.
        """
        if self.rate <= 0:
            return True
        self._refill(now)
        if self.covers(self.tokens, nbytes):
            self.tokens -= nbytes
            return True
        return False

    def spend(self, nbytes: int, now: float) -> None:
        """Spend ``nbytes`` at time ``now`` whatever the credit: below zero, the debt delays
        the next frames."""
        if self.rate > 0:
            self._refill(now)
            self.tokens -= nbytes

    def credit(self, now: float) -> float:
        """The credit the bucket would hold at time ``now`` (nothing spent, nothing changed)."""
        return self.tokens if self.stamp is None else self.refilled(self.tokens, now - self.stamp)

    def refilled(self, tokens: float, seconds: float) -> float:
        """Credit ``tokens`` after ``seconds`` of refill, at most ``burst``."""
        return min(float(self.burst), tokens + seconds * self.rate)

    def covers(self, tokens: float, nbytes: int) -> bool:
        """True when credit ``tokens`` lets a frame of ``nbytes`` pass (or the bucket is full)."""
        credit = tokens + _SLACK
        return credit >= nbytes or credit >= self.burst

    def _refill(self, now: float) -> None:
        self.tokens = self.credit(now)
        self.stamp = now

    def refund(self, nbytes: int) -> None:
        """Give back credit a frame took but did not use (it was refused further on)."""
        if self.rate > 0:
            self.tokens = min(float(self.burst), self.tokens + nbytes)

    def wait_ms(self, nbytes: int) -> int:
        """Milliseconds until ``take(nbytes)`` would pass; 0 when it would pass now."""
        if self.rate <= 0:
            return 0
        short = min(float(nbytes), float(self.burst)) - self.tokens
        return 0 if short <= 0 else math.ceil(short / self.rate * 1000)

    def retry_after_ms(self, nbytes: int) -> int:
        """Milliseconds until ``take(nbytes)`` would pass (after it was refused): at least 1."""
        return max(1, self.wait_ms(nbytes)) if self.rate > 0 else 0


UNLIMITED = TokenBucket(0, 0)
"""The bucket of every channel with no rate limit (``take`` never changes it: shared)."""


@attrs.define
class _Promise:
    """Room kept for a channel's next frame: ``nbytes`` at ``due``; the largest it sent."""

    nbytes: int
    due: float
    largest: int


@attrs.frozen
class Arrival:
    """A bulk frame as its connection's :class:`BulkShare` reckons it."""

    reckon: int
    """The size to reckon the channel's next slot for: the largest frame it sent while shaped."""
    kept: bool
    """It came at or after its channel's promised time, no larger than the room kept."""


@attrs.define
class BulkShare:
    """A connection's bulk budget beside a call (``bucket``, shared by its bulk channels) and
    the slots it has promised them (``pace_ms``, ``retry_after_ms``).

    Each channel's next slot is reckoned after the room already promised to the others, so
    channels that keep to their hints never take each other's room (reckoned from the bucket
    alone, two channels told the same time collide and one is refused). It is reckoned for the
    largest frame the channel sent while shaped, so a file's chunk fits after its small
    header. One promise per channel: the channel's next frame uses it.

    A frame that keeps its promise (it comes at or after its time, no larger than the room
    kept) always passes. A client's frame comes after its hint by the way there and back and
    the client's own delays, so a promise whose time has passed still holds its room for a
    while: twice the lateness of the connection's recent frames, at least ``_HOLD_MIN_S``.
    Meanwhile the other channels' slots are reckoned after it, and a frame that keeps no
    promise (early, larger than its room, or a channel's first) is refused rather than take
    that room. A channel that stopped costs the others one slot reckoned later; a second
    after its time, its promise is forgotten with the channel's largest frame.
    """

    bucket: TokenBucket
    _promised: dict[str, _Promise] = attrs.field(factory=dict)
    _lateness: float = 0.0
    """Seconds the connection's recent frames came after their promised time."""

    @property
    def rate(self) -> int:
        """Bytes per second the connection's bulk channels share."""
        return self.bucket.rate

    def arrive(self, key: str, nbytes: int, now: float) -> Arrival:
        """A frame of ``nbytes`` comes on channel ``key``: it uses the channel's promise (and
        long-past ones are forgotten); what it is reckoned as."""
        promise = self._promised.pop(key, None)
        for k in [k for k, p in self._promised.items() if p.due < now - _FORGET_S]:
            del self._promised[k]
        if promise is None:
            return Arrival(nbytes, kept=False)
        self._lateness = max(min(now - promise.due, _FORGET_S), _LATENESS_DECAY * self._lateness)
        kept = now >= promise.due - _PAST and nbytes <= promise.nbytes
        return Arrival(max(nbytes, promise.largest), kept=kept)

    def take(self, key: str, nbytes: int, now: float, *, kept: bool) -> bool:
        """Spend ``nbytes`` of the shared budget for channel ``key``. A frame that ``kept`` its
        channel's promise (``Arrival``) passes: its room was kept, and what its lateness cost
        (credit the full bucket could not bank meanwhile) is a debt the next slots are
        reckoned after. Any other (early, larger than its room, or the channel's first) passes
        as ``TokenBucket.take`` would, unless it would leave short a slot promised to another
        channel: one still ahead, or one whose frame is late (``_hold``) and may be on its
        way."""
        if kept:
            self.bucket.spend(nbytes, now)
            return True
        _, _, short = self._after_promises(self.bucket.credit(now) - nbytes, now, since=now - self._hold(), but=key)
        return not short and self.bucket.take(nbytes, now)

    def _hold(self) -> float:
        """Seconds a promise whose time has passed still holds its room."""
        return min(_FORGET_S, max(_HOLD_MIN_S, _HOLD_LATENESS * self._lateness))

    def _after_promises(
        self, tokens: float, now: float, *, since: float, but: str | None = None
    ) -> tuple[float, float, bool]:
        """Starting from ``tokens`` at ``now``, let every promise due since ``since`` (but
        ``but``'s) take its room in turn, those already due first: the credit and the time
        after the last, and whether one of them would have found too little (as
        ``TokenBucket.take`` would)."""
        b = self.bucket
        t, short = now, False
        ahead = (p for k, p in self._promised.items() if k != but and p.due >= since)
        for promise in sorted(ahead, key=lambda p: p.due):
            due = max(promise.due, t)
            tokens = b.refilled(tokens, due - t)
            short = short or not b.covers(tokens, promise.nbytes)
            tokens -= promise.nbytes
            t = due
        return tokens, t, short

    def refund(self, nbytes: int) -> None:
        """Give back what a frame took but did not use."""
        self.bucket.refund(nbytes)

    def wait_ms(self, nbytes: int, now: float) -> int:
        """Milliseconds from ``now`` until ``nbytes`` fit after every promised slot is used."""
        tokens, t, _ = self._after_promises(self.bucket.credit(now), now, since=now - self._hold())
        short = min(float(nbytes), float(self.bucket.burst)) - tokens
        ready = t + max(0.0, short) / self.bucket.rate
        return math.ceil((ready - now) * 1000 - 1e-6)

    def promise(self, key: str, nbytes: int, largest: int, due: float) -> None:
        """Keep room for channel ``key``'s next frame of ``nbytes`` at ``due``."""
        self._promised[key] = _Promise(nbytes, due, largest)


GAP_OPENS = 0.15
"""Bulk may start this fraction of the call's period after a call frame (3 ms at 20 ms)..."""
GAP_CLOSES = 0.7
"""... and should be sent by this fraction of it (14 ms at 20 ms): what is sent later could
still be on its way when the next call frame comes."""


@attrs.define
class Cadence:
    """A call's frames on one connection: when the last came, and their period (a moving
    average of the gaps between them, from 5 to 100 ms; others are pauses or bursts)."""

    last: float = -math.inf
    period: float | None = None

    def frame(self, now: float) -> None:
        """A call frame arrived at ``now``."""
        gap = now - self.last
        if 0.005 <= gap <= 0.1:
            self.period = gap if self.period is None else 0.8 * self.period + 0.2 * gap
        elif gap > 1.0:
            self.period = None  # a new call: learn its period afresh
        self.last = now

    def next_gap(self, ready: float) -> float:
        """The first time at or after ``ready`` that falls in the gap after a call frame (as
        the call's period predicts them); ``ready`` itself without a period yet."""
        period = self.period
        if period is None:
            return ready
        since = math.floor((ready - self.last) / period) * period + self.last  # the frame before
        if ready < since + GAP_OPENS * period:
            return since + GAP_OPENS * period
        if ready > since + GAP_CLOSES * period:
            return since + period + GAP_OPENS * period
        return ready
