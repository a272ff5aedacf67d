"""Starting real nodes in tests: Hypercorn on a free loopback port, in the test's nursery;
connections' protocol sessions driven by hand; and counting the tasks an in-process node runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from mux.core import Mux
from mux.server import ServeInfo, serve
from mux.session import WireSession
from mux.settings import NodeSettings

__all__ = ["running_tasks", "serve_node", "started_sessions"]

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


def started_sessions(node: Mux, nursery: trio.Nursery, *agents: str) -> list[WireSession]:
    """A started :class:`WireSession` per agent (attached to ``node``, its tasks in ``nursery``):
    what a connection runs, with no socket; a test hands it messages and reads its outbox."""
    sessions = [WireSession(node, node.attach(agent), max_message_bytes=1 << 20) for agent in agents]
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
