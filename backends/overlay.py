"""The overlay backend (``vpn:tunnel``): TCP forwarding through a channel, like SSH direct-tcpip.

How this works: a client opens a ``vpn:tunnel`` channel whose target is the node's own agent
(``Mux.agent``) with metadata ``{"host": HOST, "port": PORT}``. ``check_open`` refuses it
(``tunnel_denied``) unless the node's allow-list (``MuxConfig.backends["overlay"]["allow"]``,
``"HOST:PORT"`` strings, ``PORT`` may be ``*``; empty or absent = deny everything) names that
destination. The channel's task (``run``) connects to the destination (``connect_timeout``;
failure closes only this channel with ``destination_unreachable``) and relays both ways:

- client -> destination: binary frames from the opener are taken by ``on_frame`` (returns
  ``Disposition.CONSUMED``) and queued on a bounded trio memory channel that a writer task
  drains onto the TCP stream. A JSON frame ``{"eof": true}`` is queued too and becomes
  ``send_eof`` (half-close) once the bytes before it are written. ``admit`` is the flow
  control: when ``buffer_bytes`` (or ``buffer_frames``) are queued and not yet written, it
  refuses the next frame with ``ChannelFull`` (wire code ``receiver_full``, nothing chained,
  ``wait_room`` set for in-process senders) so the sender waits and retries. The node thus
  holds at most ``buffer_bytes`` + one frame per tunnel in this direction.
- destination -> client: the reader reads up to ``read_bytes`` at a time and sends each chunk
  as a binary frame with ``ChannelContext.send`` (waits while the opener's inbox is full:
  never drops). On TCP EOF it sends ``{"eof": true}``.

When both directions have ended the channel is closed with reason ``tunnel_closed``; a reset
destination closes it with ``destination_reset``. Counters (``destination``, ``bytes_in``
client->destination, ``bytes_out`` destination->client, ``queued_bytes``, ``queued_peak``,
``refused_full``, ...) live in ``ctx.state.extra`` (``backend_state`` of the channel info).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import trio

from mux.errors import BadRequest, ChannelClosed, ChannelError, ChannelForbidden, ChannelFull

from .base import Disposition

if TYPE_CHECKING:
    from mux.channel import ChannelContext
    from mux.frames import Frame

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "DEFAULT_BUFFER_FRAMES",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_READ_BYTES",
    "OverlayBackend",
    "parse_hostport",
    "tunnel_allowed",
]

DEFAULT_BUFFER_BYTES = 256 << 10
"""Client->destination bytes a tunnel queues at the node before ``admit`` refuses frames."""
DEFAULT_BUFFER_FRAMES = 64
"""Client->destination frames a tunnel queues at the node before ``admit`` refuses frames."""
DEFAULT_READ_BYTES = 16 << 10
"""Largest chunk read from the destination per frame sent to the client."""
DEFAULT_CONNECT_TIMEOUT_S = 10.0
"""How long connecting to the destination may take."""

_EOF: None = None
"""The queue item that stands for the client's half-close."""


def parse_hostport(spec: str) -> tuple[str, str]:
    """Split ``"HOST:PORT"`` (``"[v6]:PORT"`` for IPv6) into lower-cased host and port text.

    Raises ``ValueError`` when there is no ``:`` or either part is empty.
    """
    host, sep, port = spec.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port:
        raise ValueError(f"expected HOST:PORT, got {spec!r}")
    return host.lower(), port.strip()


def tunnel_allowed(allow: Any, host: str, port: int) -> bool:
    """True when an allow-list entry (``"HOST:PORT"``, ``PORT`` may be ``*``) permits
    ``host:port``. Hosts compare literally (case-insensitive): ``localhost`` does not match
    ``127.0.0.1``. A missing, empty or malformed list permits nothing."""
    if not isinstance(allow, (list, tuple)):
        return False
    host = host.lower()
    for entry in allow:
        if not isinstance(entry, str):
            continue
        try:
            a_host, a_port = parse_hostport(entry)
        except ValueError:
            continue
        if a_host == host and (a_port == "*" or a_port == str(port)):
            return True
    return False


