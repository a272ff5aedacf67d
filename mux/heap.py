"""The node's heap: short collector pauses, and memory given back after bursts of closes.

:func:`freeze_startup` (``python -m mux serve`` calls it before it says it listens) collects
and then freezes everything allocated at start-up (modules, classes, functions, the app)
into CPython's permanent generation: a full collection no longer walks them, so it
pauses the node for a few milliseconds instead of 40 to 80 (which showed up as the tail of a
call's frame latency), and no memory is spent for it.

Memory back: CPython frees a closed channel's objects at once (or at its next cyclic
garbage collection), but the allocator keeps the freed pages for reuse, so a node's resident
memory stays at its peak. :func:`release_memory` runs a full garbage collection and then
hands free heap pages back: jemalloc's purge of every arena when the process runs under
jemalloc (``LD_PRELOAD``; docs/performance.md, "Memory"), else glibc's ``malloc_trim(0)``.
:func:`trimmer` does that in the background when at least ``threshold`` channels and
connections have closed since the last time, checking every ``interval_s``: a burst of
closes is followed by one trim, a steady node never trims. Before each trim, the trimmer's
``compact`` (the node's :meth:`~mux.core.Mux.compact`) rebuilds the node's long-lived tables
that a burst grew and emptied (:func:`shrink`): a dict keeps the table it grew to, 512 KiB
after 10,000 channels. It also copies what the node keeps of recently closed channels (their
states, the in-memory ledger's packed chains) into new objects. Under jemalloc those go to
the oldest pages with room (:func:`settle` first hands the blocks just freed back to their
pages), so the burst's own pages empty and go back. With neither allocator found, only the
collection runs.
:func:`resident` gives the process's resident memory now and at its peak,
:func:`allocator` which allocators hold it, and :func:`jemalloc_stats` jemalloc's own counts
(what the objects hold, the pages that hold them), as ``/status`` reports them.
:func:`run_under_jemalloc` (``serve`` unless ``--no-jemalloc``) re-executes the process under
jemalloc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from types import ModuleType
from typing import Any

import trio

from .errors import BadSetting

resource: ModuleType | None
try:
    import resource  # Unix only
except ImportError:
    resource = None

__all__ = [
    "JEMALLOC_CONF",
    "allocator",
    "early_jemalloc",
    "flush_thread_cache",
    "freeze_startup",
    "jemalloc_environment",
    "jemalloc_stats",
    "release_memory",
    "renew",
    "resident",
    "run_under_jemalloc",
    "settle",
    "shrink",
    "trimmer",
]

log = logging.getLogger("mux.heap")


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


_ARENAS_ALL = 4096
"""jemalloc's ``MALLCTL_ARENAS_ALL``: ``arena.4096.purge`` purges every arena."""


def _load_mallctl() -> Any:
    """jemalloc's ``mallctl`` C function when this process allocates with jemalloc (the
    symbol is loaded), else None."""
    try:
        mallctl = ctypes.CDLL(None).mallctl
    except (OSError, AttributeError, TypeError):
        return None
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    mallctl.restype = ctypes.c_int
    return mallctl


def _mallctl(mallctl: Any) -> Callable[[bytes], bool] | None:
    """``mallctl`` for commands that take and give nothing (True when it did it), or None
    without jemalloc."""
    if mallctl is None:
        return None

    def command(name: bytes) -> bool:
        failed: int = mallctl(name, None, None, None, 0)
        return failed == 0

    return command


def _jemalloc_purge(mallctl: Callable[[bytes], bool] | None) -> Callable[[], bool] | None:
    """jemalloc's purge of every arena's unused dirty pages (after this thread's cached
    blocks), or None without jemalloc."""
    if mallctl is None:
        return None
    name = f"arena.{_ARENAS_ALL}.purge".encode()

    def purge() -> bool:
        mallctl(b"thread.tcache.flush")  # this thread's cached blocks first
        return mallctl(name)

    return purge


def _jemalloc_flush(mallctl: Callable[[bytes], bool] | None) -> Callable[[], bool] | None:
    """jemalloc's flush of this thread's cache of freed blocks, or None without jemalloc."""
    return None if mallctl is None else lambda: mallctl(b"thread.tcache.flush")


JEMALLOC_STATS = ("allocated", "active", "resident", "metadata", "retained")
"""What :func:`jemalloc_stats` reports, in bytes: ``allocated``, what the program holds;
``active``, the pages with at least one block in use (``active - allocated`` is the room
left between blocks); ``resident``, the allocator's pages in memory, its own ``metadata``
included; ``retained``, address space it keeps but has given back to the OS."""


