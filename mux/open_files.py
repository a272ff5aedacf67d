"""The process's limit on open files (``RLIMIT_NOFILE``), raised so a node can hold its connections.

Every WebSocket connection holds a file descriptor, as do a tunnel's TCP connection, a file
transfer's file, the SQLite store's files and the listeners. Most Linux shells and services
start with a soft limit of 1024 and a far higher hard limit (524288 under systemd), and a
process past its soft limit cannot accept another connection (``EMFILE``). So a node left at
that soft limit would stop taking connections at about a thousand, well below its
``max_connections`` (10,000). Like Go's runtime, ``python -m mux serve`` raises its soft limit
to the hard one at start (:func:`raise_limit`), and warns when even that leaves less room than
``max_connections`` needs (:func:`warn_if_short`). ``/status`` ``open_files`` gives the limit and
how many descriptors are open (:func:`status`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import attrs

try:
    import resource
except ImportError:  # Windows: no such limit to raise
    resource = None  # type: ignore[assignment]

__all__ = ["RESERVED", "OpenFiles", "in_use", "limits", "raise_limit", "shortfall", "status", "warn_if_short"]

log = logging.getLogger(__name__)

RESERVED = 256
"""Descriptors :func:`shortfall` counts for the node's own use beside one per connection
(listeners, the store's files, tunnels, transfers, logs)."""
_FD_DIRS = ("/proc/self/fd", "/dev/fd")


@attrs.frozen
class OpenFiles:
    """The soft and hard limits on open files, and the soft limit before :func:`raise_limit`
    raised it (None when it changed nothing)."""

    soft: int
    hard: int
    raised_from: int | None = None

    @property
    def hard_text(self) -> str:
        """The hard limit as a log line gives it: a number, or ``unlimited``."""
        return "unlimited" if resource is not None and self.hard == resource.RLIM_INFINITY else str(self.hard)


def _ceiling(hard: int) -> int:
    """The highest soft limit to ask for: the hard limit, or where that is unlimited, what
    the kernel allows a process (Linux ``fs.nr_open``; else 10,240, macOS's ``OPEN_MAX``)."""
    if resource is None or hard != resource.RLIM_INFINITY:
        return hard
    try:
        with open("/proc/sys/fs/nr_open", "rb") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 10_240


def limits() -> OpenFiles | None:
    """The limits now, or None where the platform has none (Windows)."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return OpenFiles(soft, hard)


def raise_limit() -> OpenFiles | None:
    """Raise this process's soft limit on open files to its hard limit (the whole process's:
    for ``mux serve``, not for a library embedding a node), and log it; returns the limits
    after. When the system refuses, the soft limit stays as it was. None where there are no
    limits."""
    now = limits()
    if now is None or resource is None:
        return None
    ceiling = _ceiling(now.hard)
    if now.soft != resource.RLIM_INFINITY and now.soft < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, now.hard))
        except (ValueError, OSError):
            return now
        raised = OpenFiles(ceiling, now.hard, raised_from=now.soft)
        log.info("open files: soft limit raised from %d to %d (hard limit %s)", now.soft, ceiling, raised.hard_text)
        return raised
    return now


def shortfall(found: OpenFiles, max_connections: int, open_now: int | None = None) -> str | None:
    """A warning when the soft limit is below what ``max_connections`` needs (one descriptor
    each, and ``RESERVED`` more), saying about how many connections fit beside the
    ``open_now`` descriptors the process has open; None when there is room."""
    if resource is not None and found.soft == resource.RLIM_INFINITY:
        return None
    needed = max_connections + RESERVED
    if found.soft >= needed:
        return None
    fits = max(0, found.soft - (open_now or 0))
    return (
        f"the limit of {found.soft} open files (hard limit {found.hard_text}) is below the {needed} that"
        f" max_connections={max_connections} needs (one per connection, {RESERVED} for the node's own files,"
        f" listeners and tunnels): past about {fits} connections the node cannot accept more. Raise the hard"
        " limit (ulimit -Hn as root, or LimitNOFILE= in a systemd unit) or lower max_connections"
    )


def warn_if_short(found: OpenFiles | None, max_connections: int) -> None:
    """Log :func:`shortfall`'s warning, reckoned with what is open now, when there is one."""
    problem = None if found is None else shortfall(found, max_connections, in_use())
    if problem is not None:
        log.warning("open files: %s", problem)


def in_use() -> int | None:
    """How many file descriptors this process has open, or None where that cannot be told.

    Linux 6.2 and later give the count as the size of ``/proc/self/fd`` (one ``stat``: 0.07
    ms with 10,000 open, where listing them took 17 ms of the event loop); elsewhere the
    directory (``/proc/self/fd``, or ``/dev/fd`` on macOS) is listed."""
    if sys.platform == "win32":
        return None
    try:
        counted = os.stat(_FD_DIRS[0]).st_size
    except OSError:
        counted = 0
    if counted > 0:
        return counted
    for path in _FD_DIRS:
        try:
            with os.scandir(path) as entries:
                return sum(1 for _ in entries) - 1  # less the one scandir itself has open
        except OSError:
            continue
    return None


def status() -> dict[str, Any] | None:
    """``/status`` ``open_files``: ``{"open", "limit", "hard_limit"}`` (an unlimited limit
    as null), or None where the platform has no such limit."""
    found = limits()
    if found is None:
        return None
    infinity = resource.RLIM_INFINITY if resource is not None else -1
    return {
        "open": in_use(),
        "limit": None if found.soft == infinity else found.soft,
        "hard_limit": None if found.hard == infinity else found.hard,
    }
