"""``python -m tests.bench`` ends with the performance issue's targets: each section records
its figures (``common.target``) and the table's last rows give each with whether it was met;
a default run adds its own time against the 5 minutes, and in a run slower than usual its
optional sections give way so that it stays within them."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.bench import __main__ as bench
from tests.bench import common


def _fake() -> list[tuple[str, str]]:
    common.target("batching at least 3x the single-frame relay rate", "4.20x", True)
    common.target("node CPU per relayed frame at most the seed's", "(b) 1.10 / (c) 0.30", "by (c)")
    common.target("memory within 5% after 10,000 channels open and close", "+20.0% (RSS)", False)
    return [("(x) a row", "1 thing/s")]


def test_the_targets_come_last_with_whether_each_was_met(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(bench.SECTIONS, "fake", _fake)
    common.target("left over from an earlier run", "?", True)
    assert bench.main(["fake"]) == 0
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(out) if line.startswith("== the performance issue's targets"))
    assert out.index(next(line for line in out if line.startswith("(x) a row"))) < at
    summary = out[at + 1 :]
    assert len(summary) == 3, "one row per target this run recorded, none from before"
    assert summary[0].split()[-3:] == ["4.20x", "met:", "yes"]
    assert summary[1].split()[-8:] == ["(b)", "1.10", "/", "(c)", "0.30", "met:", "by", "(c)"]
    assert summary[2].split()[-4:] == ["+20.0%", "(RSS)", "met:", "no"]


@pytest.mark.parametrize(
    ("from_session", "seconds", "figure", "met"),
    [
        (True, 250.0, "250 s since nox began the session, its install included", "yes"),
        (True, 297.0, "297 s since nox began the session, its install included", "no"),
        (False, 250.0, "s of sections (nox adds its install", "yes"),
    ],
)
def test_a_default_run_adds_its_own_time(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    from_session: bool,
    seconds: float,
    figure: str,
    met: str,
) -> None:
    monkeypatch.setitem(bench.SECTIONS, "fake", _fake)
    monkeypatch.setattr(bench, "DEFAULT", ["fake"])
    monkeypatch.setattr(bench, "FROM_SESSION", from_session)
    monkeypatch.setattr(bench, "elapsed", lambda: seconds)
    assert bench.main([]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert "nox -s bench under 5 minutes on a fresh clone" in last and figure in last
    assert last.endswith(f"met: {met}")


@pytest.mark.parametrize(
    ("work_s", "ran"), [(50.0, ["work", "extra", "needed", "tail"]), (100.0, ["work", "needed", "tail"])]
)
def test_in_a_slow_run_the_optional_sections_give_way(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], work_s: float, ran: list[str]
) -> None:
    """At the usual pace every section runs; at twice that (the first section took 100 s
    where 50 is usual), an optional section that would leave the required one after it no
    room in the budget (285 s) gives way, and one that fits still runs."""
    clock = [100.0]

    def section(name: str, seconds: float) -> Callable[[], list[tuple[str, str]]]:
        def run() -> list[tuple[str, str]]:
            clock[0] += seconds
            return [(f"({name}) its row", "1")]

        return run

    took = {"work": work_s, "extra": 30.0, "needed": 60.0, "tail": 5.0}
    for name, seconds in took.items():
        monkeypatch.setitem(bench.SECTIONS, name, section(name, seconds))
    monkeypatch.setattr(bench, "DEFAULT", list(took))
    monkeypatch.setattr(bench, "USUAL_S", {"work": 50.0, "extra": 30.0, "needed": 30.0, "tail": 5.0})
    monkeypatch.setattr(bench, "OPTIONAL", frozenset({"extra", "tail"}))
    monkeypatch.setattr(bench, "elapsed", lambda: clock[0])
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    assert [name for name in took if f"({name}) its row" in out] == ran
    if "extra" not in ran:  # at 200 s, 2 x (30 + 30) s would end past 285 s
        assert "extra: skipped" in out and "2.0x slower than usual" in out and "(at 200 s, 120 s needed)" in out
