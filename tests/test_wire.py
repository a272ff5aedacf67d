"""The protocol without sockets: WireSession pairs driven in memory (h11 ConnectionPair style)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio

import mux
from mux.session import WireSession
from mux.wire import ACTIONS, pack_binary, parse_message, unpack_binary


class Peer:
    """One agent's session with its outbox, as a transport would hold them."""

    def __init__(self, m: mux.Mux, agent: str) -> None:
        self.session = WireSession(m, m.attach(agent), max_message_bytes=4096)

    def do(self, **action: Any) -> list[dict[str, Any]]:
        return [orjson.loads(r) for r in self.session.handle(orjson.dumps(action).decode())]

    async def next(self) -> dict[str, Any]:
        with trio.fail_after(2):
            raw = await self.session.outbox.get()
        if isinstance(raw, bytes):
            header, payload = unpack_binary(raw)
            return {**header, "payload": payload}
        out: dict[str, Any] = orjson.loads(raw)
        return out


@pytest.fixture
async def pair(node: mux.Mux, nursery: trio.Nursery) -> tuple[Peer, Peer]:
    a, b = Peer(node, "a"), Peer(node, "b")
    for p in (a, b):
        p.session.start(nursery)
    return a, b


def test_action_table_matches_protocol_doc() -> None:
    with open("docs/protocol.md", encoding="utf-8") as fh:
        doc = fh.read()
    for name in ACTIONS:
        assert f"| `{name}` |" in doc


def test_parse_accepts_text_and_binary() -> None:
    a = parse_message('{"action":"send","channel_id":"ch-1","payload":{"x":1},"ref":"r1"}', 1000)
    assert (a.name, a.ref, a.get("payload")) == ("send", "r1", {"x": 1})
    b = parse_message(pack_binary({"action": "send", "channel_id": "ch-1", "ref": 7}, b"\x00\x01"), 1000)
    assert (b.name, b.ref, b.get("payload")) == ("send", 7, b"\x00\x01")
    c = parse_message('{"action":"send","channel_id":"ch-1","payload":"AAE=","enc":"base64"}', 1000)
    assert c.get("payload") == b"\x00\x01"


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("{", "invalid_json"),
        ("null", "invalid_json"),
        ("{}", "bad_request"),
        ('{"action":"fly"}', "unknown_action"),
        ('{"action":"close"}', "bad_request"),
        ('{"action":"open","target":7}', "bad_request"),
        ('{"action":"list","ref":true}', "bad_request"),
        ('{"action":"list","ref":"' + "r" * 200 + '"}', "bad_request"),
        ("x" * 2000, "message_too_large"),
        (b"\x00", "bad_binary"),
        (b"\x00\x00\x00\x02[]", "bad_binary"),
    ],
)
def test_parse_errors_have_codes(message: str | bytes, code: str) -> None:
    with pytest.raises(mux.MuxError) as info:
        parse_message(message, 1000)
    assert info.value.code == code


def test_a_binary_message_over_the_limit_is_refused_with_its_ref() -> None:
    """Its small header is still read, so the sender learns which request failed."""
    with pytest.raises(mux.MuxError) as info:
        parse_message(pack_binary({"action": "send", "channel_id": "ch-1", "ref": 7}, b"\0" * 2000), 1000)
    assert info.value.code == "message_too_large" and info.value.ref == 7
    with pytest.raises(mux.MuxError) as info:  # a header that is no header: no ref, same code
        parse_message(b"\xff\xff\xff\xff" + b"\0" * 2000, 1000)
    assert info.value.code == "message_too_large" and info.value.ref is None


