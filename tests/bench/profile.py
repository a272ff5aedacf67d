"""Where a node's CPU goes per relayed frame, next to the echo's per message (py-spy).

Run: ``python -m tests.bench profile`` (not part of the default run: sampling slows the
node; ``nox -s bench -- profile`` installs py-spy). Prints, for the echo ceiling (f) and the
relays (b), (b'') and (c) of the server section (100-byte frames; (b) on a default node,
every frame signed and acknowledged; (b'') on a node signing chain heads, the sender on
``?acks=errors``; (c) as (b), sent in ``batch`` actions and received batched), the node's
CPU per message split into layers:

- read: the server's socket reader (Hypercorn, wsproto, trio socket), up to handing a message
  to the application;
- app: the application between receive and send (for the node: ``WireSession.handle``:
  parse, chain, hash, sign, deliver into the receiver's outbox; plus its reader loop), also
  where the node handles a message in the server's reader (``mux.connection._handle_inline``);
- send: the application's sends (``AsgiSocket.send`` and ``send_many`` down through
  Hypercorn, wsproto and the socket), and for the node its per-connection writer around them;
- loop: trio's scheduler and epoll, and anything else; but not the samples taken while the
  process waits in ``epoll_wait`` (the stack ends in trio's ``EpollIOManager.get_events``):
  py-spy counts some of a thread's blocked waiting there as running (an idle echo server
  gave 127 such samples in 3 s, every one on that line, and a 1.1 s CPU run 200 more than
  its CPU time at the sampling rate accounts for), so they are left out, and shown as
  "waiting"; the CPU of the ``epoll_wait`` calls that found events at once goes with them.

For each relay, the ``app`` layer is split further (``APP_PARTS``): the Ed25519 signature,
parsing the client's message, the payload's canonical bytes, chaining apart from the
signature (hashes, the ``Frame``, the ledger), delivering to the receiving end's outbox (its
``frame`` event), the sender's ``frame_ack``, and the rest (dispatch, the checks on a send,
counting, and the handlers around them).

How this works: py-spy samples the server subprocess (``--format raw``; it pauses the process for each sample)
while one run goes through it; each sampled stack is put in the first layer whose marker
frame it contains, and a layer's share of the samples times the process's CPU per message
(``/proc``) is its cost. "n/a" when py-spy is missing or may not attach (ptrace).
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

from .common import Meter, Proc, node_process, process
from .server import BATCH, HEADS_SIGN_EVERY, echo_run, relay_run

__all__ = ["APP_PARTS", "LAYERS", "app_part", "classify", "run"]

FRAMES = 6000
RATE_HZ = 500

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("app", ("_handle_inline (",)),  # a message the node handles in the server's reader
    ("read", ("TCPServer._read_data (",)),
    ("send", ("AsgiSocket.send (", "AsgiSocket.send_many (", "Writer.run (")),
    ("app", ("WireSession.handle (", "serve_socket (", "asgi_echo (")),
)
"""Layer name and the frames (``function (`` as py-spy names them) that put a stack in it,
in order (the first that matches wins); a stack with none of them is ``loop``."""


APP_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sign", ("NodeKey.sign (",)),
    ("parse", ("parse_message (", "batch_items (")),
    ("payload", ("payload_bytes (",)),
    ("chain", ("Mux._chain (",)),
    ("deliver", ("ChannelContext.deliver (",)),
    ("ack", ("frame_ack_event (",)),
)
"""Parts of the node's ``app`` layer and the frames that put a stack in each, in order (the
first that matches wins, so ``chain`` is chaining without its signature); else ``other``."""

WAITING = "EpollIOManager.get_events ("
"""The leaf frame of a stack sampled while trio waits for I/O (``epoll_wait``)."""


def classify(stack: str) -> str:
    """The layer of one py-spy raw stack (frames joined by ``;``); ``waiting`` when it ends
    in trio's wait for I/O."""
    if stack.rpartition(";")[2].startswith(WAITING):
        return "waiting"
    for name, markers in LAYERS:
        if any(marker in stack for marker in markers):
            return name
    return "loop"


def app_part(stack: str) -> str:
    """The part of the ``app`` layer that one py-spy raw stack of it is in."""
    for name, markers in APP_PARTS:
        if any(marker in stack for marker in markers):
            return name
    return "other"


def _py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return beside if os.access(beside, os.X_OK) else None


