"""Command-line verbs against a running node: status, open, send, channels, close, export, listen.

How this works: importing this module registers its handlers with ``mux.cli``'s ``@command``
registry and appends :func:`extend` to ``mux.cli._EXTENSIONS``, which ``build_parser`` calls
to add the sub-parsers. REST verbs use :class:`mux.rest_client.MuxClient`; ``listen`` connects
over WebSocket with :func:`mux.client.connect`, prints each channel opened to the agent and
each frame received (verified with the node's key), and stops after ``--count`` frames or
``--seconds`` seconds. Errors surface as :class:`~mux.errors.MuxError`, which ``main``
prints as ``error: CODE: DETAIL`` with exit status 2.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from . import cli
from .cli import DEFAULT_URL
from .errors import BadRequest, VerificationError

if TYPE_CHECKING:
    from .rest_client import MuxClient

__all__ = ["DEFAULT_URL", "extend"]


def _client(args: argparse.Namespace) -> MuxClient:
    from .rest_client import MuxClient  # imported on use: the offline verbs stay quick to start

    return MuxClient(
        args.url,
        args.agent,
        token=args.token or None,
        timeout=args.timeout,
        verify=args.cafile if args.cafile else True,
    )


def _json_arg(text: str, what: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}", code="invalid_json") from exc


def _channel_line(ch: dict[str, Any]) -> str:
    return (
        f"{ch.get('channel_id')}  {ch.get('agent')} -> {ch.get('target')}  {ch.get('intent')}  "
        f"{ch.get('state')}  seq {ch.get('seq')}  frames {ch.get('frames')}"
    )


def _payload_text(frame: dict[str, Any]) -> str:
    payload = frame.get("payload")
    if isinstance(payload, bytes):
        return f"<{len(payload)} bytes>"
    return orjson.dumps(payload).decode()


@cli.command("status")
def cmd_status(args: argparse.Namespace) -> int:
    """Show a running node's status."""
    with _client(args) as client:
        s = client.status()
    agents = ", ".join(s.get("agents_attached") or []) or "none"
    human = "\n".join(
        [
            f"node      {s.get('agent')} (mux {s.get('version')}) at {client.base_url}",
            f"key       {s.get('signing')} {s.get('public_key')}",
            f"tls       {s.get('tls') or 'off'}",
            f"uptime    {s.get('uptime_s')} s",
            f"channels  {s.get('channels_open')} open, {s.get('channels_total')} opened in total",
            f"agents    {agents}",
            f"frames    {s.get('frames')} ({s.get('bytes')} bytes)",
        ]
    )
    cli.emit(args, s, human)
    return 0


@cli.command("open")
def cmd_open(args: argparse.Namespace) -> int:
    """Open a channel from ``--agent`` to ``--target``."""
    metadata = _json_arg(args.metadata, "--metadata") if args.metadata else None
    if metadata is not None and not isinstance(metadata, dict):
        raise BadRequest("--metadata must be a JSON object", code="bad_metadata")
    with _client(args) as client:
        ch = client.open(args.target, args.intent, metadata)
    route = ch.get("route") or {}
    cli.emit(
        args,
        ch,
        f"{ch['channel_id']}\nopened {ch.get('agent')} -> {ch.get('target')} intent {ch.get('intent')} "
        f"(backend {route.get('backend')})",
    )
    return 0


@cli.command("send")
def cmd_send(args: argparse.Namespace) -> int:
    """Send one JSON payload on a channel."""
    payload = _json_arg(args.payload, "--payload")
    with _client(args) as client:
        ack = client.send(args.channel, payload)
    cli.emit(args, ack, f"sent seq {ack.get('seq')} on {ack.get('channel_id')}: {ack.get('disposition')}")
    return 0


@cli.command("channels")
def cmd_channels(args: argparse.Namespace) -> int:
    """List ``--agent``'s open channels."""
    with _client(args) as client:
        found = client.channels()
    channels = found.get("channels") or []
    lines = [f"{len(channels)} open channel(s) of {found.get('agent')}"] + [_channel_line(c) for c in channels]
    cli.emit(args, found, "\n".join(lines))
    return 0


@cli.command("close")
def cmd_close(args: argparse.Namespace) -> int:
    """Close a channel."""
    with _client(args) as client:
        done = client.close(args.channel, args.reason)
    cli.emit(args, done, f"closed {done.get('channel_id')} ({done.get('reason')}) at seq {done.get('seq')}")
    return 0


@cli.command("export")
def cmd_export(args: argparse.Namespace) -> int:
    """Write a channel's signed chain as JSON lines (stdout or ``--output``), for ``verify``."""
    with _client(args) as client:
        frames = client.chain(args.channel)
        key = client.keys()["keys"][0]["public_key"]
    text = "".join(orjson.dumps(f).decode() + "\n" for f in frames)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
        sys.stderr.write(
            f"wrote {len(frames)} frames of {args.channel} to {args.output}; "
            f"verify with: python -m mux verify {args.output} --key {key}\n"
        )
    else:
        sys.stdout.write(text)
    return 0


