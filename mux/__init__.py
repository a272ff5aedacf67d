"""mux: one TLS WebSocket, many channels; intent routing; signed, hash-chained frames.

The library in one glance::

    async with mux.open_mux(agent="my_agent") as m:
        ch = await m.open(target="gemini", intent="chat")
        frame = await ch.send({"text": "Hello"})       # signed, chained Frame
        await ch.close()
"""

from __future__ import annotations

__version__ = "0.1.0"

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
