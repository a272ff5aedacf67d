"""A client that never reads cannot make the node hold a flood: bounded memory, then dropped.

How this works: a real node runs as a subprocess (``python -m mux serve --open --config``
with ``send_timeout_s = 3.0`` and no per-connection rate limit, so the whole flood reaches
the receiver's bounds). In each round a "stuck" agent completes the WebSocket handshake over
a TCP socket with a tiny receive buffer and then never reads (trio-websocket's reader stops
once its one-message queue is full, so the kernel buffers fill). A flooding agent opens a
``stream`` channel to it and sends 16 KiB binary frames as fast as the node takes them,
counting ``receiver_full`` refusals and carrying on, until the node drops the stuck agent
(``/status`` no longer lists it), for at most ``FLOOD_S`` seconds or ``FLOOD_MAX`` frames.
The next round reconnects the same agent name; there are ``MIN_ROUNDS`` to ``MAX_ROUNDS``
rounds, until more than twice ``RSS_BOUND_MIB`` has reached the receiver. Meanwhile the
node's RSS is sampled from ``/proc/PID/status`` every 0.25 s.

What must hold: the node's RSS grows by less than ``RSS_BOUND_MIB`` over its baseline while
more than twice that reached the stuck receivers (what the node may queue for one receiver
is its inbox, 256 frames, and its outbox queue, 64 messages: unbounded, it would have held
all of it); each stuck agent is dropped within ``send_timeout_s`` plus a margin and its
channel closes with ``slow_consumer``; the node then serves normal requests, and it still
stops cleanly on SIGTERM while a stuck TCP connection is open and unread. The figures (RSS
baseline, peak and end, time to drop) are printed (``pytest -s``). A second test checks that
the dropped client's TCP connection is closed as well (counted in ``/proc/PID/fd``), a third,
in process, with tracemalloc, that a receiver that left takes its queued frames with it, and a
fourth that a slow ``?batch=1`` reader gets flat ``batch`` events (never a batch in a batch).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from mux.client import open_ws
from mux.server import ServeInfo
from mux.wire import pack_binary, unpack_binary

from .procs import NodeProcess, node_process

__all__: list[str] = []

SEND_TIMEOUT_S = 3.0
MIN_ROUNDS = 2
MAX_ROUNDS = 4
FLOOD_S = 8.0
FLOOD_MAX = 40_000
PAYLOAD = os.urandom(16 << 10)
RSS_BOUND_MIB = 48
"""Allowed RSS growth over the baseline. Measured on a 2-core box: 10-23 MiB after two rounds,
up to 30 MiB after four (the receiver's inbox of 256 x 16 KiB and its outbox queue of 64
while it is attached, SQLite's cache, allocator high-water marks that grow with the flood
rate), while 30-120 MiB reach the receiver in each round. Rounds go on (up to
``MAX_ROUNDS``) until more than twice the bound has reached the receiver."""
RECEIVERS = 10
LEAK_BOUND_MIB = 8
"""Python memory allowed to remain after ``RECEIVERS`` more receivers left with full inboxes:
each inbox held 256 x 16 KiB = 4 MiB, which must not stay behind with its closed channel
(kept, 10 x 4 MiB = 40 MiB remain; the last one may linger in a traceback for a moment)."""


def rss_kib(pid: int) -> int:
    """The process's resident set size (VmRSS) in KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@attrs.define
class Round:
    """One flood at one stuck connection, as the flooder saw it."""

    channel_id: str
    started: float
    sent: int = 0
    acked: int = 0
    receiver_full: int = 0
    other_errors: dict[str, int] = attrs.field(factory=dict)
    closed_reason: str | None = None
    dropped_after_s: float | None = None
    dropped: trio.Event = attrs.field(factory=trio.Event)
    closed: trio.Event = attrs.field(factory=trio.Event)
    settled_rss_kib: int = 0
    """The node's RSS once the stuck connection and its channel are gone."""

    @property
    def reached_receiver_mib(self) -> float:
        """MiB of frames that got as far as the receiver's bound (taken or refused as full)."""
        return (self.acked + self.receiver_full) * len(PAYLOAD) / 2**20


