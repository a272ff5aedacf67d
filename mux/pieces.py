"""Sends that arrive in pieces: one binary payload in several messages from the client.

A WebSocket message is read whole before anything behind it, so a client that sends a
large payload beside a call holds the call's next frame up behind all of it on its uplink.
Instead it may send the payload as several binary ``send`` messages whose headers add
``part`` (0, 1, ...) and ``parts`` (how many, 2 to ``mux.wire.MAX_PARTS``), and send its other
messages (a call's frames) between them. The node joins a send's pieces in order and
handles the last one as one ``send`` of the whole payload: one frame, one answer (the
``frame_ack`` or refusal, with the send's ``ref``). Pieces are silent otherwise, unless a
piece asks with ``"part_ack": true``: then the node answers it once taken with
``{"event": "part_ack", "ref", "channel_id", "part"}`` (a client times these to keep its
uplink's queue short: ``mux.uplink``). The node says it does with ``"part_acks": true`` in
``connected``.

A send in pieces is known by its channel and its ``ref`` (every piece carries both), so
several may be under way on one channel at once (each becomes its frame when its last piece
comes). Rules (each broken rule fails that piece with ``bad_request``, or
``message_too_large``, and forgets that send): a send's pieces come in order; a piece 0 of a
send that is already under way starts it over (what came of it is dropped unanswered: both
would carry the same ``ref``); the joined payload may not exceed the connection's
``max_message_bytes``, as one message could not either; a connection has at most
:data:`MAX_OPEN` sends in pieces unfinished at once. Fields of the send other than the
payload (``agent_sig``, ``agent_nonce``) are taken from piece 0. The node says it takes
pieces, and how many may be unfinished, with ``"send_parts": MAX_OPEN`` in ``connected``.

What all connections' unfinished sends hold together is bounded too (:class:`PiecesBudget`,
``MuxConfig.pieces_max_bytes``): a piece that would take the node past it fails with
``pieces_full`` and its send is forgotten (a crowd of connections cannot make the node hold
connections x ``MAX_OPEN`` x ``max_message_bytes``). A sender that gives a send up half-way
says so with ``{"action": "abandon", "channel_id", "ref"}`` (:meth:`Pieces.abandon`; no
answer, and one for a send not under way is ignored), and a send none of whose pieces came
for ``MuxConfig.pieces_idle_s`` is forgotten with ``pieces_expired`` (:meth:`Pieces.expire`),
so a sender that stops half-way holds nothing for long either way.
"""

from __future__ import annotations

from typing import Any

import attrs

from .errors import BadRequest, MuxError
from .wire import Action

__all__ = ["MAX_OPEN", "PIECE_HELD_BYTES", "SEND_HELD_BYTES", "Pieces", "PiecesBudget"]

MAX_OPEN = 4
"""Unfinished sends in pieces one connection may have at once: what the node holds for them
stays within ``MAX_OPEN * max_message_bytes`` per connection (4 MiB by default), and a
sender's further sends wait their turn (``mux.client`` does) without holding a call up."""


PIECE_HELD_BYTES = 96
"""What a kept piece holds beside its bytes (the bytes object's header, its list slot)."""
SEND_HELD_BYTES = 1024
"""What an unfinished send holds beside its pieces (its record, key and fields from piece
0, an agent's signature among them)."""


@attrs.define
class PiecesBudget:
    """What all of a node's connections' unfinished sends in pieces hold (``held`` bytes,
    counted as above, in ``sends``), and the most they may (``max_bytes``; 0: no bound)."""

    max_bytes: int
    held: int = 0
    sends: int = 0


@attrs.define
class _Unfinished:
    parts: int
    fields: dict[str, Any]
    """The send's fields from piece 0, without the payload."""
    chunks: list[bytes]
    size: int
    held: int
    """Bytes counted against the node's :class:`PiecesBudget` for this send."""
    last: float
    """When its newest piece came (``now`` of :meth:`Pieces.add`)."""


