"""Server benchmarks: a real node (subprocess) and real clients on loopback.

Prints, side by side in one run: WebSocket relay sender -> node -> receiver (frames/s and
node CPU per frame), REST ``POST /send`` requests/s, and the same-stack WebSocket echo as the
ceiling. Node CPU is read from ``/proc/PID/stat`` of the server process, so the numbers do
not depend on the (single, Python) client's own speed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import orjson
import trio

from mux.client import open_ws

__all__ = ["run"]

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@contextmanager
def _process(args: list[str], marker: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if marker in line:
                url = next(w for w in line.split() if w.startswith("http")).rstrip(",")
                yield proc, url
                return
        raise RuntimeError(f"{args} did not start")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _relay(url: str, n: int, window: int, payload: dict[str, str]) -> float:
    ws = url.replace("http", "ws", 1) + "/api/mux/ws?agent="
    async with open_ws(ws + "bench-tx") as tx, open_ws(ws + "bench-rx") as rx:
        await tx.get_message()
        await rx.get_message()
        await tx.send_message(orjson.dumps({"action": "open", "target": "bench-rx", "intent": "stream"}).decode())
        cid = orjson.loads(await tx.get_message())["channel_id"]
        await rx.get_message()
        msg = orjson.dumps({"action": "send", "channel_id": cid, "payload": payload}).decode()
        credit = trio.Semaphore(window)
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:

            async def acks() -> None:
                for _ in range(n):
                    await tx.get_message()
                    credit.release()

            async def receive() -> None:
                for _ in range(n):
                    await rx.get_message()

            nursery.start_soon(acks)
            nursery.start_soon(receive)
            for _ in range(n):
                await credit.acquire()
                await tx.send_message(msg)
        return time.perf_counter() - t0


async def _echo(url: str, n: int, window: int, payload: dict[str, str]) -> float:
    async with open_ws(url.replace("http", "ws", 1) + "/echo") as ws:
        msg = orjson.dumps({"action": "send", "channel_id": "ch-x", "payload": payload}).decode()
        credit = trio.Semaphore(window)
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:

            async def back() -> None:
                for _ in range(n):
                    await ws.get_message()
                    credit.release()

            nursery.start_soon(back)
            for _ in range(n):
                await credit.acquire()
                await ws.send_message(msg)
        return time.perf_counter() - t0


async def _rest(url: str, n: int, concurrency: int, payload: dict[str, str]) -> float:
    async with httpx.AsyncClient(base_url=url + "/api/mux") as c:
        cid = (await c.post("/open", json={"agent": "bench-a", "target": "bench-b"})).json()["channel_id"]
        body = orjson.dumps({"channel_id": cid, "payload": payload})
        headers = {"content-type": "application/json"}
        t0 = time.perf_counter()

        async def worker(count: int) -> None:
            for _ in range(count):
                r = await c.post("/send", content=body, headers=headers)
                assert r.status_code == 200, r.text

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker, n // concurrency)
        return time.perf_counter() - t0


def _measure(pid: int, fn: object, *args: object) -> tuple[float, float]:
    c0 = _cpu_s(pid)
    wall = trio.run(fn, *args)  # type: ignore[arg-type]
    return wall, _cpu_s(pid) - c0


def run(n: int = 5000, window: int = 64) -> list[tuple[str, str]]:
    """Start a node and an echo server, measure each, return printable rows."""
    payload = {"text": "x" * 80}
    rows: list[tuple[str, str]] = []
    py = sys.executable
    with (
        _process(
            [py, "-m", "mux", "serve", "--port", "0", "--memory", "--agent", "bench", "--open"], "listening on"
        ) as (
            node,
            node_url,
        ),
        _process([py, "-m", "tests.bench.echo_app"], "http://") as (echo, echo_url),
    ):
        wall, cpu = _measure(echo.pid, _echo, echo_url, n, window, payload)
        rows.append(
            (
                f"raw WS echo, Quart-Trio on Hypercorn (ceiling), window {window}",
                f"{n / wall:>9.0f} msg/s     {cpu / n * 1e6:6.1f} us server CPU/msg",
            )
        )
        wall, cpu = _measure(node.pid, _relay, node_url, n, window, payload)
        rows.append(
            (
                f"WS relay sender->node->receiver, 1 channel, window {window}",
                f"{n / wall:>9.0f} frames/s  {cpu / n * 1e6:6.1f} us node CPU/frame",
            )
        )
        wall, cpu = _measure(node.pid, _rest, node_url, n // 5, 8, payload)
        rows.append(
            (
                "REST POST /send, 8 concurrent keep-alive clients",
                f"{n / 5 / wall:>9.0f} req/s     {cpu / (n / 5) * 1e6:6.1f} us node CPU/req",
            )
        )
    return rows
