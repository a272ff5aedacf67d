"""Starting real nodes in tests: Hypercorn on a free loopback port, in the test's nursery;
connections' protocol sessions driven by hand; and counting the tasks an in-process node runs."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import trio

from mux.core import Mux
from mux.server import ServeInfo, serve
from mux.session import WireSession
from mux.settings import NodeSettings
from mux.tls import write_self_signed
from mux.wire import pack_binary, unpack_binary

__all__ = ["loopback_tls", "outbox_events", "running_tasks", "send_numbered", "serve_node", "started_sessions"]

TEST_NODE: dict[str, Any] = {
    "open_mode": True,
    "host": "127.0.0.1",
    "port": 0,
    "data_dir": None,
    "agent": "node",
    "graceful_timeout_s": 1.0,
    "writer_idle_s": 0.05,  # writers end after 50 ms idle: every test with a node restarts them
}
"""A test node: no authentication, in-memory key and store, quick to shut down."""


async def serve_node(nursery: trio.Nursery, **settings: Any) -> ServeInfo:
    """A running node with ``TEST_NODE`` settings, any of them overridden by ``settings``."""
    node_settings = NodeSettings(**{**TEST_NODE, **settings})
    info: ServeInfo = await nursery.start(lambda task_status: serve(node_settings, task_status=task_status))
    return info


def loopback_tls(directory: Path) -> tuple[str, str, ssl.SSLContext]:
    """A self-signed certificate and key for 127.0.0.1 written into ``directory`` (their
    paths, for a node's ``certfile``/``keyfile``), and a client context trusting it."""
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    write_self_signed(certfile, keyfile, hosts=["127.0.0.1"], days=2)
    return str(certfile), str(keyfile), ssl.create_default_context(cafile=str(certfile))


def started_sessions(node: Mux, nursery: trio.Nursery, *agents: str, **options: Any) -> list[WireSession]:
    """A started :class:`WireSession` per agent (attached to ``node``, its tasks in ``nursery``;
    ``options`` for each, e.g. ``window``): what a connection runs, with no socket; a test
    hands it messages and reads its outbox."""
    sessions = [WireSession(node, node.attach(agent), max_message_bytes=1 << 20, **options) for agent in agents]
    for session in sessions:
        session.start(nursery)
    return sessions


def running_tasks(named: Callable[[str], bool]) -> int:
    """How many tasks of this trio run (an in-process node's among them) have a name for
    which ``named`` is true."""

    def walk(task: trio.lowlevel.Task) -> int:
        own = int(named(task.name))
        return own + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return walk(trio.lowlevel.current_root_task())


def outbox_events(messages: list[str | bytes]) -> list[dict[str, Any]]:
    """A hand-driven session's outgoing messages as events: JSON as it is; a binary frame
    with its header's fields and its payload (an integer's digits, as the property tests
    send) as ``{"n": int}``."""
    out = []
    for m in messages:
        if isinstance(m, bytes):
            header, payload = unpack_binary(m)
            out.append({**header, "payload": {"n": int(payload)}})
        else:
            out.append(orjson.loads(m))
    return out


def send_numbered(session: WireSession, channel_id: str, n: int, *, binary: bool) -> dict[str, Any]:
    """Hand ``session`` a ``send`` of frame number ``n`` (``ref`` n) on ``channel_id``: binary
    (its digits, as a call's media) or JSON ``{"n": n}``; return the one reply."""
    if binary:
        message: str | bytes = pack_binary({"action": "send", "channel_id": channel_id, "ref": n}, str(n).encode())
    else:
        message = orjson.dumps({"action": "send", "channel_id": channel_id, "ref": n, "payload": {"n": n}}).decode()
    (reply,) = outbox_events(session.handle(message))
    return reply
