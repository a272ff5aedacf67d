"""``python -m tests.bench`` ends with the performance issue's targets: each section records
its figures (``common.target``) and the table's last rows give each with whether it was met;
a default run adds its own time against the 5 minutes."""

from __future__ import annotations

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
