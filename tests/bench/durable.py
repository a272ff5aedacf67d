"""Durable sends next to live relay, in one run, on one node with its SQLite store.

Three rows on a node started with ``--data-dir`` (the SQLite store): a ``stream`` channel
to a connected receiver (live relay: acked once handed over), a ``chat`` channel to an
offline target (acked once committed to SQLite: group commit), and a ``chat`` channel to a
connected receiver (stored, then delivered live). One sender connection keeps ``window``
sends in flight, 100-byte payloads.
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

import orjson
import trio

from mux.client import open_ws

from .common import NODE_ARGS, NODE_ENV, Meter, Proc, events, process

__all__ = ["run"]


async def _sends(node: Proc, intent: str, online: bool, n: int, window: int) -> Meter:
    tag = f"{intent.replace(':', '-')}-{'on' if online else 'off'}"
    async with open_ws(node.ws(f"tx-{tag}")) as tx:
        await tx.get_message()
        rx_ctx = open_ws(node.ws(f"rx-{tag}")) if online else None
        rx = await rx_ctx.__aenter__() if rx_ctx else None
        try:
            if rx is not None:
                await rx.get_message()
            await tx.send_message(orjson.dumps({"action": "open", "target": f"rx-{tag}", "intent": intent}).decode())
            cid = orjson.loads(await tx.get_message())["channel_id"]
            msg = orjson.dumps({"action": "send", "channel_id": cid, "payload": {"t": "x" * 80}}).decode()
            credit = trio.Semaphore(window)
            meter = Meter(node)
            with meter:
                async with trio.open_nursery() as nursery:

                    async def acks() -> None:
                        got = 0
                        while got < n:
                            for ev in events(await tx.get_message()):
                                if ev.get("event") == "frame_ack":
                                    got += 1
                                    credit.release()
                                elif "error" in ev:
                                    raise RuntimeError(f"refused: {ev}")

                    async def drain() -> None:
                        assert rx is not None
                        seen = 0
                        while seen < n:
                            for ev in events(await rx.get_message()):
                                seen += ev.get("event") == "frame"

                    nursery.start_soon(acks)
                    if rx is not None:
                        nursery.start_soon(drain)
                    for _ in range(n):
                        await credit.acquire()
                        await tx.send_message(msg)
            return meter
        finally:
            if rx_ctx is not None:
                await rx_ctx.__aexit__(None, None, None)


def run(n: int = 3000, window: int = 64) -> list[tuple[str, str]]:
    """Measure the three rows and return them printable."""
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as data:
        args = [
            *(sys.executable, "-m", "mux", "serve", "--port", "0", "--open", "--agent", "bench", "--data-dir", data),
            *NODE_ARGS,
        ]
        with process(args, "listening on", env=NODE_ENV) as node:
            cases: list[tuple[str, str, bool]] = [
                ("live relay: stream to a connected receiver", "stream", True),
                ("durable: chat to an offline target (SQLite commit before ack)", "chat", False),
                ("durable: chat to a connected receiver (stored, then delivered)", "chat", True),
            ]
            for label, intent, online in cases:
                meter: Any = trio.run(_sends, node, intent, online, n, window)
                rows.append(
                    (f"{label}, {n} x 100 B, window {window}", f"{n / meter.wall:>8.0f} acks/s  {meter.per(n)}")
                )
    return rows
