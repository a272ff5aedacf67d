"""The ``python -m mux`` command line: one sub-command per verb, human output or ``--json``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from .errors import BadRequest, MuxError, VerificationError
from .intents import IntentRegistry, resolve_intent
from .open_files import raise_limit, warn_if_short
from .signing import NodeKey, verify_chain

__all__ = ["DEFAULT_URL", "build_parser", "main"]

DEFAULT_URL = "http://127.0.0.1:8443"
"""The node a verb talks to without ``--url`` (``python -m mux serve``'s default)."""

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    """Register ``fn`` as the handler of sub-command ``name``."""

    def deco(fn: Command) -> Command:
        _COMMANDS[name] = fn
        return fn

    return deco


def _at_least_one(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


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
    """List the built-in intents (or resolve one name with ``--resolve``; ``--url``: a node's)."""
    if getattr(args, "url", None) and not args.resolve:
        from .rest_client import MuxClient

        with MuxClient(args.url, "cli") as client:
            rows = client.intents()["intents"]
        lines = [f"{'intent':<12} {'backend':<8} {'prio':>4} {'rate B/s':>9} {'burst':>7} {'preempt':<7} delivery"]
        for r in rows:
            p = r["policy"]
            preempt = "yes" if p["preemptible"] else "no"
            lines.append(
                f"{r['intent']:<12} {r['backend']:<8} {p['priority']:>4} {p['rate']:>9} {p['burst']:>7} "
                f"{preempt:<7} {r['delivery']}"
            )
        emit(args, rows, "\n".join(lines))
        return 0
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


@command("serve")
def cmd_serve(args: argparse.Namespace) -> int:
    """Run a node until SIGINT/SIGTERM (graceful: channels closed, clients told)."""
    import logging

    import trio

    from .server import serve
    from .settings import NodeSettings

    if bool(args.certfile) != bool(args.keyfile):
        raise BadRequest("--certfile and --keyfile go together", code="bad_request")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags: dict[str, Any] = dict(
        host=args.host,
        port=args.port,
        agent=args.agent,
        data_dir=args.data_dir,
        certfile=args.certfile,
        keyfile=args.keyfile,
        max_message_bytes=args.max_message_bytes,
    )
    if args.config:
        settings = NodeSettings.from_toml(args.config, **flags)
    else:
        settings = NodeSettings.from_env(**flags)
    if args.memory:
        settings.data_dir = None
    if args.open:
        settings.open_mode = True
    if args.behind_proxy is not None:
        settings.trusted_proxy_hops = args.behind_proxy
    if args.max_channels is not None:
        settings.mux.max_channels_per_agent = args.max_channels
    if args.sign_every is not None:
        settings.mux.sign_every = args.sign_every
    if args.sign_within_ms is not None:
        settings.mux.sign_within_ms = float(args.sign_within_ms)
    for spec in args.allow_tunnel or []:
        settings.mux.backends.setdefault("overlay", {}).setdefault("allow", []).append(spec)
    from .config import configured_registry
    from .heap import freeze_startup

    configured_registry(settings.mux)  # a bad [mux.intent_policies] fails here with a clear error
    if args.jemalloc is not False:  # once the settings are known good: a bad one stops the node at once
        from .heap import run_under_jemalloc

        # returns once it does (the first time, this process is executed again); by default
        # only where jemalloc is installed
        run_under_jemalloc(required=args.jemalloc is True)
    open_files = raise_limit()  # each connection holds a descriptor: the hard limit, not a shell's soft 1024

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(
                lambda task_status: serve(settings, handle_signals=True, task_status=task_status)
            )
            node_mux = info.node.require()
            scheme = "TLS 1.3" if settings.tls else "plain HTTP (no --certfile: not for production)"
            if settings.open_mode:
                logging.getLogger("mux").warning(
                    "OPEN MODE: no authentication; any caller may claim any agent name (--open)"
                )
            warn_if_short(open_files, settings.max_connections)  # now that its listeners are open too
            freeze_startup()  # this process serves this node: keep full collections short
            print(f"mux node {node_mux.agent} listening on {', '.join(info.urls)} [{scheme}]", flush=True)
            print(f"public key {node_mux.public_key}", flush=True)

    trio.run(main)
    print("mux node stopped", flush=True)
    return 0


@command("token")
def cmd_token(args: argparse.Namespace) -> int:
    """Issue or revoke the node's bearer tokens (needs the node's data directory)."""
    from .auth import REVOKED_FILE, Revocations, issue_token

    key = NodeKey.load_or_create(args.data_dir)
    if args.action == "revoke":
        if not args.jti:
            raise BadRequest("token revoke needs --jti", code="bad_request")
        Revocations(Path(args.data_dir) / REVOKED_FILE).revoke(args.jti)
        emit(args, {"revoked": args.jti}, f"revoked {args.jti} (the node refuses it from its next check)")
        return 0
    if not args.agent:
        raise BadRequest("token issue needs --agent", code="bad_request")
    intents = [p.strip() for p in args.intents.split(",") if p.strip()] if args.intents else None
    token, claims = issue_token(key, args.agent, ttl_s=_duration(args.ttl), intents=intents, agent_key=args.agent_key)
    emit(args, {"token": token, **claims}, token)
    return 0


def _duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise BadRequest(f"not a duration: {text!r} (e.g. 3600, 15m, 12h, 7d)", code="bad_request") from None


@command("cert")
def cmd_cert(args: argparse.Namespace) -> int:
    """Write a self-signed development certificate and key (PEM)."""
    from .tls import write_self_signed

    info = write_self_signed(args.certfile, args.keyfile, hosts=args.host, days=args.days)
    emit(args, info, f"wrote {args.certfile} and {args.keyfile} for {', '.join(args.host)} ({args.days} days)")
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
    p.add_argument("--url", help="list a running node's intents instead (e.g. http://127.0.0.1:8443)")

    p = add("key", "print the node's public key (creating the key if absent)")
    p.add_argument("--data-dir", default="mux-data", help="node data directory (default: ./mux-data)")

    p = add("serve", "run a mux node (Hypercorn, trio worker)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="port (default 8443; 0 picks a free one)")
    p.add_argument("--agent", help="the node's agent name (default mux-node)")
    p.add_argument("--data-dir", help="node key and store directory (default ./mux-data)")
    p.add_argument("--memory", action="store_true", help="keep the node key in memory only")
    p.add_argument("--certfile", help="PEM certificate: enables TLS 1.3 (with --keyfile)")
    p.add_argument("--keyfile", help="PEM private key of --certfile")
    p.add_argument("--max-message-bytes", type=int, help="largest WebSocket message / REST body (default 1 MiB)")
    p.add_argument("--max-channels", type=_at_least_one, default=None, help="open channels per agent (default 32)")
    p.add_argument(
        "--sign-every",
        type=_at_least_one,
        metavar="N",
        help="sign every N-th data frame of a channel, the frames between covered by it (default 1: every"
        " frame; docs/frames.md, docs/performance.md)",
    )
    p.add_argument(
        "--sign-within-ms",
        type=_at_least_one,
        metavar="MS",
        help="with --sign-every: the longest a frame waits for a covering signature (default 100)",
    )
    p.add_argument(
        "--jemalloc",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run under jemalloc (executes itself again with PYTHONMALLOC=malloc and LD_PRELOAD): more memory goes"
        " back after bursts of closes, 4-5%% more at the peak (docs/performance.md, Memory). Default: when"
        " jemalloc is installed (libjemalloc2), else CPython's allocator, with a warning; --jemalloc fails"
        " without it, --no-jemalloc stays on CPython's allocator",
    )
    p.add_argument("--config", help="TOML settings file (fields, [mux], [backends.NAME])")
    p.add_argument("--open", action="store_true", help="no authentication (callers name themselves); logs a warning")
    p.add_argument(
        "--behind-proxy",
        type=int,
        metavar="HOPS",
        help="trust X-Forwarded-For/-Proto from this many TLS-terminating proxies (real client address)",
    )
    p.add_argument(
        "--allow-tunnel",
        action="append",
        metavar="HOST:PORT",
        help="let vpn:tunnel channels reach HOST:PORT (repeatable; PORT may be *); deny by default",
    )

    p = add("token", "issue or revoke bearer tokens signed by the node key")
    p.add_argument("action", choices=["issue", "revoke"])
    p.add_argument("--agent", help="issue: the agent the token names")
    p.add_argument("--ttl", default="24h", help="issue: lifetime, e.g. 3600, 15m, 12h, 7d (default 24h)")
    p.add_argument("--intents", help="issue: comma-separated intents it may open, e.g. 'iot:*,chat'")
    p.add_argument("--agent-key", help="issue: the agent's Ed25519 public key (hex), for agent-signed frames")
    p.add_argument("--jti", help="revoke: the token id to revoke")
    p.add_argument("--data-dir", default="mux-data", help="node data directory (default ./mux-data)")

    p = add("cert", "make a self-signed development certificate (TLS 1.3 ready)")
    p.add_argument("--certfile", default="mux-cert.pem")
    p.add_argument("--keyfile", default="mux-key.pem")
    p.add_argument("--host", action="append", default=None, help="name or IP for the certificate (repeatable)")
    p.add_argument("--days", type=int, default=365)

    for extend in _EXTENSIONS:
        extend(sub, add)
    return parser


_EXTENSIONS: list[Callable[[Any, Callable[[str, str], argparse.ArgumentParser]], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed check, 2 error)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "cert" and not args.host:
        args.host = ["localhost", "127.0.0.1", "::1"]
    try:
        return _COMMANDS[args.command](args)
    except MuxError as exc:
        sys.stderr.write(f"error: {exc.code}: {exc.detail}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


# the modules below register their verbs with this registry when imported
from . import (  # noqa: E402
    cli_files,  # noqa: F401  (send-file and receive-files)
    cli_net,  # noqa: F401  (tunnel and ping)
    cli_remote,  # noqa: F401  (status, open, send, channels, close, export, listen)
)
