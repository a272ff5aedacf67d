"""Waiting for many sockets to become readable, with nothing made per wait.

How this works: trio's ``wait_readable`` makes a handful of objects at every wait (its
coroutines, the closure that would cancel it, its epoll record) and changes the socket's
epoll registration twice (armed, then disarmed). A connection that last waited during a burst
of traffic keeps those objects among the burst's, and CPython's small-object allocator keeps
every 1 MiB arena that holds even one of them (docs/performance.md, "Memory").
:class:`ReadyHub` instead registers each socket once, edge-triggered, in an epoll set of its
own, and a single task (:meth:`ReadyHub.run`) waits for that set in trio. A reader reads its
socket until it would block and then awaits its :class:`Park`: an object made once per
connection, which suspends the reader's task with a trap made once too, and which the hub's
task reschedules when the kernel reports new data. Edge-triggered registration is safe
because a reader only parks after a read found nothing: data that arrives after that read
raises a fresh event. Linux only (``select.epoll``); elsewhere :func:`ReadyHub.open` gives
None and the server reads as Hypercorn does.
"""

from __future__ import annotations

import select
from typing import Any

import outcome
import trio
from trio._core._traps import WaitTaskRescheduled  # the trap trio's own waits yield

__all__ = ["Park", "ReadyHub"]

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
    """Where one connection's reader waits for its socket: ``await park`` suspends the task
    until the hub sees data, the socket is shut (:meth:`shut`: the error is raised), or the
    task is cancelled. Made once per connection, as is everything a wait uses."""

    __slots__ = ("_hub", "_task", "_trap", "_yielded", "fd")

    def __init__(self, hub: ReadyHub, fd: int) -> None:
        self._hub = hub
        self.fd = fd
        self._task: trio.lowlevel.Task | None = None
        self._trap = WaitTaskRescheduled(self._abort)
        self._yielded = False

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def wake(self, error: BaseException | None = None) -> None:
        """Reschedule the parked reader, if any (raising ``error`` in it, if given)."""
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task, outcome.Error(error) if error is not None else outcome.Value(None))

    def shut(self, error: BaseException) -> None:
        """The socket is closing: raise ``error`` in the parked reader and unregister."""
        self.wake(error)
        self._hub.forget(self)

    # ``await park``: an iterator that yields trio's trap once, then returns what trio sends.
    def __await__(self) -> Park:
        if self._task is not None:
            raise trio.BusyResourceError("another task is already waiting on this socket")
        self._task = trio.lowlevel.current_task()
        return self

    def __iter__(self) -> Park:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        """Yield the trap (first); then end the await with the outcome trio sends back (as
        its own traps do: a value, or the error raised here, such as a cancellation)."""
        if not self._yielded:
            self._yielded = True
            return self._trap
        self._yielded = False
        raise StopIteration(value.unwrap())

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        """End the await with an exception thrown into the task."""
        self._yielded = False
        self._task = None
        error = val if val is not None else typ
        raise error() if isinstance(error, type) else error

    def close(self) -> None:
        """The awaiting coroutine is being closed: forget the wait."""
        self._yielded = False
        self._task = None
