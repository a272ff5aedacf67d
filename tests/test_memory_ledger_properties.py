"""The in-memory ledger stays within its bounds (``mux.storage.MemoryStore``), checked on
random traffic (hypothesis): after every frame it holds at most ``max_channels`` chains,
each at most ``max_frames_per_channel`` frames and ``max_bytes_per_channel`` bytes held (a
chain's newest frame is always kept), at most ``max_total_bytes`` in all (unless all it
holds is the newest frame of the chain just written), and its byte count is the sum of
what it holds (``held_bytes`` of each frame, or a packed chain's length, and
``CHAIN_HELD_BYTES`` of each chain). Channels close now and then (their chains are packed)
and the store compacts now and then; neither changes what it gives back. What it
keeps of a chain is the newest part of that channel's frames, in order; the chain just
written is always kept, and the chains it forgets are the ones it began longest ago of the
others."""

from __future__ import annotations

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from mux.frames import ChainHead, Frame, held_bytes
from mux.signing import NodeKey
from mux.storage import CHAIN_HELD_BYTES, MemoryStore

KEY = NodeKey.generate()
CHANNELS = [f"ch-{i:032x}" for i in range(6)]

traffic = st.lists(
    st.tuples(
        st.integers(0, len(CHANNELS) - 1), st.integers(0, 300), st.sampled_from(["append"] * 6 + ["close", "compact"])
    ),
    max_size=80,
)
"""Steps in order: which channel, the payload's length, and what happens: a frame stored, then
for ``close`` the channel's close recorded (its chain packed), for ``compact`` the store
compacted."""


def _held(store: MemoryStore) -> dict[str, list[Frame]]:
    """Every chain the store holds, by channel, through its own ``chain`` read."""

    async def read() -> dict[str, list[Frame]]:
        return {cid: await store.chain(cid) for cid in CHANNELS}

    return {cid: frames for cid, frames in trio.run(read).items() if frames}


@settings(max_examples=150, deadline=None)
@given(
    max_channels=st.integers(1, 5),
    max_frames=st.integers(1, 8),
    max_bytes=st.integers(1, 4000),
    max_total=st.integers(1, 12_000),
    plan=traffic,
)
def test_the_memory_ledger_keeps_within_its_bounds(
    max_channels: int, max_frames: int, max_bytes: int, max_total: int, plan: list[tuple[int, int, str]]
) -> None:
    store = MemoryStore(
        max_channels=max_channels,
        max_frames_per_channel=max_frames,
        max_bytes_per_channel=max_bytes,
        max_total_bytes=max_total,
    )
    heads = {cid: ChainHead(cid, "stream", KEY.sign) for cid in CHANNELS}
    sent: dict[str, list[Frame]] = {cid: [] for cid in CHANNELS}
    began: dict[str, int] = {}  # when the store last began each chain it had not held
    for step, (index, size, then) in enumerate(plan):
        cid = CHANNELS[index]
        frame = heads[cid].append("data", "a", "b", "x" * size, step)
        held_before = _held(store)
        if cid not in held_before:
            began[cid] = step
        store.append(frame)
        sent[cid].append(frame)
        assert store.position == step + 1
        assert trio.run(store.chain, cid)[-1] is frame, "the frame just written is kept, as it is"
        if then == "close":
            store.record_close(cid, "done")
            assert isinstance(store._chains[cid], bytes), "a closed channel's chain is packed"
        elif then == "compact":
            store.compact()
        held = _held(store)
        assert 1 <= len(held) <= max_channels
        sizes = {
            c: len(chain) if isinstance(chain, bytes) else sum(held_bytes(f) for f in chain)
            for c, chain in store._chains.items()
        }
        assert sizes.keys() == held.keys()
        assert store._total == sum(sizes.values()) + CHAIN_HELD_BYTES * len(held), "the count is what is held"
        usage = store.usage()
        assert usage["frames"] == sum(len(frames) for frames in held.values())
        assert usage["packed"] == sum(isinstance(chain, bytes) for chain in store._chains.values())
        assert cid in held and held[cid][-1] == frame, "the frame just written is kept"
        assert store._total <= max_total or (len(held) == 1 and len(held[cid]) == 1)
        for kept, frames in held.items():
            assert len(frames) <= max_frames
            assert sizes[kept] <= max_bytes or len(frames) == 1
            whole = sent[kept]
            assert frames == whole[len(whole) - len(frames) :], "the newest part of the channel, in order"
            first = frames[0].seq
            assert [f.seq for f in trio.run(store.chain, kept, first)] == [f.seq for f in frames[1:]]
        forgotten = [began[c] for c in held_before if c not in held]
        others = [began[c] for c in held_before if c in held and c != cid]
        if forgotten and others:
            assert max(forgotten) < min(others), "of the others, the chains begun longest ago go first"
