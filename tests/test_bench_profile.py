"""The bench's profile puts each sampled stack in the right layer and part (``tests.bench.profile``)."""

from __future__ import annotations

import collections

from tests.bench.profile import _active, _app_row, app_part, classify

_RUN = "<module> (mux/__main__.py:10);run (trio/_core/_run.py:2532);unrolled_run (trio/_core/_run.py:2866)"
_INLINE = f"{_RUN};TCPServer._read_data (hypercorn/trio/tcp_server.py:104);_handle_inline (mux/connection.py:181)"
_HANDLE = f"{_INLINE};WireSession.handle (mux/session.py:171);WireSession._do_send (mux/session.py:271)"


def test_each_layer_by_its_marker_and_waiting_apart() -> None:
    """A message handled in the reader is app, not read; the writer is send; trio's own
    frames are loop; a stack ending in the epoll wait is waiting, whatever is above it."""
    assert classify(_HANDLE + ";Mux._post (mux/core.py:559)") == "app"
    assert classify(f"{_RUN};TCPServer._read_data (hypercorn/trio/tcp_server.py:104);recv (x.py:1)") == "read"
    assert classify(f"{_RUN};Writer.run (mux/writer.py:135);AsgiSocket.send_many (mux/sockets.py:300)") == "send"
    assert classify(f"{_RUN};Runner.reschedule (trio/_core/_run.py:1919)") == "loop"
    assert classify(f"{_RUN};EpollIOManager.get_events (trio/_core/_io_epoll.py:243)") == "waiting"
    assert classify(f"{_RUN};EpollIOManager.process_events (trio/_core/_io_epoll.py:256)") == "loop"


def test_app_parts_first_match_wins() -> None:
    """The signature inside chaining counts as sign; chaining without it as chain; the
    payload's bytes, parsing, delivery and the ack each apart; anything else is other."""
    chain = _HANDLE + ";Mux._post (mux/core.py:559);Mux._chain (mux/core.py:483);ChainHead.append (mux/frames.py:355)"
    assert app_part(chain + ";NodeKey.sign (mux/signing.py:78);crypto_sign (nacl/bindings/crypto_sign.py:84)") == "sign"
    assert app_part(chain + ";frame_hash (mux/frames.py:106)") == "chain"
    assert app_part(_HANDLE + ";Mux._post (mux/core.py:520);payload_bytes (mux/frames.py:73)") == "payload"
    assert app_part(f"{_INLINE};WireSession.handle (mux/session.py:158);parse_message (mux/wire.py:198)") == "parse"
    deliver = ";StreamBackend.on_frame (backends/stream.py:47);ChannelContext.deliver (mux/channel.py:384)"
    assert app_part(_HANDLE + ";Mux._post (mux/core.py:570)" + deliver) == "deliver"
    assert app_part(_HANDLE + ";frame_ack_event (mux/wire.py:340)") == "ack"
    assert app_part(_HANDLE + ";WireSession._held (mux/session.py:255)") == "other"


def test_parts_share_the_active_samples_only() -> None:
    """Parts are shares of the running samples (waiting ones left out), in microseconds of
    the CPU per message."""
    counts = collections.Counter({"app": 60, "read": 20, "loop": 20, "waiting": 100, "app:sign": 30, "app:other": 30})
    assert _active(counts) == 100
    row = _app_row(counts, 200e-6)
    assert "sign   60 us" in row and "other   60 us" in row and "parse    0 us" in row