@attrs.define(eq=False)
class Flooder:
    """The flooding agent's connection and a task reading it."""

    ws: WebSocketConnection
    current: Round | None = None
    opened: list[dict[str, Any]] = attrs.field(factory=list)
    answered: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    pong: trio.Event = attrs.field(factory=trio.Event)

    async def read(self) -> None:
        """Count the answers for the current round; note its channel's close."""
        try:
            while True:
                raw = await self.ws.get_message()
                msg: dict[str, Any] = unpack_binary(raw)[0] if isinstance(raw, bytes) else orjson.loads(raw)
                r = self.current
                if msg.get("event") == "channel_opened":
                    self.opened.append(msg)
                    self.answered.unpark_all()
                elif msg.get("event") == "pong":
                    self.pong.set()
                elif r is None:
                    continue
                elif msg.get("event") == "frame_ack":
                    r.acked += 1
                elif msg.get("error") == "receiver_full":
                    r.receiver_full += 1
                elif "error" in msg:
                    r.other_errors[msg["error"]] = r.other_errors.get(msg["error"], 0) + 1
                elif msg.get("event") == "channel_closed" and msg["channel_id"] == r.channel_id:
                    r.closed_reason = msg["reason"]
                    r.closed.set()
        except ConnectionClosed:
            pass

    async def open(self, target: str) -> str:
        """Open a stream channel to ``target``; its id."""
        before = len(self.opened)
        await self.ws.send_message(orjson.dumps({"action": "open", "target": target, "intent": "stream"}).decode())
        with trio.fail_after(10):
            while len(self.opened) == before:
                await self.answered.park()
        channel_id: str = self.opened[-1]["channel_id"]
        return channel_id


