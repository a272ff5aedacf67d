"""One typed settings object for a node: defaults with units in their names.

Built from CLI flags (``python -m mux serve``), from ``MUX_*`` environment variables, or
in code. The Mux's own limits live in the nested :class:`~mux.config.MuxConfig`.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

import attrs

from .config import MuxConfig

__all__ = ["NodeSettings"]


@attrs.define
class NodeSettings:
    """Everything ``serve`` and the app need to run a node."""

    agent: str = "mux-node"
    """The node's own agent name (signs close frames it makes itself)."""
    host: str = "127.0.0.1"
    port: int = 8443
    data_dir: str | None = "mux-data"
    """Directory for the node key (and later the durable store); None = in memory only."""
    memory_ledger_bytes: int = 64 << 20
    """With no data directory: the memory the in-memory ledger (export, resume) may hold,
    frames' bookkeeping included (about 560 bytes a frame beside its payload); the chains
    begun longest ago are forgotten first. ``MUX_MEMORY_LEDGER_BYTES``."""
    certfile: str | None = None
    keyfile: str | None = None
    """PEM certificate and key: with both, the node speaks TLS 1.3 only (h2 and http/1.1)."""
    prefix: str = "/api/mux"
    max_message_bytes: int = 1 << 20
    """Largest WebSocket message / REST body the node reads; larger gets ``message_too_large``."""
    open_mode: bool = False
    """No authentication: callers name themselves (the seed's behaviour). ``serve --open``."""
    max_connections: int = 10_000
    """WebSocket connections the node holds at once; more get ``too_many_connections``."""
    rate_messages_per_s: float = 500.0
    """Messages per second one WebSocket (or one agent over REST) may send; 0 = unlimited."""
    rate_burst: int = 1000
    """Messages a connection may send in a burst above the rate."""
    send_timeout_s: float = 15.0
    """A client that does not take a message for this long is disconnected (slow consumer)."""
    writer_idle_s: float = 1.0
    """A connection whose writer task has had nothing to write for about this long keeps no
    writer task (2.4 KiB less per idle connection) until a message must wait for its socket
    (most are written straight through without one); 0 = writers never retire."""
    trusted_proxy_hops: int = 0
    """TLS-terminating proxies in front of the node whose X-Forwarded-For/-Proto to trust."""
    longpoll_max_s: float = 30.0
    resume_grace_s: float = 30.0
    """How long a dropped resumable connection's channels wait for ``resume``."""
    graceful_timeout_s: float = 5.0
    """On SIGINT/SIGTERM: how long clients get to receive their channel_closed events."""
    trim_after_closes: int = 500
    """Give freed memory back to the OS (``mux.heap``) after this many channels and
    connections closed; 0 = never."""
    mux: MuxConfig = attrs.field(factory=MuxConfig)

    @property
    def tls(self) -> bool:
        """True when a certificate and key are configured."""
        return bool(self.certfile and self.keyfile)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **overrides: Any) -> NodeSettings:
        """Settings from a TOML file: top-level keys are field names; ``[mux]`` holds
        MuxConfig fields; ``[backends.NAME]`` tables hold each backend's options."""
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        mux_fields = dict(data.pop("mux", {}))
        backends = data.pop("backends", {})
        if backends:
            mux_fields["backends"] = backends
        known = {f.name for f in attrs.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown settings in {path}: {', '.join(sorted(unknown))}")
        values = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        return cls(mux=MuxConfig(**mux_fields), **values)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> NodeSettings:
        """Settings from ``MUX_HOST``, ``MUX_PORT``, ``MUX_AGENT``, ``MUX_DATA_DIR``,
        ``MUX_CERTFILE``, ``MUX_KEYFILE``, ``MUX_MAX_MESSAGE_BYTES``, then ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in attrs.fields(cls):
            raw = env.get("MUX_" + field.name.upper())
            if raw is None or field.name == "mux":
                continue
            values[field.name] = (
                int(raw)
                if field.type in ("int", int)
                else float(raw)
                if field.type
                in (
                    "float",
                    float,
                )
                else raw
            )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
