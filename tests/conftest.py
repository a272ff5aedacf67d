"""Shared fixtures: an in-memory Mux per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import mux


@pytest.fixture
async def node() -> AsyncIterator[mux.Mux]:
    """A Mux with an in-memory key, run in its own nursery for the test."""
    async with mux.open_mux(agent="node") as m:
        yield m
