"""Which objects keep CPython's allocator from giving memory back after a burst of channels.

Run: ``python -m tests.bench arenas`` (not part of the default run). CPython's small-object
allocator (pymalloc) takes memory from the system in 1 MiB arenas of 16 KiB pools and gives
an arena back only once no object is left in any of its pools. This section runs the memory
section's cycle once (2,000 connections, 10,000 channels opened and closed) on a node that
counts, at each step, the objects in every arena, and prints the arenas the burst of
channels added that were still in use after the channels closed, and what was in them.

How this works: the node is ``python -m tests.bench.census serve ...`` (``mux serve`` with
a ``SIGUSR1`` handler). On the signal, :func:`census` walks every object the garbage
collector tracks and the untracked ones reached from them (strings, bytes, numbers, tuples
of those), keeps those pymalloc holds (at most 512 bytes, in an anonymous mapping), reads
the arena index from the header of the pool the object is in (CPython 3.11+'s
``pool_header``: ``arenaindex`` at byte 32) and counts the objects by arena and type; it
writes that to ``MUX_BENCH_CENSUS_DIR/census-N.json``. What the node made at start-up is
not counted: the node freezes it (``gc.freeze``), and the collector lists no frozen object.
The memory section's cycle calls :meth:`Taker.observe` after each of its readings, which
signals the node and waits for the file. Arena indices are slots in pymalloc's table: an
arena given back during the burst and another one taken in its slot would count as one.
Only meaningful under pymalloc (the node's default): under ``PYTHONMALLOC=malloc`` (``serve
--jemalloc``) there are no arenas, and the section says so instead of starting a node.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

__all__ = ["POOL_BYTES", "Census", "census", "census_rows", "install", "run", "type_name"]

POOL_BYTES = 16 * 1024
"""pymalloc's pool size on 64-bit CPython 3.11+: a pool starts at its address rounded down."""
_ARENA_INDEX_AT = 32
"""Offset of ``arenaindex`` in ``struct pool_header`` (a union, three pointers, then it)."""
SMALL_BYTES = 512
"""pymalloc's largest block: bigger objects come from ``malloc``."""
_DIR_ENV = "MUX_BENCH_CENSUS_DIR"
CENSUS_TIMEOUT_S = 60.0
CENSUS_POLL_S = 0.05

Census = dict[int, collections.Counter[str]]
"""Live objects per arena index, counted by type name."""


def type_name(obj: object) -> str:
    """The object's type, with the function or coroutine it is, or what a cell holds."""
    name = type(obj).__qualname__
    if name in ("coroutine", "function", "generator", "method"):
        qualname = getattr(obj, "__qualname__", None)
        return f"{name} {qualname}" if qualname else name
    if name == "cell":
        try:
            return f"cell of {type(obj.cell_contents).__qualname__}"  # type: ignore[attr-defined]
        except ValueError:
            return "cell (empty)"
    return name


