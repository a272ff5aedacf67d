"""The client side of ``file:sync``: send a file to an agent, receive files into a directory.

How this works (the wire protocol is in ``backends/sync.py`` and ``docs/backends.md``):

- :func:`send_file` hashes the file, opens a ``file:sync`` channel to the target with
  ``{"name", "size", "sha256", "chunk_size"}``, waits for the receiver's ``resume`` answer,
  then sends, from the chunk the receiver asked for, a JSON header
  ``{"type": "chunk", "index", "size", "sha256"}`` and the chunk's bytes for every chunk.
  ``throttled`` / ``receiver_full`` refusals are waited out and retried (the node's flow
  control); the receiver's ``done`` ends the transfer, its ``error`` raises
  :class:`FileSyncError`.
- :func:`receive_files` serves the ``file:sync`` channels opened to a connection with a
  :class:`FileReceiver`: each chunk is checked against its header's SHA-256 and written into
  a partial file ``DIR/.mux-partial/<sha256>.part`` (fsync), then a small progress record
  ``<sha256>.json`` (``verified_bytes``) is replaced. After the last chunk the whole file's
  hash is checked and the partial file is renamed to ``DIR/<name>`` (atomic; the directory is
  fsynced; an existing file of that name is replaced). A broken transfer leaves the partial
  file and its record, so a new channel for the same file (same sha256) is answered with
  ``{"type": "resume", "next_chunk": N}`` and only the missing chunks travel again.

Both sides report progress through an optional callback taking a :class:`Progress`, and end
with a :class:`SyncResult` (bytes, seconds, MB/s, sha256, verified).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import attrs
import orjson
import trio

from backends.sync import DEFAULT_CHUNK_SIZE, chunk_count, chunk_length, valid_file_name

from .client import ClientChannel, MuxConnection
from .errors import ChannelClosed, ChannelThrottled, MuxError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "INTENT",
    "PARTIAL_DIR",
    "FileReceiver",
    "FileSyncError",
    "Progress",
    "ProgressCallback",
    "SyncResult",
    "file_sha256",
    "receive_files",
    "send_file",
]

log = logging.getLogger("mux.filesync")

INTENT = "file:sync"
"""The intent of file transfer channels."""
PARTIAL_DIR = ".mux-partial"
"""Sub-directory of the receiving directory holding partial files and progress records."""
_HASH_BLOCK = 1 << 20


class FileSyncError(MuxError):
    """A transfer failed; ``code`` is the receiver's (or the relay's) error code."""

    code = "sync_error"


@attrs.frozen
class Progress:
    """One progress report: ``done_bytes`` of ``size`` are sent (sender) or verified (receiver)."""

    direction: str
    """``"send"`` or ``"receive"``."""
    channel_id: str
    name: str
    size: int
    sha256: str
    done_bytes: int
    next_chunk: int
    chunks_total: int
    resumed_from: int
    """The chunk this channel started from (0 unless resumed)."""

    @property
    def fraction(self) -> float:
        """Done share, 0.0-1.0 (1.0 for an empty file)."""
        return self.done_bytes / self.size if self.size else 1.0


ProgressCallback = Callable[[Progress], None]
"""Called (synchronously, keep it quick) after every chunk."""


@attrs.frozen
class SyncResult:
    """The outcome of one transfer, on either side."""

    direction: str
    channel_id: str
    name: str
    size: int
    sha256: str
    seconds: float
    bytes_transferred: int
    """Chunk bytes that travelled on this channel (less than ``size`` after a resume)."""
    chunks_transferred: int
    chunks_total: int
    resumed_from: int
    verified: bool
    """True when the receiver's whole-file SHA-256 equals the announced one."""
    path: str | None = None
    """Where the receiver stored the file (receiver side)."""
    already: bool = False
    """The receiver already had the file; nothing travelled."""
    error: str | None = None
    """Error code when the transfer failed (``interrupted`` when the channel just closed)."""

    @property
    def mb_per_s(self) -> float:
        """Transferred megabytes (10^6 bytes) per second."""
        return self.bytes_transferred / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One human line: name, bytes, seconds, MB/s, sha256, verified."""
        verb = "sent" if self.direction == "send" else "received"
        extra = ""
        if self.resumed_from:
            extra = f", resumed at chunk {self.resumed_from}/{self.chunks_total}"
        if self.already:
            extra = ", already present"
        if self.error:
            extra += f", error {self.error}"
        return (
            f"{verb} {self.name}: {self.size} bytes ({self.bytes_transferred} transferred) in {self.seconds:.2f} s, "
            f"{self.mb_per_s:.2f} MB/s, sha256 {self.sha256}, verified {'yes' if self.verified else 'NO'}{extra}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON object (with ``mb_per_s``)."""
        return {**attrs.asdict(self), "mb_per_s": round(self.mb_per_s, 3)}


