"""Server WebSocket frames built directly are byte for byte what wsproto builds; client
frames parsed directly give the messages wsproto gives, and wsproto gets everything else."""

from __future__ import annotations

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Message, Ping
from wsproto.frame_protocol import FrameProtocol

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


def _wsproto_messages(data: bytes) -> list[str | bytes]:
    """What wsproto, as a server, makes of ``data``: whole messages, in order."""
    conn = Connection(ConnectionType.SERVER)
    conn.receive_data(data)
    messages: list[str | bytes] = []
    parts: list[str | bytes] = []
    for event in conn.events():
        assert isinstance(event, Message)
        parts.append(event.data)
        if event.message_finished:
            messages.append("".join(parts) if isinstance(event.data, str) else b"".join(parts))  # type: ignore[arg-type]
            parts = []
    return messages


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
