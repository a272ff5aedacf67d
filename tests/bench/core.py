"""Library benchmark: frames/s through one channel between two local agents.

Run: ``python -m tests.bench core`` (or ``nox -s bench``). Compares the real signed path
with the signer replaced by a no-op, to show what Ed25519 signing costs per frame; and what
putting one 100-byte message in a WebSocket frame costs a node, through wsproto's
``Connection.send`` and built directly by ``mux.wsframes`` (``AsgiSocket.send_many``); and
what taking one out of a client's masked frame costs, through wsproto and parsed directly by
``mux.wsframes.ClientFrames`` (``AsgiSocket``'s fast receive).
"""

from __future__ import annotations

import functools
import time
import timeit
from typing import Any

import trio
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import Message, TextMessage
from wsproto.frame_protocol import FrameProtocol

import mux
from mux.wsframes import COMPILED_MASK, ClientFrames, server_frames

__all__ = ["bench_local_channel", "run"]


async def bench_local_channel(frames: int, *, sign: bool, payload: Any, sign_every: int = 1) -> dict[str, float]:
    """Send ``frames`` frames a -> b over one channel and receive them; return rates."""
    async with (
        mux.open_mux(agent="bench", channel_buffer_frames=1024, sign_every=sign_every, sign_within_ms=100) as m,
        m.attach("b") as b,
    ):
        if not sign:
            m._sign = lambda digest: ""  # measurement only: what the frame path costs without Ed25519
        ch = await m.open("b", "stream", agent="a")
        peer = await b.accept()
        done = trio.Event()

        async def consume() -> None:
            for _ in range(frames):
                await peer.receive()
            done.set()

        t0 = time.perf_counter()
        c0 = time.process_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            for _ in range(frames):
                await ch.send(payload)
            await done.wait()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
    return {"frames_per_s": frames / wall, "cpu_us_per_frame": cpu / frames * 1e6}


def run(frames: int = 20_000) -> list[tuple[str, str]]:
    """Run both variants side by side and return printable rows."""
    payload = {"text": "x" * 80}
    rows = []
    variants = (
        ("every frame signed (default)", True, 1),
        ("chain heads signed, sign_every=16", True, 16),
        ("no signatures (no-op signer, for comparison)", False, 1),
    )
    for label, sign, every in variants:
        r = trio.run(functools.partial(bench_local_channel, frames, sign=sign, payload=payload, sign_every=every))
        rows.append(
            (
                f"local channel a->b, {frames} x 100 B, {label}",
                f"{r['frames_per_s']:>9.0f} frames/s  {r['cpu_us_per_frame']:6.1f} us CPU/frame",
            )
        )
    rows.append(frame_encode_row())
    rows += [frame_parse_row(1), frame_parse_row(16), frame_parse_row(1, 16 << 10), frame_parse_row(1, 512 << 10)]
    return rows


def frame_encode_row(messages: int = 64, repeat: int = 7, number: int = 200) -> tuple[str, str]:
    """Microseconds to frame one ready 100-byte text message, wsproto against ``server_frames``
    (best of ``repeat`` interleaved timings of ``number`` batches of ``messages``)."""
    batch = ['{"event":"frame","payload":"' + "x" * 72 + '"}'] * messages
    conn = Connection(ConnectionType.SERVER)
    assert b"".join(conn.send(TextMessage(data=m)) for m in batch) == server_frames(batch)

    def wsproto() -> bytes:
        return b"".join(conn.send(TextMessage(data=m)) for m in batch)

    def direct() -> bytes:
        return server_frames(batch)

    best = {"wsproto": float("inf"), "direct": float("inf")}
    for _ in range(repeat):
        for name, fn in (("wsproto", wsproto), ("direct", direct)):
            best[name] = min(best[name], timeit.timeit(fn, number=number) / (number * messages) * 1e6)
    return (
        f"WebSocket frame for a 100 B message, {messages} per write: wsproto / mux.wsframes",
        f"{best['wsproto']:9.2f} / {best['direct']:.2f} us  ({best['wsproto'] / best['direct']:.0f}x)",
    )


def frame_parse_row(per_read: int, size: int = 100, repeat: int = 7, reads: int = 400) -> tuple[str, str]:
    """Microseconds to take one message out of a client's masked frames, ``per_read`` frames
    arriving together: a 100-byte text action, or ``size`` bytes of binary. wsproto (as
    Hypercorn uses it) against ``ClientFrames`` (best of ``repeat`` interleaved timings of
    ``reads`` reads)."""
    message: str | bytes = '{"action":"send","channel_id":"ch-0123456789abcdef","payload":{"text":"' + "x" * 40 + '"}}'
    if size != 100:
        message = bytes(range(256)) * (size // 256)
    data = bytes(FrameProtocol(client=True, extensions=[]).send_data(message)) * per_read
    conn = Connection(ConnectionType.SERVER)
    parser = ClientFrames(max_size=1 << 24)
    reads = max(4, reads * 100 // size)

    def wsproto() -> None:
        for _ in range(reads):
            conn.receive_data(data)
            for event in conn.events():
                assert isinstance(event, Message)

    def direct() -> None:
        for _ in range(reads):
            parser.feed(data)
            while parser.next() is not None:
                pass

    best = {"wsproto": float("inf"), "direct": float("inf")}
    for _ in range(repeat):
        for name, fn in (("wsproto", wsproto), ("direct", direct)):
            best[name] = min(best[name], timeit.timeit(fn, number=1) / (reads * per_read) * 1e6)
    what = "100 B message" if size == 100 else f"{size >> 10} KiB binary message"
    mask = "" if size == 100 else (" (C mask)" if COMPILED_MASK is not None else " (integer mask)")
    return (
        f"client frame parsed, {what}, {per_read} per read: wsproto / mux.wsframes{mask}",
        f"{best['wsproto']:9.2f} / {best['direct']:.2f} us  ({best['wsproto'] / best['direct']:.0f}x)",
    )
