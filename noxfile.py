"""nox sessions: tests, lint (ruff), typecheck (mypy), bench (prints numbers)."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True


def _python() -> str | None:
    """The interpreter nox runs under, so a fresh machine needs only one Python."""
    return None


@nox.session(python=_python())
def tests(session: nox.Session) -> None:
    """Install the package with test extras and run the whole test suite."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


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
    session.install("-e", ".[test]")
    if "profile" in session.posargs:
        session.install("py-spy>=0.3")
    session.run("python", "-m", "tests.bench", *session.posargs)
