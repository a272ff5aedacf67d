"""Client side of ``vpn:tunnel``: forward local TCP connections through a node, one channel each.

How this works: :func:`serve_tunnel` listens on a local address (``trio.serve_listeners``)
and hands every accepted connection to :func:`forward_connection`, which opens its own
``vpn:tunnel`` channel on the given :class:`~mux.client.MuxConnection` (target = the node's
agent, metadata ``{"host", "port"}``) and relays both ways with two tasks:

- local -> node: read up to ``chunk_bytes``, send each chunk as a binary frame; on local EOF
  send ``{"eof": true}`` (half-close). A ``receiver_full`` refusal (the node's tunnel buffer
  toward the destination is full: ``backends.overlay`` flow control) is retried after a
  short, growing pause, and a ``throttled`` one (the tunnel's share of the connection's bulk
  while a call is on it) after the wait the node named (:func:`send_with_retry`); nothing is
  dropped, the local socket is simply not read meanwhile, so TCP backpressure reaches the
  local application.
- node -> local: binary frames are written to the local socket; ``{"eof": true}`` becomes
  ``send_eof``; when the channel closes (``tunnel_closed``, ``destination_unreachable``,
  ``destination_reset``, ...) the local connection is closed.

Every connection's outcome is a :class:`TunnelResult`; :class:`TunnelStats` sums them.
Many connections share the one WebSocket of ``conn``. Note that the async client reads the
socket with one task: a local application that stops reading its connection eventually stalls
the other tunnels of the same WebSocket too (per-socket head-of-line blocking).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .client import ClientChannel, MuxConnection
from .errors import BadRequest, ChannelFull, ChannelThrottled, MuxError

__all__ = [
    "CHUNK_BYTES",
    "RETRYABLE",
    "TUNNEL_INTENT",
    "TunnelListener",
    "TunnelResult",
    "TunnelStats",
    "forward_connection",
    "parse_address",
    "send_with_retry",
    "serve_tunnel",
]

TUNNEL_INTENT = "vpn:tunnel"
CHUNK_BYTES = 64 << 10
"""Largest chunk read from a local connection and sent as one frame."""
_BACKOFF_FIRST_S = 0.001
_BACKOFF_MAX_S = 0.05


def parse_address(spec: str, *, what: str = "address") -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[v6]:PORT"``) -> ``(host, port)``; raises BadRequest when malformed."""
    host, sep, port_text = spec.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not host or not 0 <= port < 65536:
        raise BadRequest(f"{what} must be HOST:PORT, got {spec!r}", code="bad_request")
    return host, port


RETRYABLE = frozenset({"receiver_full", "store_busy", "rate_limited"})
"""Error codes after which the same send is tried again (nothing was chained)."""


async def send_with_retry(ch: ClientChannel, payload: Any) -> int:
    """Send ``payload`` on ``ch``, retrying while the node answers ``throttled`` (the
    channel's budget, or its share of the connection's bulk beside a call: the channel waits
    the refusal's ``retry_after_ms`` before the next send), or, after a short, growing
    pause, ``receiver_full``/``store_busy`` (its buffer toward the receiver is full: flow
    control) or ``rate_limited``. Nothing was chained for a refused send.

    Returns how many times it had to wait. Other errors (channel closed, connection lost)
    propagate.
    """
    delay = _BACKOFF_FIRST_S
    waits = 0
    while True:
        try:
            await ch.send(payload)
            return waits
        except ChannelThrottled as exc:
            waits += 1
            if not exc.retry_after_ms:  # no wait named: pause as for a full receiver
                await trio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)
        except MuxError as exc:
            if not isinstance(exc, ChannelFull) and exc.code not in RETRYABLE:
                raise
            waits += 1
            await trio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)


