"""Voice latency benchmark: a call alone, and while the same connection floods bulk channels.

Run: ``python -m tests.bench voice`` (part of ``nox -s bench``).

How this works: a node subprocess and two raw WebSocket connections on loopback, the caller
(``bench-caller``) and the callee (``bench-callee``). The caller opens a ``call:voice``
channel and sends the signalling ``offer`` (``{"type":"offer","sdp":"v=0"}``); the callee
answers (``{"type":"answer","sdp":"v=0"}``), as the voice backend enforces that order. The
caller also opens two bulk channels to the callee on the same connection, as the issue's
row (d) asks: ``stream`` (the live relay, no budget of its own) and ``file:sync`` (a file
transfer: the sync backend's protocol, docs/backends.md, with its 1 MB/s budget), a transfer
of a ``SYNC_FILE_BYTES`` file the callee answers ``resume`` 0 for and never finishes.

Each phase runs as ``ROUNDS`` blocks, interleaved (alone, honouring, ignoring, alone, ...),
so all three see this VM's drifting speed alike; a phase's figures pool its blocks.
Phase 1 ("alone"): the caller sends ``VOICE_FRAMES`` media frames, one every 20 ms: binary
frames of 200 bytes whose first bytes are the frame index, the send time
(``time.perf_counter_ns``) and the phase. Phase 2: the same, while the caller floods both bulk
channels with 16 KiB binary frames (on ``file:sync`` each is a chunk after its JSON chunk
header: two frames, in order), honouring the node's hints as ``mux.client`` does (while a
call is active, acks on bulk channels carry ``window``, at most that many frames
unacknowledged, one before the first answer, otherwise ``FLOOD_WINDOW``; and ``pace_ms``,
wait that long before the next frame). Each flood block
starts with ``FLOOD_WARMUP_S`` of unreported call frames, so the flood is shaped as beside a
call in progress. Phase 3: the same flood ignoring the hints (always ``FLOOD_WINDOW`` in
flight per channel), a client that only reacts to refusals. In both, a
refused frame (``receiver_full`` or ``throttled``) frees its place and the flood backs off
``FLOOD_BACKOFF_S``, or the refusal's ``retry_after_ms`` when the node gives one, at most
0.5 s; a refused ``file:sync`` frame is sent again, with the chunk frames after it that
the node then refused as out of order (go-back-N). The callee's one reader takes everything
(voice and bulk) off its socket; a voice frame's latency is its receive time minus the send
time in its payload. The caller also times its own ``send_message`` of each voice frame:
its turn at its WebSocket behind the flood's frames, the client's part of a rise. The rows
give p50/p99 in each phase, the p99 ratios to "alone", where the slowest 1% of frames were
held up (as late at the caller's ``frame_ack``, before the node had queued them for the
callee, or only on the way out), every voice frame refused or dropped
(the targets: none refused, the connection never closed), the bulk bytes delivered, and
whether either connection or the voice channel was closed; both sockets must answer a
``ping`` at the end.
"""

from __future__ import annotations

import collections
import itertools
import struct
import time
from typing import Any

import attrs
import httpx
import orjson
import trio
import trio_websocket

from mux.client import open_ws
from mux.wire import pack_binary

from .common import Meter, Proc, events, fmt_ms, node_process, node_status, percentile, target, toward_miss
from .server import expect

__all__ = ["VoiceResult", "report", "run", "voice_run"]

VOICE_FRAMES = 900
"""Per phase: 300 in each of the ``ROUNDS`` blocks (a p99 of 900 is its 9th-worst frame)."""
VOICE_BYTES = 200
TICK_S = 0.020
FLOOD_BYTES = 16 << 10
FLOOD_WINDOW = 8
FLOOD_BACKOFF_S = 0.002
FLOOD_WARMUP_S = 0.5
FLOOD_MAX_FRAMES = 200_000
SEND_LIMIT_S = 10.0
"""The longest one flood frame's write may take (it is not cancelled with its block)."""
FLOOD_INTENTS = ("stream", "file:sync")
SYNC_FILE_BYTES = 1 << 40
"""The size the ``file:sync`` flood offers: more than any run sends (its chunks are never all sent)."""
SYNC_SHA256 = "0" * 64
"""The hash the transfer offers (and each chunk header claims): the node checks the protocol's
shape, not the bytes; the callee, which would check them, only counts them."""
ROUNDS = 3
"""Each phase runs as this many blocks, interleaved: alone, honouring, ignoring, alone, ..."""
SETTLE_S = 0.3
WARMUP = 3
"""The phase index of the call's frames sent while a flood warms up (not reported)."""
PINGS = 100
_STAMP = struct.Struct("<IqB")


