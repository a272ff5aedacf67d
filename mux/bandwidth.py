"""Token-bucket bandwidth guard, one per channel, driven by an explicit clock.

A bucket holds up to ``burst`` bytes of credit and refills at ``rate`` bytes/s. ``take``
spends credit for a frame; when there is not enough, the frame is over budget. ``rate == 0``
means unlimited. ``now`` is passed in (seconds, monotonic) so tests can use a fake clock.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["UNLIMITED", "TokenBucket"]


@attrs.define
class TokenBucket:
    """Byte credit for one channel: ``rate`` bytes/s, at most ``burst`` bytes banked."""

    rate: int
    burst: int
    tokens: float = attrs.field(default=-1.0)
    stamp: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = float(self.burst)

    def take(self, nbytes: int, now: float) -> bool:
        """Spend ``nbytes`` of credit at time ``now``; False (and nothing spent) if short.

        A frame larger than ``burst`` passes when the bucket is full, so one big frame is
        never refused forever; the debt then delays the next frames.
        """
        if self.rate <= 0:
            return True
        if self.stamp is not None:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= nbytes or self.tokens >= self.burst:
            self.tokens -= nbytes
            return True
        return False

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
        """Milliseconds until ``take(nbytes)`` would pass (after it was refused)."""
        if self.rate <= 0:
            return 0
        short = min(float(nbytes), float(self.burst)) - self.tokens
        return max(1, math.ceil(short / self.rate * 1000))


UNLIMITED = TokenBucket(0, 0)
"""The bucket of every channel with no rate limit (``take`` never changes it: shared)."""
