"""file:sync end to end on a real node: mux.filesync (send_file / receive_files), the sync
backend's protocol checks and progress, resume after a broken transfer, and the CLI verbs."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import trio

from mux.client import MuxClient, MuxConnection, connect
from mux.errors import MuxError
from mux.filesync import PARTIAL_DIR, Progress, SyncResult, receive_files, send_file
from mux.server import ServeInfo

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking client call off the Trio thread (the node runs on it)."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_file(path: Path, size: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    path.write_bytes(data)
    return data


@asynccontextmanager
async def agent(url: str, name: str) -> AsyncIterator[MuxConnection]:
    """Connect ``name``, retrying while the node still holds its previous connection."""
    for _ in range(100):
        try:
            async with connect(url, name) as conn:
                yield conn
                return
        except MuxError as exc:
            if exc.code != "agent_attached":
                raise
        await trio.sleep(0.02)
    raise AssertionError(f"{name} stayed attached")


async def channel_info(url: str, who: str, channel_id: str) -> dict[str, Any]:
    with MuxClient(url, who) as rest:
        return await in_thread(rest.channel, channel_id)


async def test_three_mib_file_arrives_byte_exact(server: ServeInfo, tmp_path: Path) -> None:
    src = tmp_path / "out" / "blob.bin"
    data = make_file(src, 3 << 20)
    dest = tmp_path / "in"
    sent: list[Progress] = []
    got: list[Progress] = []
    received: list[SyncResult] = []
    with trio.fail_after(30):
        async with agent(server.url, "bob") as bob, agent(server.url, "alice") as alice:
            async with trio.open_nursery() as nursery:

                async def rx() -> None:
                    received.extend(await receive_files(bob, dest, count=1, progress=got.append))

                nursery.start_soon(rx)
                res = await send_file(alice, "bob", src, progress=sent.append)
            info = await channel_info(server.url, "alice", res.channel_id)

    assert (dest / "blob.bin").read_bytes() == data
    assert sorted(os.listdir(dest)) == ["blob.bin"]  # no temp file, no partial directory left
    assert res.verified and res.sha256 == sha(data) and res.size == 3 << 20
    assert (res.chunks_total, res.chunks_transferred, res.resumed_from) == (48, 48, 0)
    assert res.bytes_transferred == 3 << 20 and res.mb_per_s > 0
    assert "verified yes" in res.summary() and sha(data) in res.summary()
    [rres] = received
    assert rres.verified and rres.path == str(dest / "blob.bin") and rres.chunks_transferred == 48
    assert [p.done_bytes for p in sent] == [min(3 << 20, (i + 1) * 65536) for i in range(48)]
    assert got[-1].done_bytes == 3 << 20 and got[-1].fraction == 1.0
    # the relay's view: progress in backend_state, closed by the backend after done
    state = info["backend_state"]
    assert info["state"] == "closed" and info["close_reason"] == "file_synced"
    assert state["phase"] == "done" and state["verified"] is True and state["verified_sha256"] == sha(data)
    assert (state["chunks"], state["bytes"], state["chunks_total"], state["resumed_from"]) == (48, 3 << 20, 48, 0)
    assert state["refused"] == 0


async def test_protocol_checks_and_corrupted_chunk(server: ServeInfo, tmp_path: Path) -> None:
    data = os.urandom(2048 + 100)
    dest = tmp_path / "in"
    results: list[SyncResult] = []
    meta = {"name": "x.bin", "size": len(data), "sha256": sha(data), "chunk_size": 1024}
    with trio.fail_after(20):
        async with agent(server.url, "bob") as bob, agent(server.url, "alice") as alice:
            async with trio.open_nursery() as nursery:
                # the relay refuses a malformed offer
                with pytest.raises(MuxError) as bad:
                    await alice.open("bob", "file:sync", {**meta, "name": "../evil"})
                assert bad.value.code == "bad_metadata"
                with pytest.raises(MuxError) as bad:
                    await alice.open("bob", "file:sync", {**meta, "chunk_size": 0})
                assert bad.value.code == "bad_metadata"

                ch = await alice.open("bob", "file:sync", meta)
                with pytest.raises(MuxError) as early:  # before the receiver's resume
                    await ch.send({"type": "chunk", "index": 0, "size": 1024, "sha256": sha(data[:1024])})
                assert early.value.code == "chunk_before_resume"
                nursery.start_soon(functools.partial(receive_files, bob, dest, count=1, on_file=results.append))
                first = await ch.receive()
                assert first["payload"] == {"type": "resume", "next_chunk": 0}

                async def refused(payload: Any) -> str:
                    with pytest.raises(MuxError) as exc:
                        await ch.send(payload)
                    return exc.value.code

                assert await refused(b"\0" * 2048) == "chunk_too_large"  # over chunk_size
                assert await refused(data[:1024]) == "chunk_without_header"
                assert await refused({"type": "chunk", "index": 1, "size": 1024, "sha256": "0" * 64}) == (
                    "chunk_out_of_order"
                )
                assert await refused({"type": "chunk", "index": 0, "size": 4096, "sha256": "0" * 64}) == (
                    "chunk_too_large"
                )
                assert await refused({"type": "chunk", "index": 0, "size": 1000, "sha256": "0" * 64}) == (
                    "chunk_size_mismatch"
                )
                assert await refused({"type": "bogus"}) == "bad_message"

                # chunk 0 right, chunk 1 with a wrong hash: the receiver refuses it and says why
                await ch.send({"type": "chunk", "index": 0, "size": 1024, "sha256": sha(data[:1024])})
                assert await refused({"type": "chunk", "index": 0, "size": 1024, "sha256": "0" * 64}) == (
                    "chunk_data_expected"
                )
                assert await refused(data[:1000]) == "chunk_size_mismatch"
                await ch.send(data[:1024])
                await ch.send({"type": "chunk", "index": 1, "size": 1024, "sha256": "ab" * 32})
                await ch.send(data[1024:2048])
                answer = await ch.receive()
                assert answer["payload"]["type"] == "error"
                assert answer["payload"]["code"] == "chunk_hash_mismatch"
                assert (answer["payload"]["index"], answer["payload"]["next_chunk"]) == (1, 1)
                assert [f async for f in ch] == []  # then the relay closes the channel
                assert ch.closed_reason == "chunk_hash_mismatch"
                info = await channel_info(server.url, "bob", ch.id)
                state = info["backend_state"]
                assert state["phase"] == "failed" and state["error"]["code"] == "chunk_hash_mismatch"
                assert (state["chunks"], state["refused"]) == (2, 9)
                assert not (dest / "x.bin").exists()

                # the verified chunk 0 was kept: a new transfer of the same file resumes at 1
                src = tmp_path / "x.bin"
                src.write_bytes(data)
                res = await send_file(alice, "bob", src, chunk_size=1024)
                assert res.verified and (res.resumed_from, res.chunks_transferred, res.chunks_total) == (1, 2, 3)

    assert (dest / "x.bin").read_bytes() == data
    assert [r.error for r in results] == ["chunk_hash_mismatch", None]
    assert not (dest / PARTIAL_DIR).exists()


async def test_interrupted_transfer_resumes(server: ServeInfo, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    data = make_file(src, 1 << 20)
    dest = tmp_path / "in"
    chunk = 32 << 10
    results: list[SyncResult] = []
    with trio.fail_after(30):
        async with agent(server.url, "bob") as bob, trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(receive_files, bob, dest, count=1, on_file=results.append))

            async with agent(server.url, "alice") as alice:
                with trio.CancelScope() as cut:

                    def progress(p: Progress) -> None:
                        if p.next_chunk == 10:
                            cut.cancel()  # the sender dies after its 10th chunk

                    await send_file(alice, "bob", src, chunk_size=chunk, progress=progress)
                assert cut.cancelled_caught
            # the receiver keeps the verified chunks and a progress record keyed by sha256
            async with agent(server.url, "alice") as alice:
                res = await send_file(alice, "bob", src, chunk_size=chunk)

    assert res.verified and res.resumed_from == 10
    assert res.chunks_transferred == 22 < res.chunks_total == 32
    assert res.bytes_transferred == 22 * chunk
    assert (dest / "big.bin").read_bytes() == data
    assert sorted(os.listdir(dest)) == ["big.bin"]
    first, second = results
    assert first.error == "interrupted" and first.chunks_transferred == 10 and not first.verified
    assert second.verified and second.resumed_from == 10 and second.chunks_transferred == 22


async def run_cli(*args: str, timeout: float = 25) -> subprocess.CompletedProcess[bytes]:
    """``python -m mux ARGS`` as a subprocess (the in-process node keeps serving meanwhile)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MUX_AGENT", None)
    with trio.fail_after(timeout):
        return await trio.run_process(
            [sys.executable, "-m", "mux", *args], capture_stdout=True, capture_stderr=True, check=False, env=env
        )


