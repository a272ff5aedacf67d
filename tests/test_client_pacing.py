"""``mux.client`` honours the node's pacing hints on a channel (docs/protocol.md), checked on
random answers (hypothesis) with several tasks sending at once on a virtual clock: no send
starts while ``window`` frames are in flight or before the last ``pace_ms`` (or a
``throttled`` refusal's ``retry_after_ms``) has passed, and every send ends (a window that
opens again wakes the waiting ones)."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from mux.client import ClientChannel
from mux.errors import ChannelThrottled

answers = st.lists(
    st.tuples(
        st.integers(0, 30),
        st.one_of(st.none(), st.integers(1, 4)),
        st.one_of(st.none(), st.integers(1, 40)),
        st.booleans(),
    ),
    min_size=1,
    max_size=40,
)
"""For each send, in the order they reach the node: how long its answer takes (ms), the
answer's ``window`` and ``pace_ms`` (None: not given), and whether it is a ``throttled``
refusal (its ``retry_after_ms`` then the pace; the sender retries)."""


class _Node:
    """Stands in for the connection: answers each send as the plan says (then plain acks),
    and checks at the moment each send goes out that it keeps to the hints the node gave
    (its own count of sends in flight, the last ``window`` it answered, the latest time its
    ``pace_ms`` and ``retry_after_ms`` allow)."""

    def __init__(self, plan: list[tuple[int, int | None, int | None, bool]]) -> None:
        self.plan = list(plan)
        self.channel: ClientChannel | None = None
        self.started = 0
        self.in_flight = 0
        self.window: int | None = None
        self.not_before = -1e9

    async def _request(self, message: dict[str, Any], **_: Any) -> dict[str, Any]:
        ch = self.channel
        assert ch is not None
        now = trio.current_time()
        if self.window is not None:
            assert self.in_flight < self.window, f"a send beyond {self.in_flight} in flight with window {self.window}"
        assert now >= self.not_before - 1e-9, f"sent {self.not_before - now:.3f} s before pace_ms allowed"
        self.in_flight += 1
        try:
            return await self._answer(ch)
        finally:
            self.in_flight -= 1

    async def _answer(self, ch: ClientChannel) -> dict[str, Any]:
        delay, window, pace, refuse = (
            self.plan[self.started] if self.started < len(self.plan) else (0, None, None, False)
        )
        self.started += 1
        await trio.sleep(delay / 1000)
        self.window = window  # an answer without one lifts it
        if pace is not None:
            self.not_before = max(self.not_before, trio.current_time() + pace / 1000)
        if refuse:
            throttled = ChannelThrottled("over budget", channel_id=ch.id)
            throttled.retry_after_ms = pace or 1
            throttled.window = window
            if pace is None:
                self.not_before = max(self.not_before, trio.current_time() + 0.001)
            raise throttled
        reply: dict[str, Any] = {"event": "frame_ack", "channel_id": ch.id}
        if window is not None:
            reply["window"] = window
        if pace is not None:
            reply["pace_ms"] = pace
        return reply


@settings(max_examples=200, deadline=None)
@given(plan=answers, tasks=st.integers(1, 5))
def test_sends_keep_to_window_and_pace(plan: list[tuple[int, int | None, int | None, bool]], tasks: int) -> None:
    node = _Node(plan)

    async def scenario() -> None:
        channel = node.channel = ClientChannel(node, {"channel_id": "ch-" + "0" * 32}, 16)  # type: ignore[arg-type]
        left = len(plan)

        async def sender() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                try:
                    await channel.send({"n": left})
                except ChannelThrottled:
                    left += 1  # sent again, after retry_after_ms

        with trio.fail_after(3600):  # virtual seconds: a send that never ends fails here
            async with trio.open_nursery() as nursery:
                for _ in range(tasks):
                    nursery.start_soon(sender)

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert node.started == len(plan) + sum(refused for *_, refused in plan)
