"""Signing chain heads (docs/frames.md, ``sign_every`` and ``sign_within_ms``), checked on
random chains (hypothesis): open, close and seal frames are always signed; a data frame is
left unsigned only while fewer than N frames and less than T ms have gone since the oldest
unsigned one (or when a batch defers it); a chain ending in a signature verifies offline; and
no rewrite of unsigned frames, however consistently re-hashed, gets past the signature that
covers them, while a chain cut after an unsigned frame is refused as ``unsigned_tail``."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mux.errors import VerificationError
from mux.frames import ChainHead, Frame
from mux.signing import NodeKey, verify_chain

KEY = NodeKey.generate()
T0 = 1_790_000_000_000

steps = st.lists(
    st.tuples(st.sampled_from(("data", "data", "data", "deferred", "seal")), st.integers(0, 40)),
    max_size=40,
)
"""Frames after the open: kind (a ``deferred`` data frame is one of a batch but its last) and
milliseconds since the previous frame."""


def _rehashed(frames: list[dict[str, Any]], start: int, payload: Any) -> list[dict[str, Any]]:
    """``frames`` with frame ``start``'s payload replaced and every later hash and link
    recomputed, as a forger would (signatures cannot be: they stay as they were)."""
    out = [dict(f) for f in frames]
    out[start]["payload"] = payload
    for i in range(start, len(out)):
        if i > start:
            out[i]["prev"] = out[i - 1]["tbz_hash"]
        out[i]["tbz_hash"] = Frame.from_dict(out[i]).computed_hash()
    return out


@settings(max_examples=200, deadline=None)
@given(every=st.integers(1, 6), within=st.integers(1, 60), plan=steps, data=st.data())
def test_chain_heads_cover_every_frame_within_the_bound(
    every: int, within: int, plan: list[tuple[str, int]], data: st.DataObject
) -> None:
    chain = ChainHead("ch-" + "1" * 32, "chat", KEY.sign, sign_every=every, sign_within_ms=within)
    ts = T0
    frames = [chain.append("open", "a", "b", {"intent": "chat"}, ts)]
    run: list[int] = []  # timestamps of the unsigned frames since the last signed one
    for i, (kind, gap) in enumerate(plan):
        ts += gap
        if kind == "seal":
            frame = chain.append("seal", "node", "b", {"covers": chain.next_seq - 1}, ts)
        else:
            frame = chain.append("data", "a", "b", {"n": i}, ts, defer=kind == "deferred")
        if kind == "deferred":
            assert not frame.sig, "a deferred frame is left to a later frame's signature"
        else:
            # the bound: a frame that is not deferred is signed once it is the N-th since
            # the last signature, or T ms after the oldest unsigned one, and always if not data
            due = kind == "seal" or every <= 1 or len(run) + 1 >= every or (run and ts - run[0] >= within)
            assert bool(frame.sig) == bool(due), (kind, len(run), run and ts - run[0])
        run = [] if frame.sig else [*run, ts]
        frames.append(frame)
    frames.append(chain.append("close", "a", "b", {"reason": "done"}, ts))
    exported = [f.to_dict() for f in frames]
    report = verify_chain(exported, KEY.public_hex)
    assert report is not None

    unsigned = [i for i, f in enumerate(frames) if not f.sig]
    if not unsigned:
        return
    victim = data.draw(st.sampled_from(unsigned), label="rewritten frame")
    forged = _rehashed(exported, victim, {"n": "forged"})
    with pytest.raises(VerificationError) as caught:
        verify_chain(forged, KEY.public_hex)
    assert caught.value.reason in ("bad_signature", "bad_hash", "broken_link")
    cut = exported[: victim + 1]  # the chain as it stood with that frame its newest
    with pytest.raises(VerificationError) as tail:
        verify_chain(cut, KEY.public_hex)
    assert tail.value.reason == "unsigned_tail"
