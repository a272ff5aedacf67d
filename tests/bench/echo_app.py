"""The ceiling: a WebSocket echo on the same stack as a node's WebSocket.

A node serves its WebSocket on Hypercorn straight through ASGI (``mux.sockets``:
:class:`~mux.sockets.FastSocketApp` and :class:`~mux.sockets.AsgiSocket`), and its REST
routes through Quart. ``/echo`` is that WebSocket stack with nothing but an echo on top,
using what a node's connection uses: the client's frames parsed directly (``fast_receive``),
the messages the server already holds taken together (up to ``mux.connection.READ_AHEAD``) and
their echoes written in one ``send_many`` (straight onto the socket when it can). ``/echo-single``
echoes one message at a time (one ASGI send each) and leaves receiving and sending to
Hypercorn and wsproto: a bare ASGI callable, as the DESIGN.md table measured it (nothing
of ``mux.sockets``). ``/quart-echo`` is a Quart-Trio route on the same server, for
comparison. ``python -m tests.bench.echo_app`` serves all three on 127.0.0.1 (free port)
and prints its URL.
"""

from __future__ import annotations

from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import websocket
from quart_trio import QuartTrio

from mux.connection import READ_AHEAD
from mux.sockets import AsgiSocket, Disconnected, FastSocketApp

__all__ = ["app", "main"]

quart_app = QuartTrio("echo")


@quart_app.websocket("/quart-echo")
async def quart_echo() -> None:
    """Send every message straight back (through Quart)."""
    while True:
        await websocket.send(await websocket.receive())


async def asgi_echo(sock: AsgiSocket) -> None:
    """Send every message straight back, those already received together in one write
    (the node's WebSocket path, as a node's connection uses it)."""
    await sock.accept(None)
    while True:
        try:
            batch = [await sock.receive()]
        except Disconnected:
            return
        while len(batch) < READ_AHEAD and (message := sock.receive_ready()) is not None:
            batch.append(message)
        await sock.send_many(batch)


async def bare_echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Send every message straight back, one ASGI send each: nothing of ``mux.sockets``."""
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    while (event := await receive())["type"] == "websocket.receive":
        await send({"type": "websocket.send", "text": event.get("text"), "bytes": event.get("bytes")})


_rest = FastSocketApp(quart_app, "/echo", asgi_echo)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/echo-single`` to :func:`bare_echo`, the rest as the module says."""
    if scope["type"] == "websocket" and scope.get("path") == "/echo-single":
        await bare_echo(scope, receive, send)
    else:
        await _rest(scope, receive, send)


async def main() -> None:
    """Serve on a free loopback port and print the URL."""
    cfg = Config()
    cfg.bind = ["127.0.0.1:0"]
    cfg.accesslog = None
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(lambda task_status: serve(app, cfg, task_status=task_status))  # type: ignore[arg-type]
        print(urls[0], flush=True)


if __name__ == "__main__":
    trio.run(main)
