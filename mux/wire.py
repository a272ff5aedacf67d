"""The WebSocket protocol, sans I/O: parse client messages, build node messages.

How this works: :func:`parse_message` turns one WebSocket message (text JSON, or the binary
framing of ``docs/protocol.md``) into an :class:`Action`, or raises a
:class:`~mux.errors.MuxError` whose code names what is wrong. The ``*_event`` builders turn
node facts into the exact bytes/text to put on the socket. Nothing here touches a socket, a
task or the clock; :class:`mux.session.WireSession` applies actions to a Mux.

The field table ``ACTIONS`` says which fields each action needs and of which type.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

import attrs
import orjson

from .channel import ChannelState
from .errors import BadRequest, MuxError
from .frames import Frame

__all__ = [
    "ACTIONS",
    "CHUNK_BYTES",
    "MAX_BATCH_ITEMS",
    "MAX_PARTS",
    "SEND_PART",
    "MAX_WINDOW",
    "Action",
    "batch_event",
    "batch_items",
    "MAX_REF_LEN",
    "channel_closed_event",
    "channel_opened_event",
    "decode_object",
    "dumps",
    "error_event",
    "event",
    "frame_ack_event",
    "frame_message",
    "frame_messages",
    "pack_binary",
    "parse_message",
    "unpack_binary",
]

MAX_REF_LEN = 128
MAX_PARTS = 4096
"""The most pieces a client's payload may be sent in (binary ``send`` with ``part``/``parts``:
``mux.pieces``)."""
SEND_PART = "send_part"
"""The name :func:`parse_message` gives a ``send`` that carries one piece of a payload."""
_U32 = struct.Struct(">I")

# action -> {field: (type(s), required)}
ACTIONS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "open": {"target": ((str,), True), "intent": ((str,), False), "metadata": ((dict,), False)},
    "send": {
        "channel_id": ((str,), True),
        "payload": ((object,), True),
        "enc": ((str,), False),
        "agent_sig": ((str,), False),
        "agent_nonce": ((str,), False),
    },
    "close": {"channel_id": ((str,), True), "reason": ((str,), False)},
    "ack": {"channel_id": ((str,), True), "seq": ((int,), True)},
    "credit": {"channel_id": ((str,), True), "frames": ((int,), True)},
    "probe": {"n": ((int,), True)},
    "abandon": {"channel_id": ((str,), True)},
    "list": {},
    "ping": {},
    "resume": {"token": ((str,), True), "last": ((dict,), False)},
    "batch": {"items": ((list,), True)},
    "fork": {
        "channel_id": ((str,), True),
        "target": ((str,), False),
        "intent": ((str,), False),
        "metadata": ((dict,), False),
    },
}


@attrs.frozen
class Action:
    """One parsed client action; ``fields`` holds the validated fields of its table row."""

    name: str
    ref: str | int | None
    fields: dict[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        """A field's value, or ``default`` when absent."""
        return self.fields.get(key, default)


def dumps(obj: Any) -> str:
    """Compact JSON text for the socket."""
    return orjson.dumps(obj).decode()


def _ref_of(msg: dict[str, Any]) -> str | int | None:
    ref = msg.get("ref")
    if ref is None:
        return None
    if isinstance(ref, bool) or not isinstance(ref, (str, int)) or (isinstance(ref, str) and len(ref) > MAX_REF_LEN):
        raise BadRequest(f"ref must be a string (<= {MAX_REF_LEN} chars) or an integer", code="bad_request")
    return ref


_PLAIN_SEND = frozenset({"action", "channel_id", "payload", "ref"})


