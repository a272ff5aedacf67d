"""Shared pieces of the server benchmarks: node subprocess, /proc readings, wire helpers.

How this works: :func:`node_process` starts ``python -m mux serve --port 0 --memory --open``
(authentication off, per-connection message rate limit off via ``MUX_RATE_MESSAGES_PER_S=0``)
as a child process, waits for its "listening on" line and yields a :class:`Proc` whose
``cpu_s()`` and ``rss_kib()`` read ``/proc/PID/stat`` and ``/proc/PID/status``: the node's
numbers do not depend on how fast the (single, Python) benchmark client is. :class:`Meter`
brackets a measured run (wall time, node CPU, client CPU). :func:`events` flattens one
WebSocket message of the node (a JSON event, a ``batch`` of events, or a binary ``frame`` /
``frame_part``) into event dicts, so the benchmarks read old and new nodes alike. Every wait
is bounded; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import math
import os
import resource
import select
import shlex
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any

import attrs
import httpx
import orjson

from mux.wire import unpack_binary

__all__ = [
    "BENCH_BUDGET_S",
    "FROM_SESSION",
    "SESSION_LIMIT_S",
    "NODE_ARGS",
    "NODE_ENV",
    "Meter",
    "Proc",
    "TARGETS",
    "Target",
    "cpu_each",
    "elapsed",
    "events",
    "fmt_ms",
    "json_payload",
    "node_env",
    "node_process",
    "node_status",
    "percentile",
    "process",
    "raise_nofile",
    "seconds_left",
    "node_args",
    "target",
    "toward_miss",
    "tls_node_process",
]

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def cpu_each(cpu_s: float, count: int, unit: str) -> str:
    """CPU per item, ``cpu_s`` over ``count`` items, in ``unit`` ("ms" or "us"). The kernel counts
    a process's CPU in clock ticks (10 ms at 100 Hz): when a run measured no tick at all, the
    figure is a bound, ``under`` one tick per item, not a zero."""
    scale, digits = {"ms": (1e3, 2), "us": (1e6, 0)}[unit]
    count = max(1, count)
    if cpu_s <= 0:
        return f"under {scale / _TICK / count:.{digits}f} {unit}"
    return f"{cpu_s * scale / count:.{digits}f} {unit}"


def node_args(text: str) -> tuple[str, ...]:
    """Command-line words (shell quoting), as ``MUX_BENCH_NODE_ARGS`` gives them."""
    return tuple(shlex.split(text))


def node_env(text: str) -> dict[str, str]:
    """``KEY=VALUE`` words (shell quoting) as a mapping; a word without ``=`` is an error."""
    pairs = [word.partition("=") for word in node_args(text)]
    bad = [key for key, eq, _ in pairs if not eq or not key]
    if bad:
        raise ValueError(f"MUX_BENCH_NODE_ENV: {bad[0]!r} is not KEY=VALUE")
    return {key: value for key, _, value in pairs}


NODE_ENV = {"MUX_RATE_MESSAGES_PER_S": "0", **node_env(os.environ.get("MUX_BENCH_NODE_ENV", ""))}
"""Environment of the benchmark nodes: the per-connection message rate limit is off, and
whatever ``MUX_BENCH_NODE_ENV`` adds (``KEY=VALUE`` words), e.g. the node under jemalloc:
``MUX_BENCH_NODE_ENV="PYTHONMALLOC=malloc LD_PRELOAD=libjemalloc.so.2" python -m tests.bench memory``
(docs/performance.md, "Memory"). The header names what was added."""


NODE_ARGS = node_args(os.environ.get("MUX_BENCH_NODE_ARGS", ""))
"""Arguments ``MUX_BENCH_NODE_ARGS`` adds to every benchmark node's ``mux serve`` (shell
quoting), after the bench's own, e.g. a node under jemalloc that keeps no frames:
``MUX_BENCH_NODE_ARGS="--jemalloc --config relay.toml" python -m tests.bench memory``
(docs/performance.md, "Memory"). The header names them."""

BENCH_BUDGET_S = 285.0
"""What a whole default run may take: ``nox -s bench`` must end within 5 minutes on a fresh
clone. Counted from the start of nox's bench session, its install included (``noxfile.py``
passes the time in ``MUX_BENCH_STARTED``), or else from this module's import (the start of
``python -m tests.bench``). A section that can measure less (the memory section's later
cycles) does so rather than run past it, however long the install took."""
SESSION_LIMIT_S = 300.0
"""The issue's limit for a whole ``nox -s bench`` on a fresh clone."""


def _started(environ: Mapping[str, str] = os.environ) -> tuple[float, bool]:
    """The run's start on the monotonic clock, and whether it is nox's session start."""
    now = time.monotonic()
    try:
        ago = time.time() - float(environ.get("MUX_BENCH_STARTED", "nan"))
    except ValueError:
        ago = math.nan
    if 0.0 <= ago <= 3600.0:  # a sane start: not in the future, not from another day's run
        return now - ago, True
    return now, False


