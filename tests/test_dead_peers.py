"""A peer that vanishes without closing its connection (a phone off the network, a machine
powered off) is dropped by the node's TCP keepalive (``tcp_keepalive_s``), and its agent can
connect again: the node holds one socket per agent, and a connection it never hears the end of
would lock the agent out until the node stops.

Such a peer sends nothing, not even a reset. These tests make one for real: an ``iptables``
rule drops every packet addressed to the client's end of its connection, so the node's probes
go unanswered while the client, in this process, stays silent. That needs root and
``iptables`` (``.ci/run`` installs it); outside CI those tests are skipped without them.
The nodes are real ``mux serve`` processes on loopback.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

from .procs import NodeProcess, node_process
from .wsutil import recv

QUICK = {"MUX_TCP_KEEPALIVE_S": "1", "MUX_SEND_TIMEOUT_S": "1"}
"""Probes after 1 s of silence; given up on after 3 s unanswered (``TCP_USER_TIMEOUT``)."""


IPTABLES = shutil.which("iptables") or shutil.which("iptables", path="/usr/sbin:/sbin")


def _need_iptables() -> None:
    if IPTABLES is not None and os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("these tests need root and iptables (apt-get install iptables): .ci/run installs it")
    pytest.skip("needs root and iptables")


def _iptables(action: str, port: int) -> None:
    rule = ["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"]
    assert IPTABLES is not None
    subprocess.run([IPTABLES, "-w", "5", action, *rule], check=True, capture_output=True, timeout=10)


@asynccontextmanager
async def _vanished(port: int) -> AsyncIterator[None]:
    """Every packet to loopback ``port`` dropped, as if its owner had gone off the network."""
    _iptables("-A", port)
    try:
        yield
    finally:
        _iptables("-D", port)


@asynccontextmanager
async def _connected(node: NodeProcess, agent: str) -> AsyncIterator[tuple[WebSocketConnection, int, Any]]:
    """A WebSocket to the node as ``agent``, the client's own port, and the first event; its
    socket is closed on the way out (the node may have dropped the connection long before)."""
    host, port = node.url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, host, f"/api/mux/ws?agent={agent}")
            yield ws, stream.socket.getsockname()[1], await recv(ws, timeout=10)
            nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()


async def _connections(node: NodeProcess) -> int:
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as http:
        count: int = (await http.get("/api/mux/status")).json()["connections"]
        return count


def _timer(local_port: int, remote_port: int) -> int | None:
    """The kernel's timer on the loopback TCP socket ``local_port`` -> ``remote_port``
    (``/proc/net/tcp``'s ``tr``: 0 none, 1 retransmit, 2 keepalive), None if not found."""
    want = (f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}")
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            fields = line.split()
            if (fields[1], fields[2]) == want:
                return int(fields[5].split(":")[0], 16)
    return None


async def test_an_idle_connection_is_probed_by_keepalive(tmp_path: Path) -> None:
    """The node's end of an idle WebSocket runs the keepalive timer; with
    ``tcp_keepalive_s = 0`` it runs none."""
    for env, expected in (({}, 2), ({"MUX_TCP_KEEPALIVE_S": "0"}, 0)):
        async with (
            node_process(tmp_path / str(expected), "--memory", env=env) as node,
            _connected(node, "idle") as (_ws, client_port, hello),
        ):
            assert hello["event"] == "connected"
            node_port = int(node.url.rsplit(":", 1)[1])
            await trio.sleep(0.2)  # the handshake's last data acknowledged: nothing in flight
            assert _timer(node_port, client_port) == expected, env


async def test_a_vanished_peer_is_dropped_and_its_agent_connects_again(tmp_path: Path) -> None:
    """Dropped, logged as a connection lost, and the agent connects again (its second
    connection closed as usual: by the client)."""
    _need_iptables()
    log = tmp_path / "node.log"
    async with node_process(tmp_path, "--memory", env=QUICK, log=log) as node:
        async with _connected(node, "phone") as (_ws, client_port, hello):
            assert hello["event"] == "connected" and await _connections(node) == 1
            async with _vanished(client_port):
                with trio.fail_after(30):  # 1 s of silence, then 3 s of unanswered probes
                    while await _connections(node):  # noqa: ASYNC110  (another process's count: polled, bounded)
                        await trio.sleep(0.25)
        async with _connected(node, "phone") as (again, _, hello):
            assert hello["event"] == "connected", hello
            await again.aclose()
        with trio.fail_after(10):
            while await _connections(node):  # noqa: ASYNC110  (another process's count: polled, bounded)
                await trio.sleep(0.05)
    lines = [line for line in log.read_text().splitlines() if "phone disconnected after" in line]
    assert len(lines) == 2 and "(connection lost)" in lines[0] and "(closed by the client)" in lines[1], lines


async def test_without_keepalive_a_vanished_peer_locks_its_agent_out(tmp_path: Path) -> None:
    """The same with ``tcp_keepalive_s = 0``: the node still holds the connection well after
    the time above, and the agent's new connection is refused (``agent_attached``)."""
    _need_iptables()
    env = {**QUICK, "MUX_TCP_KEEPALIVE_S": "0"}
    async with node_process(tmp_path, "--memory", env=env) as node:
        async with _connected(node, "phone") as (_ws, client_port, hello):
            assert hello["event"] == "connected"
            async with _vanished(client_port):
                await trio.sleep(8)
                assert await _connections(node) == 1
            async with _connected(node, "phone") as (_again, _, refused):
                assert refused.get("error") == "agent_attached", refused


def test_the_listening_socket_options() -> None:
    """Unit: ``_tcp_options`` sets keepalive (idle, a probe every third of it, 3 probes) and
    ``TCP_USER_TIMEOUT``, the latter capped where a huge ``send_timeout_s`` would overflow it;
    0 leaves keepalive off."""
    from mux.server import KEEPALIVE_PROBES, _tcp_options

    with socket.socket() as sock:
        _tcp_options(sock, 1e9, 30)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_PROBES
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2**31 - 1
    with socket.socket() as sock:
        _tcp_options(sock, 17, 0)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 17_000
