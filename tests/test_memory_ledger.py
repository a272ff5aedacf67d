"""The in-memory ledger's byte bounds are bounds on memory (``mux.frames.held_bytes``).

Measured with ``tracemalloc``: the frames a :class:`MemoryStore` keeps, payload and
bookkeeping, take no more than it counts, and not much less; and a store filled with small
frames stays within ``max_total_bytes`` of real memory, where counting payload bytes alone
let it hold ten times that.
"""

from __future__ import annotations

import os
import tracemalloc
from typing import Any

import pytest
import trio

from mux.client import MuxClient, connect
from mux.core import MuxConfig, start_mux
from mux.errors import ChannelForbidden, ChannelNotFound
from mux.frames import AgentSignature, ChainHead
from mux.settings import NodeSettings
from mux.signing import NodeKey, verify_chain
from mux.storage import CHAIN_HELD_BYTES, MemoryStore

from .nodes import serve_node

KEY = NodeKey.generate()


def _fill(store: MemoryStore, *, frames: int, chains: int, size: int, signed_by_agent: bool, binary: bool) -> int:
    """Append ``frames`` fresh frames over ``chains`` chains to ``store`` (nothing else keeps
    them); return the memory this allocated and still holds (tracemalloc)."""
    heads = [ChainHead(f"ch-{i:032x}", "stream", KEY.sign) for i in range(chains)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(frames):
            agent = AgentSignature("a" * 64, os.urandom(12).hex(), os.urandom(64).hex()) if signed_by_agent else None
            payload = os.urandom(size) if binary else {"text": os.urandom(size // 2).hex()}
            store.append(heads[i % chains].append("data", "alice", "bob", payload, 1_700_000_000_000 + i, agent=agent))
        del agent, payload
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("size", "binary", "signed_by_agent", "chains"),
    [
        (0, False, False, 4),
        (40, False, False, 1),
        (100, True, False, 8),
        (100, False, True, 8),
        (1000, True, False, 2),
        (16_000, True, True, 4),
        (10, False, False, 1000),
    ],
)
def test_what_the_ledger_counts_is_what_its_frames_hold(
    size: int, binary: bool, signed_by_agent: bool, chains: int
) -> None:
    store = MemoryStore()
    frames = 3000 if size < 10_000 else 300
    traced = _fill(store, frames=frames, chains=chains, size=size, signed_by_agent=signed_by_agent, binary=binary)
    counted = store._total
    assert len(store._chains) == chains
    assert traced <= counted, f"the ledger holds {traced} bytes and counts {counted}"
    assert counted <= traced * 1.25 + 256 * chains, f"the ledger counts {counted} bytes and holds {traced}"


def test_a_ledger_of_small_frames_stays_within_its_memory_bound() -> None:
    bound = 2 << 20
    store = MemoryStore(max_total_bytes=bound, max_bytes_per_channel=bound // 4)
    traced = _fill(store, frames=20_000, chains=8, size=50, signed_by_agent=False, binary=True)
    assert store._total <= bound
    assert traced <= bound, f"{traced} bytes held for a {bound}-byte ledger"
    assert traced >= bound * 0.8, "and it keeps about that much"
    newest = sum(len(chain) for chain in store._chains.values())
    assert 2_000 < newest < 20_000


async def test_a_node_keeps_its_memory_ledger_within_the_setting(nursery: trio.Nursery) -> None:
    """``memory_ledger_bytes`` (``MUX_MEMORY_LEDGER_BYTES``) bounds a node's in-memory ledger,
    counted as it holds frames: after 600 small frames on each of two channels in turn it
    holds the newest few hundred of the second (the first chain forgotten whole, as the
    chain begun longest ago), ``/status`` says how much, and the export of what is left
    verifies. Counting payload bytes alone, it held all 1,200 frames (about 700 KB)."""
    bound = 256 << 10
    assert NodeSettings.from_env({"MUX_MEMORY_LEDGER_BYTES": str(bound)}).memory_ledger_bytes == bound
    node = await serve_node(nursery, memory_ledger_bytes=bound)
    with trio.fail_after(30):
        async with connect(node.url, "alice", batch=True) as alice, connect(node.url, "bob") as bob:
            channels = [await alice.open("bob", "stream") for _ in range(2)]
            theirs = [await bob.accept() for _ in channels]
            for ch, mine in zip(channels, theirs, strict=True):
                got: list[int] = []

                async def take(mine: Any = mine, got: list[int] = got) -> None:
                    got.extend([(await mine.receive())["payload"]["i"] for _ in range(600)])

                async with trio.open_nursery() as senders:
                    senders.start_soon(take)
                    for i in range(600):
                        await ch.send({"i": i})
                assert got == list(range(600))
            with MuxClient(node.url, "alice") as rest:
                status = await trio.to_thread.run_sync(rest.status)
                chains = [await trio.to_thread.run_sync(rest.chain, ch.id) for ch in channels]
    ledger = status["ledger"]
    assert ledger["store"] == "memory" and ledger["max_bytes"] == bound
    older, newer = chains
    assert older == [], "the chain begun longest ago is forgotten whole"
    assert ledger["chains"] == 1 and ledger["frames"] == len(newer)
    assert bound - 1024 < ledger["bytes"] <= bound + CHAIN_HELD_BYTES
    assert 200 < len(newer) < 500, "small frames count what they hold, not their payload alone"
    assert newer[0]["seq"] > 1 and newer[-1]["seq"] == 600, "the newest frames of the channel"
    assert verify_chain(newer, alice.public_key, require_open=False).frames == len(newer)


async def test_a_channel_the_node_no_longer_remembers_exports_while_the_ledger_keeps_it() -> None:
    """A memory node remembers ``closed_retention`` closed channels; the ledger keeps more
    chains, and they name their ends: such a channel still exports to its ends (and only to
    them) until the ledger forgets its chain."""
    store = MemoryStore(max_channels=6)
    async with trio.open_nursery() as nursery:
        m = await start_mux(
            nursery, agent="n", key=NodeKey.generate(), config=MuxConfig(closed_retention=1), store=store
        )
        ids = []
        for i in range(5):
            ch = await m.open("bob", "stream", agent="alice", metadata={"i": i})
            if i == 0:
                await ch.send({"hello": "bob"})
            await ch.close("done")
            ids.append(ch.id)
        with pytest.raises(ChannelNotFound):
            m.channel_state(ids[0])  # the node itself no longer remembers it
        chain = await m.export(ids[0], caller="bob")
        assert [f.kind for f in chain] == ["open", "data", "close"] and chain[0].payload["metadata"] == {"i": 0}
        assert verify_chain(chain, m.public_key).frames == 3
        assert await store.channel_ends(ids[0]) == ("alice", "bob")
        with pytest.raises(ChannelForbidden):
            await m.export(ids[0], caller="mallory")
        for _ in range(6):  # six more channels: the ledger forgets the first ones
            await (await m.open("bob", "stream", agent="alice")).close("done")
        with pytest.raises(ChannelNotFound):
            await m.export(ids[0], caller="bob")
        assert await store.channel_ends(ids[0]) is None
        await m.aclose()
        nursery.cancel_scope.cancel()
