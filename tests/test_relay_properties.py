"""The whole relay path under random traffic (hypothesis), through a real node over real
WebSockets with ``mux.client`` at both ends: one sender opens up to four channels of
different intents to one receiver (``stream``; ``bulk:test``, which has a bandwidth budget;
durable ``chat``; a call's binary media, ``call:voice``), sends JSON and binary payloads of
random sizes (up to 2.5 times a ``frame_part`` piece) on all of them at once, each
connection batching or not (the receiver's with a receive window or not), and retries what
the node refuses (``throttled``, ``receiver_full``) after the hint it gives; the receiver
reads each channel at its own speed. Then, per channel: the receiver got exactly the frames acknowledged as delivered or
stored, whole, in order and once; a frame acknowledged as dropped is a call's media and
nothing else; the call was never refused; the exported chain verifies and holds every
acknowledged frame in order; no connection was closed and no unanswered error came. The same
runs over plain TCP and over the node's own TLS 1.3 (its direct reads and writes through
the connection's SSLObject: a record out of order would break the client's TLS)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mux.client import ClientChannel, connect
from mux.core import MuxConfig
from mux.errors import ChannelClosed, ChannelThrottled
from mux.signing import verify_chain
from mux.wire import CHUNK_BYTES

from .nodes import loopback_tls, serve_node

INTENTS = ("stream", "bulk:test", "chat", "call:voice")
BIG = CHUNK_BYTES * 5 // 2
"""The largest payload: a frame of three ``frame_part`` pieces."""

sizes = {
    "stream": st.one_of(st.integers(0, 300), st.integers(CHUNK_BYTES - 40, BIG)),  # whole, or in pieces
    "bulk:test": st.integers(0, BIG // 4),  # within its budget's burst, a few at a time
    "chat": st.integers(0, 4000),
    "call:voice": st.integers(1, 1500),
}
channels = st.lists(st.sampled_from(INTENTS), min_size=1, max_size=4, unique=True).flatmap(
    lambda intents: st.tuples(
        *(
            st.tuples(
                st.just(intent),
                st.lists(st.tuples(st.booleans(), sizes[intent]), max_size=40),
                st.integers(1, 16),
                st.sampled_from((0.0, 0.0, 0.002, 0.01)),
            )
            for intent in intents
        )
    )
)
"""Per channel: its intent, its payloads (binary or JSON, and a size), how many the sender
keeps in flight at once, and how long the receiver waits before each read."""


def _payload(intent: str, n: int, binary: bool, size: int) -> Any:
    if intent == "call:voice" or binary:  # a call's media is binary
        return n.to_bytes(4, "big") + bytes(i % 251 for i in range(size))
    return {"n": n, "pad": "x" * size}


@pytest.fixture(scope="module", params=["plain", "tls"])
def transport(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """How the node serves (its settings) and how clients connect: plain TCP, or TLS 1.3
    with a self-signed certificate for 127.0.0.1 that the clients trust."""
    if request.param == "plain":
        return {"serve": {}, "connect": {}}
    certfile, keyfile, context = loopback_tls(tmp_path_factory.mktemp("tls"))
    return {"serve": {"certfile": certfile, "keyfile": keyfile}, "connect": {"ssl_context": context}}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plan=channels,
    tx_batch=st.booleans(),
    rx_batch=st.booleans(),
    rx_window=st.booleans(),
    buffer=st.integers(2, 16),
)
async def test_every_acknowledged_frame_arrives_whole_in_order_once(
    transport: dict[str, Any],
    plan: tuple[tuple[str, list[tuple[bool, int]], int, float], ...],
    tx_batch: bool,
    rx_batch: bool,
    rx_window: bool,
    buffer: int,
) -> None:
    acks: dict[str, list[tuple[int, str, Any]]] = {}
    stored: dict[str, list[bool]] = {}
    got: dict[str, list[tuple[int, Any]]] = {}
    refused: dict[str, int] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            info = await serve_node(nursery, mux=MuxConfig(channel_buffer_frames=buffer), **transport["serve"])
            assert info.url.startswith("https://" if transport["serve"] else "http://")
            async with (
                connect(info.url, "tx", batch=tx_batch, **transport["connect"]) as tx,
                connect(
                    info.url, "rx", batch=rx_batch, window=rx_window, buffer_frames=4, **transport["connect"]
                ) as rx,
            ):
                opened = [await tx.open("rx", intent) for intent, *_ in plan]
                delays = {ch.id: delay for ch, (*_, delay) in zip(opened, plan, strict=True)}

                async def send_all(
                    ch: ClientChannel, intent: str, payloads: list[tuple[bool, int]], window: int
                ) -> None:
                    acks[ch.id], stored[ch.id], refused[ch.id] = [], [], 0
                    todo = iter(enumerate(payloads))

                    async def sender() -> None:
                        for n, (binary, size) in todo:
                            payload = _payload(intent, n, binary, size)
                            for _ in range(500):
                                try:
                                    ack = await ch.send(payload)
                                    break
                                except ChannelThrottled as exc:  # throttled, receiver_full: wait, again
                                    refused[ch.id] += 1
                                    await trio.sleep(max(exc.retry_after_ms or 0, 2) / 1000)
                            else:
                                raise AssertionError(f"{intent}: frame {n} refused 500 times")
                            acks[ch.id].append((ack["seq"], ack["disposition"], payload))
                            stored[ch.id].append(ack["stored"])

                    async with trio.open_nursery() as senders:
                        for _ in range(window):
                            senders.start_soon(sender)
                    acks[ch.id].sort(key=lambda a: a[0])
                    await ch.close()

                async def receive_all() -> None:
                    async with trio.open_nursery() as readers:
                        for _ in plan:
                            readers.start_soon(read, await rx.accept())

                async def read(ch: ClientChannel) -> None:
                    got[ch.id] = []
                    while True:
                        await trio.sleep(delays[ch.id])
                        try:
                            frame = await ch.receive()
                        except ChannelClosed:
                            return
                        got[ch.id].append((frame["seq"], frame["payload"]))

                async with trio.open_nursery() as traffic:
                    traffic.start_soon(receive_all)
                    for ch, (intent, payloads, window, _) in zip(opened, plan, strict=True):
                        traffic.start_soon(send_all, ch, intent, payloads, window)
                node = info.node.require()
                for ch, (intent, *_) in zip(opened, plan, strict=True):
                    sent = acks[ch.id]
                    kept = [p for _, disposition, p in sent if disposition in ("delivered", "stored")]
                    assert [p for _, p in got[ch.id]] == kept, intent
                    seqs = [seq for seq, _ in got[ch.id]]
                    assert seqs == sorted(set(seqs)), intent
                    assert stored[ch.id] == [intent == "chat"] * len(sent), "durable: stored before acked"
                    allowed = {"delivered", "dropped"} if intent == "call:voice" else {"delivered", "stored"}
                    assert {d for _, d, _ in sent} <= allowed, (intent, sent)
                    assert intent != "call:voice" or refused[ch.id] == 0, "a call is never refused"
                    chain = await node.export(ch.id)
                    assert verify_chain(chain, node.public_key).closed
                    data = [f for f in chain if f.kind == "data"]
                    assert [(f.seq, f.payload) for f in data] == [(seq, p) for seq, _, p in sent], intent
                assert not tx.closed and not rx.closed
                assert not tx.errors and not rx.errors, (tx.errors, rx.errors)
            nursery.cancel_scope.cancel()