def _out(args: argparse.Namespace, data: dict[str, Any], human: str) -> None:
    """One line per event: JSON lines with ``--json``, else text; flushed at once."""
    if args.json:
        line = orjson.dumps(data).decode()
    else:
        line = human
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@cli.command("listen")
def cmd_listen(args: argparse.Namespace) -> int:
    """Print channels opened to ``--agent`` and the frames they carry, verifying each frame."""
    import math

    import trio

    from .client import ClientChannel, MuxConnection, connect

    if args.count is not None and args.count < 1:
        raise BadRequest("--count must be at least 1", code="bad_request")
    state = {"frames": 0, "bad": 0}

    async def pump(conn: MuxConnection, ch: ClientChannel, done: trio.CancelScope) -> None:
        async for frame in ch:
            problem: str | None = None
            try:
                conn.verify(frame)
            except VerificationError as exc:
                problem = exc.reason
                state["bad"] += 1
            state["frames"] += 1
            payload = frame.get("payload")
            data = {
                "event": "frame",
                **frame,
                "payload": base64.b64encode(payload).decode() if isinstance(payload, bytes) else payload,
                "verified": problem is None,
                **({"verify_error": problem} if problem else {}),
            }
            check = "verified" if problem is None else f"BAD SIGNATURE ({problem})"
            _out(
                args,
                data,
                f"frame {ch.id} seq {frame.get('seq')} from {frame.get('sender')}: {_payload_text(frame)} [{check}]",
            )
            if args.count is not None and state["frames"] >= args.count:
                done.cancel()
                return
        _out(
            args,
            {"event": "channel_closed", "channel_id": ch.id, "reason": ch.closed_reason},
            f"closed {ch.id} ({ch.closed_reason})",
        )

    async def run() -> None:
        async with connect(
            args.url, args.agent, token=args.token or None, ssl_context=_ssl(args), connect_timeout=args.timeout
        ) as conn:
            _out(
                args,
                {"event": "connected", "agent": conn.agent, "node": conn.node, "public_key": conn.public_key},
                f"listening as {conn.agent} on node {conn.node} (key {conn.public_key[:16]}...)",
            )
            with trio.move_on_after(args.seconds if args.seconds is not None else math.inf) as done:
                async with trio.open_nursery() as nursery:
                    async for ch in conn.incoming():
                        _out(
                            args,
                            {
                                "event": "channel_opened",
                                "channel_id": ch.id,
                                "agent": ch.agent,
                                "target": ch.target,
                                "intent": ch.intent,
                                "metadata": ch.metadata,
                            },
                            f"channel {ch.id} from {ch.agent} intent {ch.intent}",
                        )
                        nursery.start_soon(pump, conn, ch, done)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    if not args.json:
        sys.stdout.write(f"received {state['frames']} frame(s), {state['bad']} failed verification\n")
    return 1 if state["bad"] else 0


def _ssl(args: argparse.Namespace) -> Any:
    if not args.cafile:
        return None
    import ssl

    return ssl.create_default_context(cafile=args.cafile)


def _remote_args(p: argparse.ArgumentParser, *, agent: bool = True) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"node URL (default {DEFAULT_URL})")
    if agent:
        p.add_argument(
            "--agent",
            default=os.environ.get("MUX_AGENT") or "cli",
            help="the calling agent (default: $MUX_AGENT or 'cli')",
        )
    else:
        p.set_defaults(agent=os.environ.get("MUX_AGENT") or "cli")
    p.add_argument("--token", default=os.environ.get("MUX_TOKEN"), help="bearer token (default: $MUX_TOKEN)")
    p.add_argument("--cafile", help="PEM CA bundle to trust for https:// (e.g. a self-signed node cert)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the node (default 10)")


def extend(sub: Any, add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add the remote verbs' sub-parsers (called by ``mux.cli.build_parser``)."""
    p = add("status", "show a running node's status")
    _remote_args(p, agent=False)

    p = add("open", "open a channel on a running node")
    _remote_args(p)
    p.add_argument("--target", required=True, help="the agent to open the channel to")
    p.add_argument("--intent", default="stream", help="intent (default stream)")
    p.add_argument("--metadata", metavar="JSON", help="metadata, a JSON object")

    p = add("send", "send one JSON payload on a channel")
    _remote_args(p)
    p.add_argument("--channel", required=True, help="channel id (ch-...)")
    p.add_argument("--payload", required=True, metavar="JSON", help='the payload as JSON, e.g. \'{"text":"hi"}\'')

    p = add("channels", "list an agent's open channels on a running node")
    _remote_args(p)

    p = add("close", "close a channel on a running node")
    _remote_args(p)
    p.add_argument("--channel", required=True, help="channel id (ch-...)")
    p.add_argument("--reason", default="closed", help="close reason (default closed)")

    p = add("export", "export a channel's signed chain as JSON lines (for verify)")
    _remote_args(p)
    p.add_argument("--channel", required=True, help="channel id (ch-...)")
    p.add_argument("--output", "-o", help="file to write (default: stdout)")

    p = add("listen", "print channels opened to an agent and their frames (WebSocket)")
    _remote_args(p)
    p.add_argument("--count", type=int, help="stop after this many frames")
    p.add_argument("--seconds", type=float, help="stop after this many seconds")


cli._EXTENSIONS.append(extend)