def file_sha256(path: str | os.PathLike[str]) -> tuple[int, str]:
    """Size and lowercase hex SHA-256 of a file (blocking; run it in a thread from async code)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


# ---- helpers shared by both sides -----------------------------------------------------------


async def _send(ch: ClientChannel, payload: Any, rate: int) -> dict[str, Any]:
    """Send one payload, waiting out ``throttled`` (budget) and ``receiver_full`` refusals."""
    backoff = 0.005
    while True:
        try:
            return await ch.send(payload)
        except ChannelThrottled as exc:
            if exc.code == "throttled" and rate > 0:
                size = len(payload) if isinstance(payload, bytes) else 256
                wait = min(1.0, max(0.005, size / rate))
            else:
                wait, backoff = backoff, min(backoff * 2, 0.25)
            await trio.sleep(wait)


def _ended(exc: BaseException) -> bool:
    """True for a send refused because the transfer ended under it: the channel closed, the
    connection is gone, or the receiver already answered (``transfer_finished``)."""
    return isinstance(exc, ChannelClosed) or (
        isinstance(exc, MuxError) and exc.code in ("connection_closed", "transfer_finished")
    )


async def _next_message(ch: ClientChannel) -> dict[str, Any] | None:
    """The next JSON message on ``ch`` (binary frames are skipped); None once it closed."""
    while True:
        try:
            frame = await ch.receive()
        except ChannelClosed:
            return None
        payload = frame.get("payload")
        if isinstance(payload, dict):
            return payload
        log.warning("file:sync %s: unexpected %s frame skipped", ch.id, type(payload).__name__)


def _closed_error(ch: ClientChannel, waiting_for: str) -> FileSyncError:
    return FileSyncError(
        f"the channel closed ({ch.closed_reason}) while waiting for {waiting_for}", code="interrupted", channel_id=ch.id
    )


def _receiver_error(ch: ClientChannel, answer: dict[str, Any]) -> FileSyncError:
    code = answer.get("code")
    return FileSyncError(
        f"the receiver refused the file: {answer.get('detail') or code}",
        code=code if isinstance(code, str) and code else "sync_error",
        channel_id=ch.id,
    )


# ---- sending ----------------------------------------------------------------------------------


class _Reader:
    """Blocking reads of one file, meant to run in a worker thread."""

    def __init__(self, path: Path) -> None:
        self._fh: IO[bytes] = open(path, "rb")  # closed by close()

    def read(self, offset: int, length: int) -> tuple[bytes, str]:
        self._fh.seek(offset)
        data = self._fh.read(length)
        return data, hashlib.sha256(data).hexdigest()

    def close(self) -> None:
        self._fh.close()


async def send_file(
    conn: MuxConnection,
    target: str,
    path: str | os.PathLike[str],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    name: str | None = None,
    progress: ProgressCallback | None = None,
    answer_timeout: float = 30.0,
) -> SyncResult:
    """Send the file at ``path`` to ``target`` over a new ``file:sync`` channel.

    The receiver may resume a broken transfer of the same file: only the chunks it does not
    hold yet are sent. Returns once the receiver answered ``done`` (its whole-file hash
    compared in ``SyncResult.verified``). Raises :class:`FileSyncError` with the receiver's
    code when it refuses (``chunk_hash_mismatch``, ``file_hash_mismatch``, ...), with code
    ``interrupted`` when the channel closes first and ``timeout`` when the receiver stays
    silent for ``answer_timeout`` seconds (before the first chunk or after the last one); the
    relay's own refusals (``chunk_too_large``, ...) raise as :class:`MuxError`.
    """
    file = Path(path)
    size, sha = await trio.to_thread.run_sync(file_sha256, file)
    name = name or file.name
    meta = {"name": name, "size": size, "sha256": sha, "chunk_size": chunk_size}
    started = trio.current_time()
    ch = await conn.open(target, INTENT, meta)
    total = chunk_count(size, chunk_size)
    rate = int(ch.policy.get("rate") or 0)
    sent = {"chunks": 0, "bytes": 0}
    finished = False

    def result(resumed: int, verified: bool, *, already: bool = False) -> SyncResult:
        return SyncResult(
            direction="send",
            channel_id=ch.id,
            name=name,
            size=size,
            sha256=sha,
            seconds=trio.current_time() - started,
            bytes_transferred=sent["bytes"],
            chunks_transferred=sent["chunks"],
            chunks_total=total,
            resumed_from=resumed,
            verified=verified,
            already=already,
        )

    try:
        with trio.move_on_after(answer_timeout) as waited:
            first = await _next_message(ch)
        if waited.cancelled_caught:
            raise FileSyncError(f"no answer from {target} within {answer_timeout} s", code="timeout", channel_id=ch.id)
        if first is None:
            raise _closed_error(ch, "the receiver's answer")
        kind = first.get("type")
        if kind == "done":
            finished = True
            return result(total, first.get("sha256") == sha, already=True)
        if kind == "error":
            raise _receiver_error(ch, first)
        start = first.get("next_chunk")
        if kind != "resume" or not isinstance(start, int) or not 0 <= start <= total:
            raise FileSyncError(f"unexpected answer {first!r:.200}", code="bad_answer", channel_id=ch.id)

        failure: BaseException | None = None
        final: dict[str, Any] | None = None
        reader = await trio.to_thread.run_sync(_Reader, file)
        try:
            async with trio.open_nursery() as nursery:

                async def pump() -> None:
                    nonlocal failure
                    try:
                        for index in range(start, total):
                            length = chunk_length(index, size, chunk_size)
                            data, chunk_sha = await trio.to_thread.run_sync(reader.read, index * chunk_size, length)
                            if len(data) != length:
                                raise FileSyncError(f"{file} changed while being sent", code="file_changed")
                            header = {"type": "chunk", "index": index, "size": length, "sha256": chunk_sha}
                            await _send(ch, header, rate)
                            await _send(ch, data, rate)
                            sent["chunks"] += 1
                            sent["bytes"] += length
                            if progress is not None:
                                done = min(size, (index + 1) * chunk_size)
                                progress(Progress("send", ch.id, name, size, sha, done, index + 1, total, start))
                        await trio.sleep(answer_timeout)
                        failure = FileSyncError(
                            f"no answer from {target} within {answer_timeout} s after the last chunk",
                            code="timeout",
                            channel_id=ch.id,
                        )
                    except MuxError as exc:
                        failure = exc
                        if _ended(exc):
                            return  # the receiver's answer (or the close) still reaches the main task
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump)
                final = await _next_message(ch)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(reader.close)
        if final is not None and final.get("type") == "error":
            raise _receiver_error(ch, final)
        if failure is not None and not _ended(failure):
            raise failure
        if final is None:
            raise _closed_error(ch, "the receiver's done")
        if final.get("type") != "done":
            raise FileSyncError(f"unexpected answer {final!r:.200}", code="bad_answer", channel_id=ch.id)
        finished = True
        return result(start, final.get("sha256") == sha)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await ch.close("file_sent" if finished else "cancelled")
            except MuxError:
                pass  # already closed by the relay (file_synced) or the connection is gone


# ---- receiving --------------------------------------------------------------------------------


class _Partial:
    """The receiver's partial file and progress record for one sha256 (blocking methods)."""

    def __init__(self, directory: Path, sha: str) -> None:
        self.dir = directory / PARTIAL_DIR
        self.part = self.dir / f"{sha}.part"
        self.record = self.dir / f"{sha}.json"
        self.fh: IO[bytes] | None = None

    def load(self, name: str, size: int, sha: str, chunk_size: int, total: int) -> tuple[int, Any]:
        """Open the partial file; return (next chunk needed, hash object over the verified prefix)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        verified = 0
        try:
            rec = orjson.loads(self.record.read_bytes())
            if (
                isinstance(rec, dict)
                and rec.get("sha256") == sha
                and rec.get("size") == size
                and isinstance(rec.get("verified_bytes"), int)
                and 0 <= rec["verified_bytes"] <= size
                and self.part.stat().st_size >= rec["verified_bytes"]
            ):
                verified = rec["verified_bytes"]
        except (OSError, orjson.JSONDecodeError):
            verified = 0
        next_chunk = total if verified >= size else verified // chunk_size
        keep = min(size, next_chunk * chunk_size)
        self.fh = open(self.part, "r+b" if keep else "w+b")  # closed by close()
        self.fh.truncate(keep)
        digest = hashlib.sha256()
        self.fh.seek(0)
        left = keep
        while left:
            block = self.fh.read(min(_HASH_BLOCK, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
        self._save(name, size, sha, keep)
        return next_chunk, digest

    def _save(self, name: str, size: int, sha: str, verified: int) -> None:
        tmp = self.record.with_suffix(".json.tmp")
        tmp.write_bytes(orjson.dumps({"v": 1, "name": name, "size": size, "sha256": sha, "verified_bytes": verified}))
        os.replace(tmp, self.record)

    def write(self, offset: int, data: bytes, name: str, size: int, sha: str) -> None:
        """Write a verified chunk, make it durable, then move the record past it."""
        assert self.fh is not None
        self.fh.seek(offset)
        self.fh.write(data)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self._save(name, size, sha, offset + len(data))

    def commit(self, final: Path) -> None:
        """Rename the complete partial file to ``final`` atomically; drop the record."""
        assert self.fh is not None
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.fh = None
        os.replace(self.part, final)
        _fsync_dir(final.parent)
        self.record.unlink(missing_ok=True)
        self._tidy()

    def discard(self) -> None:
        """Drop the partial file and its record (the data cannot be right)."""
        self.close()
        self.part.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)
        self._tidy()

    def close(self) -> None:
        """Close the partial file (it and its record stay for a resume)."""
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    def _tidy(self) -> None:
        try:
            self.dir.rmdir()  # only when empty
        except OSError:
            pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _same_file(path: Path, size: int, sha: str) -> bool:
    try:
        if not path.is_file() or path.stat().st_size != size:
            return False
        return file_sha256(path)[1] == sha
    except OSError:
        return False


class _Refused(Exception):
    """Internal: answer the sender with ``error`` ``code`` and stop."""

    def __init__(self, code: str, detail: str, **fields: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.fields = fields


@attrs.define(eq=False)
class FileReceiver:
    """Receives ``file:sync`` channels into ``directory`` (see the module docstring)."""

    directory: Path = attrs.field(converter=Path)
    progress: ProgressCallback | None = None
    _locks: dict[str, trio.Lock] = attrs.field(factory=dict, init=False)

    async def serve(self, ch: ClientChannel) -> SyncResult:
        """Receive the file offered on ``ch``; return the result (``error`` set on failure).

        Transfers of the same file (same sha256) are served one after the other, so a resume
        sees what the broken transfer had verified.
        """
        started = trio.current_time()
        meta = ch.metadata
        name = meta.get("name")
        size = meta.get("size")
        sha = meta.get("sha256")
        chunk_size = meta.get("chunk_size")
        if not (
            valid_file_name(name)
            and name != PARTIAL_DIR
            and isinstance(size, int)
            and size >= 0
            and isinstance(sha, str)
            and len(sha) == 64
            and isinstance(chunk_size, int)
            and chunk_size > 0
        ):
            await self._answer(ch, {"type": "error", "code": "bad_metadata", "detail": "not a file:sync offer"})
            return self._result(ch, started, str(name), 0, str(sha), 0, 0, 0, 0, False, error="bad_metadata")
        assert isinstance(name, str) and isinstance(size, int) and isinstance(sha, str)
        assert isinstance(chunk_size, int)
        total = chunk_count(size, chunk_size)
        lock = self._locks.setdefault(sha, trio.Lock())
        try:
            async with lock:
                return await self._receive(ch, started, name, size, sha, chunk_size, total)
        finally:
            if not lock.statistics().tasks_waiting and not lock.locked():
                self._locks.pop(sha, None)

    async def _receive(
        self, ch: ClientChannel, started: float, name: str, size: int, sha: str, chunk_size: int, total: int
    ) -> SyncResult:
        final = self.directory / name
        if await trio.to_thread.run_sync(_same_file, final, size, sha):
            await self._answer(ch, {"type": "done", "sha256": sha, "bytes": size, "already": True})
            return self._result(ch, started, name, size, sha, 0, 0, total, total, True, path=final, already=True)
        partial = _Partial(self.directory, sha)
        got = {"chunks": 0, "bytes": 0}
        start = 0
        try:
            try:
                start, digest = await trio.to_thread.run_sync(partial.load, name, size, sha, chunk_size, total)
            except OSError as exc:
                raise _Refused("write_failed", f"cannot open the partial file: {exc}") from exc
            await self._answer(ch, {"type": "resume", "next_chunk": start})
            for index in range(start, total):
                header = await _next_frame(ch)
                if header is None:
                    break
                want = chunk_length(index, size, chunk_size)
                if not (
                    isinstance(header, dict)
                    and header.get("type") == "chunk"
                    and header.get("index") == index
                    and header.get("size") == want
                    and isinstance(header.get("sha256"), str)
                ):
                    raise _Refused("protocol_error", f"expected the header of chunk {index}", next_chunk=index)
                data = await _next_frame(ch)
                if data is None:
                    break
                if not isinstance(data, bytes) or len(data) != want:
                    raise _Refused("protocol_error", f"expected the {want} bytes of chunk {index}", next_chunk=index)
                if hashlib.sha256(data).hexdigest() != header["sha256"]:
                    raise _Refused(
                        "chunk_hash_mismatch",
                        f"chunk {index}: its bytes do not match the sha256 of its header",
                        index=index,
                        next_chunk=index,
                    )
                try:
                    await trio.to_thread.run_sync(partial.write, index * chunk_size, data, name, size, sha)
                except OSError as exc:
                    raise _Refused("write_failed", f"cannot write chunk {index}: {exc}", next_chunk=index) from exc
                digest.update(data)
                got["chunks"] += 1
                got["bytes"] += len(data)
                if self.progress is not None:
                    done = min(size, (index + 1) * chunk_size)
                    self.progress(Progress("receive", ch.id, name, size, sha, done, index + 1, total, start))
            else:
                if digest.hexdigest() != sha:
                    await trio.to_thread.run_sync(partial.discard)
                    raise _Refused("file_hash_mismatch", "the whole file's sha256 differs from the announced one")
                try:
                    await trio.to_thread.run_sync(partial.commit, final)
                except OSError as exc:
                    raise _Refused("write_failed", f"cannot store {final}: {exc}") from exc
                await self._answer(ch, {"type": "done", "sha256": sha, "bytes": size})
                return self._result(
                    ch, started, name, size, sha, got["bytes"], got["chunks"], total, start, True, path=final
                )
            return self._result(
                ch, started, name, size, sha, got["bytes"], got["chunks"], total, start, False, error="interrupted"
            )
        except _Refused as refused:
            await self._answer(ch, {"type": "error", "code": refused.code, "detail": refused.detail, **refused.fields})
            return self._result(
                ch, started, name, size, sha, got["bytes"], got["chunks"], total, start, False, error=refused.code
            )
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(partial.close)

    async def _answer(self, ch: ClientChannel, message: dict[str, Any]) -> None:
        try:
            with trio.fail_after(30):
                await _send(ch, message, 0)
        except (MuxError, trio.TooSlowError) as exc:
            log.info("file:sync %s: could not answer %s: %s", ch.id, message.get("type"), exc)

    def _result(
        self,
        ch: ClientChannel,
        started: float,
        name: str,
        size: int,
        sha: str,
        nbytes: int,
        chunks: int,
        total: int,
        resumed: int,
        verified: bool,
        *,
        path: Path | None = None,
        already: bool = False,
        error: str | None = None,
    ) -> SyncResult:
        return SyncResult(
            direction="receive",
            channel_id=ch.id,
            name=name,
            size=size,
            sha256=sha,
            seconds=trio.current_time() - started,
            bytes_transferred=nbytes,
            chunks_transferred=chunks,
            chunks_total=total,
            resumed_from=resumed,
            verified=verified,
            path=str(path) if path is not None else None,
            already=already,
            error=error,
        )


async def _next_frame(ch: ClientChannel) -> Any:
    """The next frame's payload (a dict or bytes); None once the channel closed."""
    try:
        frame = await ch.receive()
    except ChannelClosed:
        return None
    return frame.get("payload")


