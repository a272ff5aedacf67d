"""File transfer verbs of the command line: ``send-file`` and ``receive-files`` (``file:sync``).

How this works: importing this module registers its handlers with ``mux.cli``'s ``@command``
registry and appends :func:`extend` to ``mux.cli._EXTENSIONS`` (the one import line at the
end of ``mux/cli.py``). Both verbs connect one WebSocket (:func:`mux.client.connect`) and run
:func:`mux.filesync.send_file` / :func:`mux.filesync.receive_files`, drawing a rich progress
bar on stderr (``--no-progress`` turns it off) and printing one summary line per file on
stdout (bytes, seconds, MB/s, sha256, verified; a JSON object per file with ``--json``).

- ``python -m mux send-file --url URL --agent ME --to AGENT PATH`` exits 0 when the receiver
  verified the file, 1 when its hash differed, 2 on an error (e.g. the receiver refused).
- ``python -m mux receive-files --url URL --agent ME --dir DIR [--count N] [--seconds S]``
  stores files in ``DIR`` until ``--count`` files arrived verified or ``--seconds`` passed;
  exits 1 when ``--count`` was not reached.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import orjson

from backends.sync import DEFAULT_CHUNK_SIZE

from . import cli
from .cli import DEFAULT_URL
from .errors import BadRequest

if TYPE_CHECKING:
    from .filesync import Progress, SyncResult

__all__ = ["extend"]


def _line(args: argparse.Namespace, data: dict[str, Any], human: str) -> None:
    sys.stdout.write((orjson.dumps(data).decode() if args.json else human) + "\n")
    sys.stdout.flush()


@contextmanager
def _bars(enabled: bool) -> Iterator[Callable[[Progress], None] | None]:
    """A rich progress display on stderr and the callback that feeds it (None when disabled)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.progress import Progress as Bars

    bars = Bars(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(p: Progress) -> None:
        task = tasks.get(p.channel_id)
        if task is None:
            verb = "send" if p.direction == "send" else "recv"
            task = tasks[p.channel_id] = bars.add_task(f"{verb} {p.name}", total=p.size or 1)
        bars.update(task, completed=p.done_bytes if p.size else 1)

    with bars:
        yield update


def _ssl(args: argparse.Namespace) -> Any:
    if not args.cafile:
        return None
    import ssl

    return ssl.create_default_context(cafile=args.cafile)


@cli.command("send-file")
def cmd_send_file(args: argparse.Namespace) -> int:
    """Send one file to ``--to`` over a ``file:sync`` channel."""
    import trio

    from .client import connect
    from .filesync import send_file

    if args.chunk_size < 1:
        raise BadRequest("--chunk-size must be at least 1", code="bad_request")
    if not os.path.isfile(args.path):
        raise BadRequest(f"{args.path}: not a file", code="bad_request")
    out: list[SyncResult] = []

    async def run() -> None:
        async with connect(
            args.url, args.agent, token=args.token or None, ssl_context=_ssl(args), connect_timeout=args.timeout
        ) as conn:
            with _bars(not args.no_progress) as progress:
                out.append(
                    await send_file(
                        conn,
                        args.to,
                        args.path,
                        chunk_size=args.chunk_size,
                        name=args.name,
                        progress=progress,
                        answer_timeout=args.answer_timeout,
                    )
                )

    trio.run(run)
    result = out[0]
    _line(args, result.to_dict(), result.summary())
    return 0 if result.verified else 1


@cli.command("receive-files")
def cmd_receive_files(args: argparse.Namespace) -> int:
    """Receive files sent to ``--agent`` into ``--dir``."""
    import trio

    from .client import connect
    from .filesync import receive_files

    if args.count is not None and args.count < 1:
        raise BadRequest("--count must be at least 1", code="bad_request")
    results: list[SyncResult] = []

    def on_file(res: SyncResult) -> None:
        results.append(res)
        _line(args, res.to_dict(), res.summary())

    where = os.path.abspath(args.dir)

    async def run() -> None:
        async with connect(
            args.url, args.agent, token=args.token or None, ssl_context=_ssl(args), connect_timeout=args.timeout
        ) as conn:
            _line(
                args,
                {"event": "listening", "agent": conn.agent, "node": conn.node, "dir": where},
                f"receiving files as {conn.agent} on node {conn.node} into {args.dir}",
            )
            with trio.move_on_after(args.seconds if args.seconds is not None else math.inf):
                with _bars(not args.no_progress) as progress:
                    await receive_files(conn, args.dir, count=args.count, progress=progress, on_file=on_file)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    verified = [r for r in results if r.verified]
    total = sum(r.bytes_transferred for r in verified)
    if not args.json:
        sys.stdout.write(
            f"received {len(verified)} file(s) verified, {total} bytes; {len(results) - len(verified)} failed\n"
        )
    return 1 if args.count is not None and len(verified) < args.count else 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"node URL (default {DEFAULT_URL})")
    p.add_argument(
        "--agent", default=os.environ.get("MUX_AGENT") or "cli", help="the calling agent (default: $MUX_AGENT or 'cli')"
    )
    p.add_argument("--token", default=os.environ.get("MUX_TOKEN"), help="bearer token (default: $MUX_TOKEN)")
    p.add_argument("--cafile", help="PEM CA bundle to trust for https:// (e.g. a self-signed node cert)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the node (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def extend(sub: Any, add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add ``send-file`` and ``receive-files`` (called by ``mux.cli.build_parser``)."""
    p = add("send-file", "send a file to an agent (file:sync: chunked, verified, resumable)")
    _common(p)
    p.add_argument("--to", required=True, help="the receiving agent")
    p.add_argument("path", help="the file to send")
    p.add_argument("--name", help="file name for the receiver (default: the file's own name)")
    p.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help=f"bytes per chunk (default {DEFAULT_CHUNK_SIZE})"
    )
    p.add_argument(
        "--answer-timeout", type=float, default=30.0, help="seconds to wait for the receiver's answers (default 30)"
    )

    p = add("receive-files", "receive files sent to an agent into a directory (file:sync)")
    _common(p)
    p.add_argument("--dir", required=True, help="directory to store received files in")
    p.add_argument("--count", type=int, help="stop after this many verified files")
    p.add_argument("--seconds", type=float, help="stop after this many seconds")


cli._EXTENSIONS.append(extend)
