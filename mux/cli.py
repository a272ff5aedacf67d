"""The ``python -m mux`` command line: one sub-command per verb, human output or ``--json``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from .errors import BadRequest, MuxError, VerificationError
from .intents import IntentRegistry, resolve_intent
from .signing import NodeKey, verify_chain

__all__ = ["build_parser", "main"]

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    """Register ``fn`` as the handler of sub-command ``name``."""

    def deco(fn: Command) -> Command:
        _COMMANDS[name] = fn
        return fn

    return deco


def emit(args: argparse.Namespace, data: Any, human: str) -> None:
    """Print ``data`` as JSON with ``--json``, else the human text."""
    if getattr(args, "json", False):
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(human.rstrip("\n") + "\n")


def read_json_lines(path: str) -> list[dict[str, Any]]:
    """Frames from a JSON-lines file (``-`` = stdin); blank lines are skipped."""
    fh = sys.stdin if path == "-" else open(path, encoding="utf-8")
    try:
        out = []
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise BadRequest(f"line {n}: not JSON ({exc})", code="invalid_json") from exc
            if not isinstance(item, dict):
                raise BadRequest(f"line {n}: not a JSON object", code="invalid_json")
            out.append(item)
        return out
    finally:
        if fh is not sys.stdin:
            fh.close()


@command("verify")
def cmd_verify(args: argparse.Namespace) -> int:
    """Verify an exported chain (JSON lines) offline against a node public key."""
    frames = read_json_lines(args.file)
    try:
        report = verify_chain(frames, args.key, require_open=not args.partial)
    except VerificationError as exc:
        emit(
            args,
            {"ok": False, "reason": exc.reason, "detail": exc.detail, "index": exc.index, "seq": exc.seq},
            f"FAILED: {exc.detail} (frame index {exc.index}, reason {exc.reason})",
        )
        return 1
    emit(
        args,
        {
            "ok": True,
            **{k: getattr(report, k) for k in ("channel_id", "frames", "first_seq", "last_seq", "head", "closed")},
        },
        f"OK: {report.frames} frames of {report.channel_id} (seq {report.first_seq}..{report.last_seq}), "
        f"{'closed' if report.closed else 'still open'}; head {report.head}",
    )
    return 0


@command("intents")
def cmd_intents(args: argparse.Namespace) -> int:
    """List the built-in intents (or resolve one name with ``--resolve``)."""
    if args.resolve:
        i = resolve_intent(args.resolve)
        emit(args, i.to_dict(), f"{i.name} -> {i.matched} -> backend {i.backend} (priority {i.policy.priority})")
        return 0
    table = IntentRegistry().table()
    lines = [f"{'intent':<12} {'backend':<8} {'prio':>4} {'rate B/s':>9} {'burst':>7} {'preempt':<7} delivery"]
    for i in table:
        p = i.policy
        preempt = "yes" if p.preemptible else "no"
        lines.append(f"{i.name:<12} {i.backend:<8} {p.priority:>4} {p.rate:>9} {p.burst:>7} {preempt:<7} {i.delivery}")
    emit(args, [i.to_dict() for i in table], "\n".join(lines))
    return 0


@command("key")
def cmd_key(args: argparse.Namespace) -> int:
    """Show (creating if needed) the node key's public half in a data directory."""
    key = NodeKey.load_or_create(args.data_dir)
    emit(args, {"public_key": key.public_hex, "data_dir": args.data_dir}, key.public_hex)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    parser = argparse.ArgumentParser(prog="python -m mux", description="mux: single-port channel multiplexer")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", help="machine-readable JSON output")
        return p

    p = add("verify", "verify an exported chain (JSON lines) offline")
    p.add_argument("file", help="JSON-lines file of frames, or - for stdin")
    p.add_argument("--key", required=True, help="the node's Ed25519 public key, hex")
    p.add_argument("--partial", action="store_true", help="the chain need not start at the open frame")

    p = add("intents", "list the built-in intents and their policies")
    p.add_argument("--resolve", metavar="INTENT", help="resolve one intent name")

    p = add("key", "print the node's public key (creating the key if absent)")
    p.add_argument("--data-dir", default="mux-data", help="node data directory (default: ./mux-data)")

    for extend in _EXTENSIONS:
        extend(sub, add)
    return parser


_EXTENSIONS: list[Callable[[Any, Callable[[str, str], argparse.ArgumentParser]], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed check, 2 error)."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except MuxError as exc:
        sys.stderr.write(f"error: {exc.code}: {exc.detail}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
