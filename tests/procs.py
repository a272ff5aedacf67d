"""A real node as a subprocess (``python -m mux serve``), for restart and kill tests."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

__all__ = ["NodeProcess", "node_process"]


@attrs.define
class NodeProcess:
    """A running node: its process, base URL and public key."""

    process: trio.Process
    url: str
    public_key: str

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM: graceful shutdown."""
        self.process.send_signal(signal.SIGTERM)


@asynccontextmanager
async def node_process(
    data_dir: Path,
    *extra: str,
    timeout: float = 20.0,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    open_files: tuple[int, int] | None = None,
) -> AsyncIterator[NodeProcess]:
    """Start ``python -m mux serve`` on a free loopback port; yield once it listens. ``env``
    is added to this process's environment; with ``log``, the node's log (stderr) goes there;
    ``open_files`` (soft, hard) is the node's ``RLIMIT_NOFILE`` at its start."""
    args = [sys.executable, "-m", "mux", "serve", "--host", "127.0.0.1", "--port", "0", "--agent", "node", "--open"]
    args += ["--data-dir", str(data_dir), *extra]
    stderr = os.open(log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        process = await trio.lowlevel.open_process(
            args,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, **(env or {})},
            preexec_fn=None if open_files is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, open_files),
        )
    finally:
        os.close(stderr)  # the node has its own copy
    assert process.stdout is not None
    try:
        buf = b""
        url = key = ""
        with trio.fail_after(timeout):
            while not (url and key):
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"node exited early: {buf.decode(errors='replace')}")
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    if "listening on" in line:
                        url = next(w for w in line.split() if w.startswith("http")).rstrip(",")
                    if line.startswith("public key "):
                        key = line.split()[-1]
        yield NodeProcess(process, url, key)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(10):
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()
