"""Transfer benchmark: tunnel and file-transfer throughput next to a direct TCP copy.

Run: ``python -m tests.bench transfer`` (part of ``nox -s bench``). Prints, side by side, in
MB/s (10^6 bytes per second, wall time of the whole operation):

- (t0) a direct TCP copy of ``TCP_MIB`` MiB over loopback: a trio client sends 64 KiB blocks
  to a trio sink in this process, which answers once it has counted every byte: the machine's
  ceiling for one Python process doing both ends;
- (t1) the same bytes up through a ``vpn:tunnel`` channel: a local application (this
  process) -> the client forwarder (``mux.tunnel.serve_tunnel``, this process, one
  WebSocket) -> the node (``python -m mux serve --memory --open --allow-tunnel
  127.0.0.1:SINK --allow-tunnel 127.0.0.1:SOURCE``, a subprocess) -> the sink (this
  process); (t2) the same amount down from a source;
- (f1) ``send_file`` / ``receive_files`` (both ends in this process, two WebSockets, the
  receiver writing and fsyncing into a temporary directory) over that same node, with the
  ``file:sync`` intent's default budget (1 MB/s per channel, preemptible): the number users
  get by default;
- (f2) the same machinery with that budget lifted: a node started by this module
  (``python -m tests.bench.transfer --node``: ``mux.server.serve`` with the CLI node's
  settings, then ``Mux.register_intent("file:sync", ..., rate 0)``, since no node option
  changes an intent's budget), at 64 KiB and 512 KiB chunks.

Every row also gives the node's CPU per MB and in % of one core (``/proc/PID/stat``), this
process's CPU per MB, and for the tunnel the node's resident memory growth (tunnel payloads
are kept in the node's in-memory ledger). File rows' MB/s include the sender's up-front
SHA-256 of the file; "transfer" is ``SyncResult.mb_per_s`` (from the open on).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

from mux.client import connect
from mux.filesync import SyncResult, receive_files, send_file
from mux.tunnel import TunnelListener, TunnelResult, serve_tunnel

from .common import NODE_ENV, Meter, Proc, node_process, process

__all__ = ["CopyResult", "run", "serve_unthrottled_node"]

TCP_MIB = 64
"""MiB copied directly and through the tunnel (each way)."""
FILE_DEFAULT_MIB = 2
"""MiB sent with the default file:sync budget (about 1 MB/s: this many seconds)."""
FILE_MIB = 32
"""MiB sent with the budget lifted (per chunk size)."""
BLOCK = 64 << 10
RUN_TIMEOUT_S = 60.0
_MARKER = "transfer bench node listening on"


@attrs.define
class CopyResult:
    """One measured copy: bytes moved, the meter around it, a note for its row."""

    nbytes: int
    meter: Meter
    note: str = ""

    @property
    def mb_per_s(self) -> float:
        """Megabytes (10^6 bytes) per second of wall time."""
        return self.nbytes / 1e6 / self.meter.wall if self.meter.wall else 0.0

    def row(self) -> str:
        """``X MB/s  node Y ms CPU/MB (Z% core)  client W ms/MB  note``."""
        m = self.meter
        mb = self.nbytes / 1e6
        pct = 100 * m.node_cpu / m.wall if m.wall else 0.0
        return (
            f"{self.mb_per_s:8.1f} MB/s  node {m.node_cpu / mb * 1e3:6.2f} ms CPU/MB ({pct:3.0f}% core)"
            f"  client {m.client_cpu / mb * 1e3:6.2f} ms/MB  {self.note}"
        ).rstrip()


def _listening_socket() -> socket.socket:
    """A listening loopback TCP socket on a free port (handed to trio later)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def _listener(sock: socket.socket) -> trio.SocketListener:
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def _sink(stream: trio.SocketStream) -> None:
    """Count everything until EOF, then answer with the count."""
    async with stream:
        n = 0
        while data := await stream.receive_some(1 << 20):
            n += len(data)
        await stream.send_all(str(n).encode())


