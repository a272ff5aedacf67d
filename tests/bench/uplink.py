"""Voice beside large uploads on the same ``mux.client`` connection, through a slow uplink.

Run: ``python -m tests.bench uplink`` (part of ``nox -s bench``).

A node reads a WebSocket message whole before the one behind it, so a call's frame sent
after a large payload waits for all of it to cross the client's uplink; ``mux.client``
sends such payloads in 16 KiB pieces while it holds a call (``mux.pieces``), and the call's
frames go between them. On loopback an upload crosses at once, so the caller's connection
goes through :class:`SlowUplink`, a loopback TCP proxy that passes the client's bytes on at
``UPLINK_BYTES_S`` (4 MB/s, a good phone uplink), its receive buffer kept small
(``UPLINK_BUFFER``) as a slow link's is; the node's answers come back at full speed.

Each block: the caller (``mux.client``) opens a ``call:voice`` channel to the callee
(offer, answer) and sends ``VOICE_FRAMES`` 200-byte media frames, one every 20 ms, each
carrying its send time (``time.perf_counter_ns``); the callee's reader takes the latency.
Phases: ``alone``; ``pieces``, while another task of the caller uploads ``UPLOAD_BYTES``
(512 KiB) payloads on a ``stream`` channel to the callee, one after another, as
``mux.client`` does by default (the node confirms each piece and the client keeps the
pieces in flight within a delay-based window: ``mux.uplink``); ``unwindowed``, the same
pieces without confirmations or window (``part_acks = False``, as against a node that does
not confirm pieces); ``whole``, the same uploads with pieces turned off (``send_parts = 0``,
as against a node that does not take pieces). Blocks run ``ROUNDS``
times, interleaved; the rows pool them and give p50/p99, the p99 over ``alone``'s, and the
payloads uploaded.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import attrs
import trio

from mux.client import ClientChannel, MuxConnection, connect
from mux.errors import MuxError

from .common import fmt_ms, node_process, percentile

__all__ = ["SlowUplink", "call_rows", "loopback_listener", "proxy_each", "pump_both", "run", "timed_call"]

UPLINK_BYTES_S = 4_000_000
UPLINK_BUFFER = 32 << 10
UPLOAD_BYTES = 512 << 10
VOICE_FRAMES = 100
ROUNDS = 2
PHASES = ("alone", "pieces", "unwindowed", "whole")
WARMUP_S = 0.5
LATE_S = 0.002
"""How late the proxy's wake-ups may be and still be made up (trio's sleeps end up to a
millisecond or so late here)."""
"""Uploads run this long before a block's first call frame."""


@attrs.define
class SlowUplink:
    """A loopback TCP proxy to ``port`` that passes the client's bytes on at ``rate`` bytes/s
    (its receive buffer ``buffer`` bytes) and the server's back at full speed."""

    port: int
    rate: int
    buffer: int
    listen_port: int = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and proxy connections until cancelled."""
        listener = await loopback_listener(rcvbuf=self.buffer)
        self.listen_port = listener.getsockname()[1]
        task_status.started()
        await proxy_each(listener, self._proxy)

    async def _proxy(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.port)

        async def up() -> None:
            free = trio.current_time()  # when the link has sent everything before
            while data := await client.receive_some(4096):
                # each chunk leaves when the link would have sent it: a wake-up up to
                # LATE_S late is made up by the chunks after it (restarting the clock at
                # each wake-up passed only about 2.4 MB/s of a 4 MB/s link here); a link
                # idle for longer starts afresh
                free = max(free, trio.current_time() - LATE_S) + len(data) / self.rate
                await trio.sleep_until(free)
                await server.send_all(data)

        async def down() -> None:
            while data := await server.receive_some(1 << 16):
                await client.send_all(data)

        await pump_both(client, server, up, down)


async def loopback_listener(*, rcvbuf: int | None = None) -> trio.socket.SocketType:
    """A listening TCP socket on a free 127.0.0.1 port (the sockets it accepts inherit a
    receive buffer of ``rcvbuf`` bytes, when given)."""
    listener = trio.socket.socket()
    if rcvbuf is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


async def proxy_each(listener: trio.socket.SocketType, proxy: Callable[[trio.SocketStream], Awaitable[None]]) -> None:
    """Run ``proxy`` for every connection ``listener`` accepts, until cancelled; then close it."""
    with listener:
        async with trio.open_nursery() as nursery:
            while True:
                sock, _ = await listener.accept()
                nursery.start_soon(proxy, trio.SocketStream(sock))


async def pump_both(
    client: trio.SocketStream, server: trio.SocketStream, *directions: Callable[[], Awaitable[None]]
) -> None:
    """Run one proxied connection's ``directions`` until they end or either side closes
    (which ends them all), then close both sides."""
    try:
        async with trio.open_nursery() as nursery:
            for direction in directions:
                nursery.start_soon(direction)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await client.aclose()
        await server.aclose()


async def _call(caller: MuxConnection, callee: MuxConnection) -> tuple[ClientChannel, ClientChannel]:
    """A voice call set up (offer, answer), as the voice backend wants."""
    call = await caller.open(callee.agent, "call:voice")
    answering = await callee.accept()
    await call.send({"type": "offer", "sdp": "v=0"})
    await answering.receive()
    await answering.send({"type": "answer", "sdp": "v=0"})
    await call.receive()
    return call, answering


async def timed_call(call: ClientChannel, answering: ClientChannel, frames: int) -> list[float]:
    """Send ``frames`` 200-byte media frames on ``call``, one every 20 ms, each carrying its
    send time; return each one's latency (s) as ``answering`` takes it."""
    latencies: list[float] = []

    async def listen() -> None:
        while len(latencies) < frames:
            payload = (await answering.receive())["payload"]
            if isinstance(payload, bytes):
                (sent,) = struct.unpack_from(">q", payload)
                latencies.append((time.perf_counter_ns() - sent) / 1e9)

    with trio.fail_after(frames * 0.02 + 30):
        async with trio.open_nursery() as talking:
            talking.start_soon(listen)
            for _ in range(frames):
                await call.send(struct.pack(">q", time.perf_counter_ns()) + bytes(192))
                await trio.sleep(0.020)
    return latencies