def _anonymous_mappings() -> list[tuple[int, int]]:
    """``(start, end)`` of this process's anonymous read-write mappings (where pymalloc's
    arenas are), sorted."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) == 5 and fields[1].startswith("rw"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end))
    return sorted(spans)


def _within(spans: list[tuple[int, int]], addr: int) -> bool:
    lo, hi = 0, len(spans)
    while lo < hi:
        mid = (lo + hi) // 2
        if spans[mid][1] <= addr:
            lo = mid + 1
        else:
            hi = mid
    return lo < len(spans) and spans[lo][0] <= addr


def _objects() -> Iterator[object]:
    """Every object the garbage collector tracks (but the permanent generation: what the
    node froze at start-up, ``mux.heap.freeze_startup``), and the untracked ones they refer
    to, directly or through untracked containers (a tuple of strings), each once."""
    seen: set[int] = set()
    for obj in gc.get_objects():
        if id(obj) not in seen:
            seen.add(id(obj))
            yield obj
        untracked = [ref for ref in gc.get_referents(obj) if not gc.is_tracked(ref)]
        while untracked:
            ref = untracked.pop()
            if id(ref) not in seen:
                seen.add(id(ref))
                yield ref
                untracked.extend(inner for inner in gc.get_referents(ref) if not gc.is_tracked(inner))


def census() -> Census:
    """Count this process's live small objects by pymalloc arena and type (RuntimeError when
    pymalloc is not the allocator)."""
    if os.environ.get("PYTHONMALLOC", "pymalloc") not in ("pymalloc", "pymalloc_debug") or not sys.getallocatedblocks():
        raise RuntimeError("the arena census needs CPython's pymalloc (PYTHONMALLOC unset)")
    if not getattr(sys, "_is_gil_enabled", lambda: True)():
        raise RuntimeError("the arena census needs CPython's pymalloc (a free-threaded build allocates with mimalloc)")
    gc.collect()
    spans = _anonymous_mappings()
    counts: Census = collections.defaultdict(collections.Counter)
    for obj in _objects():
        try:
            if sys.getsizeof(obj) > SMALL_BYTES:
                continue
        except TypeError:
            continue
        pool = id(obj) & ~(POOL_BYTES - 1)
        if not _within(spans, pool):
            continue  # a static object (in the interpreter's image), not pymalloc's
        arena = int.from_bytes(ctypes.string_at(pool + _ARENA_INDEX_AT, 4), "little")
        counts[arena][type_name(obj)] += 1
    return dict(counts)


def install(directory: str) -> None:
    """Write a census to ``directory/census-N.json`` (N = 1, 2, ...) on each ``SIGUSR1``."""
    taken = 0

    def take(signum: int, frame: Any) -> None:
        nonlocal taken
        taken += 1
        found = census()
        path = Path(directory, f"census-{taken}.json")
        part = path.with_suffix(".part")
        part.write_bytes(orjson.dumps({str(arena): dict(types) for arena, types in found.items()}))
        part.rename(path)

    signal.signal(signal.SIGUSR1, take)


def _read(path: Path) -> Census:
    return {int(arena): collections.Counter(types) for arena, types in orjson.loads(path.read_bytes()).items()}


@attrs.define
class Taker:
    """Asks a census node for a census and reads it (``observe`` for the memory section)."""

    pid: int
    directory: Path
    taken: dict[tuple[str, str], Census] = attrs.field(factory=dict)

    async def observe(self, tag: str, step: str) -> None:
        """Take a census of the node now, kept under ``(tag, step)``."""
        path = self.directory / f"census-{len(self.taken) + 1}.json"
        os.kill(self.pid, signal.SIGUSR1)
        for _ in range(int(CENSUS_TIMEOUT_S / CENSUS_POLL_S)):
            if path.exists():
                self.taken[(tag, step)] = _read(path)
                return
            await trio.sleep(CENSUS_POLL_S)
        raise TimeoutError(f"the census node wrote no {path.name} within {CENSUS_TIMEOUT_S:.0f} s")


def census_rows(before: Census, peak: Census, after: Census, rss: tuple[int, int]) -> list[tuple[str, str]]:
    """Rows for the arenas in use after the channels closed that were not in use before they
    opened: how many, what they held at the peak and after, and what keeps them."""
    added = sorted(set(after) - set(before))
    held = {arena: after[arena] for arena in added}
    holding = sorted(sum(types.values()) for types in held.values())
    kinds: collections.Counter[str] = collections.Counter()
    for types in held.values():
        kinds.update(types)
    at_peak = sum(sum(peak.get(arena, {}).values()) for arena in added)
    few = sum(1 for n in holding if n <= 10)
    rss_before, rss_after = rss
    change = (rss_after - rss_before) / max(1, rss_before) * 100
    return [
        (
            "(census) pymalloc arenas holding objects made since start-up: before the channels opened / open / closed",
            f"{len(before):8d} / {len(peak)} / {len(after)} (1 MiB each; RSS {rss_before / 1024:.1f} ->"
            f" {rss_after / 1024:.1f} MiB, {change:+.1f}%)",
        ),
        (
            "(census) arenas the burst added, still in use after the channels closed",
            f"{len(added):8d} holding {sum(holding)} objects, of {at_peak} at the peak; {few} of them held by"
            " 10 objects or fewer",
        ),
        ("(census) objects in each of those arenas, fewest first", f"{', '.join(map(str, holding)) or 'none'}"),
        (
            "(census) what those objects are, most first",
            "; ".join(f"{n} {name}" for name, n in kinds.most_common(10)) or "nothing",
        ),
    ]


async def _census_run(node: Any, connections: int, openers: int, per_opener: int, taker: Taker) -> Any:
    from . import memory

    return await memory.memory_run(node, connections, openers, per_opener, cycles=1, observe=taker.observe)


def _other_allocator(args: tuple[str, ...], env: dict[str, str]) -> str | None:
    """What would keep a bench node off pymalloc (``--jemalloc``, ``PYTHONMALLOC``), or None."""
    if "--jemalloc" in args:
        return "--jemalloc"
    malloc = env.get("PYTHONMALLOC", "pymalloc")
    return None if malloc in ("pymalloc", "pymalloc_debug") else f"PYTHONMALLOC={malloc}"


def run(
    connections: int | None = None, openers: int | None = None, per_opener: int | None = None
) -> list[tuple[str, str]]:
    """Run the memory section's cycle once on a census node; rows."""
    from . import common, memory
    from .common import node_process, raise_nofile

    other = _other_allocator(common.NODE_ARGS, {**os.environ, **common.NODE_ENV})
    if other is not None:
        return [("(census)", f"n/a: the arena census needs CPython's pymalloc, and the node would run with {other}")]
    connections = memory.CONNECTIONS if connections is None else connections
    openers = memory.OPENERS if openers is None else openers
    per_opener = memory.PER_OPENER if per_opener is None else per_opener
    need = connections + 1024
    soft, _ = raise_nofile(need)
    if soft < need:
        return [("(census)", f"n/a: open-file limit {soft} < {need} (raise the hard limit: ulimit -Hn)")]
    with tempfile.TemporaryDirectory() as tmp:
        with node_process(nofile=need, env={_DIR_ENV: tmp}, module="tests.bench.census") as node:
            taker = Taker(node.pid, Path(tmp))
            started = time.monotonic()
            result = trio.run(_census_run, node, connections, openers, per_opener, taker)
    cycle = result.cycles[0]
    tag = next(t for t, step in taker.taken if t != "warm")
    rows = census_rows(
        taker.taken[(tag, "connections")],
        taker.taken[(tag, "channels")],
        taker.taken[(tag, "closed")],
        (cycle.rss_conns, cycle.rss_closed),
    )
    rows.append(("(census) the section took", f"{time.monotonic() - started:8.0f} s"))
    return rows


def _serve() -> int:
    """``python -m tests.bench.census serve ...``: ``mux serve`` taking a census on ``SIGUSR1``."""
    from mux.cli import main

    directory = os.environ.get(_DIR_ENV)
    if not directory:
        print(f"error: {_DIR_ENV} must name the directory the census files go to", file=sys.stderr)
        return 2
    try:
        census()  # refuses now, not at the first signal, when pymalloc is not the allocator
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    install(directory)
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(_serve())
