"""Small helpers for driving a real node over raw WebSockets in tests."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

from mux.wire import unpack_binary

__all__ = ["open_cuttable_ws", "recv", "recv_until", "send", "ws_url"]


def ws_url(base: str, agent: str) -> str:
    """``http://host:port`` -> ``ws://host:port/api/mux/ws?agent=AGENT``."""
    return base.replace("http", "ws", 1) + f"/api/mux/ws?agent={agent}"


async def send(ws: WebSocketConnection, **msg: Any) -> None:
    """Send one JSON action."""
    await ws.send_message(orjson.dumps(msg).decode())


async def recv(ws: WebSocketConnection, timeout: float = 5.0) -> dict[str, Any]:
    """Receive one message as a dict; binary frames get their bytes in ``payload``."""
    with trio.fail_after(timeout):
        raw = await ws.get_message()
    if isinstance(raw, bytes):
        header, payload = unpack_binary(raw)
        header["payload"] = payload
        return header
    out: dict[str, Any] = orjson.loads(raw)
    return out


async def recv_until(ws: WebSocketConnection, pred: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Receive until a message satisfies ``pred``; return it."""
    with trio.fail_after(timeout):
        while True:
            msg = await recv(ws, timeout)
            if pred(msg):
                return msg


@asynccontextmanager
async def open_cuttable_ws(url: str) -> AsyncIterator[tuple[WebSocketConnection, trio.SocketStream]]:
    """A WebSocket whose TCP stream the test can cut abruptly (``aclose_forcefully``)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery, stream, f"{parts.hostname}:{parts.port}", f"{parts.path}?{parts.query}"
            )
            try:
                yield ws, stream
            finally:
                await trio.aclose_forcefully(stream)
    finally:
        await trio.aclose_forcefully(stream)
