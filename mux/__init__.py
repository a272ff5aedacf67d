"""mux: one TLS WebSocket, many channels; intent routing; signed, hash-chained frames.

The library in one glance::

    async with mux.open_mux(agent="my_agent") as m:
        ch = await m.open(target="gemini", intent="chat")
        frame = await ch.send({"text": "Hello"})       # signed, chained Frame
        await ch.close()
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .channel import Channel, Receipt
    from .core import Mux, MuxConfig, open_mux
    from .endpoint import Endpoint
    from .errors import (
        BadRequest,
        BadSetting,
        ChannelClosed,
        ChannelError,
        ChannelForbidden,
        ChannelFull,
        ChannelLimit,
        ChannelNotFound,
        ChannelThrottled,
        MuxError,
        VerificationError,
    )
    from .frames import Frame
    from .intents import (
        BANDWIDTH_POLICIES,
        DEFAULT_POLICY,
        INTENT_ROUTES,
        BandwidthPolicy,
        Intent,
        IntentRegistry,
        Route,
        resolve_intent,
    )
    from .signing import ChainReport, NodeKey, verify_chain, verify_frame

_EXPORTS = {
    "BANDWIDTH_POLICIES": "intents",
    "BadRequest": "errors",
    "BadSetting": "errors",
    "BandwidthPolicy": "intents",
    "ChainReport": "signing",
    "Channel": "channel",
    "ChannelClosed": "errors",
    "ChannelError": "errors",
    "ChannelForbidden": "errors",
    "ChannelFull": "errors",
    "ChannelLimit": "errors",
    "ChannelNotFound": "errors",
    "ChannelThrottled": "errors",
    "DEFAULT_POLICY": "intents",
    "Endpoint": "endpoint",
    "Frame": "frames",
    "INTENT_ROUTES": "intents",
    "Intent": "intents",
    "IntentRegistry": "intents",
    "Mux": "core",
    "MuxConfig": "core",
    "MuxError": "errors",
    "NodeKey": "signing",
    "Receipt": "channel",
    "Route": "intents",
    "VerificationError": "errors",
    "open_mux": "core",
    "resolve_intent": "intents",
    "verify_chain": "signing",
    "verify_frame": "signing",
}
"""Where each public name lives: imported when first asked for (``import mux`` alone stays
cheap, so ``python -m mux serve`` can execute itself again under jemalloc at once)."""

__all__ = [
    "BANDWIDTH_POLICIES",
    "DEFAULT_POLICY",
    "INTENT_ROUTES",
    "BadRequest",
    "BadSetting",
    "BandwidthPolicy",
    "ChainReport",
    "Channel",
    "ChannelClosed",
    "ChannelError",
    "ChannelForbidden",
    "ChannelFull",
    "ChannelLimit",
    "ChannelNotFound",
    "ChannelThrottled",
    "Endpoint",
    "Frame",
    "Intent",
    "IntentRegistry",
    "Mux",
    "MuxConfig",
    "MuxError",
    "NodeKey",
    "Receipt",
    "Route",
    "VerificationError",
    "__version__",
    "open_mux",
    "resolve_intent",
    "verify_chain",
    "verify_frame",
]


def __getattr__(name: str) -> Any:
    """A public name, or a submodule, imported when first asked for."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
