"""nox sessions: tests, lowest (the tests on the oldest dependencies allowed), lint (ruff),
typecheck (mypy), bench (prints numbers)."""

from __future__ import annotations

import re
import time
import tomllib
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "lowest"]
nox.options.reuse_existing_virtualenvs = True


def _python() -> str | None:
    """The interpreter nox runs under, so a fresh machine needs only one Python."""
    return None


WORKERS = ("-n", "2")
"""pytest-xdist workers: most tests wait on a node subprocess, so two halve the suite's time on
a 2-core machine (about 5 minutes to 2.5). ``-- -n 0`` after the session runs it in one."""


@nox.session(python=_python())
def tests(session: nox.Session) -> None:
    """Install the package with test extras and run the whole test suite."""
    session.install("-e", ".[test]")
    session.run("pytest", *WORKERS, *session.posargs)


PYPROJECT = Path(__file__).with_name("pyproject.toml")


def lowest_pins(pyproject: Path = PYPROJECT) -> list[str]:
    """``name==X`` for every run-time dependency declared ``name>=X`` in ``pyproject.toml``."""
    declared = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = []
    for requirement in declared:
        found = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)", requirement)
        if found is None:
            raise ValueError(f"dependency without a lower bound: {requirement!r}")
        pins.append(f"{found[1]}=={found[2]}")
    return pins


@nox.session(python=_python())
def lowest(session: nox.Session) -> None:
    """The whole suite with every run-time dependency at the lowest version pyproject.toml
    allows (test tools at their newest): the declared lower bounds are ones that work."""
    session.install("-e", ".[test]", *lowest_pins())
    session.run("pytest", *WORKERS, *session.posargs)


@nox.session(python=_python())
def lint(session: nox.Session) -> None:
    """ruff over the package, backends, tests and this file."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "mux", "backends", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "mux", "backends", "tests", "noxfile.py")


@nox.session(python=_python())
def typecheck(session: nox.Session) -> None:
    """mypy --strict over mux and backends."""
    session.install("-e", ".[test]", "mypy>=1.10")
    session.run("mypy")


@nox.session(python=_python())
def bench(session: nox.Session) -> None:
    """Benchmarks on loopback; prints a table of numbers (no pass/fail). ``-- profile`` adds
    where the node's CPU goes per relayed frame (py-spy samples it)."""
    started = time.time()  # the bench's time budget counts the install too (tests/bench/common.py)
    session.install("-e", ".[test]")
    if "profile" in session.posargs:
        session.install("py-spy>=0.3")
    session.run("python", "-m", "tests.bench", *session.posargs, env={"MUX_BENCH_STARTED": f"{started:.3f}"})
