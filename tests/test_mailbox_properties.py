"""Mailboxes stay within their memory bounds and count exactly what they hold, checked on
random traffic (hypothesis): durable sends to several offline agents and acks of random
seqs. After every step the node's count (``/status`` ``mailboxes.bytes``) is the sum of each
agent's, which is what its unacknowledged frames hold (``mux.frames.held_bytes``); no agent
holds more than ``mailbox_max_bytes`` nor the node more than ``mailboxes_max_bytes``; a send
is refused ``mailbox_full`` only when taking it would pass one of them (or the frame limit);
and the frames kept are exactly the ones sent and not yet acknowledged, in order."""

from __future__ import annotations

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import mux
from mux.frames import FRAME_HELD_BYTES, held_bytes

AGENTS = ("bob", "carol", "dave")

steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, len(AGENTS) - 1), st.integers(0, 2000)),
        st.tuples(st.just("ack"), st.integers(0, len(AGENTS) - 1), st.integers(0, 12)),
    ),
    max_size=60,
)
"""``("send", agent, payload length)`` or ``("ack", agent, how many of its oldest frames)``."""


@settings(max_examples=60, deadline=None)
@given(
    per_agent=st.integers(1_000, 12_000),
    frames=st.integers(1, 10),
    total=st.integers(1_000, 20_000),
    plan=steps,
)
def test_mailboxes_count_what_they_hold_within_their_bounds(
    per_agent: int, frames: int, total: int, plan: list[tuple[str, int, int]]
) -> None:
    trio.run(_scenario, per_agent, frames, total, plan)


async def _scenario(per_agent: int, frames: int, total: int, plan: list[tuple[str, int, int]]) -> None:
    limits = {"mailbox_max_bytes": per_agent, "mailbox_max_frames": frames, "mailboxes_max_bytes": total}
    async with mux.open_mux(agent="node", **limits) as node:
        channels = {agent: await node.open(agent, "chat", agent="alice") for agent in AGENTS}
        kept: dict[str, list[int]] = {agent: [] for agent in AGENTS}  # seqs not yet acknowledged
        for op, index, n in plan:
            agent = AGENTS[index]
            ch = channels[agent]
            if op == "send":
                box = node.mailboxes.get(agent)
                before_agent = box.bytes if box is not None else 0
                before_frames = box.frames if box is not None else 0
                before_all = node.status()["mailboxes"]["bytes"]
                try:
                    receipt = await ch.post("x" * n)
                except mux.ChannelError as exc:
                    assert exc.code == "mailbox_full"
                    wanted = FRAME_HELD_BYTES + n + 2  # the JSON string's quotes
                    assert (
                        before_all + wanted > total or before_agent + wanted > per_agent or before_frames >= frames
                    ), "refused only past a bound"
                else:
                    kept[agent].append(receipt.frame.seq)
            elif kept[agent]:
                upto = kept[agent][min(n, len(kept[agent])) - 1] if n else 0
                node.ack(agent, ch.id, upto)
                kept[agent] = [seq for seq in kept[agent] if seq > upto]
            held_now = {}
            for name in AGENTS:
                box = node.mailboxes.get(name)
                mail = box.channels.get(channels[name].id) if box is not None else None
                frames_kept = list(mail.frames) if mail is not None else []
                assert [f.seq for f in frames_kept] == kept[name], "exactly the unacknowledged frames, in order"
                held_now[name] = sum(held_bytes(f) for f in frames_kept)
                assert (box.bytes if box is not None else 0) == held_now[name]
                assert held_now[name] <= per_agent and len(frames_kept) <= frames
            assert node.status()["mailboxes"]["bytes"] == sum(held_now.values()) <= total