async def _block(node_url: str, uplink_url: str, phase: str, tag: str) -> tuple[list[float], int]:
    """One block of ``phase``: the call frames' latencies (s) and the payloads uploaded."""
    uploaded = 0
    async with connect(uplink_url, f"up-caller{tag}") as caller, connect(node_url, f"up-callee{tag}") as callee:
        if phase == "whole":
            caller.send_parts = 0
        elif phase == "unwindowed":
            caller.part_acks = False  # pieces without confirmations: no window over them
        call, answering = await _call(caller, callee)
        bulk = await caller.open(callee.agent, "stream")
        taking = await callee.accept()

        stop = trio.Event()
        stopped = trio.Event()

        async def upload() -> None:
            nonlocal uploaded
            data = os.urandom(UPLOAD_BYTES)
            while not stop.is_set():  # ends between uploads: a message cut short would stall the close
                try:
                    await bulk.send(data)
                    uploaded += 1
                except MuxError:  # throttled or full: mux.client keeps the node's pace hints
                    await trio.sleep(0.005)
            stopped.set()

        async def drain() -> None:
            async for _ in taking:
                pass

        async with trio.open_nursery() as nursery:
            if phase != "alone":
                nursery.start_soon(upload)
                nursery.start_soon(drain)
                await trio.sleep(WARMUP_S)
            latencies = await timed_call(call, answering, VOICE_FRAMES)
            stop.set()
            if phase != "alone":
                with trio.move_on_after(5):
                    await stopped.wait()
            nursery.cancel_scope.cancel()
    return latencies, uploaded


async def _run(node_url: str) -> list[tuple[str, str]]:
    node_port = int(node_url.rsplit(":", 1)[1])
    proxy = SlowUplink(node_port, UPLINK_BYTES_S, UPLINK_BUFFER)
    pooled: dict[str, list[float]] = {phase: [] for phase in PHASES}
    uploads = dict.fromkeys(PHASES, 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        uplink_url = f"http://127.0.0.1:{proxy.listen_port}"
        for r in range(ROUNDS):
            for phase in PHASES:
                latencies, uploaded = await _block(node_url, uplink_url, phase, f"{r}{phase}")
                pooled[phase] += latencies
                uploads[phase] += uploaded
        nursery.cancel_scope.cancel()
    labels = {
        "alone": "call alone",
        "pieces": f"beside {UPLOAD_BYTES >> 10} KiB uploads, sent in pieces (mux.client's default)",
        "unwindowed": "the same, the pieces not confirmed (part_ack) nor kept within a window",
        "whole": f"beside {UPLOAD_BYTES >> 10} KiB uploads, sent whole (send_parts off)",
    }
    extras = {phase: f"{uploads[phase]} uploaded" for phase in PHASES}
    return call_rows(f"(d-up) voice through a {UPLINK_BYTES_S / 1e6:g} MB/s uplink", pooled, labels, extras)


def call_rows(
    title: str, pooled: dict[str, list[float]], labels: dict[str, str], extras: dict[str, str]
) -> list[tuple[str, str]]:
    """One row per phase of ``labels`` (phase -> label, in order, ``alone`` among them): its
    call frames' count, p50 and p99 (``pooled``), and but for ``alone`` the p99 over
    ``alone``'s and ``extras[phase]``."""
    alone = percentile(pooled["alone"], 99)
    rows = []
    for phase, label in labels.items():
        lat = pooled[phase]
        extra = "" if phase == "alone" else f"  p99 {percentile(lat, 99) / alone:.2f}x alone; {extras[phase]}"
        rows.append((f"{title}, {label}", f"{len(lat):>5} frames  {fmt_ms(lat)}{extra}"))
    return rows


def run() -> list[tuple[str, str]]:
    """Start a node, run the phases through the slow uplink, return rows."""
    with node_process() as node:
        return trio.run(_run, node.url)