def _jemalloc_reader(mallctl: Any) -> Callable[[], dict[str, int] | None] | None:
    """A reader of jemalloc's ``JEMALLOC_STATS`` (refreshed first; None when this jemalloc
    keeps no statistics), or None without jemalloc."""
    if mallctl is None:
        return None
    epoch = ctypes.c_uint64(1)
    names = [(name, f"stats.{name}".encode()) for name in JEMALLOC_STATS]

    def read() -> dict[str, int] | None:
        if mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch)):
            return None
        stats = {}
        for name, key in names:
            value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
            if mallctl(key, ctypes.byref(value), ctypes.byref(size), None, 0):
                return None
            stats[name] = value.value
        return stats

    return read


_TRIM = _malloc_trim()
_MALLCTL_C = _load_mallctl()
_MALLCTL = _mallctl(_MALLCTL_C)
_PURGE = _jemalloc_purge(_MALLCTL)
_FLUSH = _jemalloc_flush(_MALLCTL)
_READ = _jemalloc_reader(_MALLCTL_C)


def jemalloc_stats() -> dict[str, int] | None:
    """jemalloc's counts of the heap now (``JEMALLOC_STATS``, bytes), or None when the
    process does not run under jemalloc or its jemalloc keeps no statistics."""
    return None if _READ is None else _READ()


JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,narenas:1"
"""jemalloc's settings for a node: freed pages go back within about a second, purged by a
background thread, all in one arena (docs/performance.md, "Memory", measured them)."""
_REEXECUTED = "MUX_JEMALLOC_REEXECUTED"
"""Set in the environment of the re-executed process: it does not try a second time."""


def jemalloc_environment(environ: Mapping[str, str], library: str) -> dict[str, str]:
    """``environ`` as a process needs it to run under jemalloc: every object allocated by the
    C allocator (``PYTHONMALLOC=malloc``), ``library`` preloaded ahead of any other, and
    ``MALLOC_CONF`` (``JEMALLOC_CONF`` unless one is set)."""
    env = dict(environ)
    preload = environ.get("LD_PRELOAD", "").split()
    env["LD_PRELOAD"] = " ".join([library, *(lib for lib in preload if lib != library)])
    env["PYTHONMALLOC"] = "malloc"
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[_REEXECUTED] = "1"
    return env


def run_under_jemalloc(*, required: bool = True, quiet: bool = False) -> None:
    """Return at once if this process runs under jemalloc (saying so, unless ``quiet``, when
    it was executed again for it); else execute it again (same interpreter, arguments and
    pid) with :func:`jemalloc_environment`. When jemalloc is not installed, or did not load
    in the process executed again, raise ``BadSetting`` if ``required`` (``serve
    --jemalloc``), else, unless ``quiet``, log why and return (``serve`` by default: the node
    then runs on CPython's allocator)."""
    if allocator() == "jemalloc":
        if os.environ.get(_REEXECUTED) and not quiet:
            log.info("running under jemalloc (executed again with LD_PRELOAD=%s)", os.environ.get("LD_PRELOAD", ""))
        return
    library = ctypes.util.find_library("jemalloc")
    if os.environ.get(_REEXECUTED):
        problem = (
            f"this process was executed again with LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}"
            f" and PYTHONMALLOC=malloc, but its allocator is {allocator()!r}, not 'jemalloc' (python -E and -I"
            " ignore PYTHONMALLOC)"
        )
    elif library is None:
        problem = "jemalloc is not installed (Debian and Ubuntu: apt-get install libjemalloc2)"
    elif sys.flags.ignore_environment and not required:
        problem = "python -E or -I ignores PYTHONMALLOC"
    else:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], jemalloc_environment(os.environ, library))
    if required:
        raise BadSetting(f"--jemalloc: {problem}", setting="jemalloc")
    if not quiet:
        log.warning(
            "running on CPython's allocator, not jemalloc: %s. More of the memory a burst of closes took"
            " stays with the process (docs/performance.md, Memory); serve --no-jemalloc says this is meant",
            problem,
        )


def early_jemalloc(argv: Sequence[str]) -> None:
    """``python -m mux serve ...`` executes itself again under jemalloc here, before the
    command line is parsed and the node's modules are imported (a second of start-up saved),
    unless the arguments turn it off or ask for help; ``serve`` then checks its settings,
    and says which allocator it runs on (``run_under_jemalloc``)."""
    if not argv or argv[0] != "serve" or any(a in ("-h", "--help") or a.startswith("--no-j") for a in argv):
        return
    run_under_jemalloc(required=False, quiet=True)


