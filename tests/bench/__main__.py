"""``python -m tests.bench [SECTION ...]``: run benchmark sections and print one table.

Sections (default: all but ``profile``, in this order): ``core`` (library, no network),
``server`` (echo ceiling, ack, relay, batching, REST), ``voice`` (voice latency alone and
under a bulk flood on the same connection), ``uplink`` (voice latency beside large uploads
from the same ``mux.client`` connection through a slow uplink, in pieces and whole),
``memory`` (10,000 channels over 2,000
connections), ``transfer`` (tunnel and file transfer MB/s next to a direct TCP copy),
``durable`` (acks after a SQLite commit), and, only when named, ``profile`` (where the
node's CPU goes per relayed frame, by layer, next to the echo's; needs py-spy) and
``instructions`` (instructions per relayed send through the protocol logic, counted by
valgrind: repeatable where timings are not).
Each server section starts its own node subprocess. Progress goes to stderr while the
sections run; the table of every number is printed at the end, after a header naming the
machine. A section that fails prints its error in the table (and its traceback on stderr);
the others still run. Last comes one row per target of the performance issue, with this run's
figure and whether it was met (``common.target``).
"""

from __future__ import annotations

import os
import platform
import sys
import time
import traceback
from collections.abc import Callable

from . import core, durable, instructions, latency, memory, profile, server, transfer, uplink
from .common import FROM_SESSION, SESSION_LIMIT_S, TARGETS, elapsed, target

__all__ = ["SECTIONS", "main"]

SECTIONS: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "core": core.run,
    "server": server.run,
    "voice": latency.run,
    "uplink": uplink.run,
    "memory": memory.run,
    "transfer": transfer.run,
    "durable": durable.run,
    "profile": profile.run,
    "instructions": instructions.run,
}
"""Section name -> function returning (label, value) rows."""

DEFAULT = ["core", "server", "voice", "uplink", "memory", "transfer", "durable"]
"""What runs without arguments: ``profile`` (sampling slows the node) and ``instructions``
(valgrind runs the code some 50 times slower) run when named."""

_WIDTH = 90
INSTALL_ROOM_S = 270.0
"""Sections that take less than this leave nox's install (about 20 s here) room in 5 minutes."""


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
    for name in names:
        t0 = time.monotonic()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            rows = SECTIONS[name]()
        except Exception as exc:  # a broken section must not hide the others' numbers
            traceback.print_exc()
            rows = [(f"{name}: FAILED", f"{type(exc).__name__}: {str(exc)[:200]}")]
        took = time.monotonic() - t0
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
    print()
    print(
        f"mux bench: {os.cpu_count()} CPUs, Python {platform.python_version()} ({platform.python_implementation()}),"
        f" {platform.system()} {platform.release()}, {total:.0f} s total;"
        " node: python -m mux serve --memory --open (auth OFF, per-connection rate limit OFF), loopback only"
    )
    width = min(_WIDTH, max(len(label) for label, _ in table))
    print(f"{'benchmark':<{width}} result")
    for label, value in table:
        print(f"{label:<{width}} {value}".rstrip())
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
