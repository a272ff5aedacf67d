"""The tping backend (``tibet:ping``), the ping helpers and ``python -m mux ping``, on a real node."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest
import trio

import mux
from mux.cli_net import answer_pings, ping_agent
from mux.client import MuxClient, connect
from mux.errors import MuxError
from mux.server import ServeInfo


async def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m mux ARGS`` to completion (bounded) and capture its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MUX_AGENT", None)
    with trio.fail_after(timeout):
        return await trio.run_process(
            [sys.executable, "-m", "mux", *args], capture_stdout=True, capture_stderr=True, check=False, env=env
        )


async def test_ping_node_pong_is_node_signed(server: ServeInfo) -> None:
    key = server.node.require().public_key
    with trio.fail_after(10):
        async with connect(server.url, "alice") as conn:
            ch = await conn.open("node", "tibet:ping")
            assert ch.route["backend"] == "tping"
            ack = await ch.send({"type": "ping", "nonce": "n-1", "t0": 12345})
            assert ack["disposition"] == "consumed"
            pong = await ch.receive()
            payload = pong["payload"]
            assert payload["type"] == "pong" and payload["nonce"] == "n-1" and payload["t0"] == 12345
            assert payload["by"] == "node" and isinstance(payload["t_node"], int) and payload["t_node"] > 0
            assert pong["sender"] == "node" and pong["target"] == "alice" and pong["seq"] == ack["seq"] + 1
            mux.verify_frame(pong, key)  # signed by the node's key: proof of who answered

            await ch.send({"type": "hello"})  # not a ping: answered with an error, nothing else
            err = await ch.receive()
            assert err["payload"]["error"] == "bad_ping" and err["sender"] == "node"
            with MuxClient(server.url, "alice") as rest:
                info = await trio.to_thread.run_sync(rest.channel, ch.id)
            assert info["backend_state"]["pings"] == 1 and info["backend_state"]["bad"] == 1
            await ch.close()

            replies = await ping_agent(conn, "node", count=3)
            assert len(replies) == 3 and all(r is not None for r in replies)
            nonces = set()
            for r in replies:
                assert r is not None
                assert r.rtt_s > 0 and r.verified and r.sender == "node"
                assert r.frame["payload"]["nonce"] == r.nonce and r.frame["payload"]["by"] == "node"
                mux.verify_frame(r.frame, key)
                nonces.add(r.nonce)
            assert len(nonces) == 3
            # a wrong pinned key makes every pong fail verification
            wrong = await ping_agent(conn, conn.node, count=1, key="00" * 32)
            assert wrong[0] is not None and not wrong[0].verified and wrong[0].verify_error


async def test_ping_another_agent_that_answers(server: ServeInfo, nursery: trio.Nursery) -> None:
    key = server.node.require().public_key
    with trio.fail_after(10):
        async with connect(server.url, "bob") as bob, connect(server.url, "alice") as alice:
            nursery.start_soon(answer_pings, bob)
            replies = await ping_agent(alice, "bob", count=3)
            for r in replies:
                assert r is not None and r.verified and r.rtt_s > 0
                assert r.sender == "bob" and r.frame["payload"]["by"] == "bob"
                assert r.frame["payload"]["nonce"] == r.nonce and "t_agent" in r.frame["payload"]
                mux.verify_frame(r.frame, key)
            # nobody answers for an agent that is not connected: bounded wait, no reply
            lost = await ping_agent(alice, "carol", count=1, timeout=0.3)
            assert lost == [None]
            # only the opener may send on a ping to the node
            ch = await alice.open("node", "tibet:ping")
            with pytest.raises(MuxError):
                await server.node.require().handle(ch.id, "node").send({"type": "ping", "nonce": "x"})


async def test_cli_ping_node_and_agent(server: ServeInfo, nursery: trio.Nursery) -> None:
    key = server.node.require().public_key
    human = await run_cli("ping", "node", "--url", server.url, "--count", "3", "--interval", "0")
    text = human.stdout.decode()
    assert human.returncode == 0, human.stderr.decode() + text
    assert text.startswith("PING node via node node as ping-")
    assert text.count("pong ") == 3 and text.count("from node: seq") == 3
    assert text.count(f"verified with node key {key[:16]}") == 3
    assert "3 sent, 3 received, 0 failed verification; rtt min/avg/max = " in text

    with trio.fail_after(15):
        async with connect(server.url, "bob") as bob:
            nursery.start_soon(answer_pings, bob)
            as_json = await run_cli(
                "ping", "bob", "--url", server.url, "--agent", "pinger", "--count", "2", "--interval", "0",
                "--key", key, "--json",
            )  # fmt: skip
    assert as_json.returncode == 0, as_json.stderr.decode()
    lines = [orjson.loads(line) for line in as_json.stdout.splitlines()]
    pongs = [x for x in lines if x["event"] == "pong"]
    assert [p["sender"] for p in pongs] == ["bob", "bob"] and all(p["verified"] for p in pongs)
    assert lines[-1]["event"] == "summary" and lines[-1]["received"] == 2 and lines[-1]["rtt_ms"]["min"] > 0

    wrong = await run_cli("ping", "node", "--url", server.url, "--count", "1", "--key", "11" * 32)
    assert wrong.returncode == 1 and "BAD SIGNATURE" in wrong.stdout.decode()


async def test_cli_ping_answer_mode(server: ServeInfo) -> None:
    """``python -m mux ping --answer`` makes an agent pingable."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "mux", "ping", "--answer", "--url", server.url, "--agent", "dave", "--seconds", "20"]
    process = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert process.stdout is not None
    try:
        with trio.fail_after(15):
            buf = b""
            while b"answering pings to dave" not in buf:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, buf
                buf += chunk
            async with connect(server.url, "alice") as alice:
                replies = await ping_agent(alice, "dave", count=2)
            assert all(r is not None and r.sender == "dave" and r.verified for r in replies)
            process.terminate()
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5):
            await process.wait()
        await process.stdout.aclose()
