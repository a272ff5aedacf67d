"""The voice benchmark's floods are what the issue's row (d) names: beside the call, the same
connection floods a ``stream`` channel and a real ``file:sync`` transfer (the sync backend's
protocol: chunk headers and chunks in order, refused frames sent again), in every flood
block, without a voice frame refused or a connection closed (a real node subprocess, a few
frames per block)."""

from __future__ import annotations

import pytest

from tests.bench import common, latency
from tests.bench.common import node_process

FRAMES = 30
"""Voice frames per phase: ``latency.ROUNDS`` blocks of 10."""


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer idle pings before the call, a shorter settle after each block."""
    monkeypatch.setattr(latency, "PINGS", 5)
    monkeypatch.setattr(latency, "SETTLE_S", 0.1)


async def test_the_call_beside_a_stream_and_a_file_transfer(quick: None) -> None:
    with node_process() as node:
        res = await latency.voice_run(node, FRAMES)
    assert [f.intent for f in res.floods] == ["stream", "file:sync"]
    for phase in res.phases[:3]:
        assert phase.sent == phase.received == FRAMES and not phase.refused
        assert len(phase.send_s) == FRAMES and all(0 < s < latency.SEND_LIMIT_S for s in phase.send_s)
    assert not res.closed_connections and not res.closed_channels and not res.errors
    assert res.alive == {"caller": True, "callee": True}
    blocks = [(p, f.intent, f) for p, f, _ in res.flood_runs]
    assert len(blocks) == 2 * len(latency.FLOOD_INTENTS) * latency.ROUNDS
    for p, intent, flood in blocks:
        assert flood.rx_bytes > 0 and flood.ok > 0, (p, intent, flood)
        if intent == "file:sync":  # only the sync protocol's own refusals and the budget's
            assert set(flood.refused) <= {
                "throttled",
                "receiver_full",
                "chunk_data_expected",
                "chunk_out_of_order",
                "chunk_without_header",
            }
    sync = res.floods[1].sync
    assert sync is not None and sync.acked > 2 * latency.ROUNDS * 2, "chunks went through in every flood block"
    delivered = sum(f.rx_bytes for _, intent, f in blocks if intent == "file:sync")
    assert delivered == (sync.acked // 2) * latency.FLOOD_BYTES, "every accepted chunk reached the callee"
    common.TARGETS.clear()
    rows = latency.report(res, FRAMES)
    assert any("file:sync" in label for label, _ in rows)
    sends = next(figure for label, figure in rows if "the caller's own send of a voice frame" in label)
    p99s = [float(v) for v in sends.split(" ms")[0].split(" / ")]  # the caller's send, each phase
    assert len(p99s) == 3 and all(0 < v < latency.SEND_LIMIT_S * 1e3 for v in p99s), sends
    late = next(figure for label, figure in rows if "the slowest 1% of frames" in label)
    assert late.startswith("1 of 1 / ") or late.startswith("0 of 1 / "), late  # 30 frames: the slowest one
    voice, refusals = common.TARGETS  # the section's two targets, for the bench's summary
    assert voice.name.startswith("voice p99 beside a bulk flood") and voice.figure.endswith("x")
    assert voice.met == ("yes" if float(voice.figure[:-1]) <= 1.5 else "no")
    assert (refusals.figure, refusals.met) == ("0 refused; connections closed: 0", "yes")


def test_the_slowest_frames_are_told_apart_by_where_they_were_held_up() -> None:
    """A frame as late at the caller's ``frame_ack`` as at the callee was held up before the
    node queued it for the callee; one acknowledged early was held up on the way out."""
    phase = latency.Phase()
    for i in range(300):  # the slowest 1%: three frames
        phase.lat_by[i] = 0.001
        phase.ack_s[i] = 0.0005
    phase.lat_by.update({7: 0.020, 8: 0.015, 9: 0.012})
    phase.ack_s.update({7: 0.019, 8: 0.002, 9: 0.010})  # in, out, in (10 ms of 12: over 3/4)
    assert latency.where_late(phase) == (2, 3)
    phase.ack_s.pop(7)  # its frame_ack never came back: not counted as held up on the way in
    assert latency.where_late(phase) == (1, 3)
    assert latency.where_late(latency.Phase()) == (0, 0)
