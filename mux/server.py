"""Serving a node with Hypercorn (trio worker): TLS 1.3, h2 + http/1.1, graceful shutdown.

``serve(settings, task_status=...)`` runs until cancelled, SIGINT/SIGTERM or
``shutdown_trigger`` returns; it reports ``ServeInfo`` (bound URLs and the running Node) to
``nursery.start``. On shutdown every channel is closed with reason ``node_shutdown`` (its
close frame signed), connected clients get their ``channel_closed`` events, then sockets
close with 1001.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
from hypercorn.config import Config, Sockets
from hypercorn.middleware import ProxyFixMiddleware

from .app import Node, create_app, create_blueprint, node_asgi
from .hypercorn_serve import serve as hypercorn_serve
from .settings import NodeSettings

__all__ = ["ServeInfo", "Tls13Config", "create_app", "create_blueprint", "hypercorn_config", "serve"]

log = logging.getLogger("mux.server")


class Tls13Config(Config):
    """Hypercorn config whose TLS context accepts TLS 1.3 only (ALPN h2, http/1.1), whose
    TCP sockets give up on a peer that takes no data for ``tcp_user_timeout_s``, and probe a
    connection silent for ``tcp_keepalive_s`` (TCP keepalive)."""

    tcp_user_timeout_s: float = 0.0
    tcp_keepalive_s: int = 0

    def create_sockets(self) -> Sockets:
        """Hypercorn's sockets with ``TCP_USER_TIMEOUT`` and keepalive set (inherited by
        accepted ones). A write to a client that stopped reading fails after the timeout, so
        its connection and buffers go too (Hypercorn's own writes cannot be cancelled); a
        silent connection whose peer is gone fails its probes and ends the same way."""
        sockets: Sockets = super().create_sockets()
        for sock in sockets.secure_sockets + sockets.insecure_sockets:
            _tcp_options(sock, self.tcp_user_timeout_s, self.tcp_keepalive_s)
        return sockets

    def create_ssl_context(self) -> ssl.SSLContext | None:
        """Hypercorn's context with the minimum version raised to TLS 1.3."""
        context: ssl.SSLContext | None = super().create_ssl_context()
        if context is not None:
            context.minimum_version = ssl.TLSVersion.TLSv1_3
        return context


KEEPALIVE_PROBES = 3
"""Unanswered keepalive probes after which a connection is dropped (``TCP_USER_TIMEOUT``,
where set, drops it first)."""


def _tcp_options(sock: socket.socket, user_timeout_s: float, keepalive_s: int) -> None:
    """Set ``TCP_USER_TIMEOUT`` and keepalive (idle ``keepalive_s``, then a probe every third
    of it, at least 1 s) on a listening socket, where the platform has them; 0 leaves each off."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if option is not None and user_timeout_s > 0:
        sock.setsockopt(socket.IPPROTO_TCP, option, min(int(user_timeout_s * 1000), 2**31 - 1))
    if keepalive_s <= 0:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", keepalive_s),  # Linux
        ("TCP_KEEPALIVE", keepalive_s),  # macOS: the same, by another name
        ("TCP_KEEPINTVL", max(1, keepalive_s // 3)),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        number = getattr(socket, name, None)
        if number is not None:
            sock.setsockopt(socket.IPPROTO_TCP, number, value)


def hypercorn_config(settings: NodeSettings) -> Tls13Config:
    """Hypercorn settings for a node: bind, TLS files, limits and timeouts."""
    cfg = Tls13Config()
    host = settings.host
    cfg.bind = [f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"]
    if settings.tls:
        cfg.certfile = settings.certfile
        cfg.keyfile = settings.keyfile
    cfg.alpn_protocols = ["h2", "http/1.1"]
    cfg.backlog = settings.listen_backlog
    # Our own limit answers oversize messages with an error and keeps the socket; Hypercorn's
    # hard cap (4x) only protects memory from absurd frames.
    cfg.websocket_max_message_size = settings.max_message_bytes * 4
    cfg.graceful_timeout = settings.graceful_timeout_s
    cfg.keep_alive_timeout = 30
    # No read timeout: Hypercorn would apply it to WebSockets too and drop quiet listeners
    # (a node's typical client). Idle HTTP connections end after keep_alive_timeout; a
    # WebSocket client that stops reading is dropped by the writer's send_timeout_s.
    cfg.read_timeout = None
    cfg.tcp_user_timeout_s = settings.send_timeout_s + 2.0  # after the watchdog: it names the reason
    cfg.tcp_keepalive_s = settings.tcp_keepalive_s
    cfg.accesslog = None
    cfg.errorlog = "-"
    cfg.loglevel = "WARNING"
    return cfg


@attrs.frozen
class ServeInfo:
    """What ``serve`` reports once listening: the bound URLs and the running node."""

    urls: list[str]
    node: Node

    @property
    def url(self) -> str:
        """The first bound URL, e.g. ``http://127.0.0.1:8443``."""
        return self.urls[0]


async def _signal_trigger() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.warning("received %s: shutting down", signal.Signals(signum).name)
            return


async def _hard_stop(node: Node, after_s: float) -> None:
    """Process mode only: end the process if shutdown is still stuck ``after_s`` later.

    Hypercorn writes to sockets in shielded scopes, so a connection whose peer stopped
    reading can hold a graceful shutdown forever. By now every channel is closed and its
    close frame recorded; wait for the store, then leave."""
    await trio.sleep(after_s)
    m = node.mux
    if m is not None:
        with trio.move_on_after(5):
            await m.store.flushed(m.store.position)
    log.warning("connections still blocked in writes %.0f s after shutdown began: exiting", after_s)
    os._exit(0)


async def serve(
    settings: NodeSettings,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[ServeInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node until cancelled, ``shutdown_trigger`` returns, or (with
    ``handle_signals``) SIGINT/SIGTERM; then shut down gracefully. With ``handle_signals``
    (the process mode of ``python -m mux serve``) a shutdown stuck on a peer that stopped
    reading ends the process after ``graceful_timeout_s`` + 2 s."""
    app = create_app(settings)
    node: Node = app.extensions["mux"]

    async def trigger() -> None:
        async with trio.open_nursery() as nursery:

            async def fire(wait: Callable[[], Awaitable[None]]) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            if shutdown_trigger is not None:
                nursery.start_soon(fire, shutdown_trigger)
            if handle_signals:
                nursery.start_soon(fire, _signal_trigger)
            if shutdown_trigger is None and not handle_signals:
                nursery.start_soon(fire, trio.sleep_forever)
        await node.shutdown("node_shutdown")
        if handle_signals:
            outer.start_soon(_hard_stop, node, settings.graceful_timeout_s + 2.0)

    asgi: Any = node_asgi(app)  # the WebSocket skips Quart; REST goes through it
    if settings.trusted_proxy_hops > 0:  # behind TLS-terminating proxies: trust their X-Forwarded-*
        asgi = ProxyFixMiddleware(asgi, mode="legacy", trusted_hops=settings.trusted_proxy_hops)

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        await hypercorn_serve(asgi, hypercorn_config(settings), shutdown_trigger=trigger, task_status=task_status)
        outer.cancel_scope.cancel()  # served and shut down: no hard stop needed any more

    async with trio.open_nursery() as outer:
        urls = await outer.start(run)
        task_status.started(ServeInfo(list(urls), node))
