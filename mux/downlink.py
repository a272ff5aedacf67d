"""How many bytes of bulk the node keeps in flight to a client beside its call (sans-I/O).

The node lets at most one piece wait unsent in a connection's socket (``TCP_NOTSENT_LOWAT``,
``mux.direct_writes``), but what the socket has sent may still wait on the way: at the
slowest link to the client (a phone's downlink, a mobile network's deep buffer), where
neither the node's socket nor TCP shows it. A call's frame sent after it waits behind all
of it. A client that answers probes (``?probes=1``; ``mux.client`` does) lets the node keep
that queue short, as ``mux.uplink`` does for the client's own uploads:

- after a write that carried bulk (frames less urgent than the connection's calls) while
  the connection holds a call, the node adds a tiny ``{"event": "probe", "n": N}`` to the
  same write; the client answers ``{"action": "probe", "n": N}`` as it reads it. Bytes keep
  their order, so the answer's time is how long the bulk ahead of the probe took to reach
  the client, queueing included (as the PING after data that gRPC's BDP estimator sends);
- :class:`DownlinkProbes` keeps the bulk bytes written and not yet covered by an answer
  within :class:`~mux.uplink.PieceWindow`'s delay-based window (LEDBAT-like, in the node's
  16 KiB pieces). While they fill it, the connection's outbox holds its bulk back
  (``Outbox.hold_bulk``) and the call's frames, replies and events go on alone; each answer
  moves the window and may let the bulk go again.

Probes that stay unanswered for :data:`PROBE_TIMEOUT_S` count as lost: the window halves and
the bytes they covered are no longer counted, so a client that stops answering slows its
bulk down but never stops it.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import attrs

from . import wire
from .uplink import PieceWindow

__all__ = ["MAX_PIECES", "PROBE_BYTES", "PROBE_TIMEOUT_S", "TARGET_S", "DownlinkProbes", "new_window", "status"]

PROBE_BYTES = wire.CHUNK_BYTES
"""Bulk bytes between two probes at most (one of the node's pieces). A probe also follows
a write that filled the window, a write of bulk while no probe is outstanding, and a write
that took the last bulk queued."""
PROBE_TIMEOUT_S = 2.0
"""An unanswered probe this old counts as lost (the node's watchdog looks once a second)."""
MAX_PIECES = 64
"""The largest window, in the node's 16 KiB pieces (1 MiB)."""


TARGET_S = 0.005
"""The queueing the window aims at by default (``MuxConfig.downlink_target_ms``)."""


def new_window(target_s: float, min_pieces: int) -> PieceWindow:
    """A window over the node's 16 KiB pieces that aims at ``target_s`` of queueing and
    keeps at least ``min_pieces`` of them in flight (at most :data:`MAX_PIECES`); it starts
    at two pieces, or at its least if that is more."""
    piece = wire.CHUNK_BYTES
    return PieceWindow(
        piece, target_s=target_s, min_pieces=min_pieces, max_pieces=MAX_PIECES, window=max(2, min_pieces) * piece
    )


@attrs.define
class DownlinkProbes:
    """One connection's probes and the window over its bulk (see the module docstring).

    :meth:`wrote` after each write that carried bulk (it may give a probe to add to the
    write), :meth:`answered` for each answer, :meth:`expire` now and then; :attr:`open` says
    whether more bulk may be written."""

    window: PieceWindow = attrs.field(factory=lambda: new_window(TARGET_S, 1))
    every: int = PROBE_BYTES
    _unprobed: int = 0
    """Bulk bytes written since the last probe."""
    _next: int = 0
    _out: collections.deque[tuple[int, int, float]] = attrs.field(factory=collections.deque)
    """(number, bulk bytes it covers, time written) of each probe not answered yet, in order."""
    sent: int = 0
    answers: int = 0
    lost: int = 0
    """Probes sent, answered and counted lost (``/status`` ``probes``, :func:`status`)."""

    @property
    def open(self) -> bool:
        """True while more bulk may be written (the window is not full)."""
        return self.window.room(1)

    def wrote(self, size: int, now: float, more: bool = True) -> str | None:
        """``size`` bytes of bulk were taken for a write at ``now``, and ``more`` is queued
        behind them or not: the probe to write after them, if one is due
        (:data:`PROBE_BYTES` since the last, none outstanding, the window now full, or the
        last bulk queued, so that no byte stays in flight with no probe to answer for it),
        else None."""
        self.window.sent(size)
        self._unprobed += size
        if more and self._unprobed < self.every and self._out and self.open:
            return None
        n = self._next
        self._next = n + 1
        self._out.append((n, self._unprobed, now))
        self._unprobed = 0
        self.sent += 1
        return wire.event("probe", n=n)

    def awaits(self, n: object) -> bool:
        """True if probe ``n`` was sent and not answered yet (an answer to expect)."""
        return type(n) is int and bool(self._out) and self._out[0][0] <= n <= self._out[-1][0]

    def answered(self, n: int, now: float) -> bool:
        """The client answered probe ``n`` at ``now`` (so it read everything written before
        it): the bytes of it and of earlier probes leave the window, which moves by the time
        each took. True if the window had been full and has room now; an answer to a probe
        not awaited (late, or never sent) changes nothing."""
        if not self.awaits(n):
            return False
        was_open = self.open
        out = self._out
        while out and out[0][0] <= n:
            _, size, written = out.popleft()
            self.answers += 1
            if size:
                self.window.acked(size, now - written, now)
        return self.open and not was_open

    def expire(self, now: float) -> bool:
        """Count probes unanswered for :data:`PROBE_TIMEOUT_S` as lost: the window halves and
        every byte in flight is forgotten (the answers that would have covered them may
        never come). True if the window had been full and has room now."""
        out = self._out
        if not out or now - out[0][2] < PROBE_TIMEOUT_S:
            return False
        was_open = self.open
        self.lost += len(out)
        out.clear()
        self._unprobed = 0
        self.window.forget(self.window.in_flight)
        self.window.lost()
        return not was_open


def status(connections: Iterable[tuple[DownlinkProbes, bool]]) -> dict[str, int]:
    """What ``/status`` shows of the probed connections (those that asked for probes and
    have held a call; each with whether its bulk is held back now): how many, how many hold
    bulk back, the bulk bytes in flight to them, and
    their probes sent, answered and counted lost."""
    out = dict.fromkeys(("connections", "holding_bulk", "in_flight_bytes", "sent", "answered", "lost"), 0)
    for probes, held in connections:
        out["connections"] += 1
        out["holding_bulk"] += held
        out["in_flight_bytes"] += probes.window.in_flight
        out["sent"] += probes.sent
        out["answered"] += probes.answers
        out["lost"] += probes.lost
    return out