@attrs.define
class TunnelResult:
    """The outcome of one forwarded connection."""

    peer: str
    """The local client's address (``host:port``)."""
    channel_id: str | None = None
    """The connection's ``vpn:tunnel`` channel (None when the open was refused)."""
    bytes_sent: int = 0
    """Bytes read from the local connection and sent to the node."""
    bytes_received: int = 0
    """Bytes received from the node and written to the local connection."""
    reason: str | None = None
    """Why it ended: the channel's close reason, or the error code of a refused open."""
    detail: str = ""
    retries: int = 0
    """How often a send waited for ``receiver_full`` (the node's flow control)."""
    started: float = attrs.field(factory=time.monotonic)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the tunnel ended normally (``tunnel_closed``)."""
        return self.reason == "tunnel_closed"

    def to_dict(self) -> dict[str, Any]:
        """JSON form (for ``--json``)."""
        return {
            "peer": self.peer,
            "channel_id": self.channel_id,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "reason": self.reason,
            "detail": self.detail,
            "retries": self.retries,
            "duration_s": round(self.duration_s, 6),
        }


@attrs.define
class TunnelStats:
    """Totals over the connections a tunnel forwarded."""

    results: list[TunnelResult] = attrs.field(factory=list)

    @property
    def connections(self) -> int:
        """Connections forwarded (or refused)."""
        return len(self.results)

    @property
    def failed(self) -> int:
        """Connections that did not end with ``tunnel_closed``."""
        return sum(1 for r in self.results if not r.ok)

    @property
    def bytes_sent(self) -> int:
        """Bytes sent to the node over all connections."""
        return sum(r.bytes_sent for r in self.results)

    @property
    def bytes_received(self) -> int:
        """Bytes received from the node over all connections."""
        return sum(r.bytes_received for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        """JSON form of the totals."""
        return {
            "connections": self.connections,
            "failed": self.failed,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }


def _peer(stream: trio.SocketStream) -> str:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)


async def forward_connection(
    conn: MuxConnection,
    stream: trio.SocketStream,
    host: str,
    port: int,
    *,
    node: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    result: TunnelResult | None = None,
) -> TunnelResult:
    """Forward one local connection to ``host:port`` through its own ``vpn:tunnel`` channel.

    Returns when both directions are done or the channel closed; the local ``stream`` is
    closed on return. Never raises for network or tunnel failures: they are in the result
    (pass ``result`` to see it fill in while running; if cancelled its reason is ``stopped``).
    """
    if result is None:
        result = TunnelResult(peer=_peer(stream))
    async with stream:
        try:
            ch = await conn.open(node or conn.node, TUNNEL_INTENT, {"host": host, "port": port})
        except MuxError as exc:
            result.reason, result.detail = exc.code, exc.detail
            result.duration_s = time.monotonic() - result.started
            return result
        result.channel_id = ch.id

        async def close_channel(reason: str) -> None:
            try:
                await ch.close(reason)
            except MuxError:
                pass

        async def up(cancel: trio.CancelScope) -> None:
            try:
                while True:
                    data = await stream.receive_some(chunk_bytes)
                    if not data:
                        result.retries += await send_with_retry(ch, {"eof": True})
                        return
                    result.retries += await send_with_retry(ch, data)
                    result.bytes_sent += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                result.reason, result.detail = "local_reset", str(exc)
                await close_channel("local_reset")
                cancel.cancel()
            except MuxError as exc:
                if ch.is_open and not conn.closed and exc.code not in ("channel_closed", "connection_closed"):
                    result.reason, result.detail = exc.code, exc.detail  # e.g. a timeout: give up on it
                    await close_channel("tunnel_error")
                # otherwise the channel or the connection is gone: ``down`` reports how

        async def down(cancel: trio.CancelScope) -> None:
            try:
                async for frame in ch:
                    payload = frame.get("payload")
                    if isinstance(payload, bytes):
                        await stream.send_all(payload)
                        result.bytes_received += len(payload)
                    elif isinstance(payload, dict) and payload.get("eof") is True:
                        await stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                result.reason, result.detail = "local_reset", str(exc)
                await close_channel("local_reset")
            else:
                if result.reason is None:
                    result.reason = ch.closed_reason
                    event = ch.closed_event or {}
                    result.detail = str(event.get("detail") or "")
            cancel.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(up, nursery.cancel_scope)
                nursery.start_soon(down, nursery.cancel_scope)
        finally:
            if result.reason is None:
                result.reason = "stopped"
            result.duration_s = time.monotonic() - result.started
    return result


@attrs.frozen
class TunnelListener:
    """What :func:`serve_tunnel` reports once listening."""

    host: str
    port: int
    stats: TunnelStats


async def serve_tunnel(
    conn: MuxConnection,
    local: tuple[str, int],
    remote: tuple[str, int],
    *,
    node: str | None = None,
    on_connection: Callable[[TunnelResult], None] | None = None,
    stats: TunnelStats | None = None,
    task_status: trio.TaskStatus[TunnelListener] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``local`` and forward every connection to ``remote`` through ``conn``.

    Runs until cancelled; use ``listener = await nursery.start(serve_tunnel, conn, local,
    remote)`` to learn the bound port (``local`` port 0 picks one) and the running stats.
    ``on_connection`` is called with each finished connection's :class:`TunnelResult`.
    """
    stats = stats if stats is not None else TunnelStats()
    listeners = await trio.open_tcp_listeners(local[1], host=local[0])
    sockname = listeners[0].socket.getsockname()
    remote_host, remote_port = remote

    async def handler(stream: trio.SocketStream) -> None:
        result = TunnelResult(peer=_peer(stream))
        stats.results.append(result)
        try:
            await forward_connection(conn, stream, remote_host, remote_port, node=node, result=result)
        finally:
            if on_connection is not None:
                on_connection(result)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(TunnelListener(str(sockname[0]), int(sockname[1]), stats))
