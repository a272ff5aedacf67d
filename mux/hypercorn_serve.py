"""Serving an ASGI app on Hypercorn's trio worker, each TCP connection read by the node's own loop.

:func:`serve` is ``hypercorn.trio.serve`` (Hypercorn 0.18's ``worker_serve``: lifespan,
sockets, TLS and plain listeners, graceful shutdown) with one change: each TCP connection is
served by :class:`mux.lean_read.LeanTCPServer`, the node's own read loop from the
connection's start. QUIC binds are not served (the node speaks HTTP/1.1 and HTTP/2 over TCP).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from random import randint
from typing import Any, Literal

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

from .lean_read import LeanTCPServer

__all__ = ["serve"]


async def serve(
    app: Any,
    config: Config,
    *,
    shutdown_trigger: Callable[..., Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    mode: Literal["asgi", "wsgi"] | None = None,
) -> None:
    """Serve ``app`` as ``hypercorn.trio.serve`` does (same arguments; ``task_status`` gets
    the bound URLs) until ``shutdown_trigger`` returns or the task is cancelled."""
    if config.quic_bind:
        raise ValueError("mux's server does not serve QUIC (quic_bind)")
    wrapped = wrap_app(app, config.wsgi_max_body_size, mode)
    config.set_statsd_logger_class(StatsdLogger)

    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    max_requests = None
    if config.max_requests is not None:
        max_requests = config.max_requests + randint(0, config.max_requests_jitter)
    context = WorkerContext(max_requests)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        await _serve_connections(wrapped, config, context, lifespan_state, shutdown_trigger, task_status)
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


async def _serve_connections(
    app: Any,
    config: Config,
    context: WorkerContext,
    lifespan_state: LifespanState,
    shutdown_trigger: Callable[..., Awaitable[None]] | None,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """Listen, serve every connection until shutdown, then give them ``graceful_timeout``."""
    async with trio.open_nursery() as server_nursery:
        sockets = config.create_sockets()
        for sock in sockets.secure_sockets:
            sock.listen(config.backlog)
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)

        ssl_context = config.create_ssl_context()
        listeners: list[trio.SSLListener[trio.SocketStream] | trio.SocketListener] = []
        binds = []
        for sock in sockets.secure_sockets:
            listeners.append(
                trio.SSLListener(
                    trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                    ssl_context,  # type: ignore[arg-type]  # not None: there are secure binds
                    https_compatible=True,
                )
            )
            bind = repr_socket_addr(sock.family, sock.getsockname())
            binds.append(f"https://{bind}")
            await config.log.info(f"Running on https://{bind} (CTRL + C to quit)")
        for sock in sockets.insecure_sockets:
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            bind = repr_socket_addr(sock.family, sock.getsockname())
            binds.append(f"http://{bind}")
            await config.log.info(f"Running on http://{bind} (CTRL + C to quit)")

        task_status.started(binds)
        try:
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                if shutdown_trigger is not None:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                nursery.start_soon(raise_shutdown, context.terminate.wait)
                connection = partial(LeanTCPServer, app, config, context, ConnectionState(lifespan_state.copy()))
                nursery.start_soon(partial(trio.serve_listeners, connection, listeners, handler_nursery=server_nursery))
                await trio.sleep_forever()
        except BaseExceptionGroup as error:
            _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
            if other_errors is not None:
                raise other_errors from None  # as Hypercorn's worker: what is not a shutdown
        finally:
            await context.terminated.set()
            server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
