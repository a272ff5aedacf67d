"""Server WebSocket frames built directly are byte for byte what wsproto builds; client
frames parsed directly give the messages wsproto gives, and wsproto gets everything else."""

from __future__ import annotations

import gc
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Message, Ping, Pong
from wsproto.frame_protocol import FrameProtocol

from mux import wsframes
from mux.wsframes import ClientFrames, Passed, server_frames

from .wsutil import masked_frame

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 200_000]


@pytest.mark.parametrize("size", SIZES)
def test_text_and_binary_frames_match_wsproto_at_every_length_boundary(size: int) -> None:
    text = "x" * size
    binary = bytes(range(256)) * (size // 256) + bytes(size % 256)
    proto = FrameProtocol(client=False, extensions=[])
    assert server_frames([text]) == bytes(proto.send_data(text))
    assert server_frames([binary]) == bytes(proto.send_data(binary))


def test_several_messages_are_joined_in_order() -> None:
    proto = FrameProtocol(client=False, extensions=[])
    messages: list[str | bytes] = ["a", b"\x00", "é" * 100, b""]  # 100 characters, 200 bytes: the length is in bytes
    assert server_frames(messages) == b"".join(bytes(proto.send_data(m)) for m in messages)
    assert server_frames([]) == b""


def _client() -> FrameProtocol:
    return FrameProtocol(client=True, extensions=[])


def _drain(parser: ClientFrames) -> list[str | bytes | Passed]:
    items: list[str | bytes | Passed] = []
    while (item := parser.next()) is not None:
        items.append(item)
    return items


def _events_of(conn: Connection, data: bytes, out: list[tuple[str, Any]], parts: list[Any]) -> bool:
    """Feed ``data`` to wsproto ``conn``; append what it makes of it to ``out`` (whole
    messages, pings, pongs, a close); True once closed."""
    conn.receive_data(data)
    for event in conn.events():
        if isinstance(event, Message):
            parts.append(event.data)
            if event.message_finished:
                out.append(("message", "".join(parts) if isinstance(event.data, str) else b"".join(parts)))
                parts.clear()
        elif isinstance(event, (Ping, Pong)):
            out.append((type(event).__name__, bytes(event.payload)))
        elif isinstance(event, CloseConnection):
            out.append(("close", int(event.code)))
            return True
    return False


def _wsproto_messages(data: bytes) -> list[str | bytes]:
    """What wsproto, as a server, makes of ``data``: whole messages, in order."""
    events: list[tuple[str, Any]] = []
    _events_of(Connection(ConnectionType.SERVER), data, events, [])
    assert all(kind == "message" for kind, _ in events)
    return [message for _, message in events]


@pytest.mark.parametrize("size", SIZES)
def test_client_frames_give_wsproto_s_messages_at_every_length_boundary_and_split_anywhere(size: int) -> None:
    text = "é" * (size // 2) + "x" * (size % 2)  # ``size`` bytes of UTF-8, two-byte characters split by reads
    binary = bytes(range(256)) * (size // 256) + bytes(size % 256)
    client = _client()
    data = bytes(client.send_data(text)) + bytes(client.send_data(binary))
    assert _wsproto_messages(data) == [text, binary]
    whole = ClientFrames(max_size=1 << 20)
    whole.feed(data)
    assert _drain(whole) == [text, binary]
    for step in (1, 7, 4096) if size < 70_000 else (4096, 65536):  # as a socket may cut them
        parser = ClientFrames(max_size=1 << 20)
        got: list[str | bytes | Passed] = []
        for i in range(0, len(data), step):
            parser.feed(data[i : i + step])
            got += _drain(parser)
        assert got == [text, binary]
        assert not parser.off


def test_pings_and_pongs_go_to_wsproto_whole_and_parsing_goes_on() -> None:
    client = _client()
    ping, pong = bytes(client.ping(b"are you there")), bytes(client.pong(b""))
    parser = ClientFrames(max_size=1000)
    parser.feed(bytes(client.send_data("a")) + ping + bytes(client.send_data(b"b")) + pong + ping[:3])
    assert _drain(parser) == ["a", Passed(ping), b"b", Passed(pong)]
    parser.feed(ping[3:])
    assert _drain(parser) == [Passed(ping)]
    conn = Connection(ConnectionType.SERVER)
    conn.receive_data(ping)
    assert [type(e) for e in conn.events()] == [Ping]  # the bytes are a whole frame for wsproto
    assert not parser.off


@pytest.mark.parametrize(
    "odd",
    ["close", "fragment", "unmasked", "rsv", "reserved_opcode", "bad_utf8", "long_ping", "long_length"],
)
def test_any_other_frame_hands_wsproto_everything_from_it_on(odd: str) -> None:
    client = _client()
    before, after = bytes(client.send_data("before")), bytes(client.send_data("after"))
    frame = {
        "close": bytes(client.close(1000, "bye")),
        "fragment": bytes(client.send_data("frag", fin=False)) + bytes(client.send_data("ment", fin=True)),
        "unmasked": bytes(FrameProtocol(client=False, extensions=[]).send_data("x")),
        "rsv": bytes([after[0] | 0x40]) + after[1:],
        "reserved_opcode": masked_frame(0x83, b"x"),
        "bad_utf8": masked_frame(0x81, b"\xff\xfe"),
        "long_ping": masked_frame(0x89, b"p" * 126),
        "long_length": masked_frame(0x81, b"x" * 126)[:1] + b"\xfe\x00\x05" + masked_frame(0x81, b"hello")[2:],
    }[odd]
    parser = ClientFrames(max_size=1000)
    parser.feed(before + frame + after)
    assert _drain(parser) == ["before", Passed(frame + after)]
    assert parser.off
    assert parser.next() is None
    with pytest.raises(RuntimeError):
        parser.feed(after)  # from now on the caller hands bytes to wsproto
    if odd == "fragment":  # wsproto takes it up at the frame boundary
        assert _wsproto_messages(frame + after) == ["fragment", "after"]
    elif odd == "close":
        conn = Connection(ConnectionType.SERVER)
        conn.receive_data(frame + after)
        assert isinstance(next(iter(conn.events())), CloseConnection)


def test_an_oversized_frame_is_handed_on_as_soon_as_its_header_says_so() -> None:
    big = bytes(_client().send_data(b"x" * 5000))
    parser = ClientFrames(max_size=4999)
    parser.feed(big[:20])  # the header and a little of the payload: not waited for
    assert _drain(parser) == [Passed(big[:20])]
    assert parser.off
    exact = ClientFrames(max_size=5000)
    exact.feed(big)
    assert _drain(exact) == [b"x" * 5000]


def _raw_frame(first: int, masked: bool, form: int, payload: bytes) -> bytes:
    """A frame with its length in its shortest ``form`` (0), or in 16 (1) or 64 bits (2)
    whether it needs them or not; masked (by a zero key: the payload as it is) or not."""
    n = len(payload)
    if form == 0 and n > 125:
        form = 1
    size = (
        bytes([n])
        if form == 0
        else bytes([126]) + n.to_bytes(2, "big")
        if form == 1
        else bytes([127]) + n.to_bytes(8, "big")
    )
    head = bytes([first, size[0] | (0x80 if masked else 0)]) + size[1:]
    return head + (b"\0\0\0\0" if masked else b"") + payload


_frame = st.one_of(
    st.text(max_size=300).map(lambda t: bytes(_client().send_data(t))),
    st.binary(max_size=70_000).map(lambda b: bytes(_client().send_data(b))),
    st.binary(max_size=125).map(lambda b: bytes(_client().ping(b))),
    st.binary(max_size=125).map(lambda b: bytes(_client().pong(b))),
    st.tuples(st.text(max_size=20), st.text(max_size=20)).map(
        lambda ab: bytes(_client().send_data(ab[0], fin=False)) + bytes(_client().send_data(ab[1]))
    ),
    st.binary(max_size=40).map(lambda b: masked_frame(0x81, b)),  # text, maybe not UTF-8
    st.tuples(st.integers(0, 255), st.binary(max_size=200)).map(lambda fb: masked_frame(fb[0], fb[1])),
    st.tuples(st.sampled_from([0x81, 0x82, 0x89]), st.booleans(), st.integers(0, 2), st.binary(max_size=300)).map(
        lambda f: _raw_frame(*f)
    ),
    st.just(bytes(_client().close(1000, "bye"))),
    st.binary(min_size=1, max_size=12),  # garbage
)


@settings(
    max_examples=600,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(frames=st.lists(_frame, max_size=8), cuts=st.lists(st.integers(1, 4096), max_size=6))
def test_client_frames_then_wsproto_make_what_wsproto_alone_makes(frames: list[bytes], cuts: list[int]) -> None:
    """Differential: any stream of frames (valid, odd or garbage), cut anywhere, gives the
    same messages, pings, pongs and close through the parser (wsproto taking what it is
    handed) as through wsproto alone. One documented difference: a text frame's UTF-8 is
    judged once the frame is whole, where wsproto alone judges the part received; when the
    stream ends inside such a frame, completing it gives the same close."""
    data = b"".join(frames)
    alone: list[tuple[str, Any]] = []
    _events_of(Connection(ConnectionType.SERVER), data, alone, [])
    both: list[tuple[str, Any]] = []
    conn, parts = Connection(ConnectionType.SERVER), []
    parser = ClientFrames(max_size=1 << 20)
    pos, closed = 0, False
    for cut in [*cuts, len(data)]:
        chunk, pos = data[pos : pos + cut], pos + cut
        if closed or not chunk:
            continue
        if parser.off:
            closed = _events_of(conn, chunk, both, parts)
            continue
        parser.feed(chunk)
        while not closed and (item := parser.next()) is not None:
            if isinstance(item, Passed):
                closed = _events_of(conn, item.raw, both, parts)
            else:
                both.append(("message", item))
    if both != alone:  # wsproto alone closed on the invalid start of a frame not yet whole
        assert not closed and not parser.off and parser.held and alone == [*both, ("close", 1007)], (both, alone)
        for _ in range(300):  # complete it (at most max_size bytes: a longer one was handed on)
            parser.feed(bytes(4096))
            if (item := parser.next()) is not None:
                break
        assert isinstance(item, Passed)
        _events_of(conn, item.raw, both, parts)
    assert both == alone


def test_a_text_frame_is_judged_once_whole() -> None:
    """The case hypothesis found: the stream ends 2 bytes into a 55-byte text frame whose
    received part is already invalid UTF-8. wsproto alone closes (1007) at once; through the
    parser, nothing until the frame is whole, then the same close."""
    data = b"\x81\xb7" + b"\x81\x80Y\x91\xa9\x05"
    alone: list[tuple[str, Any]] = []
    _events_of(Connection(ConnectionType.SERVER), data, alone, [])
    assert alone == [("close", 1007)]
    parser = ClientFrames(max_size=1 << 20)
    parser.feed(data)
    assert parser.next() is None and parser.held == len(data)
    parser.feed(bytes(53))
    item = parser.next()
    assert isinstance(item, Passed) and parser.off
    both: list[tuple[str, Any]] = []
    _events_of(Connection(ConnectionType.SERVER), item.raw, both, [])
    assert both == alone


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 16384, 65537, 524288])
def test_unmasking_compiled_and_by_integer_match_the_rfc(size: int) -> None:
    payload = bytes((i * 7 + 3) % 256 for i in range(size))
    mask = b"\x01\x80\xfe\x37"
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))  # RFC 6455, 5.3
    assert wsframes._unmask_int(mask, payload) == expected
    assert wsframes._unmask(mask, bytearray(payload)) == expected
    if os.environ.get("CI") == "true":  # websockets is a dependency: its C loop must be there
        assert wsframes.COMPILED_MASK is not None


def test_between_reads_the_parser_holds_no_bytes_of_its_own() -> None:
    """Once every whole frame of a read is taken out, the parser keeps neither that read
    nor a buffer (one made at a connection's last read would outlive a burst of reads); only a
    frame that spans reads is held, until it is whole."""

    def held_bytes(parser: ClientFrames) -> list[bytes | bytearray]:
        return [ref for ref in gc.get_referents(parser) if isinstance(ref, (bytes, bytearray)) and ref]

    client = _client()
    parser = ClientFrames(max_size=1 << 20)
    whole = b"".join(bytes(client.send_data(m)) for m in ("one", b"two", "three" * 40))
    parser.feed(whole)
    assert _drain(parser) == ["one", b"two", "three" * 40]
    assert held_bytes(parser) == [] and parser.held == 0
    split = bytes(client.send_data("four" * 100))
    parser.feed(whole + split[:50])
    assert _drain(parser) == ["one", b"two", "three" * 40]
    assert parser.held == 50 and len(held_bytes(parser)) == 1
    parser.feed(split[50:])
    assert _drain(parser) == ["four" * 100]
    assert held_bytes(parser) == [] and parser.held == 0
