"""Network verbs of the command line: ``tunnel`` (vpn:tunnel) and ``ping`` (tibet:ping).

How this works: importing this module registers its handlers with ``mux.cli``'s ``@command``
registry and appends :func:`extend` to ``mux.cli._EXTENSIONS`` (the one import line at the
end of ``mux/cli.py``).

- ``python -m mux tunnel --local 127.0.0.1:9000 --remote HOST:PORT`` connects one WebSocket
  (:func:`mux.client.connect`) and runs :func:`mux.tunnel.serve_tunnel`: every accepted
  local connection gets its own ``vpn:tunnel`` channel. It prints a ``listening`` line, one
  line per finished connection and a summary on exit (``--seconds``, SIGINT or SIGTERM).
- ``python -m mux ping AGENT`` opens a ``tibet:ping`` channel to the node (``AGENT`` = the
  node's name or ``node``) or to another agent and sends ``--count`` pings
  (:func:`ping_agent`). Each pong is verified with the node's public key (``--key`` pins it;
  otherwise the key the node announced on connect is used) and printed with its round-trip
  time and who answered (the frame's node-attested ``sender``); then min/avg/max.
  ``python -m mux ping --answer`` instead answers pings sent to ``--agent``
  (:func:`answer_pings`), which is what an agent does to be pingable.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio

from backends.tping import is_ping

from . import cli
from .cli import DEFAULT_URL
from .errors import BadRequest, MuxError, VerificationError
from .signing import verify_frame

if TYPE_CHECKING:
    from .client import ClientChannel, MuxConnection
    from .tunnel import TunnelResult, TunnelStats

__all__ = ["PING_INTENT", "PingReply", "answer_ping_channel", "answer_pings", "extend", "ping_agent"]

PING_INTENT = "tibet:ping"


@attrs.frozen
class PingReply:
    """One answered ping: round trip, who answered, and whether the pong verified."""

    number: int
    """1 for the first ping of a run."""
    nonce: str
    rtt_s: float
    sender: str
    """The pong frame's ``sender``: the node's agent, or the pinged agent (node-attested)."""
    verified: bool
    verify_error: str | None
    frame: dict[str, Any]
    """The pong frame as received (``Frame.to_dict()`` form)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form (for ``--json``)."""
        return {
            "event": "pong",
            "number": self.number,
            "nonce": self.nonce,
            "rtt_ms": round(self.rtt_s * 1000, 3),
            "sender": self.sender,
            "by": self.frame.get("payload", {}).get("by"),
            "seq": self.frame.get("seq"),
            "verified": self.verified,
            **({"verify_error": self.verify_error} if self.verify_error else {}),
        }


def _node_alias(conn: MuxConnection, target: str) -> str:
    return conn.node if target.strip().lower() in ("node", conn.node) else target


async def ping_agent(
    conn: MuxConnection,
    target: str,
    *,
    count: int = 1,
    interval: float = 0.0,
    timeout: float = 5.0,
    key: str | None = None,
    on_reply: Callable[[int, PingReply | None, str], None] | None = None,
) -> list[PingReply | None]:
    """Ping ``target`` (``"node"`` or the node's name = the node itself) ``count`` times.

    Opens one ``tibet:ping`` channel, sends ``{"type":"ping","nonce","t0"}`` frames and waits
    up to ``timeout`` for each matching pong; verifies each pong with ``key`` (hex; default
    the node key announced on connect). Returns one :class:`PingReply` per ping, or None for a
    ping that got no answer; ``on_reply(number, reply, why)`` is called as each one ends.
    The channel is closed at the end (reason ``ping_done``).
    """
    from .tunnel import send_with_retry

    ch = await conn.open(_node_alias(conn, target), PING_INTENT)
    public_key = key or conn.public_key
    out: list[PingReply | None] = []
    try:
        for number in range(1, count + 1):
            if number > 1 and interval > 0:
                await trio.sleep(interval)
            nonce = secrets.token_hex(8)
            start = trio.current_time()
            reply: PingReply | None = None
            why = ""
            with trio.move_on_after(timeout):
                await send_with_retry(ch, {"type": "ping", "nonce": nonce, "t0": time.time_ns()})
                async for frame in ch:
                    payload = frame.get("payload")
                    if not isinstance(payload, dict) or payload.get("nonce") != nonce:
                        continue
                    if payload.get("type") != "pong":
                        why = str(payload.get("error") or payload.get("type"))
                        break
                    rtt = trio.current_time() - start
                    problem: str | None = None
                    try:
                        verify_frame(frame, public_key)
                    except VerificationError as exc:
                        problem = exc.reason
                    reply = PingReply(number, nonce, rtt, str(frame.get("sender")), problem is None, problem, frame)
                    break
                else:
                    why = f"channel closed ({ch.closed_reason})"
            if reply is None and not why:
                why = f"no answer within {timeout} s"
            out.append(reply)
            if on_reply is not None:
                on_reply(number, reply, why)
            if not ch.is_open:
                out += [None] * (count - number)
                break
    finally:
        if ch.is_open:
            with trio.move_on_after(timeout, shield=True):
                try:
                    await ch.close("ping_done")
                except MuxError:
                    pass
    return out


async def answer_ping_channel(conn: MuxConnection, ch: ClientChannel) -> int:
    """Answer every ping on ``ch`` with ``{"type":"pong","nonce","t0","t_agent","by"}``
    until the channel closes; returns how many were answered."""
    from .tunnel import send_with_retry

    answered = 0
    async for frame in ch:
        payload = frame.get("payload")
        if not is_ping(payload):
            continue
        pong = {"type": "pong", "nonce": payload["nonce"], "t0": payload.get("t0"), "t_agent": time.time_ns()}
        try:
            await send_with_retry(ch, {**pong, "by": conn.agent})
        except MuxError:
            break
        answered += 1
    return answered


async def answer_pings(conn: MuxConnection, *, on_channel: Callable[[ClientChannel], None] | None = None) -> None:
    """Answer pings on every ``tibet:ping`` channel opened to ``conn``'s agent, until the
    connection ends (other intents' channels are left alone: nobody reads them)."""
    async with trio.open_nursery() as nursery:
        async for ch in conn.incoming():
            if ch.intent == PING_INTENT or ch.intent.startswith(PING_INTENT + ":"):
                if on_channel is not None:
                    on_channel(ch)
                nursery.start_soon(answer_ping_channel, conn, ch)


# ---- output ----------------------------------------------------------------------------------


def _out(args: argparse.Namespace, data: dict[str, Any], human: str) -> None:
    sys.stdout.write((orjson.dumps(data).decode() if args.json else human) + "\n")
    sys.stdout.flush()


async def _until_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def _connect_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    ssl_context = None
    if args.cafile:
        import ssl

        ssl_context = ssl.create_default_context(cafile=args.cafile)
    return {"token": args.token or None, "ssl_context": ssl_context, "connect_timeout": args.timeout}


def _net_args(p: argparse.ArgumentParser, default_agent: str) -> None:
    agent = os.environ.get("MUX_AGENT") or default_agent
    p.add_argument("--url", default=DEFAULT_URL, help=f"node URL (default {DEFAULT_URL})")
    p.add_argument("--agent", default=agent, help="the calling agent (default: $MUX_AGENT or a random name)")
    p.add_argument("--token", default=os.environ.get("MUX_TOKEN"), help="bearer token (default: $MUX_TOKEN)")
    p.add_argument("--cafile", help="PEM CA bundle to trust for https:// (e.g. a self-signed node cert)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the node (default 10)")


# ---- tunnel ----------------------------------------------------------------------------------


def _result_line(n: int, r: TunnelResult) -> str:
    if r.channel_id is None:
        return f"connection {n} from {r.peer}: refused: {r.reason}: {r.detail}"
    end = f"closed ({r.reason}{': ' + r.detail if r.detail else ''})"
    return (
        f"connection {n} from {r.peer} via {r.channel_id}: {r.bytes_sent} B sent, {r.bytes_received} B received, "
        f"{r.duration_s:.3f} s, {end}"
    )


@cli.command("tunnel")
def cmd_tunnel(args: argparse.Namespace) -> int:
    """Forward local TCP connections to ``--remote`` through the node (``vpn:tunnel``)."""
    from .client import connect
    from .tunnel import TunnelStats, parse_address, serve_tunnel

    local = parse_address(args.local, what="--local")
    remote = parse_address(args.remote, what="--remote")
    if remote[1] == 0:
        raise BadRequest("--remote needs a port", code="bad_request")
    stats = TunnelStats()
    done = 0

    def on_connection(result: TunnelResult) -> None:
        nonlocal done
        done += 1
        _out(args, {"event": "connection", "number": done, **result.to_dict()}, _result_line(done, result))

    async def run() -> None:
        async with connect(args.url, args.agent, **_connect_kwargs(args)) as conn:
            with trio.move_on_after(args.seconds if args.seconds is not None else math.inf):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_until_signal, nursery.cancel_scope)
                    listener = await nursery.start(
                        lambda task_status: serve_tunnel(
                            conn,
                            local,
                            remote,
                            node=args.node,
                            on_connection=on_connection,
                            stats=stats,
                            task_status=task_status,
                        )
                    )
                    _out(
                        args,
                        {
                            "event": "listening",
                            "local": f"{listener.host}:{listener.port}",
                            "remote": f"{remote[0]}:{remote[1]}",
                            "node": conn.node,
                            "agent": conn.agent,
                        },
                        f"tunnel listening on {listener.host}:{listener.port} -> {remote[0]}:{remote[1]} "
                        f"via node {args.node or conn.node} as {conn.agent}",
                    )
                    # channels opened to us are not ours to serve; this loop ends with the
                    # connection: a tunnel without its node stops instead of refusing forever
                    async for _ in conn.incoming():
                        pass
                    lost.append(True)
                    _out(args, {"event": "connection_lost"}, "the connection to the node was lost")
                    nursery.cancel_scope.cancel()

    lost: list[bool] = []
    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    _summary(args, stats)
    return 1 if lost else 0


def _summary(args: argparse.Namespace, stats: TunnelStats) -> None:
    _out(
        args,
        {"event": "summary", **stats.to_dict()},
        f"tunnel done: {stats.connections} connection(s), {stats.failed} not closed cleanly, "
        f"{stats.bytes_sent} B sent, {stats.bytes_received} B received",
    )


# ---- ping ------------------------------------------------------------------------------------


@cli.command("ping")
def cmd_ping(args: argparse.Namespace) -> int:
    """Ping the node or an agent (``tibet:ping``), or answer pings with ``--answer``."""
    from .client import connect

    if args.answer:
        return _answer(args)
    if not args.target:
        raise BadRequest("name the agent to ping (or 'node'), or use --answer", code="bad_request")
    if args.count < 1:
        raise BadRequest("--count must be at least 1", code="bad_request")
    replies: list[PingReply | None] = []
    info: dict[str, str] = {}

    def on_reply(number: int, reply: PingReply | None, why: str) -> None:
        if reply is None:
            _out(args, {"event": "lost", "number": number, "why": why}, f"ping {number}: no pong: {why}")
            return
        by = reply.frame.get("payload", {}).get("by")
        claim = "" if by in (None, reply.sender) else f" (payload claims {by!r})"
        check = (
            f"verified with node key {info['key'][:16]}..."
            if reply.verified
            else f"BAD SIGNATURE ({reply.verify_error})"
        )
        _out(
            args,
            reply.to_dict(),
            f"pong {number} from {reply.sender}{claim}: seq {reply.frame.get('seq')} "
            f"time {reply.rtt_s * 1000:.3f} ms [{check}]",
        )

    async def run() -> None:
        async with connect(args.url, args.agent, **_connect_kwargs(args)) as conn:
            info["key"] = args.key or conn.public_key
            info["target"] = _node_alias(conn, args.target)
            info["node"] = conn.node
            _out(
                args,
                {"event": "ping", "target": info["target"], "node": conn.node, "agent": conn.agent},
                f"PING {info['target']} via node {conn.node} as {conn.agent}",
            )
            replies.extend(
                await ping_agent(
                    conn,
                    args.target,
                    count=args.count,
                    interval=args.interval,
                    timeout=args.wait,
                    key=args.key,
                    on_reply=on_reply,
                )
            )

    trio.run(run)
    got = [r for r in replies if r is not None]
    bad = sum(1 for r in got if not r.verified)
    rtts = [r.rtt_s * 1000 for r in got]
    stats = {
        "event": "summary",
        "target": info.get("target"),
        "sent": args.count,
        "received": len(got),
        "failed_verification": bad,
        "rtt_ms": {"min": min(rtts), "avg": sum(rtts) / len(rtts), "max": max(rtts)} if rtts else None,
    }
    rtt_text = f"rtt min/avg/max = {min(rtts):.3f}/{sum(rtts) / len(rtts):.3f}/{max(rtts):.3f} ms" if rtts else ""
    _out(
        args,
        stats,
        f"--- {info.get('target')} ping statistics: {args.count} sent, {len(got)} received, "
        f"{bad} failed verification{'; ' + rtt_text if rtt_text else ''}",
    )
    return 0 if len(got) == args.count and not bad else 1


def _answer(args: argparse.Namespace) -> int:
    from .client import connect

    def on_channel(ch: ClientChannel) -> None:
        _out(
            args,
            {"event": "channel_opened", "channel_id": ch.id, "agent": ch.agent},
            f"answering pings from {ch.agent} on {ch.id}",
        )

    async def run() -> None:
        async with connect(args.url, args.agent, **_connect_kwargs(args)) as conn:
            with trio.move_on_after(args.seconds if args.seconds is not None else math.inf):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_until_signal, nursery.cancel_scope)
                    _out(
                        args,
                        {"event": "answering", "agent": conn.agent, "node": conn.node},
                        f"answering pings to {conn.agent} on node {conn.node}",
                    )
                    await answer_pings(conn, on_channel=on_channel)
                    nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    return 0