def _source(nbytes: int, block: bytes) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A handler that sends ``nbytes`` (``block`` repeated) then closes."""

    async def source(stream: trio.SocketStream) -> None:
        async with stream:
            left = nbytes
            while left > 0:
                piece = block if left >= len(block) else block[:left]
                await stream.send_all(piece)
                left -= len(piece)

    return source


async def _push(port: int, nbytes: int, block: bytes) -> int:
    """Connect, send ``nbytes`` then EOF; return the far end's count."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        left = nbytes
        while left > 0:
            piece = block if left >= len(block) else block[:left]
            await stream.send_all(piece)
            left -= len(piece)
        await stream.send_eof()
        answer = b""
        while data := await stream.receive_some(64):
            answer += data
    return int(answer)


async def _pull(port: int) -> int:
    """Connect and read until EOF; return the byte count."""
    n = 0
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        while data := await stream.receive_some(1 << 20):
            n += len(data)
    return n


def _expect(what: str, got: int, nbytes: int) -> None:
    if got != nbytes:
        raise RuntimeError(f"{what}: {got} bytes arrived, expected {nbytes}")


async def _tcp_and_tunnel(
    node: Proc, sink_sock: socket.socket, source_sock: socket.socket, nbytes: int
) -> dict[str, CopyResult]:
    """(t0) direct copy to the sink, (t1) the same through the tunnel, (t2) down from the source."""
    block = os.urandom(BLOCK)
    out: dict[str, CopyResult] = {}
    sink_port = sink_sock.getsockname()[1]
    source_port = source_sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, _sink, [_listener(sink_sock)])
        await nursery.start(trio.serve_listeners, _source(nbytes, block), [_listener(source_sock)])
        with trio.fail_after(RUN_TIMEOUT_S):
            await _push(sink_port, 1 << 20, block)  # warm-up
            with Meter(node) as meter:
                _expect("direct", await _push(sink_port, nbytes, block), nbytes)
            out["direct"] = CopyResult(nbytes, meter)
            async with connect(node.url, "bench-tunnel") as conn:
                finished_send, finished = trio.open_memory_channel[TunnelResult](16)

                async def forwarder(port: int) -> TunnelListener:
                    listener: TunnelListener = await nursery.start(
                        lambda task_status: serve_tunnel(
                            conn,
                            ("127.0.0.1", 0),
                            ("127.0.0.1", port),
                            on_connection=finished_send.send_nowait,
                            task_status=task_status,
                        )
                    )
                    return listener

                async def closed_cleanly() -> None:
                    result = await finished.receive()
                    if not result.ok:
                        raise RuntimeError(f"tunnel connection failed: {result.to_dict()}")

                up, down = await forwarder(sink_port), await forwarder(source_port)
                await _push(up.port, 1 << 20, block)  # warm-up
                await closed_cleanly()
                rss0 = node.rss_kib()
                with Meter(node) as meter:
                    _expect("tunnel up", await _push(up.port, nbytes, block), nbytes)
                out["up"] = CopyResult(nbytes, meter, f"node RSS +{(node.rss_kib() - rss0) >> 10} MiB")
                await closed_cleanly()
                rss0 = node.rss_kib()
                with Meter(node) as meter:
                    _expect("tunnel down", await _pull(down.port), nbytes)
                out["down"] = CopyResult(nbytes, meter, f"node RSS +{(node.rss_kib() - rss0) >> 10} MiB")
                await closed_cleanly()
                nursery.cancel_scope.cancel()
    return out


async def _file(node: Proc, path: Path, inbox: Path, chunk: int, tag: str) -> tuple[CopyResult, SyncResult]:
    """Send ``path`` from one connection to ``receive_files`` on another; check the copy."""
    received: list[SyncResult] = []
    with trio.fail_after(RUN_TIMEOUT_S):
        async with connect(node.url, f"rx-{tag}") as rx, connect(node.url, f"tx-{tag}") as tx:
            async with trio.open_nursery() as nursery:

                async def receive() -> None:
                    received.extend(await receive_files(rx, inbox, count=1))

                nursery.start_soon(receive)
                with Meter(node) as meter:
                    res = await send_file(tx, f"rx-{tag}", path, chunk_size=chunk, name=f"{tag}.bin")
    if not (res.verified and received and received[0].verified):
        raise RuntimeError(f"file {tag} not verified: {res.to_dict()}")
    copy = inbox / f"{tag}.bin"
    same = await trio.to_thread.run_sync(lambda: hashlib.sha256(copy.read_bytes()).hexdigest() == res.sha256)
    if not same:
        raise RuntimeError(f"file {tag}: the received copy differs")
    copy.unlink()
    note = f"(transfer only {res.mb_per_s:.1f} MB/s; {res.chunks_total} chunks; byte-identical)"
    return CopyResult(res.size, meter, note), res


