"""The remote CLI verbs (``python -m mux status/open/send/channels/close/listen``) as subprocesses.

Each command runs with ``trio.run_process`` so the in-process node keeps serving while the
subprocess talks to it.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from typing import Any

import orjson
import trio

from mux.client import MuxClient
from mux.server import ServeInfo


async def run_cli(*args: str, timeout: float = 15) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m mux ARGS`` to completion (bounded) and capture its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MUX_AGENT", None)
    with trio.fail_after(timeout):
        return await trio.run_process(
            [sys.executable, "-m", "mux", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )


def out(proc: subprocess.CompletedProcess[bytes]) -> str:
    return proc.stdout.decode()


def as_json(proc: subprocess.CompletedProcess[bytes]) -> Any:
    assert proc.returncode == 0, proc.stderr.decode()
    return orjson.loads(proc.stdout)


async def test_status_human_and_json(server: ServeInfo) -> None:
    human = await run_cli("status", "--url", server.url)
    assert human.returncode == 0, human.stderr.decode()
    key = server.node.require().public_key
    assert "node" in out(human) and key in out(human) and "channels" in out(human)
    data = as_json(await run_cli("status", "--url", server.url, "--json"))
    assert data["agent"] == "node" and data["public_key"] == key and "uptime_s" in data


async def test_open_send_channels_close_round_trip(server: ServeInfo) -> None:
    url = ("--url", server.url)
    opened = as_json(
        await run_cli(
            "open", *url, "--agent", "alice", "--target", "bob", "--intent", "chat", "--metadata", '{"k":1}', "--json"
        )
    )
    cid = opened["channel_id"]
    assert (opened["agent"], opened["target"], opened["intent"]) == ("alice", "bob", "chat")

    human_open = await run_cli("open", *url, "--agent", "alice", "--target", "carol")
    assert human_open.returncode == 0 and out(human_open).startswith("ch-")
    second = out(human_open).splitlines()[0]

    sent = as_json(
        await run_cli("send", *url, "--agent", "alice", "--channel", cid, "--payload", '{"text":"hi"}', "--json")
    )
    assert sent["seq"] == 1 and sent["channel_id"] == cid
    human_send = await run_cli("send", *url, "--agent", "bob", "--channel", cid, "--payload", "[1,2]")
    assert human_send.returncode == 0 and "seq 2" in out(human_send)

    listed = as_json(await run_cli("channels", *url, "--agent", "alice", "--json"))
    assert {c["channel_id"] for c in listed["channels"]} == {cid, second}
    human_list = await run_cli("channels", *url, "--agent", "bob")
    assert "1 open channel(s) of bob" in out(human_list) and cid in out(human_list)

    closed = as_json(await run_cli("close", *url, "--agent", "alice", "--channel", cid, "--reason", "bye", "--json"))
    assert closed["state"] == "closed" and closed["reason"] == "bye"
    human_close = await run_cli("close", *url, "--agent", "alice", "--channel", second)
    assert human_close.returncode == 0 and f"closed {second} (closed)" in out(human_close)

    with MuxClient(server.url, "bob") as bob:
        frames = await trio.to_thread.run_sync(functools.partial(bob.frames, cid))
    assert [(f["kind"], f["payload"]) for f in frames["frames"]] == [
        ("data", {"text": "hi"}),
        ("close", {"reason": "bye", "by": "alice"}),
    ]


async def test_intents_from_a_node(server: ServeInfo) -> None:
    rows = as_json(await run_cli("intents", "--url", server.url, "--json"))
    assert {"chat", "stream", "call:voice"} <= {r["intent"] for r in rows}
    human = await run_cli("intents", "--url", server.url)
    assert human.returncode == 0 and "call:voice" in out(human) and "delivery" in out(human)


async def test_errors_exit_2(server: ServeInfo) -> None:
    bogus = "ch-" + "0" * 32
    proc = await run_cli("send", "--url", server.url, "--channel", bogus, "--payload", "1")
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode().startswith("error: unknown_channel: ")

    proc = await run_cli("close", "--url", server.url, "--channel", bogus)
    assert proc.returncode == 2 and "error: unknown_channel" in proc.stderr.decode()

    proc = await run_cli("send", "--url", server.url, "--channel", bogus, "--payload", "{nope")
    assert proc.returncode == 2 and "error: invalid_json" in proc.stderr.decode()

    proc = await run_cli("status", "--url", "http://127.0.0.1:1", "--timeout", "3")
    assert proc.returncode == 2 and "error: unreachable" in proc.stderr.decode()


async def test_listen_prints_channels_and_verified_frames(server: ServeInfo) -> None:
    result: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def listen() -> None:
        result["listen"] = await run_cli(
            "listen", "--url", server.url, "--agent", "Listener", "--count", "2", "--seconds", "10", timeout=20
        )

    with MuxClient(server.url, "talker") as talker, trio.fail_after(25):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            while "listener" not in (await trio.to_thread.run_sync(talker.status))["agents_attached"]:
                assert "listen" not in result, result["listen"].stderr.decode()
                await trio.sleep(0.05)
            cid = (await trio.to_thread.run_sync(functools.partial(talker.open, "listener", "chat")))["channel_id"]
            await trio.to_thread.run_sync(functools.partial(talker.send, cid, {"n": 1}))
            await trio.to_thread.run_sync(functools.partial(talker.send, cid, "second"))
    proc = result["listen"]
    assert proc.returncode == 0, proc.stderr.decode()
    lines = out(proc).splitlines()
    assert lines[0].startswith("listening as listener on node node")
    assert f"channel {cid} from talker intent chat" in lines
    frames = [line for line in lines if line.startswith("frame ")]
    assert frames == [
        f'frame {cid} seq 1 from talker: {{"n":1}} [verified]',
        f'frame {cid} seq 2 from talker: "second" [verified]',
    ]
    assert lines[-1] == "received 2 frame(s), 0 failed verification"


async def test_listen_json_stops_after_seconds(server: ServeInfo) -> None:
    proc = await run_cli("listen", "--url", server.url, "--agent", "idle", "--seconds", "0.5", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    events = [orjson.loads(line) for line in proc.stdout.splitlines()]
    assert events == [
        {"event": "connected", "agent": "idle", "node": "node", "public_key": server.node.require().public_key}
    ]


async def test_export_then_verify(server: ServeInfo, tmp_path: Any) -> None:
    url = server.url
    opened = as_json(
        await run_cli("open", "--url", url, "--agent", "ex", "--target", "why", "--intent", "chat", "--json")
    )
    cid = opened["channel_id"]
    for n in range(3):
        assert (
            await run_cli("send", "--url", url, "--agent", "ex", "--channel", cid, "--payload", f'{{"n":{n}}}')
        ).returncode == 0
    assert (await run_cli("close", "--url", url, "--agent", "ex", "--channel", cid)).returncode == 0
    target = tmp_path / "chain.jsonl"
    exported = await run_cli("export", "--url", url, "--agent", "why", "--channel", cid, "-o", str(target))
    assert exported.returncode == 0, exported.stderr.decode()
    key = server.node.require().public_key
    assert f"--key {key}" in exported.stderr.decode()
    checked = await run_cli("verify", str(target), "--key", key)
    assert checked.returncode == 0 and out(checked).startswith("OK: 5 frames")
    lines = target.read_text().splitlines()
    edited = orjson.loads(lines[2])
    edited["payload"]["n"] = 42
    lines[2] = orjson.dumps(edited).decode()
    target.write_text("\n".join(lines) + "\n")
    checked = await run_cli("verify", str(target), "--key", key)
    assert checked.returncode == 1 and "bad_hash" in out(checked) and "seq 2" in out(checked)
    foreign = await run_cli("export", "--url", url, "--agent", "zed", "--channel", cid)
    assert foreign.returncode == 2 and "forbidden" in foreign.stderr.decode()
