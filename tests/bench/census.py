"""Which blocks keep CPython's allocator from giving memory back after a burst of channels.

Run: ``python -m tests.bench arenas`` (not part of the default run). CPython's small-object
allocator (pymalloc) takes memory from the system in 1 MiB arenas of 16 KiB pools and gives
an arena back only once no block is left allocated in any of its pools. This section runs
the memory section's cycle once (2,000 connections, 10,000 channels opened and closed) on a
node that counts, at each step, the allocated blocks in every arena and what they hold, and
prints the arenas the burst of channels added that were still in use after the channels
closed, and what was in them.

How this works: the node is ``python -m tests.bench.census serve ...`` (``mux serve`` with
a ``SIGUSR1`` handler). On the signal, :func:`census` first reads every pool in use (found
by its header at each 16 KiB boundary of the process's anonymous mappings; CPython 3.11+'s
``pool_header``) and lists its allocated blocks, those below its first never-used block and
off its free list, with the pool's arena index. Then it walks every object the garbage
collector tracks and the untracked ones reached from them (strings, bytes, numbers, tuples
of those), and names each block: the type of the object in it, or, for a block no walked
object is in, the type its header names (``not reached: T``; ``free list: T`` with a zero
reference count, as in CPython's lists of freed tuples, lists, dicts and floats) or its size
(``raw N B``: the storage of a dict, a list or an object's attributes). It counts the blocks
by arena and kind and writes that to ``MUX_BENCH_CENSUS_DIR/census-N.json``. Objects the node
made at start-up are frozen (``gc.freeze``) and not walked: they count as ``not reached``,
in the arenas of start-up. The memory section's cycle calls :meth:`Taker.observe` after each
of its readings, which signals the node and waits for the file. Arena indices are slots in
pymalloc's table: an arena given back during the burst and another one taken in its slot
would count as one. Only meaningful under pymalloc (the node's default): under
``PYTHONMALLOC=malloc`` (``serve --jemalloc``) there are no arenas, and the section says so
instead of starting a node.
"""

from __future__ import annotations

import array
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
_POOL_OVERHEAD = 48
"""``struct pool_header``'s size: its count, free list, two links, then ``arenaindex``,
``szidx``, ``nextoffset`` and ``maxnextoffset`` (four 32-bit fields)."""
_ALIGNMENT = 16
"""pymalloc's block sizes are multiples of this (size class ``szidx`` holds ``(szidx + 1) * 16`` bytes)."""
_GC_HEAD = 16
"""The collector's header before every object it tracks (3.11+: two words)."""
SMALL_BYTES = 512
"""pymalloc's largest block: bigger objects come from ``malloc``."""
_DIR_ENV = "MUX_BENCH_CENSUS_DIR"
CENSUS_TIMEOUT_S = 60.0
CENSUS_POLL_S = 0.05

Census = dict[int, collections.Counter[str]]
"""Allocated blocks per arena index, counted by what they hold (:func:`census`)."""


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


