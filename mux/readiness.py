"""Waiting for a socket to become readable, with nothing made per wait.

How this works: trio's ``wait_readable`` makes a handful of objects at every wait (its
coroutines, the closure that would cancel it, its record of the socket's waiters). A
connection that last waited during a burst of traffic keeps those objects among the burst's,
and CPython's small-object allocator keeps every 1 MiB arena that holds even one of them
(docs/performance.md, "Memory"). A :class:`Park` is made once per connection with what such
a wait needs: the record of the socket's waiters trio's epoll manager keeps, and the trap a
waiting task yields to trio. :meth:`Park.arm` puts the record in trio's table and asks trio
to watch the socket, as ``wait_readable`` does; trio wakes the task the same way (its epoll
loop, and ``notify_closing`` when the socket is closed, raising ``ClosedResourceError``).
The reader yields the trap from its own long-lived generator-based coroutine, so a wait
makes no coroutine, and no exception either: an exception leaving a Python function (a
``StopIteration`` ending an ``await`` on an iterator) makes CPython create the frame object
of the coroutine it returns into, in the middle of the burst.

This uses trio's epoll manager's own table (``_registered``, ``_update_registrations``,
``EpollWaiters``): :meth:`Park.open` gives None where the running trio has no such manager
(another platform, a trio that changed), and the reader then waits as trio does.
"""

from __future__ import annotations

import types
from collections.abc import Generator
from typing import Any

import trio
from trio._core._traps import WaitTaskRescheduled  # the trap trio's own waits yield

__all__ = ["Park", "wait"]


class Park:
    """Where one socket's reader waits until the socket is readable, the socket is closed
    (``ClosedResourceError``) or the task is cancelled; made once per socket, as is
    everything a wait uses. A generator-based coroutine yields :meth:`arm`'s trap to trio and
    unwraps the outcome trio sends back (:func:`wait` does that for any task)."""

    __slots__ = ("_io", "_trap", "_waiters", "fd")

    def __init__(self, io: Any, waiters: Any, fd: int) -> None:
        self._io = io
        self.fd = fd
        self._waiters = waiters
        self._trap = WaitTaskRescheduled(self._abort)

    @classmethod
    def open(cls, fd: int) -> Park | None:
        """A park for ``fd`` in the running trio, or None when its I/O manager is not the
        epoll manager this module knows."""
        try:
            from trio._core._io_epoll import EpollIOManager, EpollWaiters
            from trio._core._run import GLOBAL_RUN_CONTEXT
        except ImportError:  # another platform
            return None
        io = GLOBAL_RUN_CONTEXT.runner.io_manager
        known = (
            isinstance(io, EpollIOManager)
            and isinstance(getattr(io, "_registered", None), dict)
            and callable(getattr(io, "_update_registrations", None))
        )
        return cls(io, EpollWaiters(), fd) if known else None

    def arm(self) -> Any:
        """Make the current task the socket's reader in trio's table and return the trap it
        must yield (``(yield park.arm()).unwrap()``). BusyResourceError if another task
        reads it already."""
        registered = self._io._registered
        waiters = registered.get(self.fd)
        if waiters is None:  # nobody waits on the socket: this park's own record
            waiters = registered[self.fd] = self._waiters
            waiters.current_flags = 0  # as a fresh record: trio (re)arms the socket
        if waiters.read_task is not None:
            raise trio.BusyResourceError("another task is already reading this socket")
        waiters.read_task = trio.lowlevel.current_task()
        self._io._update_registrations(self.fd)
        return self._trap

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        waiters = self._io._registered.get(self.fd)
        if waiters is not None:
            waiters.read_task = None
            self._io._update_registrations(self.fd)
        return trio.lowlevel.Abort.SUCCEEDED


@types.coroutine
def wait(park: Park) -> Generator[Any, Any, None]:
    """Wait on ``park`` from any task (``await wait(park)``). Each call makes a generator; a
    reader that waits often yields :meth:`Park.arm`'s trap itself (``mux.lean_read``)."""
    (yield park.arm()).unwrap()