@attrs.define
class Phase:
    """The voice frames of one phase."""

    sent: int = 0
    received: int = 0
    lat: list[float] = attrs.field(factory=list)
    sent_ns: dict[int, int] = attrs.field(factory=dict)
    ack_s: dict[int, float] = attrs.field(factory=dict)
    """Each frame's send -> ``frame_ack`` on the caller's socket, by index: the way in,
    without the way out (the node answers once it has handed the frame to the callee's
    queue)."""
    lat_by: dict[int, float] = attrs.field(factory=dict)
    """Each frame's latency to the callee, by index."""
    lateness: list[float] = attrs.field(factory=list)
    """How late the client's 20 ms ticker sent each frame (client-side jitter)."""
    send_s: list[float] = attrs.field(factory=list)
    """From each frame's send time (in its payload) to the caller's ``send_message`` of it
    returning: its turn at its own WebSocket, behind the flood's frames (client-side)."""
    dispositions: collections.Counter[str] = attrs.field(factory=collections.Counter)
    refused: collections.Counter[str] = attrs.field(factory=collections.Counter)
    block_ends: list[int] = attrs.field(factory=list)
    """``len(lat)`` at the end of each block: the phase's latencies block by block."""

    def blocks(self) -> list[list[float]]:
        """The latencies of each block."""
        starts = [0, *self.block_ends]
        return [self.lat[a:b] for a, b in itertools.pairwise(starts)]


@attrs.define
class Flood:
    """One bulk channel's flood."""

    intent: str
    channel_id: str = ""
    sent: int = 0
    ok: int = 0
    refused: collections.Counter[str] = attrs.field(factory=collections.Counter)
    rx_bytes: int = 0
    in_flight: int = 0
    window: int = FLOOD_WINDOW
    """Frames this flood may have unacknowledged: ``FLOOD_WINDOW``, or when the flood honours
    the hints the node's ``window`` of the last answer (1 before the first, as beside a call
    ``mux.client`` keeps)."""
    honour: bool = True
    room: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    backoff: bool = False
    retry_after_s: float = 0.0
    """The node's ``retry_after_ms`` of the last refusal (a well-behaved client waits that long)."""
    sync: SyncOrder | None = None
    """On ``file:sync``: where the transfer stands (its frames must go in order)."""


@attrs.define
class SyncOrder:
    """A ``file:sync`` flood's place in its transfer. Frame ``2i`` is chunk ``i``'s JSON header,
    ``2i + 1`` its bytes, and the node takes them only in that order: every accepted frame is
    the next it expected (a chunk's bytes carry no index), so ``acked`` accepted frames mean it
    expects frame ``acked``. A refusal makes the flood drain what it has in flight, then go on
    from there in a new epoch (refs are ``KEY:EPOCH:FRAME``); refusals of frames sent in an
    earlier epoch change nothing."""

    acked: int = 0
    """Frames the node accepted: the next frame it expects."""
    next_frame: int = 0
    epoch: int = 0
    draining: bool = True
    """Go on from ``acked`` once nothing is in flight (set by a refusal, and at a block's start)."""

    def restart(self) -> None:
        """Go on from the first frame the node has not accepted, in a new epoch."""
        self.epoch += 1
        self.next_frame = self.acked
        self.draining = False

    def answered(self, ref: str, accepted: bool) -> None:
        """Account for the answer to the frame with ``ref``."""
        if accepted:
            self.acked += 1
        elif int(ref.split(":")[1]) == self.epoch:
            self.draining = True