@contextmanager
def _sampled(proc: Proc, spy: str, out: str) -> Iterator[None]:
    """Sample ``proc`` with py-spy into ``out`` for the ``with`` block."""
    cmd = [spy, "record", "--pid", str(proc.pid), "--rate", str(RATE_HZ), "--format", "raw"]
    recorder = subprocess.Popen([*cmd, "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # attached and sampling
        if recorder.poll() is not None:
            raise RuntimeError((recorder.stderr.read() if recorder.stderr else "").strip()[-200:] or "py-spy exited")
        yield
    finally:
        if recorder.poll() is None:
            recorder.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
        try:
            recorder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait(timeout=10)


def _layers(path: str) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    with open(path) as fh:
        for line in fh:
            stack, _, n = line.rstrip().rpartition(" ")
            if stack and n.isdigit():
                layer = classify(stack)
                counts[layer] += int(n)
                if layer == "app":
                    counts["app:" + app_part(stack)] += int(n)
    return counts


def _active(counts: collections.Counter[str]) -> int:
    """The samples of the process running: every layer's, not the waiting ones."""
    return max(1, sum(n for name, n in counts.items() if name != "waiting" and not name.startswith("app:")))


def _row(counts: collections.Counter[str], cpu_per_msg: float) -> str:
    total = _active(counts)
    parts = [
        f"{name} {counts[name] / total * cpu_per_msg * 1e6:5.0f} us ({counts[name] / total * 100:2.0f}%)"
        for name in ("read", "app", "send", "loop")
    ]
    return f"{cpu_per_msg * 1e6:6.0f} us =  " + "  ".join(parts) + f"   [{total} samples, {counts['waiting']} waiting]"


def _app_row(counts: collections.Counter[str], cpu_per_msg: float) -> str:
    total = _active(counts)
    names = [name for name, _ in APP_PARTS] + ["other"]
    return "  ".join(f"{name} {counts['app:' + name] / total * cpu_per_msg * 1e6:4.0f} us" for name in names)


def _profile(proc: Proc, spy: str, go: Callable[[], tuple[Meter, int]]) -> tuple[str, str]:
    """One sampled run: its layers row, and its ``app`` layer's parts."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "samples.txt")
        with _sampled(proc, spy, out):
            meter, n = go()
        if not os.path.exists(out):
            raise RuntimeError("py-spy wrote no samples")
        counts, cpu = _layers(out), meter.node_cpu / max(1, n)
        return _row(counts, cpu), _app_row(counts, cpu)


def run(frames: int = FRAMES) -> list[tuple[str, str]]:
    """Profile the echo ceiling and the chain-head relay, one run each; return rows."""
    spy = _py_spy()
    if spy is None:
        return [("profile", "n/a: py-spy is not installed (pip install py-spy)")]
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "node.toml")
        with open(config, "w") as fh:
            fh.write(f"rate_messages_per_s = 0\n[mux]\nsign_every = {HEADS_SIGN_EVERY}\n")
        with (
            process([sys.executable, "-m", "tests.bench.echo_app"], "http://") as echo,
            node_process("--config", config) as heads,
            node_process() as node,
        ):
            trio.run(echo_run, echo, 1000)  # warm-up, not reported
            trio.run(lambda: relay_run(heads, "prof-warm", n=1000, quiet=True))
            trio.run(lambda: relay_run(node, "prof-warm", n=1000, end_to_end=True))

            def echo_go() -> tuple[Meter, int]:
                _, _, meter = trio.run(echo_run, echo, frames)
                return meter, frames

            def relay_go(on: Proc, quiet: bool, batch: int = 0) -> Callable[[], tuple[Meter, int]]:
                def go() -> tuple[Meter, int]:
                    res = trio.run(lambda: relay_run(on, "prof", n=frames, quiet=quiet, end_to_end=True, batch=batch))
                    assert res.meter is not None
                    return res.meter, res.received

                return go

            for label, proc, go in (
                (f"(f) echo, server CPU per message, {frames} x 100 B", echo, echo_go),
                (f"(b) relay, node CPU per frame, {frames} x 100 B, defaults", node, relay_go(node, False)),
                (
                    f"(b'') relay, node CPU per frame, sign_every={HEADS_SIGN_EVERY}, ?acks=errors",
                    heads,
                    relay_go(heads, True),
                ),
                (
                    f"(c) relay, node CPU per frame, defaults, batches of {BATCH}, ?batch=1",
                    node,
                    relay_go(node, False, BATCH),
                ),
            ):
                try:
                    layers, parts = _profile(proc, spy, go)
                except (RuntimeError, OSError) as exc:
                    rows.append((label, f"n/a: {exc}"))
                    continue
                rows.append((label, layers))
                if proc is not echo:
                    rows.append(("    its app layer, in parts", parts))
    rows.append(
        (
            "    layers",
            "read: socket reader; app: receive to send; send: sends and writer; loop: trio (not its epoll_wait)",
        )
    )
    return rows