_STARTED, FROM_SESSION = _started()


def elapsed() -> float:
    """Seconds since the run began (nox's session start when it gave one)."""
    return time.monotonic() - _STARTED


def seconds_left() -> float:
    """What is left of ``BENCH_BUDGET_S`` (negative once past it)."""
    return BENCH_BUDGET_S - elapsed()


@attrs.frozen
class Target:
    """One of the performance issue's targets as this run measured it."""

    name: str
    figure: str
    met: str
    """``yes``, ``no``, or which configurations met it (``by (c)``)."""


TARGETS: list[Target] = []
"""What the sections measured against the issue's targets, in the order they ran
(``python -m tests.bench`` prints them last)."""


def toward_miss(value: float, digits: int, *, at_most: bool) -> float:
    """``value`` rounded to ``digits`` decimals toward missing its target: up for a target of at
    most some figure, down for one of at least. A target is judged on the figure as printed,
    so a run never shows "1.50x" for a ratio of 1.503 and calls it a miss."""
    scaled = round(value * 10**digits, 6)  # 1.1 * 100 is 110.00000000000001
    return (math.ceil(scaled) if at_most else math.floor(scaled)) / 10**digits


def target(name: str, figure: str, met: bool | str) -> None:
    """Record a target's figure in this run and whether it was met (or by what)."""
    TARGETS.append(Target(name, figure, met if isinstance(met, str) else ("yes" if met else "no")))


async def node_status(http: httpx.AsyncClient) -> dict[str, Any]:
    """The node's ``/status`` (``http``'s base URL is the node's API prefix, ``/api/mux``)."""
    return dict(orjson.loads((await http.get("/status")).content))