@attrs.define
class VoiceResult:
    """What the voice benchmark measured."""

    phases: list[Phase] = attrs.field(factory=lambda: [Phase(), Phase(), Phase(), Phase()])
    """Alone; beside a flood honouring the ``window`` hint; beside one ignoring it; and the
    call's frames during each flood's warm-up (not reported)."""
    floods: list[Flood] = attrs.field(factory=list)
    flood_runs: list[tuple[int, Flood, float]] = attrs.field(factory=list)
    """Each flood's counters per flood phase: (phase, counters, seconds)."""
    meters: dict[int, list[Meter]] = attrs.field(factory=lambda: {0: [], 1: [], 2: []})
    """The node's CPU in each block, by phase."""
    closed_connections: list[str] = attrs.field(factory=list)
    closed_channels: list[str] = attrs.field(factory=list)
    errors: collections.Counter[str] = attrs.field(factory=collections.Counter)
    alive: dict[str, bool] = attrs.field(factory=dict)
    ping_rtt: list[float] = attrs.field(factory=list)
    gc_before: dict[str, Any] = attrs.field(factory=dict)
    gc_after: dict[str, Any] = attrs.field(factory=dict)
    """The node's ``/status`` ``memory`` before and after the phases (its garbage collections)."""


async def _node_memory(node: Proc) -> dict[str, Any]:
    """The node's ``/status`` ``memory`` (heap blocks, garbage collections)."""
    verify = node.ssl_context if node.ssl_context is not None else True
    async with httpx.AsyncClient(base_url=node.url + "/api/mux", timeout=10, verify=verify) as http:
        memory = (await node_status(http)).get("memory")
    return dict(memory) if isinstance(memory, dict) else {}


async def _send_json(ws: trio_websocket.WebSocketConnection, msg: dict[str, Any]) -> None:
    await ws.send_message(orjson.dumps(msg).decode())


async def _open(
    ws: trio_websocket.WebSocketConnection, target: str, intent: str, metadata: dict[str, Any] | None = None
) -> str:
    await _send_json(ws, {"action": "open", "target": target, "intent": intent, "metadata": metadata or {}})
    return str((await expect(ws, "channel_opened"))["channel_id"])


