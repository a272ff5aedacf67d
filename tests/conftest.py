"""Shared fixtures: an in-memory Mux per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

import mux
from mux.server import ServeInfo

from .nodes import serve_node


@pytest.fixture
async def node() -> AsyncIterator[mux.Mux]:
    """A Mux with an in-memory key, run in its own nursery for the test."""
    async with mux.open_mux(agent="node") as m:
        yield m


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[ServeInfo]:
    """A real Hypercorn node on a free loopback port (plain HTTP, in-memory key)."""
    yield await serve_node(nursery)
