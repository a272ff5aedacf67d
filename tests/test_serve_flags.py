"""``python -m mux serve --sign-every N --sign-within-ms MS``: a real node subprocess signs
every N-th data frame of a channel, and its exported chain verifies. And what ``serve``
imports: the node, not the client side (a fifth of a second of start-up); each command-line
module imports on its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest

import mux
from mux.cli import build_parser

from .procs import node_process


async def _signed_data_seqs(url: str, public_key: str) -> tuple[list[int], list[int], mux.ChainReport]:
    """Open alice -> bob over REST, send 8 frames, export the chain: (seqs of signed data
    frames, seqs of all data frames, the verified chain's report)."""
    async with httpx.AsyncClient(base_url=url + "/api/mux", timeout=10) as c:
        opened = await c.post("/open", json={"agent": "alice", "target": "bob", "intent": "stream"})
        cid = opened.json()["channel_id"]
        for i in range(8):
            sent = await c.post("/send", json={"agent": "alice", "channel_id": cid, "payload": {"i": i}})
            assert sent.status_code == 200, sent.text
        exported = await c.get(f"/channel/{cid}/chain", params={"agent": "alice"})
    frames = [orjson.loads(line) for line in exported.content.splitlines()]
    report = mux.verify_chain(frames, public_key)  # the key the node printed when it started
    data = [f for f in frames if f["kind"] == "data"]
    assert frames[0]["kind"] == "open" and frames[0]["sig"]  # open frames are always signed
    return [f["seq"] for f in data if f["sig"]], [f["seq"] for f in data], report


@pytest.mark.parametrize(
    ("flags", "signed"),
    [((), [1, 2, 3, 4, 5, 6, 7, 8]), (("--sign-every", "4", "--sign-within-ms", "600000"), [4, 8])],
    ids=["default", "every-4"],
)
async def test_serve_signs_every_nth_data_frame(tmp_path: Path, flags: tuple[str, ...], signed: list[int]) -> None:
    async with node_process(tmp_path, "--memory", *flags) as node:
        signed_seqs, data_seqs, report = await _signed_data_seqs(node.url, node.public_key)
    assert data_seqs == [1, 2, 3, 4, 5, 6, 7, 8]
    assert signed_seqs == signed
    assert report.frames == 9 and report.last_seq == 8


@pytest.mark.parametrize("flag", ["--sign-every", "--sign-within-ms"])
@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_serve_refuses_a_count_below_one(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", flag, value])
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("module", ["mux.cli", "mux.cli_remote", "mux.cli_files", "mux.cli_net"])
def test_each_command_line_module_imports_on_its_own(module: str) -> None:
    """The verbs' modules register with ``mux.cli`` and ``mux.cli`` imports them: any of them
    imported first (as a plugin or a test might) must not meet a half-made other."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_serve_imports_none_of_the_client_side() -> None:
    """``python -m mux serve`` imports what the node needs: not the client, the file
    transfer or the HTTP client (httpx brings its own command line, rich and pygments),
    which cost the node's start-up a fifth of a second."""
    code = (
        "import sys, mux.cli, mux.server, mux.config; mux.cli.build_parser().parse_args(['serve']);"
        " print(sorted(m for m in ('httpx', 'mux.client', 'mux.filesync', 'mux.rest_client', 'rich')"
        " if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
