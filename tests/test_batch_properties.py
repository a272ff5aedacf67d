"""One signature per channel per ``batch`` (docs/frames.md, "Signing a batch once"), checked on
random batches (hypothesis) through real sessions: sends on several channels, some refused
because a receiver is full; after every batch each channel's chain verifies offline and ends
in a signature, every frame of the batch covered by the one signature chained for that channel in the same
batch (on its last send, or on a ``seal`` when that send was refused), and the batch answers
every item in order."""

from __future__ import annotations

from typing import Any

import orjson
import trio
from hypothesis import event, given, settings
from hypothesis import strategies as st

import mux
from mux.signing import verify_chain

from .nodes import started_sessions

batches = st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=12), min_size=1, max_size=6)
"""Batches of sends, each on channel 0, 1 or 2 (channel 2 goes to a receiver that reads only
between batches, with room for ``buffer`` frames: some of its sends are refused)."""


@settings(max_examples=80, deadline=None)
@given(plan=batches, buffer=st.integers(1, 4), reads=st.booleans())
async def test_every_batch_leaves_each_chain_signed(plan: list[list[int]], buffer: int, reads: bool) -> None:
    async with mux.open_mux(agent="node", channel_buffer_frames=buffer) as node, trio.open_nursery() as nursery:
        sender, quick, slow = started_sessions(node, nursery, "alice", "quick", "slow")
        channels = []
        for target in ("quick", "quick", "slow"):
            (opened,) = sender.handle(orjson.dumps({"action": "open", "target": target}).decode())
            channels.append(orjson.loads(opened)["channel_id"])
        n = 0
        seen = [len(await node.export(cid)) for cid in channels]
        for batch in plan:
            items: list[dict[str, Any]] = []
            for k in batch:
                n += 1
                items.append({"action": "send", "channel_id": channels[k], "ref": n, "payload": {"n": n}})
            (reply,) = sender.handle(orjson.dumps({"action": "batch", "items": items}).decode())
            answers = orjson.loads(reply)["items"]
            assert [a["ref"] for a in answers] == [i["ref"] for i in items], "every item answered, in order"
            assert all(a.get("event") == "frame_ack" or a.get("error") == "receiver_full" for a in answers)
            event("a send refused", any("error" in a for a in answers))
            for k, cid in enumerate(channels):
                chain = await node.export(cid)
                report = verify_chain([f.to_dict() for f in chain], node.public_key)  # raises on an unsigned tail
                assert report is not None and chain[-1].sig
                added = chain[seen[k] :]
                seen[k] = len(chain)
                mine = [a for i, a in zip(batch, answers, strict=True) if i == k]
                if added:  # one signature for the channel's part of the batch
                    assert sum(1 for f in added if f.sig) == 1, [(f.kind, bool(f.sig)) for f in added]
                # a seal only when the channel's last send of the batch was refused
                assert any(f.kind == "seal" for f in added) == bool(added and mine and "error" in mine[-1])
            while quick.outbox.get_nowait() is not None:
                pass
            while reads and slow.outbox.get_nowait() is not None:
                pass
        nursery.cancel_scope.cancel()
