"""The token bucket's promises, checked on random traffic (hypothesis): a channel never
passes more than its budget (``burst`` plus ``rate`` per second, and at most one frame larger
than ``burst`` beyond that); a refused frame spends nothing; and a frame refused with
``retry_after_ms`` passes when retried that much later. And bulk paced beside a call goes in
the gap after one of the call's frames, never before it is ready, at most a period later."""

from __future__ import annotations

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from mux.bandwidth import GAP_CLOSES, GAP_OPENS, Cadence, TokenBucket

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


@settings(max_examples=300, deadline=None)
@given(
    gaps=st.lists(st.one_of(st.floats(0.0, 0.2), st.just(1.5)), min_size=1, max_size=30),
    start=st.floats(0.0, 1e5),
    after=st.floats(0.0, 0.5),
)
def test_bulk_is_put_in_the_gap_after_a_call_frame(gaps: list[float], start: float, after: float) -> None:
    cadence = Cadence()
    now = start
    for gap in gaps:
        now += gap
        cadence.frame(now)
    ready = now + after
    when = cadence.next_gap(ready)
    period = cadence.period
    if period is None:
        assert when == ready
        return
    assert 0.005 <= period <= 0.1, "a period is learnt only from gaps of 5 to 100 ms"
    assert when >= ready - 1e-9, "never earlier than the frame is ready"
    assert when - ready <= (1 - GAP_CLOSES + GAP_OPENS) * period + 1e-9, "at most the rest of one period later"
    phase = ((when - cadence.last) / period) % 1.0
    assert GAP_OPENS - 1e-6 <= phase <= GAP_CLOSES + 1e-6 or phase >= 1 - 1e-6, (
        f"sent at {phase:.3f} of the call's period, outside its gap"
    )