def _make_file(path: Path, mib: int) -> None:
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(1 << 20))


def run(tcp_mib: int = TCP_MIB, file_mib: int = FILE_MIB, default_mib: int = FILE_DEFAULT_MIB) -> list[tuple[str, str]]:
    """Measure (t0), (t1), (t2), (f1) and (f2); return printable rows."""
    rows: list[tuple[str, str]] = []
    sink_sock, source_sock = _listening_socket(), _listening_socket()
    allow = [f"127.0.0.1:{sock.getsockname()[1]}" for sock in (sink_sock, source_sock)]
    try:
        with tempfile.TemporaryDirectory(prefix="mux-bench-transfer-") as tmp:
            work = Path(tmp)
            small, big, inbox = work / "small.bin", work / "big.bin", work / "inbox"
            _make_file(small, default_mib)
            _make_file(big, file_mib)
            with node_process(*(arg for spec in allow for arg in ("--allow-tunnel", spec))) as node:
                r = trio.run(_tcp_and_tunnel, node, sink_sock, source_sock, tcp_mib << 20)
                rows.append((f"(t0) direct TCP copy {tcp_mib} MiB, loopback, no node", r["direct"].row()))
                rows.append((f"(t1) vpn:tunnel up {tcp_mib} MiB: app>forwarder>node>sink", r["up"].row()))
                rows.append((f"(t2) vpn:tunnel down {tcp_mib} MiB: source>node>forwarder>app", r["down"].row()))
                copy, _ = trio.run(_file, node, small, inbox, 64 << 10, "default")
                rows.append((f"(f1) file:sync {default_mib} MiB, 64 KiB chunks, default budget", copy.row()))
            args = [sys.executable, "-m", "tests.bench.transfer", "--node"]
            with process(args, _MARKER, env=NODE_ENV) as fast:
                for chunk in (64 << 10, 512 << 10):
                    copy, _ = trio.run(_file, fast, big, inbox, chunk, f"fast{chunk >> 10}k")
                    rows.append((f"(f2) file:sync {file_mib} MiB, {chunk >> 10} KiB chunks, budget lifted", copy.row()))
    finally:
        sink_sock.close()
        source_sock.close()
    direct = r["direct"].mb_per_s
    rows.append(
        ("    tunnel / direct TCP", f"up {r['up'].mb_per_s / direct:.3f}x, down {r['down'].mb_per_s / direct:.3f}x")
    )
    rows.append(
        ("    file rows: both ends in this process", f"receiver fsyncs every chunk into {tempfile.gettempdir()}")
    )
    return rows


async def serve_unthrottled_node() -> None:
    """A node like ``python -m mux serve --port 0 --memory --open --agent bench`` whose
    ``file:sync`` intent has no budget; prints its URL and runs until SIGTERM/SIGINT."""
    from mux.intents import BandwidthPolicy
    from mux.server import serve
    from mux.settings import NodeSettings

    settings = NodeSettings.from_env(port=0, agent="bench")
    settings.data_dir = None
    settings.open_mode = True
    async with trio.open_nursery() as nursery:
        info = await nursery.start(lambda task_status: serve(settings, handle_signals=True, task_status=task_status))
        m = info.node.require()
        builtin = m.resolve("file:sync")
        p = builtin.policy
        m.register_intent(
            "file:sync",
            builtin.backend,
            builtin.route.description,
            policy=BandwidthPolicy(p.priority, 0, 0, p.preemptible),
            delivery=builtin.delivery,
        )
        print(f"{_MARKER} {info.urls[0]} (file:sync budget lifted)", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--node"]:
        trio.run(serve_unthrottled_node)
    else:
        for label, value in run():
            print(f"{label:<70} {value}")