def _pool_blocks(spans: list[tuple[int, int]]) -> array.array[int]:
    """Every allocated block in every pymalloc pool in use, as pairs (address, size |
    arena << 32). Pools are found by their headers at every 16 KiB boundary of the anonymous
    mappings; a block is allocated when it lies below the pool's first never-used block
    (``nextoffset``) and is not on the pool's free list. What this makes goes to ``malloc``
    (the array and each pool's copy) or is freed at once, so it leaves the pools as found."""
    found: array.array[int] = array.array("Q")
    for start, end in spans:
        pool = (start + POOL_BYTES - 1) & ~(POOL_BYTES - 1)
        while pool + POOL_BYTES <= end:
            words = memoryview(ctypes.string_at(pool, POOL_BYTES)).cast("Q")
            count, arena, szidx = words[0] & 0xFFFFFFFF, words[4] & 0xFFFFFFFF, words[4] >> 32
            next_offset, max_next = words[5] & 0xFFFFFFFF, words[5] >> 32
            size = (szidx + 1) * _ALIGNMENT
            if (
                count
                and szidx < SMALL_BYTES // _ALIGNMENT
                and _POOL_OVERHEAD <= next_offset <= POOL_BYTES
                and max_next == POOL_BYTES - size
                and count <= (POOL_BYTES - _POOL_OVERHEAD) // size
            ):
                free = set()
                block = words[1]
                while block:
                    if not pool + _POOL_OVERHEAD <= block < pool + POOL_BYTES or len(free) > count + 2048:
                        free = None  # not a pool after all
                        break
                    free.add(block - pool)
                    block = words[(block - pool) // 8]
                if free is not None:
                    tag = size | arena << 32
                    for offset in range(_POOL_OVERHEAD, next_offset, size):
                        if offset not in free:
                            found.append(pool + offset)
                            found.append(tag)
            pool += POOL_BYTES
    return found


def _known_types(objects: dict[int, object]) -> dict[int, type]:
    """Every type reachable from ``object`` by subclassing, and the walked objects' types, by address."""
    types: dict[int, type] = {}
    todo: list[type] = [object, *(type(obj) for obj in objects.values())]
    while todo:
        kind = todo.pop()
        if id(kind) in types:
            continue
        types[id(kind)] = kind
        try:
            todo.extend(type.__subclasses__(kind))
        except TypeError:
            pass
    return types


_NONE = object()
"""No walked object at an address (an empty container found there is falsy, not absent)."""


_OWNER_WORDS = 8
"""An object's first words, read for pointers to the raw blocks it owns: a list's items, a
dict's table and values, a set's table, a bytearray's buffer."""
_VALUES_AT = -4
"""Where, in words from the object, CPython 3.11+ keeps the pointer to the attribute values
of an object whose ``__dict__`` it manages (``Py_TPFLAGS_MANAGED_DICT``)."""
_MANAGED_DICT = 1 << 4
_OWNING = (dict, list, set, frozenset, bytearray)
"""Types whose instances keep their contents in a block of their own."""


def _unwalked(address: int, size: int, types: dict[int, type]) -> str:
    """What an allocated block no walked object is in holds: an object all the same
    (``not reached: T``; ``free list: T`` when its reference count is 0, as in CPython's lists
    of freed tuples, lists, dicts and floats), or no object (``raw N B``; :func:`_owners`
    names the reached objects whose storage it is)."""
    words = memoryview(ctypes.string_at(address, min(size, 48))).cast("Q")
    for at in (0, 2):  # the object itself, then past a collector header
        if len(words) > at + 1 and words[at + 1] in types:
            kind = types[words[at + 1]]
            return f"{'free list' if words[at] == 0 else 'not reached'}: {kind.__qualname__}"
    return f"raw {size} B"


def _owners(raw: set[int], placed: list[int], objects: dict[int, object]) -> dict[int, str]:
    """For raw blocks (addresses) a reached object points to, from its first words (a
    container of :data:`_OWNING`) or its managed attribute values: ``storage of T``.
    ``placed``: the addresses of the reached objects in pymalloc's pools (not pairs: freed,
    2,000 of them would stay in CPython's free list of tuples, in the pools the census itself
    took); what is read stays within each one's pool."""
    owners: dict[int, str] = {}
    for address in placed:
        obj = objects[address]
        managed = type(obj).__flags__ & _MANAGED_DICT
        if not managed and not isinstance(obj, _OWNING):
            continue
        pool = address & ~(POOL_BYTES - 1)
        start = max(address + 8 * _VALUES_AT, pool + _POOL_OVERHEAD) if managed else address
        end = min(address + 8 * _OWNER_WORDS, pool + POOL_BYTES)
        for word in memoryview(ctypes.string_at(start, end - start)).cast("Q"):
            if word in raw and word not in owners:
                owners[word] = f"storage of {type(obj).__qualname__}"
    return owners


def census() -> Census:
    """Count this process's allocated pymalloc blocks by arena and by what they hold: the
    type of the walked object in it (at the block, past the collector's header, or past that
    and a managed ``__dict__``'s two pointers), else :func:`_unwalked` and :func:`_owners`
    (RuntimeError when pymalloc is not the allocator). The pools are read first, before the
    census makes anything."""
    if os.environ.get("PYTHONMALLOC", "pymalloc") not in ("pymalloc", "pymalloc_debug") or not sys.getallocatedblocks():
        raise RuntimeError("the arena census needs CPython's pymalloc (PYTHONMALLOC unset)")
    if not getattr(sys, "_is_gil_enabled", lambda: True)():
        raise RuntimeError("the arena census needs CPython's pymalloc (a free-threaded build allocates with mimalloc)")
    blocks = _pool_blocks(_anonymous_mappings())
    objects = {id(obj): obj for obj in _objects()}  # those over 512 bytes are in no block: never looked up
    types = _known_types(objects)
    get = objects.get
    kinds: list[str] = []
    for i in range(0, len(blocks), 2):
        address, size = blocks[i], blocks[i + 1] & 0xFFFFFFFF
        obj = get(address, _NONE)
        if obj is _NONE and size > _GC_HEAD:
            obj = get(address + _GC_HEAD, _NONE)  # an object the collector tracks has its header first
            if obj is _NONE and size > 2 * _GC_HEAD:
                obj = get(address + 2 * _GC_HEAD, _NONE)  # and its managed attributes' pointers before that
        kinds.append(type_name(obj) if obj is not _NONE else _unwalked(address, size, types))
    raw = {blocks[2 * i] for i, kind in enumerate(kinds) if kind.startswith("raw ")}
    pools = {blocks[i] & ~(POOL_BYTES - 1) for i in range(0, len(blocks), 2)}
    placed = [address for address in objects if address & ~(POOL_BYTES - 1) in pools]
    owners = _owners(raw, placed, objects)
    objects.clear()  # it holds its own cell (the comprehensions' closure): no cycle left for the collector
    placed.clear()
    counts: Census = collections.defaultdict(collections.Counter)
    for i, kind in enumerate(kinds):
        address, tag = blocks[2 * i], blocks[2 * i + 1]
        counts[tag >> 32][owners.get(address, kind) if kind.startswith("raw ") else kind] += 1
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


_NOT_OBJECTS = ("not reached: ", "free list: ", "raw ", "storage of ")


def census_rows(before: Census, peak: Census, after: Census, rss: tuple[int, int]) -> list[tuple[str, str]]:
    """Rows for the arenas in use after the channels closed that were not in use before they
    opened: how many, the blocks they held at the peak and after, and what keeps them."""
    added = sorted(set(after) - set(before))
    held = {arena: after[arena] for arena in added}
    holding = sorted(sum(types.values()) for types in held.values())
    kinds: collections.Counter[str] = collections.Counter()
    for types in held.values():
        kinds.update(types)
    at_peak = sum(sum(peak.get(arena, {}).values()) for arena in added)
    few = sum(1 for n in holding if n <= 10)
    objects = sum(n for kind, n in kinds.items() if not kind.startswith(_NOT_OBJECTS))
    rss_before, rss_after = rss
    change = (rss_after - rss_before) / max(1, rss_before) * 100
    return [
        (
            "(census) pymalloc arenas in use: before the channels opened / open / closed",
            f"{len(before):8d} / {len(peak)} / {len(after)} (1 MiB each; RSS {rss_before / 1024:.1f} ->"
            f" {rss_after / 1024:.1f} MiB, {change:+.1f}%)",
        ),
        (
            "(census) arenas the burst added, still in use after the channels closed",
            f"{len(added):8d} holding {sum(holding)} blocks ({objects} objects the walk reached), of {at_peak}"
            f" at the peak; {few} of them held by 10 blocks or fewer",
        ),
        ("(census) blocks in each of those arenas, fewest first", f"{', '.join(map(str, holding)) or 'none'}"),
        (
            "(census) what those blocks hold, most first",
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
        with node_process("--no-jemalloc", nofile=need, env={_DIR_ENV: tmp}, module="tests.bench.census") as node:
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