@asynccontextmanager
async def stuck_client(url: str, agent: str, query: str = "") -> AsyncIterator[WebSocketConnection]:
    """A WebSocket whose TCP receive buffer is tiny and whose messages are not read (unless
    the test calls ``get_message``); ``query`` is appended to the URL (``&batch=1``)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stream: trio.SocketStream | None = None
    try:
        with trio.fail_after(10):
            await sock.connect((host, int(port)))
        stream = trio.SocketStream(sock)
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery, stream, f"{host}:{port}", f"/api/mux/ws?agent={agent}{query}", message_queue_size=1
            )
            try:
                yield ws
            finally:  # no await here: a Cancelled raised in this scope would eat the body's error
                nursery.cancel_scope.cancel()  # its reader task is parked on a full queue
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        else:
            sock.close()


async def _attached(rest: httpx.AsyncClient) -> list[str]:
    agents: list[str] = (await rest.get("/status")).json()["agents_attached"]
    return agents


async def _watch_drop(rest: httpx.AsyncClient, agent: str, r: Round) -> None:
    """Poll ``/status`` until ``agent`` is no longer attached; note when."""
    while agent in await _attached(rest):  # noqa: ASYNC110  (an HTTP poll)
        await trio.sleep(0.1)
    r.dropped_after_s = trio.current_time() - r.started
    r.dropped.set()


async def _sample(pid: int, samples: list[int], stop: trio.Event) -> None:
    while not stop.is_set():
        samples.append(rss_kib(pid))
        with trio.move_on_after(0.25):
            await stop.wait()


async def _flood_round(
    node_url: str, rest: httpx.AsyncClient, flooder: Flooder, nursery: trio.Nursery
) -> tuple[Round, float]:
    """Connect a stuck agent, flood it until the node drops it; the round and its length."""
    async with stuck_client(node_url, "stuck"):
        with trio.fail_after(10):
            while "stuck" not in await _attached(rest):  # noqa: ASYNC110  (an HTTP poll)
                await trio.sleep(0.05)
        r = flooder.current = Round(await flooder.open("stuck"), trio.current_time())
        nursery.start_soon(_watch_drop, rest, "stuck", r)
        message = pack_binary({"action": "send", "channel_id": r.channel_id}, PAYLOAD)
        with trio.move_on_after(FLOOD_S):
            while r.sent < FLOOD_MAX and not r.dropped.is_set():
                await flooder.ws.send_message(message)
                r.sent += 1
        length = trio.current_time() - r.started
        with trio.move_on_after(SEND_TIMEOUT_S + 5):
            await r.dropped.wait()
        assert r.dropped.is_set(), f"the stuck client is still attached {SEND_TIMEOUT_S + 5} s after: {r}"
        with trio.fail_after(10):
            await r.closed.wait()  # it comes after the flooder's own queue of answers
    await trio.sleep(0.5)
    return r, length


@asynccontextmanager
async def flooded_node(tmp_path: Path) -> AsyncIterator[tuple[NodeProcess, httpx.AsyncClient, Flooder, trio.Nursery]]:
    """A node subprocess with a short ``send_timeout_s``, a REST client, and the connected
    flooder (its reader running) in a nursery cancelled at the end."""
    config = tmp_path / "node.toml"
    config.write_text(f"send_timeout_s = {SEND_TIMEOUT_S}\ngraceful_timeout_s = 1.0\nrate_messages_per_s = 0\n")
    async with node_process(tmp_path / "data", "--config", str(config), log=tmp_path / "node.log") as node:
        async with (
            httpx.AsyncClient(base_url=node.url + "/api/mux", timeout=10) as rest,
            open_ws(node.url.replace("http", "ws", 1) + "/api/mux/ws?agent=flooder") as ws,
            trio.open_nursery() as nursery,
        ):
            with trio.fail_after(10):
                assert orjson.loads(await ws.get_message())["event"] == "connected"
            flooder = Flooder(ws)
            nursery.start_soon(flooder.read)
            yield node, rest, flooder, nursery
            nursery.cancel_scope.cancel()


async def test_a_client_that_never_reads_is_dropped_and_memory_stays_bounded(tmp_path: Path) -> None:
    async with flooded_node(tmp_path) as (node, rest, flooder, nursery):
        pid = node.process.pid
        samples: list[int] = []
        for _ in range(4):
            samples.append(rss_kib(pid))
            await trio.sleep(0.25)
        baseline = statistics.median(samples)
        stop_sampling = trio.Event()
        nursery.start_soon(_sample, pid, samples, stop_sampling)

        rounds: list[tuple[Round, float]] = []
        reached = 0.0
        while len(rounds) < MIN_ROUNDS or (reached <= 2 * RSS_BOUND_MIB and len(rounds) < MAX_ROUNDS):
            r, length = await _flood_round(node.url, rest, flooder, nursery)
            r.settled_rss_kib = rss_kib(pid)
            rounds.append((r, length))
            reached += r.reached_receiver_mib
        await trio.sleep(1.0)  # one more second of samples after the last drop
        stop_sampling.set()
        end = rss_kib(pid)
        peak = max(samples)
        print("\nslow reader:")
        for i, (r, length) in enumerate(rounds):
            print(
                f"  round {i}: {r.sent} x 16 KiB in {length:.1f} s: {r.acked} acked, {r.receiver_full} "
                f"receiver_full ({r.reached_receiver_mib:.0f} MiB reached the receiver's bound), other errors "
                f"{r.other_errors}; stuck client dropped {r.dropped_after_s:.2f} s after the flood began "
                f"(send_timeout_s={SEND_TIMEOUT_S}), its channel closed: {r.closed_reason}; "
                f"node RSS after it {r.settled_rss_kib / 1024:.1f} MiB"
            )
        print(
            f"  node RSS baseline {baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB "
            f"(+{(peak - baseline) / 1024:.1f}), end {end / 1024:.1f} MiB; {len(samples)} samples"
        )
        for r, _ in rounds:
            assert r.closed_reason == "slow_consumer", r
            assert r.dropped_after_s is not None and r.dropped_after_s <= SEND_TIMEOUT_S + 3.0, r
            assert r.receiver_full > 0, r  # the receiver's bound was reached
        # unbounded, the node would have kept everything that reached the receiver
        assert reached > 2 * RSS_BOUND_MIB, f"only {reached:.0f} MiB reached the receiver: {rounds}"
        assert (peak - baseline) / 1024 < RSS_BOUND_MIB, [s // 1024 for s in samples]

        status = (await rest.get("/status")).json()
        assert status["channels_open"] == 0 and status["agents_attached"] == ["flooder"], status
        resp = await rest.post("/open", json={"agent": "after", "target": "someone"})
        assert resp.status_code == 200, resp.text
        assert (await rest.post("/close", json={"channel_id": resp.json()["channel_id"]})).status_code == 200
        await flooder.ws.send_message('{"action":"ping","ref":"alive"}')
        with trio.fail_after(5):
            await flooder.pong.wait()  # the flooder's own connection carries on
        assert node.process.returncode is None, "the node died"

        async with stuck_client(node.url, "stuck-at-shutdown"):
            with trio.fail_after(10):
                while "stuck-at-shutdown" not in await _attached(rest):  # noqa: ASYNC110  (an HTTP poll)
                    await trio.sleep(0.05)
            channel_id = await flooder.open("stuck-at-shutdown")
            message = pack_binary({"action": "send", "channel_id": channel_id}, PAYLOAD)
            for _ in range(400):  # fill its socket: the node's writes to it block
                await flooder.ws.send_message(message)
            await trio.sleep(0.5)
            node.terminate()  # a connection that is open and unread must not stall shutdown
            with trio.fail_after(10):
                await node.process.wait()
        assert node.process.returncode == 0


def open_sockets(pid: int) -> int:
    """How many sockets the process holds open (from ``/proc/PID/fd``)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


