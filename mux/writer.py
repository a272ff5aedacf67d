"""A connection's writer: drains its outbox onto the WebSocket, several messages a write.

The outbox (``mux.outbox``) orders what waits by urgency; the writer takes the most urgent
message and what is ready behind it, up to :data:`WRITE_BYTES` on a connection that holds a
call (a call's frame waits for at most one such write) or :data:`BULK_WRITE_BYTES` on one
that does not, and at most :data:`WRITE_MESSAGES`, and puts them on the wire in one write
(``Socket.send_many``); for a client that asked for ``?batch=1`` it folds the JSON ones into
one ``batch`` event. In a server reader's turn it may write without its task
(:meth:`Writer.write_now`); a writer that has been idle ends its task and is started again
by the next message (``Outbox.retire``). The node's watchdog (``mux.connection``) drops a
client that takes nothing for ``send_timeout_s``.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from . import wire
from .downlink import DownlinkProbes
from .outbox import Outbox, Outgoing
from .sockets import Socket

__all__ = ["BULK_WRITE_BYTES", "WRITE_BYTES", "WRITE_MESSAGES", "Writer"]

WRITE_BYTES = wire.CHUNK_BYTES
"""Messages ready together are written at once up to this many characters in all, on a
connection that holds a real-time channel (a call's frame waits for at most that much)..."""
BULK_WRITE_BYTES = 16 * wire.CHUNK_BYTES
"""... and up to this many on one that holds none (no frame there is waiting for a gap: a
large frame's pieces go out 16 at a time, with a sixteenth of the per-write cost)."""
WRITE_MESSAGES = 64
"""... and at most this many of them."""
_CLOSE = "\x00close"
"""Put last in a connection's outbox at shutdown: its writer closes the socket (1001)."""
_CLOSE_KEY = "*close*"
_LAST_URGENCY = 1 << 20
"""The marker's own queue, less urgent than any channel: it goes out last."""
_REST = "\x00rest"
"""Put in a waiting writer's outbox when the socket took only part of a direct write
(``Writer.write_now``): the writer writes the rest before anything else."""
_REST_KEY = "*rest*"
_FIRST_URGENCY = -(1 << 20)
"""The marker's own queue, more urgent than anything: it goes out first."""
_AGAIN_KEY = "*again*"
"""A binary message a batching writer took while gathering JSON goes back here, next in line
after the rest of a write (whatever its own key held behind it stays behind it)."""

_BATCH_HEAD = '{"event":"batch","items":['


def _unbatch(message: str) -> str:
    """The comma-joined items of a ``batch`` event (as ``wire.batch_event`` writes it), or
    ``message`` itself."""
    if message.startswith(_BATCH_HEAD) and message.endswith("]}"):
        return message[len(_BATCH_HEAD) : -2]
    return message


@attrs.define(eq=False)
class Writer:
    """Drains a socket's outbox onto the WebSocket; knows when everything queued is sent."""

    sock: Socket
    outbox: Outbox
    send_timeout_s: float
    connection: trio.CancelScope
    agent: str
    batching: bool = False
    """The client asked (``?batch=1``) for queued JSON events in one ``batch`` message."""
    holds_realtime: Callable[[], bool] = lambda: True
    """True while the connection holds a real-time channel: writes stay within
    ``WRITE_BYTES``; else within ``BULK_WRITE_BYTES``."""
    probes: Callable[[], DownlinkProbes | None] = lambda: None
    """The connection's probes (``mux.downlink``), once its client (``?probes=1``) has held a
    call: bulk written beside a call is kept within their window."""
    busy: bool = False
    since: float = attrs.field(factory=trio.current_time)
    """When the last write began (or the writer was made, or started again)."""

    @property
    def idle(self) -> bool:
        """True when nothing is queued or being written."""
        return not self.busy and self.outbox.empty

    def write_now(self) -> bool:
        """While this writer waits for work (``Outbox.write_now``, in a server reader's turn):
        take what is queued as :meth:`_write` would and write it straight to the socket
        without waiting. True when that is all done; False when this writer's task has to
        go on (the socket cannot be written directly now, or took only part: the rest is
        marked to go out first, or more is queued than one write takes)."""
        if self.busy or not self.sock.direct_ready():
            return False
        message = self.outbox.get_nowait()
        if message is None:
            return True
        if message is _CLOSE or message is _REST:  # the writer's own business
            self._put_back(message)
            return False
        if not self.sock.send_now(self._one_write(message)):
            self._put_back(_REST)
            return False
        return not self.outbox.queued

    def _one_write(self, message: Outgoing) -> list[Outgoing]:
        """``message`` and what is ready behind it, for one write: coalesced into one
        ``batch`` for a batching client, else as :meth:`_following` takes it; with a probe
        after them when they carried bulk and one is due (``mux.downlink``)."""
        if self.batching and isinstance(message, str):
            out: list[Outgoing] = [self._coalesce(message)]
        else:
            out = [message, *self._following(len(message))]
        if self.outbox.bulk_taken:
            self._probe(out)
        return out

    def _probe(self, out: list[Outgoing]) -> None:
        """The write ``out`` carried bulk: count it in the window, add the probe due, and
        hold the bulk behind it back while the window is full."""
        outbox = self.outbox
        taken, outbox.bulk_taken = outbox.bulk_taken, 0
        probes = self.probes()
        if probes is None:
            return
        probe = probes.wrote(taken, trio.current_time(), outbox.bulk_queued)
        if probe is not None:
            out.append(probe)
        if not probes.open:
            outbox.hold_bulk(True)

    def _coalesce(self, first: str) -> str:
        """``first`` plus whatever JSON is ready next (in urgency order), as one flat batch
        (the items of a ``batch`` reply are spliced in, never nested)."""
        items = [_unbatch(first)]
        size = len(first)
        while size < 65536 and len(items) < 128:
            nxt = self.outbox.get_nowait()
            if nxt is None:
                break
            if nxt is _CLOSE or nxt is _REST:  # the writer's markers go back
                self._put_back(nxt)
                break
            if isinstance(nxt, bytes):  # binary keeps its own message: put it back in front
                self.outbox.put_nowait(_AGAIN_KEY, _FIRST_URGENCY + 1, nxt)
                break
            items.append(_unbatch(nxt))
            size += len(nxt)
        if len(items) == 1:
            return first
        return wire.batch_event([item for item in items if item])

    async def run(self) -> None:
        """Send each message; a client that takes none for ``send_timeout_s`` is dropped
        (slow consumer): nothing queues past the outbox bounds meanwhile. Ends when the
        outbox retires it (idle; ``Outbox.retire``): the next message starts it again."""
        while (message := await self.outbox.get()) is not None and await self._write(message):
            del message  # nothing written stays referenced while we wait

    async def _write(self, message: Outgoing) -> bool:
        """Write ``message`` and whatever is ready behind it; False after the shutdown marker."""
        if message is _CLOSE:  # the node shuts down: everything before this was sent
            await self.sock.close(1001, "node shutting down")
            self.connection.cancel()
            return False
        self.busy, self.since = True, trio.current_time()
        if message is _REST:  # what the socket did not take of a direct write
            await self.sock.send_many(())
        else:
            await self.sock.send_many(self._one_write(message))
        self.busy = False
        return True

    def _following(self, size: int) -> list[Outgoing]:
        """The messages ready after one of ``size`` characters, in order, while all of them
        together stay within ``WRITE_BYTES`` (one write; a voice frame waits for at most that
        much, as for one ``frame_part``), or ``BULK_WRITE_BYTES`` with no call held."""
        out: list[Outgoing] = []
        most = WRITE_BYTES if self.holds_realtime() else BULK_WRITE_BYTES
        while len(out) < WRITE_MESSAGES:
            nxt = self.outbox.get_nowait(limit=most - size)
            if nxt is None:
                break
            if nxt is _CLOSE or nxt is _REST:  # the writer's markers go back
                self._put_back(nxt)
                break
            out.append(nxt)
            size += len(nxt)
        return out

    def _put_back(self, marker: str) -> None:
        """Queue a marker (again, when taken out of turn): the shutdown's last, the rest's first."""
        if marker is _CLOSE:
            self.outbox.put_nowait(_CLOSE_KEY, _LAST_URGENCY, marker)
        else:
            self.outbox.put_nowait(_REST_KEY, _FIRST_URGENCY, marker)

    def stalled(self, now: float) -> bool:
        """True when a send has not completed for ``send_timeout_s`` (a slow consumer)."""
        return self.busy and now - self.since > self.send_timeout_s

    def close_when_sent(self) -> None:
        """At shutdown: close the socket (1001) once everything queued before now is sent
        (bulk held back by the probes' window too: it goes now)."""
        self.outbox.end_bulk()
        self._put_back(_CLOSE)