@attrs.define
class Pieces:
    """A connection's unfinished sends in pieces, by channel and ``ref`` (sans I/O)."""

    max_bytes: int
    """The most bytes a joined payload may have (the connection's ``max_message_bytes``)."""
    budget: PiecesBudget = attrs.field(factory=lambda: PiecesBudget(0))
    """The node's count of what all connections' unfinished sends hold."""
    _open: dict[tuple[str, str | int | None], _Unfinished] = attrs.field(factory=dict, init=False)
    """Unfinished sends by channel and ``ref``."""

    def __len__(self) -> int:
        return len(self._open)

    def add(self, action: Action, now: float = 0.0) -> Action | None:
        """Take one piece (a ``send`` action with ``part`` and ``parts``) at time ``now``;
        return the whole ``send`` once its last piece came, else None. Raises the piece's
        error (a bad piece, a payload over ``max_bytes``, the node's budget full), forgetting
        its send."""
        channel_id: str = action.get("channel_id")
        part: int = action.get("part")
        parts: int = action.get("parts")
        chunk: bytes = action.get("payload")
        key = (channel_id, action.ref)
        if part == 0:
            if self._forget(key) is None and len(self._open) >= MAX_OPEN:
                raise BadRequest(f"at most {MAX_OPEN} sends in pieces may be unfinished at once", code="bad_request")
            fields = {k: v for k, v in action.fields.items() if k not in ("payload", "part", "parts", "part_ack")}
            self._open[key] = _Unfinished(parts, fields, [], 0, 0, now)
            self.budget.sends += 1
            self._hold(key, SEND_HELD_BYTES)
        unfinished = self._open.get(key)
        if unfinished is None or part != len(unfinished.chunks) or parts != unfinished.parts:
            expected = "piece 0" if unfinished is None else f"piece {len(unfinished.chunks)} of {unfinished.parts}"
            self._forget(key)
            raise BadRequest(f"piece {part} of {parts} out of order: expected {expected}", code="bad_request")
        unfinished.size += len(chunk)
        if unfinished.size > self.max_bytes:
            self._forget(key)
            raise BadRequest(
                f"the pieces add up to more than the limit of {self.max_bytes} bytes", code="message_too_large"
            )
        if part < parts - 1:
            self._hold(key, len(chunk) + PIECE_HELD_BYTES)
            unfinished.chunks.append(chunk)
            unfinished.last = now
            return None
        self._forget(key)
        unfinished.chunks.append(chunk)
        return Action("send", action.ref, {**unfinished.fields, "payload": b"".join(unfinished.chunks)})

    def expire(self, now: float, idle_s: float) -> list[tuple[str, str | int | None]]:
        """Forget the sends none of whose pieces came in the ``idle_s`` before ``now``;
        return their channels and ``ref``s."""
        stale = [key for key, unfinished in self._open.items() if now - unfinished.last >= idle_s]
        for key in stale:
            self._forget(key)
        return stale

    def abandon(self, channel_id: str, ref: str | int | None) -> bool:
        """Forget the unfinished send ``ref`` on ``channel_id`` (its sender gave it up);
        False if none is under way."""
        return self._forget((channel_id, ref)) is not None

    def clear(self) -> None:
        """Forget every unfinished send (the connection is gone)."""
        for key in list(self._open):
            self._forget(key)

    def _hold(self, key: tuple[str, str | int | None], n: int) -> None:
        """Count ``n`` more bytes for ``key``'s send, or forget it if the node has no room."""
        budget = self.budget
        if budget.max_bytes and budget.held + n > budget.max_bytes:
            self._forget(key)
            raise MuxError(
                f"the node holds as much of unfinished sends in pieces as it may ({budget.held} bytes;"
                f" limit {budget.max_bytes}): this send is forgotten; send it again later, or whole",
                code="pieces_full",
            )
        budget.held += n
        self._open[key].held += n

    def _forget(self, key: tuple[str, str | int | None]) -> _Unfinished | None:
        """Drop ``key``'s send, giving back what it held; the send, or None if unknown."""
        unfinished = self._open.pop(key, None)
        if unfinished is not None:
            self.budget.held -= unfinished.held
            self.budget.sends -= 1
        return unfinished