def _positive(options: dict[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return default
    return value


@attrs.define(eq=False)
class _Tunnel:
    """Node-side state of one tunnel channel."""

    host: str
    port: int
    limit_bytes: int
    limit_frames: int
    send: trio.MemorySendChannel[bytes | None]
    recv: trio.MemoryReceiveChannel[bytes | None]
    room: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    queued_bytes: int = 0
    """Bytes taken from the client and not yet written to the destination (incl. in flight)."""
    queued_frames: int = 0
    client_eof: bool = False


class OverlayBackend:
    """TCP forwarding to allow-listed destinations; the node is the tunnel's far end."""

    name = "overlay"

    def __init__(self, mux: Any) -> None:
        self.mux = mux
        self._tunnels: dict[str, _Tunnel] = {}

    # ---- helpers ---------------------------------------------------------------------------

    def _tunnel(self, ctx: ChannelContext) -> _Tunnel | None:
        """This channel's tunnel state, made on first use (None once the channel is closed)."""
        t = self._tunnels.get(ctx.channel_id)
        if t is None and ctx.state.is_open:
            opts = ctx.options()
            frames = int(_positive(opts, "buffer_frames", DEFAULT_BUFFER_FRAMES))
            send, recv = trio.open_memory_channel[bytes | None](frames + 1)
            t = _Tunnel(
                host=str(ctx.metadata["host"]),
                port=int(ctx.metadata["port"]),
                limit_bytes=int(_positive(opts, "buffer_bytes", DEFAULT_BUFFER_BYTES)),
                limit_frames=frames,
                send=send,
                recv=recv,
            )
            self._tunnels[ctx.channel_id] = t
        return t

    # ---- the Backend protocol --------------------------------------------------------------

    def check_open(self, ctx: ChannelContext) -> None:
        """Refuse unless the target is the node, the metadata names a destination and the
        node's allow-list permits it (``tunnel_denied``)."""
        node = ctx.mux.agent
        if ctx.target != node:
            raise BadRequest(f"a vpn:tunnel channel is opened to the node ({node!r})", code="bad_target")
        host, port = ctx.metadata.get("host"), ctx.metadata.get("port")
        if not isinstance(host, str) or not host or len(host) > 253:
            raise BadRequest("vpn:tunnel metadata needs host (a string)", code="bad_metadata")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise BadRequest("vpn:tunnel metadata needs port (an integer 1-65535)", code="bad_metadata")
        if not tunnel_allowed(ctx.options().get("allow"), host, port):
            raise ChannelError(f"the node's allow-list does not permit {host}:{port}", code="tunnel_denied")
        ctx.state.extra.update(
            destination=f"{host}:{port}",
            connected=False,
            bytes_in=0,
            bytes_out=0,
            queued_bytes=0,
            queued_peak=0,
            refused_full=0,
            eof_in=False,
            eof_out=False,
        )

    async def run(self, ctx: ChannelContext) -> None:
        """Connect to the destination, relay both ways, close with ``tunnel_closed``."""
        t = self._tunnel(ctx)
        if t is None:
            return
        timeout = _positive(ctx.options(), "connect_timeout", DEFAULT_CONNECT_TIMEOUT_S)
        read_bytes = int(_positive(ctx.options(), "read_bytes", DEFAULT_READ_BYTES))
        extra = ctx.state.extra
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_tcp_stream(t.host, t.port)
        except (OSError, trio.TooSlowError) as exc:
            why = "timed out" if isinstance(exc, trio.TooSlowError) else (exc.strerror or str(exc))
            raise ChannelError(f"cannot connect to {t.host}:{t.port}: {why}", code="destination_unreachable") from None
        extra["connected"] = True
        failure: list[ChannelError] = []

        async def writer() -> None:
            async for item in t.recv:
                if item is _EOF:
                    await stream.send_eof()
                    extra["eof_in"] = True
                    return
                await stream.send_all(item)
                t.queued_bytes -= len(item)
                t.queued_frames -= 1
                extra["bytes_in"] += len(item)
                extra["queued_bytes"] = t.queued_bytes
                t.room.unpark_all()

        async def reader() -> None:
            while True:
                data = await stream.receive_some(read_bytes)
                if not data:
                    await ctx.send({"eof": True}, to=ctx.agent)
                    extra["eof_out"] = True
                    return
                await ctx.send(data, to=ctx.agent)
                extra["bytes_out"] += len(data)

        async def guarded(fn: Any, nursery: trio.Nursery) -> None:
            try:
                await fn()
            except ChannelClosed:
                nursery.cancel_scope.cancel()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                failure.append(ChannelError(f"{t.host}:{t.port}: {exc}", code="destination_reset"))
                nursery.cancel_scope.cancel()

        async with stream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guarded, writer, nursery)
                nursery.start_soon(guarded, reader, nursery)
        if failure:
            raise failure[0]
        if ctx.state.is_open:
            await ctx.close("tunnel_closed")

    def admit(self, ctx: ChannelContext, sender: str, size: int) -> None:
        """Only the opener sends; refuse with ``ChannelFull`` while the queue toward the
        destination is at ``buffer_bytes``/``buffer_frames`` (the tunnel's flow control)."""
        if sender != ctx.agent:
            raise ChannelForbidden("only the opener sends on a tunnel", channel_id=ctx.channel_id)
        t = self._tunnel(ctx)
        if t is None:
            raise ChannelClosed("tunnel is closed", channel_id=ctx.channel_id)
        if t.client_eof:
            raise BadRequest("the tunnel was half-closed (eof): no more data", code="bad_payload")
        if t.queued_frames >= t.limit_frames or (t.queued_bytes and t.queued_bytes + size > t.limit_bytes):
            ctx.state.extra["refused_full"] += 1
            raise ChannelFull(
                f"tunnel buffer full ({t.queued_bytes} bytes queued toward {t.host}:{t.port})",
                channel_id=ctx.channel_id,
                wait_room=t.room.park,
            )

    def on_frame(self, ctx: ChannelContext, frame: Frame) -> Disposition:
        """Queue the bytes (or the half-close) for the writer; the frame is consumed."""
        t = self._tunnel(ctx)
        if t is None:
            return Disposition.DROPPED
        payload = frame.payload
        extra = ctx.state.extra
        if isinstance(payload, bytes):
            if payload:
                t.send.send_nowait(payload)
                t.queued_bytes += len(payload)
                t.queued_frames += 1
                extra["queued_bytes"] = t.queued_bytes
                extra["queued_peak"] = max(extra["queued_peak"], t.queued_bytes)
        elif isinstance(payload, dict) and payload.get("eof") is True:
            t.client_eof = True
            t.send.send_nowait(_EOF)
        else:
            extra["ignored"] = extra.get("ignored", 0) + 1
        return Disposition.CONSUMED

    def on_close(self, ctx: ChannelContext, reason: str) -> None:
        """Forget the tunnel; its task (and TCP stream) is cancelled by the core."""
        t = self._tunnels.pop(ctx.channel_id, None)
        if t is not None:
            t.send.close()
            t.room.unpark_all()