# ---- parsers ---------------------------------------------------------------------------------


def extend(sub: Any, add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add the ``tunnel`` and ``ping`` sub-parsers (called by ``mux.cli.build_parser``)."""
    p = add("tunnel", "forward local TCP connections through the node to HOST:PORT (vpn:tunnel)")
    _net_args(p, f"tunnel-{secrets.token_hex(3)}")
    p.add_argument("--local", required=True, metavar="HOST:PORT", help="local address to listen on (port 0: any)")
    p.add_argument(
        "--remote", required=True, metavar="HOST:PORT", help="destination, as the node's allow-list names it"
    )
    p.add_argument("--node", help="the node's agent name (default: as the node announces it)")
    p.add_argument("--seconds", type=float, help="stop after this many seconds (default: until SIGINT/SIGTERM)")

    p = add("ping", "ping the node or an agent (tibet:ping), verifying each signed pong")
    p.add_argument("target", nargs="?", metavar="AGENT", help="the agent to ping; 'node' (or its name) = the node")
    _net_args(p, f"ping-{secrets.token_hex(3)}")
    p.add_argument("--count", "-c", type=int, default=4, help="pings to send (default 4)")
    p.add_argument("--interval", "-i", type=float, default=0.5, help="seconds between pings (default 0.5)")
    p.add_argument("--wait", type=float, default=5.0, help="seconds to wait for each pong (default 5)")
    p.add_argument("--key", metavar="HEX", help="pin the node's public key (default: as announced on connect)")
    p.add_argument("--answer", action="store_true", help="answer pings sent to --agent instead of pinging")
    p.add_argument("--seconds", type=float, help="with --answer: stop after this many seconds")


cli._EXTENSIONS.append(extend)
