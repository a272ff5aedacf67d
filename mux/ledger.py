"""The frame ledger: where a node keeps every signed frame so a chain can be exported.

``Ledger`` is the seam (a durable SQLite or Redis ledger implements the same protocol);
:class:`MemoryLedger` is the in-process default, bounded so it never grows without limit:
it keeps at most ``max_channels`` channels' chains (oldest closed channels forgotten first)
and at most ``max_frames_per_channel`` frames of each (oldest forgotten first, after which
an export is partial and verifies with ``require_open=False``).
"""

from __future__ import annotations

import collections
from typing import Protocol

import attrs

from .frames import Frame

__all__ = ["Ledger", "MemoryLedger"]


class Ledger(Protocol):
    """Keeps signed frames by channel, in chain order."""

    def append(self, frame: Frame) -> None:
        """Record one frame (frames of a channel arrive in seq order)."""

    def chain(self, channel_id: str, after_seq: int = -1) -> list[Frame]:
        """The recorded frames of a channel with ``seq > after_seq``, in order."""


@attrs.define
class MemoryLedger:
    """Bounded in-memory ledger (the default without a data directory)."""

    max_channels: int = 4096
    max_frames_per_channel: int = 100_000
    _chains: collections.OrderedDict[str, collections.deque[Frame]] = attrs.field(
        factory=collections.OrderedDict, init=False
    )

    def append(self, frame: Frame) -> None:
        """Record ``frame``; evict the least recently written channel when over ``max_channels``."""
        chain = self._chains.get(frame.channel_id)
        if chain is None:
            chain = self._chains[frame.channel_id] = collections.deque(maxlen=self.max_frames_per_channel)
            while len(self._chains) > self.max_channels:
                self._chains.popitem(last=False)
        chain.append(frame)

    def chain(self, channel_id: str, after_seq: int = -1) -> list[Frame]:
        """Frames of ``channel_id`` with ``seq > after_seq``."""
        chain = self._chains.get(channel_id)
        if not chain:
            return []
        if after_seq < chain[0].seq:
            return list(chain)
        return [f for f in chain if f.seq > after_seq]
