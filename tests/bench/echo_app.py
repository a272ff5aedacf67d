"""The ceiling: a WebSocket echo on the same stack as a node's WebSocket.

A node serves its WebSocket on Hypercorn straight through ASGI (``mux.sockets``:
:class:`~mux.sockets.FastSocketApp` and :class:`~mux.sockets.AsgiSocket`), and its REST
routes through Quart. ``/echo`` is that WebSocket stack with nothing but an echo on top,
using what a node's connection uses: the client's frames parsed directly (``fast_receive``),
the messages the server already holds taken together (up to ``mux.app.READ_AHEAD``) and
their echoes written in one ``send_many``. ``/echo-single`` echoes one message at a time
(one write each) and leaves receiving to Hypercorn and wsproto: a bare ASGI echo, as the
DESIGN.md table measured it. ``/quart-echo`` is a Quart-Trio route on the same server, for
comparison. ``python -m tests.bench.echo_app`` serves all three on 127.0.0.1 (free port) and prints its URL.
"""

from __future__ import annotations

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import websocket
from quart_trio import QuartTrio

from mux.app import READ_AHEAD
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


async def asgi_echo_single(sock: AsgiSocket) -> None:
    """Send every message straight back, one write each."""
    await sock.accept(None)
    while True:
        try:
            message = await sock.receive()
        except Disconnected:
            return
        await sock.send(message)


_single = FastSocketApp(quart_app, "/echo-single", asgi_echo_single, fast_receive=False)
app = FastSocketApp(_single, "/echo", asgi_echo)


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