def _validate(msg: dict[str, Any], ref: str | int | None) -> Action:
    name = msg.get("action")
    if name == "send" and msg.keys() <= _PLAIN_SEND and "payload" in msg and type(msg.get("channel_id")) is str:
        return Action(name, ref, {"channel_id": msg["channel_id"], "payload": msg["payload"]})  # the common case
    if not isinstance(name, str):
        raise BadRequest('message has no "action" string', code="bad_request")
    spec = ACTIONS.get(name)
    if spec is None:
        raise BadRequest(f"unknown action {name!r}; expected one of {', '.join(ACTIONS)}", code="unknown_action")
    fields: dict[str, Any] = {}
    for key, (types, required) in spec.items():
        if key not in msg or (msg[key] is None and key != "payload"):
            if required:
                raise BadRequest(f"{name}: missing field {key!r}", code="bad_request")
            continue
        value = msg[key]
        if types != (object,) and not isinstance(value, types):
            raise BadRequest(f"{name}: field {key!r} must be {types[0].__name__}", code="bad_request")
        fields[key] = value
    if name == "send" and ("part" in msg or "parts" in msg):
        raise BadRequest("send: a payload in pieces travels in binary messages", code="bad_request")
    if name == "send" and fields.get("enc") is not None:
        if fields["enc"] != "base64" or not isinstance(fields["payload"], str):
            raise BadRequest('send: "enc" may only be "base64" with a string payload', code="bad_payload")
        try:
            fields["payload"] = base64.b64decode(fields["payload"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(f"send: payload is not valid base64: {exc}", code="bad_payload") from exc
    return Action(name, ref, fields)


def _too_large(data: str | bytes, max_bytes: int) -> BadRequest:
    """The ``message_too_large`` error for ``data``, with its ``ref`` when a binary header
    names one (made here, so the frame that raises it holds no reference to it)."""
    exc = BadRequest(f"message is {len(data)} bytes, over the limit of {max_bytes}", code="message_too_large")
    if isinstance(data, bytes):  # a binary header is small: its ref answers the request
        try:
            exc.ref = _ref_of(unpack_binary(data)[0])
        except MuxError:
            pass
    return exc


def parse_message(data: str | bytes, max_bytes: int) -> Action:
    """Parse one WebSocket message (text = JSON, bytes = binary framing) into an Action.

    Raises MuxError (``message_too_large``, ``invalid_json``, ``bad_binary``,
    ``bad_request``, ``unknown_action``, ``bad_payload``); its ``ref`` attribute is set when
    the message named one, so the error can be matched to the request.
    """
    if len(data) > max_bytes:
        raise _too_large(data, max_bytes)
    if isinstance(data, bytes):
        header, payload = unpack_binary(data)
        ref = _ref_of(header)
        try:
            if header.get("action") != "send":
                raise BadRequest("a binary message must carry a send action", code="bad_binary")
            header = {**header, "payload": payload}
            header.pop("enc", None)
            part, parts = header.pop("part", None), header.pop("parts", None)
            part_ack = header.pop("part_ack", None)
            action = _validate(header, ref)
            if part is not None or parts is not None:  # one piece of a payload (mux.pieces)
                if type(part) is not int or type(parts) is not int or not 0 <= part < parts or parts > MAX_PARTS:
                    raise BadRequest(
                        f"send: part and parts must be integers, 0 <= part < parts, 2 <= parts <= {MAX_PARTS}",
                        code="bad_request",
                    )
                if parts < 2:
                    raise BadRequest("send: a payload in pieces has at least 2 parts", code="bad_request")
                if part_ack is not None and type(part_ack) is not bool:
                    raise BadRequest("send: part_ack must be true or false", code="bad_request")
                action.fields["part"], action.fields["parts"] = part, parts
                if part_ack:
                    action.fields["part_ack"] = True
                return Action(SEND_PART, ref, action.fields)
            if part_ack is not None:
                raise BadRequest("send: part_ack is for a payload in pieces", code="bad_request")
            return action
        except MuxError as exc:
            exc.ref = ref
            raise
    msg = decode_object(data)
    ref = None
    try:
        ref = _ref_of(msg)
        return _validate(msg, ref)
    except MuxError as exc:
        exc.ref = ref
        if isinstance(msg.get("channel_id"), str) and exc.channel_id is None:
            exc.channel_id = msg["channel_id"][:80]
        raise


MAX_BATCH_ITEMS = 256
MAX_WINDOW = 65536
"""The largest per-channel receive window a connection may ask for (``?window=N``)."""


def batch_items(action: Action) -> list[Action | MuxError]:
    """The actions inside a ``batch`` action, in order; a malformed item becomes its error
    (with the item's ``ref``), so one bad item fails alone."""
    items = action.get("items")
    if len(items) > MAX_BATCH_ITEMS:
        raise BadRequest(f"a batch holds at most {MAX_BATCH_ITEMS} items", code="bad_request")
    out: list[Action | MuxError] = []
    for item in items:
        ref = None
        try:
            if not isinstance(item, dict):
                raise BadRequest("a batch item must be a JSON object", code="bad_request")
            ref = _ref_of(item)
            if item.get("action") == "batch":
                raise BadRequest("batches do not nest", code="bad_request")
            out.append(_validate(item, ref))
        except MuxError as exc:
            exc.ref = ref
            out.append(exc)
    return out


def batch_event(replies: list[str]) -> str:
    """Several JSON replies as one message: ``{"event": "batch", "items": [...]}``."""
    return '{"event":"batch","items":[' + ",".join(replies) + "]}"


def decode_object(data: str | bytes) -> dict[str, Any]:
    """A JSON text message as a dict, or BadRequest ``invalid_json``."""
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(msg, dict):
        raise BadRequest("a message must be a JSON object", code="invalid_json")
    return msg


def pack_binary(header: dict[str, Any], payload: bytes) -> bytes:
    """The binary framing: u32 big-endian header length, JSON header, payload bytes."""
    head = orjson.dumps(header)
    return _U32.pack(len(head)) + head + payload


def unpack_binary(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Split a binary message into its JSON header and payload (raises ``bad_binary``)."""
    if len(data) < 4:
        raise BadRequest("binary message shorter than its 4-byte header length", code="bad_binary")
    (n,) = _U32.unpack_from(data)
    if n > len(data) - 4:
        raise BadRequest(f"binary header length {n} exceeds the message", code="bad_binary")
    try:
        header = orjson.loads(data[4 : 4 + n])
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"binary header is not JSON: {exc}", code="bad_binary") from exc
    if not isinstance(header, dict):
        raise BadRequest("binary header must be a JSON object", code="bad_binary")
    return header, data[4 + n :]


def event(name: str, ref: str | int | None = None, **fields: Any) -> str:
    """A node event as JSON text: ``{"event": name, ...fields, "ref"?}``."""
    out: dict[str, Any] = {"event": name, **fields}
    if ref is not None:
        out["ref"] = ref
    return dumps(out)


def error_event(exc: MuxError, ref: str | int | None = None) -> str:
    """An error as JSON text: ``{"error": code, "detail": ..., "channel_id"?, "ref"?}``."""
    out = exc.to_wire()
    if ref is None:
        ref = exc.ref
    if ref is not None:
        out["ref"] = ref
    return dumps(out)


def channel_opened_event(state: ChannelState, role: str, ref: str | int | None = None) -> str:
    """``channel_opened`` for the opener (``role="opener"``) or the target (``"target"``)."""
    assert state.open_frame is not None
    return event(
        "channel_opened",
        ref,
        channel_id=state.id,
        intent=state.intent.name,
        route=state.route(),
        state=state.state,
        agent=state.agent,
        target=state.target,
        tbz_hash=state.open_frame.tbz_hash,
        seq=0,
        policy=state.intent.policy.to_dict(),
        metadata=state.metadata,
        role=role,
        delivery=state.intent.delivery,
    )


def frame_ack_event(
    frame: Frame,
    disposition: str,
    ref: str | int | None = None,
    *,
    stored: bool = False,
    window: int | None = None,
    pace_ms: int | None = None,
) -> str:
    """``frame_ack``: the frame was chained and signed (and with ``stored``, durably stored);
    ``delivered`` says whether it also reached the receiver live. ``window``, when given, is
    the most frames the sender should have unacknowledged on the channel for now;
    ``pace_ms``, how long to wait before sending the next one (until the budget fits a frame
    this size, and into the gap after a call frame: ``WireSession._shape``).

    Written from a template (one per send, on every acknowledged path): the node makes its
    channel ids (``ch-`` and hex), ``tbz_hash`` and ``sig`` are hex, ``disposition`` is a
    ``Disposition`` value; nothing in them needs JSON escaping. ``ref`` is encoded."""
    tail = ""
    if window is not None:
        tail = f',"window":{int(window)}'
    if pace_ms is not None:
        tail += f',"pace_ms":{int(pace_ms)}'
    if ref is not None:
        tail += f',"ref":{ref}' if type(ref) is int else ',"ref":' + dumps(ref)
    return (
        f'{{"event":"frame_ack","channel_id":"{frame.channel_id}","seq":{frame.seq},'
        f'"tbz_hash":"{frame.tbz_hash}","sig":"{frame.sig}",'
        f'"delivered":{"true" if disposition == "delivered" else "false"},'
        f'"stored":{"true" if stored else "false"},"disposition":"{disposition}"{tail}}}'
    )


def channel_closed_event(state: ChannelState, ref: str | int | None = None) -> str:
    """``channel_closed`` with the reason and the signed close frame's seq and hash."""
    close = state.close_frame
    assert close is not None
    return event(
        "channel_closed",
        ref,
        channel_id=state.id,
        reason=state.close_reason,
        by=close.payload.get("by"),
        seq=close.seq,
        tbz_hash=close.tbz_hash,
    )


CHUNK_BYTES = 16 << 10
"""Frames with a larger payload go out as ``frame_part`` pieces of at most this size."""


def frame_messages(frame: Frame, chunk_bytes: int = CHUNK_BYTES) -> list[str | bytes]:
    """The message(s) carrying ``frame``: one ``frame`` event, or ``frame_part`` pieces.

    Pieces use the binary framing; each header is ``{"event": "frame_part", "channel_id",
    "seq", "part", "parts"}`` and the first also carries ``"frame"``: the frame's exported
    form without ``payload``. Joined in order, the pieces' bytes are the payload bytes (the
    binary payload, or the canonical JSON of a JSON payload, as ``frame.enc`` says)."""
    raw = frame.raw
    if len(raw) <= chunk_bytes:
        return [frame_message(frame)]
    d = frame.header()
    parts = (len(raw) + chunk_bytes - 1) // chunk_bytes
    out: list[str | bytes] = []
    view = memoryview(raw)
    for i in range(parts):
        header: dict[str, Any] = {
            "event": "frame_part",
            "channel_id": frame.channel_id,
            "seq": frame.seq,
            "part": i,
            "parts": parts,
        }
        if i == 0:
            header["frame"] = d
        out.append(pack_binary(header, bytes(view[i * chunk_bytes : (i + 1) * chunk_bytes])))
    return out


_FRAME_PREFIX = b'{"event":"frame",'


def frame_message(frame: Frame) -> str | bytes:
    """A ``frame`` event: JSON text for JSON payloads, the binary framing for bytes."""
    d = frame.header()
    if frame.binary:
        d["event"] = "frame"
        return pack_binary(d, frame.payload)
    d["payload"] = orjson.Fragment(frame.raw)
    return (_FRAME_PREFIX + orjson.dumps(d)[1:]).decode()
