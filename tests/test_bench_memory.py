"""The memory benchmark keeps ``nox -s bench`` within its time: its later cycles run only
while the bench's budget has room for them (a real node subprocess, a few connections)."""

from __future__ import annotations

import ctypes.util
import os
import re
import time
from pathlib import Path

import pytest
import trio

from tests.bench import common, memory
from tests.bench.common import node_process

SMALL = {"connections": 6, "openers": 2, "per_opener": 2}
ALLOCATOR = "jemalloc" if ctypes.util.find_library("jemalloc") else "pymalloc over malloc"
"""What a bench node runs on: ``serve`` goes to jemalloc wherever it is installed."""


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short settles: a handful of channels needs no time to settle."""
    monkeypatch.setattr(memory, "SETTLE_S", 0.05)
    monkeypatch.setattr(memory, "SETTLE_MAX_S", 0.1)


@pytest.mark.parametrize(("left_s", "cycles"), [(1e6, memory.CYCLES), (0.0, 1)])
async def test_later_cycles_run_only_within_the_bench_s_budget(
    quick: None, monkeypatch: pytest.MonkeyPatch, left_s: float, cycles: int
) -> None:
    monkeypatch.setattr(memory, "seconds_left", lambda: left_s)
    with node_process() as node:
        res = await memory.memory_run(node, **SMALL)
    assert len(res.cycles) == cycles
    for cycle in res.cycles:
        assert cycle.opened == SMALL["openers"] * SMALL["per_opener"] and not cycle.errors
        assert cycle.allocator == ALLOCATOR  # as the node's /status says
    if cycles < memory.CYCLES:
        assert res.skipped.startswith(f"the bench's {common.BENCH_BUDGET_S:.0f} s would not hold another")
    else:
        assert res.skipped == ""
    common.TARGETS.clear()
    rows = dict(memory.report(res, **SMALL))
    held = next(value for label, value in rows.items() if "WS connections held" in label)
    assert held.endswith(f"; allocator: {ALLOCATOR}")
    unit = "KiB" if ALLOCATOR == "jemalloc" else "blocks"
    live = next(value for label, value in rows.items() if label.startswith(f"(e) live heap, {unit} "))
    counts = [int(n) for n in live.split(" (")[0].split(" / ")]
    assert len(counts) == 5 and all(n > 0 for n in counts)  # jemalloc's allocated KiB, or pymalloc's blocks
    kept = [value for label, value in rows.items() if "keeps, under jemalloc" in label or "keeps, against" in label]
    if ALLOCATOR == "jemalloc":
        assert len(kept) == 2  # after the channels close; after the connections close too
        for line in kept:
            assert " MiB held by objects, " in line and line.endswith(" MiB free pages not yet given back")
        assert all(0 < c.jemalloc_conns["allocated"] <= c.jemalloc_conns["active"] for c in res.cycles)
    else:
        assert kept == []
    per_channel, back = common.TARGETS  # the section's two targets, for the bench's summary
    assert per_channel.name == "under 4 KiB per idle open channel" and per_channel.figure.endswith(" KiB")
    assert back.name == "memory within 5% after 10,000 channels open and close"
    assert back.figure.count(", cycle ") == cycles - 1


async def test_the_bench_s_nodes_take_the_arguments_it_is_given(
    quick: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``MUX_BENCH_NODE_ARGS`` reaches the node: a node told (by a settings file whose name
    needs quoting) to keep no frames and no closed channels ends the memory section with
    one chain in its ledger, where a default node keeps every channel's."""
    config = tmp_path / "relay only.toml"
    config.write_text("memory_ledger_bytes = 0\n[mux]\nclosed_retention = 0\n")
    monkeypatch.setattr(memory, "seconds_left", lambda: 0.0)
    assert common.NODE_ARGS == ()
    with node_process() as default:
        res_default = await memory.memory_run(default, **SMALL)
    monkeypatch.setattr(common, "NODE_ARGS", common.node_args(f"--config '{config}'"))
    assert common.NODE_ARGS == ("--config", str(config))
    with node_process() as node:
        res = await memory.memory_run(node, **SMALL)
    assert res_default.cycles[0].ledger_closed["chains"] == 20 + 4  # the warm-up's and the cycle's
    (cycle,) = res.cycles
    assert cycle.opened == 4 and cycle.ledger_closed["chains"] == 1


