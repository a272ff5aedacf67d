"""How many connections a node takes: its limit on open files and its listen backlog.

Every WebSocket connection holds a file descriptor (``mux.open_files``). ``python -m mux
serve`` raises its soft ``RLIMIT_NOFILE`` to the hard limit, so a node started from a shell's
default soft limit (1024 on most Linux systems) still holds ``max_connections``; ``/status``
``open_files`` shows the limit and what is open; and the node warns once listening when even
the hard limit leaves too little for ``max_connections``. The nodes here are real ``mux serve``
processes started with a soft limit of 64, held by real WebSocket clients on loopback; the
module's helpers are tested alone too.

A crowd of clients connecting at once (coming back after a restart) waits in the listening
socket's backlog until the node accepts them: ``listen_backlog`` sets it (4096).
"""

from __future__ import annotations

import os
import re
import resource
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, connect_websocket_url

from mux import open_files

from .bench.common import raise_nofile
from .procs import NodeProcess, node_process
from .wsutil import recv, ws_url

SOFT = 64
"""The node's soft limit at its start: far below the connections it is asked to hold."""
CLIENTS = 150
"""Connections held (twice as many for the backlog): more than ``SOFT``, fewer than 1024."""


async def _status(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        reply = await http.get("/api/mux/status")
        assert reply.status_code == 200, reply.text
        status: dict[str, Any] = reply.json()
        return status


async def test_serve_raises_its_soft_limit_and_holds_more_connections_than_it(tmp_path: Path) -> None:
    raise_nofile(CLIENTS + 256)  # this process holds the clients' ends
    log = tmp_path / "node.log"
    env = {"MUX_MAX_CONNECTIONS": "500"}  # 1024 files are room enough: no warning
    async with node_process(tmp_path, "--memory", log=log, open_files=(SOFT, 1024), env=env) as node:
        before = (await _status(node.url))["open_files"]
        assert before["limit"] == 1024 and before["hard_limit"] == 1024
        assert 0 < before["open"] < SOFT
        held: list[WebSocketConnection] = []
        async with trio.open_nursery() as nursery:
            with trio.fail_after(60):  # each connection is a descriptor: over 64 of them
                for i in range(CLIENTS):
                    ws = await connect_websocket_url(nursery, ws_url(node.url, f"holder{i}"))
                    assert (await recv(ws, timeout=20))["event"] == "connected"
                    held.append(ws)
            status = await _status(node.url)
            assert status["connections"] == CLIENTS
            assert status["open_files"]["open"] > CLIENTS
            for ws in held:
                await ws.aclose()
    text = log.read_text()
    assert f"open files: soft limit raised from {SOFT} to 1024" in text, text[-2000:]
    assert not [line for line in text.splitlines() if "open files" in line and "WARNING" in line]


async def test_serve_warns_when_the_hard_limit_leaves_too_little(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    env = {"MUX_MAX_CONNECTIONS": "1000"}
    async with node_process(tmp_path, "--memory", log=log, open_files=(SOFT, 300), env=env) as node:
        assert (await _status(node.url))["open_files"]["limit"] == 300
    text = log.read_text()
    warning = next((line for line in text.splitlines() if "open files" in line and "WARNING" in line), None)
    assert warning is not None, text[-2000:]
    assert "max_connections=1000 needs" in warning and "hard limit 300" in warning
    fits = int(re.search(r"past about (\d+) connections", warning)[1])  # type: ignore[index]
    assert 250 < fits < 300  # the limit less what the node had open once it listened


def test_raise_limit_in_this_process() -> None:
    """Unit: ``raise_limit`` sets the soft limit to the hard one (where that is unlimited, to
    what the kernel allows a process) and reports both; again, it changes nothing. The
    process's limit is put back afterwards."""
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = saved
    ceiling = open_files._ceiling(hard)
    low = min(soft, 128)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        assert open_files.raise_limit() == open_files.OpenFiles(soft=ceiling, hard=hard, raised_from=low)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (ceiling, hard)
        assert open_files.raise_limit() == open_files.OpenFiles(soft=ceiling, hard=hard, raised_from=None)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def test_shortfall_names_the_numbers() -> None:
    roomy = open_files.OpenFiles(soft=20_000, hard=20_000, raised_from=1024)
    assert open_files.shortfall(roomy, max_connections=10_000) is None
    short = open_files.OpenFiles(soft=4096, hard=4096, raised_from=1024)
    message = open_files.shortfall(short, max_connections=10_000, open_now=12)
    assert message is not None
    assert f"below the {10_000 + open_files.RESERVED} that max_connections=10000 needs" in message
    assert "hard limit 4096" in message and "past about 4084 connections" in message
    enough = open_files.OpenFiles(soft=10_000 + open_files.RESERVED, hard=20_000)
    assert open_files.shortfall(enough, max_connections=10_000) is None
    unlimited = open_files.OpenFiles(soft=1024, hard=resource.RLIM_INFINITY)
    assert "hard limit unlimited" in (open_files.shortfall(unlimited, max_connections=10_000) or "")


def test_in_use_counts_this_process_descriptors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of counting: the kernel's count (``/proc/self/fd``'s size) and, where the
    kernel gives none (before Linux 6.2), the listing."""
    before = open_files.in_use()
    assert before is not None and before >= 3
    with open(__file__, "rb"), open(__file__, "rb"):
        assert open_files.in_use() == before + 2
    assert open_files.in_use() == before
    real_stat = os.stat

    def no_count(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        found = real_stat(path, *args, **kwargs)
        if path != "/proc/self/fd":
            return found
        return os.stat_result((*found[:6], 0, *found[7:10]))  # st_size 0, as older kernels give

    monkeypatch.setattr(open_files.os, "stat", no_count)
    assert open_files.in_use() == before
    with open(__file__, "rb"):
        assert open_files.in_use() == before + 1


async def _queued_while_stopped(node: NodeProcess, attempts: int) -> int:
    """Stop the node (SIGSTOP: it accepts nothing), make ``attempts`` TCP connections to it
    at once, and count those the kernel completed for it within a few seconds: those its
    listen backlog queued (a dropped attempt is retried only after a second or more, and
    dropped again while the queue stays full). The node is continued afterwards."""
    host, port = node.url.removeprefix("http://").rsplit(":", 1)
    made: list[trio.SocketStream] = []
    node.process.send_signal(signal.SIGSTOP)
    try:
        async with trio.open_nursery() as nursery:
            nursery.cancel_scope.deadline = trio.current_time() + 3.0

            async def attempt() -> None:
                made.append(await trio.open_tcp_stream(host, int(port)))

            for _ in range(attempts):
                nursery.start_soon(attempt)
    finally:
        node.process.send_signal(signal.SIGCONT)
    for stream in made:
        await stream.aclose()
    return len(made)


async def test_the_listen_backlog_queues_a_burst_of_connections(tmp_path: Path) -> None:
    """``listen_backlog`` (4096 by default, ``MUX_LISTEN_BACKLOG``) is the queue the node's
    listening socket gets: 300 connections made at once while the node accepts nothing are
    all queued by default; with a backlog of 50, about 51 are and the rest are dropped (what
    Hypercorn's default of 100 did to a crowd of clients coming back after a restart). The
    node then serves as before."""
    raise_nofile(CLIENTS + 256)  # this process holds the clients' ends
    async with node_process(tmp_path / "a", "--memory") as node:
        assert await _queued_while_stopped(node, CLIENTS * 2) == CLIENTS * 2
        assert (await _status(node.url))["connections"] == 0
    async with node_process(tmp_path / "b", "--memory", env={"MUX_LISTEN_BACKLOG": "50"}) as node:
        queued = await _queued_while_stopped(node, CLIENTS * 2)
        assert 50 <= queued <= 52, queued  # Linux queues backlog + 1
        assert (await _status(node.url))["connections"] == 0
