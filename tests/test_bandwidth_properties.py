"""The token bucket's promises, checked on random traffic (hypothesis): a channel never
passes more than its budget (``burst`` plus ``rate`` per second, and at most one frame larger
than ``burst`` beyond that); a refused frame spends nothing; and a frame refused with
``retry_after_ms`` passes when retried that much later."""

from __future__ import annotations

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from mux.bandwidth import TokenBucket

traffic = st.lists(st.tuples(st.integers(0, 400), st.integers(1, 6000)), min_size=1, max_size=80)
"""Frames: milliseconds since the previous one, and its size in bytes."""


@settings(max_examples=300, deadline=None)
@given(rate=st.integers(1, 200_000), burst=st.integers(1, 20_000), frames=traffic)
def test_a_bucket_keeps_to_its_budget_and_its_retry_hints(rate: int, burst: int, frames: list[tuple[int, int]]) -> None:
    bucket = TokenBucket(rate=rate, burst=burst)
    now = 0.0
    passed: list[tuple[float, int]] = []  # (time, size) of each frame that passed
    for gap_ms, size in frames:
        now += gap_ms / 1000
        before = attrs.evolve(bucket)
        if bucket.take(size, now):
            passed.append((now, size))
            continue
        # nothing spent: the bucket is only refilled to now
        stamp = now if before.stamp is None else before.stamp
        assert bucket.tokens == min(float(burst), before.tokens + (now - stamp) * rate)
        wait = bucket.retry_after_ms(size)
        assert wait >= 1
        retry = attrs.evolve(bucket)
        assert retry.take(size, now + wait / 1000), f"refused again after retry_after_ms={wait}"
        if wait > 1:  # and not (by more than rounding) a millisecond longer than needed
            early = attrs.evolve(bucket)
            assert not early.take(size, now + (wait - 1.01) / 1000), f"retry_after_ms={wait} is too long"
    # The budget, over every window of time: at most a full bucket, the refill over the
    # window, and what one frame larger than ``burst`` (let through a full bucket) goes past it.
    for i, (start, _) in enumerate(passed):
        total, largest = 0, 0
        for end, size in passed[i:]:
            total += size
            largest = max(largest, size)
            allowed = burst + rate * (end - start) + max(0, largest - burst)
            assert total <= allowed + 1e-5, f"{total} B passed in {end - start:.3f} s; the budget is {allowed:.1f}"
