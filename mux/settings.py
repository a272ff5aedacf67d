"""One typed settings object for a node: defaults with units in their names.

Built from CLI flags (``python -m mux serve``), from ``MUX_*`` environment variables, or
in code. The Mux's own limits live in the nested :class:`~mux.config.MuxConfig`.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .checks import flag, instance, number, text, url_path, whole
from .config import MuxConfig
from .errors import BadSetting

__all__ = ["NodeSettings"]


@attrs.define
class NodeSettings:
    """Everything ``serve`` and the app need to run a node."""

    agent: str = attrs.field(default="mux-node", validator=text())
    """The node's own agent name (signs close frames it makes itself)."""
    host: str = attrs.field(default="127.0.0.1", validator=text())
    port: int = attrs.field(default=8443, validator=whole(0, 65535))
    data_dir: str | None = attrs.field(default="mux-data", validator=text(optional=True))
    """Directory for the node key (and later the durable store); None = in memory only."""
    memory_ledger_bytes: int = attrs.field(default=64 << 20, validator=whole(0))
    """With no data directory: the memory the in-memory ledger (export, resume) may hold,
    frames' bookkeeping included (about 560 bytes a frame beside its payload); the chains
    begun longest ago are forgotten first. ``MUX_MEMORY_LEDGER_BYTES``."""
    certfile: str | None = attrs.field(default=None, validator=text(optional=True))
    keyfile: str | None = attrs.field(default=None, validator=text(optional=True))
    """PEM certificate and key: with both, the node speaks TLS 1.3 only (h2 and http/1.1)."""
    prefix: str = attrs.field(default="/api/mux", validator=url_path)
    max_message_bytes: int = attrs.field(default=1 << 20, validator=whole(1))
    """Largest WebSocket message / REST body the node reads; larger gets ``message_too_large``."""
    open_mode: bool = attrs.field(default=False, validator=flag)
    """No authentication: callers name themselves (the seed's behaviour). ``serve --open``."""
    max_connections: int = attrs.field(default=10_000, validator=whole(1))
    """WebSocket connections the node holds at once; more get ``too_many_connections``."""
    listen_backlog: int = attrs.field(default=4096, validator=whole(1, 1 << 20))
    """Connections the kernel queues for the node before it accepts them (``listen``'s
    backlog; Linux caps it at ``net.core.somaxconn``). Past it a client's connection attempt is
    dropped and retried a second or more later, so a burst of connections (clients coming back
    after a restart) needs room here."""
    rate_messages_per_s: float = attrs.field(default=500.0, validator=number(0))
    """Messages per second one WebSocket (or one agent over REST) may send; 0 = unlimited."""
    rate_burst: int = attrs.field(default=1000, validator=whole(1))
    """Messages a connection may send in a burst above the rate."""
    send_timeout_s: float = attrs.field(default=15.0, validator=number(0, above=True))
    """A client that does not take a message for this long is disconnected (slow consumer)."""
    tcp_keepalive_s: int = attrs.field(default=30, validator=whole(0, 32767))
    """A connection silent for this long is probed by TCP keepalive, so a peer that vanished
    without closing (a phone off the network, a machine powered off) is dropped within about
    ``tcp_keepalive_s + send_timeout_s + 2`` seconds, and its agent can connect again (one
    socket per agent); 0 = no probes (such a connection stays until the node stops)."""
    writer_idle_s: float = attrs.field(default=1.0, validator=number(0))
    """A connection whose writer task has had nothing to write for about this long keeps no
    writer task (2.4 KiB less per idle connection) until a message must wait for its socket
    (most are written straight through without one); 0 = writers never retire."""
    trusted_proxy_hops: int = attrs.field(default=0, validator=whole(0))
    """TLS-terminating proxies in front of the node whose X-Forwarded-For/-Proto to trust."""
    longpoll_max_s: float = attrs.field(default=30.0, validator=number(0))
    resume_grace_s: float = attrs.field(default=30.0, validator=number(0))
    """How long a dropped resumable connection's channels wait for ``resume``."""
    graceful_timeout_s: float = attrs.field(default=5.0, validator=number(0))
    """On SIGINT/SIGTERM: how long clients get to receive their channel_closed events."""
    trim_after_closes: int = attrs.field(default=500, validator=whole(0))
    """Give freed memory back to the OS (``mux.heap``) after this many channels and
    connections closed; 0 = never."""
    mux: MuxConfig = attrs.field(factory=MuxConfig, validator=instance(MuxConfig, "a MuxConfig"))

    def __attrs_post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise BadSetting("certfile and keyfile go together: set both (TLS) or neither", setting="certfile")

    @property
    def tls(self) -> bool:
        """True when a certificate and key are configured."""
        return bool(self.certfile and self.keyfile)

    def given(self, **overrides: Any) -> NodeSettings:
        """These settings with ``overrides`` applied (None = not given), each checked."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return attrs.evolve(self, **given) if given else self

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **overrides: Any) -> NodeSettings:
        """Settings from a TOML file: top-level keys are field names; ``[mux]`` holds
        MuxConfig fields; ``[backends.NAME]`` tables hold each backend's options. Then
        ``overrides`` (None = not given). An unknown key, a value of the wrong type or out of
        range raises :class:`~mux.errors.BadSetting` naming the file and the setting."""
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise BadSetting(f"{path}: not valid TOML: {exc}") from None
        mux_fields = data.pop("mux", {})
        if not isinstance(mux_fields, dict):
            raise BadSetting(f"{path}: mux must be a table ([mux]), not {mux_fields!r}", setting="mux")
        backends = data.pop("backends", {})
        if backends:
            mux_fields["backends"] = backends
        for section, fields, known in (("", data, cls), ("[mux] ", mux_fields, MuxConfig)):
            unknown = set(fields) - {f.name for f in attrs.fields(known)}
            if unknown:
                raise BadSetting(f"{path}: unknown settings {section}{', '.join(sorted(unknown))}")
        try:
            mux = MuxConfig(**mux_fields)
        except BadSetting as exc:
            raise BadSetting(f"{path}: [mux] {exc.detail}", setting=exc.setting) from None
        try:
            settings = cls(mux=mux, **data)
        except BadSetting as exc:
            raise BadSetting(f"{path}: {exc.detail}", setting=exc.setting) from None
        return settings.given(**overrides)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> NodeSettings:
        """Settings from ``MUX_`` + a field's name in capitals (``MUX_HOST``, ``MUX_PORT``,
        ``MUX_DATA_DIR``, ``MUX_MEMORY_LEDGER_BYTES``, ...; true/false as 1/0, true/false,
        yes/no or on/off), then ``overrides`` (None = not given). A value that does not parse
        or is out of range raises :class:`~mux.errors.BadSetting` naming the variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in attrs.fields(cls):
            name = "MUX_" + field.name.upper()
            raw = env.get(name)
            if raw is None or field.name == "mux":
                continue
            parse, what = _FROM_TEXT.get(str(field.type), (str, "text"))
            try:
                values[field.name] = parse(raw)
            except ValueError:
                raise BadSetting(f"{name} must be {what}, not {raw!r}", setting=field.name) from None
        try:
            settings = cls(**values)
        except BadSetting as exc:
            var = f"MUX_{exc.setting.upper()}: " if exc.setting in values else ""
            raise BadSetting(f"{var}{exc.detail}", setting=exc.setting) from None
        return settings.given(**overrides)


def _flag_from_text(raw: str) -> bool:
    word = raw.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


_FROM_TEXT: dict[str, tuple[Callable[[str], Any], str]] = {
    "int": (int, "a whole number"),
    "float": (float, "a number"),
    "bool": (_flag_from_text, "true or false (1/0, true/false, yes/no, on/off)"),
}
"""How ``from_env`` reads a field of each type (others are text as given)."""
