"""Large frames on the wire (docs/protocol.md, ``frame_part``), checked on random payloads and
piece sizes (hypothesis): a frame that fits goes whole; a larger one in ``ceil(len / size)``
pieces, none over the size, numbered in order, the first carrying the frame's header; joined,
the pieces give back a frame that verifies offline, and a changed byte in any piece does not;
and ``mux.client`` rebuilds the frames of several channels whose pieces come interleaved."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mux.client import MuxConnection
from mux.errors import VerificationError
from mux.frames import ChainHead, Frame
from mux.signing import NodeKey, verify_frame
from mux.wire import frame_messages, unpack_binary

KEY = NodeKey.generate()
JSON_PAYLOADS = st.dictionaries(st.text(max_size=8), st.text(max_size=300), max_size=6)


def _rebuilt(messages: list[str | bytes]) -> dict[str, Any]:
    """The exported frame (docs/frames.md: a bytes payload in base64) a receiver rebuilds from
    ``messages`` (one frame, or its pieces)."""
    if len(messages) == 1 and isinstance(messages[0], str):
        return dict(orjson.loads(messages[0]))
    pieces = [unpack_binary(m) for m in messages if isinstance(m, bytes)]
    assert len(pieces) == len(messages), "a frame in pieces goes as binary messages only"
    first, _ = pieces[0]
    if first["event"] == "frame":  # a whole binary frame
        assert len(pieces) == 1
        return {**first, "payload": base64.b64encode(pieces[0][1]).decode(), "enc": "bytes"}
    frame = dict(first["frame"])
    raw = b"".join(data for _, data in pieces)
    frame["payload"] = base64.b64encode(raw).decode() if frame.get("enc") == "bytes" else orjson.loads(raw)
    return frame


@settings(max_examples=200, deadline=None)
@given(
    payload=st.one_of(st.binary(max_size=2500), JSON_PAYLOADS),
    size=st.integers(1, 700),
    seq=st.integers(0, 3),
    data=st.data(),
)
def test_pieces_rebuild_a_frame_that_verifies(payload: Any, size: int, seq: int, data: st.DataObject) -> None:
    chain = ChainHead("ch-" + "0" * 32, "file:sync", KEY.sign)
    for _ in range(seq):
        chain.append("data", "a", "b", b"earlier", 1_790_000_000_000)
    frame = chain.append("data", "a", "b", payload, 1_790_000_000_000)
    messages = frame_messages(frame, size)
    raw = frame.raw
    if len(raw) <= size:
        assert len(messages) == 1
        whole = messages[0]
        assert (orjson.loads(whole) if isinstance(whole, str) else unpack_binary(whole)[0])["event"] == "frame"
    else:
        parts = -(-len(raw) // size)
        assert len(messages) == parts
        headers = [unpack_binary(m)[0] for m in messages if isinstance(m, bytes)]
        assert [h["part"] for h in headers] == list(range(parts))
        assert all(h["parts"] == parts and h["seq"] == frame.seq and h["event"] == "frame_part" for h in headers)
        assert ["frame" in h for h in headers] == [True] + [False] * (parts - 1)
        assert all(len(unpack_binary(m)[1]) <= size for m in messages if isinstance(m, bytes))
    rebuilt = _rebuilt(messages)
    checked = verify_frame(rebuilt, KEY.public_hex)
    assert (checked.seq, checked.tbz_hash, checked.payload) == (frame.seq, frame.tbz_hash, frame.payload)
    if len(raw) > size:  # one changed payload byte, in any piece, is caught
        i = data.draw(st.integers(0, len(messages) - 1), label="piece")
        _, piece = unpack_binary(messages[i])  # type: ignore[arg-type]
        if piece:
            j = data.draw(st.integers(0, len(piece) - 1), label="byte")
            changed = piece[:j] + bytes([piece[j] ^ 0x01]) + piece[j + 1 :]
            bad = list(messages)
            bad[i] = messages[i][: len(messages[i]) - len(piece)] + changed  # type: ignore[operator]
            with pytest.raises((VerificationError, orjson.JSONDecodeError, UnicodeDecodeError)):
                tampered = _rebuilt(bad)
                verify_frame(tampered, KEY.public_hex)


@settings(max_examples=100, deadline=None)
@given(
    streams=st.lists(st.lists(st.one_of(st.binary(max_size=900), JSON_PAYLOADS), max_size=5), min_size=2, max_size=4),
    size=st.integers(16, 400),
    data=st.data(),
)
async def test_the_client_rebuilds_pieces_of_several_channels_interleaved(
    streams: list[list[Any]], size: int, data: st.DataObject
) -> None:
    """As the node's writer sends them (channels of one urgency take turns piece by piece, a
    call's frames go between a bulk frame's pieces), any interleaving that keeps each
    channel's order gives ``mux.client`` every channel's frames whole, in order."""
    conn = MuxConnection(None, {"agent": "b"})  # type: ignore[arg-type]  # no socket: fed by hand
    queues: list[list[str | bytes]] = []
    sent: list[list[Frame]] = []
    for k, payloads in enumerate(streams):
        cid = f"ch-{k:032x}"
        await conn._dispatch(orjson.dumps({"event": "channel_opened", "channel_id": cid, "role": "target"}).decode())
        chain = ChainHead(cid, "file:sync", KEY.sign)
        frames = [chain.append("data", "a", "b", p, 1_790_000_000_000) for p in payloads]
        sent.append(frames)
        queues.append([m for f in frames for m in frame_messages(f, size)])
    turns = [k for k, q in enumerate(queues) for _ in q]
    for k in data.draw(st.permutations(turns), label="order of the channels' messages"):
        await conn._dispatch(queues[k].pop(0))
    for k, frames in enumerate(sent):
        channel = conn._channels[f"ch-{k:032x}"]
        got = [channel._inbox_recv.receive_nowait() for _ in frames]
        assert [(g["seq"], g["tbz_hash"], g["payload"]) for g in got] == [
            (f.seq, f.tbz_hash, f.payload) for f in frames
        ]
        assert all(verify_frame(Frame.from_dict(_exported(g)), KEY.public_hex) for g in got)
    assert conn._parts == {}, "no half-built frame is kept"


def _exported(frame: dict[str, Any]) -> dict[str, Any]:
    """A client's frame dict in the exported form (a bytes payload in base64)."""
    if isinstance(frame["payload"], bytes):
        return {**frame, "payload": base64.b64encode(frame["payload"]).decode()}
    return frame
