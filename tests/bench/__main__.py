"""``python -m tests.bench [SECTION ...]``: run benchmark sections and print one table.

Sections (default: all but ``profile``, in this order): ``core`` (library, no network),
``server`` (echo ceiling, ack, relay, batching, REST), ``voice`` (voice latency alone and
under a bulk flood on the same connection), ``uplink`` (voice latency beside large uploads
from the same ``mux.client`` connection through a slow uplink, in pieces and whole),
``downlink`` (voice latency beside downloads to the same ``mux.client`` connection through a
slow, deep downlink, its probes answered and not), ``memory`` (10,000 channels over 2,000
connections), ``transfer`` (tunnel and file transfer MB/s next to a direct TCP copy),
``durable`` (acks after a SQLite commit), and, only when named, ``profile`` (where the
node's CPU goes per relayed frame, by layer, next to the echo's; needs py-spy) and
``instructions`` (instructions per relayed send through the protocol logic, counted by
valgrind: repeatable where timings are not) and ``arenas`` (the memory section's cycle once,
on a node counting which objects hold the allocator's arenas after the channels close) and
``memory-sqlite`` (the memory section on the README's node, its ledger in SQLite).
Each server section starts its own node subprocess. Progress goes to stderr while the
sections run; the table of every number is printed at the end, after a header naming the
machine. A section that fails prints its error in the table (and its traceback on stderr);
the others still run. Last comes one row per target of the performance issue, with this run's
figure and whether it was met (``common.target``).

A default run stays within the bench's budget (``common.BENCH_BUDGET_S``) on a machine slower
than usual: before each section beyond the issue's rows (a) to (f) (``OPTIONAL``), it
reckons what that section and the required ones after it would take at this run's pace so far
(``USUAL_S`` times the slowest ratio to usual of the sections that ran), and a section that
would not fit gives way, its row saying so. The memory section's later cycles give way by
themselves.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Callable

from . import census, core, downlink, durable, instructions, latency, memory, profile, server, transfer, uplink
from .common import BENCH_BUDGET_S, FROM_SESSION, NODE_ARGS, SESSION_LIMIT_S, TARGETS, elapsed, target

__all__ = ["OPTIONAL", "SECTIONS", "USUAL_S", "main"]

SECTIONS: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "core": core.run,
    "server": server.run,
    "voice": latency.run,
    "uplink": uplink.run,
    "downlink": downlink.run,
    "memory": memory.run,
    "transfer": transfer.run,
    "durable": durable.run,
    "profile": profile.run,
    "instructions": instructions.run,
    "arenas": census.run,
    "memory-sqlite": memory.run_sqlite,
}
"""Section name -> function returning (label, value) rows."""

DEFAULT = ["core", "server", "voice", "uplink", "downlink", "memory", "transfer", "durable"]
"""What runs without arguments: ``profile`` (sampling slows the node), ``instructions``
(valgrind runs the code some 50 times slower), ``arenas`` (a census of the node's objects
at each step: a minute more) and ``memory-sqlite`` (the memory section again, on a node with
its SQLite store) run when named."""

USUAL_S: dict[str, float] = {
    "core": 6.0,
    "server": 50.0,
    "voice": 64.0,
    "uplink": 34.0,
    "downlink": 13.0,
    "memory": 30.0,
    "transfer": 18.0,
    "durable": 5.0,
}
"""Seconds each default section takes here at the machine's usual pace (memory: its first
cycle; the later ones give way by themselves)."""
OPTIONAL = frozenset({"core", "uplink", "downlink", "transfer", "durable"})
"""Default sections beyond the issue's rows (a) to (f): they give way in a run too slow to
hold them within the budget."""
_PACED = frozenset({"voice", "memory"})
"""Sections whose time is set by the clock (voice: a frame every 20 ms) or by the budget
(memory's cycles), not by the machine's pace: they do not tell how slow a run is."""
_WIDTH = 90
INSTALL_ROOM_S = 270.0
"""Sections that take less than this leave nox's install (about 20 s here) room in 5 minutes."""


def _gives_way(name: str, after: list[str], took_s: dict[str, float]) -> str:
    """Why the optional section ``name`` of a default run gives way ('' if it runs): what it
    and the required sections ``after`` it would take at this run's pace so far (``took_s``:
    each section that ran, in seconds) would go past the bench's budget."""
    if name not in OPTIONAL:
        return ""
    pace = max([1.0, *(took_s[n] / USUAL_S[n] for n in took_s if n in USUAL_S and n not in _PACED)])
    need = pace * (USUAL_S.get(name, 0.0) + sum(USUAL_S.get(n, 0.0) for n in after if n not in OPTIONAL))
    if elapsed() + need <= BENCH_BUDGET_S:
        return ""
    return (
        f"this run is {pace:.1f}x slower than usual so far: with it, the required sections after"
        f" it would not end within the bench's {BENCH_BUDGET_S:.0f} s (at {elapsed():.0f} s, {need:.0f} s needed)"
    )


def main(argv: list[str]) -> int:
    """Run the named sections (default: all) and print their rows as one table."""
    names = argv or DEFAULT
    for name in names:
        if name not in SECTIONS:
            print(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
            return 2
    started = time.monotonic()
    TARGETS.clear()
    table: list[tuple[str, str]] = []
    took_s: dict[str, float] = {}
    for i, name in enumerate(names):
        t0 = elapsed()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        why = _gives_way(name, names[i + 1 :], took_s) if names == DEFAULT else ""
        try:
            rows = [(f"{name}: skipped", why)] if why else SECTIONS[name]()
        except Exception as exc:  # a broken section must not hide the others' numbers
            traceback.print_exc()
            rows = [(f"{name}: FAILED", f"{type(exc).__name__}: {str(exc)[:200]}")]
        took = took_s[name] = elapsed() - t0
        print(f"[bench] {name} done in {took:.1f} s", file=sys.stderr, flush=True)
        table.append((f"== {name} ({took:.0f} s)", ""))
        table.extend(rows)
    total = time.monotonic() - started
    if names == DEFAULT and FROM_SESSION:
        target(
            "nox -s bench under 5 minutes on a fresh clone",
            f"{elapsed():.0f} s since nox began the session, its install included",
            elapsed() < SESSION_LIMIT_S - 5,  # nox still has to end
        )
    elif names == DEFAULT:
        target(
            "nox -s bench under 5 minutes on a fresh clone",
            f"{total:.0f} s of sections (nox adds its install, about 20 s here)",
            total < INSTALL_ROOM_S,
        )
    if TARGETS:
        table.append(("== the performance issue's targets, as this run measured them", ""))
        table.extend((f"  {t.name}", f"{t.figure:<48} met: {t.met}") for t in TARGETS)
    added = os.environ.get("MUX_BENCH_NODE_ENV")
    args = " ".join(shlex.quote(arg) for arg in NODE_ARGS)
    # a settings file takes the place of the MUX_* variables, MUX_RATE_MESSAGES_PER_S=0 among them
    rate = "as its --config file says" if "--config" in NODE_ARGS else "OFF"
    print()
    print(
        f"mux bench: {os.cpu_count()} CPUs, Python {platform.python_version()} ({platform.python_implementation()}),"
        f" {platform.system()} {platform.release()}, {total:.0f} s total;"
        f" node: python -m mux serve --memory --open (auth OFF, per-connection rate limit {rate}), loopback only"
        + (f"; node environment adds {added}" if added else "")
        + (f"; node arguments add {args}" if args else "")
        + ("; memory-sqlite's node: --data-dir (a new one) in place of --memory" if "memory-sqlite" in names else "")
    )
    width = min(_WIDTH, max(len(label) for label, _ in table))
    print(f"{'benchmark':<{width}} result")
    for label, value in table:
        print(f"{label:<{width}} {value}".rstrip())
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
