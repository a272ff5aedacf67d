"""Voice beside downloads on the same ``mux.client`` connection, through a slow, deep downlink.

Run: ``python -m tests.bench downlink`` (part of ``nox -s bench``).

The node keeps at most about one piece unsent in its socket, but what the socket has sent
may wait at the slowest link on the way to the client: a phone's downlink, whose network
keeps a deep buffer in front of it. A call's frame sent after that bulk waits behind all of
it. On loopback nothing waits, so the callee's connection goes through
:class:`SlowDownlink`, a loopback TCP proxy that takes the node's bytes as fast as they come
into a buffer of up to ``DOWNLINK_DEPTH`` (2 MiB, half a second of this link: a mobile
network's buffers are that deep) and passes them on at ``DOWNLINK_BYTES_S`` (4 MB/s); the
client's bytes go up at full speed.

Each block: a caller opens a ``call:voice`` channel to the callee (offer, answer) and sends
``VOICE_FRAMES`` 200-byte media frames, one every 20 ms, each carrying its send time; the
callee's reader takes the latency. Phases: ``alone``; ``probes``, while a third agent sends
the callee ``DOWNLOAD_BYTES`` (256 KiB) payloads on a ``stream`` channel, one after another
(the node sends each in 16 KiB ``frame_part`` pieces), the callee connected as ``mux.client``
does by default, answering the node's probes (``mux.downlink``); ``unprobed``, the same with
``probes=False`` (as a client that does not answer them). Blocks run ``ROUNDS`` times,
interleaved; the rows pool them and give p50/p99, the p99 over ``alone``'s, the payloads
downloaded (and their rate, from the first download's start to the last one's arrival) and
the deepest the proxy's buffer got.
"""

from __future__ import annotations

import collections
import os

import attrs
import trio

from mux.client import connect
from mux.errors import MuxError

from .common import node_process
from .uplink import _call, call_rows, loopback_listener, proxy_each, pump_both, timed_call

__all__ = ["SlowDownlink", "run"]

DOWNLINK_BYTES_S = 4_000_000
DOWNLINK_DEPTH = 2 << 20
DOWNLOAD_BYTES = 256 << 10
VOICE_FRAMES = 150
ROUNDS = 1
PHASES = ("alone", "probes", "unprobed")
WARMUP_S = 0.5
"""Downloads run this long before a block's first call frame."""