async def test_session_pair_exchanges_frames(pair: tuple[Peer, Peer]) -> None:
    a, b = pair
    [opened] = a.do(action="open", target="b", intent="stream", ref=1)
    assert opened["event"] == "channel_opened" and opened["ref"] == 1
    cid = opened["channel_id"]
    told = await b.next()
    assert told["event"] == "channel_opened" and told["role"] == "target"
    [ack] = a.do(action="send", channel_id=cid, payload={"hi": 1}, ref=2)
    assert ack["event"] == "frame_ack" and ack["delivered"] and ack["seq"] == 1
    frame = await b.next()
    assert frame["event"] == "frame" and frame["payload"] == {"hi": 1}
    replies = b.session.handle(pack_binary({"action": "send", "channel_id": cid}, b"\xff"))
    assert orjson.loads(replies[0])["seq"] == 2
    assert (await a.next())["payload"] == b"\xff"
    [closed] = a.do(action="close", channel_id=cid, reason="bye", ref=3)
    assert closed["event"] == "channel_closed" and closed["ref"] == 3
    told = await b.next()
    assert told["event"] == "channel_closed" and told["reason"] == "bye" and told["by"] == "a"
    # the closer is told once (by its reply), not again by its forwarder
    with trio.move_on_after(0.1):
        extra = await a.session.outbox.get()
        raise AssertionError(f"unexpected {extra!r}")


async def test_errors_echo_ref_and_channel(pair: tuple[Peer, Peer]) -> None:
    a, _ = pair
    [err] = a.do(action="send", channel_id="ch-" + "0" * 32, payload=1, ref="x")
    assert err == {"error": "unknown_channel", "detail": err["detail"], "channel_id": "ch-" + "0" * 32, "ref": "x"}
    [err] = a.do(action="open", target="a", ref=9)
    assert (err["error"], err["ref"]) == ("bad_target", 9)


async def test_durable_send_is_acked_after_the_store_and_acked_back(pair: tuple[Peer, Peer]) -> None:
    a, b = pair
    [opened] = a.do(action="open", target="b", intent="chat")
    cid = opened["channel_id"]
    await b.next()
    assert a.do(action="send", channel_id=cid, payload={"m": 1}, ref="s1") == []  # not yet: waits for the store
    ack = await a.next()
    assert (ack["event"], ack["ref"], ack["stored"], ack["delivered"]) == ("frame_ack", "s1", True, True)
    frame = await b.next()
    assert frame["payload"] == {"m": 1}
    [acked] = b.do(action="ack", channel_id=cid, seq=frame["seq"], ref=5)
    assert (acked["event"], acked["removed"], acked["ref"]) == ("acked", 1, 5)
    [again] = b.do(action="ack", channel_id=cid, seq=frame["seq"])
    assert again["removed"] == 0
    [err] = b.do(action="ack", channel_id="ch-" + "e" * 32, seq=1)
    assert err["error"] == "unknown_channel"
    [err] = b.do(action="ack", channel_id=cid, seq=-1)
    assert err["error"] == "bad_request"


@pytest.mark.parametrize("ref", [None, 0, 7, -3, "s1", 'quote " and \\ back', "naïve ✓", "\n\t", True])
@pytest.mark.parametrize(("stored", "window", "pace_ms"), [(False, None, None), (True, 1, None), (False, 2, 35)])
def test_frame_ack_template_is_the_json_it_stands_for(
    ref: Any, stored: bool, window: int | None, pace_ms: int | None
) -> None:
    """The templated ``frame_ack`` parses to exactly the event its fields describe, whatever
    the client's ``ref`` holds (quotes, backslashes, non-ASCII, control characters)."""
    from mux.frames import ChainHead, payload_bytes
    from mux.wire import frame_ack_event

    head = ChainHead("ch-" + "0f" * 16, "stream", lambda digest: "ab" * 64)
    frame = head.append("data", "alice", "bob", {"x": 1}, 1_700_000_000_000, payload_bytes({"x": 1}))
    disposition = "stored" if stored else "delivered"
    text = frame_ack_event(frame, disposition, ref, stored=stored, window=window, pace_ms=pace_ms)
    expected: dict[str, Any] = {
        "event": "frame_ack",
        "channel_id": frame.channel_id,
        "seq": 0,
        "tbz_hash": frame.tbz_hash,
        "sig": "ab" * 64,
        "delivered": not stored,
        "stored": stored,
        "disposition": disposition,
    }
    if window is not None:
        expected["window"] = window
    if pace_ms is not None:
        expected["pace_ms"] = pace_ms
    if ref is not None:
        expected["ref"] = ref
    assert orjson.loads(text) == expected
