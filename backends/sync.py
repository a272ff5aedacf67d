"""The sync backend (``file:sync``): relays a chunked, verified, resumable file transfer.

The protocol (``docs/backends.md``, section ``sync``, has the full description):

1. The sender opens a ``file:sync`` channel to the receiver with metadata
   ``{"name", "size", "sha256", "chunk_size"}`` (``sha256``: lowercase hex of the whole file).
2. The receiver answers ``{"type": "resume", "next_chunk": N}``: ``N`` is 0 for a new file and
   more when it keeps verified chunks of a broken transfer of the same file (same sha256). It
   may instead answer ``done`` at once (it already has the file) or ``error``.
3. For each chunk ``i`` from ``N`` on, the sender sends a JSON header
   ``{"type": "chunk", "index": i, "size": n, "sha256": HEX}`` and then the chunk's ``n``
   bytes as one binary frame. Every chunk is ``chunk_size`` bytes except the last.
4. The receiver checks each chunk against its header's hash and writes it; after the last
   chunk it checks the whole file and answers ``{"type": "done", "sha256": HEX}`` or
   ``{"type": "error", "code": CODE, "detail": TEXT}``.

How this works: the backend is a live relay with flow control like ``stream``: ``admit``
refuses a frame with ``receiver_full`` while the receiver's inbox is full (and the intent is
preemptible, so over its budget a frame is refused with ``throttled``); both are retryable.
On top, a small state machine per channel refuses frames that break the protocol, each with
its own code (``chunk_too_large``, ``chunk_out_of_order``, ...; the channel stays open). A
frame over ``chunk_size`` is refused in ``admit``, before it is chained; the other checks need
the payload, so they run in ``on_frame``: such a frame is in the ledger but is not delivered.
The transfer's progress is kept in ``backend_state`` (``GET /api/mux/channel/{id}``). Once the
receiver's ``done`` or ``error`` is relayed, the channel's task closes the channel with reason
``file_synced`` or the error's code. The node never reads the file's bytes beyond sizes:
hashes are checked by the receiver.

Node options (``[backends.sync]``): ``max_file_bytes`` (refuse larger files with
``file_too_large``; default unlimited) and ``max_chunk_bytes`` (default and upper bound: the
node's ``max_payload_bytes``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard

import attrs
import trio

from mux.errors import BadRequest, ChannelError

from .base import Disposition, relayed

if TYPE_CHECKING:
    from mux.channel import ChannelContext, Draft
    from mux.frames import Frame

__all__ = ["DEFAULT_CHUNK_SIZE", "HEADER_MAX_BYTES", "SyncBackend", "chunk_count", "chunk_length", "valid_file_name"]

DEFAULT_CHUNK_SIZE = 64 << 10
"""The chunk size a sender offers unless told otherwise (64 KiB; ``mux.filesync.send_file``)."""
HEADER_MAX_BYTES = 1024
"""Largest JSON message of the protocol (a chunk header, an answer), in canonical bytes."""

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CODE = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}$")
_SENDER_TYPES = ("chunk",)
_RECEIVER_TYPES = ("resume", "done", "error")


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a ``size``-byte file has (0 for an empty file)."""
    return -(-size // chunk_size)


def chunk_length(index: int, size: int, chunk_size: int) -> int:
    """The length of chunk ``index`` of a ``size``-byte file: ``chunk_size`` but for the last."""
    return max(0, min(chunk_size, size - index * chunk_size))


def valid_file_name(name: object) -> bool:
    """True for a plain file name: 1-255 characters, no path separator, NUL, ``.`` or ``..``."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and name not in (".", "..")
        and not any(c in name for c in "/\\\x00")
    )


@attrs.define(eq=False)
class _Transfer:
    """What the relay tracks of one channel's transfer."""

    size: int
    chunk_size: int
    chunks_total: int
    phase: str = "offered"
    next_index: int = 0
    expect: int | None = None
    """Length of the chunk whose bytes are due next (after its header), else None."""
    close_reason: str = "file_synced"
    finished: trio.Event = attrs.field(factory=trio.Event)
    apply: Callable[[], None] | None = None
    """The progress update of the frame checked last, applied once it is chained."""


class SyncBackend:
    """Relay of ``file:sync`` channels: flow control, protocol checks, progress."""

    name = "sync"

    def __init__(self, mux: Any = None) -> None:
        self.mux = mux
        self._transfers: dict[str, _Transfer] = {}

    # ---- open ------------------------------------------------------------------------------

    def check_open(self, ctx: ChannelContext) -> None:
        """Refuse a channel whose metadata does not describe a file (``bad_metadata``), a file
        over ``max_file_bytes`` (``file_too_large``) or a transfer to the node itself."""
        if ctx.target == ctx.mux.agent:
            raise ChannelError(
                "file:sync needs a receiving agent; the node itself keeps no files", code="destination_refused"
            )
        meta = ctx.metadata
        opts = ctx.options()
        max_payload = int(ctx.mux.config.max_payload_bytes)
        max_chunk = min(int(opts.get("max_chunk_bytes") or max_payload), max_payload)
        name, size, sha, chunk = meta.get("name"), meta.get("size"), meta.get("sha256"), meta.get("chunk_size")
        if not valid_file_name(name):
            raise BadRequest("metadata.name must be a plain file name (no path)", code="bad_metadata")
        if not _is_int(size) or size < 0:
            raise BadRequest("metadata.size must be a non-negative integer", code="bad_metadata")
        if not isinstance(sha, str) or not _HEX64.match(sha):
            raise BadRequest("metadata.sha256 must be 64 lowercase hex digits", code="bad_metadata")
        if not _is_int(chunk) or not 0 < chunk <= max_chunk:
            raise BadRequest(f"metadata.chunk_size must be an integer in 1..{max_chunk}", code="bad_metadata")
        limit = opts.get("max_file_bytes")
        if limit is not None and size > int(limit):
            raise ChannelError(f"{size} bytes is over this node's max_file_bytes={limit}", code="file_too_large")
        total = chunk_count(size, chunk)
        self._transfers[ctx.channel_id] = _Transfer(size=size, chunk_size=chunk, chunks_total=total)
        ctx.state.extra.update(
            {
                "name": name,
                "size": size,
                "sha256": sha,
                "chunk_size": chunk,
                "chunks_total": total,
                "phase": "offered",
                "resumed_from": None,
                "next_chunk": 0,
                "chunks": 0,
                "bytes": 0,
                "bytes_done": 0,
                "refused": 0,
            }
        )

    async def run(self, ctx: ChannelContext) -> None:
        """Wait for the receiver's final answer, then close the channel."""
        t = self._transfers.get(ctx.channel_id)
        if t is None:
            return
        await t.finished.wait()
        await ctx.close(t.close_reason)

    # ---- frames ----------------------------------------------------------------------------

    def admit(self, ctx: ChannelContext, sender: str, size: int) -> None:
        """Refuse a frame over ``chunk_size`` (``chunk_too_large``), an oversized answer
        (``bad_message``), and any frame while the receiver's inbox is full (``receiver_full``)."""
        t = self._transfers.get(ctx.channel_id)
        if t is not None and size > HEADER_MAX_BYTES:
            if sender != ctx.agent:
                raise self._refuse(
                    ctx, "bad_message", f"the receiver's answers are JSON of at most {HEADER_MAX_BYTES} bytes"
                )
            if size > t.chunk_size:
                raise self._refuse(ctx, "chunk_too_large", f"a {size}-byte frame is over chunk_size={t.chunk_size}")
        ctx.require_room(ctx.peer_of(sender))

    def check_frame(self, ctx: ChannelContext, draft: Draft) -> None:
        """Check a frame against the protocol before it is chained (raise to refuse it)."""
        t = self._transfers.get(ctx.channel_id)
        if t is None:
            return
        if draft.sender == ctx.agent:
            t.apply = self._from_sender(ctx, t, draft)
        else:
            t.apply = self._from_receiver(ctx, t, draft)

    def on_frame(self, ctx: ChannelContext, frame: Frame) -> Disposition:
        """Relay the checked frame and track progress."""
        t = self._transfers.get(ctx.channel_id)
        disposition = relayed(ctx, frame)
        if t is not None and t.apply is not None:
            apply, t.apply = t.apply, None
            apply()
        return disposition

    def _from_sender(self, ctx: ChannelContext, t: _Transfer, frame: Draft) -> Callable[[], None]:
        extra = ctx.state.extra
        if t.phase in ("done", "failed"):
            raise self._refuse(ctx, "transfer_finished", f"the transfer is {t.phase}")
        payload = frame.payload
        if isinstance(payload, bytes):
            if t.expect is None:
                raise self._refuse(ctx, "chunk_without_header", "chunk bytes must follow their chunk header")
            if len(payload) != t.expect:
                code = "chunk_too_large" if len(payload) > t.chunk_size else "chunk_size_mismatch"
                raise self._refuse(
                    ctx, code, f"chunk {t.next_index} has {len(payload)} bytes, its header said {t.expect}"
                )

            def chunk_done() -> None:
                t.expect = None
                t.next_index += 1
                extra["chunks"] += 1
                extra["bytes"] += len(payload)
                extra["next_chunk"] = t.next_index
                extra["bytes_done"] = min(t.size, t.next_index * t.chunk_size)
                if t.next_index >= t.chunks_total:
                    t.phase = extra["phase"] = "verifying"

            return chunk_done
        kind = payload.get("type") if isinstance(payload, dict) else None
        if kind not in _SENDER_TYPES:
            raise self._refuse(ctx, "bad_message", f"the sender sends chunk headers and chunk bytes, not {kind!r}")
        if t.phase == "offered":
            raise self._refuse(ctx, "chunk_before_resume", "wait for the receiver's resume answer before chunks")
        if t.expect is not None:
            raise self._refuse(ctx, "chunk_data_expected", f"the bytes of chunk {t.next_index} are due, not a header")
        index, size, sha = payload.get("index"), payload.get("size"), payload.get("sha256")
        if not _is_int(index) or not _is_int(size) or not isinstance(sha, str) or not _HEX64.match(sha):
            raise self._refuse(ctx, "bad_message", "a chunk header is {type, index, size, sha256 (64 hex)}")
        if index != t.next_index:
            raise self._refuse(ctx, "chunk_out_of_order", f"chunk {index} sent, chunk {t.next_index} is due")
        if size > t.chunk_size:
            raise self._refuse(ctx, "chunk_too_large", f"chunk size {size} is over chunk_size={t.chunk_size}")
        want = chunk_length(index, t.size, t.chunk_size)
        if size != want:
            raise self._refuse(ctx, "chunk_size_mismatch", f"chunk {index} must have {want} bytes, not {size}")

        def header_done() -> None:
            t.expect = size

        return header_done

    def _from_receiver(self, ctx: ChannelContext, t: _Transfer, frame: Draft) -> Callable[[], None]:
        extra = ctx.state.extra
        payload = frame.payload
        kind = payload.get("type") if isinstance(payload, dict) else None
        if kind not in _RECEIVER_TYPES:
            raise self._refuse(ctx, "bad_message", f"the receiver answers resume, done or error, not {kind!r}")
        assert isinstance(payload, dict)
        if t.phase in ("done", "failed"):
            raise self._refuse(ctx, "transfer_finished", f"the transfer is {t.phase}")
        if kind == "resume":
            n = payload.get("next_chunk")
            if t.phase != "offered":
                raise self._refuse(ctx, "unexpected_resume", "resume is the receiver's first answer only")
            if not _is_int(n) or not 0 <= n <= t.chunks_total:
                raise self._refuse(ctx, "bad_message", f"next_chunk must be an integer in 0..{t.chunks_total}")

            def resumed() -> None:
                t.next_index = n
                t.phase = extra["phase"] = "transferring" if n < t.chunks_total else "verifying"
                extra["resumed_from"] = extra["next_chunk"] = n
                extra["bytes_done"] = min(t.size, n * t.chunk_size)

            return resumed
        if kind == "done":
            sha = payload.get("sha256")
            if not isinstance(sha, str) or not _HEX64.match(sha):
                raise self._refuse(ctx, "bad_message", "done carries the file's sha256 (64 hex)")

            def done() -> None:
                t.phase = extra["phase"] = "done"
                extra["verified_sha256"] = sha
                extra["verified"] = sha == extra["sha256"]
                extra["bytes_done"] = t.size
                t.close_reason = "file_synced"
                t.finished.set()

            return done
        code = payload.get("code")
        reason = code if isinstance(code, str) and _CODE.match(code) else "sync_error"

        def failed() -> None:
            t.phase = extra["phase"] = "failed"
            extra["error"] = {"code": reason, "detail": str(payload.get("detail") or "")[:200]}
            t.close_reason = reason
            t.finished.set()

        return failed

    def _refuse(self, ctx: ChannelContext, code: str, detail: str) -> BadRequest:
        ctx.state.extra["refused"] = ctx.state.extra.get("refused", 0) + 1
        ctx.state.extra["last_refusal"] = code
        return BadRequest(detail, code=code, channel_id=ctx.channel_id)

    def on_close(self, ctx: ChannelContext, reason: str) -> None:
        """Forget the transfer; an unfinished one is marked ``interrupted``."""
        t = self._transfers.pop(ctx.channel_id, None)
        if t is not None and t.phase not in ("done", "failed"):
            ctx.state.extra["phase"] = "interrupted"
            ctx.state.extra["close_reason"] = reason


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
