"""mux backends: one module per backend, and the registry that names them.

A backend serves the channels of the intents routed to it (see ``backends.base.Backend``).
Built-ins are registered here; third parties register in code with
``register_backend(name, factory)`` or ship a package with an entry point in the group
``mux.backends`` whose object is such a factory.
"""

from __future__ import annotations

from .base import Backend, BackendFactory, Disposition
from .ipoll import IpollBackend
from .registry import available_backends, get_backend_factory, register_backend
from .stream import StreamBackend

register_backend("stream", StreamBackend)
register_backend("ipoll", IpollBackend)

__all__ = [
    "Backend",
    "BackendFactory",
    "Disposition",
    "IpollBackend",
    "StreamBackend",
    "available_backends",
    "get_backend_factory",
    "register_backend",
]
