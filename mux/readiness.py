"""Waiting for many sockets to become readable, with nothing made per wait.

How this works: trio's ``wait_readable`` makes a handful of objects at every wait (its
coroutines, the closure that would cancel it, its epoll record) and changes the socket's
epoll registration twice (armed, then disarmed). A connection that last waited during a burst
of traffic keeps those objects among the burst's, and CPython's small-object allocator keeps
every 1 MiB arena that holds even one of them (docs/performance.md, "Memory").
:class:`ReadyHub` instead registers each socket once, edge-triggered, in an epoll set of its
own, and a single task (:meth:`ReadyHub.run`) waits for that set in trio. A reader reads its
socket until it would block and then yields its :class:`Park`'s trap to trio: the park and
the trap are made once per connection, and the hub's task reschedules the reader when the
kernel reports new data. The reader yields the trap from its own long-lived generator-based
coroutine, so a wait makes no coroutine, and no exception either: an exception leaving a
Python function (a ``StopIteration`` ending an ``await`` on an iterator) makes CPython
create the frame object of the coroutine it returns into, in the middle of the burst.
Edge-triggered registration is safe because a reader only parks after a read found
nothing: data that arrives after that read raises a fresh event. Linux only
(``select.epoll``); elsewhere :func:`ReadyHub.open` gives None and the server reads as
Hypercorn does.
"""

from __future__ import annotations

import select
import types
from collections.abc import Generator
from typing import Any

import outcome
import trio
from trio._core._traps import WaitTaskRescheduled  # the trap trio's own waits yield

__all__ = ["Park", "ReadyHub", "wait"]

_EVENTS = getattr(select, "EPOLLIN", 0) | getattr(select, "EPOLLRDHUP", 0) | getattr(select, "EPOLLET", 0)
"""Readable, the peer's half-close, edge-triggered: one event per arrival of data."""
_MAX_EVENTS = 1024


class ReadyHub:
    """One edge-triggered epoll set for many sockets, and the task that wakes their readers
    (:meth:`run`, in the server's nursery)."""

    def __init__(self, epoll: Any) -> None:
        self._epoll = epoll
        self._parks: dict[int, Park] = {}

    @classmethod
    def open(cls) -> ReadyHub | None:
        """A hub, or None where the platform has no epoll."""
        make = getattr(select, "epoll", None)
        return cls(make()) if make is not None else None

    def park(self, fd: int) -> Park:
        """Register ``fd`` and give the :class:`Park` its reader awaits when the socket has
        nothing to read."""
        park = Park(self, fd)
        self._parks[fd] = park
        try:
            self._epoll.register(fd, _EVENTS)
        except FileExistsError:  # cannot stay registered once closed; defensive
            self._epoll.modify(fd, _EVENTS)
        return park

    def forget(self, park: Park) -> None:
        """Unregister ``park``'s socket (still open or not)."""
        if self._parks.get(park.fd) is park:
            del self._parks[park.fd]
            try:
                self._epoll.unregister(park.fd)
            except OSError:  # closed already: the kernel dropped it from the set
                pass

    @property
    def parks(self) -> int:
        """Sockets registered now."""
        return len(self._parks)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wake the parked reader of every socket that got data, until cancelled; then
        close the epoll set."""
        epoll = self._epoll
        parks = self._parks
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0, _MAX_EVENTS):
                    park = parks.get(fd)
                    if park is not None:
                        park.wake()
        finally:
            for park in list(parks.values()):
                park.shut(trio.ClosedResourceError("the server stopped reading"))
            epoll.close()


class Park:
    """Where one connection's reader waits for its socket. Made once per connection, as is
    everything a wait uses: a generator-based coroutine yields :meth:`arm`'s trap to trio and
    unwraps the outcome trio sends back (:func:`wait` does that for any task). The task wakes
    when the hub sees data, when the socket is shut (:meth:`shut`: the error is raised), or
    when it is cancelled."""

    __slots__ = ("_hub", "_task", "_trap", "fd")

    def __init__(self, hub: ReadyHub, fd: int) -> None:
        self._hub = hub
        self.fd = fd
        self._task: trio.lowlevel.Task | None = None
        self._trap = WaitTaskRescheduled(self._abort)

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def arm(self) -> Any:
        """Make the current task this socket's waiter and return the trap it must yield to
        trio (``(yield park.arm()).unwrap()``)."""
        if self._task is not None:
            raise trio.BusyResourceError("another task is already waiting on this socket")
        self._task = trio.lowlevel.current_task()
        return self._trap

    def wake(self, error: BaseException | None = None) -> None:
        """Reschedule the waiting task, if any (raising ``error`` in it, if given)."""
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task, outcome.Error(error) if error is not None else outcome.Value(None))

    def shut(self, error: BaseException) -> None:
        """The socket is closing: raise ``error`` in the waiting task and unregister."""
        self.wake(error)
        self._hub.forget(self)


@types.coroutine
def wait(park: Park) -> Generator[Any, Any, None]:
    """Wait on ``park`` from any task (``await wait(park)``). Each call makes a generator; a
    reader that waits often yields :meth:`Park.arm`'s trap itself (``mux.lean_read``)."""
    (yield park.arm()).unwrap()
