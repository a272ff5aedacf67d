"""The ceiling: a WebSocket echo on the same stack as a node (Quart-Trio route on Hypercorn).

``python -m tests.bench.echo_app`` serves ``/echo`` on 127.0.0.1 (free port) and prints its URL.
"""

from __future__ import annotations

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import websocket
from quart_trio import QuartTrio

__all__ = ["app", "main"]

app = QuartTrio("echo")


@app.websocket("/echo")
async def echo() -> None:
    """Send every message straight back."""
    while True:
        await websocket.send(await websocket.receive())


async def main() -> None:
    """Serve on a free loopback port and print the URL."""
    cfg = Config()
    cfg.bind = ["127.0.0.1:0"]
    cfg.accesslog = None
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(lambda task_status: serve(app, cfg, task_status=task_status))
        print(urls[0], flush=True)


if __name__ == "__main__":
    trio.run(main)
