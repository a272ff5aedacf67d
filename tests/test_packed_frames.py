"""A chain packed into one ``bytes`` (``mux.packed_frames``) unpacks to equal frames.

Checked on random chains (hypothesis): JSON and binary payloads, frames signed and left to a
later signature (``sig`` ``""``), frames their sender signed too, text fields in any
script, and hash fields that are not canonical lowercase hex (kept as text). The unpacked
frames are ``==`` the originals, with the same payload bytes and hashes, and
``verify_chain`` says the same of them; and a packed chain is far smaller than the frames kept as objects.
"""

from __future__ import annotations

import os
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from mux import packed_frames
from mux.frames import AgentSignature, ChainHead, Frame, held_bytes
from mux.signing import NodeKey, VerificationError, verify_chain

KEY = NodeKey.generate()

texts = st.text(max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
payloads = json_values | st.binary(max_size=300)


@st.composite
def chains(draw: st.DrawFn) -> list[Frame]:
    """A chain made by a real ``ChainHead``: open, data frames (some unsigned, some signed by
    their sender too), maybe a close."""
    head = ChainHead(draw(texts), draw(texts), KEY.sign, sign_every=draw(st.integers(1, 4)), sign_within_ms=10**9)
    ends = draw(texts), draw(texts)
    frames = [head.append("open", *ends, {"agent": ends[0]}, draw(st.integers(0, 2**62)))]
    for _ in range(draw(st.integers(0, 6))):
        agent = AgentSignature(draw(texts), draw(texts), os.urandom(64).hex()) if draw(st.booleans()) else None
        sender, target = ends if draw(st.booleans()) else ends[::-1]
        frames.append(head.append("data", sender, target, draw(payloads), draw(st.integers(0, 2**62)), agent=agent))
    if draw(st.booleans()):
        frames.append(head.append("close", *ends, {"reason": "done"}, draw(st.integers(0, 2**62))))
    return frames


@settings(max_examples=200, deadline=None)
@given(frames=chains())
def test_a_packed_chain_unpacks_to_the_same_frames(frames: list[Frame]) -> None:
    packed = packed_frames.pack(frames)
    assert packed_frames.count(packed) == len(frames)
    back = packed_frames.unpack(packed, frames[0].channel_id)
    assert back == frames
    for got, was in zip(back, frames, strict=True):
        assert (got.raw, got.binary, got.payload, got.agent) == (was.raw, was.binary, was.payload, was.agent)
        assert got.computed_hash() == was.tbz_hash
    assert _verdict(back) == _verdict(frames)


def _verdict(frames: list[Frame]) -> str:
    """What ``verify_chain`` says of ``frames``: the frames it verified, or its error's code
    (a chain whose newest data frames wait for a signature is ``unsigned_tail``)."""
    try:
        return f"{verify_chain(frames, KEY.public_hex).frames} frames"
    except VerificationError as exc:
        return exc.code


@settings(max_examples=100, deadline=None)
@given(
    prev=st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=70),
    sig=st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=130),
    digest=st.text(max_size=70),
)
def test_hash_fields_that_are_not_canonical_hex_are_kept_as_they_are(prev: str, sig: str, digest: str) -> None:
    frame = Frame(
        channel_id="ch",
        seq=3,
        kind="data",
        sender="a",
        target="b",
        intent="stream",
        ts=1,
        prev=prev,
        payload=b"\x00\x01",
        tbz_hash=digest,
        sig=sig,
        raw=b"\x00\x01",
    )
    (back,) = packed_frames.unpack(packed_frames.pack([frame]), "ch")
    assert (back.prev, back.tbz_hash, back.sig) == (prev, digest, sig)
    assert back == frame


def test_an_empty_chain_packs_to_its_count_alone() -> None:
    assert packed_frames.unpack(packed_frames.pack([]), "ch") == []
    assert packed_frames.count(packed_frames.pack([])) == 0


def test_a_packed_chain_holds_far_less_than_its_frames() -> None:
    """A closed channel's open and close frames: under 500 bytes packed, against 1,200 as
    objects (``held_bytes``, which tests/test_memory_ledger.py checks against
    tracemalloc)."""
    head = ChainHead("ch-" + "7" * 32, "stream", KEY.sign)
    frames = [
        head.append("open", "alice", "bob", {"agent": "alice", "target": "bob", "metadata": {}}, 1_700_000_000_000),
        head.append("close", "alice", "bob", {"reason": "closed", "by": "alice"}, 1_700_000_000_001),
    ]
    packed = packed_frames.pack(frames)
    kept = sys.getsizeof(packed)
    assert kept < 500
    assert kept * 2 < sum(held_bytes(frame) for frame in frames)
