"""The arena census (``python -m tests.bench arenas``): it counts allocated blocks by the
pymalloc arena they are in, it names what it counts (objects by type, objects in free lists
or not reached, raw blocks by size), and its section runs on a real node."""

from __future__ import annotations

import collections
import gc
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests.bench import census, memory


class Thing:
    """A small object pymalloc holds."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n


class Wide:
    """A small object of another size class than :class:`Thing`."""

    __slots__ = tuple(f"f{i}" for i in range(20))


class Blob(bytes):
    """A bytes object with a name of its own, small or large."""


def _count(found: census.Census, name: str) -> int:
    return sum(kinds[name] for kinds in found.values())


def test_the_census_counts_each_small_object_once_by_its_arena() -> None:
    things = [Thing(i) for i in range(20_000)]
    wide = []
    for i in range(20_000):  # two size classes made in turn: their pools come from the same arenas
        things.append(Thing(i))
        wide.append(Wide())
    small = [Blob(b"x" * 40) for _ in range(300)]
    large = [Blob(b"x" * 4000) for _ in range(300)]  # over 512 bytes: malloc's, not in an arena
    names = [tuple(f"name-{i}-{j}" for j in range(10)) for i in range(500)]  # tuples the GC untracks
    gc.collect()  # (when it looks at them)
    found = census.census()
    assert not any(gc.is_tracked(t) for t in names)
    assert _count(found, "Thing") == 40_000 and _count(found, "Wide") == 20_000
    assert _count(found, "Blob") == 300  # the small ones only
    assert all(0 <= arena < 1 << 20 for arena in found)
    shared = [arena for arena, kinds in found.items() if kinds["Thing"] > 100 and kinds["Wide"] > 100]
    assert shared  # by arena, not by size class (which would keep the two apart)
    del things, wide, small, large
    strings = _count(found, "str")
    del names
    after = census.census()
    assert _count(after, "Thing") == 0
    assert 4_900 <= strings - _count(after, "str") <= 5_100  # the 5,000 strings in untracked tuples


async def test_blocks_no_walked_object_is_in_are_named_too() -> None:
    """A dict's table is a block of its own, named as the dict's storage; a freed tuple
    CPython keeps for reuse is in a free list; a string only a running function's untracked
    tuple holds is not reached by the walk; each is counted as that."""
    gc.collect()
    before = census.census()
    tables = [{f"k{j}": j for j in range(10)} for _ in range(2000)]  # each table a block of its own
    held = tuple(f"only-here-{i}" for i in range(300))
    gc.collect()  # untracks ``held`` (it holds only strings): nothing the walk lists reaches it
    assert not gc.is_tracked(held)
    spare = [tuple(range(i, i + 13)) for i in range(400)]
    del spare  # 400 tuples of 13 go to CPython's list of free tuples of that size
    found = census.census()
    assert _count(found, "storage of dict") - _count(before, "storage of dict") >= 1900
    assert _count(found, "free list: tuple") - _count(before, "free list: tuple") >= 350
    assert _count(found, "not reached: str") - _count(before, "not reached: str") >= 300
    assert len(tables) == 2000 and len(held) == 300


def test_names_say_which_function_a_coroutine_or_closure_is() -> None:
    async def waiting() -> None:
        pass

    value = Thing(1)

    def closure() -> Thing:
        return value

    coro = waiting()
    try:
        assert census.type_name(coro).startswith("coroutine ") and census.type_name(coro).endswith(".waiting")
    finally:
        coro.close()
    assert census.type_name(closure).endswith(".closure") and census.type_name(closure).startswith("function ")
    assert closure.__closure__ is not None
    assert census.type_name(closure.__closure__[0]) == "cell of Thing"
    assert census.type_name(types.CellType()) == "cell (empty)"
    assert census.type_name(Thing(2)) == "Thing"


def test_the_rows_count_the_arenas_the_burst_added_and_what_holds_them() -> None:
    c = collections.Counter
    before = {0: c(str=5), 1: c(str=5)}
    peak = {0: c(str=5), 1: c(str=5), 2: c(End=900), 3: c(End=800), 4: c(End=700)}
    after = {0: c(str=5), 1: c(str=4), 2: c(End=1, dict=2), 3: c(End=40, coroutine=3)}
    after[3]["free list: tuple"] = 5
    after[3]["raw 32 B"] = 1
    rows = dict(census.census_rows(before, peak, after, (100 * 1024, 110 * 1024)))
    assert rows["(census) pymalloc arenas in use: before the channels opened / open / closed"] == (
        "       2 / 5 / 4 (1 MiB each; RSS 100.0 -> 110.0 MiB, +10.0%)"
    )
    assert rows["(census) arenas the burst added, still in use after the channels closed"] == (
        "       2 holding 52 blocks (46 objects the walk reached), of 1700 at the peak; 1 of them held by 10"
        " blocks or fewer"
    )
    assert rows["(census) blocks in each of those arenas, fewest first"] == "3, 49"
    assert rows["(census) what those blocks hold, most first"] == (
        "41 End; 5 free list: tuple; 3 coroutine; 2 dict; 1 raw 32 B"
    )


def test_the_census_node_refuses_without_pymalloc_or_a_directory(tmp_path: Path) -> None:
    base = {**os.environ, "MUX_BENCH_CENSUS_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "tests.bench.census", "serve", "--memory", "--open", "--port", "0"]
    done = subprocess.run(cmd, env={**base, "PYTHONMALLOC": "malloc"}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "error: the arena census needs CPython's pymalloc (PYTHONMALLOC unset)" in done.stderr
    del base["MUX_BENCH_CENSUS_DIR"]
    done = subprocess.run(cmd, env=base, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "MUX_BENCH_CENSUS_DIR must name the directory" in done.stderr


def test_the_arenas_section_takes_a_census_of_a_real_node_at_each_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A served node, a few connections and channels: the census files come at each step of
    the memory section's cycle, and the rows say what they found."""
    monkeypatch.setattr(memory, "SETTLE_S", 0.05)
    monkeypatch.setattr(memory, "SETTLE_MAX_S", 0.1)
    states: dict[tuple[str, str], int] = {}
    real = census.Taker.observe

    async def observe(self: census.Taker, tag: str, step: str) -> None:
        await real(self, tag, step)
        states[(tag, step)] = _count(self.taken[(tag, step)], "ChannelState")

    monkeypatch.setattr(census.Taker, "observe", observe)
    rows = census.run(12, 3, 2)
    steps = ["connections", "channels", "closed", "gone"]
    assert list(states) == [("warm", step) for step in steps] + [("m0", step) for step in steps]
    assert states[("warm", "channels")] - states[("warm", "connections")] == 20  # the warm-up's channels
    assert states[("m0", "channels")] - states[("m0", "connections")] == 6  # this cycle's, open
    labels = [label for label, _ in rows]
    assert labels[:4] == [
        "(census) pymalloc arenas in use: before the channels opened / open / closed",
        "(census) arenas the burst added, still in use after the channels closed",
        "(census) blocks in each of those arenas, fewest first",
        "(census) what those blocks hold, most first",
    ]
    in_use = [int(n) for n in rows[0][1].split("(")[0].split("/")]
    assert len(in_use) == 3 and all(n > 0 for n in in_use)


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [(("--jemalloc",), {}, "--jemalloc"), ((), {"PYTHONMALLOC": "malloc"}, "PYTHONMALLOC=malloc")],
)
def test_the_section_says_so_when_its_node_would_not_run_on_pymalloc(
    monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], env: dict[str, str], says: str
) -> None:
    from tests.bench import common

    monkeypatch.setattr(common, "NODE_ARGS", args)
    monkeypatch.setattr(common, "NODE_ENV", {**common.NODE_ENV, **env})
    assert census.run(12, 3, 2) == [
        ("(census)", f"n/a: the arena census needs CPython's pymalloc, and the node would run with {says}")
    ]


def test_the_census_refuses_a_free_threaded_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    with pytest.raises(RuntimeError, match="free-threaded build allocates with mimalloc"):
        census.census()