@attrs.define(eq=False)
class Proc:
    """A running child process (node or echo server) and where it listens."""

    popen: subprocess.Popen[str]
    url: str
    stderr: IO[str]
    ssl_context: ssl.SSLContext | None = None
    """Trusts the node's certificate when it serves TLS (``url`` is then ``https://``)."""

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.popen.pid

    def ws(self, agent: str, **query: str) -> str:
        """The node's WebSocket URL for ``agent`` (extra query parameters appended; ``wss``
        when it serves TLS)."""
        extra = "".join(f"&{k}={v}" for k, v in query.items())
        return self.url.replace("http", "ws", 1) + f"/api/mux/ws?agent={agent}{extra}"

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process (all threads), from ``/proc/PID/stat``."""
        with open(f"/proc/{self.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK

    def rss_kib(self) -> int:
        """Resident set size in KiB (``VmRSS`` of ``/proc/PID/status``)."""
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        with open(f"/proc/{self.pid}/statm") as fh:  # pragma: no cover - kernels without VmRSS
            return int(fh.read().split()[1]) * _PAGE_KIB

    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the process wrote to stderr (for error reports)."""
        self.stderr.flush()
        self.stderr.seek(0)
        return "".join(self.stderr.readlines()[-lines:])


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` towards ``wanted`` (capped by the hard
    limit); returns the (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@contextmanager
def process(
    args: Sequence[str], marker: str, *, env: dict[str, str] | None = None, nofile: int | None = None
) -> Iterator[Proc]:
    """Run ``args``; yield once a stdout line contains ``marker`` (its first http URL is the
    address). ``nofile`` raises the child's open-file soft limit. The child is terminated
    (then killed) on exit; its stderr goes to a temporary file."""

    def preexec() -> None:
        if nofile is not None:
            raise_nofile(nofile)

    with tempfile.TemporaryFile("w+") as err:
        popen = subprocess.Popen(
            list(args),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=os.getcwd(),
            env={**os.environ, **(env or {})},
            preexec_fn=preexec,
        )
        try:
            assert popen.stdout is not None
            deadline = time.monotonic() + 30
            url = None
            while time.monotonic() < deadline and popen.poll() is None:
                ready, _, _ = select.select([popen.stdout], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    break
                line = popen.stdout.readline()
                if marker in line:
                    url = next(w for w in line.split() if w.startswith("http")).rstrip(",")
                    break
            proc = Proc(popen, url or "", err)
            if url is None:
                raise RuntimeError(f"{' '.join(args)} did not start:\n{proc.log_tail()}")
            yield proc
        finally:
            popen.terminate()
            try:
                popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=10)
            if popen.stdout is not None:
                popen.stdout.close()


@contextmanager
def node_process(
    *extra: str,
    nofile: int | None = None,
    env: dict[str, str] | None = None,
    data_dir: str | None = None,
    module: str = "mux",
) -> Iterator[Proc]:
    """A benchmark node: ``python -m mux serve --port 0 --memory --open --agent bench``; with
    ``data_dir``, ``--data-dir DATA_DIR`` instead of ``--memory`` (the default node: its key and
    SQLite store in that directory); ``module`` runs another module's ``serve`` in place of
    ``mux``'s (``tests.bench.census``: the node that counts its objects by arena)."""
    store = ["--data-dir", data_dir] if data_dir is not None else ["--memory"]
    args = [
        sys.executable,
        "-m",
        module,
        "serve",
        "--port",
        "0",
        *store,
        "--open",
        "--agent",
        "bench",
        *extra,
        *NODE_ARGS,
    ]
    with process(args, "listening on", env={**NODE_ENV, **(env or {})}, nofile=nofile) as proc:
        yield proc


@contextmanager
def tls_node_process(*extra: str) -> Iterator[Proc]:
    """:func:`node_process` serving TLS 1.3 with a fresh self-signed certificate for
    127.0.0.1; the :class:`Proc`'s ``ssl_context`` trusts it."""
    from mux.tls import write_self_signed

    with tempfile.TemporaryDirectory() as tmp:
        certfile, keyfile = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        write_self_signed(certfile, keyfile, hosts=["127.0.0.1"], days=1)
        with node_process(*extra, "--certfile", certfile, "--keyfile", keyfile) as proc:
            proc.url = proc.url.replace("http://", "https://", 1)
            proc.ssl_context = ssl.create_default_context(cafile=certfile)
            yield proc


@attrs.define
class Meter:
    """Wall time, the node's CPU and this (client) process's CPU over a ``with`` block."""

    proc: Proc
    wall: float = 0.0
    node_cpu: float = 0.0
    client_cpu: float = 0.0
    _t0: float = 0.0
    _n0: float = 0.0
    _c0: float = 0.0

    def __enter__(self) -> Meter:
        self._t0, self._n0, self._c0 = time.perf_counter(), self.proc.cpu_s(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        self.node_cpu = self.proc.cpu_s() - self._n0
        self.client_cpu = time.process_time() - self._c0

    def cores(self) -> tuple[float, float]:
        """Cores the node and this client process kept busy on average (CPU over wall time)."""
        if not self.wall:
            return 0.0, 0.0
        return self.node_cpu / self.wall, self.client_cpu / self.wall

    def full_use_rate(self, n: int, cores: int) -> tuple[float, str]:
        """Units per second had the node and the client each spent this run's CPU per unit
        (``n`` units) with neither ever idle, and what sets that rate: each is one thread, so
        at most one core each (``"the node"``, ``"the client"``), and both share ``cores``
        (``"the cores"``). What a run fell short of this rate, it lost to waiting."""
        node, client = self.node_cpu / max(n, 1), self.client_cpu / max(n, 1)
        if node <= 0 or client <= 0:
            return 0.0, "nothing measured"
        bounds = {"the node": 1 / node, "the client": 1 / client, "the cores": cores / (node + client)}
        by = min(bounds, key=lambda k: bounds[k])
        return bounds[by], by

    def per(self, n: int) -> str:
        """``node X us CPU/frame (Y% of a core), client Z us/frame`` for ``n`` units."""
        n = max(n, 1)
        pct = 100 * self.node_cpu / self.wall if self.wall else 0.0
        return (
            f"node {self.node_cpu / n * 1e6:6.1f} us CPU/frame ({pct:3.0f}% core)"
            f"  client {self.client_cpu / n * 1e6:5.1f} us"
        )


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``samples``; NaN when empty."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def fmt_ms(samples: Sequence[float]) -> str:
    """``p50 X ms p99 Y ms`` of latencies given in seconds."""
    return f"p50 {percentile(samples, 50) * 1e3:6.2f} ms  p99 {percentile(samples, 99) * 1e3:6.2f} ms"


def json_payload(size: int, t_ns: int) -> str:
    """A JSON object of exactly ``size`` bytes carrying the send time ``t_ns``: ``{"t":…,"p":"xx…"}``."""
    head = f'{{"t":{t_ns},"p":"'
    return head + "x" * max(0, size - len(head) - 2) + '"}'


def events(message: str | bytes) -> Iterator[dict[str, Any]]:
    """The events in one message from the node.

    JSON text gives its object, or each item of a ``{"event":"batch","items":[…]}``. A
    binary message gives its header with ``_payload`` (the bytes) added.
    """
    if isinstance(message, bytes):
        header, payload = unpack_binary(message)
        header["_payload"] = payload
        yield header
        return
    msg = orjson.loads(message)
    if isinstance(msg, dict) and msg.get("event") == "batch" and isinstance(msg.get("items"), list):
        for item in msg["items"]:
            if isinstance(item, dict):
                yield item
    elif isinstance(msg, dict):
        yield msg
