"""Sends that arrive in pieces: one binary payload in several messages from the client.

A WebSocket message is read whole before anything behind it, so a client that sends a
large payload beside a call holds the call's next frame up behind all of it on its uplink.
Instead it may send the payload as several binary ``send`` messages whose headers add
``part`` (0, 1, ...) and ``parts`` (how many, 2 to ``mux.wire.MAX_PARTS``), and send its other
messages (a call's frames) between them. The node joins a send's pieces in order and
handles the last one as one ``send`` of the whole payload: one frame, one answer (the
``frame_ack`` or refusal, with the send's ``ref``). Pieces are silent otherwise.

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
"""

from __future__ import annotations

from typing import Any

import attrs

from .errors import BadRequest
from .wire import Action

__all__ = ["MAX_OPEN", "Pieces"]

MAX_OPEN = 4
"""Unfinished sends in pieces one connection may have at once: what the node holds for them
stays within ``MAX_OPEN * max_message_bytes`` per connection (4 MiB by default), and a
sender's further sends wait their turn (``mux.client`` does) without holding a call up."""


@attrs.define
class _Unfinished:
    parts: int
    fields: dict[str, Any]
    """The send's fields from piece 0, without the payload."""
    chunks: list[bytes]
    size: int


@attrs.define
class Pieces:
    """A connection's unfinished sends in pieces, by channel and ``ref`` (sans I/O)."""

    max_bytes: int
    """The most bytes a joined payload may have (the connection's ``max_message_bytes``)."""
    _open: dict[tuple[str, str | int | None], _Unfinished] = attrs.field(factory=dict, init=False)
    """Unfinished sends by channel and ``ref``."""

    def __len__(self) -> int:
        return len(self._open)

    def add(self, action: Action) -> Action | None:
        """Take one piece (a ``send`` action with ``part`` and ``parts``); return the whole
        ``send`` once its last piece came, else None. Raises the piece's error (a bad piece,
        or a payload over ``max_bytes``), forgetting its send."""
        channel_id: str = action.get("channel_id")
        part: int = action.get("part")
        parts: int = action.get("parts")
        chunk: bytes = action.get("payload")
        key = (channel_id, action.ref)
        if part == 0:
            if self._open.pop(key, None) is None and len(self._open) >= MAX_OPEN:
                raise BadRequest(f"at most {MAX_OPEN} sends in pieces may be unfinished at once", code="bad_request")
            fields = {k: v for k, v in action.fields.items() if k not in ("payload", "part", "parts")}
            self._open[key] = _Unfinished(parts, fields, [], 0)
        unfinished = self._open.get(key)
        if unfinished is None or part != len(unfinished.chunks) or parts != unfinished.parts:
            expected = "piece 0" if unfinished is None else f"piece {len(unfinished.chunks)} of {unfinished.parts}"
            self._open.pop(key, None)
            raise BadRequest(f"piece {part} of {parts} out of order: expected {expected}", code="bad_request")
        unfinished.size += len(chunk)
        if unfinished.size > self.max_bytes:
            del self._open[key]
            raise BadRequest(
                f"the pieces add up to more than the limit of {self.max_bytes} bytes", code="message_too_large"
            )
        unfinished.chunks.append(chunk)
        if part < parts - 1:
            return None
        del self._open[key]
        return Action("send", action.ref, {**unfinished.fields, "payload": b"".join(unfinished.chunks)})