def allocator() -> str:
    """Which allocators hold the node's memory: ``"pymalloc"`` (CPython's, for objects up to
    512 bytes) over ``"jemalloc"`` or ``"malloc"`` (the C library's, or another preloaded in
    its place); just the C allocator's name when ``PYTHONMALLOC=malloc`` sends every object
    to it (unless ``python -E`` or ``-I`` made Python ignore that variable)."""
    c_allocator = "jemalloc" if _PURGE is not None else "malloc"
    if not sys.flags.ignore_environment and os.environ.get("PYTHONMALLOC", "").startswith("malloc"):
        return c_allocator
    return f"pymalloc over {c_allocator}"


def resident() -> tuple[int | None, int]:
    """The process's resident memory in bytes: now (``/proc/self/statm``; None where there is
    none) and its peak since start (``getrusage``; 0 where there is none)."""
    peak = 0
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    try:
        with open("/proc/self/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None, peak
    return pages * os.sysconf("SC_PAGE_SIZE"), peak


def freeze_startup() -> int:
    """Collect, then move every object alive now into the permanent generation (never
    scanned again; ``gc.freeze``); returns how many. For a process serving one node: its
    start-up objects live as long as it does."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


SHRINK_MIN_BYTES = 16 << 10
"""A table is rebuilt only when that gives back at least this much."""


def shrink(table: MutableMapping[Any, Any]) -> int:
    """Rebuild ``table`` in place (same object, same order, same entries) when the table it
    grew to is at least four times what its entries need and ``SHRINK_MIN_BYTES`` more: a
    dict never gives back the room it grew to as entries go. Returns the bytes given back."""
    held = sys.getsizeof(table)
    if held < SHRINK_MIN_BYTES:
        return 0
    entries = dict(table)
    need = sys.getsizeof(entries)
    if held < 4 * need or held - need < SHRINK_MIN_BYTES:
        return 0
    table.clear()  # lets the grown table go
    table.update(entries)  # a Counter adds to nothing, an OrderedDict keeps the order
    return max(0, held - sys.getsizeof(table))


def settle() -> None:
    """Collect garbage and, under jemalloc, hand this thread's cache of freed blocks back to
    their pages: what is allocated next (``compact``'s copies) then goes to the oldest pages
    with room, not into the blocks a burst just freed."""
    gc.collect()
    flush_thread_cache()


def flush_thread_cache() -> None:
    """Under jemalloc, hand the calling thread's cache of freed blocks back to their pages
    (each thread has its own: a worker thread's stays full, and keeps those pages, until it
    frees more or flushes); nothing on another allocator."""
    if _FLUSH is not None:
        _FLUSH()


def renew(text: str) -> str:
    """An equal string in a new object (``compact`` moves what a node keeps out of the
    memory a burst took)."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")


def release_memory(*, collect: bool = True) -> bool:
    """Collect garbage (unless ``collect`` is False: :func:`settle` just did) and return free
    heap pages to the OS (jemalloc's purge, else glibc's ``malloc_trim``); True when
    jemalloc's purge ran or glibc's trim handed pages back."""
    if collect:
        gc.collect()
    if _PURGE is not None:
        return _PURGE()
    if _TRIM is None:
        return False
    return bool(_TRIM(0))


async def trimmer(
    closed: Callable[[], int],
    *,
    threshold: int = 500,
    interval_s: float = 1.0,
    min_gap_s: float = 30.0,
    compact: Callable[[], int] | None = None,
) -> None:
    """Run :func:`settle`, ``compact()`` (bytes it gave back) and then ``release_memory`` whenever ``closed()``
    (a running count of closed channels and connections) has grown by ``threshold`` since the
    last trim, once the burst is over (nothing closed during the last ``interval_s``); while
    closes go on, at most once per ``min_gap_s`` (a full collection pauses the node: steady
    churn must not pay it often)."""
    last = seen = closed()
    last_trim = -math.inf
    while True:
        await trio.sleep(interval_s)
        now = closed()
        settled = now == seen  # the burst is over: nothing closed since the last check
        seen = now
        if now - last < threshold or (not settled and trio.current_time() - last_trim < min_gap_s):
            continue
        last, last_trim = now, trio.current_time()
        t0 = time.perf_counter()
        settle()
        tables = compact() if compact is not None else 0
        trimmed = release_memory(collect=False)
        took_ms = (time.perf_counter() - t0) * 1e3
        log.info(
            "released memory after %d closes in %.0f ms (%s; pages handed back: %s; tables shrunk by %d KiB)",
            now,
            took_ms,
            allocator(),
            trimmed,
            tables >> 10,
        )