async def test_a_dropped_slow_consumer_leaves_no_connection_behind(tmp_path: Path) -> None:
    """After the node drops a client that never reads, the TCP connection goes too: Hypercorn
    shields socket writes, so without help from the kernel (``TCP_USER_TIMEOUT``) the write
    to a zero window, its socket and buffers would stay until the client leaves, and no
    longer count toward ``max_connections``."""
    async with flooded_node(tmp_path) as (node, rest, flooder, _):
        pid = node.process.pid
        assert "flooder" in await _attached(rest)  # every connection of the test is up
        before = open_sockets(pid)
        async with stuck_client(node.url, "stuck"):
            with trio.fail_after(10):
                while "stuck" not in await _attached(rest):  # noqa: ASYNC110  (an HTTP poll)
                    await trio.sleep(0.05)
            message = pack_binary({"action": "send", "channel_id": await flooder.open("stuck")}, PAYLOAD)
            for _ in range(600):  # fill its socket: the node's writes to it block
                await flooder.ws.send_message(message)
            with trio.fail_after(SEND_TIMEOUT_S + 5):
                while "stuck" in await _attached(rest):  # noqa: ASYNC110  (an HTTP poll)
                    await trio.sleep(0.1)
            with trio.move_on_after(2 * SEND_TIMEOUT_S + 3):  # the kernel may take up to twice as long
                while open_sockets(pid) > before:  # noqa: ASYNC110  (a /proc poll)
                    await trio.sleep(0.1)
            left = open_sockets(pid) - before
            assert left <= 0, f"{left} socket(s) of the dropped client still open in the node"
    logged = (tmp_path / "node.log").read_text()
    assert re.search(r"stuck disconnected after [\d.]+ s \(ended by the node\)", logged), logged[-2000:]


async def test_a_receiver_that_left_leaves_no_frames_behind(nursery: trio.Nursery) -> None:
    """In process, measured with tracemalloc: a receiver whose inbox is full (it never read)
    leaves (as a dropped WebSocket does: ``close_all`` then detach); its closed channel is
    kept for lookups, but the frames queued for it must go (else each dropped slow consumer
    would pin 4 MiB until 1024 more channels closed). The ledger keeps one frame per chain
    here, so that only the channels themselves could hold frames."""
    import gc
    import tracemalloc

    from mux.core import MuxConfig, start_mux
    from mux.errors import ChannelFull
    from mux.signing import NodeKey
    from mux.storage import MemoryStore

    store = MemoryStore(max_frames_per_channel=1)
    m = await start_mux(nursery, agent="node", key=NodeKey.generate(), config=MuxConfig(), store=store)
    async with m.attach("sender") as sender:

        async def one_receiver(i: int) -> str:
            async with m.attach(f"stuck-{i}"):
                ch = await sender.open(f"stuck-{i}", "stream")
                for n in range(10_000):
                    try:  # a payload of its own, as each frame read from a socket has
                        ch.post_nowait(PAYLOAD[:-8] + n.to_bytes(8, "big"))
                    except ChannelFull:
                        break
            return ch.id

        await one_receiver(-1)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            channels = [await one_receiver(i) for i in range(RECEIVERS)]
            gc.collect()
            kept = (tracemalloc.get_traced_memory()[0] - before) / 2**20
        finally:
            tracemalloc.stop()
        assert all(not m.channel_state(c).is_open for c in channels)
    await m.aclose()
    print(f"\n{RECEIVERS} receivers left with full inboxes: {kept:.1f} MiB of Python memory kept")
    assert kept < LEAK_BOUND_MIB, f"{kept:.1f} MiB kept after {RECEIVERS} receivers left"


async def test_a_slow_batching_reader_gets_flat_batches(server: ServeInfo) -> None:
    """With ``?batch=1`` the node coalesces what is ready into one ``batch`` event; the
    answers to ``batch`` actions queued behind a slow reader must be spliced in, not nested
    (a batch inside a batch, which clients that expand one level lose)."""
    async with stuck_client(server.url, "batcher", "&batch=1") as ws:
        for i in range(200):
            pings = ",".join(f'{{"action":"ping","ref":{i * 4 + k}}}' for k in range(4))
            await ws.send_message(f'{{"action":"batch","items":[{pings}]}}')
        await trio.sleep(0.5)  # the answers queue up behind the unread socket
        refs: list[int] = []
        with trio.fail_after(10):
            while len(refs) < 800:
                msg: dict[str, Any] = orjson.loads(await ws.get_message())
                items: list[dict[str, Any]] = msg["items"] if msg.get("event") == "batch" else [msg]
                nested = [item for item in items if item.get("event") == "batch"]
                assert not nested, f"a batch inside a batch: {str(nested[0])[:200]}"
                refs += [item["ref"] for item in items if item.get("event") == "pong"]
        assert refs == list(range(800))