def test_the_budget_counts_down_from_the_bench_s_start(monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.monotonic()
    monkeypatch.setattr(common, "_STARTED", now - 100.0)
    assert common.BENCH_BUDGET_S - 101.0 < common.seconds_left() <= common.BENCH_BUDGET_S - 100.0
    monkeypatch.setattr(common, "_STARTED", now - common.BENCH_BUDGET_S - 1.0)
    assert common.seconds_left() < 0


def test_the_budget_counts_from_the_start_nox_gives() -> None:
    start, from_session = common._started({"MUX_BENCH_STARTED": str(time.time() - 40.0)})
    assert from_session and 39.0 < time.monotonic() - start < 41.0  # the install counts too
    for bad in ("", "soon", str(time.time() + 60.0), str(time.time() - 7200.0)):
        start, from_session = common._started({"MUX_BENCH_STARTED": bad})
        assert not from_session and time.monotonic() - start < 1.0, bad


def test_cpu_per_item_is_a_bound_when_no_clock_tick_was_counted() -> None:
    """The kernel counts CPU in clock ticks: a few connections can cost less than one, and the
    row then gives the bound (one tick over the count), never a zero."""
    tick = os.sysconf("SC_CLK_TCK")
    assert common.cpu_each(0.03, 20, "ms") == "1.50 ms"
    assert common.cpu_each(0.0015, 10, "us") == "150 us"
    assert common.cpu_each(0.0, 6, "ms") == f"under {1e3 / tick / 6:.2f} ms"
    assert common.cpu_each(0.0, 0, "us") == f"under {1e6 / tick:.0f} us"


def test_the_node_s_environment_takes_key_value_words() -> None:
    """``MUX_BENCH_NODE_ENV`` (what the bench adds to its nodes' environment) is KEY=VALUE
    words with shell quoting; anything else is refused by name rather than ignored."""
    assert common.node_env("") == {}
    assert common.node_env("PYTHONMALLOC=malloc LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF='narenas:1,a b'") == {
        "PYTHONMALLOC": "malloc",
        "LD_PRELOAD": "libjemalloc.so.2",
        "MALLOC_CONF": "narenas:1,a b",
    }
    assert common.node_env("EMPTY=") == {"EMPTY": ""}
    for bad in ("PYTHONMALLOC", "=x", "A=1 jemalloc"):
        with pytest.raises(ValueError, match="is not KEY=VALUE"):
            common.node_env(bad)


async def test_the_memory_section_runs_on_the_readme_s_node_too(quick: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m tests.bench memory-sqlite``: the same cycle on a node keeping its ledger in
    SQLite in a data directory; its rows and targets say so."""
    monkeypatch.setattr(memory, "seconds_left", lambda: 0.0)
    common.TARGETS.clear()
    rows = await trio.to_thread.run_sync(lambda: memory.run_sqlite(**SMALL))
    assert rows and all(label.startswith("(e, SQLite store) ") for label, _ in rows)
    assert not any("in-memory ledger" in label for label, _ in rows)  # its ledger is on disk
    held = next(value for label, value in rows if "WS connections held" in label)
    assert held.endswith(f"; allocator: {ALLOCATOR}")
    per_connection = re.search(r", node (under )?(\d+\.\d+) ms CPU/connection;", held)
    assert per_connection is not None and float(per_connection[2]) > 0, held  # six may fit in one tick
    assert [t.name for t in common.TARGETS] == [
        "under 4 KiB per idle open channel (SQLite store)",
        "memory within 5% after 10,000 channels open and close (SQLite store)",
    ]
    common.TARGETS.clear()