async def voice_run(node: Proc, voice_frames: int = VOICE_FRAMES) -> VoiceResult:
    """Set up the call and the bulk channels, run both phases, return the measurements."""
    res = VoiceResult()
    async with open_ws(node.ws("bench-caller")) as caller, open_ws(node.ws("bench-callee")) as callee:
        await expect(caller, "connected")
        await expect(callee, "connected")
        for _ in range(PINGS):  # the floor: an idle round trip through the node, same spacing as voice
            t0 = time.perf_counter_ns()
            await _send_json(caller, {"action": "ping"})
            await expect(caller, "pong")
            res.ping_rtt.append((time.perf_counter_ns() - t0) / 1e9)
            await trio.sleep(TICK_S)
        voice = await _open(caller, "bench-callee", "call:voice")
        await expect(callee, "channel_opened")
        await _send_json(
            caller, {"action": "send", "channel_id": voice, "ref": "offer", "payload": {"type": "offer", "sdp": "v=0"}}
        )
        await expect(caller, "frame_ack")
        offer = await expect(callee, "frame")
        if offer.get("payload", {}).get("type") != "offer":
            raise RuntimeError(f"callee expected the offer, got {offer!r:.200}")
        await _send_json(
            callee,
            {"action": "send", "channel_id": voice, "ref": "answer", "payload": {"type": "answer", "sdp": "v=0"}},
        )
        await expect(callee, "frame_ack")
        await expect(caller, "frame")
        for intent in FLOOD_INTENTS:
            flood = Flood(intent)
            if intent == "file:sync":
                offer = {"name": "flood.bin", "size": SYNC_FILE_BYTES, "sha256": SYNC_SHA256, "chunk_size": FLOOD_BYTES}
                flood.channel_id = await _open(caller, "bench-callee", intent, offer)
                await expect(callee, "channel_opened")
                resume = {"type": "resume", "next_chunk": 0}
                await _send_json(callee, {"action": "send", "channel_id": flood.channel_id, "payload": resume})
                await expect(callee, "frame_ack")
                await expect(caller, "frame")
                flood.sync = SyncOrder()
            else:
                flood.channel_id = await _open(caller, "bench-callee", intent)
                await expect(callee, "channel_opened")
            res.floods.append(flood)
        by_id = {f.channel_id: f for f in res.floods}
        by_key = {f"f{k}": f for k, f in enumerate(res.floods)}

        async def caller_reader() -> None:
            try:
                while True:
                    for ev in events(await caller.get_message()):
                        ref = ev.get("ref")
                        name = ev.get("event")
                        if name == "pong":
                            res.alive["caller"] = True
                            continue
                        if name == "channel_closed":
                            res.closed_channels.append(f"{ev.get('channel_id')}: {ev.get('reason')}")
                        if not isinstance(ref, str):
                            if "error" in ev:
                                res.errors[str(ev["error"])] += 1
                            continue
                        if ref.startswith("v"):
                            phase = res.phases[int(ref[1])]
                            if name == "frame_ack":
                                phase.dispositions[str(ev.get("disposition"))] += 1
                                index = int(ref.split(":", 1)[1])
                                sent_ns = phase.sent_ns.get(index)
                                if sent_ns is not None:
                                    phase.ack_s[index] = (time.perf_counter_ns() - sent_ns) / 1e9
                            elif "error" in ev:
                                phase.refused[str(ev["error"])] += 1
                        elif (flood := by_key.get(ref.split(":", 1)[0])) is not None:
                            if flood.sync is not None and (name == "frame_ack" or "error" in ev):
                                flood.sync.answered(ref, name == "frame_ack")
                            if name == "frame_ack":
                                flood.ok += 1
                            elif "error" in ev:
                                flood.refused[str(ev["error"])] += 1
                                flood.backoff = True
                                retry = ev.get("retry_after_ms")
                                flood.retry_after_s = retry / 1000 if isinstance(retry, int) else 0.0
                            hint = ev.get("window")
                            flood.window = hint if flood.honour and isinstance(hint, int) and hint > 0 else FLOOD_WINDOW
                            pace = ev.get("pace_ms")
                            if flood.honour and isinstance(pace, int) and pace > 0:
                                flood.backoff, flood.retry_after_s = True, pace / 1000
                            flood.in_flight -= 1
                            flood.room.unpark_all()
            except trio_websocket.ConnectionClosed as exc:
                res.closed_connections.append(f"caller: {exc.reason}")

        async def callee_reader() -> None:
            try:
                while True:
                    msg = await callee.get_message()
                    now = time.perf_counter_ns()
                    for ev in events(msg):
                        name = ev.get("event")
                        cid = ev.get("channel_id")
                        if name in ("frame", "frame_part") and isinstance(ev.get("_payload"), bytes):
                            payload: bytes = ev["_payload"]
                            if cid == voice and name == "frame":
                                index, t, p = _STAMP.unpack_from(payload)
                                phase = res.phases[p]
                                phase.received += 1
                                phase.lat.append((now - t) / 1e9)
                                phase.lat_by[index] = phase.lat[-1]
                            elif (flood := by_id.get(str(cid))) is not None:
                                flood.rx_bytes += len(payload)
                        elif name == "pong":
                            res.alive["callee"] = True
                        elif name == "channel_closed":
                            res.closed_channels.append(f"{cid}: {ev.get('reason')}")
                        elif "error" in ev and name is None:
                            res.errors[str(ev["error"])] += 1
            except trio_websocket.ConnectionClosed as exc:
                res.closed_connections.append(f"callee: {exc.reason}")

        async def talk(p: int, first: int, count: int) -> None:
            phase = res.phases[p]
            pad = bytes(VOICE_BYTES - _STAMP.size)
            start = trio.current_time() + TICK_S
            for i in range(first, first + count):
                due = start + (i - first) * TICK_S
                await trio.sleep_until(due)
                phase.lateness.append(trio.current_time() - due)
                t = phase.sent_ns[i] = time.perf_counter_ns()
                payload = _STAMP.pack(i, t, p) + pad
                await caller.send_message(
                    pack_binary({"action": "send", "channel_id": voice, "ref": f"v{p}:{i}"}, payload)
                )
                phase.send_s.append((time.perf_counter_ns() - t) / 1e9)
                phase.sent += 1

        async def flood_channel(key: str, flood: Flood) -> None:
            blob = bytes(FLOOD_BYTES)
            sync = flood.sync
            if sync is not None:
                sync.draining = True  # go on from what the node accepted before this block
            for i in range(FLOOD_MAX_FRAMES):
                while flood.in_flight >= flood.window or (sync is not None and sync.draining and flood.in_flight):
                    await flood.room.park()
                if flood.backoff:
                    flood.backoff = False
                    await trio.sleep(min(0.5, max(FLOOD_BACKOFF_S, flood.retry_after_s)))
                    continue  # the gates again: an answer may have come meanwhile
                if sync is not None and sync.draining:
                    sync.restart()
                message: str | bytes
                if sync is None:
                    message = pack_binary({"action": "send", "channel_id": flood.channel_id, "ref": f"{key}:{i}"}, blob)
                else:
                    frame = sync.next_frame
                    sync.next_frame += 1
                    action = {"action": "send", "channel_id": flood.channel_id, "ref": f"{key}:{sync.epoch}:{frame}"}
                    if frame % 2:
                        message = pack_binary(action, blob)
                    else:
                        header = {"type": "chunk", "index": frame // 2, "size": FLOOD_BYTES, "sha256": SYNC_SHA256}
                        message = orjson.dumps({**action, "payload": header}).decode()
                flood.in_flight += 1
                # a frame begun goes out whole, so it is answered (bounded: the node always reads)
                with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_LIMIT_S):
                    await caller.send_message(message)
                flood.sent += 1

        async def block(p: int, first: int, count: int) -> None:
            """Voice frames ``first`` .. ``first + count - 1`` of phase ``p`` (0 alone, 1 beside
            a flood honouring ``window``, 2 beside one ignoring it), then a settle."""
            phase = res.phases[p]
            with Meter(node) as meter:
                if p == 0:
                    await talk(p, first, count)
                else:
                    async with trio.open_nursery() as floods:
                        for key, flood in by_key.items():
                            flood.honour = p == 1
                            flood.window = 1 if flood.honour else FLOOD_WINDOW  # until the first hint
                            floods.start_soon(flood_channel, key, flood)
                        # the warm-up already carries the call (unreported frames), so the flood
                        # is shaped from its first frame, as beside a call in progress
                        await talk(WARMUP, res.phases[WARMUP].sent, round(FLOOD_WARMUP_S / TICK_S))
                        await talk(p, first, count)
                        floods.cancel_scope.cancel()
            res.meters[p].append(meter)
            with trio.move_on_after(3):  # the last frames may still be on their way
                while phase.received + sum(phase.refused.values()) < phase.sent or any(  # noqa: ASYNC110
                    f.in_flight for f in res.floods
                ):
                    await trio.sleep(0.05)
            phase.block_ends.append(len(phase.lat))
            await trio.sleep(SETTLE_S)  # bulk still queued for the callee drains before the next block
            for flood in res.floods if p else ():  # keep this block's counters, start the next from zero
                res.flood_runs.append((p, attrs.evolve(flood, refused=collections.Counter(flood.refused)), meter.wall))
                flood.sent = flood.ok = flood.rx_bytes = 0
                flood.refused.clear()
                flood.backoff, flood.window = False, FLOOD_WINDOW
                flood.in_flight = 0  # every frame sent is answered by now, unless the 3 s ran out

        per_block = max(1, voice_frames // ROUNDS)
        budget = 3 * ROUNDS * (per_block * TICK_S + FLOOD_WARMUP_S + SETTLE_S + 3) + 20
        with trio.fail_after(budget):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(caller_reader)
                nursery.start_soon(callee_reader)
                res.gc_before = await _node_memory(node)
                for r in range(ROUNDS):  # interleaved, so every phase sees the machine in the same moods
                    for p in (0, 1, 2):
                        await block(p, r * per_block, per_block)
                res.gc_after = await _node_memory(node)
                res.alive = {"caller": False, "callee": False}
                for ws in (caller, callee):
                    if ws.closed is None:
                        await _send_json(ws, {"action": "ping", "ref": "alive"})
                with trio.move_on_after(5):
                    while not all(res.alive.values()):  # noqa: ASYNC110  (bounded; the readers set it)
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    return res


def _phase_row(phase: Phase) -> str:
    missing = phase.sent - phase.received
    refused = sum(phase.refused.values())
    dropped = phase.dispositions.get("dropped", 0)
    return (
        f"{fmt_ms(phase.lat)}   received {phase.received}/{phase.sent}, refused {refused}, dropped {dropped},"
        f" lost {missing - refused}; caller's frame_ack {fmt_ms(list(phase.ack_s.values()))}"
    )


def where_late(phase: Phase) -> tuple[int, int]:
    """Of the phase's slowest 1% of frames (at least one), how many were at least three
    quarters as late at the caller's ``frame_ack``: held up before the node had them queued
    for the callee (the caller's socket, the way in, the node's own turn), not on the way
    out to the callee. Returns (that many, the frames looked at)."""
    slowest = sorted(phase.lat_by.items(), key=lambda item: item[1], reverse=True)
    slowest = slowest[: max(1, len(slowest) // 100)]
    before = sum(1 for i, lat in slowest if phase.ack_s.get(i, 0.0) >= 0.75 * lat)
    return before, len(slowest)


def _block_ratios(flood: Phase, alone: Phase) -> str:
    """Each block's p99 over the alone block of its round, and the whole phase's p95 ratio:
    a p99 of a few hundred frames is set by a handful, so these show how much it moves."""
    pairs = zip(flood.blocks(), alone.blocks(), strict=True)
    ratios = [f"{percentile(f, 99) / percentile(a, 99):.2f}" for f, a in pairs if f and a]
    return f"{', '.join(ratios)}x; p95 {percentile(flood.lat, 95) / percentile(alone.lat, 95):.2f}x"


def run(voice_frames: int = VOICE_FRAMES) -> list[tuple[str, str]]:
    """Start a node, run the voice benchmark, return printable rows."""
    with node_process() as node:
        r = trio.run(voice_run, node, voice_frames)
    return report(r, voice_frames)


def report(r: VoiceResult, voice_frames: int) -> list[tuple[str, str]]:
    """The printable rows of a voice run; records its targets (``common.target``)."""
    alone, honoured, ignored, _ = r.phases
    p99a = percentile(alone.lat, 99)
    ratio = toward_miss(percentile(honoured.lat, 99) / p99a, 2, at_most=True)  # as the target judges it
    refused = sum(sum(p.refused.values()) for p in r.phases)  # warm-up frames count here too
    rows = [
        (f"    floor: idle ping->pong round trip, {PINGS} pings 20 ms apart", fmt_ms(r.ping_rtt)),
        (
            f"(d) voice {VOICE_BYTES} B every 20 ms, {voice_frames} frames per phase in {ROUNDS} interleaved"
            " blocks; alone",
            _phase_row(alone),
        ),
        (
            "(d) voice, same conn flooding stream + file:sync 16 KiB (flood honours window)",
            _phase_row(honoured) + f"   p99 ratio {ratio:.2f}x (target <= 1.5x)",
        ),
        (
            "(d) the same, the flood ignoring window (refuse-and-retry only)",
            _phase_row(ignored) + f"   p99 ratio {percentile(ignored.lat, 99) / p99a:.2f}x",
        ),
        (
            "    p99 ratios block by block (each flood block against the alone block before it); p95 ratio",
            f"honouring {_block_ratios(honoured, alone)}; ignoring {_block_ratios(ignored, alone)}",
        ),
    ]
    totals: dict[tuple[int, str], Flood] = {}
    walls: collections.defaultdict[tuple[int, str], float] = collections.defaultdict(float)
    for p, f, wall in r.flood_runs:  # the blocks of each phase, summed
        t = totals.setdefault((p, f.intent), Flood(f.intent))
        t.sent, t.ok, t.rx_bytes = t.sent + f.sent, t.ok + f.ok, t.rx_bytes + f.rx_bytes
        t.refused.update(f.refused)
        walls[(p, f.intent)] += wall
    for (p, intent), f in sorted(totals.items()):
        refusals = ", ".join(f"{k} {v}" for k, v in f.refused.most_common()) or "none"
        how = f"honours window (1 first, else {FLOOD_WINDOW})" if p == 1 else f"window {FLOOD_WINDOW}, ignores the hint"
        rows.append(
            (
                f"    flood {intent}: {how}; refused: waits retry_after_ms",
                f"{f.rx_bytes / max(walls[(p, intent)], 1e-9) / 1e6:8.1f} MB/s delivered  sent {f.sent},"
                f" acked {f.ok}, refused: {refusals}",
            )
        )
    cpu = [100 * sum(m.node_cpu for m in ms) / max(1e-9, sum(m.wall for m in ms)) for ms in r.meters.values()]
    rows.append(
        (
            "    node CPU: voice alone / flood honouring window / ignoring it",
            f"{cpu[0]:5.0f}% / {cpu[1]:3.0f}% / {cpu[2]:3.0f}% of a core; client ticker lateness p99"
            f" {percentile(alone.lateness, 99) * 1e3:.2f} / {percentile(honoured.lateness, 99) * 1e3:.2f} /"
            f" {percentile(ignored.lateness, 99) * 1e3:.2f} ms",
        )
    )
    rises = [percentile(ph.lat, 99) - p99a for ph in (honoured, ignored)]
    rows.append(
        (
            "    the caller's own send of a voice frame (its turn at its WebSocket), p99",
            f"{' / '.join(f'{percentile(ph.send_s, 99) * 1e3:.2f}' for ph in (alone, honoured, ignored))} ms"
            f" (alone / honouring / ignoring), while the voice p99 beside the floods was"
            f" {rises[0] * 1e3:+.2f} / {rises[1] * 1e3:+.2f} ms on alone's",
        )
    )
    late = [where_late(ph) for ph in (alone, honoured, ignored)]
    rows.append(
        (
            "    the slowest 1% of frames: as late at the caller's frame_ack (held up on the way in)",
            " / ".join(f"{n} of {m}" for n, m in late) + " (alone / honouring / ignoring; the rest were held"
            " up on the way out to the callee)",
        )
    )
    before, after = r.gc_before.get("gc_collections"), r.gc_after.get("gc_collections")
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after) == 3:
        runs = " / ".join(str(a - b) for a, b in zip(after, before, strict=True))
        found = int(r.gc_after.get("gc_collected", 0)) - int(r.gc_before.get("gc_collected", 0))
        rows.append(
            (
                "    node garbage collections during the phases, generations 0 / 1 / 2",
                f"{runs}; objects found in cycles: {found}"
                " (tens: a refusal leaves no cycle; each left about 13 when it did)",
            )
        )
    target("voice p99 beside a bulk flood within 1.5x of alone", f"{ratio:.2f}x", ratio <= 1.5)
    target(
        "zero voice frames refused; the connection never closed",
        f"{refused} refused; connections closed: {len(r.closed_connections)}",
        refused == 0 and not r.closed_connections,
    )
    closed = r.closed_connections or ["no"]
    rows.append(
        (
            "    voice frames refused (target 0); connection closed?",
            f"{refused:8d}        closed: {'; '.join(closed)}; channels closed: {len(r.closed_channels)};"
            f" ping after: {'ok' if r.alive and all(r.alive.values()) else 'FAILED'}"
            + (f"; other errors: {dict(r.errors)}" if r.errors else ""),
        )
    )
    return rows
