"""Server WebSocket frames built directly are byte for byte what wsproto builds."""

from __future__ import annotations

import pytest
from wsproto.frame_protocol import FrameProtocol

from mux.wsframes import server_frames

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
