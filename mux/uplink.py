"""How many bytes of pieces a client keeps in flight on its uplink beside a call (sans-I/O).

A call's frame written after bulk pieces waits for every byte queued ahead of it on the
way to the node: in the client's socket and at the slowest link (a phone's uplink, a home
router's buffer). ``mux.client`` keeps that queue short: it asks the node to confirm each
piece as it arrives (``"part_ack": true`` on the piece; the node answers ``part_ack``), and
:class:`PieceWindow` bounds the bytes written and not yet confirmed with a delay-based
window, as LEDBAT (RFC 6817) and FAST TCP do: the lowest confirmation time seen lately is
the path's own delay, anything above it is queueing. The window the path would carry with
exactly ``target_s`` queued is ``window * (base + target) / confirmation time``; each
confirmation moves the window half its share of the way there (a window's worth of
confirmations, about half the way; never more than doubling). So the pieces fill the link
without building a queue much longer than ``target_s`` in front of the call's frames.
"""

from __future__ import annotations

import collections
import math

import attrs

__all__ = ["BASE_BUCKET_S", "BASE_BUCKETS", "GAIN", "PieceWindow"]

GAIN = 0.5
"""How far a window's worth of confirmations moves the window towards its goal."""

BASE_BUCKET_S = 1.0
BASE_BUCKETS = 10
"""The path's own delay is the lowest confirmation time of the last ``BASE_BUCKETS``
periods of ``BASE_BUCKET_S`` (LEDBAT keeps minutes; a client's path changes faster)."""


@attrs.define
class PieceWindow:
    """Bytes of pieces in flight (``in_flight``) and how many may be (``window``).

    :meth:`room` before writing a piece, :meth:`sent` once written, :meth:`acked` when the
    node confirms it (with the time it took), :meth:`forget` for pieces that will never be
    confirmed (their send was refused, or confirmations stopped coming)."""

    piece: int
    """The size of a full piece (the window's unit)."""
    target_s: float = 0.005
    """The queueing delay to stay under: about 20 KiB on a 4 MB/s uplink (five of
    ``mux.client``'s 4 KiB pieces). Measured with bench row (d-up), in 16 KiB pieces (a call
    beside 512 KiB uploads through such an uplink, three runs each): a call frame's p99 17 to
    19 ms at 5 ms, against 25 to 29 ms at 10 ms, for 8% fewer bytes uploaded beside the call
    (the node's bulk budget beside a call bounds them anyway). With 4 KiB pieces a 2 ms target
    cut the p99 further (7.6 ms against 12.2 in one run) but uploaded 11 to 29% less."""
    min_pieces: int = 1
    """The smallest window, in pieces."""
    max_pieces: int = 64
    """The largest window, in pieces (``mux.client``: 256 of its 4 KiB pieces, 1 MiB)."""
    window: float = attrs.field(default=0.0)
    in_flight: int = 0
    _bases: collections.deque[tuple[int, float]] = attrs.field(factory=collections.deque)
    """(period number, lowest confirmation time in it) for the last ``BASE_BUCKETS`` periods."""

    def __attrs_post_init__(self) -> None:
        if not self.window:
            self.window = 2.0 * self.piece

    @property
    def base_s(self) -> float:
        """The lowest confirmation time seen lately (inf before the first)."""
        return min((low for _, low in self._bases), default=math.inf)

    def room(self, size: int) -> bool:
        """True if a piece of ``size`` bytes may be written now (always when none is in
        flight: the window never stops the pieces altogether)."""
        return self.in_flight == 0 or self.in_flight + size <= self.window

    def sent(self, size: int) -> None:
        """A piece of ``size`` bytes was written."""
        self.in_flight += size

    def acked(self, size: int, took_s: float, now: float) -> float:
        """A piece of ``size`` bytes was confirmed ``took_s`` after it was written (at time
        ``now``); returns the queueing delay this confirmation saw."""
        self.in_flight = max(0, self.in_flight - size)
        bucket = math.floor(now / BASE_BUCKET_S)
        if self._bases and self._bases[-1][0] == bucket:
            self._bases[-1] = (bucket, min(self._bases[-1][1], took_s))
        else:
            self._bases.append((bucket, took_s))
        while self._bases and self._bases[0][0] <= bucket - BASE_BUCKETS:
            self._bases.popleft()
        base = self.base_s
        queueing = max(0.0, took_s - base)
        goal = min(2 * self.window, self.window * (base + self.target_s) / max(took_s, 1e-6))
        self.window += GAIN * min(1.0, size / self.window) * (goal - self.window)
        self.window = min(max(self.window, self.min_pieces * self.piece), self.max_pieces * self.piece)
        return queueing

    def forget(self, size: int) -> None:
        """``size`` bytes in flight will not be confirmed: no longer count them."""
        self.in_flight = max(0, self.in_flight - size)

    def lost(self) -> None:
        """Confirmations stopped coming for a while: halve the window (as for a loss)."""
        self.window = max(self.min_pieces * self.piece, self.window / 2)