@attrs.define
class SlowDownlink:
    """A loopback TCP proxy to ``port`` that passes the client's bytes on at full speed and
    the server's at ``rate`` bytes/s, holding up to ``depth`` bytes of them on the way (a
    slow link's deep buffer). ``peak`` is the most it held (reset it to measure again),
    ``sent`` the bytes it passed on to the client."""

    port: int
    rate: int
    depth: int
    listen_port: int = 0
    held: int = 0
    peak: int = 0
    sent: int = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and proxy connections until cancelled."""
        listener = await loopback_listener()
        self.listen_port = listener.getsockname()[1]
        task_status.started()
        await proxy_each(listener, self._proxy)

    async def _proxy(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.port)
        queue: collections.deque[bytes] = collections.deque()
        changed = trio.lowlevel.ParkingLot()
        ended = False

        async def up() -> None:
            while data := await client.receive_some(1 << 16):
                await server.send_all(data)

        async def take() -> None:  # the node's bytes, as fast as they come, into the buffer
            nonlocal ended
            while True:
                while self.held >= self.depth:
                    await changed.park()
                data = await server.receive_some(1 << 16)
                if not data:
                    ended = True
                    changed.unpark_all()
                    return
                queue.append(data)
                self.held += len(data)
                self.peak = max(self.peak, self.held)
                changed.unpark_all()

        async def down() -> None:  # out of the buffer at the link's rate
            free = trio.current_time()  # when the link has sent everything before
            while True:
                if not queue:
                    while not queue:
                        if ended:
                            return
                        await changed.park()
                    free = max(free, trio.current_time())  # the link was idle meanwhile
                data = queue.popleft()
                if len(data) > 4096:
                    queue.appendleft(data[4096:])
                    data = data[:4096]
                # each chunk leaves when the link would have sent it: a late wake-up is made
                # up by the chunks after it, so the link keeps its rate on average
                free += len(data) / self.rate
                await trio.sleep_until(free)
                await client.send_all(data)
                self.held -= len(data)
                self.sent += len(data)
                changed.unpark_all()

        try:
            await pump_both(client, server, up, take, down)
        finally:
            self.held -= sum(map(len, queue))


async def _block(node_url: str, downlink_url: str, phase: str, tag: str) -> tuple[list[float], int, float]:
    """One block of ``phase``: the call frames' latencies (s), the payloads downloaded and
    the seconds the downloads ran."""
    downloaded = 0
    began = ended = 0.0
    async with (
        connect(node_url, f"down-caller{tag}") as caller,
        connect(downlink_url, f"down-callee{tag}", probes=phase != "unprobed") as callee,
        connect(node_url, f"down-sender{tag}") as sender,
    ):
        call, answering = await _call(caller, callee)
        bulk = await sender.open(callee.agent, "stream")
        taking = await callee.accept()

        stop = trio.Event()
        stopped = trio.Event()

        async def download() -> None:
            data = os.urandom(DOWNLOAD_BYTES)
            while not stop.is_set():
                try:
                    await bulk.send(data)
                except MuxError:  # the callee's queue is full: its pace holds the sender
                    await trio.sleep(0.005)
            stopped.set()

        async def drain() -> None:
            nonlocal downloaded, ended
            async for _ in taking:
                downloaded += 1
                ended = trio.current_time()

        async with trio.open_nursery() as nursery:
            if phase != "alone":
                began = trio.current_time()
                nursery.start_soon(download)
                nursery.start_soon(drain)
                await trio.sleep(WARMUP_S)
            latencies = await timed_call(call, answering, VOICE_FRAMES)
            stop.set()
            if phase != "alone":
                with trio.move_on_after(5):
                    await stopped.wait()
            nursery.cancel_scope.cancel()
    return latencies, downloaded, max(0.0, ended - began)


async def _run(node_url: str) -> list[tuple[str, str]]:
    node_port = int(node_url.rsplit(":", 1)[1])
    proxy = SlowDownlink(node_port, DOWNLINK_BYTES_S, DOWNLINK_DEPTH)
    pooled: dict[str, list[float]] = {phase: [] for phase in PHASES}
    downloads = dict.fromkeys(PHASES, 0)
    seconds = dict.fromkeys(PHASES, 0.0)
    peaks = dict.fromkeys(PHASES, 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        downlink_url = f"http://127.0.0.1:{proxy.listen_port}"
        for r in range(ROUNDS):
            for phase in PHASES:
                proxy.peak = proxy.held
                latencies, downloaded, took_s = await _block(node_url, downlink_url, phase, f"{r}{phase}")
                pooled[phase] += latencies
                downloads[phase] += downloaded
                seconds[phase] += took_s
                peaks[phase] = max(peaks[phase], proxy.peak)
        nursery.cancel_scope.cancel()
    labels = {
        "alone": "call alone",
        "probes": f"beside {DOWNLOAD_BYTES >> 10} KiB downloads, probes answered (mux.client's default)",
        "unprobed": "the same, probes not answered (probes=False)",
    }
    extras = {
        phase: (
            f"{downloads[phase]} downloaded,"
            f" {downloads[phase] * DOWNLOAD_BYTES / seconds[phase] / 1e6 if seconds[phase] else 0.0:.2f} MB/s;"
            f" link buffer at most {peaks[phase] >> 10} KiB"
        )
        for phase in PHASES
    }
    return call_rows(f"(d-down) voice through a {DOWNLINK_BYTES_S / 1e6:g} MB/s downlink", pooled, labels, extras)


def run() -> list[tuple[str, str]]:
    """Start a node, run the phases through the slow downlink, return rows."""
    with node_process() as node:
        return trio.run(_run, node.url)
