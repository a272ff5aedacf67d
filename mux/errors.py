"""The errors mux raises, each carrying the wire ``code`` used in ``{"error": CODE}``.

The tree::

    MuxError                      base; ``code`` = "mux_error"
    ├── BadRequest                malformed or invalid input ("bad_request", "invalid_json", ...)
    │   └── BadSetting            a node setting of the wrong type or out of range ("bad_config")
    ├── ChannelError              a channel operation failed ("channel_error")
    │   ├── ChannelNotFound       unknown channel id ("unknown_channel")
    │   ├── ChannelForbidden      the caller is not an end of the channel ("forbidden")
    │   ├── ChannelClosed         the channel is closed ("channel_closed")
    │   ├── ChannelLimit          too many open channels for an agent ("channel_limit")
    │   └── ChannelThrottled      over the bandwidth budget ("throttled")
    │       └── ChannelFull       the receiving end's buffer is full, retry ("receiver_full")
    └── VerificationError         a frame or chain failed offline verification

A client turns a node's error object back into the matching class with :func:`error_from_wire`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

__all__ = [
    "BadRequest",
    "BadSetting",
    "ChannelClosed",
    "ChannelError",
    "ChannelForbidden",
    "ChannelFull",
    "ChannelLimit",
    "ChannelNotFound",
    "ChannelThrottled",
    "MuxError",
    "VerificationError",
    "describe_failure",
    "error_from_wire",
]


class MuxError(Exception):
    """Base of every mux error; ``code`` is the stable wire error code."""

    code = "mux_error"
    ref: str | int | None = None
    """The client's request reference, when the failing message carried one."""

    def __init__(self, detail: str = "", *, code: str | None = None, channel_id: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.channel_id = channel_id

    def to_wire(self) -> dict[str, Any]:
        """The error as a wire object: ``{"error": code, "detail": ..., "channel_id": ...}``."""
        out: dict[str, Any] = {"error": self.code, "detail": self.detail}
        if self.channel_id is not None:
            out["channel_id"] = self.channel_id
        return out


class BadRequest(MuxError):
    """The input was malformed or invalid; nothing was changed."""

    code = "bad_request"


class BadSetting(BadRequest, ValueError):
    """A setting of a node (``serve --config``, ``MUX_*``, a flag, or code) has the wrong type
    or is out of range; also a ``ValueError``, as Python's own checks raise. ``setting`` is
    the field's name, when one field is at fault."""

    code = "bad_config"

    def __init__(self, detail: str = "", *, setting: str | None = None) -> None:
        super().__init__(detail)
        self.setting = setting


class ChannelError(MuxError):
    """A channel operation failed."""

    code = "channel_error"


class ChannelNotFound(ChannelError):
    """No channel has this id (or it has been forgotten)."""

    code = "unknown_channel"


class ChannelForbidden(ChannelError):
    """The caller is not one of the channel's two ends."""

    code = "forbidden"


class ChannelClosed(ChannelError):
    """The channel is closed; nothing more can be sent on it."""

    code = "channel_closed"


class ChannelLimit(ChannelError):
    """The agent already has the maximum number of open channels."""

    code = "channel_limit"


class ChannelThrottled(ChannelError):
    """A preemptible channel went over its bandwidth budget; the frame was refused."""

    code = "throttled"
    retry_after_ms: int | None = None
    """When the budget will have room for this frame again (sent as ``retry_after_ms``)."""
    window: int | None = None
    """The most frames the sender should have unacknowledged on this channel for now (sent
    as ``window`` while a call shapes the connection's bulk)."""

    def __init__(
        self,
        detail: str = "",
        *,
        code: str | None = None,
        channel_id: str | None = None,
        retry_after_ms: int | None = None,
        window: int | None = None,
    ) -> None:
        super().__init__(detail, code=code, channel_id=channel_id)
        if retry_after_ms is not None:
            self.retry_after_ms = retry_after_ms
        if window is not None:
            self.window = window

    def to_wire(self) -> dict[str, Any]:
        """The error with ``retry_after_ms`` and ``window`` when known."""
        out = super().to_wire()
        if self.retry_after_ms is not None:
            out["retry_after_ms"] = self.retry_after_ms
        if self.window is not None:
            out["window"] = self.window
        return out


class ChannelFull(ChannelThrottled):
    """The receiving end's bounded buffer is full; the frame was refused and may be retried.

    ``wait_room`` (when set) is an async callable that returns once there may be room.
    """

    code = "receiver_full"

    def __init__(
        self,
        detail: str = "",
        *,
        channel_id: str | None = None,
        code: str | None = None,
        wait_room: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(detail, code=code, channel_id=channel_id)
        self.wait_room = wait_room


class VerificationError(MuxError):
    """A frame or chain did not verify; ``reason`` says precisely why.

    Reasons: of a frame, ``bad_hash``, ``bad_signature``, ``unsigned``, ``malformed``; of a
    chain, also ``broken_link``, ``gap``, ``reorder``, ``duplicate``, ``wrong_channel``,
    ``bad_start``, ``after_close``, ``unsigned_tail``, ``empty``; of an agent's signature,
    ``bad_agent_signature``, ``not_agent_signed``, ``wrong_agent_key``; of a token,
    ``expired``, ``not_yet_valid``.
    """

    code = "verification_failed"

    def __init__(self, reason: str, detail: str, *, index: int | None = None, seq: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.index = index
        self.seq = seq


_BY_CODE: dict[str, type[MuxError]] = {
    "unknown_channel": ChannelNotFound,
    "forbidden": ChannelForbidden,
    "channel_closed": ChannelClosed,
    "channel_limit": ChannelLimit,
    "throttled": ChannelThrottled,
    "receiver_full": ChannelFull,
    "store_busy": ChannelFull,
    "mailbox_full": ChannelError,
    "agent_attached": ChannelError,
    "backend_error": ChannelError,
}
_BAD_INPUT = frozenset(
    {
        "invalid_json",
        "bad_request",
        "unknown_action",
        "bad_agent",
        "bad_target",
        "bad_intent",
        "bad_metadata",
        "bad_payload",
        "bad_binary",
        "message_too_large",
        "payload_too_large",
    }
)
"""Error codes of bad input (HTTP 400/413): they map to :class:`BadRequest`."""


def error_from_wire(body: dict[str, Any], status: int | None = None) -> MuxError:
    """The :class:`MuxError` for an error object ``{"error": CODE, "detail", "channel_id"?}``.

    Channel codes map to their subclass (``unknown_channel`` -> ChannelNotFound,
    ``forbidden`` -> ChannelForbidden, ``channel_closed`` -> ChannelClosed, ``channel_limit``
    -> ChannelLimit, ``throttled`` -> ChannelThrottled, ``receiver_full``/``store_busy`` ->
    ChannelFull); bad-input codes, or any code with HTTP status 400/413, give
    :class:`BadRequest`; anything else a plain :class:`MuxError`. The instance always carries
    the node's ``code``, ``detail`` and ``channel_id`` (and ``ref`` when present).
    """
    code = str(body.get("error") or "mux_error")
    detail = str(body.get("detail") or "")
    channel_id = body.get("channel_id")
    if not isinstance(channel_id, str):
        channel_id = None
    cls = _BY_CODE.get(code)
    exc: MuxError
    if cls is not None:
        exc = cls(detail, channel_id=channel_id)
    elif code in _BAD_INPUT or status in (400, 413):
        exc = BadRequest(detail, channel_id=channel_id)
    else:
        exc = MuxError(detail, channel_id=channel_id)
    exc.code = code
    if isinstance(exc, ChannelThrottled):
        for hint in ("retry_after_ms", "window"):
            value = body.get(hint)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                setattr(exc, hint, value)
    ref = body.get("ref")
    if isinstance(ref, (str, int)) and not isinstance(ref, bool):
        exc.ref = ref
    return exc


def describe_failure(exc: BaseException) -> str:
    """``exc`` in one line for a message: its type and text, or its cause's when it has none."""
    cause = exc.__cause__ or exc.__context__
    text = str(exc) or (f"{type(cause).__name__}: {cause}" if cause is not None else "")
    return f"{type(exc).__name__}: {text or 'no detail'}"