async def test_cli_send_and_receive(server: ServeInfo, tmp_path: Path) -> None:
    src = tmp_path / "report.dat"
    data = make_file(src, 700_000)
    dest = tmp_path / "inbox"
    procs: dict[str, subprocess.CompletedProcess[bytes]] = {}
    async with trio.open_nursery() as nursery:

        async def rx() -> None:
            procs["rx"] = await run_cli(
                "receive-files", "--url", server.url, "--agent", "bob", "--dir", str(dest), "--count", "1",
                "--seconds", "20",
            )  # fmt: skip

        nursery.start_soon(rx)
        procs["tx"] = await run_cli(
            "send-file", "--url", server.url, "--agent", "alice", "--to", "bob", str(src), "--json",
            "--chunk-size", "100000", "--answer-timeout", "20",
        )  # fmt: skip

    tx, rx_proc = procs["tx"], procs["rx"]
    assert tx.returncode == 0, tx.stderr.decode()
    assert rx_proc.returncode == 0, rx_proc.stderr.decode()
    sent = orjson.loads(tx.stdout)
    assert sent["verified"] is True and sent["sha256"] == sha(data) and sent["size"] == 700_000
    assert sent["chunks_total"] == 7 and sent["mb_per_s"] > 0
    assert "send report.dat" in tx.stderr.decode()  # the progress bar
    lines = rx_proc.stdout.decode().splitlines()
    assert lines[0].startswith("receiving files as bob")
    assert any(
        line.startswith("received report.dat: 700000 bytes") and "verified yes" in line and sha(data) in line
        for line in lines
    )
    assert lines[-1].startswith("received 1 file(s) verified, 700000 bytes")
    assert (dest / "report.dat").read_bytes() == data
    assert sorted(os.listdir(dest)) == ["report.dat"]
