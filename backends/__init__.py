"""mux backends: one module per backend, and the registry that names them.

A backend serves the channels of the intents routed to it (see ``backends.base.Backend``).
Built-ins are registered here; third parties register in code with
``register_backend(name, factory)`` or ship a package with an entry point in the group
``mux.backends`` whose object is such a factory.
"""

from __future__ import annotations

from .base import Backend, BackendFactory, Disposition
from .ipoll import IpollBackend
from .mail import MailBackend
from .media import VoiceBackend, WebRTCBackend
from .overlay import OverlayBackend
from .phantom import PhantomBackend
from .registry import available_backends, get_backend_factory, register_backend
from .stream import StreamBackend
from .sync import SyncBackend
from .tibet import TibetBackend
from .tping import TpingBackend

register_backend("stream", StreamBackend)
register_backend("sync", SyncBackend)
register_backend("voice", VoiceBackend)
register_backend("webrtc", WebRTCBackend)
register_backend("ipoll", IpollBackend)
register_backend("tibet", TibetBackend)
register_backend("mail", MailBackend)
register_backend("phantom", PhantomBackend)
register_backend("overlay", OverlayBackend)
register_backend("tping", TpingBackend)

__all__ = [
    "Backend",
    "BackendFactory",
    "Disposition",
    "IpollBackend",
    "MailBackend",
    "TibetBackend",
    "PhantomBackend",
    "OverlayBackend",
    "StreamBackend",
    "SyncBackend",
    "VoiceBackend",
    "WebRTCBackend",
    "TpingBackend",
    "available_backends",
    "get_backend_factory",
    "register_backend",
]