async def receive_files(
    conn: MuxConnection,
    directory: str | os.PathLike[str],
    *,
    count: int | None = None,
    progress: ProgressCallback | None = None,
    on_file: Callable[[SyncResult], None] | None = None,
) -> list[SyncResult]:
    """Serve the ``file:sync`` channels opened to ``conn``'s agent, storing files in ``directory``.

    Returns after ``count`` files were received and verified (``None``: until the connection
    ends or the caller cancels). Every finished channel, failed ones included, is reported to
    ``on_file`` and listed in the returned results. Channels of other intents are closed
    with reason ``unsupported_intent``.
    """
    root = Path(directory)
    await trio.to_thread.run_sync(lambda: root.mkdir(parents=True, exist_ok=True))
    receiver = FileReceiver(root, progress)
    results: list[SyncResult] = []
    received = 0
    async with trio.open_nursery() as nursery:

        async def serve(ch: ClientChannel) -> None:
            nonlocal received
            res = await receiver.serve(ch)
            results.append(res)
            if on_file is not None:
                on_file(res)
            if res.verified:
                received += 1
                if count is not None and received >= count:
                    nursery.cancel_scope.cancel()

        async for ch in conn.incoming():
            if ch.intent != INTENT and not ch.intent.startswith(INTENT + ":"):
                with trio.move_on_after(5):
                    try:
                        await ch.close("unsupported_intent")
                    except MuxError:
                        pass
                continue
            nursery.start_soon(serve, ch)
    return results
