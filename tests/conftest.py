"""Shared fixtures: an in-memory Mux per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

import mux
from mux.server import ServeInfo, serve
from mux.settings import NodeSettings


@pytest.fixture
async def node() -> AsyncIterator[mux.Mux]:
    """A Mux with an in-memory key, run in its own nursery for the test."""
    async with mux.open_mux(agent="node") as m:
        yield m


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[ServeInfo]:
    """A real Hypercorn node on a free loopback port (plain HTTP, in-memory key)."""
    settings = NodeSettings(
        open_mode=True, host="127.0.0.1", port=0, data_dir=None, agent="node", graceful_timeout_s=1.0
    )
    info: ServeInfo = await nursery.start(lambda task_status: serve(settings, task_status=task_status))
    yield info
